//! `vdi`: manage the VDIs of a Parallax block store. See `vdi --help` and docs/cli.md.

fn main() {
    // Warnings of the storage layers (e.g. an interrupted import rolled back) go to stderr;
    // VDI_LOG=debug (or any tracing filter) shows more.
    let filter = tracing_subscriber::EnvFilter::try_from_env("VDI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .with_env_filter(filter)
        .init();
    std::process::exit(cli::main_with_args(std::env::args_os().collect()));
}
