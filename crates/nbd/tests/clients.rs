//! Interoperability with real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh, fio.
//!
//! Each test serves MemDisks through `nbd::Server` and checks what the client did both through
//! the client's own output and by looking at the disk directly.

mod common;

use std::fs;

use blockdev::BlockDevice;
use common::{Exports, TestServer, contents, have, run, run_ok};

const MIB: u64 = 1 << 20;

/// A deterministic, non-repeating-looking byte pattern.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8 ^ seed).collect()
}

#[test]
fn qemu_io_reads_and_writes() {
    if !have("qemu-io") {
        return;
    }
    let srv = TestServer::tcp(Exports::new().disk("disk", 8 * MIB));
    let uri = srv.uri("disk");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 1000 3000",
            "-c",
            "read -P 0xcd 1000 3000",
            "-c",
            "read -P 0xab 0 1000",
            "-c",
            "read -P 0xab 4000 4096",
            "-c",
            "write -z 2M 64k",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "write -P 0x11 3M 512",
            "-c",
            "discard 3M 4096",
            "-c",
            "flush",
        ],
    );
    assert!(!out.contains("failed"), "qemu-io reported a failure:\n{out}");
    let disk = contents(&srv.disk("disk"));
    assert!(disk[..1000].iter().all(|&b| b == 0xab));
    assert!(disk[1000..4000].iter().all(|&b| b == 0xcd));
    assert!(disk[4000..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(disk[MIB as usize..].iter().all(|&b| b == 0));

    // A wrong pattern must be noticed: proves the reads above really compared data.
    let bad = run("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x55 0 4k"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"));
    srv.stop();
}

#[test]
fn qemu_io_cannot_write_read_only_export() {
    if !have("qemu-io") {
        return;
    }
    let srv = TestServer::tcp(Exports::new().read_only("ro", 4 * MIB));
    let uri = srv.uri("ro");
    run_ok("qemu-io", &["-r", "-f", "raw", &uri, "-c", "read -P 0 0 1M"]);
    let out = run("qemu-io", &["-f", "raw", &uri, "-c", "write -P 1 0 4k"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
    assert!(!out.status.success(), "{text}");
    assert!(!text.contains("wrote 4096/4096"), "write to a read-only export succeeded:\n{text}");
    assert!(contents(&srv.disk("ro")).iter().all(|&b| b == 0));
    srv.stop();
}

#[test]
fn qemu_img_convert_round_trip() {
    if !have("qemu-img") {
        return;
    }
    let size = 8 * MIB;
    let srv = TestServer::tcp(Exports::new().disk("disk", size));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    // Data at a few places, holes elsewhere, one unaligned run.
    let mut image = vec![0u8; size as usize];
    image[..MIB as usize].copy_from_slice(&pattern(MIB as usize, 1));
    image[5 * MIB as usize + 777..5 * MIB as usize + 10_000].copy_from_slice(&pattern(10_000 - 777, 2));
    image[(size - 4096) as usize..].copy_from_slice(&pattern(4096, 3));
    fs::write(&src, &image).unwrap();

    let uri = srv.uri("disk");
    let src_s = src.to_str().unwrap();
    let back_s = back.to_str().unwrap();
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri]);
    assert!(contents(&srv.disk("disk")) == image, "export differs from the source image");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, back_s]);
    assert!(fs::read(&back).unwrap() == image, "image read back differs");
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &uri]);
    srv.stop();
}

#[test]
fn qemu_img_map_shows_holes() {
    if !have("qemu-img") {
        return;
    }
    let srv = TestServer::tcp(Exports::new().disk("disk", 8 * MIB));
    let disk = srv.disk("disk");
    disk.write_at(MIB, &[1u8; 65536], false).unwrap();
    disk.write_at(4 * MIB, &[2u8; 4096], false).unwrap();
    let out = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &srv.uri("disk")]);
    let map: Vec<serde_json::Value> = serde_json::from_str(&out).expect("qemu-img map JSON");
    let mut data = Vec::new();
    let mut covered = 0;
    for e in &map {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert_eq!(start, covered, "map is not contiguous: {out}");
        covered += len;
        if e["data"].as_bool().unwrap() {
            data.push((start, len));
        } else {
            assert_eq!(e["zero"], serde_json::Value::Bool(true), "holes must read as zero: {out}");
        }
    }
    assert_eq!(covered, 8 * MIB);
    assert_eq!(data, vec![(MIB, 65536), (4 * MIB, 4096)], "{out}");
    srv.stop();
}

#[test]
fn nbdinfo_lists_exports_and_details() {
    if !have("nbdinfo") {
        return;
    }
    let srv =
        TestServer::unix(Exports::new().disk("alpha", 4 * MIB).read_only("beta", 2 * MIB).multi_conn("gamma", MIB));
    let out = run_ok("nbdinfo", &["--json", "--list", &srv.server_uri()]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    assert_eq!(v["structured"], serde_json::Value::Bool(true), "{out}");
    let exports = v["exports"].as_array().expect("exports");
    let find =
        |name: &str| exports.iter().find(|e| e["export-name"] == name).unwrap_or_else(|| panic!("{name}: {out}"));
    let alpha = find("alpha");
    assert_eq!(alpha["export-size"], 4 * MIB);
    assert_eq!(alpha["description"], "test disk alpha");
    assert_eq!(alpha["is_read_only"], false);
    assert_eq!(alpha["can_flush"], true);
    assert_eq!(alpha["can_trim"], true);
    assert_eq!(alpha["can_zero"], true);
    assert_eq!(alpha["can_fua"], true);
    assert_eq!(alpha["can_df"], true);
    assert_eq!(alpha["can_multi_conn"], false);
    assert!(alpha["contexts"].as_array().unwrap().iter().any(|c| c == "base:allocation"), "{out}");
    assert_eq!(alpha["block_size_minimum"], 1);
    assert_eq!(alpha["block_size_preferred"], 4096);
    assert_eq!(alpha["block_size_maximum"], 32 * MIB);
    assert_eq!(find("beta")["is_read_only"], true);
    assert_eq!(find("gamma")["can_multi_conn"], true);
    assert_eq!(exports.len(), 3);

    // Asking for an unknown export fails cleanly.
    let bad = run("nbdinfo", &[&srv.uri("nope")]);
    assert!(!bad.status.success());
    // libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
    assert!(String::from_utf8_lossy(&bad.stderr).contains("No such file or directory"), "{bad:?}");
    srv.stop();
}

#[test]
fn nbdinfo_map_reports_allocation() {
    if !have("nbdinfo") {
        return;
    }
    let srv = TestServer::tcp(Exports::new().disk("disk", 4 * MIB));
    let disk = srv.disk("disk");
    disk.write_at(MIB, &[7u8; 8192], false).unwrap();
    let out = run_ok("nbdinfo", &["--map", &srv.uri("disk")]);
    let rows: Vec<(u64, u64, u32)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(rows, vec![(0, MIB, 3), (MIB, 8192, 0), (MIB + 8192, 3 * MIB - 8192, 3)], "{out}");
    srv.stop();
}

#[test]
fn nbdcopy_round_trip() {
    if !have("nbdcopy") {
        return;
    }
    let size = 16 * MIB;
    // One export with multi-conn so nbdcopy opens several connections at once.
    let srv = TestServer::tcp(Exports::new().disk("disk", size).multi_conn("mc", size));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let mut image = vec![0u8; size as usize];
    for (i, chunk) in image.chunks_mut(3 * MIB as usize).enumerate() {
        let n = chunk.len().min(MIB as usize + 123);
        chunk[..n].copy_from_slice(&pattern(n, i as u8));
    }
    fs::write(&src, &image).unwrap();
    for name in ["disk", "mc"] {
        let uri = srv.uri(name);
        let back = dir.path().join(format!("back-{name}.img"));
        run_ok("nbdcopy", &[src.to_str().unwrap(), &uri]);
        assert!(contents(&srv.disk(name)) == image, "{name}: export differs from source");
        run_ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
        assert!(fs::read(&back).unwrap() == image, "{name}: copy back differs");
    }
    srv.stop();
}

const NBDSH_SCRIPT: &str = r#"
import errno, nbd, sys
uri, size = sys.argv[-2], int(sys.argv[-1])
MIB = 1 << 20
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.get_size() == size
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MIB
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_df()
assert not h.is_read_only() and not h.can_multi_conn()

h.pwrite(b"\xab" * 65536, MIB, nbd.CMD_FLAG_FUA)
h.pwrite(b"hello", 3)
assert h.pread(5, 3) == b"hello"
assert h.pread(8, 0) == b"\0\0\0hello"

entries = []
def extents(ctx, off, e, err):
    assert ctx == nbd.CONTEXT_BASE_ALLOCATION
    entries.extend(e)
    return 0
h.block_status(4 * MIB, 0, extents)
assert entries == [4096, 0, MIB - 4096, 3, 65536, 0, 3 * MIB - 65536, 3], entries
entries.clear()
h.block_status(4 * MIB, 0, extents, nbd.CMD_FLAG_REQ_ONE)
assert entries == [4096, 0], entries

chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, len(buf), status))
    return 0
h.pread_structured(2 * MIB, 0, chunk)
chunks.sort()
assert chunks == [(0, 4096, nbd.READ_DATA), (4096, MIB - 4096, nbd.READ_HOLE),
                  (MIB, 65536, nbd.READ_DATA), (MIB + 65536, MIB - 65536, nbd.READ_HOLE)], chunks
chunks.clear()
h.pread_structured(2 * MIB, 0, chunk, nbd.CMD_FLAG_DF)
assert chunks == [(0, 2 * MIB, nbd.READ_DATA)], chunks

# Let out-of-range requests reach the server instead of being caught by libnbd.
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
def expect_errno(code, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        assert "out of bounds" not in e.string, e.string  # the server, not libnbd, refused
        assert e.errno in (code, errno.errorcode[code]), (e.errno, e.string)
        return
    raise AssertionError("no error from %r" % (args,))
expect_errno(errno.EINVAL, h.pread, 4096, size - 1024)
expect_errno(errno.ENOSPC, h.pwrite, b"x" * 4096, size - 1024)
expect_errno(errno.ENOTSUP, h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)

h.zero(65536, MIB)
assert h.pread(65536, MIB) == bytes(65536)
h.zero(5, 3, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
assert h.pread(8, 0) == bytes(8)
h.trim(4096, 0)
h.flush()

# Many requests in flight at once, completed in any order.
cookies = [h.aio_pwrite(bytes([i]) * 4096, 2 * MIB + i * 4096) for i in range(64)]
assert h.aio_in_flight() > 1
while h.aio_in_flight() > 0:
    h.poll(-1)
assert all(h.aio_command_completed(c) for c in cookies)
for i in range(64):
    assert h.pread(4096, 2 * MIB + i * 4096) == bytes([i]) * 4096
h.shutdown()
print("nbdsh checks passed")
"#;

#[test]
fn nbdsh_structured_replies_and_block_status() {
    if !have("nbdsh") {
        return;
    }
    let size = 4 * MIB;
    let srv = TestServer::tcp(Exports::new().disk("disk", size));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("check.py");
    fs::write(&script, NBDSH_SCRIPT).unwrap();
    let uri = srv.uri("disk");
    let size_s = size.to_string();
    let code = format!("sys.argv = ['check', {uri:?}, {size_s:?}]; exec(open({:?}).read())", script.to_str().unwrap());
    let out = run_ok("nbdsh", &["-n", "-c", "import sys", "-c", &code]);
    assert!(out.contains("nbdsh checks passed"), "{out}");
    let disk = srv.disk("disk");
    let mut buf = vec![0u8; 4096];
    disk.read_at(2 * MIB + 63 * 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 63));
    srv.stop();
}

#[test]
fn nbdsh_script_failure_is_detected() {
    // Guards the test above: a failing assertion in the script must fail the run.
    if !have("nbdsh") {
        return;
    }
    let out = run("nbdsh", &["-n", "-c", "assert False, 'expected failure'"]);
    assert!(!out.status.success());
}

#[test]
fn fio_random_write_verify() {
    if !have("fio") {
        return;
    }
    let srv = TestServer::tcp(Exports::new().disk("disk", 64 * MIB));
    let uri = format!("--uri={}", srv.uri("disk"));
    let out = run_ok(
        "fio",
        &[
            "--name=nbd-verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--size=64M",
            "--output-format=json",
        ],
    );
    let json_start = out.find('{').expect("fio JSON");
    let v: serde_json::Value = serde_json::from_str(&out[json_start..]).expect("fio JSON");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert_eq!(job["write"]["io_bytes"], 64 * MIB, "{out}");
    // The verify phase read everything back.
    assert_eq!(job["read"]["io_bytes"], 64 * MIB, "{out}");
    assert_eq!(srv.disk("disk").allocated_blocks(), (64 * MIB / 4096) as usize);
    srv.stop();
}

#[test]
fn missing_client_fails_unless_skipping_is_allowed() {
    let r = std::panic::catch_unwind(|| have("parallax-no-such-nbd-client"));
    if std::env::var("PARALLAX_SKIP_MISSING_CLIENTS").as_deref() == Ok("1") {
        assert_eq!(r.ok(), Some(false));
    } else {
        assert!(r.is_err(), "a missing client must fail the test");
    }
}
