//! Review finding 2 at small scale, through the running daemon: on a store made with a tiny
//! journal (`vdi init --journal 256K`: one commit holds ~61 metadata blocks), deleting a VDI
//! whose release touches far more blocks than that succeeds at once; meanwhile fio keeps
//! writing and verifying another VDI and `vdi snap` keeps working; the space comes back in the
//! background, and the store is consistent after a restart.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn vdi_direct(store: &Path, run_dir: &Path, args: &[&str]) -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_parallaxd")).with_file_name("vdi");
    let out = Command::new(bin).arg("--store").arg(store).args(args).env("PARALLAX_RUN_DIR", run_dir).output().unwrap();
    assert!(out.status.success(), "vdi {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn deleting_a_vdi_larger_than_a_commit_through_the_daemon_while_another_writes() {
    need("fio");
    need("nbdsh");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("blockstore.dat");
    vdi_direct(&store, dir.path(), &["init", "--journal", "256K"]);
    vdi_direct(&store, dir.path(), &["create", "big", "--size", "256M"]);
    vdi_direct(&store, dir.path(), &["create", "filler", "--size", "256M"]);
    vdi_direct(&store, dir.path(), &["create", "disk", "--size", "64M"]);
    let d = Daemon::start(dir, store, &[]);
    // 128 MiB written to "big" in 1 MiB pieces alternating with "filler", as VMs' allocations
    // interleave: releasing it touches a reference-count block per 1020 blocks of both, more
    // than one commit of this journal holds (version 1 refused it: "transaction too large").
    let script = format!(
        "import nbd\n\
         a = nbd.NBD(); a.connect_uri('{}')\n\
         b = nbd.NBD(); b.connect_uri('{}')\n\
         for i in range(128):\n    a.pwrite(b'\\x09' * 1048576, i * 1048576)\n    b.pwrite(b'\\x08' * 1048576, i * 1048576)\n\
         a.flush(); b.flush()\n",
        d.uri("big"),
        d.uri("filler")
    );
    run_ok("nbdsh", &["-c", &script]);
    let (code, _, err) = d.vdi(&["snap", "big"]);
    assert_eq!(code, 0, "snap big: {err}");
    let allocated = |d: &Daemon| -> u64 {
        let (code, out, err) = d.vdi(&["info", "--json"]);
        assert_eq!(code, 0, "info: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v["allocated"].as_u64().expect("allocated")
    };
    let before = allocated(&d);
    let uri = format!("--uri={}", d.uri("disk"));
    let mut fio = Command::new("fio")
        .args([
            "--name=bystander",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=32M",
            "--fsync=32",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("fio");
    let started = Instant::now();
    let (code, out, err) = d.vdi(&["delete", "big", "--yes"]);
    assert_eq!(code, 0, "a delete of any size succeeds: {err}");
    assert!(out.contains("freed in the background"), "{out}");
    eprintln!("delete returned in {:?}", started.elapsed());
    let (code, out, _) = d.vdi(&["list"]);
    assert_eq!(code, 0);
    assert!(!out.contains("big"), "the deleted VDI is gone: {out}");
    // Snapshots of the other VDI keep working while the space is reclaimed.
    for _ in 0..5 {
        let (code, _, err) = d.vdi(&["snap", "disk"]);
        assert_eq!(code, 0, "snap disk during reclaim: {err}");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, out, _) = d.vdi(&["info"]);
        if out.contains("reclaiming:  nothing") {
            break;
        }
        assert!(Instant::now() < deadline, "reclaim did not finish: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = allocated(&d);
    eprintln!("allocated {before} -> {after} bytes");
    // 128 MiB of "big" came back, less what fio allocated meanwhile (at most its 32 MiB).
    assert!(after + (88 << 20) <= before, "space came back: {before} -> {after}");
    let status = fio.wait().unwrap();
    assert!(status.success(), "fio verify failed beside the delete");
    let (code, out, err) = d.vdi(&["check"]);
    assert_eq!(code, 0, "check: {out} {err}");
    let (code, dir, store) = d.stop();
    assert_eq!(code, 0);
    assert!(vdi_direct(&store, dir.path(), &["check"]).contains("consistent"));
}
