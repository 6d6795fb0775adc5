//! Commands that make, rename and delete VDIs.

use super::{Ctx, live_snapshot, resolve_vdi};
use crate::args::{CreateArgs, DeleteArgs, RenameArgs};
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

/// `vdi delete VDI [--yes]`: deletes it and its snapshots. A VDI with snapshots is deleted
/// only with `--yes`, or after a "yes" typed on the terminal the command runs on.
pub fn delete(ctx: &mut Ctx<'_>, a: &DeleteArgs) -> CmdResult {
    let id = resolve_vdi(ctx.reg, &a.vdi)?;
    let info = ctx.reg.info(id)?;
    // Refused anyway: say so before asking.
    if let Some(p) = ctx.reg.snapshots(id)?.iter().find(|s| !s.deleted && s.protected) {
        return Err(vdi::VdiError::Protected(p.id).into());
    }
    if info.snapshots > 0 && !a.yes {
        let question = format!(
            "VDI {id} ('{}') has {} snapshot(s); deleting it deletes them too. Delete? [y/N] ",
            info.name, info.snapshots
        );
        if !confirm(ctx, &question)? {
            return Err(Failure::user(format!(
                "not deleted: VDI {id} ('{}') has {} snapshot(s); add --yes to delete it and them",
                info.name, info.snapshots
            )));
        }
    }
    ctx.reg.delete_vdi(id)?;
    let space = ctx.reclaim_after_delete()?;
    ctx.print(&format!("deleted VDI {id} ('{}') and its {} snapshot(s); {space}\n", info.name, info.snapshots))?;
    Ok(0)
}

/// Asks `question` on the command's terminal and reads the answer; false (without asking)
/// if standard input is not a terminal.
fn confirm(ctx: &mut Ctx<'_>, question: &str) -> Result<bool, Failure> {
    use std::io::{BufRead, IsTerminal};
    let Some(stdin) = ctx.stdin.as_ref().filter(|f| f.is_terminal()) else { return Ok(false) };
    let _ = ctx.err.write_all(question.as_bytes());
    let _ = ctx.err.flush();
    let mut answer = String::new();
    std::io::BufReader::new(stdin)
        .read_line(&mut answer)
        .map_err(|e| Failure::system(format!("reading the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "Yes" | "YES"))
}
