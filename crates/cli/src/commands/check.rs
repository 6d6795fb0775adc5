//! `vdi check [--repair]`: the store's full consistency check.

use serde::Serialize;

use super::Ctx;
use crate::args::CheckArgs;
use crate::error::{CmdResult, EXIT_NO};

/// `check --json`.
#[derive(Debug, Serialize)]
struct CheckJson {
    vdis: usize,
    snapshots: usize,
    nodes: u64,
    data_blocks: u64,
    problems: Vec<String>,
    repaired: usize,
    clean: bool,
}

/// `vdi check`: exit 0 if the store is consistent (after repair, with `--repair`), 1 if not.
pub fn check(ctx: &mut Ctx<'_>, a: &CheckArgs) -> CmdResult {
    let progress = crate::progress::Progress::counting(ctx.err_is_terminal, ctx.term_width, "checking", 0, "trees");
    let err = &mut *ctx.err;
    let report = ctx.reg.check_with_progress(a.repair, &mut |done, total| progress.update(done, total, err));
    progress.finish(ctx.err);
    let report = report?;
    // After a repair, what counts is what is still wrong.
    let after = if a.repair && report.repaired > 0 { ctx.reg.check(false)? } else { report.clone() };
    let clean = after.is_clean();
    if a.json {
        ctx.print_json(&CheckJson {
            vdis: report.vdis,
            snapshots: report.snapshots,
            nodes: report.nodes,
            data_blocks: report.data_blocks,
            problems: report.problems.iter().map(|p| p.to_string()).collect(),
            repaired: report.repaired,
            clean,
        })?;
        return Ok(if clean { 0 } else { EXIT_NO });
    }
    let mut text = format!(
        "checked {} VDI(s), {} snapshot(s), {} tree node(s), {} data block(s)\n",
        report.vdis, report.snapshots, report.nodes, report.data_blocks
    );
    for p in &report.problems {
        text.push_str(&format!("problem: {p}\n"));
    }
    if report.repaired > 0 {
        text.push_str(&format!("repaired {} problem(s)\n", report.repaired));
    }
    if clean {
        text.push_str("the store is consistent\n");
    } else {
        text.push_str(&format!("{} problem(s) remain", after.problems.len()));
        text.push_str(if a.repair {
            "; they cannot be repaired safely (damaged metadata): restore the store from a backup\n"
        } else {
            "; `vdi check --repair` fixes reference counts and leaks\n"
        });
    }
    ctx.print(&text)?;
    Ok(if clean { 0 } else { EXIT_NO })
}
