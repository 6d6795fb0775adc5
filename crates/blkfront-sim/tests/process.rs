//! The backend serving simulated guests that run as separate processes: grant memory in a
//! sealed memfd handed over a Unix socket, notifications over the same socket, many requests
//! in flight served by a worker pool.

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blkfront_sim::workload::{Digest, golden_image};
use blktap::engine::Engine;
use blktap::server::{Ended, RingServer, ServerOptions};
use blktap::sim::{DiskInfo, SimListener, SimPending};
use blockdev::{BlockDevice, MemDisk};

const SECTORS: u64 = 8192; // 4 MiB

fn golden_disk() -> Arc<MemDisk> {
    let disk = Arc::new(MemDisk::new(SECTORS * 512));
    disk.write_at(0, &golden_image(SECTORS), false).unwrap();
    disk
}

fn digest(disk: &MemDisk) -> String {
    let mut buf = vec![0u8; (SECTORS * 512) as usize];
    disk.read_at(0, &mut buf).unwrap();
    let mut d = Digest::new();
    d.update(&buf);
    format!("{:016x}", d.value())
}

/// Serves one guest on `disk` in this process while `frontend_args` run in a child.
fn serve_one(disk: Arc<MemDisk>, workers: usize, frontend_args: &[&str]) -> (Output, Ended, u64) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ring.sock");
    let listener = SimListener::bind(&sock).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_blktap-sim-frontend"))
        .arg("--socket")
        .arg(&sock)
        .args(["--vdi", "golden-clone"])
        .args(frontend_args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stream = listener.accept(Duration::from_secs(20)).unwrap().expect("frontend connected");
    let pending = SimPending::read(stream).unwrap();
    assert_eq!(pending.attach().vdi, "golden-clone");
    let backend = pending.accept(&DiskInfo::new(disk.size(), false)).unwrap();
    let server =
        RingServer::new(backend.ring, Engine::new(disk, backend.grants), backend.events, ServerOptions { workers });
    let stop = shutdown::Shutdown::new().unwrap();
    let ended = server.run(&stop).unwrap();
    let requests = server.stats().requests.load(Ordering::Relaxed);
    (child.wait_with_output().unwrap(), ended, requests)
}

fn check(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "frontend failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn a_guest_process_sees_its_writes_and_the_disk_holds_them() {
    for (abi, order, workers) in [("x86_64", "0", 4), ("x86_32", "2", 1), ("x86_64", "1", 8)] {
        let disk = golden_disk();
        let (out, ended, requests) = serve_one(
            disk.clone(),
            workers,
            &["--guest", "7", "--ops", "1500", "--depth", "24", "--abi", abi, "--ring-order", order],
        );
        let stdout = check(&out);
        assert_eq!(ended, Ended::PeerGone);
        assert!(requests > 1500, "{requests} requests served");
        // The frontend's model of the disk and the disk itself agree byte for byte.
        assert!(stdout.contains(&format!("\"digest\":\"{}\"", digest(&disk))), "{abi}: {stdout}");
        assert!(stdout.contains("\"barriers\":") && !stdout.contains("\"discards\":0,"), "{stdout}");
    }
}

#[test]
fn a_guest_notices_a_backend_that_loses_writes() {
    // The frontend is not a rubber stamp: a disk that is not the golden image is reported.
    let disk = Arc::new(MemDisk::new(SECTORS * 512));
    let (out, _, _) = serve_one(disk, 2, &["--ops", "200"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("should hold golden data") && err.contains("holds zeros"), "{err}");
}

#[test]
fn bench_mode_reports_rates() {
    let (out, _, _) = serve_one(golden_disk(), 4, &["--bench", "randwrite", "--seconds", "0.5", "--depth", "8"]);
    let stdout = check(&out);
    assert!(stdout.contains("\"iops\":") && stdout.contains("\"bench\":\"randwrite\""), "{stdout}");
}

#[test]
fn bad_handshakes_are_refused_and_the_frontend_told_why() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ring.sock");
    let listener = SimListener::bind(&sock).unwrap();
    // A line without a memory descriptor.
    let mut c = UnixStream::connect(&sock).unwrap();
    c.write_all(b"vdi=a ring-ref=0\n").unwrap();
    let s = listener.accept(Duration::from_secs(5)).unwrap().unwrap();
    let e = SimPending::read(s).unwrap_err();
    assert!(e.to_string().contains("descriptors"), "{e}");
    // Garbage.
    let mut c = UnixStream::connect(&sock).unwrap();
    c.write_all(b"hello\n").unwrap();
    let s = listener.accept(Duration::from_secs(5)).unwrap().unwrap();
    assert!(SimPending::read(s).is_err());
    drop(c);
    // A client trickling a byte every 300 ms cannot hold the backend past the 5 s deadline.
    let trickler = UnixStream::connect(&sock).unwrap();
    let s = listener.accept(Duration::from_secs(5)).unwrap().unwrap();
    let feeder = std::thread::spawn(move || {
        let mut t = &trickler;
        while t.write_all(b"v").is_ok() {
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let t = std::time::Instant::now();
    let e = SimPending::read(s).unwrap_err();
    assert!(e.to_string().contains("timed out") && t.elapsed() < Duration::from_secs(8), "{e} after {:?}", t.elapsed());
    feeder.join().unwrap();
    // A client that connects and says nothing times out instead of hanging the backend.
    let _silent = UnixStream::connect(&sock).unwrap();
    let s = listener.accept(Duration::from_secs(5)).unwrap().unwrap();
    let t = std::time::Instant::now();
    assert!(SimPending::read(s).is_err());
    assert!(t.elapsed() < Duration::from_secs(10));
    // An unknown VDI: the frontend is told why.
    let child = Command::new(env!("CARGO_BIN_EXE_blktap-sim-frontend"))
        .arg("--socket")
        .arg(&sock)
        .args(["--vdi", "nope"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let s = listener.accept(Duration::from_secs(20)).unwrap().unwrap();
    SimPending::read(s).unwrap().reject("no VDI named nope");
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VDI named nope"));
}
