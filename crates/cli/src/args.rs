//! The command line: every subcommand, flag and help text, as clap definitions.
//!
//! Arguments that name files carry a `ValueHint` of `FilePath`/`AnyPath`: the control-socket
//! client uses it to find the path arguments it must make absolute before forwarding.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum, ValueHint};
use clap_complete::Shell;

/// The store used when neither `--store` nor `PARALLAX_STORE` names one.
pub const DEFAULT_STORE: &str = "./blockstore.dat";

const TOP_HELP: &str = "\
Workflow (a store file is created on first use; pick it with --store or PARALLAX_STORE):
  truncate -s 2G image && mkfs.ext4 -q image      # a raw disk image to import
  debugfs -w -R \"write /etc/services services\" image
  vdi create \"My new FC3 VDI\"                     # prints the new VDI's id, e.g. 0
  vdi fill 0 ./image                              # import (sparse); size taken from the image
  vdi validate 0 ./image                          # 'identical', or the first differing offset
  vdi snap 0                                      # prints the new snapshot's id, e.g. 1
  vdi snap-list 0                                 # snapshots of VDI 0
  vdi create \"FC3 - Copy 1\" --from 1              # a clone of snapshot 1 (copy-on-write)
  vdi list                                        # every VDI
  vdi tree                                        # VDIs, snapshots and clones as a tree

A VDI is named by id or by name. A snapshot is named by the id `vdi snap` printed; where a
VDI is expected, write @ID, VDI@ID or VDI@NAME (or pass --snapshot) to mean a snapshot instead.
When parallaxd serves the store, every command goes through the daemon automatically.
Exit status: 0 success, 1 'no' (validate found a difference, check found problems),
2 a usage or user error, 3 a failure of the store or the system. See docs/cli.md.";

/// `vdi`: manage the virtual disk images (VDIs) of a Parallax block store.
#[derive(Debug, Parser)]
#[command(name = "vdi", version, about = "Manage the VDIs (virtual disk images) of a Parallax block store")]
#[command(after_help = TOP_HELP, propagate_version = true)]
pub struct Cli {
    /// The block store: a file or device, or `rados:POOL[/NAMESPACE]` in a Ceph cluster.
    #[arg(long, global = true, env = "PARALLAX_STORE", default_value = DEFAULT_STORE, value_name = "PATH",
          value_hint = ValueHint::FilePath, display_order = 100)]
    pub store: PathBuf,

    /// With a `rados:` store: the cluster's ceph.conf [default: librados' search, /etc/ceph/ceph.conf].
    #[arg(long, global = true, env = "PARALLAX_CEPH_CONF", value_name = "FILE", display_order = 103)]
    pub ceph_conf: Option<PathBuf>,

    /// With a `rados:` store: the Ceph client id, without `client.` [default: admin].
    #[arg(long, global = true, env = "PARALLAX_CEPH_ID", value_name = "ID", display_order = 104)]
    pub ceph_id: Option<String>,

    /// With a `rados:` store: this host's name in the store's lease [default: the host name].
    #[arg(long, global = true, env = "PARALLAX_HOST", value_name = "NAME", display_order = 105)]
    pub host: Option<String>,

    /// Wait for another process using the store instead of failing at once.
    #[arg(long, global = true, display_order = 101)]
    pub wait: bool,

    /// Show sizes as exact byte counts instead of KiB/MiB/GiB.
    #[arg(long, global = true, display_order = 102)]
    pub bytes: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an empty store, optionally with a size limit (other commands create one on demand).
    #[command(after_help = "Example:\n  vdi --store /srv/vdis.store init --max-size 64G")]
    Init(InitArgs),
    /// Create a VDI (empty, or a clone of a snapshot with --from) and print its id.
    #[command(after_help = "Examples:\n  vdi create \"My new FC3 VDI\"            # size set by the first fill\n  \
                            vdi create scratch --size 10G\n  vdi create \"FC3 - Copy 1\" --from 1     # clone of snapshot 1")]
    Create(CreateArgs),
    /// List every VDI: id, name, size, space used, snapshots, parent snapshot.
    #[command(after_help = "Examples:\n  vdi list\n  vdi list --json | jq '.[].name'")]
    List(JsonArg),
    /// Import a raw disk image into a VDI, replacing its contents (atomic, sparse).
    #[command(visible_alias = "import")]
    #[command(after_help = "Example:\n  vdi fill 0 ./image\n\nHoles and all-zero blocks are not stored. \
                            If the import fails (e.g. the store is full) the VDI is left as it was.")]
    Fill(FillArgs),
    /// Compare a VDI or snapshot with a raw image; exit 1 if they differ.
    #[command(after_help = "Examples:\n  vdi validate 0 ./image\n  vdi validate @1 ./image      # snapshot 1")]
    Validate(ValidateArgs),
    /// Take a snapshot of a VDI and print the snapshot's id.
    #[command(
        after_help = "Examples:\n  vdi snap 0\n  vdi snap golden before-upgrade   # named: golden@before-upgrade"
    )]
    Snap(SnapTakeArgs),
    /// Give a snapshot a name, change it, or (with --clear) drop it.
    #[command(
        after_help = "Examples:\n  vdi snap-rename golden@5 release-1\n  vdi snap-rename golden@release-1 --clear"
    )]
    SnapRename(SnapRenameArgs),
    /// Protect a snapshot: it, and its VDI, cannot be deleted until unprotected.
    #[command(after_help = "Example:\n  vdi snap-protect golden@release-1")]
    SnapProtect(SnapArg),
    /// Lift a snapshot's protection.
    #[command(after_help = "Example:\n  vdi snap-unprotect golden@release-1")]
    SnapUnprotect(SnapArg),
    /// Make a VDI hold one of its snapshots again (O(1); the VDI keeps its id and snapshots).
    #[command(after_help = "Example:\n  vdi rollback golden before-upgrade     # or golden@5, or 5")]
    Rollback(RollbackArgs),
    /// Change a VDI's size: grow it, or shrink it with --allow-shrink.
    #[command(
        after_help = "Examples:\n  vdi resize vm-1 20G\n  vdi resize vm-1 8G --allow-shrink   # drops everything past 8G"
    )]
    Resize(ResizeArgs),
    /// Show where a VDI's or snapshot's data is: extents of data and of holes (qemu-img map).
    #[command(after_help = "Examples:\n  vdi map golden\n  vdi map golden@5 --json")]
    Map(MapArgs),
    /// I/O counters per VDI and per client (kept by parallaxd): operations, bytes, errors,
    /// latency; with --watch, rates every few seconds.
    #[command(
        after_help = "Examples:\n  vdi stats\n  vdi stats golden --json\n  vdi stats --watch 2      # rates every 2 s until interrupted"
    )]
    Stats(StatsArgs),
    /// Space per VDI and snapshot: provisioned, used, and exclusive (what deleting frees).
    #[command(after_help = "Examples:\n  vdi du\n  vdi du golden --json")]
    Du(DuArgs),
    /// List the snapshots of a VDI: id, time, root block, size, space used.
    #[command(
        after_help = "Examples:\n  vdi snap-list 0\n  vdi snap-list golden --all --json\n  vdi snap-list golden --usage"
    )]
    SnapList(SnapListArgs),
    /// Show VDIs, their snapshots and the clones made from them as a tree.
    #[command(after_help = "Examples:\n  vdi tree\n  vdi tree --format dot > vdis.dot\n  \
                            vdi tree --format svg -o vdis.svg      # needs Graphviz (apt-get install graphviz)")]
    Tree(TreeArgs),
    /// Show one VDI or snapshot in detail; without an argument, the store's space.
    #[command(after_help = "Examples:\n  vdi info 0\n  vdi info @1 --json\n  vdi info")]
    Info(InfoArgs),
    /// Rename a VDI.
    #[command(after_help = "Example:\n  vdi rename 0 golden")]
    Rename(RenameArgs),
    /// Delete a VDI and all its snapshots (clones made from them keep working).
    #[command(
        after_help = "Examples:\n  vdi delete \"FC3 - Copy 1\"\n  vdi delete golden --yes   # it has snapshots; \
                            asked on a terminal, required otherwise"
    )]
    Delete(DeleteArgs),
    /// Delete a snapshot (clones made from it keep working).
    #[command(after_help = "Example:\n  vdi snap-delete 1")]
    SnapDelete(SnapArg),
    /// Write a VDI or snapshot out as a raw image (sparse), or to stdout with '-'.
    #[command(after_help = "Examples:\n  vdi export 0 disk.img\n  vdi export @1 snap1.img         # snapshot 1\n  \
                            vdi export 1 - --snapshot | gzip > snap1.img.gz")]
    Export(ExportArgs),
    /// Write the changes between two snapshots (or all of one) as a diff stream, for backup
    /// or replay on another store with import-diff.
    #[command(
        after_help = "Examples:\n  vdi export-diff golden@mon mon.pxdiff                 # all of snapshot 'mon'\n  \
                            vdi export-diff golden@tue tue.pxdiff --from golden@mon   # only what changed\n  \
                            vdi export-diff golden@tue - --from golden@mon | ssh backup vdi import-diff - golden"
    )]
    ExportDiff(ExportDiffArgs),
    /// Apply a diff stream to a VDI, atomically (nothing changes unless the whole stream is
    /// read and its checksum is right).
    #[command(after_help = "Example:\n  vdi import-diff mon.pxdiff golden && vdi import-diff tue.pxdiff golden")]
    ImportDiff(ImportDiffArgs),
    /// List the byte ranges that differ between two snapshots, or a snapshot and a live VDI.
    #[command(after_help = "Examples:\n  vdi diff 1 2             # snapshot 1 vs snapshot 2\n  \
                            vdi diff 1               # snapshot 1 vs its VDI as it is now\n  \
                            vdi diff 1 --vdi clone   # snapshot 1 vs VDI 'clone' as it is now")]
    Diff(DiffArgs),
    /// Check the whole store's consistency (exit 1 if problems are found).
    #[command(after_help = "Examples:\n  vdi check\n  vdi check --repair     # fix reference counts and leaks")]
    Check(CheckArgs),
    /// Take a store in RADOS over from the host holding its lease, at once: fence that host
    /// (blocklist it in the cluster, so nothing more it writes lands) and break its lease.
    #[command(after_help = "Example:\n  vdi --store rados:vms takeover && parallaxd --store rados:vms\n\n\
                            For a host known dead, or hung; without it another host may open the store only \
                            when the dead host's lease runs out (parallaxd --lease, 15s by default).")]
    Takeover,
    /// List every store of a RADOS pool: which host serves each, its VDIs and their clients.
    #[command(after_help = "Example:\n  vdi --store rados:vms cluster\n\n\
                            Each store is shown from the catalog its serving host publishes (for a store \
                            nobody serves, the last one, without clients); no store is opened and no lock \
                            taken. The pool's directory records a store when a writer opens it.")]
    Cluster(JsonArg),
    /// Print a shell completion script.
    #[command(after_help = "Examples:\n  vdi completions bash > /etc/bash_completion.d/vdi\n  \
                            vdi completions zsh > \"${fpath[1]}/_vdi\"\n  vdi completions fish > ~/.config/fish/completions/vdi.fish")]
    Completions(CompletionsArgs),
    /// Print the names shell completion offers (VDIs, and VDI@SNAPSHOT for named snapshots),
    /// one per line; nothing if the store does not exist. Used by the completion scripts.
    #[command(name = "__names", hide = true)]
    Names,
}

impl Command {
    /// True for commands that change the store (they open it exclusively).
    pub fn writes(&self) -> bool {
        match self {
            Command::Init(_)
            | Command::Create(_)
            | Command::Fill(_)
            | Command::Snap(_)
            | Command::SnapRename(_)
            | Command::SnapProtect(_)
            | Command::SnapUnprotect(_)
            | Command::Rollback(_)
            | Command::Resize(_)
            | Command::ImportDiff(_)
            | Command::Rename(_)
            | Command::Delete(_)
            | Command::SnapDelete(_)
            | Command::Takeover => true,
            Command::Check(c) => c.repair,
            Command::List(_)
            | Command::Validate(_)
            | Command::SnapList(_)
            | Command::Tree(_)
            | Command::Info(_)
            | Command::Export(_)
            | Command::Diff(_)
            | Command::Map(_)
            | Command::Stats(_)
            | Command::Du(_)
            | Command::ExportDiff(_)
            | Command::Completions(_)
            | Command::Cluster(_)
            | Command::Names => false,
        }
    }

    /// True for commands that may create the store file when it does not exist yet.
    pub fn creates_store(&self) -> bool {
        matches!(self, Command::Init(_) | Command::Create(_))
    }
}

/// `vdi init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Largest size the store may grow to (e.g. 64G); unlimited by default.
    #[arg(long, value_name = "SIZE", value_parser = crate::format::parse_size_arg)]
    pub max_size: Option<u64>,
    /// Size of each of the two journal slots (default 32M, less for small stores).
    #[arg(long, value_name = "SIZE", value_parser = crate::format::parse_size_arg)]
    pub journal: Option<u64>,
}

/// `vdi create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name of the new VDI (1 to 255 bytes, no control characters, no '@', not a number).
    pub name: String,
    /// Virtual size, e.g. 2G, 512M, 4096 (K/M/G/T are binary: 1K = 1024 bytes).
    #[arg(long, value_name = "SIZE", value_parser = crate::format::parse_size_arg, conflicts_with = "from")]
    pub size: Option<u64>,
    /// Make the VDI a copy-on-write clone of this snapshot (ID, VDI@ID or VDI@NAME).
    #[arg(long, value_name = "SNAPSHOT")]
    pub from: Option<String>,
    /// Words after the name (the 2005 tool's `create NAME SNAP_ID ...` form): refused with a
    /// pointer to `--from` and `--size`.
    #[arg(hide = true, num_args = 0.., allow_hyphen_values = true)]
    pub legacy: Vec<String>,
}

/// A `--json` flag alone.
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON (field names in docs/cli.md) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One VDI argument.
#[derive(Debug, Args)]
pub struct VdiArg {
    /// The VDI, by id or name.
    pub vdi: String,
}

/// `vdi snap`.
#[derive(Debug, Args)]
pub struct SnapTakeArgs {
    /// The VDI, by id or name.
    pub vdi: String,
    /// A name for the snapshot (unique among the VDI's snapshots; 1 to 55 bytes, not a
    /// number, no '@' or '/'): then `VDI@NAME` names it wherever a snapshot is asked for.
    pub name: Option<String>,
}

/// `vdi snap-rename`.
#[derive(Debug, Args)]
pub struct SnapRenameArgs {
    /// The snapshot: ID, @ID, VDI@ID or VDI@NAME.
    pub snapshot: String,
    /// Its new name.
    #[arg(required_unless_present = "clear")]
    pub name: Option<String>,
    /// Drop the snapshot's name instead.
    #[arg(long, conflicts_with = "name")]
    pub clear: bool,
}

/// `vdi rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The VDI, by id or name.
    pub vdi: String,
    /// One of its snapshots: NAME, ID, @ID or VDI@ID/VDI@NAME.
    pub snapshot: String,
}

/// `vdi resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The VDI, by id or name.
    pub vdi: String,
    /// The new size, e.g. 20G (K/M/G/T are binary), in whole 512-byte sectors.
    #[arg(value_parser = crate::format::parse_size_arg)]
    pub size: u64,
    /// Allow a smaller size; everything past it is dropped.
    #[arg(long)]
    pub allow_shrink: bool,
}

/// `vdi export-diff`.
#[derive(Debug, Args)]
pub struct ExportDiffArgs {
    /// Where the diff ends: a snapshot (@ID, VDI@ID, VDI@NAME), or a VDI as it is now.
    pub source: String,
    /// The file to write, or '-' for standard output.
    #[arg(value_hint = ValueHint::FilePath)]
    pub output: PathBuf,
    /// The snapshot the diff starts from; without it, the diff holds the whole disk.
    #[arg(long, value_name = "SNAPSHOT")]
    pub from: Option<String>,
}

/// `vdi import-diff`.
#[derive(Debug, Args)]
pub struct ImportDiffArgs {
    /// The diff stream to read, or '-' for standard input.
    #[arg(value_hint = ValueHint::FilePath)]
    pub input: PathBuf,
    /// The VDI to apply it to, by id or name.
    pub vdi: String,
}

/// `vdi map`.
#[derive(Debug, Args)]
pub struct MapArgs {
    /// The VDI (id or name), or a snapshot as @ID, VDI@ID or VDI@NAME.
    pub source: String,
    /// Print JSON (as `qemu-img map --output=json` does) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `vdi stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only this VDI (id or name) and its clients.
    pub vdi: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Print rates every SECONDS (default 2) until interrupted.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<f64>,
    /// With --watch, stop after this many reports.
    #[arg(long, requires = "watch")]
    pub count: Option<u64>,
}

/// `vdi du`.
#[derive(Debug, Args)]
pub struct DuArgs {
    /// Only this VDI (id or name) and its snapshots; all VDIs by default.
    pub vdi: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `vdi delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The VDI, by id or name.
    pub vdi: String,
    /// Delete it even though it has snapshots, without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// One snapshot argument.
#[derive(Debug, Args)]
pub struct SnapArg {
    /// The snapshot: its id (as `vdi snap` and `vdi snap-list` print it), @ID, VDI@ID or
    /// VDI@NAME.
    pub snapshot: String,
}

/// `vdi fill`.
#[derive(Debug, Args)]
pub struct FillArgs {
    /// The VDI, by id or name.
    pub vdi: String,
    /// The image file or block device to import, or '-' for standard input (raw only).
    #[arg(value_hint = ValueHint::FilePath)]
    pub image: PathBuf,
    /// The image's format; by default it is recognised from its header. Anything but raw is
    /// converted with qemu-img.
    #[arg(long, short = 'f', value_enum)]
    pub format: Option<crate::qemu::ImageFormat>,
}

/// `vdi validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The VDI (id or name), or @ID (or VDI@ID, VDI@NAME) for a snapshot.
    pub source: String,
    /// The raw image to compare with.
    #[arg(value_hint = ValueHint::FilePath)]
    pub image: PathBuf,
    /// SOURCE is a snapshot id.
    #[arg(long, short = 's')]
    pub snapshot: bool,
}

/// `vdi snap-list`.
#[derive(Debug, Args)]
pub struct SnapListArgs {
    /// The VDI, by id or name.
    pub vdi: String,
    /// Include deleted snapshots.
    #[arg(long)]
    pub all: bool,
    /// Also show each snapshot's space: data it maps (USED) and data only it holds
    /// (EXCLUSIVE: what deleting it frees). Walks every listed tree; without it the listing
    /// reads only the snapshot log.
    #[arg(long)]
    pub usage: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Output formats of `vdi tree`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TreeFormat {
    /// Indented text.
    Text,
    /// Graphviz DOT source.
    Dot,
    /// SVG drawn by Graphviz `dot`.
    Svg,
    /// PNG drawn by Graphviz `dot`.
    Png,
}

/// `vdi tree`.
#[derive(Debug, Args)]
pub struct TreeArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = TreeFormat::Text)]
    pub format: TreeFormat,
    /// Write to this file instead of stdout.
    #[arg(long, short = 'o', value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub output: Option<PathBuf>,
    /// Include deleted snapshots that nothing was cloned from.
    #[arg(long)]
    pub all: bool,
}

/// `vdi info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The VDI (id or name), or @ID (or VDI@ID, VDI@NAME) for a snapshot; none for the whole store.
    pub source: Option<String>,
    /// SOURCE is a snapshot id.
    #[arg(long, short = 's')]
    pub snapshot: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `vdi rename`.
#[derive(Debug, Args)]
pub struct RenameArgs {
    /// The VDI, by id or name.
    pub vdi: String,
    /// Its new name.
    pub new_name: String,
}

/// `vdi export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The VDI (id or name), or @ID (or VDI@ID, VDI@NAME) for a snapshot.
    pub source: String,
    /// The file to write (created or overwritten, sparse), or '-' for stdout (raw only).
    #[arg(value_hint = ValueHint::FilePath)]
    pub output: PathBuf,
    /// SOURCE is a snapshot id.
    #[arg(long, short = 's')]
    pub snapshot: bool,
    /// Format of the file written; anything but raw is written with qemu-img.
    #[arg(long, short = 'f', value_enum, default_value = "raw")]
    pub format: crate::qemu::ImageFormat,
}

/// `vdi diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The older snapshot (ID, @ID, VDI@ID or VDI@NAME).
    pub from: String,
    /// The newer snapshot; if omitted, the live VDI (the snapshot's own, or --vdi).
    #[arg(conflicts_with = "vdi")]
    pub to: Option<String>,
    /// Compare with this live VDI instead (e.g. a clone of FROM).
    #[arg(long, value_name = "VDI")]
    pub vdi: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `vdi check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Fix wrong reference counts and leaked blocks (opens the store for writing).
    #[arg(long)]
    pub repair: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `vdi completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    pub shell: Shell,
}

/// The clap command, built (globals propagated), for introspection.
pub fn command() -> clap::Command {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    cmd
}
