//! What an operator coming from qemu-img, rbd or lvm-thin reaches for, through the real `vdi`
//! binary and real qemu-img: other image formats, re-fills that keep sharing, pipes, rollback,
//! snapshot names and protection, resize, map, du and diff streams replayed on a second store.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

fn qemu_img(args: &[&str], dir: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img must be installed (qemu-utils); the README's test command checks for it");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 16 MiB raw image: 3 MiB of random data at 1 MiB, 64 KiB at 9 MiB, the rest a hole.
fn base_image(env: &Env, name: &str) {
    let path = env.path(name);
    random_file(&env.path("part1"), 3 << 20, 11);
    random_file(&env.path("part2"), 64 << 10, 12);
    let mut img = vec![0u8; 16 << 20];
    img[1 << 20..4 << 20].copy_from_slice(&std::fs::read(env.path("part1")).unwrap());
    img[9 << 20..(9 << 20) + (64 << 10)].copy_from_slice(&std::fs::read(env.path("part2")).unwrap());
    std::fs::write(&path, img).unwrap();
}

/// A scratch store with VDI `name` filled from `base.raw` ([`base_image`]).
fn filled(name: &str) -> Env {
    let env = Env::new();
    base_image(&env, "base.raw");
    env.ok(&["create", name]);
    env.ok(&["fill", name, "base.raw"]);
    env
}

#[test]
fn images_in_other_formats_are_converted_on_import_and_export() {
    let env = Env::new();
    let dir = env.dir.path();
    base_image(&env, "base.raw");
    for (fmt, opts) in
        [("qcow2", None), ("vmdk", None), ("vhdx", None), ("vdi", None), ("vpc", Some("subformat=fixed"))]
    {
        let file = format!("base.{fmt}");
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if let Some(o) = opts {
            args.extend(["-o", o]);
        }
        args.extend(["base.raw", &file]);
        qemu_img(&args, dir);
        env.ok(&["create", fmt]);
        let out = env.ok(&["fill", fmt, &file]);
        assert!(out.contains("filled"), "{out}");
        // The VDI holds the disk, not the container's bytes: qemu-img itself compares the
        // image with the VDI's raw export.
        let v = env.ok(&["validate", fmt, "base.raw"]);
        assert!(v.starts_with("identical"), "{fmt}: {v}");
        let back = format!("{fmt}.back.raw");
        env.ok(&["export", fmt, &back]);
        qemu_img(&["compare", "-f", fmt, "-F", "raw", &file, &back], dir);
        // The VDI takes the image's virtual size (VHD rounds it up to its disk geometry).
        let size = json(&env.ok(&["info", fmt, "--json"]))["size"].as_u64().unwrap();
        let virtual_size =
            json(&qemu_img(&["info", "--output=json", "-f", fmt, &file], dir))["virtual-size"].as_u64().unwrap();
        assert_eq!(size, virtual_size, "{fmt}");
    }
    // --format raw imports the container's bytes as they are.
    env.ok(&["create", "as-raw"]);
    env.ok(&["fill", "as-raw", "base.qcow2", "--format", "raw"]);
    assert!(env.ok(&["validate", "as-raw", "base.qcow2"]).starts_with("identical"));
    // Export to qcow2 and vmdk, checked by qemu-img itself.
    for fmt in ["qcow2", "vmdk"] {
        let out = format!("out.{fmt}");
        env.ok(&["export", "qcow2", &out, "--format", fmt]);
        let info = json(&qemu_img(&["info", "--output=json", &out], dir));
        assert_eq!(info["format"], fmt);
        qemu_img(&["compare", "-f", "raw", "-F", fmt, "base.raw", &out], dir);
    }
    // An image that would make qemu-img read another file (a backing file a guest could have
    // written into a raw disk's first sector) is refused unless its format is named.
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "over.qcow2"], dir);
    env.ok(&["create", "over"]);
    env.fails(&["fill", "over", "over.qcow2"], 2, "reads another file");
    env.ok(&["fill", "over", "over.qcow2", "--format", "qcow2"]);
    assert!(env.ok(&["validate", "over", "base.raw"]).starts_with("identical"));
    // The same for an external data file, and for a VMDK descriptor (which names its extents;
    // judged from its own bytes, so a FIFO among them cannot hang the probe).
    std::fs::write(env.path("host-secret"), b"a host file the image names").unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "data_file=host-secret,data_file_raw=on", "df.qcow2", "1M"], dir);
    env.fails(&["fill", "over", "df.qcow2"], 2, "external data file");
    qemu_img(&["create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "flat.vmdk", "1M"], dir);
    env.fails(&["fill", "over", "flat.vmdk"], 2, "extent files");
    assert!(env.ok(&["validate", "over", "base.raw"]).starts_with("identical"), "refusals change nothing");
    // Exporting to a path that is a pipe (/dev/stdout) works like '-'.
    let exported = env.cmd(&["export", "over", "/dev/stdout"]).stdout(Stdio::piped()).output().unwrap();
    assert!(exported.status.success(), "{}", String::from_utf8_lossy(&exported.stderr));
    assert!(exported.stdout == std::fs::read(env.path("base.raw")).unwrap(), "the export on stdout differs");
    // A qcow2 image on a pipe cannot be converted: refused, not imported as raw bytes.
    let out = piped(&env, &["fill", "as-raw", "-"], std::fs::read(env.path("base.qcow2")).unwrap());
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("qcow2 image"));
    assert!(env.ok(&["check", "--json"]).contains("\"clean\": true"));
}

/// Runs `vdi ARGS` with `input` on a pipe as its standard input.
fn piped(env: &Env, args: &[&str], input: Vec<u8>) -> std::process::Output {
    let mut child = env.cmd(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The command may stop reading early (a refused stream): a broken pipe is its answer.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

/// [`piped`], which must succeed; returns stdout.
fn with_pipe(env: &Env, args: &[&str], input: Vec<u8>) -> String {
    let out = piped(env, args, input);
    assert!(out.status.success(), "vdi {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// [`piped`], which must fail with a user error; returns stderr.
fn with_pipe_fails(env: &Env, args: &[&str], input: Vec<u8>) -> String {
    let out = piped(env, args, input);
    assert_eq!(out.status.code(), Some(2), "vdi {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn fill_reads_standard_input_and_pipes() {
    let env = Env::new();
    base_image(&env, "base.raw");
    let img = std::fs::read(env.path("base.raw")).unwrap();
    env.ok(&["create", "a"]);
    with_pipe(&env, &["fill", "a", "-"], img.clone());
    assert!(env.ok(&["validate", "a", "base.raw"]).starts_with("identical"));
    env.ok(&["create", "b"]);
    with_pipe(&env, &["fill", "b", "/dev/stdin"], img);
    assert!(env.ok(&["validate", "b", "base.raw"]).starts_with("identical"));
}

#[test]
fn a_clone_refilled_with_a_near_copy_of_its_parent_keeps_sharing() {
    let env = filled("golden");
    let snap = env.ok(&["snap", "golden", "release"]).trim().to_string();
    env.ok(&["create", "vm", "--from", "golden@release"]);
    // The new image differs in two places: 8 KiB at 2 MiB and one byte at 9 MiB.
    let mut img = std::fs::read(env.path("base.raw")).unwrap();
    img[2 << 20..(2 << 20) + 8192].fill(0x5a);
    img[(9 << 20) + 77] ^= 0xff;
    std::fs::write(env.path("next.raw"), &img).unwrap();
    env.ok(&["fill", "vm", "next.raw"]);
    let diff = json(&env.ok(&["diff", &snap, "--vdi", "vm", "--json"]));
    let ranges = diff["ranges"].as_array().unwrap_or_else(|| panic!("{diff}"));
    assert_eq!(ranges.len(), 2, "{diff}");
    assert_eq!(diff["changed_bytes"], 3 * 4096, "{diff}");
    let du = json(&env.ok(&["du", "vm", "--json"]));
    let live = du.as_array().unwrap().iter().find(|r| r["snapshot"].is_null()).unwrap().clone();
    assert_eq!(live["exclusive"], 3 * 4096, "the clone owns only what changed: {du}");
    // The same image again writes nothing.
    let again = env.ok(&["fill", "vm", "next.raw"]);
    assert!(again.contains("wrote 0 B (0 blocks)"), "{again}");
    assert_eq!(json(&env.ok(&["diff", &snap, "--vdi", "vm", "--json"]))["changed_bytes"], 3 * 4096);
    assert!(env.ok(&["validate", "vm", "next.raw"]).starts_with("identical"));
}

#[test]
fn rollback_names_protection_resize_and_delete_confirmation() {
    let env = filled("db");
    let id = json(&env.ok(&["info", "db", "--json"]))["id"].clone();
    let s = env.ok(&["snap", "db", "before-upgrade"]).trim().to_string();
    env.fails(&["snap", "db", "before-upgrade"], 2, "already has a snapshot named");
    env.fails(&["snap", "db", "42"], 2, "cannot be a number");
    // Names work wherever a snapshot goes.
    let info = json(&env.ok(&["info", "db@before-upgrade", "--json"]));
    assert_eq!(info["id"].to_string(), s, "{info}");
    // Change the VDI, then roll it back.
    random_file(&env.path("junk"), 1 << 20, 99);
    env.ok(&["fill", "db", "junk"]);
    assert_eq!(env.run(&["validate", "db", "base.raw"]).status.code(), Some(1), "the fill changed the VDI");
    let out = env.ok(&["rollback", "db", "before-upgrade"]);
    assert!(out.contains("rolled"), "{out}");
    assert!(env.ok(&["validate", "db", "base.raw"]).starts_with("identical"));
    assert_eq!(json(&env.ok(&["info", "db", "--json"]))["id"], id, "rollback keeps the VDI's id");
    // Protected snapshots hold off deletion of themselves and their VDI.
    env.ok(&["snap-protect", "db@before-upgrade"]);
    env.fails(&["snap-delete", "db@before-upgrade"], 2, "protected");
    env.fails(&["delete", "db", "--yes"], 2, "protected");
    env.ok(&["snap-unprotect", "db@before-upgrade"]);
    // Renaming and clearing names.
    env.ok(&["snap-rename", "db@before-upgrade", "v1"]);
    assert_eq!(json(&env.ok(&["snap-list", "db", "--json"]))[0]["name"], "v1");
    // Resize: grow freely, shrink only when allowed.
    env.ok(&["resize", "db", "32M"]);
    assert_eq!(json(&env.ok(&["info", "db", "--json"]))["size"], 32u64 << 20);
    env.fails(&["resize", "db", "2M"], 2, "--allow-shrink");
    env.ok(&["resize", "db", "2M", "--allow-shrink"]);
    env.ok(&["resize", "db", "16M"]);
    let back = env.path("back.raw");
    env.ok(&["export", "db", "back.raw"]);
    let got = std::fs::read(&back).unwrap();
    let want = std::fs::read(env.path("base.raw")).unwrap();
    assert_eq!(got[..2 << 20], want[..2 << 20]);
    assert!(got[2 << 20..].iter().all(|&b| b == 0), "the shrink dropped what lay past 2M");
    // A VDI with snapshots is not deleted without --yes when nobody can be asked.
    env.fails(&["delete", "db"], 2, "add --yes");
    assert!(env.ok(&["delete", "db", "--yes"]).contains("deleted VDI"));
    assert!(env.ok(&["check", "--json"]).contains("\"clean\": true"));
}

/// The data extents of a map in `qemu-img map --output=json`'s shape: (start, length).
fn data_extents(map: &Value) -> Vec<(u64, u64)> {
    map.as_array()
        .unwrap_or_else(|| panic!("a map is a JSON array: {map}"))
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

#[test]
fn map_agrees_with_qemu_img_map_of_the_export() {
    let env = filled("a");
    let data = data_extents(&json(&env.ok(&["map", "a", "--json"])));
    assert_eq!(data, vec![(1 << 20, 3 << 20), (9 << 20, 64 << 10)]);
    env.ok(&["export", "a", "out.raw"]);
    let theirs = data_extents(&json(&qemu_img(&["map", "--output=json", "-f", "raw", "out.raw"], env.dir.path())));
    assert_eq!(data, theirs);
}

#[test]
fn export_diff_and_import_diff_replay_a_backup_on_a_second_store() {
    let env = filled("db");
    env.ok(&["snap", "db", "mon"]);
    let mut img = std::fs::read(env.path("base.raw")).unwrap();
    img[5 << 20..(5 << 20) + 4096].fill(7);
    img[1 << 20..(1 << 20) + 4096].fill(0);
    std::fs::write(env.path("tue.raw"), &img).unwrap();
    env.ok(&["fill", "db", "tue.raw"]);
    env.ok(&["snap", "db", "tue"]);
    env.ok(&["export-diff", "db@mon", "mon.pxdiff"]);
    let incr = env.cmd(&["export-diff", "db@tue", "-", "--from", "db@mon"]).output().unwrap();
    assert!(incr.status.success(), "{}", String::from_utf8_lossy(&incr.stderr));
    assert!(
        incr.stdout.len() < 16 << 10,
        "the incremental diff carries only what changed: {} bytes",
        incr.stdout.len()
    );

    let backup = Env::new();
    backup.ok(&["create", "db"]);
    let err = with_pipe_fails(&backup, &["import-diff", "-", "db"], incr.stdout.clone());
    assert!(err.contains("no snapshot named 'mon'"), "{err}");
    backup.ok(&["import-diff", &env.path("mon.pxdiff").display().to_string(), "db"]);
    with_pipe(&backup, &["import-diff", "-", "db"], incr.stdout);
    for snap in ["db@mon", "db@tue", "db"] {
        env.ok(&["export", snap, "a.raw"]);
        backup.ok(&["export", snap, "b.raw"]);
        assert!(same_bytes(&env.path("a.raw"), &backup.path("b.raw")), "{snap} differs on the second store");
    }
    assert!(backup.ok(&["check", "--json"]).contains("\"clean\": true"));
}

#[test]
fn bash_completion_offers_the_stores_vdi_and_snapshot_names() {
    let env = Env::new();
    env.ok(&["create", "golden-image", "--size", "1M"]);
    env.ok(&["create", "scratch", "--size", "1M"]);
    env.ok(&["snap", "golden-image", "release-1"]);
    let script = env.ok(&["completions", "bash"]);
    std::fs::write(env.path("vdi.bash"), script).unwrap();
    let bin_dir = vdi_bin().parent().unwrap().display().to_string();
    let complete = |line: &str| -> Vec<String> {
        let words: Vec<&str> = line.split(' ').collect();
        let cmd = format!(
            "source vdi.bash; PATH={bin_dir}:$PATH; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{line}'; \
             COMP_POINT=${{#COMP_LINE}}; _vdi_with_names vdi '{cur}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            words = words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
            cword = words.len() - 1,
            cur = words[words.len() - 1],
            prev = words[words.len() - 2],
        );
        let out = Command::new("bash")
            .args(["-c", &cmd])
            .current_dir(env.dir.path())
            .env("PARALLAX_STORE", &env.store)
            .env("PARALLAX_RUN_DIR", &env.run_dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    };
    let got = complete("vdi info gol");
    assert!(got.contains(&"golden-image".to_string()), "{got:?}");
    assert!(got.contains(&"golden-image@release-1".to_string()), "{got:?}");
    assert!(!got.contains(&"scratch".to_string()), "{got:?}");
    let got = complete("vdi snap-list s");
    assert!(got.contains(&"scratch".to_string()), "{got:?}");
    // Subcommands still complete.
    let got = complete("vdi rollb");
    assert!(got.contains(&"rollback".to_string()), "{got:?}");
}

/// `df`'s figures in bytes for the file system holding `path`: (size, used, available).
fn df_bytes(path: &Path) -> (u64, u64, u64) {
    let out = Command::new("df").args(["-B1", "--output=size,used,avail"]).arg(path).output().expect("df");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let row: Vec<u64> =
        text.lines().nth(1).map(|l| l.split_whitespace().filter_map(|n| n.parse().ok()).collect()).unwrap_or_default();
    match row[..] {
        [size, used, avail] => (size, used, avail),
        _ => panic!("df said: {text}"),
    }
}

#[test]
fn info_shows_the_room_left_on_the_file_system_under_the_store() {
    let env = Env::new();
    env.ok(&["create", "disk", "--size", "16M"]);
    let info = json(&env.ok(&["info", "--json"]));
    let m = &info["medium"];
    assert_eq!(m["name"], format!("file system of {}", env.store.display()), "{info}");
    assert_eq!(info["medium_error"], Value::Null, "{info}");
    let (size, used, avail) = df_bytes(env.dir.path());
    assert_eq!(m["limit"].as_u64(), Some(size), "{info}");
    // Other tests write beside us: the figures move a little between the two looks.
    let near = |what: &str, df: u64| {
        let vdi = m[what].as_u64().unwrap_or_else(|| panic!("no {what}: {info}"));
        assert!(vdi.abs_diff(df) < 256 << 20, "vdi says {vdi} {what}, df {df}");
    };
    near("available", avail);
    near("used", used);
    let text = env.ok(&["info"]);
    assert!(text.contains(&format!("medium:      file system of {}", env.store.display())), "{text}");
    assert!(text.contains("available"), "{text}");
}
