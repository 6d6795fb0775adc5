//! The classic workflow, with the real binary, on a real ext4 image made by mkfs.ext4 with
//! files written in by debugfs: create, list, fill, validate, snap, snap-list, clone, write to
//! the clone, diff, export round trips, tree, info, rename, deletes, check.

mod common;

use std::os::unix::fs::MetadataExt;

use common::{Env, ext4_image, ext4_ls, random_file, same_bytes};
use serde_json::Value;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

#[test]
fn classic_workflow_on_a_real_ext4_image() {
    let env = Env::new();
    let data = env.path("data.bin");
    random_file(&data, 3 << 20, 1);
    let notes = env.path("notes.txt");
    std::fs::write(&notes, "Parallax test notes\n".repeat(500)).unwrap();
    let image = env.path("image");
    ext4_image(&image, 64, &[(&data, "data.bin"), (&notes, "notes.txt")]);
    assert!(ext4_ls(&image).contains("data.bin"));

    // create + list: no size until the first fill.
    assert_eq!(env.ok(&["create", "My new FC3 VDI"]).trim(), "0");
    let list = env.ok(&["list"]);
    assert!(list.lines().next().unwrap().starts_with("ID  NAME"), "{list}");
    assert!(list.contains("My new FC3 VDI"), "{list}");

    // fill (via the `import` alias too) prints a summary; the progress bar stays off the pipe.
    let out = env.run(&["fill", "0", "./image"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("wrote") && summary.contains("zero blocks") && summary.contains("holes"), "{summary}");
    assert!(out.stderr.is_empty(), "progress drawn on a pipe: {}", String::from_utf8_lossy(&out.stderr));
    env.ok(&["import", "My new FC3 VDI", "image"]);

    let l = json(&env.ok(&["list", "--json"]));
    assert_eq!(l[0]["id"], 0);
    assert_eq!(l[0]["name"], "My new FC3 VDI");
    assert_eq!(l[0]["size"], 64u64 << 20);
    let used = l[0]["used"].as_u64().unwrap();
    assert!((3 << 20..16 << 20).contains(&used), "used {used}");
    assert_eq!(l[0]["parent"], Value::Null);

    // validate: identical, exit 0.
    let v = env.ok(&["validate", "0", "./image"]);
    assert!(v.starts_with("identical"), "{v}");

    // snap + snap-list.
    assert_eq!(env.ok(&["snap", "0"]).trim(), "1");
    let sl = env.ok(&["snap-list", "0"]);
    assert!(sl.lines().nth(1).unwrap().trim_start().starts_with("1  "), "{sl}");
    let sj = json(&env.ok(&["snap-list", "My new FC3 VDI", "--json"]));
    assert_eq!(sj[0]["id"], 1);
    assert_eq!(sj[0]["vdi"], 0);
    assert_eq!(sj[0]["size"], 64u64 << 20);
    // A plain listing reads only the snapshot log; --usage walks the trees.
    assert_eq!(sj[0]["used"], Value::Null);
    assert_eq!(sj[0]["exclusive"], Value::Null);
    assert!(!sl.contains("USED"), "{sl}");
    let su = json(&env.ok(&["snap-list", "0", "--usage", "--json"]));
    assert_eq!(su[0]["used"], used);
    // Right after the snapshot the VDI shares every block with it: nothing is exclusive.
    assert_eq!(su[0]["exclusive"], 0);
    assert!(env.ok(&["snap-list", "0", "--usage"]).contains("EXCLUSIVE"));
    assert_eq!(sj[0]["deleted"], false);
    assert!(sj[0]["time"].as_str().unwrap().len() >= 19);
    assert!(sj[0]["root"].as_u64().unwrap() > 0);

    // clone, then write to the clone: a second image with one more file, filled into it.
    assert_eq!(env.ok(&["create", "FC3 - Copy 1", "--from", "1"]).trim(), "1");
    let image2 = env.path("image2");
    std::fs::copy(&image, &image2).unwrap();
    let extra = env.path("extra.bin");
    random_file(&extra, 512 << 10, 2);
    common::sh("debugfs", &["-w", "-R", &format!("write {} extra.bin", extra.display()), "image2"], env.dir.path());
    env.ok(&["fill", "FC3 - Copy 1", "image2"]);
    assert!(env.ok(&["validate", "FC3 - Copy 1", "image2"]).starts_with("identical"));
    // The original and the snapshot are untouched; the clone differs from the old image.
    assert!(env.ok(&["validate", "0", "image"]).starts_with("identical"));
    assert!(env.ok(&["validate", "@1", "image"]).starts_with("identical"));
    assert!(env.ok(&["validate", "1", "image", "--snapshot"]).starts_with("identical"));
    assert!(env.ok(&["validate", "My new FC3 VDI@1", "image"]).starts_with("identical"));
    let out = env.run(&["validate", "FC3 - Copy 1", "image"]);
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stdout);
    assert!(msg.starts_with("different") && msg.contains("byte offset"), "{msg}");

    // diff: snapshot vs its own VDI (nothing), vs the clone (the new file and metadata).
    assert!(env.ok(&["diff", "1"]).starts_with("no differences"));
    let d = json(&env.ok(&["diff", "1", "--vdi", "FC3 - Copy 1", "--json"]));
    assert_eq!(d["from"]["snapshot"], 1);
    assert_eq!(d["to"]["vdi"], 1);
    let changed = d["changed_bytes"].as_u64().unwrap();
    assert!(changed >= 512 << 10, "changed {changed}");
    let ranges = d["ranges"].as_array().unwrap();
    assert!(!ranges.is_empty());
    assert_eq!(ranges.iter().map(|r| r["length"].as_u64().unwrap()).sum::<u64>(), changed);
    assert!(env.ok(&["diff", "1", "--vdi", "1"]).contains("range(s)"));

    // export round trips: sparse files, a snapshot, and stdout.
    env.ok(&["export", "0", "out0.img"]);
    assert!(same_bytes(&image, &env.path("out0.img")));
    let m = std::fs::metadata(env.path("out0.img")).unwrap();
    assert!(m.blocks() * 512 < m.len() / 2, "export is not sparse: {} of {}", m.blocks() * 512, m.len());
    env.ok(&["export", "FC3 - Copy 1", "out1.img"]);
    assert!(same_bytes(&image2, &env.path("out1.img")));
    assert!(ext4_ls(&env.path("out1.img")).contains("extra.bin"));
    let piped = env.run(&["export", "@1", "-"]);
    assert!(piped.status.success());
    assert!(piped.stdout == std::fs::read(&image).unwrap(), "export to stdout differs from the image");

    // tree: everything, clone nested under its snapshot.
    let t = env.ok(&["tree"]);
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].starts_with("VDI 0 'My new FC3 VDI'"), "{t}");
    assert!(lines[1].starts_with("└── snapshot 1 "), "{t}");
    assert!(lines[2].starts_with("    └── VDI 1 'FC3 - Copy 1'"), "{t}");
    let dot = env.ok(&["tree", "--format", "dot"]);
    assert!(dot.starts_with("digraph"), "{dot}");
    for needle in
        ["\"vdi0\"", "\"snap1\"", "\"vdi1\"", "\"vdi0\" -> \"snap1\"", "\"snap1\" -> \"vdi1\"", "FC3 - Copy 1"]
    {
        assert!(dot.contains(needle), "{needle} missing: {dot}");
    }

    // info.
    let i = json(&env.ok(&["info", "0", "--json"]));
    assert_eq!(i["snapshot_ids"], serde_json::json!([1]));
    assert_eq!(i["clones"], serde_json::json!([1]));
    assert_eq!(i["name"], "My new FC3 VDI");
    let si = json(&env.ok(&["info", "@1", "--json"]));
    assert_eq!(si["vdi"], 0);
    assert_eq!(si["clones"], serde_json::json!([1]));
    let st = json(&env.ok(&["info", "--json"]));
    assert_eq!(st["vdis"], 2);
    assert!(st["allocated"].as_u64().unwrap() >= used);
    assert!(env.ok(&["info", "1"]).contains("parent:     snapshot 1 of VDI 0"));

    // --bytes shows exact sizes.
    assert!(env.ok(&["list", "--bytes"]).contains(&(64u64 << 20).to_string()));

    // rename, check, snap-delete (the clone keeps working), delete.
    env.ok(&["rename", "1", "FC3 copy"]);
    assert!(env.ok(&["list"]).contains("FC3 copy"));
    assert!(env.ok(&["check"]).contains("the store is consistent"));
    env.ok(&["snap-delete", "1"]);
    assert!(env.ok(&["validate", "FC3 copy", "image2"]).starts_with("identical"));
    let all = json(&env.ok(&["snap-list", "0", "--all", "--json"]));
    assert_eq!(all[0]["deleted"], true);
    assert_eq!(all[0]["used"], Value::Null);
    assert_eq!(json(&env.ok(&["snap-list", "0", "--json"])), serde_json::json!([]));
    assert!(env.ok(&["tree"]).contains("(deleted)"));
    env.ok(&["delete", "FC3 copy"]);
    let l = json(&env.ok(&["list", "--json"]));
    assert_eq!(l.as_array().unwrap().len(), 1);
    assert!(env.ok(&["check", "--json"]).contains("\"clean\": true"));
    assert!(env.ok(&["validate", "0", "image"]).starts_with("identical"));
}

#[test]
fn sized_vdi_and_short_images() {
    let env = Env::new();
    assert_eq!(env.ok(&["create", "scratch", "--size", "8M"]).trim(), "0");
    let l = json(&env.ok(&["list", "--json"]));
    assert_eq!(l[0]["size"], 8u64 << 20);
    // An image shorter than the VDI: the rest reads as zeros and still validates.
    let img = env.path("short.img");
    random_file(&img, 1 << 20, 4);
    env.ok(&["fill", "scratch", "short.img"]);
    let v = env.ok(&["validate", "scratch", "short.img"]);
    assert!(v.starts_with("identical") && v.contains("sizes differ"), "{v}");
    env.ok(&["export", "scratch", "back.img"]);
    assert_eq!(std::fs::metadata(env.path("back.img")).unwrap().len(), 8 << 20);
}

#[test]
fn tree_renders_svg_with_graphviz() {
    // Not skipped when Graphviz is missing: the README's test command installs it.
    assert!(
        std::process::Command::new("dot").arg("-V").output().is_ok(),
        "Graphviz's `dot` is not installed; the README's test command (.ci/run) installs it \
         (apt-get install graphviz)"
    );
    let env = Env::new();
    env.ok(&["create", "golden", "--size", "1M"]);
    env.ok(&["snap", "golden"]);
    env.ok(&["create", "clone", "--from", "1"]);
    env.ok(&["tree", "--format", "svg", "-o", "t.svg"]);
    let svg = std::fs::read_to_string(env.path("t.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("golden") && svg.contains("clone"), "{svg}");
    let png = env.run(&["tree", "--format", "png"]);
    assert!(png.status.success() && png.stdout.starts_with(b"\x89PNG"));
}

#[test]
fn help_and_completions() {
    let env = Env::new();
    let help = env.ok(&["--help"]);
    for cmd in ["create", "fill", "validate", "snap", "snap-list", "tree", "--from", "mkfs.ext4", "debugfs"] {
        assert!(help.contains(cmd), "--help lacks {cmd}");
    }
    for sub in [
        "init",
        "create",
        "list",
        "fill",
        "validate",
        "snap",
        "snap-list",
        "tree",
        "info",
        "rename",
        "delete",
        "snap-delete",
        "export",
        "diff",
        "check",
        "completions",
    ] {
        let h = env.ok(&[sub, "--help"]);
        assert!(h.contains("Example"), "`vdi {sub} --help` has no example");
    }
    let bash = env.ok(&["completions", "bash"]);
    assert!(bash.contains("snap-list") && bash.contains("complete"), "{bash}");
    assert!(env.ok(&["completions", "zsh"]).contains("#compdef vdi"));
    assert!(env.ok(&["completions", "fish"]).contains("complete -c vdi"));
    assert!(!env.store.exists(), "help or completions created a store");
}
