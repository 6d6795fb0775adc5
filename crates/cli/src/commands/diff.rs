//! `vdi diff`: the byte ranges that differ between two snapshots, or a snapshot and a live VDI.

use serde::Serialize;
use vdi::Source;

use super::{Ctx, describe, live_snapshot, resolve_vdi};
use crate::args::DiffArgs;
use crate::error::CmdResult;
use crate::format::{self, Align, Table};

/// One side of a diff in JSON: exactly one of the fields is set.
#[derive(Debug, Serialize)]
pub struct SideJson {
    /// A snapshot id, or null.
    pub snapshot: Option<u64>,
    /// A live VDI's id, or null.
    pub vdi: Option<u32>,
}

/// One changed range.
#[derive(Debug, Serialize)]
pub struct RangeJson {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (a multiple of 4096).
    pub length: u64,
}

/// `diff --json`.
#[derive(Debug, Serialize)]
pub struct DiffJson {
    /// The older side.
    pub from: SideJson,
    /// The newer side.
    pub to: SideJson,
    /// Changed ranges, in order.
    pub ranges: Vec<RangeJson>,
    /// Sum of the ranges' lengths.
    pub changed_bytes: u64,
}

fn side(src: Source) -> SideJson {
    match src {
        Source::Vdi(v) => SideJson { snapshot: None, vdi: Some(v.0) },
        Source::Snapshot(s) => SideJson { snapshot: Some(s.0), vdi: None },
    }
}

/// `vdi diff FROM [TO | --vdi VDI]`.
pub fn diff(ctx: &mut Ctx<'_>, a: &DiffArgs) -> CmdResult {
    let from = live_snapshot(ctx.reg, &a.from)?;
    let to = match (&a.to, &a.vdi) {
        (Some(t), _) => Source::Snapshot(live_snapshot(ctx.reg, t)?),
        (None, Some(v)) => Source::Vdi(resolve_vdi(ctx.reg, v)?),
        (None, None) => Source::Vdi(ctx.reg.snapshot_info(from)?.vdi),
    };
    let from = Source::Snapshot(from);
    let runs = ctx.reg.diff(from, to)?;
    let changed: u64 = runs.iter().map(|r| r.1).sum();
    if a.json {
        let d = DiffJson {
            from: side(from),
            to: side(to),
            ranges: runs.iter().map(|&(offset, length)| RangeJson { offset, length }).collect(),
            changed_bytes: changed,
        };
        ctx.print_json(&d)?;
        return Ok(0);
    }
    let (fw, tw) = (describe(ctx.reg, from), describe(ctx.reg, to));
    if runs.is_empty() {
        ctx.print(&format!("no differences between {fw} and {tw}\n"))?;
        return Ok(0);
    }
    let mut t = Table::new(&[("OFFSET", Align::Right), ("END", Align::Right), ("LENGTH", Align::Right)]);
    for (off, len) in &runs {
        t.row(vec![off.to_string(), (off + len).to_string(), format::size(*len, ctx.exact)]);
    }
    ctx.print(&t.render())?;
    ctx.print(&format!(
        "{} range(s), {} changed between {fw} and {tw}\n",
        runs.len(),
        format::size(changed, ctx.exact)
    ))?;
    Ok(0)
}
