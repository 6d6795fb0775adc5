//! `vdi list` and `vdi info`: what is in the store. JSON field names are documented in
//! docs/cli.md and kept stable.

use serde::Serialize;
use vdi::{Registry, Source, VdiId, VdiInfo};

use super::{Ctx, parse_source, used_bytes, used_bytes_of};
use crate::args::InfoArgs;
use crate::error::{CmdResult, Failure};
use crate::format::{self, Align, Table};

/// One VDI in `list --json` and `info --json`.
#[derive(Debug, Serialize)]
pub struct VdiJson {
    /// Id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Virtual size in bytes; null until the first fill of a VDI created without a size.
    pub size: Option<u64>,
    /// Bytes of data mapped (blocks shared with snapshots and clones included).
    pub used: u64,
    /// Snapshots not deleted.
    pub snapshots: usize,
    /// Snapshot the VDI was cloned from, or null.
    pub parent: Option<u64>,
    /// Creation time, RFC 3339 local time.
    pub created: String,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
}

fn vdi_json(reg: &Registry, v: &VdiInfo) -> Result<VdiJson, Failure> {
    Ok(vdi_json_used(v, used_bytes(reg, Source::Vdi(v.id))?))
}

fn vdi_json_used(v: &VdiInfo, used: u64) -> VdiJson {
    VdiJson {
        id: v.id.0,
        name: v.name.clone(),
        size: (v.size != 0).then_some(v.size),
        used,
        snapshots: v.snapshots,
        parent: v.parent.map(|p| p.0),
        created: format::rfc3339(v.created_ns),
        created_ns: v.created_ns,
    }
}

fn size_cell(size: Option<u64>, exact: bool) -> String {
    size.map_or_else(|| "-".to_string(), |s| format::size(s, exact))
}

/// `vdi list`.
pub fn list(ctx: &mut Ctx<'_>, json: bool) -> CmdResult {
    let vdis = ctx.reg.list();
    let used = used_bytes_of(ctx.reg, &vdis.iter().map(|v| Source::Vdi(v.id)).collect::<Vec<_>>())?;
    let rows: Vec<VdiJson> = vdis.iter().zip(used).map(|(v, u)| vdi_json_used(v, u)).collect();
    for (id, why) in ctx.reg.damaged() {
        let _ = writeln!(ctx.err, "vdi: VDI {id} is damaged and not listed: {why}; run `vdi check`");
    }
    if json {
        ctx.print_json(&rows)?;
        return Ok(0);
    }
    if rows.is_empty() {
        ctx.print("no VDIs yet; create one with `vdi create NAME`\n")?;
        return Ok(0);
    }
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("NAME", Align::Left),
        ("SIZE", Align::Right),
        ("USED", Align::Right),
        ("SNAPSHOTS", Align::Right),
        ("PARENT", Align::Right),
        ("CREATED", Align::Left),
    ]);
    for r in &rows {
        t.row(vec![
            r.id.to_string(),
            r.name.clone(),
            size_cell(r.size, ctx.exact),
            format::size(r.used, ctx.exact),
            r.snapshots.to_string(),
            r.parent.map_or_else(|| "-".to_string(), |p| p.to_string()),
            format::local_time(r.created_ns),
        ]);
    }
    ctx.print(&t.render())?;
    Ok(0)
}

/// `info --json` of a VDI.
#[derive(Debug, Serialize)]
struct VdiDetailJson {
    #[serde(flatten)]
    vdi: VdiJson,
    /// Root block of the live tree.
    root: u64,
    /// Ids of its snapshots (not deleted), oldest first.
    snapshot_ids: Vec<u64>,
    /// Ids of VDIs cloned from its snapshots.
    clones: Vec<u32>,
}

/// `info --json` of a snapshot.
#[derive(Debug, Serialize)]
struct SnapshotDetailJson {
    id: u64,
    vdi: u32,
    vdi_name: String,
    time: String,
    time_ns: u64,
    root: u64,
    size: u64,
    used: Option<u64>,
    deleted: bool,
    automatic: bool,
    name: Option<String>,
    protected: bool,
    clones: Vec<u32>,
}

/// `info --json` with no argument: the store.
#[derive(Debug, Serialize)]
struct StoreJson {
    vdis: usize,
    snapshots: usize,
    allocated: u64,
    capacity: u64,
    store_size: u64,
    max_size: Option<u64>,
    pending_free: u64,
    /// Entries in the release queue: deleted trees and blocks not freed yet.
    pending_reclaim: u64,
}

fn clones_of(reg: &Registry, sids: &[u64]) -> Vec<u32> {
    reg.list().iter().filter(|v| v.parent.is_some_and(|p| sids.contains(&p.0))).map(|v| v.id.0).collect()
}

/// `vdi info [VDI|@SNAP]`.
pub fn info(ctx: &mut Ctx<'_>, a: &InfoArgs) -> CmdResult {
    match &a.source {
        None => store_info(ctx, a.json),
        Some(s) => match parse_source_any(ctx.reg, s, a.snapshot)? {
            Source::Vdi(id) => vdi_info(ctx, id, a.json),
            Source::Snapshot(sid) => snapshot_info(ctx, sid, a.json),
        },
    }
}

/// Like [`parse_source`], but a deleted snapshot is still shown.
fn parse_source_any(reg: &Registry, text: &str, snapshot: bool) -> Result<Source, Failure> {
    if snapshot || text.contains('@') {
        Ok(Source::Snapshot(super::snapshot_ref(reg, text)?))
    } else {
        parse_source(reg, text, false)
    }
}

fn vdi_info(ctx: &mut Ctx<'_>, id: VdiId, json: bool) -> CmdResult {
    let v = ctx.reg.info(id)?;
    let snaps: Vec<u64> = ctx.reg.snapshots(id)?.iter().filter(|s| !s.deleted).map(|s| s.id.0).collect();
    let all_snaps: Vec<u64> = ctx.reg.snapshots(id)?.iter().map(|s| s.id.0).collect();
    let detail = VdiDetailJson {
        vdi: vdi_json(ctx.reg, &v)?,
        root: v.root,
        snapshot_ids: snaps,
        clones: clones_of(ctx.reg, &all_snaps),
    };
    if json {
        ctx.print_json(&detail)?;
        return Ok(0);
    }
    let e = ctx.exact;
    let parent = match v.parent {
        None => "none".to_string(),
        Some(p) => match ctx.reg.snapshot_info(p) {
            Ok(s) => format!("snapshot {p} of VDI {}", s.vdi),
            Err(_) => format!("snapshot {p} (its VDI was deleted)"),
        },
    };
    let list = |ids: &[u64]| ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let clones = detail.clones.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let text = format!(
        "VDI {}: {}\n  size:       {}\n  used:       {}\n  created:    {}\n  parent:     {}\n  \
         snapshots:  {}{}\n  clones:     {}\n  root block: {}\n",
        v.id,
        v.name,
        size_cell(detail.vdi.size, e),
        format::size(detail.vdi.used, e),
        format::local_time(v.created_ns),
        parent,
        detail.snapshot_ids.len(),
        if detail.snapshot_ids.is_empty() { String::new() } else { format!(" ({})", list(&detail.snapshot_ids)) },
        if clones.is_empty() { "none".to_string() } else { clones },
        v.root,
    );
    ctx.print(&text)?;
    Ok(0)
}

fn snapshot_info(ctx: &mut Ctx<'_>, sid: vdi::SnapshotId, json: bool) -> CmdResult {
    let s = ctx.reg.snapshot_info(sid)?;
    let vdi_name = ctx.reg.info(s.vdi).map(|v| v.name).unwrap_or_default();
    let used = if s.deleted { None } else { Some(used_bytes(ctx.reg, Source::Snapshot(sid))?) };
    let d = SnapshotDetailJson {
        id: sid.0,
        vdi: s.vdi.0,
        vdi_name,
        time: format::rfc3339(s.time_ns),
        time_ns: s.time_ns,
        root: s.root,
        size: s.size,
        used,
        deleted: s.deleted,
        automatic: s.automatic,
        name: s.name.clone(),
        protected: s.protected,
        clones: clones_of(ctx.reg, &[sid.0]),
    };
    if json {
        ctx.print_json(&d)?;
        return Ok(0);
    }
    let e = ctx.exact;
    let clones = d.clones.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let text = format!(
        "snapshot {}{}{}\n  of VDI:     {} ('{}')\n  taken:      {}{}\n  size:       {}\n  used:       {}\n  \
         clones:     {}\n  root block: {}\n",
        d.id,
        d.name.as_ref().map(|n| format!(" '{n}'")).unwrap_or_default(),
        if d.deleted {
            " (deleted)"
        } else if d.protected {
            " (protected)"
        } else {
            ""
        },
        d.vdi,
        d.vdi_name,
        format::local_time(d.time_ns),
        if d.automatic { " by parallaxd's schedule" } else { "" },
        format::size(d.size, e),
        d.used.map_or_else(|| "-".to_string(), |u| format::size(u, e)),
        if clones.is_empty() { "none".to_string() } else { clones },
        d.root,
    );
    ctx.print(&text)?;
    Ok(0)
}

fn store_info(ctx: &mut Ctx<'_>, json: bool) -> CmdResult {
    let space = ctx.reg.store().lock().space();
    let bs = blockstore::BLOCK_SIZE as u64;
    let d = StoreJson {
        vdis: ctx.reg.list().len(),
        snapshots: ctx.reg.all_snapshots().iter().filter(|s| !s.deleted).count(),
        allocated: space.allocated * bs,
        capacity: space.capacity * bs,
        store_size: space.store_blocks * bs,
        max_size: (space.max_blocks != 0).then_some(space.max_blocks * bs),
        pending_free: space.pending_free * bs,
        pending_reclaim: ctx.reg.pending_reclaim(),
    };
    if json {
        ctx.print_json(&d)?;
        return Ok(0);
    }
    let e = ctx.exact;
    let text = format!(
        "store\n  VDIs:        {}\n  snapshots:   {}\n  allocated:   {}\n  store size:  {}\n  size limit:  {}\n  reclaiming:  {}\n",
        d.vdis,
        d.snapshots,
        format::size(d.allocated, e),
        format::size(d.store_size, e),
        d.max_size.map_or_else(|| "none".to_string(), |m| format::size(m, e)),
        if d.pending_reclaim == 0 {
            "nothing".to_string()
        } else {
            format!("{} deleted trees and blocks still being freed", d.pending_reclaim)
        },
    );
    ctx.print(&text)?;
    Ok(0)
}
