//! What ships beside the binaries: the sample systemd unit passes `systemd-analyze verify` and
//! its command line parses; the sample configuration file loads.

use std::process::Command;

const UNIT: &str = include_str!("../../../docs/parallaxd.service");

#[test]
fn the_sample_unit_verifies_and_its_command_line_parses() {
    let exec = UNIT.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("an ExecStart line");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/parallaxd"), "cargo xtask install puts parallaxd there");
    // The flags parse as parallaxd parses them (--help after them: parse, print, exit 0).
    let out = Command::new(env!("CARGO_BIN_EXE_parallaxd")).args(words.clone()).arg("--version").output().unwrap();
    assert!(out.status.success(), "ExecStart's flags do not parse: {}", String::from_utf8_lossy(&out.stderr));
    // systemd checks the unit with the binary where this test can put it.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("parallaxd.service");
    std::fs::write(&unit, UNIT.replace("/usr/local/bin/parallaxd", env!("CARGO_BIN_EXE_parallaxd"))).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (package systemd) must be installed; cargo xtask test installs it");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let about_unit: Vec<&str> = said.lines().filter(|l| l.contains("parallaxd.service")).collect();
    assert!(out.status.success() && about_unit.is_empty(), "systemd-analyze verify: {said}");
}

#[test]
fn the_sample_config_file_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/parallaxd.toml");
    let flags = <daemon::config::Flags as clap::Parser>::try_parse_from(["parallaxd", "--config", path]).unwrap();
    let c = daemon::config::Config::from_flags(flags).expect("docs/parallaxd.toml loads");
    assert_eq!(c.store, std::path::Path::new("/var/lib/parallax/blockstore.dat"));
    assert!(c.metrics.is_some() && c.schedule.is_some() && c.nbd_socket.is_some());
}
