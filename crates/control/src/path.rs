//! Where a store's control socket lives.
//!
//! [`control_socket_path`] is a pure function of the store's canonical path, so the daemon and
//! every client agree on it with no configuration: `<run dir>/store-<FNV-1a 64 of the canonical
//! path, 16 hex digits>.sock`. The run directory is `$PARALLAX_RUN_DIR` if set, else
//! `/run/parallax` if it exists and is writable or can be created, else `/tmp/parallax-<uid>`.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// 64-bit FNV-1a.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn writable(dir: &Path) -> bool {
    rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_ok()
}

/// The directory control sockets live in (see the module documentation). Creates nothing.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PARALLAX_RUN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let run = Path::new("/run/parallax");
    let usable = if run.is_dir() { writable(run) } else { Path::new("/run").is_dir() && writable(Path::new("/run")) };
    if usable {
        run.to_path_buf()
    } else {
        PathBuf::from(format!("/tmp/parallax-{}", rustix::process::getuid().as_raw()))
    }
}

/// The control socket of the store at `store`, in [`run_dir`]. The store path is
/// canonicalized (made absolute if it does not exist).
pub fn control_socket_path(store: &Path) -> PathBuf {
    control_socket_path_in(&run_dir(), store)
}

/// The control socket of the store at `store`, in directory `dir`.
pub fn control_socket_path_in(dir: &Path, store: &Path) -> PathBuf {
    // A store in RADOS (`rados:POOL[/NAMESPACE]`) is named the same from any directory.
    let canonical = if store.as_os_str().as_bytes().starts_with(b"rados:") {
        store.to_path_buf()
    } else {
        std::fs::canonicalize(store).or_else(|_| std::path::absolute(store)).unwrap_or_else(|_| store.to_path_buf())
    };
    dir.join(format!("store-{:016x}.sock", fnv1a64(canonical.as_os_str().as_bytes())))
}

/// For the daemon: creates the run directory if needed and binds the control socket of
/// `store` (mode 0600). A stale socket file is replaced; a live one (another daemon) gives
/// `AddrInUse`.
pub fn bind_control_socket(store: &Path) -> io::Result<UnixListener> {
    bind_control_socket_in(&run_dir(), store)
}

/// [`bind_control_socket`] in directory `dir`.
pub fn bind_control_socket_in(dir: &Path, store: &Path) -> io::Result<UnixListener> {
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let path = control_socket_path_in(dir, store);
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_is_deterministic_and_short() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("s.dat");
        std::fs::write(&store, b"x").unwrap();
        let a = control_socket_path_in(Path::new("/run/parallax"), &store);
        let b = control_socket_path_in(Path::new("/run/parallax"), &d.path().join(".").join("s.dat"));
        assert_eq!(a, b);
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("store-") && name.ends_with(".sock") && name.len() == 6 + 16 + 5, "{name}");
        let other = control_socket_path_in(Path::new("/run/parallax"), &d.path().join("t.dat"));
        assert_ne!(a, other);
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
