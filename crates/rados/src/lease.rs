//! The store's lease: which client may write it, for how long, and fencing the one before.
//!
//! A writer holds the exclusive RADOS lock [`LEASE_LOCK`] on the header object for a
//! duration and renews it at a third of that. The lock alone is not enough: a writer that stalls
//! (SIGSTOP, a long pause, a network partition) past its duration may wake and write after
//! another host took over. So each writer records its address on the header, in an extended
//! attribute of its own ([`OWNER_PREFIX`] + its client id), and whoever takes the lease next
//! **blocklists** every address recorded there but its own before writing anything: the OSDs
//! then refuse those writers' operations. One attribute per writer, never rewritten by another:
//! a writer that stalled between taking the lock and recording itself, and records itself late
//! over a newer writer, cannot erase that writer's record — both are fenced next time. A writer also stops by itself
//! when its lease runs out unrenewed ([`LeaseClock`]), but safety rests on the blocklist, not on
//! clocks. Readers hold the same lock shared (no writer while they read), record nothing and
//! are never fenced.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};
use parking_lot::Mutex;

use crate::backend::HEADER_OBJECT;
use crate::client::{LockMode, LockSpec, Locker, Pool};
use crate::error::{RadosError, Result};

/// Name of the RADOS lock on the header object that is the store's lease.
pub const LEASE_LOCK: &str = "parallax.lease";
/// Prefix of the header object's extended attributes naming writers that may still be alive:
/// `parallax.owner.<client id>` = `host=H addr=A`.
pub const OWNER_PREFIX: &str = "parallax.owner.";
/// How long a fenced client stays blocklisted; its process is long gone by then (a client's
/// address carries a per-process nonce, so a new process is never caught by an old entry).
pub const FENCE_FOR: Duration = Duration::from_secs(3600);
/// What librados returns to a blocklisted client (Ceph's EBLOCKLISTED is ESHUTDOWN).
const EBLOCKLISTED: i32 = libc::ESHUTDOWN;
/// The shortest lease: renewed every third of it, a shorter one would lapse on a slow round trip.
pub const MIN_LEASE: Duration = Duration::from_secs(3);
/// Default lease duration.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

/// Until when this process may write, as the renewals have shown.
pub struct LeaseClock {
    base: Instant,
    /// Milliseconds after `base` the lease is known valid until.
    valid_until_ms: AtomicU64,
    lost: Mutex<Option<String>>,
}

impl LeaseClock {
    fn new(valid_until: Instant) -> Self {
        let base = Instant::now();
        let c = LeaseClock { base, valid_until_ms: AtomicU64::new(0), lost: Mutex::new(None) };
        c.extend(valid_until);
        c
    }

    fn extend(&self, until: Instant) {
        let ms = until.saturating_duration_since(self.base).as_millis() as u64;
        self.valid_until_ms.fetch_max(ms, Ordering::AcqRel);
    }

    fn lose(&self, why: String) {
        self.lost.lock().get_or_insert(why);
        self.valid_until_ms.store(0, Ordering::Release);
    }

    /// Ok while the lease is held; the reason otherwise. Checked before every write.
    pub fn check(&self) -> Result<()> {
        let now = self.base.elapsed().as_millis() as u64;
        if now < self.valid_until_ms.load(Ordering::Acquire) {
            return Ok(());
        }
        let why = self.lost.lock().clone().unwrap_or_else(|| "it ran out before it could be renewed".into());
        Err(RadosError::LeaseLost(why))
    }
}

/// A held lease; renewed on a thread until dropped, then released.
pub struct Lease {
    pool: Arc<Pool>,
    mode: LockMode,
    cookie: String,
    /// This writer's record on the header object.
    owner: String,
    clock: Arc<LeaseClock>,
    stop: Option<Sender<()>>,
    renewer: Option<JoinHandle<()>>,
}

/// The lock cookie naming a holder: its host and its client instance.
fn cookie(host: &str, pool: &Pool) -> String {
    format!("{host}/{}", pool.cluster().instance_id())
}

/// Who holds a lock, in words.
fn describe(lockers: &[Locker]) -> String {
    if lockers.is_empty() {
        return "a client that just let go (try again)".into();
    }
    lockers
        .iter()
        .map(|l| {
            let host = l.cookie.rsplit_once('/').map_or(l.cookie.as_str(), |(h, _)| h);
            format!("host {host} ({} at {})", l.client, l.address)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Lease {
    /// Takes the store's lease on `pool` for `host`: exclusive to write, shared to read. A
    /// writer fences the writer recorded before it (one that crashed or lost its lease).
    pub fn acquire(pool: Arc<Pool>, host: &str, mode: LockMode, duration: Duration) -> Result<Lease> {
        if duration < MIN_LEASE {
            return Err(RadosError::LeaseTooShort(duration));
        }
        let cookie = cookie(host, &pool);
        let address = pool.cluster().address()?;
        let description = format!("host={host} addr={address}");
        let started = Instant::now();
        let spec = LockSpec { name: LEASE_LOCK, mode, cookie: &cookie, description: &description, duration };
        match pool.lock(HEADER_OBJECT, &spec, false) {
            Ok(()) => {}
            Err(e) if matches!(e.errno(), Some(libc::EBUSY) | Some(libc::EEXIST)) => {
                let holders = pool.lockers(HEADER_OBJECT, LEASE_LOCK)?;
                return Err(RadosError::Locked { holder: describe(&holders) });
            }
            Err(e) => return Err(e),
        }
        let clock = Arc::new(LeaseClock::new(started + duration * 9 / 10));
        let owner = format!("{OWNER_PREFIX}{}", pool.cluster().instance_id());
        let mut lease = Lease { pool: pool.clone(), mode, cookie, owner, clock, stop: None, renewer: None };
        if mode == LockMode::Exclusive {
            for (name, before) in pool.xattrs_with_prefix(HEADER_OBJECT, OWNER_PREFIX)? {
                let before = String::from_utf8_lossy(&before).into_owned();
                let old_address = before.split_whitespace().find_map(|w| w.strip_prefix("addr="));
                if let Some(old) = old_address.filter(|a| *a != address) {
                    tracing::warn!("fencing a previous writer of the store ({before}): it did not release its lease");
                    pool.cluster().blocklist(old, FENCE_FOR)?;
                }
                // Fenced (or unparseable, so never a live writer of ours): forget it.
                pool.remove_xattr(HEADER_OBJECT, &name)?;
            }
            lease.clock.check()?;
            pool.set_xattr(HEADER_OBJECT, &lease.owner, description.as_bytes())?;
        }
        lease.start_renewing(duration, description);
        Ok(lease)
    }

    fn start_renewing(&mut self, duration: Duration, description: String) {
        let (stop, stopped) = bounded::<()>(0);
        let (pool, clock, cookie, mode) = (self.pool.clone(), self.clock.clone(), self.cookie.clone(), self.mode);
        let renewer = std::thread::Builder::new()
            .name("rados-lease".into())
            .spawn(move || {
                // Waits on the stop channel: dropping the sender ends the thread at once.
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(duration / 3) {
                    let started = Instant::now();
                    let spec =
                        LockSpec { name: LEASE_LOCK, mode, cookie: &cookie, description: &description, duration };
                    match pool.lock(HEADER_OBJECT, &spec, true) {
                        Ok(()) => clock.extend(started + duration * 9 / 10),
                        Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EBUSY) | Some(EBLOCKLISTED)) => {
                            tracing::error!("the store's lease is lost: {e}; no more writes");
                            clock.lose(e.to_string());
                            return;
                        }
                        Err(e) => tracing::warn!("renewing the store's lease failed, will retry: {e}"),
                    }
                }
            })
            .ok();
        if renewer.is_none() {
            // No thread, no renewals: the lease simply runs out and writes stop then.
            tracing::error!("could not start the lease renewal thread");
        }
        self.stop = Some(stop);
        self.renewer = renewer;
    }

    /// The clock writes check.
    pub fn clock(&self) -> Arc<LeaseClock> {
        self.clock.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        if self.clock.check().is_err() {
            return; // Not ours any more: another host may hold it.
        }
        if self.mode == LockMode::Exclusive
            && let Err(e) = self.pool.remove_xattr(HEADER_OBJECT, &self.owner)
        {
            tracing::warn!("clearing the store's owner record: {e}");
        }
        if let Err(e) = self.pool.unlock(HEADER_OBJECT, LEASE_LOCK, &self.cookie) {
            tracing::warn!("releasing the store's lease: {e}");
        }
    }
}

/// Takes the store over from whoever holds its lease now, at once: fences each holder
/// (blocklists its address) and breaks its lock. For a host known dead, or to move a store
/// without waiting out the lease; the holder, if alive, gets errors on every write after.
pub fn take_over(pool: &Pool) -> Result<Vec<Locker>> {
    let holders = pool.lockers(HEADER_OBJECT, LEASE_LOCK)?;
    for h in &holders {
        tracing::warn!("fencing {} at {} and breaking its lease", h.client, h.address);
        pool.cluster().blocklist(&h.address, FENCE_FOR)?;
        pool.break_lock(HEADER_OBJECT, LEASE_LOCK, h)?;
    }
    Ok(holders)
}
