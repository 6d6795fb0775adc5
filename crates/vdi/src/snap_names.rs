//! Snapshot names: per VDI, a small table of (snapshot id, name) in chained metadata blocks
//! named by the VDI's record. Names are rare and few (a person gives them), so the whole
//! table is rewritten whenever one changes; a snapshot that is deleted loses its name.

use blockstore::{BlockAddr, Meta, MetaRead};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros};

use crate::disk::{SNAP_NAME_MAX, SNAPNAMES_KIND, SNAPNAMES_SLOTS, SnapNameDisk, SnapNamesDisk};
use crate::registry::{State, damaged, write_record};
use crate::{Result, SnapshotId, VdiError, VdiId};

/// Checks that `name` can name a snapshot: 1 to 55 bytes, no control characters, no '@' or
/// '/', and not a number (numbers are snapshot ids).
pub(crate) fn check_snapshot_name(name: &str) -> Result<()> {
    let why = if name.is_empty() || name.len() > SNAP_NAME_MAX {
        "use 1 to 55 bytes"
    } else if let Some(why) = crate::registry::unprintable(name) {
        why
    } else if name.contains('@') || name.contains('/') {
        "'@' and '/' are not allowed: they separate VDIs, snapshots and paths"
    } else if name.parse::<SnapshotId>().is_ok() {
        "a snapshot name cannot be a number: numbers are snapshot ids"
    } else {
        return Ok(());
    };
    Err(VdiError::BadSnapshotName { name: name.to_string(), why })
}

/// A VDI's name table as read from disk.
pub(crate) struct NameTable {
    /// Its blocks, in chain order.
    pub(crate) blocks: Vec<BlockAddr>,
    /// The names, by snapshot.
    pub(crate) names: Vec<(SnapshotId, String)>,
}

/// Reads the name table of VDI `vdi` starting at `head`.
pub(crate) fn load<M: MetaRead + ?Sized>(meta: &mut M, head: BlockAddr, vdi: VdiId) -> Result<NameTable> {
    let mut blocks = Vec::new();
    let mut names = Vec::new();
    let mut next = head;
    while !next.is_none() {
        if blocks.len() > (1 << 20) {
            return Err(damaged(format!("snapshot-name table of VDI {vdi} loops")));
        }
        let t = SnapNamesDisk::ref_from_bytes(meta.read(next, &SNAPNAMES_KIND)?.as_slice())
            .map_err(|_| damaged("snapshot-name layout"))?;
        if t.vdi.get() != vdi.0 as u64 {
            return Err(damaged(format!("snapshot-name block {next} belongs to VDI {}, not {vdi}", t.vdi.get())));
        }
        let count = t.count.get() as usize;
        if count > SNAPNAMES_SLOTS {
            return Err(damaged(format!("snapshot-name block {next} claims {count} names")));
        }
        for e in &t.entries[..count] {
            let len = e.len as usize;
            let name = e
                .name
                .get(..len)
                .filter(|_| len > 0)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| damaged(format!("snapshot-name block {next} holds an invalid name")))?;
            names.push((SnapshotId(e.snapshot.get()), name.to_string()));
        }
        blocks.push(next);
        next = BlockAddr(t.next.get());
    }
    Ok(NameTable { blocks, names })
}

/// Rewrites VDI `vdi`'s name table from the names its live snapshots have in `st`, reusing
/// its blocks, allocating or releasing the difference, and updating its record.
pub(crate) fn rewrite(st: &mut State, meta: &mut Meta, vdi: VdiId) -> Result<()> {
    let names: Vec<(SnapshotId, String)> = st
        .snaps
        .iter()
        .filter(|(_, s)| s.vdi == vdi && !s.deleted)
        .filter_map(|(sid, s)| s.name.clone().map(|n| (*sid, n)))
        .collect();
    let v = st.vdis.get_mut(&vdi).ok_or_else(|| VdiError::UnknownVdi(vdi.to_string()))?;
    let needed = names.len().div_ceil(SNAPNAMES_SLOTS);
    while v.name_blocks.len() > needed {
        let b = v.name_blocks.pop().ok_or_else(|| damaged("name blocks vanished"))?;
        radix::defer_release_block(meta, b)?;
    }
    while v.name_blocks.len() < needed {
        v.name_blocks.push(meta.alloc_meta(&SNAPNAMES_KIND)?);
    }
    for (k, chunk) in names.chunks(SNAPNAMES_SLOTS).enumerate() {
        let next = v.name_blocks.get(k + 1).map_or(0, |b| b.0);
        let t = SnapNamesDisk::mut_from_bytes(meta.write(v.name_blocks[k], &SNAPNAMES_KIND)?.as_mut_slice())
            .map_err(|_| damaged("snapshot-name layout"))?;
        t.next = U64::new(next);
        t.vdi = U64::new(vdi.0 as u64);
        t.count = U32::new(chunk.len() as u32);
        t.pad = U32::new(0);
        t.entries.iter_mut().for_each(|e| e.zero());
        t.reserved = [0; 24];
        for (e, (sid, name)) in t.entries.iter_mut().zip(chunk) {
            *e = SnapNameDisk { snapshot: U64::new(sid.0), len: name.len() as u8, name: [0; SNAP_NAME_MAX] };
            e.name[..name.len()].copy_from_slice(name.as_bytes());
        }
    }
    write_record(meta, vdi, v)
}
