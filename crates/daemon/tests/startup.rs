//! A parallaxd that cannot start says why, once.

use std::process::Command;

#[test]
fn a_port_in_use_fails_the_start_with_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("new-store.dat");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for log in ["info", "off"] {
        let out = Command::new(env!("CARGO_BIN_EXE_parallaxd"))
            .arg("--store")
            .arg(&store)
            .args(["--nbd", &addr])
            .env("PARALLAX_RUN_DIR", dir.path())
            .env("PARALLAX_LOG", log)
            .output()
            .expect("run parallaxd");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert_eq!(err.matches("listening for NBD on").count(), 1, "said once (PARALLAX_LOG={log}):\n{err}");
        assert!(err.contains("Address already in use") || err.contains("in use"), "{err}");
        assert!(!store.exists(), "the failed start left the store it created behind");
    }
    // A store that was there before is left alone.
    std::fs::write(&store, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_parallaxd"))
        .arg("--store")
        .arg(&store)
        .args(["--nbd", &addr])
        .env("PARALLAX_RUN_DIR", dir.path())
        .output()
        .expect("run parallaxd");
    assert!(!out.status.success());
    assert_eq!(std::fs::metadata(&store).unwrap().len(), 0, "an empty file given as the store is left empty");
}

/// A `vdi` that cannot reach the daemon's control socket (another user, another run directory)
/// is told who holds the store, at once, even with --wait (waiting for a daemon never ends).
#[test]
fn a_vdi_that_cannot_reach_the_daemon_is_told_so_and_does_not_wait_forever() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.dat");
    // Killed however the test ends.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut daemon = Running(
        Command::new(env!("CARGO_BIN_EXE_parallaxd"))
            .arg("--store")
            .arg(&store)
            .args(["--nbd", "none"])
            .env("PARALLAX_RUN_DIR", dir.path())
            .env("PARALLAX_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Ready when it says so (its log, read as it comes; a daemon that dies ends the reading).
    let log = std::io::BufReader::new(daemon.0.stderr.take().unwrap());
    let mut lines = std::io::BufRead::lines(log);
    assert!(
        lines.by_ref().map_while(Result::ok).any(|l| l.contains("parallaxd ready")),
        "parallaxd ended without becoming ready"
    );
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let vdi = std::path::Path::new(env!("CARGO_BIN_EXE_parallaxd")).with_file_name("vdi");
    let elsewhere = dir.path().join("elsewhere");
    let t = std::time::Instant::now();
    // Under timeout(1): a vdi that waits forever fails the test (exit 124) instead of hanging it.
    let out = Command::new("timeout")
        .arg("10")
        .arg(&vdi)
        .arg("--store")
        .arg(&store)
        .args(["--wait", "list"])
        .env("PARALLAX_RUN_DIR", &elsewhere)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("parallaxd (pid {}", daemon.0.id())) && err.contains("control socket"), "{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(10), "it waited");
}
