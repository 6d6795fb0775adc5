//! `vdi` on a store in RADOS (`cargo xtask test` starts the cluster): created on first use,
//! refused with the holder named while another host writes it, and `vdi takeover`.

use std::process::{Command, Output};

/// `vdi --store STORE --host HOST --ceph-conf CONF ARGS` on the test cluster.
fn vdi_command(cluster: &cephtest::TestCluster, store: &str, host: &str, args: &[&str]) -> Command {
    let conf = cluster.ceph.conf.as_ref().expect("the test cluster's ceph.conf");
    let mut c = Command::new(env!("CARGO_BIN_EXE_vdi"));
    c.args(["--store", store, "--host", host, "--ceph-conf"])
        .arg(conf)
        .args(args)
        .env("PARALLAX_RUN_DIR", std::env::temp_dir().join("parallax-cli-rados-test"));
    c
}

fn vdi(cluster: &cephtest::TestCluster, store: &str, host: &str, args: &[&str]) -> Output {
    vdi_command(cluster, store, host, args).output().expect("running vdi")
}

/// A store in a fresh namespace named after `name`, holding one VDI made by host h1.
fn store_with_a_disk(cluster: &cephtest::TestCluster, name: &str) -> (String, rados::RadosLocation) {
    let store = format!("rados:{}/{}", cephtest::POOL, cluster.fresh_namespace(name));
    let o = vdi(cluster, &store, "h1", &["create", "disk", "--size", "8M"]);
    assert!(o.status.success(), "{}", text(&o));
    let loc = rados::RadosLocation::parse(&store).unwrap().unwrap();
    (store, loc)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn vdi_creates_uses_and_takes_over_a_rados_store() {
    let Some(cluster) = cephtest::cluster("vdi_creates_uses_and_takes_over_a_rados_store") else { return };
    let store = format!("rados:{}/{}", cephtest::POOL, cluster.fresh_namespace("cli"));
    let o = vdi(&cluster, &store, "h1", &["list"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no store at"), "{}", text(&o));
    let o = vdi(&cluster, &store, "h1", &["create", "disk", "--size", "8M"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = vdi(&cluster, &store, "h1", &["list"]);
    assert!(o.status.success() && text(&o).contains("disk"), "{}", text(&o));
    let o = vdi(&cluster, &store, "h1", &["takeover"]);
    assert!(o.status.success() && text(&o).contains("nothing to take over"), "{}", text(&o));

    // Another host holds the store: refused, with the holder named; takeover fences it.
    let loc = rados::RadosLocation::parse(&store).unwrap().unwrap();
    let (held, _) =
        rados::open_store(&loc, &cluster.options("h9"), &blockstore::OpenOptions::default(), None).expect("h9 opens");
    let o = vdi(&cluster, &store, "h1", &["create", "other", "--size", "8M"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("held by host h9") && text(&o).contains("takeover"), "{}", text(&o));
    // `list` is answered from the holder's catalog instead (parallaxd publishes one; this
    // holder has not yet).
    let o = vdi(&cluster, &store, "h1", &["list"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("served by host h9") && text(&o).contains("it has published no catalog yet"),
        "{}",
        text(&o)
    );
    let catalog = rados::catalog::Catalog {
        host: "h8".into(),
        writer: "client.1".into(),
        published_ms: 1,
        vdis: vec![rados::catalog::CatalogVdi {
            id: 1,
            name: "disk".into(),
            size: 8 << 20,
            snapshots: 3,
            parent: None,
            created_ns: 0,
        }],
        clients: vec![],
    };
    catalog.publish(&cluster.pool(loc.namespace.as_deref().unwrap())).expect("publish");
    let o = vdi(&cluster, &store, "h1", &["list"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("served by host h9") && t.contains("is an earlier holder's (host h8)"), "{t}");
    assert!(t.lines().any(|l| l.contains(" disk ") && l.contains(" 3 ")), "{t}");
    let o = vdi(&cluster, &store, "h1", &["takeover"]);
    assert!(o.status.success() && text(&o).contains("fenced host h9"), "{}", text(&o));
    let o = vdi(&cluster, &store, "h1", &["create", "other", "--size", "8M"]);
    assert!(o.status.success(), "after the takeover: {}", text(&o));
    drop(held);
    let o = vdi(&cluster, &store, "h1", &["check"]);
    assert!(o.status.success() && text(&o).contains("consistent"), "{}", text(&o));
}

#[test]
fn takeover_of_a_file_store_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.dat");
    let o = Command::new(env!("CARGO_BIN_EXE_vdi")).arg("--store").arg(&store).arg("takeover").output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("is a file store"), "{}", text(&o));
}

/// `vdi --wait` on a RADOS store queues behind the host holding it and runs once it lets go.
#[test]
fn vdi_wait_queues_behind_the_holder_of_a_rados_store() {
    use std::io::BufRead;
    let Some(cluster) = cephtest::cluster("vdi_wait_queues_behind_the_holder_of_a_rados_store") else { return };
    let (store, loc) = store_with_a_disk(&cluster, "cli-wait");
    let (held, _) =
        rados::open_store(&loc, &cluster.options("h9"), &blockstore::OpenOptions::default(), None).expect("h9 opens");
    let mut child = vdi_command(&cluster, &store, "h1", &["--wait", "create", "other", "--size", "8M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running vdi --wait");
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("vdi: waiting for") && line.contains("held by host h9"), "{line}");
    drop(held);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "vdi --wait after h9 let go: {}", text(&o));
    let o = vdi(&cluster, &store, "h1", &["list"]);
    assert!(o.status.success() && text(&o).contains("other"), "{}", text(&o));
}

/// `vdi --wait` behind a daemon (the lease holder published the store's catalog) fails at once:
/// the daemon holds the store until it stops.
#[test]
fn vdi_wait_behind_a_daemon_fails_at_once() {
    let Some(cluster) = cephtest::cluster("vdi_wait_behind_a_daemon_fails_at_once") else { return };
    let (store, loc) = store_with_a_disk(&cluster, "cli-wait-daemon");
    let (held, _, pool) =
        rados::open_store_in_pool(&loc, &cluster.options("h9"), &blockstore::OpenOptions::default(), None)
            .expect("h9 opens");
    let catalog = rados::catalog::Catalog {
        host: "h9".into(),
        writer: format!("client.{}", pool.cluster().instance_id()),
        published_ms: 1,
        vdis: vec![],
        clients: vec![],
    };
    catalog.publish(&pool).expect("publish");
    let o = vdi(&cluster, &store, "h1", &["--wait", "create", "other", "--size", "8M"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("parallaxd on host h9 serves"), "{}", text(&o));
    drop(held);
}

#[test]
fn info_shows_the_pools_quota_and_room() {
    let Some(cluster) = cephtest::cluster("info_shows_the_pools_quota_and_room") else { return };
    let pool = cluster.scratch_pool("room");
    // Well above what the store reserves (its journal alone is 64 MiB long), so the pool is
    // never marked full here.
    const QUOTA: u64 = 1 << 30;
    const JOURNAL: u64 = 2 * 8192 * 4096;
    pool.set_quota_bytes(QUOTA);
    let store = format!("rados:{}", pool.name);
    let o = vdi(&cluster, &store, "h1", &["create", "disk", "--size", "8M"]);
    assert!(o.status.success(), "{}", text(&o));
    let info = |store: &str| {
        let o = vdi(&cluster, store, "h1", &["info", "--json"]);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("JSON")
    };
    // The manager learns a new pool's usage from the OSDs' reports, seconds after the writes:
    // until then `medium_error` says why there are no figures (none for the pool yet, or the
    // manager still starting), then the store's reservations show.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let m = loop {
        let i = info(&store);
        if i["medium"]["used"].as_u64().is_some_and(|u| u >= JOURNAL) {
            break i["medium"].clone();
        }
        assert!(i["medium"].is_object() || i["medium_error"].is_string(), "neither figures nor a reason: {i}");
        assert!(std::time::Instant::now() < deadline, "the pool's usage never showed the journal: {i}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    // The quota counts objects' lengths: the journal, reserved by length and barely written,
    // counts whole (`ceph df`'s STORED, bytes written, would show a fraction of it).
    assert_eq!(m["name"], format!("pool {}", pool.name), "{m}");
    assert_eq!(m["limit"].as_u64(), Some(QUOTA), "{m}");
    let used = m["used"].as_u64().expect("used");
    assert_eq!(m["available"].as_u64(), Some(QUOTA - used), "the test OSD has more room than the quota: {m}");
    let o = vdi(&cluster, &store, "h1", &["info"]);
    let shown = format!("medium:      pool {}: ", pool.name);
    assert!(text(&o).contains(&shown) && text(&o).contains("of 1.0 GiB"), "{}", text(&o));

    // Without a quota the cluster's room is the limit; a namespace shares its pool's figures.
    pool.set_quota_bytes(0);
    let tenant = format!("{store}/tenant");
    let o = vdi(&cluster, &tenant, "h1", &["create", "disk", "--size", "8M"]);
    assert!(o.status.success(), "{}", text(&o));
    let i = info(&tenant);
    let m = &i["medium"];
    assert_eq!(m["name"], format!("pool {} (all its namespaces)", pool.name), "{i}");
    assert_eq!(m["limit"], serde_json::Value::Null, "{i}");
    assert!(m["available"].as_u64().is_some_and(|a| a > 0), "{i}");
    let o = vdi(&cluster, &tenant, "h1", &["info"]);
    assert!(text(&o).contains("no quota"), "{}", text(&o));
}
