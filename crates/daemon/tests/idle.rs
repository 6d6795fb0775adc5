//! An idle parallaxd sleeps: every thread waits on an event (a socket, a condition variable, a
//! signal), none wakes on a timer to look at a flag. Counted with the kernel's per-thread
//! context-switch counters, so the test does not depend on timing.

mod common;

use std::time::Duration;

use blkfront_sim::guest::{Guest, GuestOp};
use blkfront_sim::{FrontendOptions, SimFrontend};
use blktap::abi::{Abi, RSP_OKAY};
use common::{Daemon, MIB};

/// Voluntary context switches of every thread of `pid` so far.
fn wakeups(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks").flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

#[test]
fn an_idle_daemon_does_not_wake_up() {
    let (dir, store) = Daemon::prepare(16 * MIB);
    let sock = dir.path().join("ring.sock");
    let d = Daemon::start(dir, store, &["--ring-socket", sock.to_str().unwrap()]);
    // An NBD client and a ring guest stay connected, idle.
    let _nbd = std::net::TcpStream::connect(("127.0.0.1", d.port)).expect("NBD connection");
    let opts = FrontendOptions { vdi: "disk".into(), ring_page_order: 0, data_pages: 16, protocol: Abi::X86_64 };
    let mut guest = Guest::new(SimFrontend::connect(&sock, &opts).expect("ring guest"));
    let done = guest
        .run(GuestOp::Write { sector: 0, data: vec![7; 4096], barrier: false }, Duration::from_secs(20))
        .expect("write");
    assert_eq!(done.status, RSP_OKAY);
    // Let start-up settle (the reclaimer's first look, the readiness notification).
    let (code, _, err) = d.vdi(&["list"]);
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_millis(300));
    let before = wakeups(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let after = wakeups(d.pid());
    // A poll every 20-100 ms in any thread would show as dozens of wake-ups here.
    assert!(after - before <= 4, "an idle parallaxd woke up {} times in 2 s", after - before);
    // And it still answers at once, and stops on SIGTERM.
    let (code, _, err) = d.vdi(&["snap", "disk"]);
    assert_eq!(code, 0, "{err}");
    drop(guest);
    let (code, _, _) = d.stop();
    assert_eq!(code, 0);
}
