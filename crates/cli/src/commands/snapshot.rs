//! `vdi snap`, `vdi snap-list` and `vdi snap-delete`.

use serde::Serialize;
use vdi::Source;

use super::{Ctx, resolve_vdi, snapshot_ref};
use crate::args::SnapListArgs;
use crate::error::CmdResult;
use crate::format::{self, Align, Table};

/// `vdi snap VDI [NAME]`: prints the new snapshot's id.
pub fn snap(ctx: &mut Ctx<'_>, vdi: &str, name: Option<&str>) -> CmdResult {
    let id = resolve_vdi(ctx.reg, vdi)?;
    let sid = match name {
        Some(n) => ctx.reg.snapshot_named(id, n)?,
        None => ctx.reg.snapshot(id)?,
    };
    ctx.print(&format!("{sid}\n"))?;
    Ok(0)
}

/// One snapshot in `snap-list --json`.
#[derive(Debug, Serialize)]
pub struct SnapJson {
    /// Snapshot id.
    pub id: u64,
    /// VDI it was taken of.
    pub vdi: u32,
    /// When it was taken, RFC 3339 local time.
    pub time: String,
    /// When it was taken, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Root block of its tree.
    pub root: u64,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bytes of data it maps (shared blocks included); null once deleted or without `--usage`.
    pub used: Option<u64>,
    /// Bytes of data only it holds (what deleting it frees); null once deleted or without
    /// `--usage`.
    pub exclusive: Option<u64>,
    /// True once deleted.
    pub deleted: bool,
    /// True if parallaxd's schedule took it (retention may delete it); false if taken by hand.
    pub automatic: bool,
    /// Its name, if it has one.
    pub name: Option<String>,
    /// True while protected from deletion.
    pub protected: bool,
}

/// `vdi snap-list VDI`.
pub fn list(ctx: &mut Ctx<'_>, a: &SnapListArgs) -> CmdResult {
    let id = resolve_vdi(ctx.reg, &a.vdi)?;
    let mut rows = Vec::new();
    let snaps: Vec<_> = ctx.reg.snapshots(id)?.into_iter().filter(|s| a.all || !s.deleted).collect();
    // Without --usage the listing is the snapshot log alone: no tree is read.
    let live: Vec<Source> = if a.usage {
        snaps.iter().filter(|s| !s.deleted).map(|s| Source::Snapshot(s.id)).collect()
    } else {
        Vec::new()
    };
    let mut usage_of = ctx.reg.usage_of(&live)?.into_iter();
    let bytes = |blocks: u64| blocks * blockstore::BLOCK_SIZE as u64;
    for s in snaps {
        let usage = if s.deleted || !a.usage { None } else { usage_of.next().flatten() };
        rows.push(SnapJson {
            id: s.id.0,
            vdi: s.vdi.0,
            time: format::rfc3339(s.time_ns),
            time_ns: s.time_ns,
            root: s.root,
            size: s.size,
            used: usage.map(|u| bytes(u.mapped)),
            exclusive: usage.map(|u| bytes(u.exclusive)),
            deleted: s.deleted,
            automatic: s.automatic,
            name: s.name.clone(),
            protected: s.protected,
        });
    }
    if a.json {
        ctx.print_json(&rows)?;
        return Ok(0);
    }
    if rows.is_empty() {
        ctx.print(&format!("VDI {id} has no snapshots; take one with `vdi snap {id}`\n"))?;
        return Ok(0);
    }
    let named = rows.iter().any(|r| r.name.is_some());
    let mut cols = vec![("ID", Align::Right)];
    if named {
        cols.push(("NAME", Align::Left));
    }
    cols.extend([("TIME", Align::Left), ("ROOT", Align::Right), ("SIZE", Align::Right)]);
    if a.usage {
        cols.extend([("USED", Align::Right), ("EXCLUSIVE", Align::Right)]);
    }
    cols.push(("TAKEN", Align::Left));
    if a.all {
        cols.push(("STATE", Align::Left));
    }
    let mut t = Table::new(&cols);
    for r in &rows {
        let mut cells = vec![r.id.to_string()];
        if named {
            cells.push(r.name.clone().unwrap_or_else(|| "-".to_string()));
        }
        cells.extend([format::local_time(r.time_ns), r.root.to_string(), format::size(r.size, ctx.exact)]);
        if a.usage {
            let show = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |u| format::size(u, ctx.exact));
            cells.extend([show(r.used), show(r.exclusive)]);
        }
        let taken = if r.automatic { "scheduled" } else { "by hand" };
        cells.push(if r.protected { format!("{taken}, protected") } else { taken.to_string() });
        if a.all {
            cells.push(if r.deleted { "deleted" } else { "live" }.to_string());
        }
        t.row(cells);
    }
    ctx.print(&t.render())?;
    Ok(0)
}

/// `vdi snap-delete SNAPSHOT`.
pub fn delete(ctx: &mut Ctx<'_>, text: &str) -> CmdResult {
    let sid = snapshot_ref(ctx.reg, text)?;
    ctx.reg.delete_snapshot(sid)?;
    let space = ctx.reclaim_after_delete()?;
    ctx.print(&format!("deleted snapshot {sid}; {space}\n"))?;
    Ok(0)
}
