//! Opening the store for the `vdi` binary: shared for reading, exclusive for writing, created
//! on first use by the commands that make things, waiting for the lock with `--wait`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use blockstore::{BlockStore, CreateOptions, OpenOptions, StoreError};
use vdi::Registry;

use crate::args::{Command, InitArgs};
use crate::error::Failure;

/// An open store, and whether this run created it.
pub struct Opened {
    /// The registry on the store.
    pub reg: Arc<Registry>,
    /// True if the store file did not exist (or was empty) before.
    pub created: bool,
    /// True if the store was created in an existing empty file.
    pub was_empty_file: bool,
}

/// Journal slot size for a new store: the default, but at most 1/32 of a size limit (not less
/// than 1 MiB), so that small stores are mostly data.
fn create_options(init: Option<&InitArgs>) -> Result<CreateOptions, Failure> {
    let bs = blockstore::BLOCK_SIZE as u64;
    let mut c = CreateOptions::default();
    let Some(init) = init else { return Ok(c) };
    if let Some(max) = init.max_size {
        c.max_blocks = max / bs;
        c.journal_slot_blocks = (c.max_blocks / 32).clamp(256, c.journal_slot_blocks);
    }
    if let Some(j) = init.journal {
        c.journal_slot_blocks = j / bs;
        if !(16..=(1 << 24)).contains(&c.journal_slot_blocks) {
            return Err(Failure::user("--journal must be between 64K and 64G"));
        }
    }
    Ok(c)
}

/// Opens the store at `path` as `command` needs it. Recovery warnings go to `err`.
pub fn open(path: &Path, command: &Command, wait: bool, err: &mut dyn Write) -> Result<Opened, Failure> {
    open_with(path, command, wait, &rados::RadosOptions::default(), err)
}

/// [`open`], reaching a `rados:` store with `ceph`.
pub fn open_with(
    path: &Path,
    command: &Command,
    wait: bool,
    ceph: &rados::RadosOptions,
    err: &mut dyn Write,
) -> Result<Opened, Failure> {
    if let Some(loc) = path.to_str().and_then(rados::RadosLocation::parse) {
        let loc = loc.map_err(|e| Failure::user(e.to_string()))?;
        return open_rados(&loc, command, wait, ceph, err);
    }
    let shown = path.display();
    let meta = std::fs::metadata(path).ok();
    // An empty file, or a block device whose superblock area is zeros, may be made a store.
    let empty = meta.is_some() && blockstore::is_blank(path);
    let exists = meta.is_some() && !empty;
    let init = match command {
        Command::Init(a) => Some(a),
        _ => None,
    };
    if init.is_some() && exists {
        return Err(Failure::user(format!(
            "{shown} already exists; `vdi init` only creates new stores (remove the file first, or choose another path)"
        )));
    }
    if !exists && !command.creates_store() {
        return Err(Failure::user(format!(
            "no store at {shown}: `vdi create NAME` makes one there, or point --store (or PARALLAX_STORE) at an \
             existing store"
        )));
    }
    let create = if exists { None } else { Some(create_options(init)?) };
    let mut opts = OpenOptions { read_only: !command.writes(), wait_for_lock: false, ..OpenOptions::default() };
    let store = match BlockStore::open_path(path, &opts, create.as_ref()) {
        // A daemon holds its store until it stops: waiting would never end, and the command
        // should have gone through it. Say why it did not.
        Err(StoreError::Locked { .. }) if let Some(d) = daemon_holding(path) => {
            return Err(Failure::user(format!(
                "parallaxd (pid {}, running as uid {}) serves {shown}, but its control socket is not \
                 reachable from here ({}): run vdi as uid {} or as root, or set PARALLAX_RUN_DIR to the \
                 daemon's run directory",
                d.pid,
                d.uid,
                crate::control::control_socket_path(path).display(),
                d.uid
            )));
        }
        Err(StoreError::Locked { .. }) if wait => {
            let _ = writeln!(err, "vdi: waiting for {shown}: another process is using it");
            opts.wait_for_lock = true;
            BlockStore::open_path(path, &opts, create.as_ref())
        }
        other => other,
    };
    let store = match store {
        Ok(s) => s,
        Err(e) => {
            if !exists && !matches!(e, StoreError::Locked { .. }) {
                remove_new_store(path, empty);
            }
            if create.is_some() && matches!(e, StoreError::NoSpace { .. }) {
                return Err(Failure::user(format!(
                    "cannot create the store {shown}: {e}; choose a larger --max-size (or a smaller --journal)"
                )));
            }
            return Err(Failure::from(e).context(format!("cannot open the store {shown}")));
        }
    };
    for w in &store.recovery().warnings {
        let _ = writeln!(err, "vdi: warning: {shown}: {w}");
    }
    let reg = Registry::open(Arc::new(store))
        .map_err(|e| Failure::from(e).context(format!("cannot read the VDIs of {shown}")))?;
    Ok(Opened { reg, created: !exists, was_empty_file: empty })
}

/// Opens a store in RADOS: shared for reading, exclusive for writing (the store's lease),
/// created on first use by the commands that make things; with `wait`, queued behind another
/// client holding the lease until it lets go (or its lease runs out).
fn open_rados(
    loc: &rados::RadosLocation,
    command: &Command,
    wait: bool,
    ceph: &rados::RadosOptions,
    err: &mut dyn Write,
) -> Result<Opened, Failure> {
    let init = match command {
        Command::Init(a) => Some(a),
        _ => None,
    };
    let create = if command.creates_store() || init.is_some() { Some(create_options(init)?) } else { None };
    let mut opts = OpenOptions { read_only: !command.writes(), wait_for_lock: false, ..OpenOptions::default() };
    let opened = match rados::open_store(loc, ceph, &opts, create.as_ref()) {
        Err(StoreError::Locked { detail, .. }) if wait => {
            // A daemon holds its store until it stops: waiting would not end (as for a file
            // store), and would take the store ahead of a daemon being started elsewhere.
            if let Some(host) = daemon_serving(loc, ceph) {
                return Err(Failure::user(format!(
                    "parallaxd on host {host} serves {loc} and holds it until it stops, so --wait would not \
                     end: run the command on that host, or stop that daemon (or `vdi --store {loc} takeover` \
                     if that host is gone)"
                )));
            }
            let _ = writeln!(err, "vdi: waiting for {loc}: in use, {detail}");
            opts.wait_for_lock = true;
            rados::open_store(loc, ceph, &opts, create.as_ref())
        }
        other => other,
    };
    let (store, created) = match opened {
        Ok(s) => s,
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound && create.is_none() => {
            return Err(Failure::user(format!("no store at {loc}: `vdi --store {loc} create NAME` makes one there")));
        }
        Err(StoreError::Locked { detail, .. }) => {
            return Err(Failure::user(format!(
                "the store {loc} is in use, {detail}; if that host is gone, `vdi --store {loc} takeover` fences \
                 it and frees the store at once (else it is free when that host's lease runs out; --wait queues \
                 behind it)"
            )));
        }
        Err(e) => return Err(Failure::from(e).context(format!("cannot open the store {loc}"))),
    };
    if init.is_some() && !created {
        return Err(Failure::user(format!("{loc} already holds a store; `vdi init` only creates new stores")));
    }
    for w in &store.recovery().warnings {
        let _ = writeln!(err, "vdi: warning: {loc}: {w}");
    }
    let reg = Registry::open(Arc::new(store))
        .map_err(|e| Failure::from(e).context(format!("cannot read the VDIs of {loc}")))?;
    Ok(Opened { reg, created, was_empty_file: false })
}

/// The host of the daemon serving the store at `loc`, if one does: the writer holding the
/// lease is the client that published the store's catalog (only parallaxd publishes one).
fn daemon_serving(loc: &rados::RadosLocation, ceph: &rados::RadosOptions) -> Option<String> {
    let status = rados::served_elsewhere(loc, ceph).ok()??;
    let writer = status.writer?;
    let catalog = status.catalog.ok()??;
    (catalog.writer == writer.client).then(|| writer.host().to_string())
}

/// `vdi cluster`: every store the directory of the RADOS pool at `path` records, as its lease
/// and its catalog show it (no store is opened, no lock taken).
pub fn list_cluster(
    path: &Path,
    ceph: &rados::RadosOptions,
    json: bool,
    exact: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Failure> {
    let pool_only = || Failure::user("`vdi cluster` lists the stores of a RADOS pool: --store rados:POOL");
    let loc = match path.to_str().and_then(rados::RadosLocation::parse) {
        Some(l) => l.map_err(|e| Failure::user(e.to_string()))?,
        None => return Err(pool_only()),
    };
    if let Some(ns) = &loc.namespace {
        return Err(Failure::user(format!(
            "`vdi cluster` lists every store of a pool, whatever its namespace: give --store rados:{} (without /{ns})",
            loc.pool
        )));
    }
    let fail = |what: &str, e: rados::RadosError| Failure::from(StoreError::io(what.to_string(), e.into_io()));
    let cluster = rados::Cluster::connect(&ceph.ceph).map_err(|e| fail("connecting to the cluster", e))?;
    let stores = rados::catalog::stores(&cluster, &loc.pool)
        .map_err(|e| fail(&format!("reading the directory of pool {}", loc.pool), e))?;
    if stores.is_empty() {
        let _ = writeln!(
            err,
            "vdi: pool {} records no stores (a store is recorded when parallaxd or a writing vdi opens it)",
            loc.pool
        );
    }
    // No store is opened, no lock taken: a daemon starting on one of them is never refused
    // because a listing was reading it.
    let views: Vec<_> = stores
        .iter()
        .map(|s| {
            let at = s.to_string();
            match rados::store_status(&cluster, s) {
                Ok(status) => crate::commands::show::store_view(&at, &status),
                Err(e) => crate::commands::show::view_failed(&at, e.to_string()),
            }
        })
        .collect();
    let code = crate::commands::show::list_stores(&views, json, exact, out, err)?;
    // The pool's room closes the text listing (`vdi info --json` has it for scripts); a pool
    // whose figures cannot be had is a warning, not a failed listing.
    if !json {
        static POOL_ROOM: crate::room::Asker<rados::PoolRoom> = crate::room::Asker::new();
        let room = cluster
            .pool(&loc.pool, None)
            .map_err(|e| e.to_string())
            .and_then(|pool| POOL_ROOM.ask(crate::room::WAIT, move || pool.room().map_err(|e| e.to_string())));
        match room {
            Ok(r) => {
                let line = crate::commands::show::room_text(
                    &format!("pool {}", loc.pool),
                    r.used,
                    r.quota,
                    r.available,
                    exact,
                );
                let _ = writeln!(out, "{line}");
            }
            Err(e) => {
                let _ = writeln!(err, "vdi: warning: pool {}: its room is unknown: {e}", loc.pool);
            }
        }
    }
    Ok(code)
}

/// `vdi takeover`: fences whoever holds the lease of the RADOS store at `path` and breaks it.
pub fn take_over(path: &Path, ceph: &rados::RadosOptions, out: &mut dyn Write) -> Result<i32, Failure> {
    let loc = match path.to_str().and_then(rados::RadosLocation::parse) {
        Some(l) => l.map_err(|e| Failure::user(e.to_string()))?,
        None => {
            return Err(Failure::user(format!(
                "{} is a file store: its lock goes with the process holding it; `vdi takeover` is for \
                 stores in RADOS (--store rados:POOL[/NAMESPACE])",
                path.display()
            )));
        }
    };
    let fail = |e: rados::RadosError| Failure::from(StoreError::io(format!("taking over {loc}"), e.into_io()));
    let cluster = rados::Cluster::connect(&ceph.ceph).map_err(fail)?;
    let pool = cluster.pool(&loc.pool, loc.namespace.as_deref()).map_err(fail)?;
    let fenced = rados::lease::take_over(&pool).map_err(fail)?;
    if fenced.is_empty() {
        let _ = writeln!(out, "nobody holds {loc}: nothing to take over");
    }
    for l in &fenced {
        let _ = writeln!(out, "fenced host {} ({} at {}) and broke its lease on {loc}", l.host(), l.client, l.address);
    }
    Ok(0)
}

/// Removes a store this run created, after the command that needed it failed: a failed first
/// `vdi create` leaves nothing behind. A file that existed empty is emptied again.
pub fn remove_new_store(path: &Path, was_empty_file: bool) {
    use std::os::unix::fs::{FileExt, FileTypeExt};
    if rados::RadosLocation::names(path) {
        return; // An empty store in RADOS is left: its objects are the pool's, not a file of ours.
    }
    let is_device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    if is_device {
        // Blank the superblock area again, as it was.
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
            let _ = f.write_all_at(&[0u8; 2 * blockstore::BLOCK_SIZE], 0).and_then(|_| f.sync_all());
        }
    } else if was_empty_file {
        let _ = std::fs::OpenOptions::new().write(true).truncate(true).open(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// The process holding a store's lock.
struct Holder {
    pid: u32,
    uid: u32,
}

/// The parallaxd process holding the lock on the store at `path`, found in /proc/locks (the
/// lock is a flock; the kernel lists its owner's pid with the file's device and inode).
fn daemon_holding(path: &Path) -> Option<Holder> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let dev = meta.dev();
    let want = format!("{:02x}:{:02x}:{}", rustix::fs::major(dev), rustix::fs::minor(dev), meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 24488 fe:00:10551476 0 EOF"
        if f.get(1) != Some(&"FLOCK") || f.get(5) != Some(&want.as_str()) {
            return None;
        }
        let pid: u32 = f.get(4)?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        if comm.trim() != "parallaxd" {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()?;
        Some(Holder { pid, uid })
    })
}
