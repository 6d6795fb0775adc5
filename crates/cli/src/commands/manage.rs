//! Commands that change a VDI or snapshot in place: rollback, resize, snapshot names and
//! protection.

use vdi::{SnapshotId, VdiId};

use super::{Ctx, describe, resolve_vdi, snapshot_ref};
use crate::args::{ResizeArgs, RollbackArgs, SnapRenameArgs};
use crate::error::{CmdResult, Failure};
use crate::format;

/// A snapshot of VDI `vdi` given as NAME, ID, @ID, VDI@ID or VDI@NAME.
fn own_snapshot(ctx: &Ctx<'_>, vdi: VdiId, text: &str) -> Result<SnapshotId, Failure> {
    if !text.contains('@') && text.parse::<SnapshotId>().is_err() {
        return Ok(ctx.reg.find_snapshot(vdi, text)?);
    }
    snapshot_ref(ctx.reg, text)
}

/// `vdi rollback VDI SNAPSHOT`.
pub fn rollback(ctx: &mut Ctx<'_>, a: &RollbackArgs) -> CmdResult {
    let id = resolve_vdi(ctx.reg, &a.vdi)?;
    let sid = own_snapshot(ctx, id, &a.snapshot)?;
    let what = describe(ctx.reg, vdi::Source::Vdi(id));
    ctx.reg.rollback(id, sid).map_err(|e| Failure::from(e).context(format!("cannot roll {what} back")))?;
    let space =
        if ctx.reg.has_reclaimer() { String::new() } else { ctx.reclaim_after_delete().map(|s| format!("; {s}"))? };
    ctx.print(&format!("rolled {what} back to snapshot {sid}{space}\n"))?;
    Ok(0)
}

/// `vdi resize VDI SIZE [--allow-shrink]`.
pub fn resize(ctx: &mut Ctx<'_>, a: &ResizeArgs) -> CmdResult {
    let id = resolve_vdi(ctx.reg, &a.vdi)?;
    let what = describe(ctx.reg, vdi::Source::Vdi(id));
    let old = ctx.reg.info(id)?.size;
    ctx.reg
        .resize(id, a.size, a.allow_shrink)
        .map_err(|e| Failure::from(e).context(format!("cannot resize {what}")))?;
    let e = ctx.exact;
    ctx.print(&format!("resized {what} from {} to {}\n", format::size(old, e), format::size(a.size, e)))?;
    Ok(0)
}

/// `vdi snap-rename SNAPSHOT NAME | --clear`.
pub fn snap_rename(ctx: &mut Ctx<'_>, a: &SnapRenameArgs) -> CmdResult {
    let sid = snapshot_ref(ctx.reg, &a.snapshot)?;
    let name = if a.clear { None } else { a.name.as_deref() };
    ctx.reg.name_snapshot(sid, name)?;
    match name {
        Some(n) => ctx.print(&format!("snapshot {sid} is now named '{n}'\n"))?,
        None => ctx.print(&format!("snapshot {sid} has no name now\n"))?,
    }
    Ok(0)
}

/// `vdi snap-protect SNAPSHOT` and `vdi snap-unprotect SNAPSHOT`.
pub fn snap_protect(ctx: &mut Ctx<'_>, text: &str, protect: bool) -> CmdResult {
    let sid = snapshot_ref(ctx.reg, text)?;
    ctx.reg.protect_snapshot(sid, protect)?;
    let state = if protect { "protected: it and its VDI cannot be deleted" } else { "no longer protected" };
    ctx.print(&format!("snapshot {sid} is {state}\n"))?;
    Ok(0)
}
