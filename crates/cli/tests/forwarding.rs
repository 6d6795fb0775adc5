//! Daemon forwarding: an in-process server (serve_control + execute over a registry opened
//! here, holding the store's lock as parallaxd would) and the real `vdi` binary as the client.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use blockstore::{BlockStore, OpenOptions};
use cli::control;
use common::{Env, ext4_image, random_file, same_bytes};

struct Daemon {
    reg: Arc<vdi::Registry>,
    stop: shutdown::Shutdown,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Daemon {
    fn start(env: &Env) -> Daemon {
        let store = BlockStore::open_path(&env.store, &OpenOptions::default(), None).expect("open store");
        let reg = vdi::Registry::open(Arc::new(store)).expect("registry");
        let listener = control::bind_control_socket_in(&env.run_dir, &env.store).expect("bind");
        let stop = shutdown::Shutdown::new().expect("shutdown");
        let (h, s) = (control::registry_handler(reg.clone(), stop.clone()), stop.clone());
        let thread = std::thread::spawn(move || control::serve(listener, h, &s));
        Daemon { reg, stop, thread: Some(thread) }
    }

    fn stop(mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread").expect("serve_control");
        }
    }
}

#[test]
fn commands_go_through_the_daemon_while_it_holds_the_store() {
    let env = Env::new();
    let data = env.path("data.bin");
    random_file(&data, 1 << 20, 21);
    let image = env.path("image");
    ext4_image(&image, 16, &[(&data, "data.bin")]);
    env.ok(&["create", "golden"]);
    env.ok(&["fill", "golden", "image"]);

    let daemon = Daemon::start(&env);
    let socket = control::control_socket_path_in(&env.run_dir, &env.store);
    assert!(socket.exists());

    // Read and write commands work although the daemon holds the exclusive lock.
    let list = env.ok(&["list", "--json"]);
    assert!(list.contains("\"golden\""), "{list}");
    assert_eq!(env.ok(&["snap", "golden"]).trim(), "1");
    assert_eq!(daemon.reg.snapshots(vdi::VdiId(0)).unwrap().len(), 1, "the daemon's registry did not change");
    assert_eq!(env.ok(&["create", "clone", "--from", "1"]).trim(), "1");
    assert!(daemon.reg.resolve("clone").is_ok());

    // Relative paths are resolved against the client's directory, not the daemon's.
    assert!(env.ok(&["validate", "golden", "image"]).starts_with("identical"));
    env.ok(&["export", "@1", "out.img"]);
    assert!(same_bytes(&image, &env.path("out.img")));
    let piped = env.run(&["export", "clone", "-"]);
    assert!(piped.status.success() && piped.stdout == std::fs::read(&image).unwrap());
    let other = env.path("other.img");
    random_file(&other, 2 << 20, 22);
    env.ok(&["--store", "blockstore.dat", "fill", "clone", "other.img"]);
    assert!(env.ok(&["validate", "clone", "other.img"]).starts_with("identical"));

    // Standard input reaches the daemon: a raw image on a pipe, and a diff stream.
    let mut child = env
        .cmd(&["fill", "clone", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let bytes = std::fs::read(&image).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || stdin.write_all(&bytes).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.ok(&["validate", "clone", "image"]).starts_with("identical"));
    // The daemon runs qemu-img for other formats.
    let qcow = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", "other.img", "other.qcow2"])
        .current_dir(env.dir.path())
        .status()
        .expect("qemu-img (qemu-utils) must be installed");
    assert!(qcow.success());
    env.ok(&["fill", "clone", "other.qcow2"]);
    assert!(env.ok(&["validate", "clone", "other.img"]).starts_with("identical"));

    // Exit codes and error messages come back from the daemon.
    env.fails(&["info", "nope"], 2, "no VDI named 'nope'");
    let out = env.run(&["validate", "golden", "other.img"]);
    assert_eq!(out.status.code(), Some(1));
    env.fails(&["init"], 2, "already exists");
    env.fails(&["create", "x", "--size", "12Q"], 2, "invalid size");

    // The same commands fail without forwarding: the daemon really was in the path.
    let direct = env.cmd(&["list"]).env("PARALLAX_RUN_DIR", env.path("elsewhere")).output().unwrap();
    assert_eq!(direct.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&direct.stderr).contains("in use by another process"));

    // Garbage on the socket does not hurt the server.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(b"hello, is this the daemon?").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(reply.is_empty() || reply == [b"PXR1".as_slice(), &2i32.to_le_bytes()].concat(), "{reply:?}");
    let mut s = UnixStream::connect(&socket).unwrap();
    let mut huge = b"PXC1".to_vec();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&huge).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    drop(UnixStream::connect(&socket).unwrap());
    assert!(env.ok(&["list"]).contains("clone"));

    // The daemon stops: its socket is stale, and vdi opens the store itself again.
    let reg = daemon.reg.clone();
    daemon.stop();
    drop(reg);
    assert!(socket.exists());
    assert!(env.ok(&["list"]).contains("clone"));
    assert!(env.ok(&["check"]).contains("consistent"));
}

#[test]
fn execute_runs_against_an_open_registry() {
    let env = Env::new();
    env.ok(&["create", "golden", "--size", "1M"]);
    let store = BlockStore::open_path(&env.store, &OpenOptions::default(), None).unwrap();
    let reg = vdi::Registry::open(Arc::new(store)).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // --store is ignored: the registry is the store.
    let code = cli::execute(&reg, args(&["--store", "/nonexistent", "snap", "golden"]), &mut out, &mut err, false);
    assert_eq!((code, String::from_utf8_lossy(&out).trim()), (0, "1"), "{}", String::from_utf8_lossy(&err));
    out.clear();
    assert_eq!(cli::execute(&reg, args(&["snap-list", "0", "--json"]), &mut out, &mut err, false), 0);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v[0]["id"], 1);
    err.clear();
    assert_eq!(cli::execute(&reg, args(&["delete", "nope"]), &mut out, &mut err, false), 2);
    assert!(String::from_utf8_lossy(&err).starts_with("vdi: error: no VDI named 'nope'"));
    out.clear();
    assert_eq!(cli::execute(&reg, args(&["--help"]), &mut out, &mut err, false), 0);
    assert!(String::from_utf8_lossy(&out).contains("Usage: vdi"));
    assert_eq!(cli::execute(&reg, args(&["bogus"]), &mut out, &mut err, false), 2);
}

/// `vdi stats --watch` runs in the daemon until the client goes; a daemon that stops ends it at
/// once rather than waiting out the interval (the control server waits for its commands).
#[test]
fn a_watch_through_the_daemon_ends_when_the_daemon_stops() {
    use std::io::BufRead;
    let env = Env::new();
    env.ok(&["create", "golden", "--size", "1M"]);
    let daemon = Daemon::start(&env);
    let mut child = env
        .cmd(&["stats", "--watch", "600"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its first line (this test's daemon has no reclaimer, so the note that counters are not
    // kept) says the command is running in the daemon.
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("note"), "{line}");
    let t = std::time::Instant::now();
    daemon.stop();
    assert!(t.elapsed() < std::time::Duration::from_secs(10), "the daemon waited {:?} for the watch", t.elapsed());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
