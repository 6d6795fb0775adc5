//! The two handshakes a hostile frontend (or toolstack) controls: the simulated transport's
//! attach/reply lines, and the xenstore keys the Xen backend reads. Nothing may panic, and a
//! line that parses must encode back to a line that parses to the same thing.
#![no_main]

use blktap::sim::{Attach, DiskInfo};
use blktap::xen::MemStore;
use blktap::xen::XenStore;
use blktap::xen::keys::{BackendConfig, RingRequest, parse_params};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        if let Ok(a) = Attach::parse(line) {
            assert_eq!(Attach::parse(&a.encode()).ok(), Some(a));
        }
        if let Ok(d) = DiskInfo::parse_reply(line) {
            assert_eq!(DiskInfo::parse_reply(&d.encode()).ok(), Some(d));
        }
        let _ = parse_params(line);
    }
    // Lines `key=value` become nodes of one frontend and one backend directory.
    let store = MemStore::new();
    let (front, back) = ("/local/domain/7/device/vbd/51712", "/local/domain/0/backend/vbd/7/51712");
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            let k = k.trim_matches('/');
            let _ = store.write(&format!("{front}/{k}"), v);
            let _ = store.write(&format!("{back}/{k}"), v);
        }
    }
    // The backend offered 4 queues: a request that parses names 1..=4 of them, each with a
    // ring of 1..=16 pages.
    if let Ok(r) = RingRequest::read(&store, front, 4) {
        assert!((1..=4).contains(&r.queues.len()));
        for q in &r.queues {
            assert!(!q.ring_refs.is_empty() && q.ring_refs.len() <= 16);
        }
    }
    let _ = BackendConfig::read(&store, back, 7);
});
