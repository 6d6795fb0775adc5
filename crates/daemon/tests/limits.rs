//! Resource exhaustion: idle connections, a client that never reads its replies, and a full
//! store. The daemon's memory stays bounded and other clients keep being served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// Opens a transmission-phase connection by hand (fixed newstyle, NBD_OPT_EXPORT_NAME).
fn raw_connect(port: u16, export: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(b"IHAVEOPT").unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap(); // NBD_OPT_EXPORT_NAME
    s.write_all(&(export.len() as u32).to_be_bytes()).unwrap();
    s.write_all(export.as_bytes()).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).expect("export size and flags");
    s
}

fn read_request(handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(28);
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

#[test]
fn hundreds_of_idle_connections_do_not_exhaust_the_daemon() {
    need("qemu-io");
    let (dir, store) = Daemon::prepare(16 * MIB);
    let d = Daemon::start(dir, store, &[]);
    let before = d.rss();
    let mut idle = Vec::new();
    for _ in 0..600 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", d.port)) {
            idle.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = d.rss();
    eprintln!("idle connections: {} accepted or refused, RSS {} -> {} KiB", idle.len(), before >> 10, during >> 10);
    assert!(during < before + 64 * MIB, "600 idle connections took {} MiB", (during - before) >> 20);
    drop(idle);
    std::thread::sleep(Duration::from_millis(500));
    // Served again once they are gone.
    run_ok("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "write -P 9 0 4096", "-c", "read -P 9 0 4096"]);
    assert_eq!(d.stop().0, 0);
}

/// The measurement: 64 sockets that never finished the handshake, or 64 idle clients
/// past it, used to refuse everyone else. Now 200 of each are there while a real client is
/// served.
#[test]
fn idle_clients_do_not_lock_others_out() {
    need("qemu-io");
    let (dir, store) = Daemon::prepare(16 * MIB);
    let d = Daemon::start(dir, store, &[]);
    // 200 sessions past the handshake (read-only snapshot exports allow many), idle.
    let (code, _, err) = d.vdi(&["snap", "disk", "base"]);
    assert_eq!(code, 0, "{err}");
    let sessions: Vec<TcpStream> = (0..200).map(|_| raw_connect(d.port, "disk@base")).collect();
    // 200 sockets that connect and say nothing.
    let silent: Vec<TcpStream> = (0..200).filter_map(|_| TcpStream::connect(("127.0.0.1", d.port)).ok()).collect();
    // Past the handshake grace, a real client gets in and is served.
    std::thread::sleep(Duration::from_millis(1100));
    run_ok("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "write -P 5 0 4096", "-c", "read -P 5 0 4096"]);
    drop((sessions, silent));
    assert_eq!(d.stop().0, 0);
}

/// The measurement, eight times over: eight clients asking for 32 MiB reads and never
/// reading the replies took the daemon to 1.06 GB (each worker held a whole reply). Now a
/// long read pins one 1 MiB piece per worker, all payload comes out of one daemon-wide pool
/// (256 MiB here), and a connection may read at most 16 MiB of writes ahead of its replies:
/// with eight such readers and eight writers doing the same, the daemon stays within the pool
/// and a well-behaved client is served meanwhile.
#[test]
fn eight_clients_not_reading_replies_stay_within_the_daemon_wide_bound() {
    need("qemu-io");
    let (dir, store) = Daemon::prepare(64 * MIB);
    with_registry(&store, |r| {
        for i in 0..8 {
            r.create_vdi(&format!("w{i}"), Some(32 * MIB)).unwrap();
        }
        r.create_vdi("other", Some(16 * MIB)).unwrap()
    });
    let d = Daemon::start(dir, store, &["--max-buffered-mib", "256", "--max-buffered-mib-per-connection", "16"]);
    run_ok("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "write -P 1 0 64M"]);
    let (code, _, err) = d.vdi(&["snap", "disk", "base"]);
    assert_eq!(code, 0, "{err}");
    let before = d.rss();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut s = raw_connect(d.port, "disk@base");
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        for h in 0..64u64 {
            if s.write_all(&read_request(h, 0, 32 << 20)).is_err() {
                break;
            }
        }
        clients.push(s);
    }
    for i in 0..8 {
        let mut s = raw_connect(d.port, &format!("w{i}"));
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        for h in 0..32u64 {
            let mut req = read_request(h, h << 20, 1 << 20);
            req[7] = 1; // NBD_CMD_WRITE
            req.resize(req.len() + (1 << 20), 0x5a);
            if s.write_all(&req).is_err() {
                break;
            }
        }
        clients.push(s);
    }
    std::thread::sleep(Duration::from_secs(2));
    let during = d.rss();
    eprintln!("16 clients not reading replies: RSS {} -> {} MiB", before >> 20, during >> 20);
    assert!(
        during < before + 256 * MIB + 64 * MIB,
        "16 clients not reading their replies grew the daemon by {} MiB (pool: 256 MiB)",
        (during - before) >> 20
    );
    run_ok("qemu-io", &["-f", "raw", &d.uri("other"), "-c", "write -P 2 0 1M", "-c", "read -P 2 0 1M"]);
    drop(clients);
    assert_eq!(d.stop().0, 0);
}

/// A reused buffer that once held 1 MiB is not lent to a 64 KiB request: while one client keeps
/// 1 MiB reads going (making fully touched buffers), 24 clients queue 64 KiB reads and never
/// take a reply. Each connection's reader ends up stuck sending one of them; those bytes are
/// counted as 64 KiB each, and the daemon's memory must grow by about that (+5 MiB measured,
/// threads included), not by a megabyte per stuck read (+18 MiB with the lending the review
/// found).
#[test]
fn short_reads_stuck_in_send_hold_what_they_count() {
    need("qemu-io");
    let (dir, store) = Daemon::prepare(64 * MIB);
    let d = Daemon::start(dir, store, &["--max-buffered-mib", "128"]);
    run_ok("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "write -P 1 0 64M"]);
    let (code, _, err) = d.vdi(&["snap", "disk", "base"]);
    assert_eq!(code, 0, "{err}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (port, stop) = (d.port, stop.clone());
        std::thread::spawn(move || {
            let mut s = raw_connect(port, "disk");
            let mut reply = vec![0u8; 16 + (1 << 20)];
            let mut h = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<u8> = (0..4).flat_map(|i| read_request(h + i, ((h + i) % 64) << 20, 1 << 20)).collect();
                s.write_all(&batch).unwrap();
                for _ in 0..4 {
                    s.read_exact(&mut reply).unwrap();
                }
                h += 4;
            }
            h
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = d.rss();
    let mut stuck = Vec::new();
    for _ in 0..24 {
        let mut s = raw_connect(d.port, "disk@base");
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        // 64 MiB of replies: far more than the socket buffers take, so reads stay stuck in send.
        let reads: Vec<u8> = (0..1024u64).flat_map(|h| read_request(h, h << 16, 64 << 10)).collect();
        let _ = s.write_all(&reads);
        stuck.push(s);
    }
    std::thread::sleep(Duration::from_secs(2));
    let during = d.rss();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let churned = churn.join().unwrap();
    eprintln!(
        "24 clients stuck on 64 KiB reads beside {churned} reads of 1 MiB: RSS {} -> {} MiB",
        before >> 20,
        during >> 20
    );
    assert!(
        during < before + 12 * MIB,
        "24 clients stuck on 64 KiB reads grew the daemon by {} MiB (their stuck reads count 1.5 MiB)",
        (during - before) >> 20
    );
    drop(stuck);
    assert_eq!(d.stop().0, 0);
}

/// 500 clients connected at once, each served: every one reads its own part of a snapshot
/// while all the others are connected, and gets the right bytes.
#[test]
fn five_hundred_clients_are_served_at_once() {
    need("qemu-io");
    let (dir, store) = Daemon::prepare(64 * MIB);
    let d = Daemon::start(dir, store, &[]);
    run_ok("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "write -P 0x61 0 32M", "-c", "write -P 0x62 32M 32M"]);
    let (code, _, err) = d.vdi(&["snap", "disk", "base"]);
    assert_eq!(code, 0, "{err}");
    let mut clients: Vec<TcpStream> = (0..500).map(|_| raw_connect(d.port, "disk@base")).collect();
    for (i, s) in clients.iter_mut().enumerate() {
        s.write_all(&read_request(i as u64, i as u64 * 128 * 1024, 4096)).unwrap();
    }
    for (i, s) in clients.iter_mut().enumerate() {
        let mut reply = vec![0u8; 16 + 4096];
        s.read_exact(&mut reply).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "client {i}: error");
        assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), i as u64);
        let want = if i * 128 * 1024 < 32 << 20 { 0x61 } else { 0x62 };
        assert!(reply[16..].iter().all(|&b| b == want), "client {i} read the wrong bytes");
    }
    drop(clients);
    assert_eq!(d.stop().0, 0);
}

/// A request header (compact, no flags).
fn request(typ: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = read_request(handle, offset, len);
    r[6..8].copy_from_slice(&typ.to_be_bytes());
    r
}

/// Reads one simple reply; returns its handle, error and `len_of(handle)` bytes of data.
fn simple_reply(s: &mut TcpStream, len_of: impl Fn(u64) -> usize) -> (u64, u32, Vec<u8>) {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).expect("reply header");
    assert_eq!(head[..4], 0x6744_6698u32.to_be_bytes(), "simple reply magic");
    let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
    let handle = u64::from_be_bytes(head[8..16].try_into().unwrap());
    let mut data = vec![0u8; if error == 0 { len_of(handle) } else { 0 }];
    s.read_exact(&mut data).expect("reply data");
    (handle, error, data)
}

/// Large buffers are reused across requests, connections and exports (the daemon keeps a few
/// given back instead of allocating and zeroing one per request), so a reused buffer holds
/// another VDI's bytes until it is filled. Reads of a never-written VDI — 1 MiB on workers, 64
/// KiB on the connection's reader, 2 MiB a piece at a time, one message of several at once —
/// right after 1 MiB writes and reads of another VDI's data must still be all zeros: every path
/// fills what it sends.
#[test]
fn reused_buffers_never_carry_another_vdis_data() {
    const K: u32 = 1024;
    let (dir, store) = Daemon::prepare(16 * MIB);
    with_registry(&store, |r| r.create_vdi("empty", Some(32 * MIB)).unwrap());
    let d = Daemon::start(dir, store, &[]);
    let mut full = raw_connect(d.port, "disk");
    let mut empty = raw_connect(d.port, "empty");
    let pattern = vec![0x5au8; MIB as usize];
    // Up to 1 MiB a worker answers from the bytes at hand; longer reads go the blocking way, a
    // 1 MiB piece at a time (`send_read`).
    let lens = [1024 * K, 64 * K, 64 * K, 128 * K, 64 * K, 1024 * K, 1028 * K, 2048 * K, 4 * K, 64 * K];
    for round in 0..16u64 {
        let at = round * MIB;
        full.write_all(&[request(1, 0, at, MIB as u32), pattern.clone()].concat()).unwrap();
        assert_eq!(simple_reply(&mut full, |_| 0).1, 0, "write");
        full.write_all(&request(0, 1, at, MIB as u32)).unwrap();
        let (_, error, data) = simple_reply(&mut full, |_| MIB as usize);
        assert!(error == 0 && data == pattern, "the written MiB reads back");
        // In one message: the reader serves a short READ itself when it holds the next one.
        let reads: Vec<u8> = lens.iter().enumerate().flat_map(|(h, &len)| request(0, h as u64, at, len)).collect();
        empty.write_all(&reads).unwrap();
        for _ in lens {
            let (handle, error, data) = simple_reply(&mut empty, |h| lens[h as usize] as usize);
            assert_eq!(error, 0);
            let leaked = data.iter().filter(|&&b| b != 0).count();
            assert_eq!(leaked, 0, "round {round}: read {handle} of an unwritten VDI carried {leaked} non-zero bytes");
        }
    }
    drop((full, empty));
    assert_eq!(d.stop().0, 0);
}

#[test]
fn a_client_that_never_reads_replies_is_bounded() {
    need("qemu-io");
    let (dir, store) = Daemon::prepare(64 * MIB);
    with_registry(&store, |r| r.create_vdi("other", Some(16 * MIB)).unwrap());
    let d = Daemon::start(dir, store, &[]);
    run_ok("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "write -P 1 0 64M"]);
    let before = d.rss();
    let mut slow = raw_connect(d.port, "0");
    slow.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // 200 reads of 32 MiB (6.4 GiB of replies) that are never read.
    let mut sent = 0;
    for h in 0..200u64 {
        if slow.write_all(&read_request(h, 0, 32 << 20)).is_err() {
            break; // the server stopped reading requests: back-pressure works too
        }
        sent += 1;
    }
    std::thread::sleep(Duration::from_secs(2));
    let during = d.rss();
    eprintln!("slow reader: {sent} reads of 32 MiB unread, RSS {} -> {} KiB", before >> 10, during >> 10);
    assert!(sent > 0);
    assert!(
        during < before + 400 * MIB,
        "a client not reading {sent} replies of 32 MiB grew the daemon by {} MiB",
        (during - before) >> 20
    );
    // Other clients are still served meanwhile.
    run_ok("qemu-io", &["-f", "raw", &d.uri("other"), "-c", "write -P 2 0 1M", "-c", "read -P 2 0 1M"]);
    drop(slow);
    assert_eq!(d.stop().0, 0);
}

#[test]
fn a_full_store_answers_enospc_and_stays_consistent() {
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("blockstore.dat");
    {
        let opts = blockstore::OpenOptions::default();
        let create = blockstore::CreateOptions { journal_slot_blocks: 256, max_blocks: 8192 }; // 32 MiB
        let s = blockstore::BlockStore::open_path(&store, &opts, Some(&create)).unwrap();
        let reg = vdi::Registry::open(std::sync::Arc::new(s)).unwrap();
        reg.create_vdi("disk", Some(256 * MIB)).unwrap();
    }
    let d = Daemon::start(dir, store, &[]);
    let out = run("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "write -P 5 0 64M"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("No space left on device"), "{text}");
    // What fitted is there; the daemon keeps serving and flushing.
    run_ok("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "read -P 5 0 1M", "-c", "flush"]);
    let (code, _dir, store) = d.stop();
    assert_eq!(code, 0);
    with_registry(&store, |r| assert!(r.check(false).unwrap().is_clean()));
}

/// A client that drops its connection with a write in flight and reconnects at once must get
/// its VDI back, not "already open for writing": the daemon may still be answering the old
/// connection's last request, and the new one waits for it to let go. 2,000 times.
#[test]
fn a_fast_reconnect_after_an_abrupt_close_gets_the_vdi() {
    let (dir, store) = Daemon::prepare(16 * MIB);
    let d = Daemon::start(dir, store, &[]);
    let mut write = Vec::with_capacity(28 + 4096);
    write.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    write.extend_from_slice(&0u16.to_be_bytes());
    write.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
    write.extend_from_slice(&7u64.to_be_bytes());
    write.extend_from_slice(&0u64.to_be_bytes());
    write.extend_from_slice(&4096u32.to_be_bytes());
    write.extend_from_slice(&[0x5a; 4096]);
    for _ in 0..2000 {
        // raw_connect fails (the daemon closes) if the export is refused.
        let mut s = raw_connect(d.port, "disk");
        s.write_all(&write).unwrap();
        drop(s);
    }
    let mut s = raw_connect(d.port, "disk");
    s.write_all(&read_request(1, 0, 4096)).unwrap();
    let mut reply = vec![0u8; 16 + 4096];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "read failed");
    assert!(reply[16..].iter().all(|&b| b == 0x5a), "the writes landed");
}
