//! Safe handles on a Ceph cluster and on one pool (and namespace) of it.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{RadosError, Result};
use crate::ffi::{self, Api, IoctxT, RadosT, Timeval};

use crossbeam_channel::{Receiver, Sender, bounded};

/// How long one librados operation may take before it fails (`rados_osd_op_timeout`,
/// `rados_mon_op_timeout`).
pub const OP_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach the cluster: what `--ceph-conf` and `--ceph-id` say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CephOptions {
    /// The ceph.conf to read; `None` reads librados' defaults (`$CEPH_CONF`, /etc/ceph/ceph.conf).
    pub conf: Option<PathBuf>,
    /// The client id without `client.` (`admin` when `None`).
    pub id: Option<String>,
}

impl CephOptions {
    /// A name for the cluster and identity these options reach, for telling apart two stores
    /// of the same pool name in different clusters (the control socket's name): the ceph.conf
    /// path (`$CEPH_CONF` or /etc/ceph/ceph.conf when not given), canonical, and the id.
    pub fn identity(&self) -> String {
        let conf = self
            .conf
            .clone()
            .or_else(|| std::env::var_os("CEPH_CONF").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/etc/ceph/ceph.conf"));
        let conf = std::fs::canonicalize(&conf).unwrap_or(conf);
        format!("{}#{}", conf.display(), self.id.as_deref().unwrap_or("admin"))
    }
}

fn cstring(what: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| RadosError::BadName { what, name: s.to_string() })
}

/// A connected cluster handle. librados handles are safe to use from many threads.
pub struct Cluster {
    api: &'static Api,
    handle: RadosT,
}

// SAFETY: a `rados_t` may be used from any thread and by several at once (librados is
// thread-safe; its docs allow sharing a cluster handle); `Cluster` owns it until `Drop`.
unsafe impl Send for Cluster {}
// SAFETY: as above: every call on the handle is internally synchronised by librados.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Connects as `opts` says. A cluster that cannot be reached fails within 30 seconds.
    pub fn connect(opts: &CephOptions) -> Result<Arc<Cluster>> {
        let api = ffi::api().map_err(RadosError::Unavailable)?;
        let id = cstring("ceph id", opts.id.as_deref().unwrap_or("admin"))?;
        let mut handle: RadosT = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer and `id` a NUL-terminated string alive for the call.
        let r = unsafe { (api.rados_create)(&mut handle, id.as_ptr()) };
        if r < 0 {
            return Err(RadosError::call("creating the cluster handle", r.into()));
        }
        // From here `Drop` shuts the handle down, whatever fails next.
        let cluster = Cluster { api, handle };
        let conf = match &opts.conf {
            Some(p) => Some(cstring("ceph.conf path", &p.to_string_lossy())?),
            None => None,
        };
        // SAFETY: the handle is live and not yet connected; `conf` is NUL-terminated or null
        // (librados then searches its default places).
        let r = unsafe { (api.rados_conf_read_file)(handle, conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())) };
        if r < 0 {
            let what = opts.conf.as_ref().map_or("the default ceph.conf".to_string(), |p| p.display().to_string());
            return Err(RadosError::call(format!("reading {what}"), r.into()));
        }
        // SAFETY: a null variable name means CEPH_ARGS, as librados documents.
        let r = unsafe { (api.rados_conf_parse_env)(handle, std::ptr::null()) };
        if r < 0 {
            return Err(RadosError::call("reading CEPH_ARGS", r.into()));
        }
        cluster.set("client_mount_timeout", "30")?;
        // Operations give up instead of waiting for ever: a partitioned client then never sends
        // a stale write after its fence ran out (lease::FENCE_FOR), and a stop is not stuck
        // behind a dead cluster. The I/O fails with ETIMEDOUT.
        cluster.set("rados_osd_op_timeout", &OP_TIMEOUT.as_secs().to_string())?;
        cluster.set("rados_mon_op_timeout", &OP_TIMEOUT.as_secs().to_string())?;
        // SAFETY: the handle is configured and not yet connected.
        let r = unsafe { (api.rados_connect)(handle) };
        if r < 0 {
            return Err(RadosError::call("connecting to the Ceph cluster", r.into()));
        }
        Ok(Arc::new(cluster))
    }

    fn set(&self, option: &str, value: &str) -> Result<()> {
        let (o, v) = (cstring("option", option)?, cstring("value", value)?);
        // SAFETY: the handle is live; both strings are NUL-terminated and outlive the call.
        let r = unsafe { (self.api.rados_conf_set)(self.handle, o.as_ptr(), v.as_ptr()) };
        if r < 0 { Err(RadosError::call(format!("setting {option}"), r.into())) } else { Ok(()) }
    }

    /// Opens `pool`, and in it `namespace` (the default namespace when `None`).
    pub fn pool(self: &Arc<Self>, pool: &str, namespace: Option<&str>) -> Result<Pool> {
        let name = cstring("pool", pool)?;
        let mut io: IoctxT = std::ptr::null_mut();
        // SAFETY: the handle is connected; `name` is NUL-terminated; `io` a valid out-pointer.
        let r = unsafe { (self.api.rados_ioctx_create)(self.handle, name.as_ptr(), &mut io) };
        if r < 0 {
            let hint = if r == -libc::ENOENT {
                format!(": there is no such pool (ceph osd pool create {pool})")
            } else {
                String::new()
            };
            return Err(RadosError::call(format!("opening pool {pool}{hint}"), r.into()));
        }
        let p = Pool { cluster: self.clone(), io, name: pool.to_string(), namespace: namespace.map(str::to_string) };
        if let Some(ns) = namespace {
            let ns = cstring("namespace", ns)?;
            // SAFETY: `io` is the live context just created, not yet shared with any thread.
            unsafe { (self.api.rados_ioctx_set_namespace)(p.io, ns.as_ptr()) };
        }
        // A write to a full pool (its quota reached, or the cluster at its full ratio) fails at
        // once with EDQUOT or ENOSPC instead of waiting for room, which by librados' default
        // it does until the op timeout: a commit would wait that long holding the store's
        // metadata lock, then fail. The OSD refuses only writes that grow the pool's usage (a
        // new object, or past an object's end), so writes into space the store reserved
        // (`Pool::extend_object`) still land.
        // SAFETY: as above: the live context, not yet shared.
        unsafe { (self.api.rados_set_pool_full_try)(p.io) };
        Ok(p)
    }

    /// This client's unique id in the cluster (`client.N`).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: the handle is connected.
        unsafe { (self.api.rados_get_instance_id)(self.handle) }
    }

    /// This client's address as the OSDs see it: what another client blocklists to fence it.
    pub fn address(&self) -> Result<String> {
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: the handle is connected; `out` receives a buffer we free below.
        let r = unsafe { (self.api.rados_getaddrs)(self.handle, &mut out) };
        if r < 0 || out.is_null() {
            return Err(RadosError::call("reading this client's address", r.min(-libc::EINVAL).into()));
        }
        // SAFETY: librados returned a NUL-terminated string it allocated.
        let s = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
        // SAFETY: `out` came from rados_getaddrs and is freed once.
        unsafe { (self.api.rados_buffer_free)(out) };
        Ok(s)
    }

    /// Runs a monitor command, `command` being its JSON as the `ceph` tool sends it (`{"prefix":
    /// "df", "format": "json"}`), and returns what it printed. A refusal carries the monitors'
    /// own message.
    pub fn mon_command(&self, command: &str) -> Result<Vec<u8>> {
        let c = cstring("monitor command", command)?;
        let mut cmd = [c.as_ptr()];
        let (mut out, mut out_len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
        let (mut status, mut status_len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
        // SAFETY: the handle is connected; `cmd` is one valid NUL-terminated string (librados
        // only reads it); no input buffer; the four out-pointers are valid and receive
        // buffers librados allocated (or null), freed below.
        let r = unsafe {
            (self.api.rados_mon_command)(
                self.handle,
                cmd.as_mut_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            )
        };
        let take = |p: *mut c_char, n: usize| -> Vec<u8> {
            if p.is_null() {
                return Vec::new();
            }
            // SAFETY: librados returned `p` holding `n` bytes; it is copied, then freed once.
            let v = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), n) }.to_vec();
            // SAFETY: `p` came from rados_mon_command and is freed once.
            unsafe { (self.api.rados_buffer_free)(p) };
            v
        };
        let (out, status) = (take(out, out_len), take(status, status_len));
        if r < 0 {
            let said = String::from_utf8_lossy(&status);
            let said = said.trim();
            let op = if said.is_empty() {
                format!("monitor command {command}")
            } else {
                format!("monitor command {command} ({said})")
            };
            return Err(RadosError::call(op, r.into()));
        }
        Ok(out)
    }

    /// Fences the client at `address` (as [`Cluster::address`] gave it) for `expire`: the OSDs
    /// refuse its operations from the next OSD map on. Waits until this client has that map, so
    /// nothing it does afterwards can be overtaken by the fenced client.
    pub fn blocklist(&self, address: &str, expire: Duration) -> Result<()> {
        let a = cstring("client address", address)?;
        let secs = u32::try_from(expire.as_secs()).unwrap_or(u32::MAX).max(1);
        // SAFETY: the handle is connected; librados only reads the string despite `char *`.
        let r = unsafe { (self.api.rados_blocklist_add)(self.handle, a.as_ptr().cast_mut(), secs) };
        if r < 0 {
            return Err(RadosError::call(format!("blocklisting {address}"), r.into()));
        }
        // SAFETY: the handle is connected.
        let r = unsafe { (self.api.rados_wait_for_latest_osdmap)(self.handle) };
        if r < 0 { Err(RadosError::call("waiting for the OSD map", r.into())) } else { Ok(()) }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: every `Pool` holds an `Arc<Cluster>`, so no context outlives the handle;
        // the handle is shut down once.
        unsafe { (self.api.rados_shutdown)(self.handle) }
    }
}

/// How full a pool is, as the cluster sees it. The figures lag writes by the few seconds
/// between the OSDs' reports, as the pool's quota enforcement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolRoom {
    /// Bytes the pool's quota counts: the sum of its objects' lengths, before replication
    /// (`num_bytes`). An object made long without being written (the store reserves space
    /// that way) counts whole; `ceph df`'s STORED, which counts bytes written, does not.
    pub used: u64,
    /// The pool's byte quota; `None` when it has none.
    pub quota: Option<u64>,
    /// Bytes the cluster can still store in this pool, replication and the full ratio
    /// accounted (`ceph df`'s MAX AVAIL), capped by what the quota leaves.
    pub available: u64,
}

impl PoolRoom {
    /// From the JSON of `ceph df detail` and of `ceph pg dump pools`, for the pool `id`.
    fn parse(pool: &str, id: i64, df: &[u8], pg: &[u8]) -> Result<PoolRoom> {
        use serde_json::Value;
        /// In the list `key` of `v` (`None` without one), the entry whose `id_key` is `id`.
        fn entry<'v>(v: &'v Value, key: &str, id_key: &str, id: i64) -> Option<Option<&'v Value>> {
            let list = v.get(key)?.as_array()?;
            Some(list.iter().find(|p| p.get(id_key).and_then(Value::as_i64) == Some(id)))
        }
        let bad = |what: String| RadosError::BadReply(what);
        let json = |bytes: &[u8], what: &str| {
            serde_json::from_slice::<Value>(bytes).map_err(|e| bad(format!("`{what}` is not JSON: {e}")))
        };
        let no_figures = || RadosError::NoPoolFigures(pool.to_string());
        let pool_entry = |v: &Value, key: &str, id_key: &str, what: &str| {
            entry(v, key, id_key, id)
                .ok_or_else(|| bad(format!("`{what}` has no {key} list")))?
                .cloned()
                .ok_or_else(no_figures)
        };
        let bytes = |v: &Value, key: &str, what: &str| {
            v.get(key)
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(format!("`{what}` gives no byte count {key} for {pool:?}")))
        };

        let df = json(df, "ceph df detail")?;
        let df = pool_entry(&df, "pools", "id", "ceph df detail")?;
        let stats = df.get("stats").ok_or_else(|| bad(format!("`ceph df detail` has no stats for {pool:?}")))?;
        let max_avail = bytes(stats, "max_avail", "ceph df detail")?;
        let quota = bytes(stats, "quota_bytes", "ceph df detail")?;

        let pg = json(pg, "ceph pg dump pools")?;
        let pg = pool_entry(&pg, "pool_stats", "poolid", "ceph pg dump pools")?;
        let sum =
            pg.get("stat_sum").ok_or_else(|| bad(format!("`ceph pg dump pools` has no stat_sum for {pool:?}")))?;
        // Ceph's counters are signed and may dip below zero for a moment (a removal counted
        // before the write it undoes): nothing is used then.
        let used = sum
            .get("num_bytes")
            .and_then(Value::as_i64)
            .map(|n| n.max(0) as u64)
            .ok_or_else(|| bad(format!("`ceph pg dump pools` gives no byte count num_bytes for {pool:?}")))?;

        let quota = (quota != 0).then_some(quota);
        let available = quota.map_or(max_avail, |q| max_avail.min(q.saturating_sub(used)));
        Ok(PoolRoom { used, quota, available })
    }
}

/// Who holds a lock on an object, as `rados_list_lockers` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locker {
    /// The holding client (`client.N`).
    pub client: String,
    /// The holder's cookie.
    pub cookie: String,
    /// The holder's address, to blocklist it.
    pub address: String,
}

impl Locker {
    /// The host that holds the lock, from the cookie parallaxd locks with (`HOST/INSTANCE`).
    pub fn host(&self) -> &str {
        self.cookie.rsplit_once('/').map_or(self.cookie.as_str(), |(h, _)| h)
    }
}

/// How a lock is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// One holder.
    Exclusive,
    /// Many holders, no exclusive one.
    Shared,
}

/// A lock on an object as `rados_lock_*` takes it.
#[derive(Debug, Clone, Copy)]
pub struct LockSpec<'a> {
    /// The lock's name (several locks may be on one object).
    pub name: &'a str,
    /// Exclusive or shared.
    pub mode: LockMode,
    /// The holder's cookie: who holds it, among the clients.
    pub cookie: &'a str,
    /// Free text shown to whoever lists the lockers.
    pub description: &'a str,
    /// How long the lock lasts unrenewed.
    pub duration: Duration,
}

/// A pool (and namespace) of the cluster: objects are read and written here.
pub struct Pool {
    cluster: Arc<Cluster>,
    io: IoctxT,
    name: String,
    namespace: Option<String>,
}

// SAFETY: an I/O context may be used from many threads for object operations (librados is
// thread-safe); its namespace is set once, before it is shared, and never changed.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the context is live and destroyed once; its cluster outlives it (the Arc).
        unsafe { (self.cluster.api.rados_ioctx_destroy)(self.io) }
    }
}

fn check(op: impl FnOnce() -> String, r: i64) -> Result<i64> {
    if r < 0 { Err(RadosError::call(op(), r)) } else { Ok(r) }
}

/// Biggest single librados read or write: its length is passed as an `int` result.
const MAX_IO: usize = 1 << 30;

impl Pool {
    /// The cluster this pool is in.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace opened in the pool; `None` for the default one.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// The pool's id in the cluster.
    pub fn id(&self) -> i64 {
        // SAFETY: the context is live.
        unsafe { (self.api().rados_ioctx_get_id)(self.io) }
    }

    /// How full the pool is: its quota and the cluster's room for it (`ceph df detail`), and
    /// the bytes its quota counts (`ceph pg dump pools`). A pool is as full as all its
    /// namespaces together. The figures are the manager's: both commands go to the monitors,
    /// which pass them on to it (librados' own manager commands are not used: one that times
    /// out is left pending with pointers into the caller's stack, which a late reply would
    /// write through). Without an active manager the monitors would hold them until the op
    /// timeout, so `mgr stat` is asked first and its absence is an error at once. Needs read
    /// access to the monitors and the manager (`mon 'allow r' mgr 'allow r'`).
    pub fn room(&self) -> Result<PoolRoom> {
        let stat = self.cluster.mon_command(r#"{"prefix": "mgr stat", "format": "json"}"#)?;
        let stat: serde_json::Value = serde_json::from_slice(&stat)
            .map_err(|e| RadosError::BadReply(format!("`ceph mgr stat` is not JSON: {e}")))?;
        if stat.get("available").and_then(serde_json::Value::as_bool) != Some(true) {
            return Err(RadosError::NoManager);
        }
        let df = self.cluster.mon_command(r#"{"prefix": "df", "detail": "detail", "format": "json"}"#)?;
        let pg = self.cluster.mon_command(r#"{"prefix": "pg dump", "dumpcontents": ["pools"], "format": "json"}"#)?;
        PoolRoom::parse(&self.name, self.id(), &df, &pg)
    }

    fn api(&self) -> &'static Api {
        self.cluster.api
    }

    /// Reads into `buf` from `offset` of `object`; returns the bytes read, short at the
    /// object's end, 0 if the object does not exist.
    pub fn read(&self, object: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        assert!(buf.len() <= MAX_IO);
        let o = cstring("object", object)?;
        // SAFETY: `buf` is valid for `buf.len()` bytes of writing; `o` is NUL-terminated.
        let r = unsafe { (self.api().rados_read)(self.io, o.as_ptr(), buf.as_mut_ptr().cast(), buf.len(), offset) };
        if r == -libc::ENOENT {
            return Ok(0);
        }
        let n = check(|| format!("reading {object} at {offset}"), r.into())? as usize;
        if n > buf.len() {
            return Err(RadosError::call(
                format!("reading {object}: librados returned {n} bytes for {}", buf.len()),
                -5,
            ));
        }
        Ok(n)
    }

    /// Writes `data` at `offset` of `object`, creating it. Returns once the write is durable
    /// on every replica; one call is atomic.
    pub fn write(&self, object: &str, offset: u64, data: &[u8]) -> Result<()> {
        assert!(data.len() <= MAX_IO);
        let o = cstring("object", object)?;
        // SAFETY: `data` is valid for `data.len()` bytes of reading; `o` is NUL-terminated.
        let r = unsafe { (self.api().rados_write)(self.io, o.as_ptr(), data.as_ptr().cast(), data.len(), offset) };
        check(|| format!("writing {object} at {offset}"), r.into()).map(drop)
    }

    /// Makes `object` at least `len` bytes long (creating it) without changing a byte of what
    /// it reads as: in one atomic operation, if the byte at `len - 1` reads as zero (as every
    /// byte past an object's end does), a zero is written there. A byte some write put there
    /// meanwhile is left alone, and then the object is already that long. Once done, writes
    /// within the first `len` bytes no longer grow the pool's usage, so a full pool still
    /// takes them.
    pub fn extend_object(&self, object: &str, len: u64) -> Result<()> {
        let Some(last) = len.checked_sub(1) else { return Ok(()) };
        let o = cstring("object", object)?;
        let api = self.api();
        let zero = [0u8; 1];
        let mut compared: c_int = 0;
        // SAFETY: the op is created, filled, run and released here, never shared. `zero`,
        // `compared` and `o` outlive `operate`, which is where librados reads and writes them;
        // the op holds no pointer after it is released.
        let r = unsafe {
            let op = (api.rados_create_write_op)();
            if op.is_null() {
                return Err(RadosError::call(
                    format!("extending {object}: no memory for the op"),
                    (-libc::ENOMEM).into(),
                ));
            }
            (api.rados_write_op_cmpext)(op, zero.as_ptr().cast(), 1, last, &mut compared);
            (api.rados_write_op_write)(op, zero.as_ptr().cast(), 1, last);
            let r = (api.rados_write_op_operate)(op, self.io, o.as_ptr(), std::ptr::null_mut(), 0);
            (api.rados_release_write_op)(op);
            r
        };
        // A mismatch is reported as -MAX_ERRNO (4095) minus its offset in the compared bytes.
        if r <= -4095 {
            return Ok(());
        }
        check(|| format!("extending {object} to {len} bytes"), r.into()).map(drop)
    }

    /// Watches `object`: the returned [`Watch`] hears of every notify sent to it
    /// ([`Pool::notify`]) until dropped.
    pub fn watch(self: &Arc<Self>, object: &str) -> Result<Watch> {
        let (sender, notified) = bounded(1);
        let state = Box::into_raw(Box::new(WatchState {
            api: self.api(),
            io: self.io,
            object: cstring("object", object)?,
            sender,
            broken: std::sync::atomic::AtomicBool::new(false),
        }));
        let mut handle = 0u64;
        // SAFETY: `state` stays allocated until the watch is unregistered and librados has
        // run its last callback (`Watch::drop`, or just below on failure); the object name
        // it holds is NUL-terminated; `handle` is a valid out-pointer.
        let r = unsafe {
            (self.api().rados_watch2)(
                self.io,
                (*state).object.as_ptr(),
                &mut handle,
                Some(on_notify),
                Some(on_watch_error),
                state.cast(),
            )
        };
        if r < 0 {
            // SAFETY: the watch was not registered, so no callback has `state`; freed once.
            drop(unsafe { Box::from_raw(state) });
            return Err(RadosError::call(format!("watching {object}"), r.into()));
        }
        Ok(Watch { pool: self.clone(), handle, state, notified })
    }

    /// Tells every watcher of `object` ([`Pool::watch`]), waiting up to `timeout` for their
    /// acknowledgements.
    pub fn notify(&self, object: &str, timeout: Duration) -> Result<()> {
        let o = cstring("object", object)?;
        let mut reply: *mut c_char = std::ptr::null_mut();
        let mut reply_len = 0usize;
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        // SAFETY: `o` is NUL-terminated; an empty payload; `reply` and `reply_len` are valid
        // out-pointers, and a reply buffer librados allocates is freed below.
        let r = unsafe {
            (self.api().rados_notify2)(self.io, o.as_ptr(), std::ptr::null(), 0, ms, &mut reply, &mut reply_len)
        };
        if !reply.is_null() {
            // SAFETY: allocated by rados_notify2 for us; freed once.
            unsafe { (self.api().rados_buffer_free)(reply) };
        }
        check(|| format!("notifying the watchers of {object}"), r.into()).map(drop)
    }

    /// Replaces the whole of `object` with `data` (creating it) in one atomic operation.
    pub fn write_full(&self, object: &str, data: &[u8]) -> Result<()> {
        assert!(data.len() <= MAX_IO);
        let o = cstring("object", object)?;
        // SAFETY: `data` is valid for `data.len()` bytes of reading; `o` is NUL-terminated.
        let r = unsafe { (self.api().rados_write_full)(self.io, o.as_ptr(), data.as_ptr().cast(), data.len()) };
        check(|| format!("replacing {object}"), r.into()).map(drop)
    }

    /// Removes `object`; true if it existed.
    pub fn remove(&self, object: &str) -> Result<bool> {
        let o = cstring("object", object)?;
        // SAFETY: `o` is NUL-terminated.
        let r = unsafe { (self.api().rados_remove)(self.io, o.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(false);
        }
        check(|| format!("removing {object}"), r.into()).map(|_| true)
    }

    /// The extended attribute `name` of `object`; `None` if either is absent.
    pub fn xattr(&self, object: &str, name: &str) -> Result<Option<Vec<u8>>> {
        let (o, n) = (cstring("object", object)?, cstring("xattr", name)?);
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` is valid for its length; both names are NUL-terminated.
        let r =
            unsafe { (self.api().rados_getxattr)(self.io, o.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r == -libc::ENOENT || r == -libc::ENODATA {
            return Ok(None);
        }
        let len = check(|| format!("reading {name} of {object}"), r.into())? as usize;
        buf.truncate(len.min(buf.len()));
        Ok(Some(buf))
    }

    /// Every extended attribute of `object` whose name starts with `prefix`, as (name, value);
    /// none if the object does not exist.
    pub fn xattrs_with_prefix(&self, object: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let o = cstring("object", object)?;
        let mut iter: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: `o` is NUL-terminated; `iter` is a valid out-pointer, ended below.
        let r = unsafe { (self.api().rados_getxattrs)(self.io, o.as_ptr(), &mut iter) };
        if r == -libc::ENOENT {
            return Ok(Vec::new());
        }
        check(|| format!("listing the xattrs of {object}"), r.into())?;
        let mut out = Vec::new();
        let result = loop {
            let (mut name, mut val, mut len): (*const c_char, *const c_char, usize) =
                (std::ptr::null(), std::ptr::null(), 0);
            // SAFETY: `iter` is the live iterator from rados_getxattrs; the out-pointers are valid.
            let r = unsafe { (self.api().rados_getxattrs_next)(iter, &mut name, &mut val, &mut len) };
            if r < 0 {
                break Err(RadosError::call(format!("listing the xattrs of {object}"), r.into()));
            }
            if name.is_null() {
                break Ok(());
            }
            // SAFETY: librados hands a NUL-terminated name and `len` bytes at `val` (or null
            // for an empty value), valid until the next call on the iterator; both are copied now.
            let (n, v) = unsafe {
                let n = CStr::from_ptr(name).to_string_lossy().into_owned();
                let v =
                    if val.is_null() { Vec::new() } else { std::slice::from_raw_parts(val.cast::<u8>(), len).to_vec() };
                (n, v)
            };
            if n.starts_with(prefix) {
                out.push((n, v));
            }
        };
        // SAFETY: the iterator is live and ended once.
        unsafe { (self.api().rados_getxattrs_end)(iter) };
        result.map(|()| out)
    }

    /// Sets the extended attribute `name` of `object` (creating the object), durably.
    pub fn set_xattr(&self, object: &str, name: &str, value: &[u8]) -> Result<()> {
        let (o, n) = (cstring("object", object)?, cstring("xattr", name)?);
        // SAFETY: `value` is valid for its length; both names are NUL-terminated.
        let r =
            unsafe { (self.api().rados_setxattr)(self.io, o.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len()) };
        check(|| format!("setting {name} of {object}"), r.into()).map(drop)
    }

    /// Removes the extended attribute `name` of `object`; absent is fine.
    pub fn remove_xattr(&self, object: &str, name: &str) -> Result<()> {
        let (o, n) = (cstring("object", object)?, cstring("xattr", name)?);
        // SAFETY: both names are NUL-terminated.
        let r = unsafe { (self.api().rados_rmxattr)(self.io, o.as_ptr(), n.as_ptr()) };
        if r == -libc::ENOENT || r == -libc::ENODATA {
            return Ok(());
        }
        check(|| format!("removing {name} of {object}"), r.into()).map(drop)
    }

    /// Takes (or with `renew`, renews) `lock` on `object`. A lock another client holds is
    /// `EBUSY`; renewing a lock no longer held is `ENOENT`.
    pub fn lock(&self, object: &str, lock: &LockSpec<'_>, renew: bool) -> Result<()> {
        let (o, n, c, d) = (
            cstring("object", object)?,
            cstring("lock", lock.name)?,
            cstring("cookie", lock.cookie)?,
            cstring("lock description", lock.description)?,
        );
        let mut tv = Timeval {
            tv_sec: lock.duration.as_secs() as libc::time_t,
            tv_usec: lock.duration.subsec_micros() as libc::suseconds_t,
        };
        // LIBRADOS_LOCK_FLAG_MUST_RENEW: renew only a lock this cookie still holds.
        let flags: u8 = if renew { 1 << 1 } else { 0 };
        let mode = lock.mode;
        let tag = c"parallax";
        // SAFETY: every string is NUL-terminated and alive for the call; `tv` is a valid timeval.
        let r = unsafe {
            match mode {
                LockMode::Exclusive => (self.api().rados_lock_exclusive)(
                    self.io,
                    o.as_ptr(),
                    n.as_ptr(),
                    c.as_ptr(),
                    d.as_ptr(),
                    &mut tv,
                    flags,
                ),
                LockMode::Shared => (self.api().rados_lock_shared)(
                    self.io,
                    o.as_ptr(),
                    n.as_ptr(),
                    c.as_ptr(),
                    tag.as_ptr(),
                    d.as_ptr(),
                    &mut tv,
                    flags,
                ),
            }
        };
        check(|| format!("locking {object}"), r.into()).map(drop)
    }

    /// Releases the lock `name` on `object` held with `cookie`; a lock already gone is fine.
    pub fn unlock(&self, object: &str, name: &str, cookie: &str) -> Result<()> {
        let (o, n, c) = (cstring("object", object)?, cstring("lock", name)?, cstring("cookie", cookie)?);
        // SAFETY: every string is NUL-terminated.
        let r = unsafe { (self.api().rados_unlock)(self.io, o.as_ptr(), n.as_ptr(), c.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(|| format!("unlocking {object}"), r.into()).map(drop)
    }

    /// Who holds the lock `name` on `object` now.
    pub fn lockers(&self, object: &str, name: &str) -> Result<Vec<Locker>> {
        self.lock_holders(object, name).map(|(_, l)| l)
    }

    /// Who holds the lock `name` on `object` now, and whether it is held exclusively.
    pub fn lock_holders(&self, object: &str, name: &str) -> Result<(bool, Vec<Locker>)> {
        let (o, n) = (cstring("object", object)?, cstring("lock", name)?);
        let mut sizes = [256usize; 4];
        loop {
            let mut bufs: [Vec<u8>; 4] = sizes.map(|s| vec![0u8; s]);
            let mut lens = sizes;
            let mut exclusive = 0;
            let [tag, clients, cookies, addrs] = &mut bufs;
            // SAFETY: each buffer is valid for the length passed beside it; librados writes
            // the lengths it needs when they are too short (-ERANGE).
            let r = unsafe {
                (self.api().rados_list_lockers)(
                    self.io,
                    o.as_ptr(),
                    n.as_ptr(),
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    &mut lens[0],
                    clients.as_mut_ptr().cast(),
                    &mut lens[1],
                    cookies.as_mut_ptr().cast(),
                    &mut lens[2],
                    addrs.as_mut_ptr().cast(),
                    &mut lens[3],
                )
            };
            if r == -(libc::ERANGE as isize) && lens.iter().zip(&sizes).any(|(l, s)| l > s) {
                sizes = lens.map(|l| l.max(1));
                continue;
            }
            if r == -(libc::ENOENT as isize) {
                return Ok((false, Vec::new()));
            }
            let count = check(|| format!("listing the lockers of {object}"), r as i64)? as usize;
            let split = |b: &[u8], len: usize| -> Vec<String> {
                b[..len.min(b.len())].split(|&c| c == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
            };
            let (cl, co, ad) = (split(clients, lens[1]), split(cookies, lens[2]), split(addrs, lens[3]));
            let holders = (0..count)
                .filter_map(|i| {
                    Some(Locker { client: cl.get(i)?.clone(), cookie: co.get(i)?.clone(), address: ad.get(i)?.clone() })
                })
                .collect();
            return Ok((exclusive != 0 && count > 0, holders));
        }
    }

    /// Breaks `locker`'s lock `name` on `object` (fence it first: see [`Cluster::blocklist`]).
    pub fn break_lock(&self, object: &str, name: &str, locker: &Locker) -> Result<()> {
        let (o, n, cl, co) = (
            cstring("object", object)?,
            cstring("lock", name)?,
            cstring("client", &locker.client)?,
            cstring("cookie", &locker.cookie)?,
        );
        // SAFETY: every string is NUL-terminated.
        let r = unsafe { (self.api().rados_break_lock)(self.io, o.as_ptr(), n.as_ptr(), cl.as_ptr(), co.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(|| format!("breaking {}'s lock on {object}", locker.client), r.into()).map(drop)
    }
}

/// A watch on one object ([`Pool::watch`]).
pub struct Watch {
    pool: Arc<Pool>,
    handle: u64,
    state: *mut WatchState,
    notified: Receiver<()>,
}

/// What the watch callbacks reach through their `arg`.
struct WatchState {
    api: &'static Api,
    io: IoctxT,
    object: CString,
    sender: Sender<()>,
    /// Set when librados reports the watch failed: it hears nothing more and must be replaced.
    broken: std::sync::atomic::AtomicBool,
}

impl Watch {
    /// Receives once for each notify (several close together may arrive as one), and when the
    /// watch itself fails (the client lost the OSD for longer than the watch timeout): either
    /// way, time to look again at what is watched.
    pub fn notified(&self) -> &Receiver<()> {
        &self.notified
    }

    /// True once librados has reported the watch failed: it will hear of no more notifies, and
    /// a new one must be made ([`Pool::watch`]).
    pub fn is_broken(&self) -> bool {
        // SAFETY: `state` lives as long as `self` (freed in `drop`).
        unsafe { &*self.state }.broken.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let api = self.pool.api();
        // SAFETY: the watch is registered on this live context and unregistered once; the
        // flush returns after every callback already queued has run, so none can reach
        // `state` once it is freed below.
        unsafe {
            (api.rados_unwatch2)(self.pool.io, self.handle);
            (api.rados_watch_flush)(self.pool.cluster.handle);
            drop(Box::from_raw(self.state));
        }
    }
}

/// A notify on a watched object: wake the waiter, and acknowledge at once so the notifier does
/// not wait out its timeout.
unsafe extern "C" fn on_notify(
    arg: *mut c_void,
    notify_id: u64,
    handle: u64,
    _notifier: u64,
    _: *mut c_void,
    _: usize,
) {
    // SAFETY: `arg` is the `WatchState` of a registered watch, freed only after the watch is
    // unregistered and its callbacks flushed (`Watch::drop`).
    let state = unsafe { &*arg.cast::<WatchState>() };
    let _ = state.sender.try_send(());
    // SAFETY: the context outlives the watch; the object name is NUL-terminated; no payload.
    // The acknowledgement is sent without waiting for its reply, so it cannot block this
    // librados thread.
    unsafe { (state.api.rados_notify_ack)(state.io, state.object.as_ptr(), notify_id, handle, std::ptr::null(), 0) };
}

/// The watch failed: wake the waiter, which looks again for itself.
unsafe extern "C" fn on_watch_error(arg: *mut c_void, _handle: u64, _err: c_int) {
    // SAFETY: as in `on_notify`.
    let state = unsafe { &*arg.cast::<WatchState>() };
    state.broken.store(true, std::sync::atomic::Ordering::Release);
    let _ = state.sender.try_send(());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ceph df detail --format json` of Ceph 16.2 (a single-OSD test cluster), cut down.
    const DF: &str = r#"{"stats":{"total_bytes":4294967296,"total_avail_bytes":4252036765},
        "pools":[{"name":"device_health_metrics","id":1,"stats":{"stored":0,"objects":0,
        "max_avail":4037287680,"quota_objects":0,"quota_bytes":0}},
        {"name":"vms","id":2,"stats":{"stored":4096,"objects":5,"bytes_used":4096,
        "max_avail":4037287680,"quota_objects":0,"quota_bytes":QUOTA}}]}"#;

    /// `ceph pg dump pools --format json` of Ceph 16.2, cut down: pool 2 holds objects 12 MiB
    /// long of which one block was written (STORED above).
    const PG: &str = r#"{"pg_ready":true,"pool_stats":[{"poolid":2,"num_pg":8,
        "stat_sum":{"num_bytes":12582912,"num_objects":5}},
        {"poolid":1,"num_pg":1,"stat_sum":{"num_bytes":0,"num_objects":0}}]}"#;

    fn room(quota: u64) -> Result<PoolRoom> {
        PoolRoom::parse("vms", 2, DF.replace("QUOTA", &quota.to_string()).as_bytes(), PG.as_bytes())
    }

    #[test]
    fn a_quota_caps_the_room_and_counts_lengths_not_bytes_written() {
        assert_eq!(room(16 << 20).unwrap(), PoolRoom { used: 12 << 20, quota: Some(16 << 20), available: 4 << 20 });
        // Past its quota (the monitors mark it full a little later), nothing is available.
        assert_eq!(room(8 << 20).unwrap().available, 0);
        // A quota larger than the cluster's room: the cluster's room.
        assert_eq!(room(1 << 40).unwrap().available, 4037287680);
    }

    #[test]
    fn no_quota_is_none_and_the_cluster_room_is_all() {
        assert_eq!(room(0).unwrap(), PoolRoom { used: 12 << 20, quota: None, available: 4037287680 });
    }

    #[test]
    fn a_pool_without_figures_yet_says_so() {
        let err = PoolRoom::parse("new", 7, DF.replace("QUOTA", "0").as_bytes(), PG.as_bytes()).unwrap_err();
        assert!(matches!(&err, RadosError::NoPoolFigures(p) if p == "new"), "{err}");
        assert!(err.to_string().contains("created moments ago"), "{err}");
    }

    #[test]
    fn answers_that_do_not_fit_are_errors_that_say_what_is_missing() {
        let df = DF.replace("QUOTA", "0");
        let err = |df: &str, pg: &str| PoolRoom::parse("vms", 2, df.as_bytes(), pg.as_bytes()).unwrap_err().to_string();
        assert!(err("not json", PG).contains("`ceph df detail` is not JSON"));
        assert!(err("{}", PG).contains("no pools list"));
        let no_avail = r#"{"pools":[{"id":2,"stats":{"quota_bytes":0}}]}"#;
        assert!(err(no_avail, PG).contains("no byte count max_avail"));
        let negative = r#"{"pools":[{"id":2,"stats":{"max_avail":-1,"quota_bytes":0}}]}"#;
        assert!(err(negative, PG).contains("no byte count max_avail"));
        // A counter below zero for a moment is nothing used, not a broken answer.
        let dipped = r#"{"pool_stats":[{"poolid":2,"stat_sum":{"num_bytes":-4096}}]}"#;
        assert_eq!(PoolRoom::parse("vms", 2, df.as_bytes(), dipped.as_bytes()).unwrap().used, 0);
        assert!(err(&df, "").contains("`ceph pg dump pools` is not JSON"));
        assert!(err(&df, r#"{"pool_stats":[{"poolid":2}]}"#).contains("no stat_sum"));
        assert!(err(&df, r#"{"pool_stats":[{"poolid":2,"stat_sum":{}}]}"#).contains("no byte count num_bytes"));
    }
}
