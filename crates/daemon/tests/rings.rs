//! parallaxd serving guests over the blkif ring (`--ring-socket`): a guest frontend in this
//! process, the daemon a real separate process.

mod common;

use std::time::Duration;

use blkfront_sim::guest::{Guest, GuestOp};
use blkfront_sim::{FrontendOptions, SimFrontend};
use blktap::Error;
use blktap::abi::Abi;
use blktap::abi::{RSP_ERROR, RSP_OKAY};
use common::{Daemon, MIB, need, run, with_registry};

const T: Duration = Duration::from_secs(20);

fn ring_daemon() -> Daemon {
    let (dir, store) = Daemon::prepare(16 * MIB);
    let sock = dir.path().join("ring.sock");
    Daemon::start(dir, store, &["--ring-socket", sock.to_str().unwrap()])
}

fn attach(d: &Daemon, vdi: &str) -> Result<Guest, Error> {
    let opts = FrontendOptions { vdi: vdi.into(), ring_page_order: 1, data_pages: 64, protocol: Abi::X86_64 };
    SimFrontend::connect(&d.dir.path().join("ring.sock"), &opts).map(Guest::new)
}

fn ok(g: &mut Guest, op: GuestOp) -> Option<Vec<u8>> {
    let c = g.run(op, T).expect("request answered");
    assert_eq!(c.status, RSP_OKAY, "{:?}", c.op);
    c.data
}

#[test]
fn a_guest_writes_reads_flushes_and_discards_and_its_data_outlives_the_daemon() {
    let d = ring_daemon();
    let mut g = attach(&d, "disk").unwrap();
    assert_eq!(g.sectors(), 16 * MIB / 512);
    assert!(!g.read_only());
    let data: Vec<u8> = (0..12288u32).map(|i| (i % 251) as u8).collect();
    ok(&mut g, GuestOp::Write { sector: 3, data: data.clone(), barrier: false });
    ok(&mut g, GuestOp::Write { sector: 100, data: vec![7u8; 4096], barrier: true });
    assert_eq!(ok(&mut g, GuestOp::Read { sector: 3, sectors: 24 }).unwrap(), data);
    ok(&mut g, GuestOp::Discard { sector: 100, sectors: 8 });
    assert_eq!(ok(&mut g, GuestOp::Read { sector: 100, sectors: 8 }).unwrap(), vec![0u8; 4096]);
    ok(&mut g, GuestOp::Flush);
    // Past the end: an error for that request, and the ring keeps working.
    let c = g.run(GuestOp::Read { sector: g.sectors() - 4, sectors: 8 }, T).unwrap();
    assert_eq!(c.status, RSP_ERROR);
    assert_eq!(ok(&mut g, GuestOp::Read { sector: 3, sectors: 1 }).unwrap(), data[..512]);
    drop(g);
    let (code, _dir, store) = d.stop();
    assert_eq!(code, 0);
    with_registry(&store, |r| {
        let id = r.resolve("disk").unwrap();
        let disk = r.open_vdi(id, false).unwrap();
        let mut buf = vec![0u8; data.len()];
        blockdev::BlockDevice::read_at(&disk, 3 * 512, &mut buf).unwrap();
        assert_eq!(buf, data);
    });
}

#[test]
fn wrong_names_and_second_writers_are_refused_with_the_reason() {
    need("nbdinfo");
    let d = ring_daemon();
    let e = attach(&d, "no-such-vdi").err().expect("refused");
    assert!(matches!(&e, Error::Refused(m) if m.contains("no-such-vdi")), "{e}");
    let _g = attach(&d, "disk").unwrap();
    let e = attach(&d, "disk").err().expect("refused");
    assert!(matches!(&e, Error::Refused(m) if m.contains("already open")), "{e}");
    // One writer across transports: NBD is refused too while the ring holds the VDI.
    let out = run("nbdinfo", &[&d.uri("disk")]);
    assert!(!out.status.success(), "NBD opened a VDI the ring holds");
}

/// Once the NBD port takes a connection, the ring socket and the control socket must answer
/// too (CI once saw the ring socket missing: NBD listened first). `Daemon::start` waits for
/// `READY=1`, which comes later still, so the log's order is what shows the listening order.
#[test]
fn once_nbd_accepts_the_ring_and_control_sockets_answer() {
    for _ in 0..8 {
        let d = ring_daemon();
        let g = attach(&d, "disk").expect("the ring socket is up");
        drop(g);
        let (code, out, err) = d.vdi(&["list"]);
        assert_eq!(code, 0, "the control socket is up: {err}");
        assert!(out.contains("disk"), "{out}");
        // The race's window is a fraction of a millisecond; the order the daemon logs its
        // sockets in (each logged once it accepts) shows the ordering every time.
        let log = d.log();
        let at = |what: &str| log.find(what).unwrap_or_else(|| panic!("no {what:?} in the log:\n{log}"));
        let nbd = at("serving NBD on 127.0.0.1");
        let unix = at("serving NBD on unix socket");
        assert!(at("serving blkif rings") < unix && unix < nbd, "NBD listened before the ring socket:\n{log}");
        assert!(at("serving vdi commands") < unix, "NBD listened before the control socket:\n{log}");
        assert!(nbd < at("parallaxd ready"), "{log}");
    }
}

#[test]
fn a_snapshot_attaches_read_only() {
    let d = ring_daemon();
    let mut g = attach(&d, "disk").unwrap();
    ok(&mut g, GuestOp::Write { sector: 0, data: vec![1u8; 4096], barrier: false });
    drop(g);
    let (code, out, err) = d.vdi(&["snap", "disk"]);
    assert_eq!(code, 0, "{err}");
    let mut s = attach(&d, &format!("disk@{out}")).unwrap();
    assert!(s.read_only());
    assert_eq!(ok(&mut s, GuestOp::Read { sector: 0, sectors: 8 }).unwrap(), vec![1u8; 4096]);
    let c = s.run(GuestOp::Write { sector: 0, data: vec![2u8; 512], barrier: false }, T).unwrap();
    assert_eq!(c.status, RSP_ERROR);
    let c = s.run(GuestOp::Discard { sector: 0, sectors: 8 }, T).unwrap();
    assert_eq!(c.status, RSP_ERROR);
}

#[test]
fn sigterm_with_a_guest_attached_stops_cleanly_and_the_guest_sees_it() {
    let d = ring_daemon();
    let mut g = attach(&d, "disk").unwrap();
    ok(&mut g, GuestOp::Write { sector: 8, data: vec![9u8; 4096], barrier: false });
    let (code, _dir, store) = d.stop();
    assert_eq!(code, 0);
    // The daemon is gone: the next request is never answered and the guest is told.
    g.submit(GuestOp::Read { sector: 0, sectors: 8 }).unwrap();
    assert!(matches!(g.complete(T), Err(Error::PeerGone)));
    with_registry(&store, |r| {
        let disk = r.open_vdi(r.resolve("disk").unwrap(), false).unwrap();
        let mut buf = vec![0u8; 4096];
        blockdev::BlockDevice::read_at(&disk, 8 * 512, &mut buf).unwrap();
        assert_eq!(buf, vec![9u8; 4096], "the write answered before SIGTERM is in the store");
    });
}
