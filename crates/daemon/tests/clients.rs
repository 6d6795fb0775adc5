//! parallaxd against real NBD clients nobody here wrote: qemu-io, qemu-img, nbdinfo, nbdcopy,
//! nbdsh and fio.

mod common;

use blockdev::BlockDevice;
use common::*;

#[test]
fn qemu_io_pattern_writes_read_back_by_name_and_by_id() {
    need("qemu-io");
    let (dir, store) = Daemon::prepare(64 * MIB);
    let d = Daemon::start(dir, store, &[]);
    let by_name = d.uri("disk");
    run_ok(
        "qemu-io",
        &["-f", "raw", &by_name, "-c", "write -P 0xab 0 1M", "-c", "write -P 0x17 3583 9000", "-c", "flush"],
    );
    let out =
        run_ok("qemu-io", &["-f", "raw", &d.uri("0"), "-c", "read -P 0xab 0 3583", "-c", "read -P 0x17 3583 9000"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // A wrong pattern must be caught, or the check above proves nothing.
    let out = run("qemu-io", &["-f", "raw", &by_name, "-c", "read -P 0xcd 0 4096"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Pattern verification failed"), "{text}");
    let (code, _dir, store) = d.stop();
    assert_eq!(code, 0, "parallaxd exits 0 on SIGTERM");
    // After the daemon stopped, the data is in the store.
    with_registry(&store, |r| {
        let dev = r.open_vdi(vdi::VdiId(0), false).unwrap();
        let mut buf = vec![0u8; 4096];
        dev.read_at(0, &mut buf).unwrap();
        assert!(buf[..3583].iter().all(|&b| b == 0xab) && buf[3583..].iter().all(|&b| b == 0x17));
    });
}

#[test]
fn qemu_img_convert_both_ways_and_map_shows_holes() {
    need("qemu-img");
    let (dir, store) = Daemon::prepare(32 * MIB);
    let d = Daemon::start(dir, store, &[]);
    let src = d.dir.path().join("src.raw");
    let back = d.dir.path().join("back.raw");
    // An image with data at 0 and 20 MiB, holes elsewhere.
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(32 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0x5a; 65536], 0).unwrap();
    f.write_all_at(&[0xa5; 65536], 20 * MIB).unwrap();
    drop(f);
    let (s, b) = (src.to_str().unwrap(), back.to_str().unwrap());
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", s, &d.uri("disk")]);
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &d.uri("disk"), b]);
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", s, b]);
    let map = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &d.uri("disk")]);
    let data = data_extents(&map);
    assert_eq!(data, vec![(0, 65536), (20 * MIB, 65536)], "{map}");
}

/// qemu 10 asks for extended headers (64-bit lengths, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`) and
/// now gets them: its writes, zeroes, discards, reads and `qemu-img map` all run over them.
#[test]
fn qemu_speaks_extended_headers_with_parallaxd() {
    need("qemu-io");
    need("qemu-img");
    let (dir, store) = Daemon::prepare(64 * MIB);
    let d = Daemon::start_logged(dir, store, &[]);
    let uri = d.uri("disk");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x33 0 2M",
            "-c",
            "write -z 1M 512k",
            "-c",
            "discard 40M 8M",
            "-c",
            "write -P 0x44 48M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x33 0 1M",
            "-c",
            "read -P 0 1M 512k",
            "-c",
            "read -P 0x33 1536k 512k",
            "-c",
            "read -P 0x44 48M 64k",
        ],
    );
    assert!(!out.contains("verification failed"), "{out}");
    let map = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    let data = data_extents(&map);
    assert_eq!(data.first(), Some(&(0, 2 * MIB)), "{map}");
    assert_eq!(data.last(), Some(&(48 * MIB, 65536)), "{map}");
    let log = d.log();
    let sessions: Vec<&str> = log.lines().filter(|l| l.contains("client entered transmission")).collect();
    assert!(!sessions.is_empty(), "{log}");
    assert!(sessions.iter().all(|l| l.contains("extended=true")), "qemu did not get extended headers:\n{log}");
    assert_eq!(d.stop().0, 0);
}

#[test]
fn nbdinfo_lists_vdis_and_snapshots_and_maps_holes() {
    need("nbdinfo");
    let (dir, store) = Daemon::prepare(16 * MIB);
    let sid = with_registry(&store, |r| {
        let dev = r.open_vdi(vdi::VdiId(0), true).unwrap();
        dev.write_at(MIB, &vec![1u8; 8192], false).unwrap();
        drop(dev);
        r.snapshot(vdi::VdiId(0)).unwrap()
    });
    let d = Daemon::start(dir, store, &[]);
    let list = run_ok("nbdinfo", &["--list", "--json", &format!("nbd+unix:///?socket={}", d.socket.display())]);
    let v: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    let names: Vec<&str> =
        v["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert!(names.contains(&"disk"), "{list}");
    assert!(names.contains(&format!("disk@{sid}").as_str()), "{list}");
    let map = run_ok("nbdinfo", &["--map", &d.uri("disk")]);
    let lines: Vec<&str> = map.lines().collect();
    assert_eq!(lines.len(), 3, "{map}");
    assert!(lines[0].contains("hole"), "{map}");
    assert!(lines[1].trim_start().starts_with(&MIB.to_string()) && lines[1].contains("data"), "{map}");
    // The snapshot is served read-only.
    let snap = run("qemu-io", &["-f", "raw", &d.uri(&format!("disk@{sid}")), "-c", "write -P 1 0 4096"]);
    assert!(!snap.status.success() || String::from_utf8_lossy(&snap.stdout).contains("failed"));
    let out =
        run_ok("qemu-io", &["-r", "-f", "raw", &d.uri(&format!("disk@{sid}")), "-c", &format!("read -P 1 {MIB} 8192")]);
    assert!(!out.contains("verification failed"), "{out}");
    // Snapshots never change, so they allow several connections; the writable VDI does not
    // (one writer at a time).
    let info = |export: &str| -> serde_json::Value {
        serde_json::from_str(&run_ok("nbdinfo", &["--json", &d.uri(export)])).expect("JSON")
    };
    assert_eq!(info(&format!("disk@{sid}"))["exports"][0]["can_multi_conn"], true);
    assert_eq!(info("disk")["exports"][0]["can_multi_conn"], false);
}

#[test]
fn nbdcopy_round_trip() {
    need("nbdcopy");
    let (dir, store) = Daemon::prepare(16 * MIB);
    let d = Daemon::start(dir, store, &[]);
    let src = d.dir.path().join("in.raw");
    let out = d.dir.path().join("out.raw");
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i * 7 / 4093) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &d.uri("disk")]);
    run_ok("nbdcopy", &[&d.uri("disk"), out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == data, "round trip differs");
}

#[test]
fn fio_verify_random_writes_at_depth_16() {
    need("fio");
    let (dir, store) = Daemon::prepare(64 * MIB);
    let d = Daemon::start(dir, store, &[]);
    let uri = format!("--uri={}", d.uri("disk"));
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).expect("fio JSON");
    assert_eq!(v["jobs"][0]["error"], 0, "{out}");
    assert_eq!(v["jobs"][0]["read"]["io_bytes"], 32 * MIB, "verify read everything back: {out}");
}

#[test]
fn second_writer_is_refused_with_a_clear_error() {
    need("nbdsh");
    let (dir, store) = Daemon::prepare(16 * MIB);
    let d = Daemon::start(dir, store, &[]);
    let script = format!(
        "h1 = nbd.NBD()\nh1.connect_uri('{u}')\nh2 = nbd.NBD()\ntry:\n    h2.connect_uri('{u}')\n    raise SystemExit('second writer was let in')\nexcept nbd.Error as e:\n    print('refused:', e)\nh1.shutdown()\nh3 = nbd.NBD()\nh3.connect_uri('{u}')\nprint('after release: ok')\n",
        u = d.uri("disk")
    );
    let out = run_ok("nbdsh", &["-n", "-c", &script]);
    assert!(out.contains("refused"), "{out}");
    assert!(out.contains("after release: ok"), "{out}");
}

/// `vdi` while the daemon holds the store: found from the store path alone, run inside
/// the daemon; a snapshot taken while fio writes is consistent and readable.
#[test]
fn vdi_commands_go_through_the_daemon_while_fio_writes() {
    need("fio");
    let (dir, store) = Daemon::prepare(64 * MIB);
    let d = Daemon::start(dir, store, &[]);
    let vdi = |args: &[&str]| d.vdi(args);
    let uri = format!("--uri={}", d.uri("disk"));
    let mut fio = std::process::Command::new("fio")
        .args([
            "--name=w",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=64M",
            "--time_based=1",
            "--runtime=3",
            "--verify=crc32c",
            "--verify_state_save=0",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("fio");
    std::thread::sleep(std::time::Duration::from_millis(800));
    let mut snaps = Vec::new();
    for _ in 0..5 {
        let (code, out, err) = vdi(&["snap", "disk"]);
        assert_eq!(code, 0, "vdi snap through the daemon: {err}");
        snaps.push(out.trim().to_string());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (code, list, err) = vdi(&["snap-list", "disk", "--json"]);
    assert_eq!(code, 0, "{err}");
    for s in &snaps {
        assert!(list.contains(&format!("\"id\": {s}")) || list.contains(&format!("\"id\":{s}")), "{s} in {list}");
    }
    assert!(fio.wait().expect("fio").success(), "fio verify failed while snapshots were taken");
    // Each snapshot is served read-only and reads in full.
    let export = d.dir.path().join("snap.img");
    let (code, _, err) = vdi(&["export", &format!("@{}", snaps[2]), export.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let qemu = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", export.to_str().unwrap(), &d.uri(&format!("disk@{}", snaps[2]))],
    );
    assert!(qemu.contains("identical"), "{qemu}");
    let (code, out, err) = vdi(&["check"]);
    assert_eq!(code, 0, "check through the daemon: {out}{err}");
}

/// Every command run through the daemon leaves one INFO line: who, what, how it ended, how long.
#[test]
fn each_command_through_the_daemon_is_logged_once() {
    let (dir, store) = Daemon::prepare(16 * MIB);
    let d = Daemon::start_logged(dir, store, &[]);
    let (code, out, err) = d.vdi(&["snap", "disk"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = d.vdi(&["info", "no-such-vdi"]);
    assert_eq!(code, 2);
    let log = d.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" vdi command ")).collect();
    assert_eq!(lines.len(), 2, "one line per command:\n{log}");
    let uid = rustix_uid();
    assert!(lines[0].contains("INFO") && lines[0].contains(" snap disk exit=0"), "{}", lines[0]);
    assert!(
        lines[0].contains(&format!("uid={uid}")) && lines[0].contains("pid=") && lines[0].contains("ms="),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains(" info no-such-vdi exit=2"), "{}", lines[1]);
    assert!(out.parse::<u64>().is_ok(), "the snapshot's id: {out}");
}

fn rustix_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn scheduled_snapshots_are_taken_and_retention_keeps_the_newest() {
    need("qemu-io");
    let (dir, store) = Daemon::prepare(16 * MIB);
    let d = Daemon::start(dir, store, &["--snapshot-every", "20ms", "--keep", "5"]);
    for i in 0..10 {
        run_ok("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", &format!("write -P {} {} 4096", i + 1, i * 4096)]);
        std::thread::sleep(std::time::Duration::from_millis(60));
    }
    let (code, _dir, store) = d.stop();
    assert_eq!(code, 0);
    with_registry(&store, |r| {
        let snaps = r.snapshots(vdi::VdiId(0)).unwrap();
        let live: Vec<_> = snaps.iter().filter(|s| !s.deleted).collect();
        assert!(snaps.len() >= 10, "only {} scheduled snapshots in ~1s at 20ms", snaps.len());
        assert!(live.len() <= 5, "retention kept {}", live.len());
        assert!(live.iter().all(|s| s.automatic));
        // The newest survive: ids are the largest taken.
        let max = snaps.iter().map(|s| s.id).max().unwrap();
        assert!(live.iter().any(|s| s.id == max));
        assert!(r.check(false).unwrap().is_clean());
    });
}

#[test]
fn a_damaged_vdi_is_refused_and_the_others_are_served() {
    need("qemu-io");
    need("nbdinfo");
    let (dir, store) = Daemon::prepare(16 * MIB);
    let root = with_registry(&store, |r| {
        let id = r.create_vdi("victim", Some(16 * MIB)).unwrap();
        let dev = r.open_vdi(id, true).unwrap();
        dev.write_at(0, &[7u8; 4096], false).unwrap();
        dev.flush().unwrap();
        drop(dev);
        // Two later commits, so no journal record carries the root (opening replays the two
        // newest records, which would repair the damage below).
        let b = r.create_vdi("bystander", Some(MIB)).unwrap();
        r.rename(b, "onlooker").unwrap();
        r.info(id).unwrap().root
    });
    // Flip a byte in the victim's root node.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&store).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, root * 4096 + 100).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], root * 4096 + 100).unwrap();
    }
    let d = Daemon::start(dir, store, &[]);
    run_ok("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "write -P 3 0 4096", "-c", "read -P 3 0 4096"]);
    let out = run("nbdinfo", &[&d.uri("victim")]);
    assert!(!out.status.success(), "a damaged VDI must not be served");
    let out = run("nbdinfo", &[&d.uri("1")]);
    assert!(!out.status.success(), "not by id either");
    assert_eq!(d.stop().0, 0);
}

/// The (start, length) of each data extent in `qemu-img map --output=json`.
fn data_extents(map: &str) -> Vec<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(map).expect("map JSON");
    v.as_array()
        .expect("a JSON array")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}
