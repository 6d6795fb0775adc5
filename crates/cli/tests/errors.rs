//! Every error case: the message says what went wrong, the exit code is right, and the store is
//! left unchanged (byte for byte where the command could have written).

mod common;

use common::{Env, ext4_image, random_file};

/// A store with journal slots of 1 MiB (a small file), VDI 0 "golden" filled from a 16 MiB
/// ext4 image, and snapshot 1 of it.
fn fixture() -> (Env, std::path::PathBuf) {
    let env = Env::new();
    env.ok(&["init", "--journal", "1M"]);
    let data = env.path("data.bin");
    random_file(&data, 256 << 10, 7);
    let image = env.path("image");
    ext4_image(&image, 16, &[(&data, "data.bin")]);
    assert_eq!(env.ok(&["create", "golden"]).trim(), "0");
    env.ok(&["fill", "golden", "image"]);
    assert_eq!(env.ok(&["snap", "golden"]).trim(), "1");
    (env, image)
}

/// Runs each failing command and checks the store file did not change.
fn refused_unchanged(env: &Env, cases: &[(&[&str], i32, &str)]) {
    let before = env.store_bytes();
    for (args, code, needle) in cases {
        env.fails(args, *code, needle);
        assert!(env.store_bytes() == before, "vdi {args:?} changed the store");
    }
}

#[test]
fn unknown_vdi() {
    let (env, _) = fixture();
    refused_unchanged(
        &env,
        &[
            (&["info", "nope"], 2, "no VDI named 'nope'"),
            (&["fill", "nope", "image"], 2, "no VDI named 'nope'"),
            (&["validate", "nope", "image"], 2, "no VDI named 'nope'"),
            (&["snap", "nope"], 2, "no VDI named 'nope'"),
            (&["snap-list", "7"], 2, "no VDI with id 7"),
            (&["delete", "7"], 2, "no VDI with id 7"),
            (&["rename", "nope", "other"], 2, "no VDI named 'nope'"),
            (&["export", "nope", "out.img"], 2, "vdi list"),
            (&["diff", "1", "--vdi", "nope"], 2, "no VDI named 'nope'"),
        ],
    );
    assert!(!env.path("out.img").exists());
}

#[test]
fn unknown_or_deleted_snapshot() {
    let (env, _) = fixture();
    refused_unchanged(
        &env,
        &[
            (&["create", "c", "--from", "9"], 2, "no snapshot 9"),
            (&["create", "c", "--from", "abc"], 2, "not a snapshot id"),
            (&["snap-delete", "9"], 2, "no snapshot 9"),
            (&["export", "@9", "out.img"], 2, "no snapshot 9"),
            (&["export", "9", "out.img", "--snapshot"], 2, "no snapshot 9"),
            (&["validate", "@9", "image"], 2, "no snapshot 9"),
            (&["diff", "9"], 2, "no snapshot 9"),
            (&["diff", "1", "9"], 2, "no snapshot 9"),
            (&["info", "@9"], 2, "no snapshot 9"),
            (&["info", "golden@9"], 2, "no snapshot 9"),
            (&["validate", "nope@1", "image"], 2, "no VDI named 'nope'"),
        ],
    );
    env.ok(&["create", "other"]);
    refused_unchanged(&env, &[(&["export", "other@1", "out.img"], 2, "is a snapshot of VDI 0, not of 'other'")]);
    env.ok(&["snap-delete", "1"]);
    refused_unchanged(
        &env,
        &[
            (&["create", "c", "--from", "1"], 2, "snapshot 1 was deleted"),
            (&["snap-delete", "1"], 2, "snapshot 1 was deleted"),
            (&["export", "@1", "out.img"], 2, "snapshot 1 was deleted"),
        ],
    );
}

#[test]
fn image_larger_than_the_vdi() {
    let (env, image) = fixture();
    assert_eq!(env.ok(&["create", "small", "--size", "1M"]).trim(), "1");
    let big = env.path("big.img");
    random_file(&big, 2 << 20, 3);
    refused_unchanged(&env, &[(&["fill", "small", "big.img"], 2, "only 1048576 bytes")]);
    // A VDI that got its size from a first fill keeps it.
    let bigger = env.path("bigger.img");
    std::fs::File::create(&bigger).unwrap().set_len(32 << 20).unwrap();
    refused_unchanged(&env, &[(&["fill", "golden", "bigger.img"], 2, "create a larger VDI")]);
    env.ok(&["validate", "golden", image.to_str().unwrap()]);
}

#[test]
fn name_taken() {
    let (env, _) = fixture();
    env.ok(&["create", "other"]);
    refused_unchanged(
        &env,
        &[
            (&["create", "golden"], 2, "a VDI named 'golden' already exists"),
            (&["create", "golden", "--from", "1"], 2, "already exists"),
            (&["rename", "other", "golden"], 2, "already exists"),
        ],
    );
}

#[test]
fn bad_sizes_and_names_and_usage() {
    let (env, _) = fixture();
    refused_unchanged(
        &env,
        &[
            (&["create", "x", "--size", "12Q"], 2, "invalid size '12Q'"),
            (&["create", "x", "--size", "1.5G"], 2, "e.g. 4096, 512M or 2G"),
            (&["create", "x", "--size", "1000"], 2, "invalid size 1000"),
            (&["create", "x", "--size", "0"], 2, "invalid size 0"),
            (&["create", ""], 2, "invalid VDI name"),
            (&["create", "a@b"], 2, "invalid VDI name"),
            (&["frobnicate"], 2, "unrecognized subcommand"),
            (&["create"], 2, "<NAME>"),
            (&["create", "x", "--size", "1G", "--from", "1"], 2, "cannot be used with"),
        ],
    );
}

#[test]
fn not_a_store() {
    let env = Env::new();
    random_file(&env.store, 1 << 20, 11);
    refused_unchanged(
        &env,
        &[
            (&["list"], 2, "not a Parallax block store"),
            (&["create", "x"], 2, "not a Parallax block store"),
            (&["check"], 2, "check --store"),
        ],
    );
}

#[test]
fn missing_store_is_not_created_by_readers_or_failed_writers() {
    let env = Env::new();
    env.fails(&["list"], 2, "no store at");
    env.fails(&["snap", "0"], 2, "vdi create NAME");
    assert!(!env.store.exists());
    // A first `create` that fails leaves no store behind.
    env.fails(&["create", ""], 2, "invalid VDI name");
    assert!(!env.store.exists());
    env.ok(&["create", "first"]);
    assert!(env.store.exists());
    env.fails(&["init"], 2, "already exists");
}

fn flip(path: &std::path::Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).unwrap();
    for x in &mut b {
        *x ^= 0x5a;
    }
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn damaged_superblocks() {
    let (env, _) = fixture();
    flip(&env.store, 200);
    flip(&env.store, 4096 + 200);
    refused_unchanged(
        &env,
        &[
            (&["list"], 3, "the store is damaged"),
            (&["create", "x"], 3, "damaged superblock"),
            (&["check"], 3, "restore it from a backup"),
        ],
    );
}

#[test]
fn one_damaged_superblock_copy_is_survived_with_a_warning() {
    let (env, image) = fixture();
    flip(&env.store, 200);
    let out = env.run(&["validate", "golden", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
}

/// The home block of the VDI registry (magic "VREG" and its own address in its header).
fn registry_block(store: &[u8]) -> u64 {
    store
        .chunks_exact(4096)
        .enumerate()
        .find(|(i, b)| b[..4] == *b"VREG" && u64::from_le_bytes(b[8..16].try_into().unwrap()) == *i as u64)
        .map(|(i, _)| i as u64)
        .expect("no registry block in the store")
}

#[test]
fn damaged_metadata_block() {
    let (env, _) = fixture();
    // Two more commits, so the registry block is not in the journal's last record.
    env.ok(&["snap", "golden"]);
    env.ok(&["snap", "golden"]);
    let at = registry_block(&env.store_bytes());
    flip(&env.store, at * 4096 + 100);
    refused_unchanged(
        &env,
        &[
            (&["list"], 3, "damaged VDI registry block"),
            (&["create", "x"], 3, "the store is damaged"),
            (&["check"], 3, "damaged"),
        ],
    );
}

#[test]
fn store_full_mid_import_leaves_the_vdi_as_before() {
    let env = Env::new();
    env.ok(&["init", "--max-size", "32M"]);
    let data = env.path("data.bin");
    random_file(&data, 1 << 20, 5);
    let small = env.path("small.img");
    ext4_image(&small, 16, &[(&data, "data.bin")]);
    env.ok(&["create", "vm", "--size", "64M"]);
    env.ok(&["fill", "vm", "small.img"]);
    let info_before = env.ok(&["list", "--json"]);

    let huge = env.path("huge.img");
    random_file(&huge, 40 << 20, 9);
    let err = env.fails(&["fill", "vm", "huge.img"], 3, "the block store is full");
    assert!(err.contains("the VDI is unchanged") && err.contains("--max-size"), "{err}");

    // Same content, same listing, consistent store, and the space came back.
    assert!(env.ok(&["validate", "vm", "small.img"]).starts_with("identical"));
    assert_eq!(env.ok(&["list", "--json"]), info_before);
    assert!(env.ok(&["check"]).contains("consistent"));
    let fits = env.path("fits.img");
    random_file(&fits, 20 << 20, 13);
    env.ok(&["fill", "vm", "fits.img"]);
    env.ok(&["validate", "vm", "fits.img"]);
}

#[test]
fn tree_image_formats_need_graphviz() {
    let (env, _) = fixture();
    let out = env.cmd(&["tree", "--format", "svg"]).env("PATH", env.path("empty-path")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install graphviz") && err.contains("--format dot"), "{err}");
}

#[test]
fn export_to_an_unwritable_place() {
    let (env, _) = fixture();
    env.fails(&["export", "golden", "no/such/dir/out.img"], 2, "cannot create");
}

/// Errors that used to mislead: each now says what is wrong and what to do instead.
#[test]
fn errors_say_what_is_wrong() {
    let (env, _) = fixture();
    refused_unchanged(
        &env,
        &[
            // A snapshot where a VDI is wanted.
            (&["snap", "@1"], 2, "'@1' names snapshot 1, not a VDI"),
            (&["snap", "golden@1"], 2, "names snapshot 1, not a VDI"),
            // An id no VDI has.
            (&["info", "99"], 2, "no VDI with id 99"),
            // Names that could never be used.
            (&["create", "a@b"], 2, "'@' is not allowed: it separates a VDI from a snapshot id"),
            (&["create", "7"], 2, "a name cannot be a number"),
            (&["rename", "golden", "12"], 2, "a name cannot be a number"),
            // The 2005 tool's form.
            (&["create", "new", "16", "0"], 2, "--from SNAPSHOT"),
        ],
    );
}

/// `export -` refuses a terminal, and a reader that goes away ends it quietly with the
/// SIGPIPE status (not "error", not the store-failure code 3).
#[test]
fn export_to_a_terminal_is_refused_and_a_closed_pipe_is_quiet() {
    let (env, _) = fixture();
    // `script` gives the command a terminal as stdout.
    let bin = common::vdi_bin();
    let line = format!("{} --store {} export golden -", bin.display(), env.store.display());
    let out = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .output()
        .expect("script (util-linux) runs the command on a terminal");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("not writing") && text.contains("to a terminal"), "{text}");
    let piped = std::process::Command::new("bash")
        .args([
            "-c",
            &format!(
                "{} --store {} export golden - | head -c 100 >/dev/null; echo ${{PIPESTATUS[0]}}",
                bin.display(),
                env.store.display()
            ),
        ])
        .output()
        .expect("bash");
    let code = String::from_utf8_lossy(&piped.stdout).trim().to_string();
    let err = String::from_utf8_lossy(&piped.stderr);
    assert_eq!(code, "141", "exit status of vdi export | head: {code}; stderr: {err}");
    assert!(!err.contains("error"), "{err}");
}
