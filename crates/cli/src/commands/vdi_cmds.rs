//! Commands that make, rename and delete VDIs.

use super::{Ctx, live_snapshot, resolve_vdi};
use crate::args::{CreateArgs, RenameArgs};
use crate::error::{CmdResult, Failure};

/// `vdi create NAME [--size SIZE | --from SNAPSHOT]`: prints the new VDI's id.
pub fn create(ctx: &mut Ctx<'_>, a: &CreateArgs) -> CmdResult {
    if !a.legacy.is_empty() {
        return Err(Failure::user(format!(
            "`vdi create` takes one name, then options; '{}' is not one of them. To start from a \
             snapshot: `vdi create {} --from SNAPSHOT`; to give a size: `--size 16G` (the 2005 \
             form `create NAME SNAP_ID` is not supported)",
            a.legacy.join(" "),
            a.name
        )));
    }
    let id = match &a.from {
        Some(from) => {
            let sid = live_snapshot(ctx.reg, from)?;
            ctx.reg.clone_snapshot(&a.name, sid)?
        }
        None => ctx.reg.create_vdi(&a.name, a.size)?,
    };
    ctx.print(&format!("{id}\n"))?;
    Ok(0)
}

/// `vdi rename VDI NEW_NAME`.
pub fn rename(ctx: &mut Ctx<'_>, a: &RenameArgs) -> CmdResult {
    let id = resolve_vdi(ctx.reg, &a.vdi)?;
    let old = ctx.reg.info(id)?.name;
    ctx.reg.rename(id, &a.new_name)?;
    ctx.print(&format!("renamed VDI {id} from '{old}' to '{}'\n", a.new_name))?;
    Ok(0)
}

/// `vdi delete VDI`: deletes it and its snapshots.
pub fn delete(ctx: &mut Ctx<'_>, name: &str) -> CmdResult {
    let id = resolve_vdi(ctx.reg, name)?;
    let info = ctx.reg.info(id)?;
    ctx.reg.delete_vdi(id)?;
    let space = ctx.reclaim_after_delete()?;
    ctx.print(&format!("deleted VDI {id} ('{}') and its {} snapshot(s); {space}\n", info.name, info.snapshots))?;
    Ok(0)
}
