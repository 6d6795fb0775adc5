//! Filling VDIs from raw images: only blocks whose contents change are written, so sharing
//! with snapshots and parents survives; pipes work; an import is all or nothing.

mod common;

use std::io::Write;
use std::sync::Arc;

use blockdev::BlockDevice;
use blockstore::MemBackend;
use common::*;
use vdi::Source;

const BS: usize = 4096;

/// An image of `blocks` blocks where block `i` holds byte `f(i)` (0: a zero block).
fn image(blocks: usize, f: impl Fn(usize) -> u8) -> Vec<u8> {
    (0..blocks).flat_map(|i| std::iter::repeat_n(f(i), BS)).collect()
}

fn write_image(data: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(data).unwrap();
    f.flush().unwrap();
    f
}

fn contents(reg: &Arc<vdi::Registry>, id: vdi::VdiId) -> Vec<u8> {
    let dev = reg.open_vdi(id, false).unwrap();
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(0, &mut buf).unwrap();
    buf
}

#[test]
fn a_refill_with_the_same_image_changes_nothing() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let id = reg.create_vdi("a", None).unwrap();
    let img = image(64, |i| if i % 3 == 0 { 0 } else { i as u8 });
    let file = write_image(&img);
    let first = reg.fill(id, file.path(), &mut |_, _| {}).unwrap();
    assert_eq!(first.blocks_written, 42);
    let before = reg.snapshot(id).unwrap();
    let again = reg.fill(id, file.path(), &mut |_, _| {}).unwrap();
    assert_eq!((again.blocks_written, again.blocks_cleared, again.blocks_unchanged), (0, 0, 42));
    assert_eq!(reg.diff(Source::Snapshot(before), Source::Vdi(id)).unwrap(), vec![]);
    assert_eq!(contents(&reg, id), img);
    assert_clean(&reg);
}

#[test]
fn a_clone_filled_with_a_near_copy_of_its_parent_keeps_sharing() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let golden = reg.create_vdi("golden", None).unwrap();
    let base = image(64, |i| i as u8 + 1);
    reg.fill(golden, write_image(&base).path(), &mut |_, _| {}).unwrap();
    let snap = reg.snapshot(golden).unwrap();
    let clone = reg.clone_snapshot("vm", snap).unwrap();
    // The new image changes blocks 5 and 40, and zeroes block 7.
    let mut next = base.clone();
    next[5 * BS..6 * BS].fill(0xee);
    next[40 * BS + 100] ^= 1;
    next[7 * BS..8 * BS].fill(0);
    let stats = reg.fill(clone, write_image(&next).path(), &mut |_, _| {}).unwrap();
    assert_eq!((stats.blocks_written, stats.blocks_cleared, stats.blocks_unchanged), (2, 1, 61));
    let changed = reg.diff(Source::Snapshot(snap), Source::Vdi(clone)).unwrap();
    let bs = BS as u64;
    assert_eq!(changed, vec![(5 * bs, bs), (7 * bs, bs), (40 * bs, bs)]);
    let usage = reg.usage_of(&[Source::Vdi(clone)]).unwrap()[0].unwrap();
    assert_eq!((usage.mapped, usage.exclusive), (63, 2), "the clone owns only what it changed");
    assert_eq!(contents(&reg, clone), next);
    assert_eq!(contents(&reg, golden), base);
    assert_clean(&reg);
}

#[test]
fn a_smaller_image_clears_what_lies_past_its_end() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let id = reg.create_vdi("a", Some(SIZE)).unwrap();
    reg.open_vdi(id, true).unwrap().write_at(0, &vec![9u8; SIZE as usize], false).unwrap();
    let small = image(10, |i| i as u8 + 10);
    let stats = reg.fill(id, write_image(&small).path(), &mut |_, _| {}).unwrap();
    assert_eq!((stats.blocks_written, stats.blocks_cleared), (10, 54));
    let mut want = small.clone();
    want.resize(SIZE as usize, 0);
    assert_eq!(contents(&reg, id), want);
    assert_clean(&reg);
}

#[test]
fn an_image_from_a_pipe_is_read_to_its_end() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let id = reg.create_vdi("a", None).unwrap();
    // Not a multiple of the chunk or of a block: 9 MiB and 1,000 bytes.
    let img: Vec<u8> = (0..(9 << 20) + 1000).map(|i: usize| (i / 4096 % 251) as u8).collect();
    let (reader, mut writer) = std::io::pipe().unwrap();
    let feed = {
        let img = img.clone();
        std::thread::spawn(move || writer.write_all(&img).unwrap())
    };
    let reader = std::fs::File::from(std::os::fd::OwnedFd::from(reader));
    let stats = reg.fill_from(id, &reader, "a pipe", &mut |_, _| {}).unwrap();
    feed.join().unwrap();
    assert_eq!(stats.image_bytes, img.len() as u64);
    let got = contents(&reg, id);
    assert_eq!(got.len(), img.len().div_ceil(512) * 512);
    assert_eq!(&got[..img.len()], &img[..]);
    assert!(got[img.len()..].iter().all(|&b| b == 0));
    assert_clean(&reg);
}

#[test]
fn an_import_that_fails_leaves_the_vdi_and_its_sharing_as_they_were() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let id = reg.create_vdi("a", Some(SIZE)).unwrap();
    let img = image(64, |i| i as u8 + 1);
    reg.fill(id, write_image(&img).path(), &mut |_, _| {}).unwrap();
    let snap = reg.snapshot(id).unwrap();
    // Larger than the VDI: refused after the first part has been written into the import.
    let big = image(100, |i| i as u8 + 7);
    let err = reg.fill(id, write_image(&big).path(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, vdi::VdiError::ImageTooLarge { .. }), "{err}");
    assert_eq!(contents(&reg, id), img);
    assert_eq!(reg.diff(Source::Snapshot(snap), Source::Vdi(id)).unwrap(), vec![]);
    // While an import runs, nothing else may write the VDI.
    let import = reg.begin_import(id).unwrap();
    assert!(matches!(reg.open_vdi(id, true), Err(vdi::VdiError::Busy(_))));
    drop(import);
    reg.open_vdi(id, true).unwrap();
    reg.reclaim_all(&mut |_, _| {}).unwrap();
    assert_clean(&reg);
}

#[test]
fn a_vdi_whose_size_ends_inside_a_block_can_be_filled_again_and_again() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let size = 64 * 4096 + 512;
    let id = reg.create_vdi("odd", Some(size as u64)).unwrap();
    let img: Vec<u8> = (0..size).map(|i| (i / 512 % 251) as u8 + 1).collect();
    let file = write_image(&img);
    reg.fill(id, file.path(), &mut |_, _| {}).unwrap();
    let again = reg.fill(id, file.path(), &mut |_, _| {}).unwrap();
    assert_eq!(again.blocks_written, 0);
    assert_eq!(contents(&reg, id), img);
    // One byte more than the VDI is refused, with the image's real size.
    let mut big = img.clone();
    big.push(1);
    let err = reg.fill(id, write_image(&big).path(), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains(&format!("{} bytes", size + 1)), "{err}");
    assert_clean(&reg);
}

#[test]
fn a_converter_that_writes_a_short_image_leaves_zeros_after_its_exact_end() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let id = reg.create_vdi("a", Some(SIZE)).unwrap();
    reg.open_vdi(id, true).unwrap().write_at(0, &vec![0xaa; SIZE as usize], false).unwrap();
    // The image ends 512 bytes into its fifth block; the converter writes just that much.
    let image = 4 * 4096 + 512;
    let dev = vdi::ImportDevice::new(reg.begin_import(id).unwrap(), image).unwrap();
    dev.write_at(0, &vec![0x11; image as usize], false).unwrap();
    dev.finish().unwrap();
    let got = contents(&reg, id);
    assert!(got[..image as usize].iter().all(|&b| b == 0x11));
    assert!(got[image as usize..].iter().all(|&b| b == 0), "old bytes survive past the image's end");
    assert_clean(&reg);
}
