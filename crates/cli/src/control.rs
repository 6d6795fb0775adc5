//! The control socket: how `vdi` commands reach a store that parallaxd holds open.
//!
//! # Finding the socket
//! [`control_socket_path`] is a pure function of the store's canonical path, so the daemon and
//! every client agree on it with no configuration: `<run dir>/store-<FNV-1a 64 of the canonical
//! path, 16 hex digits>.sock`. The run directory is `$PARALLAX_RUN_DIR` if set, else
//! `/run/parallax` if it exists and is writable or can be created, else `/tmp/parallax-<uid>`.
//!
//! # Protocol (one request per connection)
//! - Request, client → daemon: `b"PXC1"`, a u32 (little endian) payload length, then the
//!   payload: for each argument a u32 length and its UTF-8 bytes. The arguments are the
//!   command line after the program name, with every path made absolute. The first `sendmsg`
//!   carries three descriptors with `SCM_RIGHTS`: the client's stdin, stdout and stderr.
//!   Limits: [`MAX_REQUEST`] bytes, [`MAX_ARGS`] arguments.
//! - The daemon runs the command with those descriptors as its streams.
//! - Reply, daemon → client: `b"PXR1"` and the exit code as an i32 (little endian).
//!
//! The daemon serves only peers with its own uid or root, and the socket is mode 0600.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use clap::ValueHint;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage};

/// Largest request accepted, header excluded.
pub const MAX_REQUEST: usize = 1 << 20;
/// Most arguments in one request.
pub const MAX_ARGS: usize = 4096;
/// Most connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 64;

const REQUEST_MAGIC: [u8; 4] = *b"PXC1";
const REPLY_MAGIC: [u8; 4] = *b"PXR1";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the daemon runs for each request: the arguments (after the program name) and the
/// client's stdin, stdout and stderr; returns the exit code.
pub type Handler = Arc<dyn Fn(Vec<String>, File, File, File) -> i32 + Send + Sync>;

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
    let canonical =
        std::fs::canonicalize(store).or_else(|_| std::path::absolute(store)).unwrap_or_else(|_| store.to_path_buf());
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

/// For the daemon, all in one: binds the control socket of `store` ([`bind_control_socket`])
/// and serves `vdi` commands on `reg` ([`registry_handler`]) in a new thread until `stop` is
/// set; the thread then waits for running commands and removes the socket file.
pub fn spawn_control(
    store: &Path,
    reg: Arc<vdi::Registry>,
    stop: Arc<AtomicBool>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let listener = bind_control_socket(store)?;
    let path = control_socket_path(store);
    tracing::info!("serving vdi commands on {}", path.display());
    std::thread::Builder::new().name("vdi-control-accept".into()).spawn(move || {
        if let Err(e) = serve_control(listener, registry_handler(reg), stop) {
            tracing::error!("control socket {}: {e}", path.display());
        }
        let _ = std::fs::remove_file(&path);
    })
}

/// A [`Handler`] that runs each request with [`crate::execute`] on `reg`.
pub fn registry_handler(reg: Arc<vdi::Registry>) -> Handler {
    Arc::new(move |args, _stdin, mut stdout, mut stderr| {
        use std::io::IsTerminal;
        let tty = stderr.is_terminal();
        let width = crate::terminal_width(&stderr);
        crate::execute_with_width(&reg, args, &mut stdout, &mut stderr, tty, width)
    })
}

/// Serves requests on `listener` until `stop` is set (checked every 50 ms): one thread per
/// connection, at most [`MAX_CONNECTIONS`] at once. Bad requests are answered with exit code
/// 2 or dropped; nothing a client sends can make this panic. Returns once `stop` is set and
/// the commands already running have finished.
pub fn serve_control(listener: UnixListener, handler: Handler, stop: Arc<AtomicBool>) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let active = Arc::new(AtomicUsize::new(0));
    let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                threads.retain(|t| !t.is_finished());
                if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                    tracing::warn!("control socket: too many connections, refusing one");
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (handler, active) = (handler.clone(), active.clone());
                let spawned = std::thread::Builder::new().name("vdi-control".into()).spawn(move || {
                    if let Err(e) = serve_one(stream, &handler) {
                        tracing::warn!("control socket: {e}");
                    }
                    active.fetch_sub(1, Ordering::AcqRel);
                });
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => tracing::error!("control socket: cannot start a thread: {e}"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one request: the arguments and the three descriptors.
fn read_request(stream: &UnixStream) -> io::Result<(Vec<String>, Vec<OwnedFd>)> {
    let mut first = vec![0u8; 64 * 1024];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        match rustix::net::recvmsg(stream, &mut [IoSliceMut::new(&mut first)], &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(r) => break r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    let mut data = first[..received.bytes.min(first.len())].to_vec();
    if data.is_empty() {
        return Err(bad("the client sent nothing"));
    }
    let mut reader = stream;
    while data.len() < 8 {
        read_more(&mut reader, &mut data, 8)?;
    }
    if data[..4] != REQUEST_MAGIC {
        return Err(bad("not a vdi control request"));
    }
    let len = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize;
    if len > MAX_REQUEST {
        return Err(bad(format!("request of {len} bytes is over the limit of {MAX_REQUEST}")));
    }
    while data.len() < 8 + len {
        read_more(&mut reader, &mut data, 8 + len)?;
    }
    if data.len() > 8 + len {
        return Err(bad("trailing bytes after the request"));
    }
    let args = decode_args(&data[8..])?;
    Ok((args, fds))
}

/// Reads more of the request, up to `total` bytes in all.
fn read_more(reader: &mut &UnixStream, data: &mut Vec<u8>, total: usize) -> io::Result<()> {
    let want = total.saturating_sub(data.len());
    let mut buf = vec![0u8; want.clamp(1, 64 * 1024)];
    let n = loop {
        match reader.read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    if n == 0 {
        return Err(bad("the client hung up in the middle of its request"));
    }
    data.extend_from_slice(&buf[..n]);
    Ok(())
}

/// Encodes arguments as the request payload.
fn encode_args(args: &[String]) -> io::Result<Vec<u8>> {
    if args.len() > MAX_ARGS {
        return Err(bad(format!("more than {MAX_ARGS} arguments")));
    }
    let mut payload = Vec::new();
    for a in args {
        let len = u32::try_from(a.len()).map_err(|_| bad("argument too long"))?;
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(a.as_bytes());
    }
    if payload.len() > MAX_REQUEST {
        return Err(bad(format!("the command line is over {MAX_REQUEST} bytes")));
    }
    let mut msg = Vec::with_capacity(8 + payload.len());
    msg.extend_from_slice(&REQUEST_MAGIC);
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(&payload);
    Ok(msg)
}

/// Decodes a request payload into arguments, checking every length.
fn decode_args(mut payload: &[u8]) -> io::Result<Vec<String>> {
    let mut args = Vec::new();
    while !payload.is_empty() {
        if args.len() >= MAX_ARGS {
            return Err(bad(format!("more than {MAX_ARGS} arguments")));
        }
        let Some((len, rest)) = payload.split_first_chunk::<4>() else {
            return Err(bad("truncated argument length"));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(bad("argument longer than the request"));
        }
        let (arg, rest) = rest.split_at(len);
        args.push(String::from_utf8(arg.to_vec()).map_err(|_| bad("argument is not UTF-8"))?);
        payload = rest;
    }
    Ok(args)
}

fn reply(mut stream: &UnixStream, code: i32) -> io::Result<()> {
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&REPLY_MAGIC);
    msg[4..].copy_from_slice(&code.to_le_bytes());
    stream.write_all(&msg)
}

fn serve_one(stream: UnixStream, handler: &Handler) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let (args, fds) = match read_request(&stream) {
        Ok(r) => r,
        Err(e) => {
            let _ = reply(&stream, crate::error::EXIT_USER);
            return Err(e);
        }
    };
    let [stdin, stdout, stderr]: [OwnedFd; 3] = match fds.try_into() {
        Ok(f) => f,
        Err(fds) => {
            let _ = reply(&stream, crate::error::EXIT_USER);
            return Err(bad(format!("expected 3 descriptors (stdin, stdout, stderr), got {}", fds.len())));
        }
    };
    let (stdin, stdout, mut stderr) = (File::from(stdin), File::from(stdout), File::from(stderr));
    let peer = rustix::net::sockopt::socket_peercred(&stream)?;
    let me = rustix::process::getuid();
    if !(peer.uid.is_root() || peer.uid == me) {
        let _ = writeln!(
            stderr,
            "vdi: error: parallaxd runs as uid {} and serves only that user and root; run vdi as one of them",
            me.as_raw()
        );
        return reply(&stream, crate::error::EXIT_USER);
    }
    let handler = handler.clone();
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || handler(args, stdin, stdout, stderr)))
        .unwrap_or_else(|_| {
            tracing::error!("control socket: a command panicked");
            crate::error::EXIT_FAILURE
        });
    reply(&stream, code)
}

/// Sends `args` with this process's stdin, stdout and stderr to the daemon at `socket` and
/// waits for the exit code. `Ok(None)`: nobody is listening there (no daemon, stale socket),
/// nothing was sent. `Err`: the request was sent but no exit code came back.
pub fn forward(socket: &Path, args: &[String]) -> io::Result<Option<i32>> {
    let Ok(stream) = UnixStream::connect(socket) else { return Ok(None) };
    let msg = encode_args(args)?;
    let (stdin, stdout, stderr) = (io::stdin(), io::stdout(), io::stderr());
    let fds = [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(bad("cannot attach the descriptors"));
    }
    let sent = loop {
        match rustix::net::sendmsg(&stream, &[IoSlice::new(&msg)], &mut control, rustix::net::SendFlags::empty()) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            // The daemon went away between connect and send: nothing ran, run locally.
            Err(_) => return Ok(None),
        }
    };
    let mut w = &stream;
    w.write_all(&msg[sent..])?;
    let mut answer = [0u8; 8];
    let mut r = &stream;
    r.read_exact(&mut answer).map_err(|e| {
        io::Error::new(e.kind(), format!("parallaxd did not report how the command ended ({e}); it may have stopped"))
    })?;
    if answer[..4] != REPLY_MAGIC {
        return Err(bad("parallaxd sent a malformed reply"));
    }
    Ok(Some(i32::from_le_bytes([answer[4], answer[5], answer[6], answer[7]])))
}

fn is_path(arg: &clap::Arg) -> bool {
    matches!(arg.get_value_hint(), ValueHint::FilePath | ValueHint::AnyPath | ValueHint::DirPath)
}

fn takes_value(arg: &clap::Arg) -> bool {
    arg.get_action().takes_values()
}

/// `args` (after the program name) with every path argument of the `vdi` command line made
/// absolute against `cwd`; `-` and absolute paths are left as they are.
pub fn absolutize_args(args: &[String], cwd: &Path) -> Vec<String> {
    let root = crate::args::command();
    let abs = |v: &str| -> String {
        if v == "-" || v.is_empty() || Path::new(v).is_absolute() {
            v.to_string()
        } else {
            cwd.join(v).to_string_lossy().into_owned()
        }
    };
    let mut cur: &clap::Command = &root;
    let mut out = Vec::with_capacity(args.len());
    let mut positional = 0usize;
    let mut only_positional = false;
    let mut i = 0;
    while i < args.len() {
        let tok = &args[i];
        i += 1;
        if !only_positional && tok == "--" {
            only_positional = true;
            out.push(tok.clone());
        } else if !only_positional && let Some(body) = tok.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let arg = cur
                .get_arguments()
                .find(|a| a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|al| al.contains(&name)));
            match (arg, inline) {
                (Some(a), Some(v)) if takes_value(a) && is_path(a) => out.push(format!("--{name}={}", abs(v))),
                (Some(a), None) if takes_value(a) => {
                    out.push(tok.clone());
                    if let Some(v) = args.get(i) {
                        out.push(if is_path(a) { abs(v) } else { v.clone() });
                        i += 1;
                    }
                }
                _ => out.push(tok.clone()),
            }
        } else if !only_positional && tok.len() > 1 && tok.starts_with('-') {
            // A cluster of short flags; the first one that takes a value takes the rest of the
            // token, or the next token.
            let mut rewritten = String::from("-");
            let mut next_is_value: Option<bool> = None;
            for (at, c) in tok[1..].char_indices() {
                rewritten.push(c);
                if let Some(a) = cur.get_arguments().find(|a| a.get_short() == Some(c))
                    && takes_value(a)
                {
                    let rest = &tok[1 + at + c.len_utf8()..];
                    if rest.is_empty() {
                        next_is_value = Some(is_path(a));
                    } else {
                        let rest = rest.strip_prefix('=').unwrap_or(rest);
                        let value = if is_path(a) { abs(rest) } else { rest.to_string() };
                        rewritten.push_str(&value);
                    }
                    break;
                }
            }
            out.push(rewritten);
            if let Some(path) = next_is_value
                && let Some(v) = args.get(i)
            {
                out.push(if path { abs(v) } else { v.clone() });
                i += 1;
            }
        } else if positional == 0 && cur.has_subcommands() {
            if let Some(sub) = cur.find_subcommand(tok) {
                cur = sub;
            }
            out.push(tok.clone());
        } else {
            let pos: Vec<&clap::Arg> = cur.get_positionals().collect();
            let arg =
                pos.get(positional).or(pos.last().filter(|a| a.get_num_args().is_some_and(|n| n.max_values() > 1)));
            out.push(if arg.is_some_and(|a| is_path(a)) { abs(tok) } else { tok.clone() });
            positional += 1;
        }
    }
    out
}

/// For the `vdi` binary: if a daemon serves the store at `store`, runs the command there and
/// returns its exit code; `None` to run it here. Failures after the request was sent are
/// reported on stderr and give exit code 3.
pub fn try_forward(store: &Path, args: &[std::ffi::OsString]) -> Option<i32> {
    let canonical = std::fs::canonicalize(store).ok()?;
    let socket = control_socket_path(&canonical);
    if !socket.exists() {
        return None;
    }
    let args: Vec<String> = args.iter().map(|a| a.to_str().map(str::to_string)).collect::<Option<_>>()?;
    let cwd = std::env::current_dir().ok()?;
    match forward(&socket, &absolutize_args(&args, &cwd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vdi: error: forwarding to parallaxd through {}: {e}", socket.display());
            Some(crate::error::EXIT_FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

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

    #[test]
    fn paths_made_absolute_and_nothing_else() {
        let cwd = Path::new("/home/u");
        assert_eq!(absolutize_args(&s(&["fill", "0", "img"]), cwd), s(&["fill", "0", "/home/u/img"]));
        assert_eq!(
            absolutize_args(&s(&["--store", "s.dat", "import", "my disk", "./a/img", "--wait"]), cwd),
            s(&["--store", "/home/u/s.dat", "import", "my disk", "/home/u/./a/img", "--wait"])
        );
        assert_eq!(
            absolutize_args(&s(&["export", "-s", "3", "-", "--store=x"]), cwd),
            s(&["export", "-s", "3", "-", "--store=/home/u/x"])
        );
        assert_eq!(absolutize_args(&s(&["create", "rel", "--size", "1G"]), cwd), s(&["create", "rel", "--size", "1G"]));
        assert_eq!(
            absolutize_args(&s(&["tree", "-o", "t.svg", "--format", "svg"]), cwd),
            s(&["tree", "-o", "/home/u/t.svg", "--format", "svg"])
        );
        assert_eq!(absolutize_args(&s(&["tree", "-ot.svg"]), cwd), s(&["tree", "-o/home/u/t.svg"]));
        assert_eq!(
            absolutize_args(&s(&["validate", "--", "-x", "/abs/img"]), cwd),
            s(&["validate", "--", "-x", "/abs/img"])
        );
        assert_eq!(absolutize_args(&s(&["validate", "vm", "i"]), cwd), s(&["validate", "vm", "/home/u/i"]));
    }

    #[test]
    fn args_round_trip_and_bad_payloads_are_refused() {
        let args = s(&["create", "ünïcode name", ""]);
        let msg = encode_args(&args).unwrap();
        assert_eq!(&msg[..4], b"PXC1");
        assert_eq!(decode_args(&msg[8..]).unwrap(), args);
        assert!(decode_args(&[1, 0, 0]).is_err());
        assert!(decode_args(&[9, 0, 0, 0, b'a']).is_err());
        assert!(decode_args(&[2, 0, 0, 0, 0xff, 0xfe]).is_err());
        assert!(decode_args(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
