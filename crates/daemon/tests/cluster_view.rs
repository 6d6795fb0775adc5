//! `vdi list` and `vdi cluster` on a host that does not serve the store: while parallaxd on
//! host A holds a store in RADOS, `vdi` on host B (no control socket to reach) lists what A's
//! catalog says — its VDIs and the clients A serves each to — and names A from the lease; once
//! A stops, B opens the store itself. Needs the Ceph cluster `cargo xtask test` starts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `vdi` as another host would run it: its own run directory (so no daemon's control socket).
fn vdi_on_host_b(store: &Path, conf: &Path, run_dir: &Path, args: &[&str]) -> (i32, String) {
    let bin = Path::new(env!("CARGO_BIN_EXE_parallaxd")).with_file_name("vdi");
    let out = Command::new(bin)
        .arg("--store")
        .arg(store)
        .args(["--host", "host-b", "--ceph-conf"])
        .arg(conf)
        .args(args)
        .env("PARALLAX_RUN_DIR", run_dir)
        .output()
        .expect("run vdi");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Runs `vdi list` on host B until `done` holds for its output (the catalog is published a
/// moment after a change), failing with the last output after 20 s.
fn list_until(store: &Path, conf: &Path, run_dir: &Path, args: &[&str], done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, text) = vdi_on_host_b(store, conf, run_dir, args);
        if code == 0 && done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "host B's `vdi {args:?}` never showed what was expected:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An NBD client that stays connected until dropped.
struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[test]
fn another_host_lists_the_vdis_and_clients_of_the_host_serving_the_store() {
    need("nbdsh");
    let Some(cluster) = cephtest::cluster("another_host_lists_the_vdis_and_clients_of_the_host_serving_the_store")
    else {
        return;
    };
    let conf: PathBuf = cluster.ceph.conf.clone().expect("the test cluster's ceph.conf");
    let store = PathBuf::from(format!("rados:{}/{}", cephtest::POOL, cluster.fresh_namespace("view")));
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let conf_s = conf.to_str().unwrap();
    let d = Daemon::start(dir, store.clone(), &["--host", "host-a", "--ceph-conf", conf_s]);
    for args in [["create", "golden", "--size", "16M"], ["create", "vm1", "--size", "16M"]] {
        let (code, _, err) = d.vdi(&[&["--ceph-conf", conf_s][..], &args[..]].concat());
        assert_eq!(code, 0, "{args:?}: {err}");
    }
    // Published before any client attached...
    let text = list_until(&store, &conf, elsewhere.path(), &["list"], |t| t.contains(" vm1 "));
    assert!(!text.contains("(rw)"), "{text}");
    // No publication is pending any more (they follow a change within a second)...
    std::thread::sleep(Duration::from_millis(2500));
    let (_, text) = vdi_on_host_b(&store, &conf, elsewhere.path(), &["list"]);
    assert!(text.contains(" vm1 ") && !text.contains("(rw)"), "{text}");
    // ...and the attach itself publishes again.
    let client = Client(
        Command::new("nbdsh")
            .args(["-u", &d.uri("vm1"), "-c", "import sys; sys.stdin.read()"])
            // Debian's python has the nbd module, not one found first on PATH.
            .env("PATH", format!("/usr/bin:/usr/sbin:{}", std::env::var("PATH").unwrap_or_default()))
            .stdin(Stdio::piped())
            .spawn()
            .expect("nbdsh"),
    );

    let text = list_until(&store, &conf, elsewhere.path(), &["list"], |t| t.contains("(rw)"));
    assert!(text.contains("is served by host host-a"), "{text}");
    let vm1 = text.lines().find(|l| l.contains(" vm1 ")).unwrap_or_else(|| panic!("no vm1 row:\n{text}"));
    assert!(vm1.contains("tcp:127.0.0.1:") && vm1.contains("(rw)"), "vm1 is served to the NBD client: {text}");
    let golden = text.lines().find(|l| l.contains(" golden ")).unwrap_or_else(|| panic!("no golden row:\n{text}"));
    assert!(golden.trim_end().ends_with('-'), "golden has no client: {text}");

    let (code, json) = vdi_on_host_b(&store, &conf, elsewhere.path(), &["list", "--json"]);
    assert_eq!(code, 0, "{json}");
    let j: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(j["served_by"], "host-a", "{json}");
    assert_eq!(j["published_by"], "host-a", "{json}");
    let vdis = j["vdis"].as_array().expect("vdis");
    let names: Vec<&str> = vdis.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["golden", "vm1"], "{json}");
    assert_eq!(vdis[1]["clients"][0]["writable"], true, "{json}");
    assert_eq!(vdis[1]["size"], 16 << 20, "{json}");

    // `vdi cluster` shows every store of the pool; this one as host A serves it.
    let pool_store = PathBuf::from(format!("rados:{}", cephtest::POOL));
    let ours = |json: &str| -> serde_json::Value {
        let all: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
        let want = store.to_str().unwrap();
        all.as_array().and_then(|a| a.iter().find(|v| v["store"] == want).cloned()).unwrap_or_else(|| {
            panic!("`vdi cluster` does not list {want}: {json}");
        })
    };
    let (_, json) = vdi_on_host_b(&pool_store, &conf, elsewhere.path(), &["cluster", "--json"]);
    let v = ours(&json);
    assert_eq!((&v["served_by"], &v["current"]), (&"host-a".into(), &true.into()), "{v}");
    assert_eq!(v["vdis"][1]["clients"][0]["writable"], true, "{v}");

    // The client goes, a VDI is renamed: the catalog follows each.
    drop(client);
    list_until(&store, &conf, elsewhere.path(), &["list"], |t| t.contains(" vm1 ") && !t.contains("(rw)"));
    let (code, _, err) = d.vdi(&["--ceph-conf", conf_s, "rename", "golden", "base"]);
    assert_eq!(code, 0, "{err}");
    let text = list_until(&store, &conf, elsewhere.path(), &["list"], |t| t.contains(" base ") && !t.contains("(rw)"));
    assert!(!text.contains("golden"), "{text}");

    // Stopped, the store is nobody's: host B opens it and lists it itself.
    let (code, _, _) = d.stop();
    assert_eq!(code, 0);
    let (code, text) = vdi_on_host_b(&store, &conf, elsewhere.path(), &["list"]);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("served by") && text.contains("base") && text.contains("vm1"), "{text}");
    let (_, json) = vdi_on_host_b(&pool_store, &conf, elsewhere.path(), &["cluster", "--json"]);
    let v = ours(&json);
    assert!(v["served_by"].is_null() && v["error"].is_null() && v["current"] == false, "{v}");
    let names: Vec<&str> = v["vdis"].as_array().unwrap().iter().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(names, ["base", "vm1"], "the catalog host-a published as it stopped: {v}");
    let (code, text) = vdi_on_host_b(&pool_store, &conf, elsewhere.path(), &["cluster"]);
    assert!(text.contains(&format!("{} is served by no host; the last catalog", store.display())), "{code}: {text}");
    // The listing ends with the pool's room, once the manager has the pool's figures (a
    // warning until then: a cluster started moments ago may not have them yet).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let shows_room = |text: &str| {
        let room = text.lines().find(|l| l.starts_with(&format!("pool {}: ", cephtest::POOL)));
        room.is_some_and(|l| l.contains(" used") && l.ends_with(" available"))
    };
    let mut text = text;
    while !shows_room(&text) {
        assert!(std::time::Instant::now() < deadline, "`vdi cluster` never showed the pool's room: {text}");
        std::thread::sleep(Duration::from_secs(1));
        text = vdi_on_host_b(&pool_store, &conf, elsewhere.path(), &["cluster"]).1;
    }
}
