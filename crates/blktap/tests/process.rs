//! The backend serving a simulated frontend running in another process, sharing the ring and
//! grant pages through a file and notifying over a Unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use blktap::abi::{Abi, PAGE_SIZE};
use blktap::engine::Engine;
use blktap::grant::SimGrantTable;
use blktap::ring::BackRing;
use blktap::shm::SharedMem;
use blockdev::MemDisk;

#[test]
fn serves_a_frontend_in_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let file_path = dir.path().join("shared");
    let sock_path = dir.path().join("sock");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&file_path).unwrap();
    f.set_len(9 * PAGE_SIZE as u64).unwrap();
    let listener = UnixListener::bind(&sock_path).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_blktap-sim-frontend"))
        .arg(&file_path)
        .arg(&sock_path)
        .arg("40")
        .spawn()
        .unwrap();

    let (mut sock, _) = listener.accept().unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let ring = Arc::new(SharedMem::from_file(&f, 0, PAGE_SIZE).unwrap());
    let pages = Arc::new(SharedMem::from_file(&f, PAGE_SIZE as u64, 8 * PAGE_SIZE).unwrap());
    // The frontend initialised the ring before connecting.
    let mut back = BackRing::new(ring, Abi::X86_64).unwrap();
    let engine = Engine::new(MemDisk::new(1 << 20), SimGrantTable::new(pages).unwrap());
    let mut handled = 0;
    loop {
        let mut b = [0u8; 1];
        match sock.read(&mut b) {
            Ok(0) => break,
            Ok(_) => {}
            // The frontend exited with our last notification unread: a Unix socket reports
            // that as a reset. Whether it finished is checked below (its status, the count).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("frontend stalled: lost notification? {e}"),
        }
        loop {
            let s = engine.serve(&mut back).unwrap();
            handled += s.handled;
            if s.notify {
                // The frontend may already have exited after its last response.
                let _ = sock.write_all(&[1]);
            }
            if !s.more {
                break;
            }
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "frontend failed: {status}");
    assert_eq!(handled, 40 * 8);
}
