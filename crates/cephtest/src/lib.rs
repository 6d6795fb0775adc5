//! Test support for the RADOS backend: the Ceph cluster the tests run against.
//!
//! `cargo xtask test` starts a throwaway single-node cluster, creates the pool [`POOL`] and sets
//! `PARALLAX_TEST_CEPH_CONF` for `cargo test`. Without a cluster a RADOS test fails, saying how
//! to get one — unless `PARALLAX_SKIP_CEPH=1`, when it prints `SKIPPED` and passes (never in CI).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rados::{CephOptions, Cluster, Pool, RadosLocation, RadosOptions};

/// The pool the tests use; `cargo xtask test` creates it.
pub const POOL: &str = "parallax-test";

/// The cluster named by `PARALLAX_TEST_CEPH_CONF`.
#[derive(Debug, Clone)]
pub struct TestCluster {
    /// How to reach it.
    pub ceph: CephOptions,
}

/// The test cluster. Without one: a panic saying how to get one, or with
/// `PARALLAX_SKIP_CEPH=1` a `SKIPPED` line and `None` (the caller returns). `test` names the
/// caller in the message.
pub fn cluster(test: &str) -> Option<TestCluster> {
    if let Some(conf) = std::env::var_os("PARALLAX_TEST_CEPH_CONF") {
        return Some(TestCluster { ceph: CephOptions { conf: Some(PathBuf::from(conf)), id: None } });
    }
    let how = format!(
        "{test} needs a Ceph cluster: `cargo xtask test` starts one, or set PARALLAX_TEST_CEPH_CONF to a \
         cluster's ceph.conf with a pool named {POOL}"
    );
    if std::env::var("PARALLAX_SKIP_CEPH").as_deref() == Ok("1") {
        eprintln!("SKIPPED (PARALLAX_SKIP_CEPH=1): {how}");
        return None;
    }
    panic!("{how}; or set PARALLAX_SKIP_CEPH=1 to skip the RADOS tests");
}

impl TestCluster {
    /// A namespace no other test (or run) uses: `name-PID-N`.
    pub fn fresh_namespace(&self, name: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("{name}-{}-{}-{nonce}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
    }

    /// A store location in a fresh namespace, and options with `host` and a short lease.
    pub fn fresh_store(&self, name: &str, host: &str) -> (RadosLocation, RadosOptions) {
        let loc = RadosLocation { pool: POOL.into(), namespace: Some(self.fresh_namespace(name)) };
        (loc, self.options(host))
    }

    /// Options for `host` on this cluster with a 6-second lease.
    pub fn options(&self, host: &str) -> RadosOptions {
        RadosOptions { ceph: self.ceph.clone(), host: host.into(), lease: Duration::from_secs(6) }
    }

    /// A new client connection to the pool, in `namespace`.
    pub fn pool(&self, namespace: &str) -> Arc<Pool> {
        let c = Cluster::connect(&self.ceph).expect("connecting to the test cluster");
        Arc::new(c.pool(POOL, Some(namespace)).expect("opening the test pool"))
    }
}

/// A pool of its own for one test, removed when dropped: for tests that change a pool-wide
/// setting (a quota) that would disturb tests sharing [`POOL`].
pub struct ScratchPool {
    /// The pool's name.
    pub name: String,
    conf: PathBuf,
}

impl TestCluster {
    /// Creates a pool named after `name` and this process, through the `ceph` tool.
    pub fn scratch_pool(&self, name: &str) -> ScratchPool {
        let conf = self.ceph.conf.clone().expect("the test cluster is named by its ceph.conf");
        let pool = ScratchPool { name: self.fresh_namespace(name), conf };
        pool.ceph(&["osd", "pool", "create", &pool.name, "8", "8"]);
        pool.ceph(&["osd", "pool", "application", "enable", &pool.name, "rados"]);
        pool
    }
}

impl ScratchPool {
    /// `ceph -c CONF ARGS` on the test cluster.
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("ceph");
        c.arg("-c").arg(&self.conf).args(args);
        c
    }

    /// Runs `ceph ARGS` on the test cluster; panics with its output if it fails.
    fn ceph(&self, args: &[&str]) {
        let out = self.command(args).output().unwrap_or_else(|e| panic!("running ceph {args:?}: {e}"));
        assert!(out.status.success(), "ceph {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Sets the pool's quota to `bytes` (0: none). The monitors mark the pool full some
    /// seconds after its usage passes the quota, as the OSD's statistics reach them.
    pub fn set_quota_bytes(&self, bytes: u64) {
        self.ceph(&["osd", "pool", "set-quota", &self.name, "max_bytes", &bytes.to_string()]);
    }
}

impl Drop for ScratchPool {
    fn drop(&mut self) {
        let n = &self.name;
        let _ = self.command(&["osd", "pool", "delete", n, n, "--yes-i-really-really-mean-it"]).output();
    }
}
