//! Shared test harness: a store on a crashable in-memory backend, and a model of what every VDI
//! and snapshot should hold.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use blockdev::BlockDevice;
use blockstore::{Backend, BlockStore, CreateOptions, OpenOptions};
use vdi::{Registry, SnapshotId, VdiId};

/// Sectors in every test VDI (64 blocks of 4 KiB).
pub const SECTORS: usize = 64 * 8;
pub const SIZE: u64 = (SECTORS * 512) as u64;

pub fn create_options() -> CreateOptions {
    CreateOptions { journal_slot_blocks: 4096, max_blocks: 0 }
}

pub fn open_options() -> OpenOptions {
    OpenOptions { cache_blocks: 256, ..OpenOptions::default() }
}

pub fn new_store(backend: Arc<dyn Backend>) -> Arc<Registry> {
    let store = BlockStore::create(backend, &create_options(), &open_options()).expect("create");
    Registry::open(Arc::new(store)).expect("registry")
}

pub fn reopen(backend: Arc<dyn Backend>) -> Arc<Registry> {
    let store = BlockStore::open(backend, &open_options()).expect("reopen after crash");
    Registry::open(Arc::new(store)).expect("registry after crash")
}

/// Each sector of a test VDI holds one repeated byte; the model keeps that byte.
#[derive(Clone, Default, Debug, PartialEq)]
pub struct Model {
    pub vdis: BTreeMap<VdiId, Vec<u8>>,
    pub snaps: BTreeMap<SnapshotId, Vec<u8>>,
}

pub fn read_sectors(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    dev.read_at(0, &mut buf).expect("read");
    buf.chunks(512)
        .enumerate()
        .map(|(i, s)| {
            assert!(s.iter().all(|&b| b == s[0]), "sector {i} is not uniform: torn inside a sector");
            s[0]
        })
        .collect()
}

/// Checks the store against the model exactly.
pub fn assert_matches(reg: &Arc<Registry>, model: &Model) {
    let ids: Vec<VdiId> = reg.list().iter().map(|v| v.id).collect();
    assert_eq!(ids, model.vdis.keys().copied().collect::<Vec<_>>(), "VDI ids");
    for (id, want) in &model.vdis {
        let got = read_sectors(&reg.open_vdi(*id, false).expect("open"));
        assert_eq!(&got, want, "contents of VDI {id}");
    }
    for (sid, want) in &model.snaps {
        let got = read_sectors(&reg.open_snapshot(*sid).expect("open snapshot"));
        assert_eq!(&got, want, "contents of snapshot {sid}");
    }
}

pub fn assert_clean(reg: &Arc<Registry>) {
    let report = reg.check(false).expect("check runs");
    assert!(report.is_clean(), "check found problems: {:#?}", report.problems);
}
