//! Where data is and what it costs: `vdi map` and `vdi du`.

use serde::Serialize;
use vdi::Source;

use super::{Ctx, describe, parse_source, resolve_vdi};
use crate::args::{DuArgs, MapArgs};
use crate::error::{CmdResult, Failure};
use crate::format::{self, Align, Table};

/// One extent in `vdi map --json`, in `qemu-img map --output=json`'s shape.
#[derive(Debug, Serialize)]
pub struct MapExtent {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Stored in the VDI's (or snapshot's) tree, its own or shared.
    pub present: bool,
    /// Reads as zeros (a hole).
    pub zero: bool,
    /// Holds data.
    pub data: bool,
}

/// `vdi map SOURCE [--json]`: extents of data and holes, read from the tree alone.
pub fn map(ctx: &mut Ctx<'_>, a: &MapArgs) -> CmdResult {
    let src = parse_source(ctx.reg, &a.source, false)?;
    let dev = ctx.reg.open_source(src)?;
    let size = dev.size();
    let extents = if size == 0 {
        Vec::new()
    } else {
        dev.extents(0, size).map_err(|e| Failure::system(format!("mapping {}: {e}", describe(ctx.reg, src))))?
    };
    let rows: Vec<MapExtent> = extents
        .iter()
        .map(|x| {
            let data = x.kind == blockdev::ExtentKind::Data;
            MapExtent { start: x.offset, length: x.len, present: data, zero: !data, data }
        })
        .collect();
    if a.json {
        ctx.print_json(&rows)?;
        return Ok(0);
    }
    let mut t =
        Table::new(&[("OFFSET", Align::Right), ("LENGTH", Align::Right), ("END", Align::Right), ("KIND", Align::Left)]);
    for r in &rows {
        t.row(vec![
            format!("0x{:x}", r.start),
            format::size(r.length, ctx.exact),
            format!("0x{:x}", r.start + r.length),
            if r.data { "data" } else { "hole (zeros)" }.to_string(),
        ]);
    }
    ctx.print(&t.render())?;
    Ok(0)
}

/// One row of `vdi du --json`.
#[derive(Debug, Serialize)]
pub struct DuRow {
    /// The VDI.
    pub vdi: u32,
    /// Its name.
    pub name: String,
    /// The snapshot, or null for the VDI as it is now.
    pub snapshot: Option<u64>,
    /// The snapshot's name, if any.
    pub snapshot_name: Option<String>,
    /// Virtual size in bytes.
    pub provisioned: u64,
    /// Bytes of data it maps, shared blocks included.
    pub used: u64,
    /// Bytes of data only it holds: what deleting it would free.
    pub exclusive: u64,
}

/// `vdi du [VDI] [--json]`: provisioned, used and exclusive space of VDIs and their snapshots.
/// Walks every tree it reports on.
pub fn du(ctx: &mut Ctx<'_>, a: &DuArgs) -> CmdResult {
    let vdis = match &a.vdi {
        Some(v) => vec![ctx.reg.info(resolve_vdi(ctx.reg, v)?)?],
        None => ctx.reg.list(),
    };
    let mut srcs = Vec::new();
    let mut rows = Vec::new();
    for v in &vdis {
        for s in ctx.reg.snapshots(v.id)?.into_iter().filter(|s| !s.deleted) {
            srcs.push(Source::Snapshot(s.id));
            rows.push(DuRow {
                vdi: v.id.0,
                name: v.name.clone(),
                snapshot: Some(s.id.0),
                snapshot_name: s.name.clone(),
                provisioned: s.size,
                used: 0,
                exclusive: 0,
            });
        }
        srcs.push(Source::Vdi(v.id));
        rows.push(DuRow {
            vdi: v.id.0,
            name: v.name.clone(),
            snapshot: None,
            snapshot_name: None,
            provisioned: v.size,
            used: 0,
            exclusive: 0,
        });
    }
    let bs = blockstore::BLOCK_SIZE as u64;
    let usage = ctx.reg.usage_of(&srcs)?;
    // One deleted while this ran has no figures: left out.
    let rows: Vec<DuRow> = rows
        .into_iter()
        .zip(usage)
        .filter_map(|(mut r, u)| {
            let u = u?;
            (r.used, r.exclusive) = (u.mapped * bs, u.exclusive * bs);
            Some(r)
        })
        .collect();
    if a.json {
        ctx.print_json(&rows)?;
        return Ok(0);
    }
    let e = ctx.exact;
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("PROVISIONED", Align::Right),
        ("USED", Align::Right),
        ("EXCLUSIVE", Align::Right),
    ]);
    let (mut prov, mut used, mut excl) = (0, 0, 0);
    for r in &rows {
        let label = match (r.snapshot, &r.snapshot_name) {
            (None, _) => r.name.clone(),
            (Some(_), Some(n)) => format!("{}@{n}", r.name),
            (Some(s), None) => format!("{}@{s}", r.name),
        };
        if r.snapshot.is_none() {
            prov += r.provisioned;
        }
        used += r.used;
        excl += r.exclusive;
        t.row(vec![label, format::size(r.provisioned, e), format::size(r.used, e), format::size(r.exclusive, e)]);
    }
    t.row(vec!["<TOTAL>".into(), format::size(prov, e), format::size(used, e), format::size(excl, e)]);
    ctx.print(&t.render())?;
    ctx.print(&format!(
        "USED counts shared blocks once per VDI or snapshot; EXCLUSIVE is what deleting it alone frees. \
         The store has {} allocated (data and metadata).\n",
        format::size(ctx.reg.store().lock().space().allocated * bs, e)
    ))?;
    Ok(0)
}
