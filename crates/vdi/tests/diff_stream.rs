//! Diff streams: a full and an incremental diff replayed on a second store give the same disk,
//! byte for byte; a damaged or truncated stream changes nothing.

mod common;

use std::sync::Arc;

use blockdev::BlockDevice;
use blockstore::MemBackend;
use common::*;
use vdi::{Source, VdiError};

fn read_all(reg: &Arc<vdi::Registry>, src: Source) -> Vec<u8> {
    let dev = reg.open_source(src).unwrap();
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(0, &mut buf).unwrap();
    buf
}

#[test]
fn full_then_incremental_diffs_replay_on_another_store() {
    let a = new_store(Arc::new(MemBackend::new()));
    let vdi = a.create_vdi("golden", Some(SIZE)).unwrap();
    let w = a.open_vdi(vdi, true).unwrap();
    w.write_at(0, &vec![1u8; 3 * 4096], false).unwrap();
    w.write_at(10 * 4096, &vec![2u8; 4096], false).unwrap();
    drop(w);
    let s1 = a.snapshot_named(vdi, "base").unwrap();
    let w = a.open_vdi(vdi, true).unwrap();
    w.write_at(4096, &vec![3u8; 512], false).unwrap();
    w.write_at(20 * 4096, &vec![4u8; 8192], false).unwrap();
    w.discard(10 * 4096, 4096).unwrap();
    drop(w);
    let s2 = a.snapshot_named(vdi, "next").unwrap();

    let mut full = Vec::new();
    let st = a.export_diff(None, Source::Snapshot(s1), &mut full).unwrap();
    assert_eq!((st.data_bytes, st.to_name.as_deref()), (4 * 4096, Some("base")));
    let mut incr = Vec::new();
    let st = a.export_diff(Some(s1), Source::Snapshot(s2), &mut incr).unwrap();
    assert_eq!(st.from_name.as_deref(), Some("base"));
    assert_eq!(st.data_bytes, 3 * 4096, "only the changed blocks: {st:?}");
    assert_eq!(st.zero_bytes, 4096);

    let b = new_store(Arc::new(MemBackend::new()));
    let copy = b.create_vdi("copy", None).unwrap();
    // The incremental diff needs its base first.
    assert!(matches!(b.import_diff(copy, &mut &incr[..]), Err(VdiError::UnknownSnapshotName { .. })));
    b.import_diff(copy, &mut &full[..]).unwrap();
    let base = b.find_snapshot(copy, "base").unwrap();
    assert_eq!(read_all(&b, Source::Snapshot(base)), read_all(&a, Source::Snapshot(s1)));
    b.import_diff(copy, &mut &incr[..]).unwrap();
    let next = b.find_snapshot(copy, "next").unwrap();
    assert_eq!(read_all(&b, Source::Vdi(copy)), read_all(&a, Source::Snapshot(s2)));
    assert_eq!(read_all(&b, Source::Snapshot(next)), read_all(&a, Source::Snapshot(s2)));
    // On the copy, the two snapshots share what did not change.
    assert_eq!(b.diff(Source::Snapshot(base), Source::Snapshot(next)).unwrap().len(), 3);
    assert_clean(&b);
}

#[test]
fn a_damaged_or_truncated_stream_changes_nothing() {
    let a = new_store(Arc::new(MemBackend::new()));
    let vdi = a.create_vdi("a", Some(SIZE)).unwrap();
    a.open_vdi(vdi, true).unwrap().write_at(0, &vec![9u8; SIZE as usize], false).unwrap();
    let s = a.snapshot(vdi).unwrap();
    let mut full = Vec::new();
    a.export_diff(None, Source::Snapshot(s), &mut full).unwrap();

    let b = new_store(Arc::new(MemBackend::new()));
    let target = b.create_vdi("t", Some(SIZE)).unwrap();
    b.open_vdi(target, true).unwrap().write_at(0, &vec![5u8; 4096], false).unwrap();
    let before = read_all(&b, Source::Vdi(target));
    let mut flipped = full.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let err = b.import_diff(target, &mut &flipped[..]).unwrap_err();
    assert!(matches!(err, VdiError::BadDiff(_)), "{err}");
    let err = b.import_diff(target, &mut &full[..full.len() - 3]).unwrap_err();
    assert!(matches!(err, VdiError::BadDiff(_)), "{err}");
    let err = b.import_diff(target, &mut &b"not a diff"[..]).unwrap_err();
    assert!(matches!(err, VdiError::BadDiff(_)), "{err}");
    assert_eq!(read_all(&b, Source::Vdi(target)), before);
    b.reclaim_all(&mut |_, _| {}).unwrap();
    assert_clean(&b);
    b.import_diff(target, &mut &full[..]).unwrap();
    assert_eq!(read_all(&b, Source::Vdi(target)), read_all(&a, Source::Snapshot(s)));
}

/// Rebuilds a stream's end record over `body` (everything before it).
fn seal(body: &[u8]) -> Vec<u8> {
    let mut s = body.to_vec();
    s.push(b'e');
    s.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    s
}

fn header(records: &[u8]) -> Vec<u8> {
    let mut s = vdi::DIFF_MAGIC.to_vec();
    s.extend_from_slice(&vdi::DIFF_VERSION.to_le_bytes());
    s.extend_from_slice(records);
    s
}

fn name_rec(tag: u8, name: &[u8]) -> Vec<u8> {
    let mut r = vec![tag];
    r.extend_from_slice(&(name.len() as u32).to_le_bytes());
    r.extend_from_slice(name);
    r
}

fn range_rec(tag: u8, off: u64, data: &[u8], len: u64) -> Vec<u8> {
    let mut r = vec![tag];
    r.extend_from_slice(&off.to_le_bytes());
    r.extend_from_slice(&len.to_le_bytes());
    r.extend_from_slice(data);
    r
}

#[test]
fn streams_that_would_apply_wrongly_are_refused_before_anything_changes() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let id = reg.create_vdi("t", Some(SIZE)).unwrap();
    reg.open_vdi(id, true).unwrap().write_at(0, &vec![5u8; SIZE as usize], false).unwrap();
    let before = read_all(&reg, Source::Vdi(id));
    let size = [vec![b's'], SIZE.to_le_bytes().to_vec()].concat();
    let block = vec![9u8; 4096];
    let whole = [range_rec(b'w', 0, &block, 4096), range_rec(b'z', 4096, &[], SIZE - 4096)].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // An invalid ending name: refused before the data is written.
        ("invalid snapshot name", seal(&header(&[name_rec(b't', b"x/y"), size.clone(), whole.clone()].concat()))),
        ("invalid snapshot name", seal(&header(&[name_rec(b't', b"42"), size.clone(), whole.clone()].concat()))),
        // No starting snapshot, but only one block described: not a whole disk.
        ("undescribed", seal(&header(&[size.clone(), range_rec(b'w', 0, &block, 4096)].concat()))),
        ("undescribed", seal(&header(&[size.clone(), range_rec(b'w', 8192, &block, 4096)].concat()))),
        // A valid stream followed by more bytes (two streams run together).
        ("follow the end", [seal(&header(&[size.clone(), whole.clone()].concat())), b"more".to_vec()].concat()),
    ];
    for (why, stream) in cases {
        let err = reg.import_diff(id, &mut &stream[..]).unwrap_err();
        assert!(err.to_string().contains(why), "{why}: {err}");
        assert_eq!(read_all(&reg, Source::Vdi(id)), before, "{why}: the VDI changed");
        assert!(reg.snapshots(id).unwrap().is_empty());
    }
    // The same whole-disk stream, well formed, applies.
    reg.import_diff(id, &mut &seal(&header(&[size, whole].concat()))[..]).unwrap();
    assert_eq!(&read_all(&reg, Source::Vdi(id))[..4096], &block[..]);
    reg.reclaim_all(&mut |_, _| {}).unwrap();
    assert_clean(&reg);
}

#[test]
fn an_incremental_diff_needs_a_named_base() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let id = reg.create_vdi("v", Some(SIZE)).unwrap();
    let s1 = reg.snapshot(id).unwrap();
    reg.open_vdi(id, true).unwrap().write_at(4096, &[1u8; 4096], false).unwrap();
    let s2 = reg.snapshot(id).unwrap();
    let err = reg.export_diff(Some(s1), Source::Snapshot(s2), &mut Vec::new()).unwrap_err();
    assert!(matches!(err, VdiError::UnnamedBase(s) if s == s1), "{err}");
}
