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
/// How long a fenced client stays blocklisted (as RBD's exclusive lock does). Far longer than
/// [`crate::client::OP_TIMEOUT`]: an operation the fenced client had queued is abandoned by its
/// librados long before the entry expires, so nothing it sent can land afterwards. (A client's
/// address carries a per-process nonce, so a new process is never caught by an old entry.)
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

    /// True once the lease is known gone for good (not merely unrenewed for a while).
    fn is_lost(&self) -> bool {
        self.lost.lock().is_some()
    }

    /// Ok while the lease is held; the reason otherwise. Checked before every read and write.
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
    renewal: Arc<Renewal>,
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
    lockers.iter().map(|l| format!("host {} ({} at {})", l.host(), l.client, l.address)).collect::<Vec<_>>().join(", ")
}

/// What renewing needs; shared by the lease and its renewal thread.
struct Renewal {
    pool: Arc<Pool>,
    mode: LockMode,
    cookie: String,
    description: String,
    duration: Duration,
    /// This writer's owner record on the header object.
    owner: String,
    clock: Arc<LeaseClock>,
}

impl Renewal {
    fn spec(&self) -> LockSpec<'_> {
        LockSpec {
            name: LEASE_LOCK,
            mode: self.mode,
            cookie: &self.cookie,
            description: &self.description,
            duration: self.duration,
        }
    }

    /// Renews the lock now; the clock runs on from the moment the request was sent. A lock
    /// that lapsed (the OSD did not hear from us in time: an outage, a slow OSD) is taken again
    /// by a writer whose owner record is still there — whoever took the store in between would
    /// have fenced us and removed it — so a blip does not stop a healthy writer for good.
    fn renew(&self) -> Result<()> {
        let started = Instant::now();
        match self.pool.lock(HEADER_OBJECT, &self.spec(), true) {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::ENOENT) && self.mode == LockMode::Exclusive => {
                if self.pool.xattr(HEADER_OBJECT, &self.owner)?.is_none() {
                    return Err(e);
                }
                self.pool.lock(HEADER_OBJECT, &self.spec(), false)?;
                tracing::warn!("the store's lease had lapsed; taken again (nobody wrote in between)");
            }
            Err(e) => return Err(e),
        }
        self.clock.extend(started + self.duration * 9 / 10);
        Ok(())
    }

    /// [`Renewal::renew`], and on a failure that means the lease is gone for good, the clock
    /// told so.
    fn renew_or_lose(&self) -> Result<()> {
        let r = self.renew();
        if let Err(e) = &r
            && matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EBUSY) | Some(libc::EEXIST) | Some(EBLOCKLISTED))
        {
            tracing::error!("the store's lease is lost: {e}; no more I/O");
            self.clock.lose(e.to_string());
        }
        r
    }
}

impl Lease {
    /// Takes the store's lease on `pool` for `host`: exclusive to write, shared to read. A
    /// writer fences every writer recorded before it (one that crashed or lost its lease).
    pub fn acquire(pool: Arc<Pool>, host: &str, mode: LockMode, duration: Duration) -> Result<Lease> {
        if duration < MIN_LEASE {
            return Err(RadosError::LeaseTooShort(duration));
        }
        let address = pool.cluster().address()?;
        let renewal = Arc::new(Renewal {
            cookie: cookie(host, &pool),
            description: format!("host={host} addr={address}"),
            owner: format!("{OWNER_PREFIX}{}", pool.cluster().instance_id()),
            clock: Arc::new(LeaseClock::new(Instant::now())),
            pool,
            mode,
            duration,
        });
        let started = Instant::now();
        match renewal.pool.lock(HEADER_OBJECT, &renewal.spec(), false) {
            Ok(()) => renewal.clock.extend(started + duration * 9 / 10),
            Err(e) if matches!(e.errno(), Some(libc::EBUSY) | Some(libc::EEXIST)) => {
                let holders = renewal.pool.lockers(HEADER_OBJECT, LEASE_LOCK)?;
                return Err(RadosError::Locked { holder: describe(&holders) });
            }
            Err(e) => return Err(e),
        }
        // Renewing from the start: fencing several writers may take longer than the lease.
        let mut lease = Lease { renewal: renewal.clone(), stop: None, renewer: None };
        lease.start_renewing();
        if mode == LockMode::Exclusive {
            let pool = &renewal.pool;
            for (name, before) in pool.xattrs_with_prefix(HEADER_OBJECT, OWNER_PREFIX)? {
                if name == renewal.owner {
                    continue;
                }
                // Still ours? A taker that stalled past its lease must not fence the writer
                // that took the store meanwhile.
                renewal.renew_or_lose()?;
                let before = String::from_utf8_lossy(&before).into_owned();
                let old_address = before.split_whitespace().find_map(|w| w.strip_prefix("addr="));
                if let Some(old) = old_address.filter(|a| *a != address) {
                    tracing::warn!("fencing a previous writer of the store ({before}): it did not release its lease");
                    pool.cluster().blocklist(old, FENCE_FOR)?;
                }
                // Fenced (or unparseable, so never a live writer of ours): forget it.
                pool.remove_xattr(HEADER_OBJECT, &name)?;
            }
            renewal.renew_or_lose()?;
            pool.set_xattr(HEADER_OBJECT, &renewal.owner, renewal.description.as_bytes())?;
            // Held after the record was durable: every later taker sees it and fences us.
            renewal.renew_or_lose()?;
        }
        Ok(lease)
    }

    fn start_renewing(&mut self) {
        let (stop, stopped) = bounded::<()>(0);
        let renewal = self.renewal.clone();
        let renewer = std::thread::Builder::new()
            .name("rados-lease".into())
            .spawn(move || {
                // Waits on the stop channel: dropping the sender ends the thread at once.
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(renewal.duration / 3)
                {
                    match renewal.renew_or_lose() {
                        Ok(()) => {}
                        Err(_) if renewal.clock.is_lost() => return,
                        Err(e) => tracing::warn!("renewing the store's lease failed, will retry: {e}"),
                    }
                }
            })
            .ok();
        if renewer.is_none() {
            // No thread, no renewals: the lease simply runs out and I/O stops then.
            tracing::error!("could not start the lease renewal thread");
        }
        self.stop = Some(stop);
        self.renewer = renewer;
    }

    /// The clock reads and writes check.
    pub fn clock(&self) -> Arc<LeaseClock> {
        self.renewal.clock.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        let r = &self.renewal;
        if r.clock.check().is_err() {
            return; // Not ours any more: another host may hold it.
        }
        if r.mode == LockMode::Exclusive
            && let Err(e) = r.pool.remove_xattr(HEADER_OBJECT, &r.owner)
        {
            tracing::warn!("clearing the store's owner record: {e}");
        }
        if let Err(e) = r.pool.unlock(HEADER_OBJECT, LEASE_LOCK, &r.cookie) {
            tracing::warn!("releasing the store's lease: {e}");
            return;
        }
        // Whoever waits for the store (`vdi --wait`) watches the header: tell them it is free.
        if let Err(e) = r.pool.notify(HEADER_OBJECT, RELEASE_NOTIFY_TIMEOUT) {
            tracing::debug!("telling waiters the store's lease is free: {e}");
        }
    }
}

/// How long a holder letting go waits for the waiters it tells to acknowledge. They do at once;
/// a waiter that died unannounced stays a watcher for about 30 s, and every release in that
/// time waits this long for it. A waiter that misses the notify looks again by itself.
const RELEASE_NOTIFY_TIMEOUT: Duration = Duration::from_millis(300);

/// [`Lease::acquire`], waiting while another client holds the lease: woken when a holder lets
/// go (it notifies the header object's watchers), and after every `duration` (this client's
/// lease time, the holders' too as a rule), by which a holder that died without letting go has
/// lost it. `waiting` is called with the holders each time the lease is found taken. No order
/// among waiters: whoever tries first after a release gets the lease.
pub fn acquire_waiting(
    pool: Arc<Pool>,
    host: &str,
    mode: LockMode,
    duration: Duration,
    waiting: &mut dyn FnMut(&str),
) -> Result<Lease> {
    let mut watch: Option<crate::client::Watch> = None;
    loop {
        match Lease::acquire(pool.clone(), host, mode, duration) {
            Err(RadosError::Locked { holder }) => match &watch {
                // Watching from the first refusal (the header exists then) and trying again at
                // once: a release between a refused try and the watch still wakes the wait. A
                // watch librados reports failed hears nothing more: replaced the same way.
                Some(w) if !w.is_broken() => {
                    waiting(&holder);
                    let _ = w.notified().recv_timeout(duration);
                }
                _ => {
                    drop(watch.take());
                    watch = Some(pool.watch(HEADER_OBJECT)?);
                }
            },
            other => return other,
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
