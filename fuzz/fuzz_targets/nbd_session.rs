//! The input is everything an NBD client sends (handshake, options, requests), fed over a Unix
//! socket pair to `serve_connection` serving a 1 MiB MemDisk; the client's write side is then
//! closed and every reply drained. The server may reject the input but must not panic or hang.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockDevice, MemDisk};
use libfuzzer_sys::fuzz_target;
use nbd::{ExportInfo, ExportProvider, Limits, OpenError};

struct OneDisk(Arc<MemDisk>);

impl ExportProvider for OneDisk {
    fn list(&self) -> Vec<ExportInfo> {
        vec![ExportInfo::new("disk", "a test disk")]
    }
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, OpenError> {
        match name {
            "disk" | "" => Ok(self.0.clone()),
            _ => Err(OpenError::Unknown(format!("no export named {name:?}"))),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (client, server) = UnixStream::pair().expect("socketpair");
    let limits = Limits {
        max_in_flight_per_conn: 8,
        workers_per_conn: 2,
        max_request_bytes: 64 << 10,
        max_buffered_bytes_per_conn: 1 << 20,
        handshake_timeout: Duration::from_millis(500),
        reply_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let t = std::thread::spawn(move || {
        let provider = OneDisk(Arc::new(MemDisk::new(1 << 20)));
        let _ = nbd::serve_connection(server, &provider, &limits);
    });
    // Drain replies on another thread so a large input cannot deadlock against unread replies.
    let mut reader = client.try_clone().expect("clone");
    reader.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    let mut w = client;
    let _ = w.write_all(data);
    let _ = w.shutdown(Shutdown::Write);
    t.join().expect("server thread panicked");
    let _ = w.shutdown(Shutdown::Both);
    drain.join().expect("drain thread");
});
