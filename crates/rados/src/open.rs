//! Opening a block store that lives in a RADOS pool: `rados:POOL[/NAMESPACE]`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use blockstore::{BlockStore, CreateOptions, OpenOptions, StoreError};

use crate::backend::RadosBackend;
use crate::client::{CephOptions, Cluster, LockMode, Pool};
use crate::error::{RadosError, Result};
use crate::lease::{DEFAULT_LEASE, Lease};

/// Where in the cluster a store is: a pool, and a namespace in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RadosLocation {
    /// The pool.
    pub pool: String,
    /// The namespace (the pool's default one when `None`).
    pub namespace: Option<String>,
}

impl RadosLocation {
    /// The prefix that marks a store location as RADOS.
    pub const PREFIX: &'static str = "rados:";

    /// True if the store path given (`--store`) names a store in RADOS, well-formed or not.
    pub fn names(store: &std::path::Path) -> bool {
        store.as_os_str().as_encoded_bytes().starts_with(Self::PREFIX.as_bytes())
    }

    /// Parses `rados:POOL` or `rados:POOL/NAMESPACE`; `None` if `s` is not a RADOS location.
    pub fn parse(s: &str) -> Option<Result<RadosLocation>> {
        let rest = s.strip_prefix(Self::PREFIX)?;
        let (pool, namespace) = match rest.split_once('/') {
            Some((p, ns)) => (p, Some(ns)),
            None => (rest, None),
        };
        let bad = |p: &str| p.is_empty() || p.contains(['/', '\0']);
        if bad(pool) || namespace.is_some_and(bad) {
            return Some(Err(RadosError::BadLocation(s.to_string())));
        }
        Some(Ok(RadosLocation { pool: pool.to_string(), namespace: namespace.map(str::to_string) }))
    }
}

impl fmt::Display for RadosLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "rados:{}/{ns}", self.pool),
            None => write!(f, "rados:{}", self.pool),
        }
    }
}

/// Everything needed to reach a RADOS store besides its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RadosOptions {
    /// The cluster and the client identity.
    pub ceph: CephOptions,
    /// This host's name, recorded in its lease (`--host`).
    pub host: String,
    /// How long a lease lasts unrenewed: how soon another host may take over from a dead one.
    pub lease: Duration,
}

impl Default for RadosOptions {
    fn default() -> Self {
        RadosOptions { ceph: CephOptions::default(), host: local_host_name(), lease: DEFAULT_LEASE }
    }
}

/// The name of a store's control socket key: a `rados:` store is told apart by its cluster and
/// identity too (two clusters may both have the pool), any other store is its path.
pub fn control_key(store: &std::path::Path, ceph: &crate::client::CephOptions) -> std::path::PathBuf {
    if RadosLocation::names(store) {
        format!("{}@{}", store.display(), ceph.identity()).into()
    } else {
        store.to_path_buf()
    }
}

/// The machine's host name, the default `--host`.
pub fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn store_error(loc: &RadosLocation, e: RadosError) -> StoreError {
    match e {
        RadosError::Locked { holder } => {
            StoreError::Locked { path: loc.to_string(), detail: format!("held by {holder}") }
        }
        // Not `into_io`: only "no store there" may look like NotFound to the caller, not a
        // missing pool or ceph.conf.
        e => StoreError::io(format!("opening {loc}"), std::io::Error::other(e)),
    }
}

/// A store's medium in RADOS with the lease that lets this process use it.
pub struct RadosMedium {
    /// The medium.
    pub backend: Arc<RadosBackend>,
    /// The lease: keep it as long as the store is open ([`BlockStore::hold`]).
    pub lease: Lease,
    /// True if the medium was made by this call: the store still has to be created on it, and
    /// the medium then sealed ([`RadosBackend::seal`]).
    pub created: bool,
}

/// Takes the lease of the store at `loc` (exclusive to write, shared to read) and opens its
/// medium, making an empty one if there is none and `create` is set (writers only). With
/// `wait`, a lease another client holds is waited for ([`crate::lease::acquire_waiting`]),
/// saying so once in the log; without, it fails with [`StoreError::Locked`].
pub fn open_medium(
    loc: &RadosLocation,
    ropts: &RadosOptions,
    read_only: bool,
    create: bool,
    wait: bool,
) -> blockstore::Result<RadosMedium> {
    let cluster = Cluster::connect(&ropts.ceph).map_err(|e| store_error(loc, e))?;
    let pool = Arc::new(cluster.pool(&loc.pool, loc.namespace.as_deref()).map_err(|e| store_error(loc, e))?);
    let mode = if read_only { LockMode::Shared } else { LockMode::Exclusive };
    let lease = if wait {
        let mut said = false;
        let mut waiting = |holder: &str| {
            if !std::mem::replace(&mut said, true) {
                tracing::info!("waiting for {loc}: held by {holder}");
            }
        };
        crate::lease::acquire_waiting(pool.clone(), &ropts.host, mode, ropts.lease, &mut waiting)
    } else {
        Lease::acquire(pool.clone(), &ropts.host, mode, ropts.lease)
    }
    .map_err(|e| store_error(loc, e))?;
    let clock = lease.clock();
    let (backend, created) =
        match RadosBackend::open(pool.clone(), clock.clone(), !read_only).map_err(|e| store_error(loc, e))? {
            Some(b) => (b, false),
            None if create && !read_only => (RadosBackend::create(pool, clock).map_err(|e| store_error(loc, e))?, true),
            None => {
                return Err(StoreError::io(
                    format!("opening {loc}"),
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no store there"),
                ));
            }
        };
    Ok(RadosMedium { backend: Arc::new(backend), lease, created })
}

/// Opens the store at `loc` as a file store opens: holding its lease (exclusive to write,
/// shared to read), creating it with `create` when there is none. Returns the store and
/// whether it was created.
pub fn open_store(
    loc: &RadosLocation,
    ropts: &RadosOptions,
    opts: &OpenOptions,
    create: Option<&CreateOptions>,
) -> blockstore::Result<(BlockStore, bool)> {
    open_store_in_pool(loc, ropts, opts, create).map(|(store, created, _)| (store, created))
}

/// [`open_store`], also returning the pool handle the store uses: what the holder writes
/// beside the store (its [`crate::catalog::Catalog`]) goes through the same RADOS client, so
/// fencing that client stops those writes too.
pub fn open_store_in_pool(
    loc: &RadosLocation,
    ropts: &RadosOptions,
    opts: &OpenOptions,
    create: Option<&CreateOptions>,
) -> blockstore::Result<(BlockStore, bool, Arc<Pool>)> {
    let m = open_medium(loc, ropts, opts.read_only, create.is_some(), opts.wait_for_lock)?;
    let pool = m.backend.pool().clone();
    let mut store = match create.filter(|_| m.created) {
        Some(c) => {
            let store = BlockStore::create(m.backend.clone(), c, opts)?;
            m.backend.seal().map_err(|e| store_error(loc, e))?;
            store
        }
        None => {
            let store = BlockStore::open(m.backend.clone(), opts)?;
            if !opts.read_only {
                reserve_journal(loc, &m.backend, &store);
            }
            store
        }
    };
    store.hold(Box::new(m.lease));
    if !opts.read_only {
        // The directory only helps `vdi cluster` find the store: failing to record it there
        // must not keep the store from being served.
        if let Err(e) = crate::catalog::register(pool.cluster(), loc) {
            // Info, not a warning: a client allowed only its own namespace cannot write the
            // directory, and says so at every open otherwise.
            tracing::info!(
                "could not record {loc} in the pool's directory of stores (vdi cluster will not list it): {e}"
            );
        }
    }
    Ok((store, m.created, pool))
}

/// Reserves the superblocks and journal of a store made before [`RadosBackend`] reserved
/// space, whose journal objects may still be short: a commit writing there on a full pool
/// would fail. Only a warning if it cannot be done now (the pool is full): the store is
/// served as before, and the journal's objects reach their length as it wraps.
fn reserve_journal(loc: &RadosLocation, backend: &RadosBackend, store: &BlockStore) {
    let fixed = store.lock().superblock().groups_start * blockstore::BLOCK_SIZE as u64;
    if let Err(e) = blockstore::Backend::reserve(backend, 0, fixed) {
        tracing::warn!("{loc}: could not reserve the journal's space ({e}); a commit may fail while the pool is full");
    }
}

/// What any host can see of a store without opening it or taking any lock.
#[derive(Debug)]
pub struct StoreStatus {
    /// False if the pool holds no store there (a directory entry can outlive its store).
    pub exists: bool,
    /// The writer holding the store's lease now, if one does.
    pub writer: Option<crate::client::Locker>,
    /// The catalog last published: `None` if none ever was; why it cannot be read, if it
    /// cannot. It is the current holder's if its [`crate::catalog::Catalog::writer`] is
    /// [`StoreStatus::writer`]'s client.
    pub catalog: std::result::Result<Option<crate::catalog::Catalog>, String>,
}

/// The status of the store at `loc` through `cluster`.
pub fn store_status(cluster: &Arc<Cluster>, loc: &RadosLocation) -> Result<StoreStatus> {
    let pool = cluster.pool(&loc.pool, loc.namespace.as_deref())?;
    let exists = crate::backend::is_store(&pool)?;
    let (exclusive, holders) = pool.lock_holders(crate::backend::HEADER_OBJECT, crate::lease::LEASE_LOCK)?;
    let writer = holders.into_iter().next().filter(|_| exclusive);
    let catalog = crate::catalog::Catalog::read(&pool).map_err(|e| e.to_string());
    Ok(StoreStatus { exists, writer, catalog })
}

/// If a writer holds the lease of the store at `loc`, the store's status; `None` if no writer
/// holds it (the store can be opened). Takes no lock.
pub fn served_elsewhere(loc: &RadosLocation, ropts: &RadosOptions) -> Result<Option<StoreStatus>> {
    let cluster = Cluster::connect(&ropts.ceph)?;
    let status = store_status(&cluster, loc)?;
    Ok(status.writer.is_some().then_some(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        let l = RadosLocation::parse("rados:vms").unwrap().unwrap();
        assert_eq!((l.pool.as_str(), l.namespace.as_deref()), ("vms", None));
        assert_eq!(l.to_string(), "rados:vms");
        let l = RadosLocation::parse("rados:vms/rack1").unwrap().unwrap();
        assert_eq!((l.pool.as_str(), l.namespace.as_deref()), ("vms", Some("rack1")));
        assert_eq!(l.to_string(), "rados:vms/rack1");
        assert!(RadosLocation::parse("/var/lib/parallax/store.dat").is_none());
        for bad in ["rados:", "rados:/ns", "rados:p/", "rados:p/a/b"] {
            assert!(matches!(RadosLocation::parse(bad), Some(Err(RadosError::BadLocation(_)))), "{bad}");
        }
    }
}
