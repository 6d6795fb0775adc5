//! The README's quickstart is a test: its ```sh block runs with `bash -euo pipefail` in a
//! scratch directory, with the built `vdi` on PATH.

mod common;

use std::process::{Command, Stdio};

/// The first ```sh block between the quickstart markers of README.md.
fn quickstart() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md");
    let start = readme.find("<!-- quickstart:start -->").expect("start marker");
    let end = readme.find("<!-- quickstart:end -->").expect("end marker");
    assert!(start < end, "markers out of order");
    let section = &readme[start..end];
    let open = section.find("```sh\n").expect("a ```sh block in the quickstart") + "```sh\n".len();
    let close = section[open..].find("```").expect("closing ```") + open;
    section[open..close].to_string()
}

#[test]
fn readme_quickstart_runs_as_written() {
    let script = quickstart();
    for step in ["vdi create", "vdi fill", "vdi validate", "vdi snap", "vdi snap-list", "--from", "vdi tree", "debugfs"]
    {
        assert!(script.contains(step), "the quickstart lacks `{step}`");
    }
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = common::vdi_bin().parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env("TMPDIR", dir.path())
        .env("PARALLAX_RUN_DIR", dir.path().join("run"))
        .env_remove("PARALLAX_STORE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the quickstart failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    for needle in [
        "My new FC3 VDI",
        "identical",
        "FC3 - Copy 1",
        "└── snapshot 1",
        "export round trip: identical",
        "the store is consistent",
        "range(s)",
    ] {
        assert!(stdout.contains(needle), "quickstart output lacks {needle:?}:\n{stdout}");
    }
}
