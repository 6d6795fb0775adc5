//! librados' C API, opened at run time. The only unsafe code of the crate: each call site in
//! [`crate::client`] states why its pointers are valid.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

/// `rados_t`: a cluster handle.
pub type RadosT = *mut c_void;
/// `rados_ioctx_t`: a pool (and namespace) handle.
pub type IoctxT = *mut c_void;
/// `rados_write_op_t`: a compound write, applied to one object atomically.
pub type WriteOpT = *mut c_void;

/// `rados_watchcb2_t`: called on a librados thread for each notify on a watched object
/// (`arg`, notify id, watch handle, notifier id, payload, payload length).
pub type WatchCb = unsafe extern "C" fn(*mut c_void, u64, u64, u64, *mut c_void, usize);
/// `rados_watcherrcb_t`: called on a librados thread when a watch fails (`arg`, handle, error).
pub type WatchErrCb = unsafe extern "C" fn(*mut c_void, u64, c_int);

/// `struct timeval` as librados takes it for lock durations.
#[repr(C)]
pub struct Timeval {
    /// Seconds.
    pub tv_sec: libc::time_t,
    /// Microseconds.
    pub tv_usec: libc::suseconds_t,
}

/// The file librados ships as (Debian's librados2).
pub const LIBRARY: &str = "librados.so.2";

macro_rules! api {
    ($($name:ident : fn($($arg:ty),*) -> $ret:ty;)*) => {
        /// Entry points of librados, resolved once.
        #[allow(non_snake_case)]
        pub struct Api {
            _lib: libloading::Library,
            $(
                #[doc = concat!("`", stringify!($name), "`")]
                pub $name: unsafe extern "C" fn($($arg),*) -> $ret,
            )*
        }

        impl Api {
            fn load() -> Result<Api, String> {
                // SAFETY: loading librados runs its initialisers, which only set up its own
                // state; the library stays loaded for the life of the process (kept in `_lib`
                // of a static).
                let lib = unsafe { libloading::Library::new(LIBRARY) }.map_err(|e| e.to_string())?;
                $(
                    // SAFETY: the symbol's type is the prototype from librados.h (Ceph 16.2),
                    // written out above; the pointer is used only while `_lib` keeps it loaded.
                    let $name = unsafe {
                        *lib.get::<unsafe extern "C" fn($($arg),*) -> $ret>(concat!(stringify!($name), "\0").as_bytes())
                            .map_err(|e| e.to_string())?
                    };
                )*
                Ok(Api { _lib: lib, $($name,)* })
            }
        }
    };
}

api! {
    rados_create: fn(*mut RadosT, *const c_char) -> c_int;
    rados_conf_read_file: fn(RadosT, *const c_char) -> c_int;
    rados_conf_parse_env: fn(RadosT, *const c_char) -> c_int;
    rados_conf_set: fn(RadosT, *const c_char, *const c_char) -> c_int;
    rados_connect: fn(RadosT) -> c_int;
    rados_shutdown: fn(RadosT) -> ();
    rados_get_instance_id: fn(RadosT) -> u64;
    rados_getaddrs: fn(RadosT, *mut *mut c_char) -> c_int;
    rados_buffer_free: fn(*mut c_char) -> ();
    rados_blocklist_add: fn(RadosT, *mut c_char, u32) -> c_int;
    rados_wait_for_latest_osdmap: fn(RadosT) -> c_int;
    rados_ioctx_create: fn(RadosT, *const c_char, *mut IoctxT) -> c_int;
    rados_ioctx_destroy: fn(IoctxT) -> ();
    rados_ioctx_set_namespace: fn(IoctxT, *const c_char) -> ();
    rados_set_pool_full_try: fn(IoctxT) -> ();
    rados_read: fn(IoctxT, *const c_char, *mut c_char, usize, u64) -> c_int;
    rados_write: fn(IoctxT, *const c_char, *const c_char, usize, u64) -> c_int;
    rados_write_full: fn(IoctxT, *const c_char, *const c_char, usize) -> c_int;
    rados_remove: fn(IoctxT, *const c_char) -> c_int;
    rados_create_write_op: fn() -> WriteOpT;
    rados_release_write_op: fn(WriteOpT) -> ();
    rados_write_op_cmpext: fn(WriteOpT, *const c_char, usize, u64, *mut c_int) -> ();
    rados_write_op_write: fn(WriteOpT, *const c_char, usize, u64) -> ();
    rados_write_op_operate: fn(WriteOpT, IoctxT, *const c_char, *mut libc::time_t, c_int) -> c_int;
    rados_getxattr: fn(IoctxT, *const c_char, *const c_char, *mut c_char, usize) -> c_int;
    rados_setxattr: fn(IoctxT, *const c_char, *const c_char, *const c_char, usize) -> c_int;
    rados_rmxattr: fn(IoctxT, *const c_char, *const c_char) -> c_int;
    rados_getxattrs: fn(IoctxT, *const c_char, *mut *mut c_void) -> c_int;
    rados_getxattrs_next: fn(*mut c_void, *mut *const c_char, *mut *const c_char, *mut usize) -> c_int;
    rados_getxattrs_end: fn(*mut c_void) -> ();
    rados_lock_exclusive: fn(IoctxT, *const c_char, *const c_char, *const c_char, *const c_char, *mut Timeval, u8) -> c_int;
    rados_lock_shared: fn(IoctxT, *const c_char, *const c_char, *const c_char, *const c_char, *const c_char, *mut Timeval, u8) -> c_int;
    rados_unlock: fn(IoctxT, *const c_char, *const c_char, *const c_char) -> c_int;
    rados_list_lockers: fn(IoctxT, *const c_char, *const c_char, *mut c_int, *mut c_char, *mut usize, *mut c_char, *mut usize, *mut c_char, *mut usize, *mut c_char, *mut usize) -> isize;
    rados_watch2: fn(IoctxT, *const c_char, *mut u64, Option<WatchCb>, Option<WatchErrCb>, *mut c_void) -> c_int;
    rados_unwatch2: fn(IoctxT, u64) -> c_int;
    rados_watch_flush: fn(RadosT) -> c_int;
    rados_notify_ack: fn(IoctxT, *const c_char, u64, u64, *const c_char, c_int) -> c_int;
    rados_notify2: fn(IoctxT, *const c_char, *const c_char, c_int, u64, *mut *mut c_char, *mut usize) -> c_int;
    rados_break_lock: fn(IoctxT, *const c_char, *const c_char, *const c_char, *const c_char) -> c_int;
    rados_mon_command: fn(RadosT, *mut *const c_char, usize, *const c_char, usize, *mut *mut c_char, *mut usize, *mut *mut c_char, *mut usize) -> c_int;
    rados_ioctx_get_id: fn(IoctxT) -> i64;
}

/// librados, loaded on first use; the error says why it could not be.
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(Api::load).as_ref().map_err(Clone::clone)
}
