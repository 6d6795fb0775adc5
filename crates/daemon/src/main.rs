//! `parallaxd`: serve Parallax VDIs over NBD.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Parser;
use daemon::config::{Config, Flags};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("PARALLAX_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let flags = Flags::parse();
    let config = match Config::from_flags(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("parallaxd: {e:#}");
            return ExitCode::from(2);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("parallaxd: cannot handle signal {sig}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let store = config.store.clone();
    let control: daemon::service::ControlHook = Box::new(move |reg, stop| {
        // The store must exist before its canonical path (and so the socket name) is known.
        Ok(Some(cli::control::spawn_control(&store, reg, stop)?))
    });
    match daemon::run(config, stop, Some(control)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("parallaxd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
