//! Publishing the catalog of a store in RADOS: what this host serves, for `vdi` on every other
//! host (`rados::catalog` has the object and its format).
//!
//! A thread waits for a change — a registry operation, a client attaching or detaching — then
//! for [`COALESCE`] more (or the stop), so a burst of changes (snapshots every 10 ms, a boot
//! storm of clones) is published once, and replaces the object if what it would say changed.
//! Nothing wakes it on a timer, except to try again after a failed publication.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use rados::catalog::{Catalog, CatalogClient, CatalogVdi};
use shutdown::Shutdown;
use vdi::Registry;

/// How long changes are gathered before one publication.
pub const COALESCE: Duration = Duration::from_secs(1);

/// A counter of changes that a thread can wait on; closed when the daemon stops.
#[derive(Default)]
pub struct Changes {
    state: Mutex<(u64, bool)>,
    changed: Condvar,
}

impl Changes {
    /// Records a change and wakes the waiter.
    pub fn bump(&self) {
        let mut s = self.state.lock();
        s.0 += 1;
        self.changed.notify_all();
    }

    /// Ends every wait, now and later.
    pub fn close(&self) {
        let mut s = self.state.lock();
        s.1 = true;
        self.changed.notify_all();
    }

    /// Waits until the count passes `seen`: the new count, or `None` if it is closed first.
    pub fn wait_past(&self, seen: u64) -> Option<u64> {
        let mut s = self.state.lock();
        loop {
            if s.0 > seen {
                return Some(s.0);
            }
            if s.1 {
                return None;
            }
            self.changed.wait(&mut s);
        }
    }
}

/// The catalog `reg` calls for now, written by `host` through RADOS client `writer`. The
/// publication time is left 0: two catalogs are compared without it.
pub fn build(reg: &Registry, host: &str, writer: &str) -> Catalog {
    let vdis = reg
        .list()
        .into_iter()
        .map(|v| CatalogVdi {
            id: v.id.0,
            name: v.name,
            size: v.size,
            snapshots: v.snapshots as u64,
            parent: v.parent.map(|p| p.0),
            created_ns: v.created_ns,
        })
        .collect();
    let mut clients: Vec<CatalogClient> = reg
        .handle_io()
        .into_iter()
        // Handles that `vdi` commands open through the control socket are not clients: they
        // keep the name every handle starts with, and come and go without a change being told.
        .filter(|h| !h.client.is_empty() && h.client != vdi::UNNAMED_CLIENT)
        .map(|h| CatalogClient { vdi: h.vdi.0, writable: h.writable, opened_unix: h.opened_unix, client: h.client })
        .collect();
    clients.sort_by(|a, b| (a.vdi, a.opened_unix, &a.client).cmp(&(b.vdi, b.opened_unix, &b.client)));
    Catalog { host: host.to_string(), writer: writer.to_string(), published_ms: 0, vdis, clients }
}

/// The RADOS client name (`client.N`) the lease holder's lock shows, for [`Catalog::writer`].
pub fn writer_of(pool: &rados::Pool) -> String {
    format!("client.{}", pool.cluster().instance_id())
}

/// Publishes once, now (at a clean stop: the clients are gone).
pub fn publish_now(pool: &rados::Pool, reg: &Registry, host: &str) {
    let c = Catalog { published_ms: now_ms(), ..build(reg, host, &writer_of(pool)) };
    if let Err(e) = c.publish(pool) {
        tracing::warn!("could not publish the store's last catalog: {e}");
    }
}

/// After a failed publication, how long until the next try when nothing else changes.
const RETRY: Duration = Duration::from_secs(5);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Publishes the catalog at once, then after every change until `changes` is closed or `stop`
/// raised. A failed publication is logged once and tried again every few seconds. The thread
/// returns true if its last publication failed (then a last one at the stop is not tried).
pub fn spawn(
    pool: Arc<rados::Pool>,
    reg: Arc<Registry>,
    host: String,
    changes: Arc<Changes>,
    stop: Shutdown,
) -> std::io::Result<JoinHandle<bool>> {
    std::thread::Builder::new().name("catalog".into()).spawn(move || {
        let mut last: Option<Catalog> = None;
        let mut seen = 0;
        let writer = writer_of(&pool);
        // Said once per run of failures (a fenced host fails every time), not at every change.
        let mut failing = false;
        loop {
            let now = build(&reg, &host, &writer);
            if last.as_ref() != Some(&now) {
                let stamped = Catalog { published_ms: now_ms(), ..now.clone() };
                match stamped.publish(&pool) {
                    Ok(()) => {
                        tracing::debug!(vdis = now.vdis.len(), clients = now.clients.len(), "published the catalog");
                        if failing {
                            tracing::info!("published the store's catalog again");
                        }
                        failing = false;
                        last = Some(now);
                    }
                    Err(e) => {
                        if failing {
                            tracing::debug!("could not publish the catalog: {e}");
                        } else {
                            tracing::warn!(
                                "could not publish the store's catalog for other hosts (trying again every {RETRY:?}): {e}"
                            );
                        }
                        failing = true;
                        // The write may have landed after all: never take it as published.
                        last = None;
                    }
                }
            }
            if failing {
                // A transient error must not leave the catalog stale until the next change.
                if stop.wait_timeout(RETRY) {
                    return failing;
                }
                continue;
            }
            match changes.wait_past(seen) {
                Some(n) => seen = n,
                None => return failing,
            }
            if stop.wait_timeout(COALESCE) {
                return failing;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_wakes_the_waiter_and_closing_ends_it() {
        let c = Arc::new(Changes::default());
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || (c.wait_past(0), c.wait_past(1)))
        };
        c.bump();
        // The second wait ends on close, not on a change.
        c.close();
        assert_eq!(waiter.join().unwrap(), (Some(1), None));
        assert_eq!(c.wait_past(1), None, "closed stays closed");
    }
}
