//! The daemon's life: open the store, serve, and shut down cleanly.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use blockstore::{BlockStore, CreateOptions, OpenOptions};
use nbd::Server;
use shutdown::Shutdown;
use vdi::Registry;

use crate::catalog::Changes;
use crate::config::Config;
use crate::exports::VdiExports;
use crate::listen::{BoundTcp, BoundUnix};
use crate::rings::RingService;

/// Hooks that let the daemon serve `vdi` commands on a control socket; supplied by `main`
/// so this crate does not depend on the command-line tool.
pub type ControlHook = Box<dyn FnOnce(Arc<Registry>, Shutdown) -> Result<Option<std::thread::JoinHandle<()>>>>;

/// Runs the daemon until `stop` is raised, then finishes in-flight requests, commits and returns.
///
/// A store this call created is removed again (an empty file it found is emptied again) if the
/// daemon fails before it is ready: a start that fails (a port in use, say) leaves nothing behind.
pub fn run(config: Config, stop: Shutdown, control: Option<ControlHook>) -> Result<()> {
    let in_rados = rados_location(&config)?.is_some();
    // A store in RADOS is never removed: its objects are the pool's.
    let before =
        if in_rados { Some(false) } else { std::fs::metadata(&config.store).ok().map(|m| m.is_file() && m.len() == 0) };
    let mut ready = false;
    let result = serve(&config, stop, control, &mut ready);
    if result.is_err() && !ready {
        match before {
            None => {
                if std::fs::remove_file(&config.store).is_ok() {
                    tracing::info!("removed the store {} this failed start created", config.store.display());
                }
            }
            Some(true) => {
                let _ = std::fs::OpenOptions::new().write(true).open(&config.store).and_then(|f| f.set_len(0));
            }
            Some(false) => {}
        }
    }
    result
}

/// The store's RADOS location, if `--store` names one.
fn rados_location(config: &Config) -> Result<Option<rados::RadosLocation>> {
    Ok(match config.store.to_str().and_then(rados::RadosLocation::parse) {
        Some(loc) => Some(loc?),
        None => None,
    })
}

fn serve(config: &Config, stop: Shutdown, control: Option<ControlHook>, ready: &mut bool) -> Result<()> {
    let opts = OpenOptions { read_only: false, cache_blocks: config.cache_blocks, wait_for_lock: false };
    let mut catalog_pool = None;
    let store = match rados_location(config)? {
        Some(loc) => {
            let (store, created, pool) =
                rados::open_store_in_pool(&loc, &config.rados, &opts, Some(&CreateOptions::default()))
                    .with_context(|| format!("opening the store {loc}"))?;
            catalog_pool = Some(pool);
            tracing::info!(
                "{} the store {loc} as host {} (lease {:?})",
                if created { "created" } else { "opened" },
                config.rados.host,
                config.rados.lease
            );
            store
        }
        None => BlockStore::open_path(&config.store, &opts, Some(&CreateOptions::default()))
            .with_context(|| format!("opening the store {}", config.store.display()))?,
    };
    for w in &store.recovery().warnings {
        tracing::warn!("{w}");
    }
    if let Some(g) = store.recovery().replayed {
        tracing::info!("replayed journal record {g} ({} blocks)", store.recovery().blocks_replayed);
    }
    let reg = Registry::open(Arc::new(store)).context("loading the VDI registry")?;
    // Deleted VDIs and snapshots are freed in bounded steps while the guests' I/O goes on;
    // a delete interrupted by a stop or a crash resumes here.
    let mut damaged = HashMap::new();
    for (id, e) in reg.damaged_vdis().context("walking the VDIs' trees")? {
        tracing::error!("VDI {id} is damaged and will not be served: {e}");
        damaged.insert(id, e);
    }
    let reclaimer = reg.start_reclaimer();
    // Commits a filling journal off the guests' write path (vdi's `committer`).
    let committer = reg.start_committer();
    // What changes the catalog other hosts read: registry operations, clients coming and going.
    let changes = Arc::new(Changes::default());
    {
        let changes = changes.clone();
        reg.on_change(Box::new(move || changes.bump()));
    }
    let provider = Arc::new(VdiExports::new(reg.clone(), damaged).with_changes(changes.clone()));
    let mut servers = Vec::new();
    if let Some(tls) = &config.nbd_limits.tls
        && (config.nbd.is_some() || config.nbd_socket.is_some())
        && tls.client_auth()
        && !tls.required()
    {
        tracing::warn!(
            "--tls-client-ca without --tls-required: clients that upgrade to TLS must show a certificate, \
             but clients that never ask for TLS are served in the clear without one; add --tls-required \
             to make certificates the only way in"
        );
    }
    // Bound now, listening last (see `listen`): a client that gets through finds everything up.
    let nbd_tcp = config
        .nbd
        .map(|addr| BoundTcp::bind(addr).with_context(|| format!("listening for NBD on {addr}")))
        .transpose()?;
    let nbd_unix = match &config.nbd_socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            Some((BoundUnix::bind(path).with_context(|| format!("listening for NBD on {}", path.display()))?, path))
        }
        None => None,
    };
    let mut vhost_servers = Vec::new();
    for (socket, export) in &config.vhost_user_blk {
        let opener = Arc::new(VhostExport {
            provider: provider.clone(),
            export: export.clone(),
            client: format!("vhost-user:{}", socket.display()),
        });
        let opts = vhostblk::ServerOptions {
            queues: config.vhost_user_queues,
            workers_per_queue: config.vhost_user_workers,
            serial: export.chars().take(20).collect(),
            ..vhostblk::ServerOptions::default()
        };
        let server = vhostblk::Server::spawn(socket, opener, opts, stop.clone())?;
        tracing::info!("serving {export} over vhost-user-blk on {}", socket.display());
        vhost_servers.push(server);
    }
    let rings = match &config.ring_socket {
        Some(path) => {
            let r = RingService::spawn(path, provider.clone(), config.ring_workers, stop.clone())?;
            tracing::info!("serving blkif rings on unix socket {}", path.display());
            Some(r)
        }
        None => None,
    };
    let xen_thread = if config.xen {
        Some(crate::xen::spawn(provider.clone(), config.ring_workers, config.xen_max_queues, stop.clone())?)
    } else {
        None
    };
    let control_thread = match control {
        Some(hook) => hook(reg.clone(), stop.clone())?,
        None => None,
    };
    let metrics_thread = match config.metrics {
        Some(addr) => Some(crate::metrics::spawn(addr, reg.clone(), stop.clone())?),
        None => None,
    };
    let catalog_thread = match catalog_pool.clone() {
        Some(pool) => {
            Some(crate::catalog::spawn(pool, reg.clone(), config.rados.host.clone(), changes.clone(), stop.clone())?)
        }
        None => None,
    };
    let schedule_thread = config.schedule.clone().map(|s| {
        tracing::info!("snapshots every {:?} (keep {:?}, keep for {:?})", s.every, s.keep, s.keep_for);
        let (reg, stop) = (reg.clone(), stop.clone());
        std::thread::spawn(move || crate::schedule::run(reg, s, stop))
    });
    // Both listen before either serves, the Unix socket first: a client that waits for the TCP
    // port finds the socket too, and a failed listen leaves no NBD server running.
    let nbd_unix = match nbd_unix {
        Some((bound, path)) => {
            Some((bound.listen().with_context(|| format!("listening for NBD on {}", path.display()))?, path))
        }
        None => None,
    };
    let nbd_tcp = nbd_tcp.map(BoundTcp::listen).transpose().context("listening for NBD")?;
    if let Some((l, path)) = nbd_unix {
        tracing::info!("serving NBD on unix socket {}", path.display());
        servers.push(Server::spawn_unix(l, provider.clone(), config.nbd_limits.clone())?);
    }
    if let Some(l) = nbd_tcp {
        tracing::info!("serving NBD on {}", l.local_addr()?);
        servers.push(Server::spawn_tcp(l, provider.clone(), config.nbd_limits.clone())?);
    }
    *ready = true;
    // Logged before it is told: whoever waits for READY=1 finds the line in the log.
    tracing::info!("parallaxd ready: {} VDIs in {}", reg.list().len(), config.store.display());
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    stop.wait();
    tracing::info!("stopping: finishing in-flight requests");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    for s in &servers {
        s.shutdown();
    }
    // A VMM still connected keeps its device until the process ends.
    for mut s in vhost_servers {
        s.shutdown();
    }
    for s in servers {
        s.wait();
    }
    if let Some(r) = rings {
        r.wait();
    }
    if let Some(t) = xen_thread {
        let _ = t.join();
    }
    if let Some(t) = schedule_thread {
        let _ = t.join();
    }
    if let Some(t) = metrics_thread {
        let _ = t.join();
    }
    if let Some(t) = control_thread {
        let _ = t.join();
    }
    if let Some(path) = &config.nbd_socket {
        let _ = std::fs::remove_file(path);
    }
    // Stopped first: what it freed but had not committed yet goes into the final commit.
    drop(reclaimer);
    drop(committer);
    // Ids reserved for scheduled snapshots and not used: the next start continues the sequence.
    if let Err(e) = reg.trim_snapshot_ids() {
        tracing::warn!("could not give back unused snapshot ids (the next ids skip them): {e}");
    }
    let info = reg.store().commit().context("final commit")?;
    // After the commit: a cluster too slow to take the catalog (each write may wait out the
    // operation timeout) must not keep the store's last changes from being durable.
    changes.close();
    let catalog_failing = catalog_thread.map(|t| t.join().unwrap_or(true));
    if let (Some(pool), Some(false)) = (&catalog_pool, catalog_failing) {
        // Every client has gone: the catalog the next reader sees says so.
        crate::catalog::publish_now(pool, &reg, &config.rados.host);
    }
    tracing::info!("committed generation {}; bye", info.generation);
    Ok(())
}

/// What a vhost-user-blk socket serves: opened through the same provider as NBD exports, so one
/// writer per VDI holds across every transport.
struct VhostExport {
    provider: Arc<VdiExports>,
    export: String,
    client: String,
}

impl vhostblk::OpenDevice for VhostExport {
    fn open(&self) -> std::result::Result<Arc<dyn blockdev::BlockDevice>, String> {
        use nbd::ExportProvider;
        self.provider.open_for(&self.export, &self.client).map_err(|e| e.to_string())
    }
}
