//! `vdi` commands racing each other and the daemon's I/O: creates, clones, snapshots and
//! deletions in parallel loops through the control socket while fio writes and verifies.
//! The store must stay consistent and fio must read back what it wrote.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn vdi_commands_race_each_other_and_guest_io() {
    need("fio");
    let (dir, store) = Daemon::prepare(64 * MIB);
    let d = Arc::new(Daemon::start(dir, store, &[]));
    let uri = format!("--uri={}", d.uri("disk"));
    let mut fio = Command::new("fio")
        .args([
            "--name=race",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("fio");
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    // Snapshots of the busy VDI, and deletion of older ones.
    {
        let (d, stop, ops) = (d.clone(), stop.clone(), ops.clone());
        threads.push(std::thread::spawn(move || {
            let mut snaps = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let (code, out, err) = d.vdi(&["snap", "disk"]);
                assert_eq!(code, 0, "snap: {err}");
                snaps.push(out);
                if snaps.len() > 3 {
                    let old = snaps.remove(0);
                    let (code, _, err) = d.vdi(&["snap-delete", &old]);
                    assert_eq!(code, 0, "snap-delete {old}: {err}");
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // VDIs created, cloned from the newest snapshot, renamed and deleted.
    for t in 0..2 {
        let (d, stop, ops) = (d.clone(), stop.clone(), ops.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                i += 1;
                let name = format!("t{t}-{i}");
                let (code, _, err) = d.vdi(&["create", &name, "--size", "8M"]);
                assert_eq!(code, 0, "create {name}: {err}");
                let (code, list, err) = d.vdi(&["snap-list", "disk", "--json"]);
                assert_eq!(code, 0, "snap-list: {err}");
                let v: serde_json::Value = serde_json::from_str(&list).expect("JSON");
                if let Some(s) = v.as_array().and_then(|a| a.iter().rev().find(|s| s["deleted"] == false)) {
                    let sid = s["id"].to_string();
                    let clone = format!("c{t}-{i}");
                    // The snapshot may be deleted meanwhile: then a clear error, not damage.
                    let (code, _, err) = d.vdi(&["create", &clone, "--from", &sid]);
                    assert!(code == 0 || err.contains("snapshot"), "clone from {sid}: {code} {err}");
                    if code == 0 {
                        let (code, _, err) = d.vdi(&["delete", &clone, "--yes"]);
                        assert_eq!(code, 0, "delete {clone}: {err}");
                    }
                }
                let (code, _, err) = d.vdi(&["delete", &name, "--yes"]);
                assert_eq!(code, 0, "delete {name}: {err}");
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = fio.try_wait().expect("fio") {
            break s;
        }
        assert!(Instant::now() < deadline, "fio did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, Ordering::Release);
    for t in threads {
        t.join().expect("a racing vdi loop failed");
    }
    assert!(status.success(), "fio verify failed while vdi commands raced");
    assert!(ops.load(Ordering::Relaxed) >= 6, "the loops barely ran");
    let (code, out, err) = d.vdi(&["check"]);
    assert_eq!(code, 0, "check through the daemon: {out}{err}");
    let d = Arc::try_unwrap(d).ok().expect("threads done");
    let (code, _dir, store) = d.stop();
    assert_eq!(code, 0);
    with_registry(&store, |r| {
        let report = r.check(false).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(r.list().len(), 1, "every racing VDI was deleted");
    });
}
