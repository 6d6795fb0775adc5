//! The `vdi` command-line tool of Parallax, as a library.
//!
//! - The binary (`src/main.rs`) calls [`main_with_args`]: parse the command line, forward it to
//!   parallaxd if the daemon serves the store ([`control`]), else open the store and run it.
//! - parallaxd serves the control socket with [`control::serve`] (the `control` crate) and runs each request
//!   with [`execute`] (or [`control::registry_handler`], which wraps it) on the registry it
//!   already has open.
//!
//! Commands are written once ([`commands`]) against an open registry and borrowed streams.

#![warn(missing_docs)]

pub mod args;
pub mod commands;
pub mod control;
pub mod error;
pub mod format;
pub mod progress;
pub mod qemu;
mod room;
pub mod store;
pub mod tree;

use std::ffi::OsString;
use std::io::{BufWriter, IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::Arc;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::commands::Ctx;
use crate::error::Failure;

/// Terminal width assumed where it cannot be asked (a client's stderr, in the daemon).
const DEFAULT_WIDTH: u16 = 100;

/// Runs one `vdi` command line against an already-open registry: what parallaxd calls for each
/// control-socket request. `args` are the arguments after the program name; `--store` and
/// `--wait` are accepted and ignored; `init` is refused (the store exists). Results go to
/// `stdout`, errors and progress (drawn only if `stderr_is_terminal`) to `stderr`. Returns the
/// exit code: 0 success, 1 "no" (validate/check), 2 user error, 3 store or system failure.
pub fn execute(
    reg: &Arc<vdi::Registry>,
    args: Vec<String>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    stderr_is_terminal: bool,
) -> i32 {
    execute_with_width(reg, args, stdout, stderr, stderr_is_terminal, DEFAULT_WIDTH)
}

/// What the command's streams are connected to.
#[derive(Debug, Clone, Copy)]
pub struct Terminals {
    /// stdout is a terminal (binary output to it is refused).
    pub stdout: bool,
    /// stderr is a terminal (progress bars are drawn on it).
    pub stderr: bool,
    /// Width of the terminal stderr is on (see [`terminal_width`]).
    pub width: u16,
}

/// [`execute`], drawing progress bars `term_width` columns wide (see [`terminal_width`]).
pub fn execute_with_width(
    reg: &Arc<vdi::Registry>,
    args: Vec<String>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    stderr_is_terminal: bool,
    term_width: u16,
) -> i32 {
    execute_on(
        reg,
        args,
        None,
        None,
        stdout,
        stderr,
        Terminals { stdout: false, stderr: stderr_is_terminal, width: term_width },
    )
}

/// [`execute`] with the command's standard input (for `vdi fill VDI -`), the signal that ends
/// long-running commands (the daemon's stop), and what the streams are connected to.
pub fn execute_on(
    reg: &Arc<vdi::Registry>,
    args: Vec<String>,
    stdin: Option<std::fs::File>,
    stop: Option<shutdown::Shutdown>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    term: Terminals,
) -> i32 {
    let argv = std::iter::once("vdi".to_string()).chain(args);
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let text = e.render().to_string();
            let target: &mut dyn Write = if e.use_stderr() { stderr } else { stdout };
            let _ = target.write_all(text.as_bytes());
            let _ = target.flush();
            return e.exit_code();
        }
    };
    run_parsed(reg, &cli, stdin, stop, stdout, stderr, term)
}

/// Runs a parsed command on `reg`, printing a failure as `vdi: error: …`.
fn run_parsed(
    reg: &Arc<vdi::Registry>,
    cli: &Cli,
    stdin: Option<std::fs::File>,
    stop: Option<shutdown::Shutdown>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    term: Terminals,
) -> i32 {
    let mut out = BufWriter::with_capacity(64 * 1024, stdout);
    let result = {
        let mut ctx = Ctx {
            reg,
            stdin,
            stop,
            out: &mut out,
            out_is_terminal: term.stdout,
            err: stderr,
            err_is_terminal: term.stderr,
            term_width: term.width,
            exact: cli.bytes,
        };
        commands::run(&mut ctx, cli)
    };
    // Run by itself (no parallaxd with its background reclaimer), a command frees what it
    // queued for release — a failed or replaced import's tree, say — before it exits.
    if !reg.has_reclaimer()
        && !reg.store().lock().is_read_only()
        && reg.pending_reclaim() > 0
        && let Err(e) = reg.reclaim_all(&mut |_, _| {})
    {
        let _ = writeln!(stderr, "vdi: warning: freeing deleted space: {e} (it is retried next time)");
    }
    let flushed = out.flush().map_err(commands::output_error);
    match result.and_then(|code| flushed.map(|_| code)) {
        Ok(code) => code,
        Err(f) => report(stderr, &f),
    }
}

fn report(stderr: &mut dyn Write, f: &Failure) -> i32 {
    // A reader that went away (`vdi export - | head`) is not an error to report.
    if !f.message.is_empty() {
        let _ = writeln!(stderr, "vdi: error: {}", f.message);
        let _ = stderr.flush();
    }
    f.code
}

/// Width in columns of the terminal `fd` is on, or a default if it is not a terminal.
pub fn terminal_width(fd: impl std::os::fd::AsFd) -> u16 {
    match rustix::termios::tcgetwinsize(fd) {
        Ok(w) if w.ws_col >= 20 => w.ws_col,
        _ => DEFAULT_WIDTH,
    }
}

/// The `vdi` program: `args` is the whole command line, program name first. Returns the exit
/// code.
pub fn main_with_args(args: Vec<OsString>) -> i32 {
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    if let Command::Completions(c) = &cli.command {
        return match commands::completions(&mut stdout, c.shell) {
            Ok(code) => code,
            Err(f) => report(&mut stderr, &f),
        };
    }
    let ceph = rados::RadosOptions {
        ceph: rados::CephOptions { conf: cli.ceph_conf.clone(), id: cli.ceph_id.clone() },
        host: cli.host.clone().unwrap_or_else(rados::local_host_name),
        ..rados::RadosOptions::default()
    };
    if let Command::Cluster(a) = &cli.command {
        return match store::list_cluster(&cli.store, &ceph, a.json, cli.bytes, &mut stdout, &mut stderr) {
            Ok(code) => code,
            Err(f) => report(&mut stderr, &f),
        };
    }
    if let Command::Takeover = cli.command {
        return match store::take_over(&cli.store, &ceph, &mut stdout) {
            Ok(code) => code,
            Err(f) => report(&mut stderr, &f),
        };
    }
    if let Some(code) =
        control::try_forward(&rados::control_key(&cli.store, &ceph.ceph), args.get(1..).unwrap_or_default())
    {
        return code;
    }
    // Another host's daemon holds a RADOS store: nothing here can open it, but its catalog
    // says what it holds and serves.
    if let Command::List(a) = &cli.command
        && let Some(Ok(loc)) = cli.store.to_str().and_then(rados::RadosLocation::parse)
    {
        match rados::served_elsewhere(&loc, &ceph) {
            Ok(Some(seen)) => {
                return match commands::show::list_served_elsewhere(
                    &loc.to_string(),
                    &seen,
                    a.json,
                    cli.bytes,
                    &mut stdout,
                    &mut stderr,
                ) {
                    Ok(code) => code,
                    Err(f) => report(&mut stderr, &f),
                };
            }
            Ok(None) => {}
            Err(e) => {
                let f = Failure::from(blockstore::StoreError::io(format!("reading the lease of {loc}"), e.into_io()));
                return report(&mut stderr, &f);
            }
        }
    }
    let opened = match store::open_with(&cli.store, &cli.command, cli.wait, &ceph, &mut stderr) {
        Ok(o) => o,
        Err(f) => return report(&mut stderr, &f),
    };
    if let Command::Init(_) = cli.command {
        let space = opened.reg.store().lock().space();
        let limit = if space.max_blocks == 0 {
            "no size limit".to_string()
        } else {
            format!("size limit {}", format::human_size(space.max_blocks * blockstore::BLOCK_SIZE as u64))
        };
        let _ = writeln!(stdout, "created store {} ({limit})", cli.store.display());
        return 0;
    }
    let term = Terminals { stdout: stdout.is_terminal(), stderr: stderr.is_terminal(), width: terminal_width(&stderr) };
    let stdin = std::io::stdin().as_fd().try_clone_to_owned().ok().map(std::fs::File::from);
    let code = run_parsed(&opened.reg, &cli, stdin, None, &mut stdout, &mut stderr, term);
    if code != 0 && opened.created {
        // The command that would have been the store's first failed: leave no empty store.
        store::remove_new_store(&cli.store, opened.was_empty_file);
    }
    code
}
