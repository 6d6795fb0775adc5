//! The commands, written once against an open registry and borrowed output streams, so the
//! same code runs in the `vdi` process and, through the control socket, inside parallaxd.

mod check;
mod diff;
mod image;
mod manage;
pub(crate) mod show;
mod snapshot;
mod space;
mod stats;
mod tree;
mod vdi_cmds;

use std::io::Write;
use std::sync::Arc;

use vdi::{Registry, SnapshotId, Source, VdiId};

use crate::args::{Cli, Command};
use crate::error::{CmdResult, EXIT_USER, Failure};

/// What a command runs with.
pub struct Ctx<'a> {
    /// The open registry.
    pub reg: &'a Arc<Registry>,
    /// The command's standard input, if it has one (`vdi fill VDI -`).
    pub stdin: Option<std::fs::File>,
    /// Raised when a long-running command must end (the daemon stops); `None` run by itself.
    pub stop: Option<shutdown::Shutdown>,
    /// Where results go.
    pub out: &'a mut dyn Write,
    /// `out` is a terminal.
    pub out_is_terminal: bool,
    /// Where progress, warnings and errors go.
    pub err: &'a mut dyn Write,
    /// Draw progress bars on `err`.
    pub err_is_terminal: bool,
    /// Width of the terminal `err` is on.
    pub term_width: u16,
    /// Show sizes as exact byte counts (`--bytes`).
    pub exact: bool,
}

impl Ctx<'_> {
    /// What became of the space a delete released: freed now (the store is open by this
    /// command alone), or left to the daemon's background reclaimer.
    pub fn reclaim_after_delete(&mut self) -> Result<String, vdi::VdiError> {
        if self.reg.has_reclaimer() {
            return Ok(format!("its space is freed in the background ({} entries queued)", self.reg.pending_reclaim()));
        }
        let stats = self.reg.reclaim_all(&mut |_, _| {})?;
        Ok(format!("freed {}", crate::format::size(stats.freed * blockstore::BLOCK_SIZE as u64, self.exact)))
    }

    /// Writes `text` to the output stream.
    pub fn print(&mut self, text: &str) -> Result<(), Failure> {
        self.out.write_all(text.as_bytes()).map_err(output_error)
    }

    /// Writes `value` to the output as pretty JSON and a newline.
    pub fn print_json<T: serde::Serialize>(&mut self, value: &T) -> Result<(), Failure> {
        self.print(&json_text(value)?)
    }
}

/// `value` as pretty JSON and a newline, as every `--json` prints it.
pub fn json_text<T: serde::Serialize>(value: &T) -> Result<String, Failure> {
    let mut s = serde_json::to_string_pretty(value).map_err(|e| Failure::system(e.to_string()))?;
    s.push('\n');
    Ok(s)
}

/// An error writing the command's output (e.g. a closed pipe).
pub fn output_error(e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // The reader went away (`vdi export - | head`): stop quietly with the status a tool
        // killed by SIGPIPE has, so `set -o pipefail` still sees the output was cut short.
        Failure { code: crate::error::EXIT_BROKEN_PIPE, message: String::new() }
    } else {
        Failure::system(format!("writing the output: {e}"))
    }
}

/// Runs the parsed command line against `ctx.reg`. `init` is refused here: the store is
/// already open.
pub fn run(ctx: &mut Ctx<'_>, cli: &Cli) -> CmdResult {
    match &cli.command {
        Command::Init(_) => Err(Failure::user(
            "the store already exists and is open (by parallaxd); `vdi init` only creates new stores",
        )),
        Command::Create(a) => vdi_cmds::create(ctx, a),
        Command::List(a) => show::list(ctx, a.json),
        Command::Fill(a) => image::fill(ctx, a),
        Command::Validate(a) => image::validate(ctx, a),
        Command::Snap(a) => snapshot::snap(ctx, &a.vdi, a.name.as_deref()),
        Command::SnapRename(a) => manage::snap_rename(ctx, a),
        Command::SnapProtect(a) => manage::snap_protect(ctx, &a.snapshot, true),
        Command::SnapUnprotect(a) => manage::snap_protect(ctx, &a.snapshot, false),
        Command::Rollback(a) => manage::rollback(ctx, a),
        Command::Resize(a) => manage::resize(ctx, a),
        Command::Map(a) => space::map(ctx, a),
        Command::ExportDiff(a) => image::export_diff(ctx, a),
        Command::ImportDiff(a) => image::import_diff(ctx, a),
        Command::Du(a) => space::du(ctx, a),
        Command::Stats(a) => stats::stats(ctx, a),
        Command::SnapList(a) => snapshot::list(ctx, a),
        Command::Tree(a) => tree::tree(ctx, a),
        Command::Info(a) => show::info(ctx, a),
        Command::Rename(a) => vdi_cmds::rename(ctx, a),
        Command::Delete(a) => vdi_cmds::delete(ctx, a),
        Command::SnapDelete(a) => snapshot::delete(ctx, &a.snapshot),
        Command::Export(a) => image::export(ctx, a),
        Command::Diff(a) => diff::diff(ctx, a),
        Command::Check(a) => check::check(ctx, a),
        Command::Completions(a) => completions(ctx.out, a.shell),
        Command::Takeover => Err(Failure::user("the store is open here already: there is nothing to take over")),
        Command::Cluster(_) => Err(Failure::user("`vdi cluster` lists the stores of a RADOS pool: --store rados:POOL")),
        Command::Names => names(ctx),
    }
}

/// Prints the completion script for `shell`: clap's (subcommands and flags) and, for bash and
/// fish, a hook that offers the store's VDI and snapshot names (`vdi __names`) for arguments.
pub fn completions(out: &mut dyn Write, shell: clap_complete::Shell) -> CmdResult {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "vdi", &mut buf);
    match shell {
        clap_complete::Shell::Bash => buf.extend_from_slice(BASH_NAMES.as_bytes()),
        clap_complete::Shell::Fish => buf.extend_from_slice(FISH_NAMES.as_bytes()),
        _ => {}
    }
    out.write_all(&buf).map_err(output_error)?;
    Ok(0)
}

/// Bash: after clap's completion, an argument that is not a flag also gets the store's names
/// (the store named by --store on the line, else PARALLAX_STORE, else the default).
const BASH_NAMES: &str = r#"
_vdi_with_names() {
    _vdi "$@"
    local cur="${COMP_WORDS[COMP_CWORD]}" i store=()
    [[ $COMP_CWORD -ge 2 && "$cur" != -* ]] || return 0
    for ((i = 1; i < COMP_CWORD; i++)); do
        [[ "${COMP_WORDS[i]}" == --store ]] && store=(--store "${COMP_WORDS[i+1]}")
    done
    local names
    names=$(vdi "${store[@]}" __names 2>/dev/null) || return 0
    local IFS=$'
'
    COMPREPLY+=($(compgen -W "$names" -- "$cur"))
}
complete -F _vdi_with_names -o nosort -o bashdefault -o default vdi
"#;

/// Fish: the store's names for any argument after the subcommand.
const FISH_NAMES: &str = r#"
complete -c vdi -n 'not __fish_use_subcommand' -f -a '(vdi __names 2>/dev/null)'
"#;

/// `vdi __names`: VDI names and ids, and `VDI@NAME` of every named snapshot.
fn names(ctx: &mut Ctx<'_>) -> CmdResult {
    let mut out = String::new();
    for v in ctx.reg.list() {
        out.push_str(&format!("{}\n", v.name));
        for s in ctx.reg.snapshots(v.id)?.into_iter().filter(|s| !s.deleted) {
            if let Some(n) = s.name {
                out.push_str(&format!("{}@{n}\n", v.name));
            }
        }
    }
    ctx.print(&out)?;
    Ok(0)
}

/// Resolves a VDI named by id or name.
pub fn resolve_vdi(reg: &Registry, name: &str) -> Result<VdiId, Failure> {
    Ok(reg.resolve(name)?)
}

/// Parses a snapshot id: `ID` or `@ID`.
pub fn parse_snapshot(text: &str) -> Result<SnapshotId, Failure> {
    let t = text.strip_prefix('@').unwrap_or(text);
    t.parse::<SnapshotId>().map_err(|e| Failure { code: EXIT_USER, message: e })
}

/// A snapshot that exists (deleted or not), written `ID`, `@ID`, `VDI@ID` (the name
/// parallaxd exports snapshots under; the VDI must be the snapshot's own) or `VDI@NAME`.
pub fn snapshot_ref(reg: &Registry, text: &str) -> Result<SnapshotId, Failure> {
    let (vdi, id) = match text.split_once('@') {
        Some((v, id)) if !v.is_empty() => (Some(v), id),
        _ => (None, text),
    };
    if let Some(v) = vdi
        && id.parse::<SnapshotId>().is_err()
    {
        let owner = resolve_vdi(reg, v)?;
        return Ok(reg.find_snapshot(owner, id)?);
    }
    let sid = parse_snapshot(id)?;
    let info = reg.snapshot_info(sid)?;
    if let Some(v) = vdi {
        let owner = resolve_vdi(reg, v)?;
        if owner != info.vdi {
            return Err(Failure::user(format!(
                "snapshot {sid} is a snapshot of VDI {}, not of '{v}' (see `vdi snap-list {v}`)",
                info.vdi
            )));
        }
    }
    Ok(sid)
}

/// A snapshot (as [`snapshot_ref`]) that must not be deleted.
pub fn live_snapshot(reg: &Registry, text: &str) -> Result<SnapshotId, Failure> {
    let sid = snapshot_ref(reg, text)?;
    if reg.snapshot_info(sid)?.deleted {
        return Err(vdi::VdiError::SnapshotDeleted(sid).into());
    }
    Ok(sid)
}

/// A VDI (id or name) or, written `@ID`/`VDI@ID` or with `snapshot` set, a snapshot.
pub fn parse_source(reg: &Registry, text: &str, snapshot: bool) -> Result<Source, Failure> {
    if snapshot || text.contains('@') {
        Ok(Source::Snapshot(live_snapshot(reg, text)?))
    } else {
        Ok(Source::Vdi(resolve_vdi(reg, text)?))
    }
}

/// "VDI 3 ('name')" or "snapshot 5 (of VDI 3)".
pub fn describe(reg: &Registry, src: Source) -> String {
    match src {
        Source::Vdi(id) => match reg.info(id) {
            Ok(v) => format!("VDI {id} ('{}')", v.name),
            Err(_) => format!("VDI {id}"),
        },
        Source::Snapshot(s) => match reg.snapshot_info(s) {
            Ok(i) => format!("snapshot {s} (of VDI {})", i.vdi),
            Err(_) => format!("snapshot {s}"),
        },
    }
}

/// Bytes of data mapped by a VDI or snapshot (blocks shared with others included).
pub fn used_bytes(reg: &Registry, src: Source) -> Result<u64, Failure> {
    Ok(reg.mapped_blocks(src)? * blockstore::BLOCK_SIZE as u64)
}

/// [`used_bytes`] of many, as of one instant, in one walk of the store; 0 for one deleted
/// while the listing ran.
pub fn used_bytes_of(reg: &Registry, srcs: &[Source]) -> Result<Vec<u64>, Failure> {
    Ok(reg.mapped_blocks_of(srcs)?.into_iter().map(|b| b.unwrap_or(0) * blockstore::BLOCK_SIZE as u64).collect())
}
