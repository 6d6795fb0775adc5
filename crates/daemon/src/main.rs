//! `parallaxd`: serve Parallax VDIs over NBD.

use std::process::ExitCode;

use clap::Parser;
use daemon::config::{Config, Flags};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("PARALLAX_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let flags = Flags::parse();
    let config = match Config::from_flags(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("parallaxd: {e:#}");
            return ExitCode::from(2);
        }
    };
    let stop = match shutdown::Shutdown::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("parallaxd: cannot create the stop signal: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SIGTERM and SIGINT raise the stop signal from a thread that blocks on them
    // (signal-hook's self-pipe), so every waiter wakes at once.
    let mut signals =
        match signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("parallaxd: cannot handle SIGTERM and SIGINT: {e}");
                return ExitCode::FAILURE;
            }
        };
    {
        let stop = stop.clone();
        let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!("signal {sig}: stopping");
                stop.trigger();
            }
        });
        if let Err(e) = spawned {
            eprintln!("parallaxd: cannot start the signal thread: {e}");
            return ExitCode::FAILURE;
        }
    }
    // A store in RADOS is named with its cluster too: a `vdi` aimed at another cluster's pool of
    // the same name must not reach this daemon.
    let store = rados::control_key(&config.store, &config.rados.ceph);
    let control: daemon::service::ControlHook = Box::new(move |reg, stop| {
        // The store must exist before its canonical path (and so the socket name) is known.
        Ok(Some(cli::control::spawn_control(&store, reg, stop)?))
    });
    match daemon::run(config, stop, Some(control)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: through the log when errors are logged, else straight to stderr.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{e:#}");
            } else {
                eprintln!("parallaxd: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
