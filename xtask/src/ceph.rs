//! A throwaway single-node Ceph cluster (one mon, optionally one mgr, one OSD) from Debian's
//! packages, for the RADOS tests and `cargo xtask cluster`. Its daemons run in the foreground as
//! our children and die with it. After ../shared/reference/ceph-single-node.sh.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::sys;

/// Each program the cluster needs, and its Debian package.
pub const TOOLS: &[(&str, &str)] = &[
    ("ceph-mon", "ceph-mon"),
    ("ceph-mgr", "ceph-mgr"),
    ("ceph-osd", "ceph-osd"),
    ("ceph", "ceph-common"),
    ("rados", "ceph-common"),
    ("ceph-authtool", "ceph-common"),
    ("monmaptool", "ceph-common"),
];

/// Where an OSD keeps objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectStore {
    /// In memory: starts fastest, for tests with small data.
    Memstore,
    /// On a sparse 20 GiB file, as production OSDs keep data: for figures.
    Bluestore,
}

/// A running cluster; dropping it stops its daemons and removes its directory.
pub struct Ceph {
    dir: PathBuf,
    /// Its ceph.conf (clients use the `client.admin` key it names).
    pub conf: PathBuf,
    daemons: Vec<(String, Child)>,
}

/// `program -c CONF`: a Ceph tool (ceph, rados, rbd, the daemons) on the cluster of `conf`.
pub fn ceph_cmd(conf: &Path, program: &str) -> Command {
    let mut c = Command::new(program);
    c.arg("-c").arg(conf);
    c
}

impl Ceph {
    /// Starts a cluster in `dir` (emptied first) with `store`, and `mgr` if asked. Returns once
    /// a RADOS write succeeds.
    pub fn start(dir: &Path, store: ObjectStore, mgr: bool) -> Result<Ceph> {
        for (tool, package) in TOOLS {
            sys::require(tool, package, "a throwaway Ceph cluster")?;
        }
        let t0 = Instant::now();
        let _ = std::fs::remove_dir_all(dir);
        for sub in ["mon", "osd", "mgr/ceph-x", "run", "log"] {
            std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.display()))?;
        }
        let (v2, v1) = (sys::free_port()?, sys::free_port()?);
        let fsid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")?.trim().to_string();
        let d = dir.display();
        let mon_addr = format!("[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]");
        let objectstore = match store {
            ObjectStore::Memstore => "memstore",
            ObjectStore::Bluestore => "bluestore",
        };
        let conf = dir.join("ceph.conf");
        std::fs::write(
            &conf,
            format!(
                "[global]
fsid = {fsid}
mon host = {mon_addr}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {d}/keyring
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
mon max pg per osd = 1000
[mon]
mon data = {d}/mon/$cluster-$id
[mgr]
mgr data = {d}/mgr/$cluster-$id
keyring = $mgr_data/keyring
[osd]
osd data = {d}/osd/$cluster-$id
keyring = $osd_data/keyring
osd objectstore = {objectstore}
memstore device bytes = 4294967296
bluestore block path = {d}/osd/block-$id
bluestore block create = true
bluestore block size = 21474836480
bluestore fsck on mkfs = false
osd memory target = 939524096
"
            ),
        )?;
        let keyring = dir.join("keyring");
        sys::run(Command::new("ceph-authtool").arg("--create-keyring").arg(&keyring).args([
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
        ]))?;
        sys::run(Command::new("ceph-authtool").arg(&keyring).args([
            "--gen-key",
            "-n",
            "client.admin",
            "--cap",
            "mon",
            "allow *",
            "--cap",
            "osd",
            "allow *",
            "--cap",
            "mgr",
            "allow *",
        ]))?;
        let monmap = dir.join("monmap");
        sys::run(
            Command::new("monmaptool").args(["--create", "--fsid", &fsid, "--addv", "a", &mon_addr]).arg(&monmap),
        )?;
        sys::run(
            ceph_cmd(&conf, "ceph-mon")
                .args(["--mkfs", "-i", "a", "--monmap"])
                .arg(&monmap)
                .arg("--keyring")
                .arg(&keyring),
        )?;
        let mut ceph = Ceph { dir: dir.to_path_buf(), conf: conf.clone(), daemons: Vec::new() };
        ceph.spawn("mon.a", ceph_cmd(&conf, "ceph-mon").args(["-f", "-i", "a"]))?;
        if mgr {
            sys::run(
                ceph_cmd(&conf, "ceph")
                    .args(["auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *", "-o"])
                    .arg(dir.join("mgr/ceph-x/keyring")),
            )?;
            ceph.spawn("mgr.x", ceph_cmd(&conf, "ceph-mgr").args(["-f", "-i", "x"]))?;
        }
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")?.trim().to_string();
        let id = sys::run_text(ceph_cmd(&conf, "ceph").args(["osd", "new", &uuid]))?.trim().to_string();
        std::fs::create_dir_all(dir.join(format!("osd/ceph-{id}")))?;
        sys::run(
            ceph_cmd(&conf, "ceph")
                .args([
                    "auth",
                    "get-or-create",
                    &format!("osd.{id}"),
                    "osd",
                    "allow *",
                    "mon",
                    "allow profile osd",
                    "mgr",
                    "allow profile osd",
                    "-o",
                ])
                .arg(dir.join(format!("osd/ceph-{id}/keyring"))),
        )?;
        sys::run(ceph_cmd(&conf, "ceph-osd").args(["-i", &id, "--mkfs", "--osd-uuid", &uuid]))?;
        ceph.spawn(&format!("osd.{id}"), ceph_cmd(&conf, "ceph-osd").args(["-f", "-i", &id]))?;
        // A pool write blocks until the OSD is up and the PGs are active: that is the wait.
        ceph.create_pool("parallax-probe")?;
        sys::run(Command::new("timeout").args(["60", "rados", "-c"]).arg(&conf).args([
            "-p",
            "parallax-probe",
            "put",
            "probe",
            "/etc/hostname",
        ]))
        .context("the cluster did not take a write within 60 s")?;
        eprintln!(
            "xtask: Ceph ({objectstore}) up in {:.1} s at {mon_addr}; CEPH_CONF={}",
            t0.elapsed().as_secs_f64(),
            conf.display()
        );
        Ok(ceph)
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting ceph {name}"))?;
        self.daemons.push((name.to_string(), child));
        Ok(())
    }

    /// A memstore cluster in a temp directory with the pool the RADOS tests use
    /// (`cephtest::POOL`), for `cargo test` runs: their env var `PARALLAX_TEST_CEPH_CONF` is
    /// this cluster's [`Ceph::conf`]. With a mgr: pool quotas, which a test fills, are
    /// enforced from the usage figures only a mgr passes to the monitors.
    pub fn for_tests() -> Result<Ceph> {
        let dir = std::env::temp_dir().join(format!("parallax-test-ceph-{}", std::process::id()));
        let ceph = Ceph::start(&dir, ObjectStore::Memstore, true)?;
        ceph.create_pool("parallax-test")?;
        Ok(ceph)
    }

    /// Creates the replicated pool `name` (size 1) for RADOS use.
    pub fn create_pool(&self, name: &str) -> Result<()> {
        sys::run(ceph_cmd(&self.conf, "ceph").args(["osd", "pool", "create", name, "8", "8"]))?;
        sys::run(ceph_cmd(&self.conf, "ceph").args(["osd", "pool", "application", "enable", name, "rados"]))?;
        Ok(())
    }

    /// Fails if a daemon has died (its log says why).
    pub fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.daemons {
            if let Some(st) = child.try_wait()? {
                bail!("ceph {name} exited ({st}); see {}/log/ceph-{name}.log", self.dir.display());
            }
        }
        Ok(())
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        // The OSD first, the mon last, each reaped before the next: ports and files are free
        // when this returns.
        for (_, child) in self.daemons.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
