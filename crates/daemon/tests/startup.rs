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
