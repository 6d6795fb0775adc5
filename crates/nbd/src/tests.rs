//! Protocol tests: a scripted client drives raw bytes over a `UnixStream::pair()`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blockdev::{BlockDevice, DevResult, Extent, ExtentKind, MemDisk, TryRead};
use parking_lot::Mutex;

use crate::wire::{self, Request};
use crate::{ExportInfo, ExportProvider, InputPolling, Limits, NbdError, OpenError, serve_connection};

const DISK_SIZE: u64 = 1 << 20;

/// Exports "disk" (read-write MemDisk), "ro" (read-only), "slow" (a [`SlowDisk`]), refuses
/// "busy" by policy and knows nothing else.
struct TestExports {
    disks: HashMap<String, Arc<dyn BlockDevice>>,
}

impl TestExports {
    fn new(slow: Arc<SlowDisk>) -> Arc<Self> {
        let mut disks: HashMap<String, Arc<dyn BlockDevice>> = HashMap::new();
        disks.insert("disk".into(), Arc::new(MemDisk::new(DISK_SIZE)));
        disks.insert("ro".into(), Arc::new(MemDisk::new(DISK_SIZE).into_read_only()));
        disks.insert("slow".into(), slow);
        Arc::new(TestExports { disks })
    }

    /// One export, "disk", served from `disk`.
    fn only(disk: Arc<dyn BlockDevice>) -> Arc<Self> {
        Arc::new(TestExports { disks: HashMap::from([("disk".to_string(), disk)]) })
    }
}

impl ExportProvider for TestExports {
    fn list(&self) -> Vec<ExportInfo> {
        vec![ExportInfo::new("disk", "the test disk"), ExportInfo::new("ro", "")]
    }

    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, OpenError> {
        if name == "busy" {
            return Err(OpenError::Refused("open for writing elsewhere".into()));
        }
        if name == "slow-open" {
            // As the daemon waiting for a previous writer to let go.
            thread::sleep(SLOW_OPEN);
            return self.open("disk");
        }
        self.disks.get(name).cloned().ok_or_else(|| OpenError::Unknown(format!("no export {name:?}")))
    }
}

/// A MemDisk that sleeps in chosen operations and logs when they start and end.
struct SlowDisk {
    inner: MemDisk,
    read_delay_at: Option<(u64, Duration)>,
    write_delay: Duration,
    log: Mutex<Vec<String>>,
}

impl SlowDisk {
    fn new(read_delay_at: Option<(u64, Duration)>, write_delay: Duration) -> Arc<Self> {
        Arc::new(SlowDisk { inner: MemDisk::new(DISK_SIZE), read_delay_at, write_delay, log: Mutex::new(Vec::new()) })
    }

    /// A disk of `size` bytes without delays.
    fn of_size(size: u64) -> Arc<Self> {
        Arc::new(SlowDisk {
            inner: MemDisk::new(size),
            read_delay_at: None,
            write_delay: Duration::ZERO,
            log: Mutex::new(Vec::new()),
        })
    }
}

impl BlockDevice for SlowDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        if let Some((at, d)) = self.read_delay_at
            && at == offset
        {
            thread::sleep(d);
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<()> {
        self.log.lock().push(format!("write-start {offset}"));
        thread::sleep(self.write_delay);
        let r = self.inner.write_at(offset, data, fua);
        self.log.lock().push(format!("write-end {offset}"));
        r
    }
    fn flush(&self) -> DevResult<()> {
        self.log.lock().push("flush".into());
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.inner.discard(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
}

type ServerThread = JoinHandle<Result<(), NbdError>>;

fn start_with(provider: Arc<dyn ExportProvider>, limits: Limits) -> (Client, ServerThread) {
    let (client, server) = UnixStream::pair().expect("socketpair");
    client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let t = thread::spawn(move || serve_connection(server, &*provider, &limits));
    (Client { s: client }, t)
}

fn start() -> (Client, ServerThread) {
    start_with(TestExports::new(SlowDisk::new(None, Duration::ZERO)), Limits::default())
}

fn join(t: ServerThread) -> Result<(), NbdError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !t.is_finished() {
        assert!(Instant::now() < deadline, "server thread did not finish");
        thread::sleep(Duration::from_millis(5));
    }
    t.join().expect("server thread panicked")
}

struct Client<S = UnixStream> {
    s: S,
}

struct Chunk {
    flags: u16,
    typ: u16,
    handle: u64,
    payload: Vec<u8>,
}

impl<S: Read + Write> Client<S> {
    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read from server");
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_n(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_n(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_n(8).try_into().unwrap())
    }

    /// True if the server closed the stream (EOF or reset) without sending anything more.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    fn greet(&mut self, client_flags: u32) {
        assert_eq!(self.u64(), wire::NBD_MAGIC);
        assert_eq!(self.u64(), wire::IHAVEOPT);
        assert_eq!(self.u16(), wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES);
        self.s.write_all(&client_flags.to_be_bytes()).unwrap();
    }

    fn send_opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = wire::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Sends an option and collects replies up to the final one: (reply type, data) pairs.
    fn opt(&mut self, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_opt(opt, data);
        let mut out = Vec::new();
        loop {
            assert_eq!(self.u64(), wire::OPT_REPLY_MAGIC);
            assert_eq!(self.u32(), opt);
            let typ = self.u32();
            let len = self.u32() as usize;
            let d = self.read_n(len);
            out.push((typ, d));
            if typ == wire::REP_ACK || typ & (1 << 31) != 0 {
                return out;
            }
        }
    }

    /// Full handshake with NBD_OPT_GO; returns (size, transmission flags).
    fn go(&mut self, name: &str, structured: bool, meta: bool) -> (u64, u16) {
        self.greet(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES);
        if structured {
            assert_eq!(self.opt(wire::OPT_STRUCTURED_REPLY, &[])[0].0, wire::REP_ACK);
        }
        if meta {
            let r = self.opt(wire::OPT_SET_META_CONTEXT, &meta_data(name, &["base:allocation"]));
            assert_eq!(r.len(), 2);
            assert_eq!(r[0].0, wire::REP_META_CONTEXT);
        }
        let replies = self.opt(wire::OPT_GO, &go_data(name, &[]));
        assert_eq!(replies.last().unwrap().0, wire::REP_ACK, "GO failed: {replies:?}");
        let export = replies.iter().find(|(t, d)| *t == wire::REP_INFO && d[0..2] == [0, 0]).expect("INFO_EXPORT");
        let size = u64::from_be_bytes(export.1[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.1[10..12].try_into().unwrap());
        (size, flags)
    }

    fn req(&mut self, typ: u16, flags: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = Request { flags, typ, handle, offset, len: u64::from(len) }.encode().to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Reads a simple reply header: (error, handle).
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), wire::SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }

    fn chunk(&mut self) -> Chunk {
        assert_eq!(self.u32(), wire::STRUCTURED_REPLY_MAGIC);
        let flags = self.u16();
        let typ = self.u16();
        let handle = self.u64();
        let len = self.u32() as usize;
        Chunk { flags, typ, handle, payload: self.read_n(len) }
    }

    fn disc(&mut self) {
        self.req(wire::CMD_DISC, 0, 0, 0, 0, &[]);
    }

    /// Sends an extended (32-byte) request header and its payload.
    fn xreq(&mut self, typ: u16, flags: u16, handle: u64, offset: u64, len: u64, payload: &[u8]) {
        let mut b = Request { flags, typ, handle, offset, len }.encode_extended().to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Reads an extended reply chunk; returns it with the offset its header echoes.
    fn xchunk(&mut self) -> (Chunk, u64) {
        assert_eq!(self.u32(), wire::EXTENDED_REPLY_MAGIC);
        let flags = self.u16();
        let typ = self.u16();
        let handle = self.u64();
        let offset = self.u64();
        let len = self.u64() as usize;
        (Chunk { flags, typ, handle, payload: self.read_n(len) }, offset)
    }
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

// ---------------------------------------------------------------- handshake

#[test]
fn unknown_client_flags_disconnect() {
    let (mut c, t) = start();
    c.greet(1 << 5);
    assert!(c.closed());
    assert!(matches!(join(t), Err(NbdError::BadClientFlags(0x20))));
}

#[test]
fn bad_option_magic_disconnects() {
    let (mut c, t) = start();
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE);
    c.s.write_all(&[0u8; 16]).unwrap();
    assert!(c.closed());
    assert!(matches!(join(t), Err(NbdError::BadMagic { got: 0, .. })));
}

#[test]
fn a_giant_export_name_disconnects_without_reading_it() {
    // NBD_OPT_EXPORT_NAME has no error reply: closing is all the server can do.
    let (mut c, t) = start();
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE);
    let mut b = wire::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&wire::OPT_EXPORT_NAME.to_be_bytes());
    b.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    c.s.write_all(&b).unwrap();
    assert!(c.closed());
    assert!(matches!(join(t), Err(NbdError::OptionTooLarge { len: 0xffff_fff0, .. })));
}

#[test]
fn an_option_over_64k_is_skipped_and_refused_as_too_big() {
    let (mut c, t) = start();
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE);
    let r = c.opt(wire::OPT_GO, &vec![0u8; (64 << 10) + 1]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, wire::REP_ERR_TOO_BIG);
    assert!(String::from_utf8_lossy(&r[0].1).contains("over the limit"), "{:?}", r[0].1);
    // The stream is still in step: the next option is answered.
    let r = c.opt(wire::OPT_LIST, &[]);
    assert_eq!(r.last().unwrap().0, wire::REP_ACK);
    assert_eq!(c.opt(wire::OPT_ABORT, &[])[0].0, wire::REP_ACK);
    assert!(join(t).is_ok());
}

#[test]
fn list_unknown_options_and_abort() {
    let (mut c, t) = start();
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE);
    let r = c.opt(wire::OPT_LIST, &[]);
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].0, wire::REP_SERVER);
    assert_eq!(&r[0].1[0..4], &4u32.to_be_bytes());
    assert_eq!(&r[0].1[4..8], b"disk");
    assert_eq!(&r[0].1[8..], b"the test disk");
    assert_eq!(&r[1].1[4..], b"ro");
    assert_eq!(r[2].0, wire::REP_ACK);
    assert_eq!(c.opt(wire::OPT_LIST, b"x")[0].0, wire::REP_ERR_INVALID);
    assert_eq!(c.opt(99, b"whatever")[0].0, wire::REP_ERR_UNSUP);
    assert_eq!(c.opt(wire::OPT_STARTTLS, &[])[0].0, wire::REP_ERR_UNSUP);
    assert_eq!(c.opt(wire::OPT_STRUCTURED_REPLY, b"x")[0].0, wire::REP_ERR_INVALID);
    assert_eq!(c.opt(wire::OPT_ABORT, &[])[0].0, wire::REP_ACK);
    assert!(c.closed());
    assert!(join(t).is_ok());
}

#[test]
fn info_reports_errors_and_details() {
    let (mut c, t) = start();
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES);
    let r = c.opt(wire::OPT_INFO, &go_data("nope", &[]));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, wire::REP_ERR_UNKNOWN);
    assert_eq!(r[0].1, b"no export \"nope\"");
    assert_eq!(c.opt(wire::OPT_GO, &go_data("busy", &[]))[0].0, wire::REP_ERR_POLICY);
    // Name length pointing past the data; request count inconsistent with the length.
    assert_eq!(c.opt(wire::OPT_GO, &[0, 0, 1, 0, b'd', 0, 0])[0].0, wire::REP_ERR_INVALID);
    let mut bad = go_data("disk", &[]);
    bad[8..10].copy_from_slice(&5u16.to_be_bytes());
    assert_eq!(c.opt(wire::OPT_GO, &bad)[0].0, wire::REP_ERR_INVALID);

    let r = c.opt(wire::OPT_INFO, &go_data("disk", &[wire::INFO_NAME, wire::INFO_DESCRIPTION, 0x4242]));
    let find = |typ: u16| r.iter().find(|(t, d)| *t == wire::REP_INFO && d[0..2] == typ.to_be_bytes()).map(|x| &x.1);
    let export = find(wire::INFO_EXPORT).expect("export info");
    assert_eq!(export.len(), 12);
    assert_eq!(&export[2..10], &DISK_SIZE.to_be_bytes());
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert_eq!(flags & wire::TF_READ_ONLY, 0);
    assert_ne!(flags & wire::TF_SEND_FLUSH, 0);
    assert_eq!(flags & wire::TF_SEND_DF, 0, "DF needs structured replies");
    assert_eq!(flags & wire::TF_CAN_MULTI_CONN, 0);
    let bs = find(wire::INFO_BLOCK_SIZE).expect("block size info");
    assert_eq!(&bs[2..], [1u32.to_be_bytes(), 4096u32.to_be_bytes(), (32u32 << 20).to_be_bytes()].concat());
    assert_eq!(&find(wire::INFO_NAME).unwrap()[2..], b"disk");
    assert_eq!(&find(wire::INFO_DESCRIPTION).unwrap()[2..], b"the test disk");
    assert_eq!(r.last().unwrap().0, wire::REP_ACK);

    let r = c.opt(wire::OPT_INFO, &go_data("ro", &[]));
    let flags = u16::from_be_bytes([r[0].1[10], r[0].1[11]]);
    assert_ne!(flags & wire::TF_READ_ONLY, 0);
    assert_eq!(flags & (wire::TF_SEND_FLUSH | wire::TF_SEND_TRIM | wire::TF_SEND_WRITE_ZEROES), 0);
    drop(c);
    assert!(join(t).is_ok());
}

#[test]
fn export_name_with_and_without_zeroes() {
    for no_zeroes in [false, true] {
        let (mut c, t) = start();
        c.greet(wire::FLAG_C_FIXED_NEWSTYLE | if no_zeroes { wire::FLAG_C_NO_ZEROES } else { 0 });
        c.send_opt(wire::OPT_EXPORT_NAME, b"disk");
        assert_eq!(c.u64(), DISK_SIZE);
        let flags = c.u16();
        assert_ne!(flags & wire::TF_HAS_FLAGS, 0);
        if !no_zeroes {
            assert_eq!(c.read_n(124), vec![0u8; 124]);
        }
        // The next bytes must be a reply to our request, proving the framing is right.
        c.req(wire::CMD_READ, 0, 77, 0, 512, &[]);
        assert_eq!(c.simple(), (0, 77));
        assert_eq!(c.read_n(512), vec![0u8; 512]);
        c.disc();
        assert!(c.closed());
        assert!(join(t).is_ok());
    }
}

#[test]
fn export_name_unknown_disconnects() {
    let (mut c, t) = start();
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE);
    c.send_opt(wire::OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    assert!(matches!(join(t), Err(NbdError::ExportRefused { .. })));
}

#[test]
fn meta_context_negotiation() {
    let (mut c, t) = start();
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE);
    let set = meta_data("disk", &["base:allocation", "x-unknown:thing"]);
    assert_eq!(c.opt(wire::OPT_SET_META_CONTEXT, &set)[0].0, wire::REP_ERR_INVALID);
    assert_eq!(c.opt(wire::OPT_STRUCTURED_REPLY, &[])[0].0, wire::REP_ACK);
    // Truncated query.
    let mut bad = meta_data("disk", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    assert_eq!(c.opt(wire::OPT_SET_META_CONTEXT, &bad)[0].0, wire::REP_ERR_INVALID);
    // Listing: everything, the base: wildcard, and an unknown namespace.
    for (queries, found) in [(&[][..], true), (&["base:"][..], true), (&["qemu:dirty-bitmap:x"][..], false)] {
        let r = c.opt(wire::OPT_LIST_META_CONTEXT, &meta_data("disk", queries));
        if found {
            assert_eq!(r.len(), 2);
            assert_eq!(r[0].0, wire::REP_META_CONTEXT);
            assert_eq!(&r[0].1[4..], b"base:allocation");
        } else {
            assert_eq!(r.len(), 1);
        }
        assert_eq!(r.last().unwrap().0, wire::REP_ACK);
    }
    let r = c.opt(wire::OPT_SET_META_CONTEXT, &set);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0, wire::REP_META_CONTEXT);
    let id = u32::from_be_bytes(r[0].1[0..4].try_into().unwrap());
    assert_eq!(&r[0].1[4..], b"base:allocation");
    let r = c.opt(wire::OPT_GO, &go_data("disk", &[]));
    assert_eq!(r.last().unwrap().0, wire::REP_ACK);
    c.req(wire::CMD_BLOCK_STATUS, 0, 1, 0, 8192, &[]);
    let ch = c.chunk();
    assert_eq!(ch.typ, wire::REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(&ch.payload[0..4], &id.to_be_bytes());
    c.disc();
    assert!(join(t).is_ok());
}

#[test]
fn meta_context_for_another_export_is_not_used() {
    let (mut c, t) = start();
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE);
    c.opt(wire::OPT_STRUCTURED_REPLY, &[]);
    c.opt(wire::OPT_SET_META_CONTEXT, &meta_data("ro", &["base:allocation"]));
    c.opt(wire::OPT_GO, &go_data("disk", &[]));
    c.req(wire::CMD_BLOCK_STATUS, 0, 1, 0, 8192, &[]);
    let ch = c.chunk();
    assert_eq!(ch.typ, wire::REPLY_TYPE_ERROR);
    assert_eq!(&ch.payload[0..4], &wire::EINVAL.to_be_bytes());
    c.disc();
    assert!(join(t).is_ok());
}

#[test]
fn handshake_times_out() {
    let limits = Limits { handshake_timeout: Duration::from_millis(200), ..Limits::default() };
    let (mut c, t) = start_with(TestExports::new(SlowDisk::new(None, Duration::ZERO)), limits);
    let started = Instant::now();
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE);
    // Dribble a partial option header and then stall.
    c.s.write_all(&wire::IHAVEOPT.to_be_bytes()[..3]).unwrap();
    assert!(c.closed());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(join(t), Err(NbdError::HandshakeTimeout(_))));
}

/// How long opening the export `slow-open` takes.
const SLOW_OPEN: Duration = Duration::from_millis(600);

#[test]
fn the_server_taking_its_time_to_open_an_export_does_not_cost_the_client_its_handshake() {
    // The open alone outlasts the handshake time; the client did nothing slow.
    let limits = Limits { handshake_timeout: Duration::from_millis(300), ..Limits::default() };
    let (mut c, t) = start_with(TestExports::new(SlowDisk::new(None, Duration::ZERO)), limits);
    let (size, _) = c.go("slow-open", false, false);
    assert_eq!(size, DISK_SIZE);
    c.req(wire::CMD_READ, 0, 1, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 1));
    c.read_n(4096);
    c.disc();
    assert!(join(t).is_ok());
}

#[test]
fn a_client_that_never_reads_handshake_replies_is_dropped_at_the_handshake_deadline() {
    // The reply timeout is long; only the handshake deadline can end this client in time.
    let limits = Limits {
        handshake_timeout: Duration::from_millis(300),
        reply_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let (mut c, t) = start_with(TestExports::new(SlowDisk::new(None, Duration::ZERO)), limits);
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE);
    // Options whose replies are never read, from another thread (once the server's replies
    // fill the socket it stops reading, and these writes block until it closes).
    let mut flood = c.s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut opt = wire::IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&wire::OPT_LIST.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        let many = opt.repeat(4096);
        while flood.write_all(&many).is_ok() {}
    });
    assert!(matches!(join(t), Err(NbdError::HandshakeTimeout(_))));
    drop(c);
    writer.join().unwrap();
}

// ---------------------------------------------------------------- transmission

#[test]
fn simple_replies_and_errors() {
    let (mut c, t) = start();
    let (size, flags) = c.go("disk", false, false);
    assert_eq!(size, DISK_SIZE);
    assert_eq!(flags & wire::TF_SEND_DF, 0);
    // Unaligned write and read back.
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    c.req(wire::CMD_WRITE, wire::CMD_FLAG_FUA, 1, 1000, 3000, &data);
    assert_eq!(c.simple(), (0, 1));
    c.req(wire::CMD_READ, 0, 2, 1000, 3000, &[]);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.read_n(3000), data);
    // Read past the end: EINVAL and no payload.
    c.req(wire::CMD_READ, 0, 3, DISK_SIZE - 512, 1024, &[]);
    assert_eq!(c.simple(), (wire::EINVAL, 3));
    // Offset overflow.
    c.req(wire::CMD_READ, 0, 4, u64::MAX - 10, 512, &[]);
    assert_eq!(c.simple(), (wire::EINVAL, 4));
    // Write past the end: ENOSPC, payload consumed.
    c.req(wire::CMD_WRITE, 0, 5, DISK_SIZE - 512, 1024, &[9u8; 1024]);
    assert_eq!(c.simple(), (wire::ENOSPC, 5));
    // Oversized read: EINVAL, the stream goes on.
    c.req(wire::CMD_READ, 0, 6, 0, (32 << 20) + 1, &[]);
    assert_eq!(c.simple(), (wire::EINVAL, 6));
    // Unknown command and unknown flags.
    c.req(42, 0, 7, 0, 0, &[]);
    assert_eq!(c.simple(), (wire::EINVAL, 7));
    c.req(wire::CMD_WRITE, 0x8000, 8, 0, 16, &[1u8; 16]);
    assert_eq!(c.simple(), (wire::EINVAL, 8));
    c.req(wire::CMD_READ, wire::CMD_FLAG_DF, 9, 0, 16, &[]);
    assert_eq!(c.simple(), (wire::EINVAL, 9));
    // Block status without structured replies.
    c.req(wire::CMD_BLOCK_STATUS, 0, 10, 0, 4096, &[]);
    assert_eq!(c.simple(), (wire::EINVAL, 10));
    // Flush, trim, write zeroes.
    c.req(wire::CMD_FLUSH, 0, 11, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 11));
    c.req(wire::CMD_WRITE_ZEROES, 0, 12, 1000, 1000, &[]);
    assert_eq!(c.simple(), (0, 12));
    c.req(wire::CMD_WRITE_ZEROES, wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FUA, 13, 2000, 500, &[]);
    assert_eq!(c.simple(), (0, 13));
    c.req(wire::CMD_WRITE_ZEROES, wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FAST_ZERO, 14, 0, 4096, &[]);
    assert_eq!(c.simple(), (wire::ENOTSUP, 14));
    c.req(wire::CMD_WRITE_ZEROES, 0, 15, DISK_SIZE, 1, &[]);
    assert_eq!(c.simple(), (wire::ENOSPC, 15));
    c.req(wire::CMD_TRIM, 0, 16, 3000, 1000, &[]);
    assert_eq!(c.simple(), (0, 16));
    c.req(wire::CMD_TRIM, 0, 17, DISK_SIZE, 4096, &[]);
    assert_eq!(c.simple(), (wire::EINVAL, 17));
    c.req(wire::CMD_READ, 0, 18, 1000, 3000, &[]);
    assert_eq!(c.simple(), (0, 18));
    let got = c.read_n(3000);
    assert!(got[..1500].iter().all(|&b| b == 0), "zeroed range");
    assert_eq!(&got[1500..2000], &data[1500..2000]);
    assert!(got[2000..].iter().all(|&b| b == 0), "trimmed range");
    // Zero-length read.
    c.req(wire::CMD_READ, 0, 19, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 19));
    c.disc();
    assert!(c.closed());
    assert!(join(t).is_ok());
}

#[test]
fn read_only_export_refuses_writes() {
    let (mut c, t) = start();
    let (_, flags) = c.go("ro", false, false);
    assert_ne!(flags & wire::TF_READ_ONLY, 0);
    c.req(wire::CMD_WRITE, 0, 1, 0, 512, &[1u8; 512]);
    assert_eq!(c.simple(), (wire::EPERM, 1));
    c.req(wire::CMD_TRIM, 0, 2, 0, 512, &[]);
    assert_eq!(c.simple(), (wire::EPERM, 2));
    c.req(wire::CMD_WRITE_ZEROES, 0, 3, 0, 512, &[]);
    assert_eq!(c.simple(), (wire::EPERM, 3));
    c.req(wire::CMD_FLUSH, 0, 4, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 4));
    c.req(wire::CMD_READ, 0, 5, 0, 512, &[]);
    assert_eq!(c.simple(), (0, 5));
    assert_eq!(c.read_n(512), vec![0u8; 512]);
    c.disc();
    assert!(join(t).is_ok());
}

#[test]
fn structured_reads_send_holes_and_errors() {
    let (mut c, t) = start();
    let (_, flags) = c.go("disk", true, true);
    assert_ne!(flags & wire::TF_SEND_DF, 0);
    c.req(wire::CMD_WRITE, 0, 1, 4096, 4096, &[0xabu8; 4096]);
    assert_eq!(c.simple(), (0, 1));

    c.req(wire::CMD_READ, 0, 2, 0, 16384, &[]);
    let mut covered = Vec::new();
    loop {
        let ch = c.chunk();
        assert_eq!(ch.handle, 2);
        let offset = u64::from_be_bytes(ch.payload[0..8].try_into().unwrap());
        match ch.typ {
            wire::REPLY_TYPE_OFFSET_HOLE => {
                let len = u32::from_be_bytes(ch.payload[8..12].try_into().unwrap());
                covered.push((offset, u64::from(len), true));
            }
            wire::REPLY_TYPE_OFFSET_DATA => {
                assert!(ch.payload[8..].iter().all(|&b| b == 0xab));
                covered.push((offset, (ch.payload.len() - 8) as u64, false));
            }
            other => panic!("unexpected chunk type {other}"),
        }
        if ch.flags & wire::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(covered, vec![(0, 4096, true), (4096, 4096, false), (8192, 8192, true)]);

    // DF: exactly one data chunk with the zeroes spelled out.
    c.req(wire::CMD_READ, wire::CMD_FLAG_DF, 3, 0, 16384, &[]);
    let ch = c.chunk();
    assert_eq!((ch.typ, ch.flags, ch.handle), (wire::REPLY_TYPE_OFFSET_DATA, wire::REPLY_FLAG_DONE, 3));
    assert_eq!(ch.payload.len(), 8 + 16384);
    assert!(ch.payload[8..8 + 4096].iter().all(|&b| b == 0));
    assert!(ch.payload[8 + 4096..8 + 8192].iter().all(|&b| b == 0xab));

    // Errors come as an error chunk, never as a simple reply to READ.
    c.req(wire::CMD_READ, 0, 4, DISK_SIZE, 512, &[]);
    let ch = c.chunk();
    assert_eq!((ch.typ, ch.flags, ch.handle), (wire::REPLY_TYPE_ERROR, wire::REPLY_FLAG_DONE, 4));
    assert_eq!(&ch.payload[0..4], &wire::EINVAL.to_be_bytes());
    let msg_len = u16::from_be_bytes([ch.payload[4], ch.payload[5]]) as usize;
    assert_eq!(ch.payload.len(), 6 + msg_len);
    assert!(msg_len > 0);

    c.req(wire::CMD_READ, 0, 5, 0, 0, &[]);
    let ch = c.chunk();
    assert_eq!((ch.typ, ch.flags, ch.handle), (wire::REPLY_TYPE_NONE, wire::REPLY_FLAG_DONE, 5));
    c.disc();
    assert!(join(t).is_ok());
}

fn block_status(c: &mut Client, handle: u64, flags: u16, offset: u64, len: u32) -> Vec<(u32, u32)> {
    c.req(wire::CMD_BLOCK_STATUS, flags, handle, offset, len, &[]);
    let ch = c.chunk();
    assert_eq!((ch.typ, ch.flags, ch.handle), (wire::REPLY_TYPE_BLOCK_STATUS, wire::REPLY_FLAG_DONE, handle));
    assert_eq!((ch.payload.len() - 4) % 8, 0);
    ch.payload[4..]
        .chunks(8)
        .map(|d| (u32::from_be_bytes(d[0..4].try_into().unwrap()), u32::from_be_bytes(d[4..8].try_into().unwrap())))
        .collect()
}

#[test]
fn block_status_reports_allocation() {
    let (mut c, t) = start();
    c.go("disk", true, true);
    c.req(wire::CMD_WRITE, 0, 1, 8192, 4096, &[1u8; 4096]);
    assert_eq!(c.simple(), (0, 1));
    assert_eq!(block_status(&mut c, 2, 0, 0, 65536), vec![(8192, 3), (4096, 0), (65536 - 12288, 3)]);
    assert_eq!(block_status(&mut c, 3, wire::CMD_FLAG_REQ_ONE, 0, 65536), vec![(8192, 3)]);
    assert_eq!(block_status(&mut c, 4, wire::CMD_FLAG_REQ_ONE, 100, 1000), vec![(1000, 3)]);
    assert_eq!(block_status(&mut c, 5, 0, 9000, 100), vec![(100, 0)]);
    c.req(wire::CMD_BLOCK_STATUS, 0, 6, DISK_SIZE - 4096, 8192, &[]);
    let ch = c.chunk();
    assert_eq!(ch.typ, wire::REPLY_TYPE_ERROR);
    assert_eq!(&ch.payload[0..4], &wire::EINVAL.to_be_bytes());
    c.req(wire::CMD_BLOCK_STATUS, 0, 7, 0, 0, &[]);
    assert_eq!(c.chunk().typ, wire::REPLY_TYPE_ERROR);
    c.disc();
    assert!(join(t).is_ok());
}

#[test]
fn bad_request_magic_disconnects() {
    let (mut c, t) = start();
    c.go("disk", false, false);
    let mut b = Request { flags: 0, typ: wire::CMD_READ, handle: 1, offset: 0, len: 512 }.encode();
    b[0] ^= 0xff;
    c.s.write_all(&b).unwrap();
    assert!(c.closed());
    assert!(matches!(join(t), Err(NbdError::BadMagic { .. })));
}

#[test]
fn an_oversized_write_gets_einval_and_the_connection_goes_on() {
    let (mut c, t) = start();
    c.go("disk", false, false);
    let max = Limits::default().max_request_bytes;
    let len = max + 4096;
    // The payload is sent in full (a writer thread: the server skips it as it reads).
    let mut w = c.s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let mut b =
            Request { flags: 0, typ: wire::CMD_WRITE, handle: 1, offset: 0, len: u64::from(len) }.encode().to_vec();
        b.resize(b.len() + len as usize, 0xaa);
        w.write_all(&b).unwrap();
    });
    assert_eq!(c.simple(), (wire::EINVAL, 1));
    sender.join().unwrap();
    // Nothing was written, and the next request is served.
    c.req(wire::CMD_READ, 0, 2, 0, 512, &[]);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.read_n(512), vec![0u8; 512]);
    c.disc();
    assert!(join(t).is_ok());
}

#[test]
fn truncated_write_payload_is_an_error_not_a_hang() {
    let (mut c, t) = start();
    c.go("disk", false, false);
    c.req(wire::CMD_WRITE, 0, 1, 0, 4096, &[0u8; 100]);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(join(t), Err(NbdError::Io(_))));
}

#[test]
fn flush_waits_for_earlier_writes() {
    let slow = SlowDisk::new(None, Duration::from_millis(200));
    let (mut c, t) = start_with(TestExports::new(slow.clone()), Limits::default());
    c.go("slow", false, false);
    c.req(wire::CMD_WRITE, 0, 1, 0, 4096, &[1u8; 4096]);
    c.req(wire::CMD_FLUSH, 0, 2, 0, 0, &[]);
    let mut handles = vec![c.simple(), c.simple()];
    handles.sort();
    assert_eq!(handles, vec![(0, 1), (0, 2)]);
    assert_eq!(*slow.log.lock(), vec!["write-start 0", "write-end 0", "flush"]);
    c.disc();
    assert!(join(t).is_ok());
}

/// A MemDisk that says whether its writes land in memory as told, notes which thread ran each
/// write (and tells `written`), counts flushes, and holds its first flush until `release` says.
struct Watched {
    inner: MemDisk,
    in_memory: bool,
    threads: Mutex<Vec<(u64, String)>>,
    written: Option<std::sync::mpsc::Sender<u64>>,
    flushes: Mutex<u32>,
    /// (offset, length, on a worker) of every read tried with `try_read_at`.
    tried: Mutex<Vec<(u64, usize, bool)>>,
    /// Told when the first flush starts; that flush then waits for `release`.
    hold_first_flush: Option<(std::sync::mpsc::SyncSender<()>, Mutex<std::sync::mpsc::Receiver<()>>)>,
}

/// The test's side of a [`Watched`] device holding its first flush.
struct FlushHold {
    entered: std::sync::mpsc::Receiver<()>,
    release: std::sync::mpsc::SyncSender<()>,
}

impl FlushHold {
    /// Waits until the held flush has reached the device.
    fn entered(&self) {
        self.entered.recv_timeout(Duration::from_secs(5)).expect("the flush reaches the device");
    }
    /// Lets the held flush go on.
    fn release(&self) {
        self.release.send(()).unwrap();
    }
}

impl Watched {
    /// A device in memory whose first flush waits until the test releases it.
    fn holding_first_flush() -> (Watched, FlushHold) {
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (release_tx, release) = std::sync::mpsc::sync_channel(1);
        let disk = Watched { hold_first_flush: Some((entered_tx, Mutex::new(release))), ..Watched::new(true) };
        (disk, FlushHold { entered, release: release_tx })
    }

    fn new(in_memory: bool) -> Watched {
        Watched {
            inner: MemDisk::new(DISK_SIZE),
            in_memory,
            threads: Mutex::new(Vec::new()),
            written: None,
            flushes: Mutex::new(0),
            tried: Mutex::new(Vec::new()),
            hold_first_flush: None,
        }
    }
}

impl BlockDevice for Watched {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn writes_land_in_memory(&self) -> bool {
        self.in_memory
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.inner.read_at(offset, buf)
    }
    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<TryRead> {
        let on_worker = thread::current().name().is_some_and(|n| n.starts_with("nbd-worker"));
        self.tried.lock().push((offset, buf.len(), on_worker));
        self.inner.try_read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<()> {
        let name = thread::current().name().unwrap_or("").to_string();
        self.threads.lock().push((offset, name));
        let r = self.inner.write_at(offset, data, fua);
        if let Some(w) = &self.written {
            let _ = w.send(offset);
        }
        r
    }
    fn flush(&self) -> DevResult<()> {
        let first = {
            let mut n = self.flushes.lock();
            *n += 1;
            *n == 1
        };
        if first && let Some((entered, release)) = &self.hold_first_flush {
            let _ = entered.send(());
            let _ = release.lock().recv();
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.inner.discard(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
}

/// Which writes the reader runs itself: small ones without FUA, to a device whose writes land
/// in memory, unless the limits say none. The rest go to the workers.
#[test]
fn small_writes_to_memory_run_on_the_reader_and_the_rest_on_workers() {
    for (in_memory, inline_write_max) in [(true, Limits::default().inline_write_max), (false, 64 << 10), (true, 0)] {
        let disk = Arc::new(Watched::new(in_memory));
        let limits = Limits { inline_write_max, ..Limits::default() };
        let (mut c, t) = start_with(TestExports::only(disk.clone()), limits);
        c.go("disk", false, false);
        // A 4 KiB write, the same with FUA, and one of 128 KiB: one at a time, so each is
        // noted before the next arrives.
        for (handle, flags, offset, len) in
            [(1, 0, 0, 4096), (2, wire::CMD_FLAG_FUA, 8192, 4096), (3, 0, 65536, 128 << 10)]
        {
            c.req(wire::CMD_WRITE, flags, handle, offset, len, &vec![handle as u8; len as usize]);
            assert_eq!(c.simple(), (0, handle));
        }
        let ran: Vec<(u64, bool)> =
            disk.threads.lock().iter().map(|(o, name)| (*o, name.starts_with("nbd-worker"))).collect();
        let small_on_reader = in_memory && inline_write_max > 0;
        assert_eq!(
            ran,
            vec![(0, !small_on_reader), (8192, true), (65536, true)],
            "(offset, ran on a worker) with writes in memory: {in_memory}, inline_write_max {inline_write_max}"
        );
        // What the reader wrote reads back like the rest.
        c.req(wire::CMD_READ, 0, 4, 0, 4096, &[]);
        assert_eq!(c.simple(), (0, 4));
        assert_eq!(c.read_n(4096), vec![1u8; 4096]);
        c.disc();
        assert!(join(t).is_ok());
    }
}

/// READs that arrive behind another (the reader has the next request's bytes already) are
/// served on the reader when the device has their bytes without waiting, and their replies are
/// a worker's: the same bytes, holes as hole chunks, one chunk with DF, in simple, structured
/// and extended replies. A READ over the inline limit, and the last of a batch (nothing behind
/// it), go to a worker.
#[test]
fn reads_queued_behind_others_are_served_on_the_reader_with_a_workers_replies() {
    for mode in ["simple", "structured", "extended"] {
        let disk = Arc::new(Watched::new(true));
        disk.inner.write_at(4096, &[0xab; 4096], false).unwrap();
        disk.inner.write_at(3 * 4096 + 512, &[0xcd; 1000], false).unwrap();
        disk.inner.write_at(20 * 4096, &[0xef; 8192], false).unwrap();
        // Without polling, whose lone READs go to the reader too (the next test).
        let limits = Limits { polling: InputPolling::off(), ..Limits::default() };
        let (mut c, t) = start_with(TestExports::only(disk.clone()), limits);
        match mode {
            "simple" => drop(c.go("disk", false, false)),
            "structured" => drop(c.go("disk", true, false)),
            _ => {
                c.greet(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES);
                assert_eq!(c.opt(wire::OPT_EXTENDED_HEADERS, &[])[0].0, wire::REP_ACK);
                assert_eq!(c.opt(wire::OPT_GO, &go_data("disk", &[])).last().unwrap().0, wire::REP_ACK);
            }
        }
        let df = if mode == "simple" { 0 } else { wire::CMD_FLAG_DF };
        // (handle, flags, offset, length): holes, data, partial blocks, both at once.
        let reads: [(u64, u16, u64, u64); 8] = [
            (1, 0, 0, 16384),
            (2, df, 0, 16384),
            (3, 0, 4096, 4096),
            (4, 0, 4096 + 100, 50),
            (5, 0, 8 * 4096, 4096),
            (6, 0, 16 * 4096, 65536),
            (7, 0, 0, 65536 + 4096),
            (8, 0, 3 * 4096, 4096),
        ];
        let mut batch = Vec::new();
        for &(handle, flags, offset, len) in &reads {
            let r = Request { flags, typ: wire::CMD_READ, handle, offset, len };
            if mode == "extended" {
                batch.extend_from_slice(&r.encode_extended());
            } else {
                batch.extend_from_slice(&r.encode());
            }
        }
        // One message: the reader receives every request before it serves the first.
        c.s.write_all(&batch).unwrap();
        // handle -> (bytes, each byte filled by a chunk, chunks as (offset, len, hole)).
        type Received = (Vec<u8>, Vec<bool>, Vec<(u64, u64, bool)>);
        let mut got: HashMap<u64, Received> = HashMap::new();
        let mut done = 0;
        while done < reads.len() {
            let find = |h: u64| *reads.iter().find(|r| r.0 == h).expect("a known handle");
            if mode == "simple" {
                let (error, handle) = c.simple();
                assert_eq!(error, 0, "handle {handle}");
                let len = find(handle).3 as usize;
                got.insert(handle, (c.read_n(len), vec![true; len], Vec::new()));
                done += 1;
                continue;
            }
            let ch = if mode == "extended" { c.xchunk().0 } else { c.chunk() };
            let (handle, flags, offset, len) = find(ch.handle);
            let entry =
                got.entry(handle).or_insert_with(|| (vec![0xee; len as usize], vec![false; len as usize], Vec::new()));
            let at = u64::from_be_bytes(ch.payload[0..8].try_into().unwrap());
            let (n, hole) = match ch.typ {
                wire::REPLY_TYPE_OFFSET_DATA => ((ch.payload.len() - 8) as u64, false),
                wire::REPLY_TYPE_OFFSET_HOLE => {
                    (u64::from(u32::from_be_bytes(ch.payload[8..12].try_into().unwrap())), true)
                }
                other => panic!("{mode}: handle {handle}: unexpected chunk type {other}"),
            };
            assert!(at >= offset && at + n <= offset + len, "{mode}: handle {handle}: chunk {at}+{n} outside the read");
            let range = (at - offset) as usize..(at - offset + n) as usize;
            assert!(entry.1[range.clone()].iter().all(|f| !f), "{mode}: handle {handle}: bytes sent twice");
            entry.1[range.clone()].fill(true);
            if hole {
                entry.0[range].fill(0);
            } else {
                entry.0[range].copy_from_slice(&ch.payload[8..]);
            }
            entry.2.push((at, n, hole));
            if ch.flags & wire::REPLY_FLAG_DONE != 0 {
                done += 1;
                if flags & wire::CMD_FLAG_DF != 0 {
                    assert!(entry.2.len() == 1 && !hole, "{mode}: handle {handle}: DF gets one data chunk");
                }
            }
        }
        for &(handle, flags, offset, len) in &reads {
            let (bytes, filled, chunks) = &got[&handle];
            assert!(filled.iter().all(|&f| f), "{mode}: handle {handle}: bytes never sent");
            let mut want = vec![0u8; len as usize];
            disk.inner.read_at(offset, &mut want).unwrap();
            assert!(bytes == &want, "{mode}: handle {handle}: wrong bytes");
            if mode != "simple" && flags & wire::CMD_FLAG_DF == 0 {
                let mut sorted = chunks.clone();
                sorted.sort();
                let want: Vec<(u64, u64, bool)> = disk
                    .inner
                    .extents(offset, len)
                    .unwrap()
                    .into_iter()
                    .map(|e| (e.offset, e.len, e.kind == ExtentKind::Hole))
                    .collect();
                // A worker splits long data runs into pieces; none of these is that long.
                assert_eq!(sorted, want, "{mode}: handle {handle}: chunks are the allocation");
            }
        }
        let tried = disk.tried.lock().clone();
        let on = |worker: bool| -> Vec<(u64, usize)> {
            let mut v: Vec<(u64, usize)> = tried.iter().filter(|t| t.2 == worker).map(|t| (t.0, t.1)).collect();
            if worker {
                v.sort();
            }
            v
        };
        let expected: Vec<(u64, usize)> = reads[..6].iter().map(|r| (r.2, r.3 as usize)).collect();
        assert_eq!(on(false), expected, "{mode}: the reads tried on the reader: all but the long one and the last");
        let mut expected: Vec<(u64, usize)> = reads[6..].iter().map(|r| (r.2, r.3 as usize)).collect();
        expected.sort();
        assert_eq!(on(true), expected, "{mode}: a worker tries the bytes at hand first too (at most 1 MiB)");
        if mode == "extended" {
            c.xreq(wire::CMD_DISC, 0, 0, 0, 0, &[]);
        } else {
            c.disc();
        }
        assert!(join(t).is_ok());
    }
}

/// A READ with nothing behind it goes to a worker, unless the reader polls for the client's
/// next request (its waits have been short: a busy client at queue depth 1). Then it serves the
/// READ itself: the reply goes out without a worker's wake-up, and the reader is back polling
/// for the next request as soon as it has.
#[test]
fn a_lone_read_is_served_on_the_reader_only_while_the_reader_polls() {
    // Polling up to a second: every wait in this test is short, so the window opens at the
    // session's first wait (for the first request) and stays open.
    for (polling, on_reader) in [(InputPolling::new(Duration::from_secs(1), 1), true), (InputPolling::off(), false)] {
        let disk = Arc::new(Watched::new(true));
        disk.inner.write_at(4096, &[0x3c; 4096], false).unwrap();
        let (mut c, t) = start_with(TestExports::only(disk.clone()), Limits { polling, ..Limits::default() });
        c.go("disk", false, false);
        // One at a time: each READ is alone in the stream.
        for handle in 1..=3u64 {
            c.req(wire::CMD_READ, 0, handle, 4096, 4096, &[]);
            assert_eq!(c.simple(), (0, handle));
            assert_eq!(c.read_n(4096), vec![0x3c; 4096]);
        }
        let on_worker: Vec<bool> = disk.tried.lock().iter().map(|t| t.2).collect();
        assert_eq!(
            on_worker,
            vec![!on_reader; 3],
            "reads tried on a worker (true) or the reader, polling: {on_reader}"
        );
        c.disc();
        assert!(join(t).is_ok());
    }
}

/// After a first wait long enough to keep the window closed (the client seems idle for a
/// second), READs with handles `1..=n` of the block at 4096 (filled with 0x5e): READ 1 goes to
/// a worker, and its quick reply opens the window.
fn reads_after_a_long_wait(c: &mut Client, polling: &InputPolling, n: u64) {
    polling.probe().pretend_idle(Duration::from_secs(1));
    for handle in 1..=n {
        c.req(wire::CMD_READ, 0, handle, 4096, 4096, &[]);
        assert_eq!(c.simple(), (0, handle));
        assert_eq!(c.read_n(4096), vec![0x5e; 4096]);
    }
}

/// A connection whose window is closed sends its lone READs to a worker, and the reader must
/// not poll while the client waits for that reply — but the wait still counts as a short one,
/// or a client of lone READs would never open the window.
#[test]
fn a_wait_for_a_workers_reply_opens_the_window_too() {
    let disk = Arc::new(Watched::new(true));
    disk.inner.write_at(4096, &[0x5e; 4096], false).unwrap();
    // Waits over 80 ms close the window.
    let polling = InputPolling::new(Duration::from_millis(20), 1);
    let limits = Limits { polling: polling.clone(), ..Limits::default() };
    let (mut c, t) = start_with(TestExports::only(disk.clone()), limits);
    c.go("disk", false, false);
    reads_after_a_long_wait(&mut c, &polling, 3);
    let on_worker: Vec<bool> = disk.tried.lock().iter().map(|t| t.2).collect();
    assert_eq!(on_worker, [true, false, false], "reads tried on a worker (true) or the reader");
    c.disc();
    assert!(join(t).is_ok());
}

/// While the client's only request is on a worker (a FLUSH the device holds), the reader does
/// not poll: a client at QD1 sends nothing before that reply, and the spin would only take a
/// CPU from the worker.
#[test]
fn a_reader_with_every_request_on_a_worker_does_not_poll() {
    let (disk, hold) = Watched::holding_first_flush();
    disk.inner.write_at(4096, &[0x5e; 4096], false).unwrap();
    // Waits up to 80 ms keep the window open.
    let polling = InputPolling::new(Duration::from_millis(20), 1);
    let limits = Limits { polling: polling.clone(), ..Limits::default() };
    let (mut c, t) = start_with(TestExports::only(Arc::new(disk)), limits);
    c.go("disk", false, false);
    // READ 2 is served on the reader, which then polls for the next request and misses.
    reads_after_a_long_wait(&mut c, &polling, 2);
    let probe = polling.probe();
    probe.wait_until_a_reader_blocks();
    let before = probe.polls_started();
    assert!(before > 0, "the window never opened: the test proves nothing");
    c.req(wire::CMD_FLUSH, 0, 3, 0, 0, &[]);
    hold.entered();
    // The reader has read the FLUSH: once it decides to block again, whatever it was to poll
    // for the next request it has polled.
    probe.wait_until_a_reader_blocks();
    let during = probe.polls_started() - before;
    hold.release();
    assert_eq!(c.simple(), (0, 3));
    assert_eq!(during, 0, "the reader polled while its only request was on a worker");
    c.disc();
    assert!(join(t).is_ok());
}

/// Buffers are reused across the connections of a server, holding earlier requests' bytes. A
/// device that never has bytes at hand ("slow": no `try_read_at`) makes every READ take the
/// blocking path — data chunks, simple replies, DF, long reads a piece at a time — and each must
/// still send only what it read: zeros, after 1 MiB of 0x5a went through the spares.
#[test]
fn reused_buffers_are_filled_on_the_blocking_read_path() {
    let limits = Limits::default();
    let mut disks: HashMap<String, Arc<dyn BlockDevice>> = HashMap::new();
    disks.insert("disk".into(), Arc::new(MemDisk::new(4 << 20)));
    // A SlowDisk never has bytes at hand (the default `try_read_at`).
    disks.insert("slow".into(), SlowDisk::of_size(4 << 20));
    let exports = Arc::new(TestExports { disks });
    let (mut a, ta) = start_with(exports.clone(), limits.clone());
    a.go("disk", false, false);
    for structured in [false, true] {
        // 0x5a through the spares (payloads and read buffers) before each pass.
        for h in 0..4u64 {
            a.req(wire::CMD_WRITE, 0, h, h << 20, 1 << 20, &vec![0x5a; 1 << 20]);
            assert_eq!(a.simple().0, 0);
            a.req(wire::CMD_READ, 0, h, h << 20, 1 << 20, &[]);
            assert_eq!(a.simple().0, 0);
            assert!(a.read_n(1 << 20).iter().all(|&b| b == 0x5a));
        }
        let (mut b, tb) = start_with(exports.clone(), limits.clone());
        b.go("slow", structured, false);
        // Zeros written at the start of each MiB: a data chunk of 64 KiB, then a hole.
        for h in 0..3u64 {
            b.req(wire::CMD_WRITE, 0, h, h << 20, 64 << 10, &vec![0; 64 << 10]);
            assert_eq!(b.simple().0, 0);
        }
        let df = if structured { wire::CMD_FLAG_DF } else { 0 };
        let reads: [(u64, u16, u32); 5] =
            [(1, 0, 1 << 20), (2, df, 1 << 20), (3, 0, 64 << 10), (4, 0, (2 << 20) + 4096), (5, df, 2 << 20)];
        for &(handle, flags, len) in &reads {
            b.req(wire::CMD_READ, flags, handle, 0, len, &[]);
            let mut seen = 0usize;
            if structured {
                loop {
                    let ch = b.chunk();
                    assert_eq!(ch.handle, handle);
                    match ch.typ {
                        wire::REPLY_TYPE_OFFSET_DATA => {
                            let data = &ch.payload[8..];
                            let stale = data.iter().filter(|&&x| x != 0).count();
                            assert_eq!(stale, 0, "read {handle}: a data chunk carried {stale} stale bytes");
                            seen += data.len();
                        }
                        wire::REPLY_TYPE_OFFSET_HOLE => {
                            seen += u32::from_be_bytes(ch.payload[8..12].try_into().unwrap()) as usize;
                        }
                        other => panic!("read {handle}: chunk type {other}"),
                    }
                    if ch.flags & wire::REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            } else {
                assert_eq!(b.simple(), (0, handle));
                let data = b.read_n(len as usize);
                let stale = data.iter().filter(|&&x| x != 0).count();
                assert_eq!(stale, 0, "read {handle}: a simple reply carried {stale} stale bytes");
                seen = data.len();
            }
            assert_eq!(seen, len as usize, "read {handle}: every byte answered once");
        }
        b.disc();
        assert!(join(tb).is_ok());
    }
    a.disc();
    assert!(join(ta).is_ok());
}

/// FLUSHes that queue up while one is being made are answered together by one more flush of
/// the device, each with its own reply (one with a flag FLUSH does not take gets EINVAL).
#[test]
fn flushes_queued_together_share_one_flush_of_the_device() {
    let (held, hold) = Watched::holding_first_flush();
    let (written_tx, written) = std::sync::mpsc::channel();
    let disk = Arc::new(Watched { written: Some(written_tx), ..held });
    let limits = Limits { workers_per_conn: 1, ..Limits::default() };
    let (mut c, t) = start_with(TestExports::only(disk.clone()), limits);
    c.go("disk", false, false);
    c.req(wire::CMD_FLUSH, 0, 1, 0, 0, &[]);
    hold.entered();
    // The only worker is in that flush. Three more FLUSHes, then a write the reader runs
    // itself: once the device has it, the FLUSHes are queued.
    c.req(wire::CMD_FLUSH, 0, 2, 0, 0, &[]);
    c.req(wire::CMD_FLUSH, wire::CMD_FLAG_DF, 3, 0, 0, &[]);
    c.req(wire::CMD_FLUSH, wire::CMD_FLAG_FUA, 4, 0, 0, &[]);
    c.req(wire::CMD_WRITE, 0, 5, 0, 4096, &[5u8; 4096]);
    assert_eq!(written.recv_timeout(Duration::from_secs(5)), Ok(0));
    hold.release();
    let mut replies: Vec<(u32, u64)> = (0..5).map(|_| c.simple()).collect();
    replies.sort_by_key(|r| r.1);
    assert_eq!(replies, vec![(0, 1), (0, 2), (wire::EINVAL, 3), (0, 4), (0, 5)]);
    assert_eq!(*disk.flushes.lock(), 2, "the three queued FLUSHes share one flush");
    c.disc();
    assert!(join(t).is_ok());
}

/// Bytes of a simple request: header and payload.
fn request_bytes(typ: u16, handle: u64, offset: u64, payload: &[u8], len: u32) -> Vec<u8> {
    let mut b = Request { flags: 0, typ, handle, offset, len: u64::from(len) }.encode().to_vec();
    b.extend_from_slice(payload);
    b
}

/// The reader batches the replies of requests it runs while more of the client's bytes are at
/// hand; it sends them before it blocks for more — here in the middle of a request whose
/// payload the client sends only once it has the first reply. (With the replies left in the
/// buffer, the client waits for ever: its read times out.)
#[test]
fn batched_replies_are_sent_before_the_reader_waits_for_the_client() {
    let (mut c, t) = start();
    c.go("disk", false, false);
    // WRITE 1 whole, then WRITE 2's header and the first 100 bytes of its payload, in one go.
    let mut first = request_bytes(wire::CMD_WRITE, 1, 0, &[1u8; 4096], 4096);
    let second = request_bytes(wire::CMD_WRITE, 2, 4096, &[2u8; 4096], 4096);
    first.extend_from_slice(&second[..wire::REQUEST_LEN + 100]);
    c.s.write_all(&first).unwrap();
    assert_eq!(c.simple(), (0, 1), "the first write's reply, before the second is complete");
    c.s.write_all(&second[wire::REQUEST_LEN + 100..]).unwrap();
    assert_eq!(c.simple(), (0, 2));
    c.req(wire::CMD_READ, 0, 3, 0, 8192, &[]);
    assert_eq!(c.simple(), (0, 3));
    let data = c.read_n(8192);
    assert!(data[..4096].iter().all(|&b| b == 1) && data[4096..].iter().all(|&b| b == 2));
    c.disc();
    assert!(join(t).is_ok());
}

/// ... and before it waits for room in the connection's budget: here the only place is held
/// by a FLUSH the device holds until the client has the batched reply. (Left in the buffer,
/// the reply would go out with the FLUSH's, which never comes: the client's read times out.)
#[test]
fn batched_replies_are_sent_before_the_reader_waits_for_room() {
    let (disk, hold) = Watched::holding_first_flush();
    let limits = Limits { max_in_flight_per_conn: 1, ..Limits::default() };
    let (mut c, t) = start_with(TestExports::only(Arc::new(disk)), limits);
    c.go("disk", false, false);
    // WRITE 1 (run on the reader, more bytes behind it: batched), FLUSH 2 (a worker, held in
    // the device), WRITE 3 (waits for FLUSH 2's place), in one go.
    let mut all = request_bytes(wire::CMD_WRITE, 1, 0, &[1u8; 4096], 4096);
    all.extend(request_bytes(wire::CMD_FLUSH, 2, 0, &[], 0));
    all.extend(request_bytes(wire::CMD_WRITE, 3, 4096, &[3u8; 4096], 4096));
    c.s.write_all(&all).unwrap();
    hold.entered();
    assert_eq!(c.simple(), (0, 1), "the batched reply, while the reader waits for room");
    hold.release();
    let mut rest: Vec<(u32, u64)> = (0..2).map(|_| c.simple()).collect();
    rest.sort_by_key(|r| r.1);
    assert_eq!(rest, vec![(0, 2), (0, 3)]);
    c.disc();
    assert!(join(t).is_ok());
}

#[test]
fn replies_may_overtake_slow_requests() {
    let slow = SlowDisk::new(Some((0, Duration::from_millis(300))), Duration::ZERO);
    let (mut c, t) = start_with(TestExports::new(slow), Limits::default());
    c.go("slow", false, false);
    c.req(wire::CMD_READ, 0, 1, 0, 512, &[]);
    c.req(wire::CMD_READ, 0, 2, 4096, 512, &[]);
    assert_eq!(c.simple(), (0, 2));
    c.read_n(512);
    assert_eq!(c.simple(), (0, 1));
    c.read_n(512);
    c.disc();
    assert!(join(t).is_ok());
}

#[test]
fn disconnect_finishes_in_flight_requests() {
    let slow = SlowDisk::new(None, Duration::from_millis(200));
    let (mut c, t) = start_with(TestExports::new(slow.clone()), Limits::default());
    c.go("slow", false, false);
    c.req(wire::CMD_WRITE, 0, 1, 8192, 512, &[7u8; 512]);
    c.disc();
    assert_eq!(c.simple(), (0, 1));
    assert!(c.closed());
    assert!(join(t).is_ok());
    let mut buf = [0u8; 512];
    slow.inner.read_at(8192, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 512]);
}

#[test]
fn in_flight_limit_is_respected() {
    // One worker, one request in flight: a slow write delays the next request's reply.
    let slow = SlowDisk::new(None, Duration::from_millis(150));
    let limits = Limits { max_in_flight_per_conn: 1, workers_per_conn: 1, ..Limits::default() };
    let (mut c, t) = start_with(TestExports::new(slow), limits);
    c.go("slow", false, false);
    let started = Instant::now();
    for h in 0..3 {
        c.req(wire::CMD_WRITE, 0, h, h * 4096, 512, &[1u8; 512]);
    }
    for h in 0..3 {
        assert_eq!(c.simple(), (0, h));
    }
    assert!(started.elapsed() >= Duration::from_millis(440));
    c.disc();
    assert!(join(t).is_ok());
}

#[test]
fn limits_are_normalized() {
    let l = Limits {
        max_connections: 0,
        max_handshakes: 0,
        handshake_grace: Duration::ZERO,
        max_in_flight_per_conn: 0,
        workers_per_conn: 0,
        inline_write_max: u32::MAX,
        inline_read_max: u32::MAX,
        max_request_bytes: 1,
        max_buffered_bytes_per_conn: 0,
        buffers: crate::BufferPool::new(0),
        handshake_timeout: Duration::ZERO,
        reply_timeout: Duration::ZERO,
        polling: InputPolling::new(Duration::from_micros(50), 2),
        tls: None,
    }
    .normalized();
    assert_eq!((l.max_connections, l.max_handshakes, l.max_in_flight_per_conn, l.workers_per_conn), (1, 1, 1, 1));
    assert_eq!(l.max_request_bytes, 64 << 10);
    assert_eq!(l.inline_write_max, 64 << 10, "no write larger than a request runs on the reader");
    assert_eq!(l.inline_read_max, 64 << 10, "no read larger than a request is tried on the reader");
    assert_eq!(l.max_buffered_bytes_per_conn, 64 << 10);
    assert_eq!(l.buffers.max_bytes(), 1 << 20);
    assert_eq!(l.buffers, l.clone().normalized().buffers, "clones share one pool");
    assert_ne!(l.buffers, Limits::default().buffers);
    assert_eq!(l.polling, l.clone().normalized().polling, "clones share one count of readers polling");
    assert_eq!((l.polling.longest(), l.polling.max_pollers()), (Duration::from_micros(50), 2));
    assert!(!l.handshake_timeout.is_zero());
    let never = Limits { handshake_timeout: Duration::MAX, reply_timeout: Duration::MAX, ..Limits::default() };
    let l = never.normalized();
    assert_eq!((l.handshake_timeout, l.reply_timeout), (crate::MAX_TIMEOUT, crate::MAX_TIMEOUT));
}

/// "Never time out" given as `Duration::MAX` serves as usual: deadlines are computed from
/// the normalized limits, so none overflows.
#[test]
fn timeouts_of_duration_max_serve_as_usual() {
    let limits = Limits { handshake_timeout: Duration::MAX, reply_timeout: Duration::MAX, ..Limits::default() };
    let (mut c, t) = start_with(TestExports::new(SlowDisk::new(None, Duration::ZERO)), limits);
    c.go("slow", false, false);
    c.req(wire::CMD_READ, 0, 7, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 7));
    assert_eq!(c.read_n(4096).len(), 4096);
    c.req(wire::CMD_DISC, 0, 8, 0, 0, &[]);
    assert!(join(t).is_ok());
}

// ---------------------------------------------------------------- Server

#[test]
fn server_limits_connections_and_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let slow = SlowDisk::new(None, Duration::from_millis(300));
    let limits = Limits { max_connections: 1, ..Limits::default() };
    let server = crate::Server::spawn_unix(listener, TestExports::new(slow.clone()), limits).unwrap();

    let connect = || {
        let s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Client { s }
    };
    let mut c1 = connect();
    c1.go("slow", false, false);
    assert_eq!(server.active_connections(), 1);
    // A second client may handshake, but gets no export while the one session runs.
    let mut c2 = connect();
    c2.greet(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES);
    let replies = c2.opt(wire::OPT_GO, &go_data("slow", &[]));
    assert_eq!(replies.last().unwrap().0, wire::REP_ERR_POLICY, "{replies:?}");
    assert!(String::from_utf8_lossy(&replies.last().unwrap().1).contains("limit of 1"), "{replies:?}");
    drop(c2);

    c1.req(wire::CMD_WRITE, 0, 1, 0, 512, &[3u8; 512]);
    thread::sleep(Duration::from_millis(50));
    server.shutdown();
    // The in-flight write is still answered, then the connection closes.
    assert_eq!(c1.simple(), (0, 1));
    assert!(c1.closed());
    server.wait();
    assert!(slow.log.lock().contains(&"write-end 0".to_string()));
    // The listener is gone: nobody accepts any more.
    assert!(UnixStream::connect(&path).is_err());
}

/// The same on TCP. Both ends have small socket buffers, so the trickle makes room for the
/// sender many times inside one `send` of a 1 MiB piece: a send with no deadline of its own
/// keeps going for about 13 s (red: 12.6 s). TCP's own send timeout bounds a whole send, so
/// the blocking sends of before passed here too; the Unix and TLS tests are the ones they fail.
#[test]
fn a_reply_taken_a_trickle_at_a_time_over_tcp_still_times_out() {
    let limits = Limits { reply_timeout: Duration::from_millis(500), ..Limits::default() };
    let len: u32 = 4 << 20;
    let provider = TestExports::new(SlowDisk::of_size(u64::from(len)));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let t = thread::spawn(move || {
        let (server, _) = listener.accept().expect("accept");
        rustix::net::sockopt::set_socket_send_buffer_size(&server, 16 << 10).expect("SO_SNDBUF");
        serve_connection(server, &*provider, &limits)
    });
    let s = std::net::TcpStream::connect(addr).expect("connect");
    rustix::net::sockopt::set_socket_recv_buffer_size(&s, 16 << 10).expect("SO_RCVBUF");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut c = Client { s };
    c.go("slow", false, false);
    c.req(wire::CMD_READ, 0, 1, 0, len, &[]);
    take_a_trickle_until_cut_off(&mut c.s, len, 4 << 10, Duration::from_millis(2500), t);
}

/// A client that takes its reply a few bytes at a time keeps each `send` making progress, so a
/// socket's send timeout would never fire (a Unix socket restarts it at every wait for room);
/// the whole reply has a deadline all the same. The server's small send buffer makes the
/// trickle (2 KiB every 50 ms) free room more often than the timeout, as on TCP above.
#[test]
fn a_reply_taken_a_trickle_at_a_time_still_times_out() {
    let limits = Limits { reply_timeout: Duration::from_millis(500), ..Limits::default() };
    let (client, t) = start_with_send_buffer(limits, 16 << 10);
    let mut c = Client { s: client };
    c.go("slow", false, false);
    let len = (DISK_SIZE as u32).min(4 << 20);
    c.req(wire::CMD_READ, 0, 1, 0, len, &[]);
    take_a_trickle_until_cut_off(&mut c.s, len, 2 << 10, Duration::from_millis(2500), t);
}

/// The same over TLS: each piece of the reply goes out as ciphertext within what the reply
/// has left, however many sends the records take. Sent with the socket's own timeout instead,
/// restarted at each wait for room and checked between pieces of a few records, a reply
/// outlasted its deadline by about one piece: 2.46 s here (a 4 KiB send buffer, the client
/// taking 1 KiB every 50 ms), so this test allows 1.5 s.
#[test]
fn a_reply_taken_a_trickle_at_a_time_over_tls_still_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write certificate");
    std::fs::write(&key_path, signing_key.serialize_pem()).expect("write key");
    let tls = crate::TlsSettings::from_pem_files(&cert_path, &key_path, None, true).expect("TLS settings");
    let limits = Limits { reply_timeout: Duration::from_millis(500), tls: Some(tls), ..Limits::default() };
    let (client, t) = start_with_send_buffer(limits, 4 << 10);
    let mut plain = Client { s: client };
    plain.greet(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES);
    assert_eq!(plain.opt(wire::OPT_STARTTLS, &[])[0].0, wire::REP_ACK);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).expect("trust the test certificate");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let session = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().expect("server name"))
        .expect("TLS client");
    let mut c = Client { s: rustls::StreamOwned::new(session, plain.s) };
    let replies = c.opt(wire::OPT_GO, &go_data("slow", &[]));
    assert_eq!(replies.last().expect("a reply").0, wire::REP_ACK, "GO over TLS: {replies:?}");
    let len = (DISK_SIZE as u32).min(4 << 20);
    c.req(wire::CMD_READ, 0, 1, 0, len, &[]);
    take_a_trickle_until_cut_off(&mut c.s, len, 1 << 10, Duration::from_millis(1500), t);
}

/// [`start_with`] on the slow disk, the server's end of the socket pair given a send buffer of
/// `send_buffer` bytes (small buffers make a trickling client free room often).
fn start_with_send_buffer(limits: Limits, send_buffer: usize) -> (UnixStream, ServerThread) {
    let provider = TestExports::new(SlowDisk::new(None, Duration::ZERO));
    let (client, server) = UnixStream::pair().expect("socketpair");
    rustix::net::sockopt::set_socket_send_buffer_size(&server, send_buffer).expect("SO_SNDBUF");
    client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let t = thread::spawn(move || serve_connection(server, &*provider, &limits));
    (client, t)
}

/// Takes the reply to a READ of `len` bytes as a client short of bandwidth does, `step` bytes
/// every 50 ms (4 KiB: 80 KiB/s, so a 1 MiB reply would take 13 s), until the stream ends or
/// the server's thread `t` does (the server's end is watched: what the client's buffer holds
/// may take long to drain at this pace). Asserts that the server cut the client off `within` (the
/// callers' reply timeout is 500 ms; the deadline is kept, not stretched: a cut-off at 0.50 s
/// is what the code gives), its connection ending with a timeout, and that the stream then
/// ended before the whole reply arrived.
fn take_a_trickle_until_cut_off(s: &mut impl Read, len: u32, step: usize, within: Duration, t: ServerThread) {
    let started = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; step];
    while !t.is_finished() {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the trickling client was never cut off");
        thread::sleep(Duration::from_millis(50));
    }
    let cut_off = started.elapsed();
    assert!(cut_off < within, "cut off only after {cut_off:?}");
    match join(t) {
        Err(NbdError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("the connection must end with the reply's timeout, not {other:?}"),
    }
    // What the client's buffer still held, then the end of the stream.
    while let Ok(n @ 1..) = s.read(&mut buf) {
        got += n;
    }
    assert!(got < len as usize, "the whole reply arrived");
}

/// Clients that connect and never finish the handshake cannot lock others out: when the
/// handshake slots are full, a newcomer takes the place of the oldest one past its grace.
#[test]
fn idle_handshakes_make_room_for_new_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let limits = Limits {
        max_handshakes: 8,
        handshake_grace: Duration::from_millis(200),
        handshake_timeout: Duration::from_secs(600),
        ..Limits::default()
    };
    let server =
        crate::Server::spawn_unix(listener, TestExports::new(SlowDisk::new(None, Duration::ZERO)), limits).unwrap();
    // 8 silent clients fill the handshake slots; while they are young, a ninth is closed.
    // Each has been accepted (and counted) once the server's greeting reaches it.
    let silent: Vec<Client> = (0..8)
        .map(|_| {
            let mut c = Client { s: UnixStream::connect(&path).unwrap() };
            c.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut greeting = [0u8; 18];
            c.s.read_exact(&mut greeting).expect("greeting");
            c
        })
        .collect();
    assert_eq!(server.active_connections(), 8);
    let mut early = Client { s: UnixStream::connect(&path).unwrap() };
    early.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(early.closed(), "a newcomer within the grace is refused");
    // Past the grace, each newcomer gets in (20 of them, one after the other) and is served.
    thread::sleep(Duration::from_millis(250));
    for _ in 0..20 {
        let mut c = Client { s: UnixStream::connect(&path).unwrap() };
        c.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.go("slow", false, false);
        c.req(wire::CMD_READ, 0, 7, 0, 512, &[]);
        assert_eq!(c.simple(), (0, 7));
        let mut data = [0u8; 512];
        c.s.read_exact(&mut data).unwrap();
    }
    drop(silent);
    server.shutdown();
    server.wait();
}

/// A TCP connection to `to` from the loopback address `from` (any 127.x.y.z works on Linux).
fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> std::net::TcpStream {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    rustix::net::bind(&fd, &std::net::SocketAddr::from((from, 0))).unwrap();
    rustix::net::connect(&fd, &to).unwrap();
    let s = std::net::TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Fairness between clients: when one address floods the handshake slots with silent sockets,
/// the newcomers it keeps sending push out its own handshakes, not another client's slow one.
/// (Dropping simply the oldest handshake, as before, dropped the slow client first: red.)
#[test]
fn a_flood_from_one_address_evicts_its_own_handshakes() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = Limits {
        max_handshakes: 8,
        handshake_grace: Duration::from_millis(100),
        handshake_timeout: Duration::from_secs(600),
        ..Limits::default()
    };
    let server =
        crate::Server::spawn_tcp(listener, TestExports::new(SlowDisk::new(None, Duration::ZERO)), limits).unwrap();
    let greeted = |mut s: std::net::TcpStream| {
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).expect("greeting");
        s
    };
    // The slow client, first and so the oldest, then 7 silent sockets from another address.
    let slow = greeted(connect_from([127, 0, 0, 1], addr));
    let mut flood: Vec<_> = (0..7).map(|_| greeted(connect_from([127, 0, 0, 2], addr))).collect();
    // The flood goes on, in waves once the last one has had its grace: each newcomer makes
    // room by pushing out one of the flood's own.
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(150));
        for _ in 0..7 {
            flood.push(greeted(connect_from([127, 0, 0, 2], addr)));
        }
    }
    // The slow client finishes its handshake and is served.
    let mut slow = slow;
    slow.write_all(&(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
    let mut opt = wire::IHAVEOPT.to_be_bytes().to_vec();
    let data = go_data("disk", &[]);
    opt.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    slow.write_all(&opt).expect("the slow client's socket is still open");
    let mut reply = [0u8; 20];
    slow.read_exact(&mut reply).expect("the slow client was dropped for the flood");
    assert_eq!(&reply[0..8], &wire::OPT_REPLY_MAGIC.to_be_bytes());
    drop(flood);
    drop(slow);
    server.shutdown();
    server.wait();
}

// ---------------------------------------------------------------- extended headers

#[test]
fn extended_headers_carry_64_bit_lengths() {
    let (mut c, t) = start();
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES);
    assert_eq!(c.opt(wire::OPT_EXTENDED_HEADERS, &[])[0].0, wire::REP_ACK);
    assert_eq!(c.opt(wire::OPT_EXTENDED_HEADERS, &[])[0].0, wire::REP_ERR_INVALID, "twice");
    assert_eq!(c.opt(wire::OPT_STRUCTURED_REPLY, &[])[0].0, wire::REP_ERR_EXT_HEADER_REQD);
    assert_eq!(
        c.opt(wire::OPT_SET_META_CONTEXT, &meta_data("disk", &["base:allocation"]))[0].0,
        wire::REP_META_CONTEXT
    );
    let replies = c.opt(wire::OPT_GO, &go_data("disk", &[]));
    assert_eq!(replies.last().unwrap().0, wire::REP_ACK);

    // Success without data: a NONE chunk echoing the request's offset.
    c.xreq(wire::CMD_WRITE, 0, 1, 4096, 4096, &[0xab; 4096]);
    let (ch, offset) = c.xchunk();
    assert_eq!((ch.typ, ch.flags, ch.handle, offset), (wire::REPLY_TYPE_NONE, wire::REPLY_FLAG_DONE, 1, 4096));
    assert!(ch.payload.is_empty());

    c.xreq(wire::CMD_READ, 0, 2, 0, 16384, &[]);
    let mut covered = Vec::new();
    loop {
        let (ch, offset) = c.xchunk();
        assert_eq!((ch.handle, offset), (2, 0));
        let at = u64::from_be_bytes(ch.payload[0..8].try_into().unwrap());
        match ch.typ {
            wire::REPLY_TYPE_OFFSET_HOLE => {
                covered.push((at, u64::from(u32::from_be_bytes(ch.payload[8..12].try_into().unwrap())), true))
            }
            wire::REPLY_TYPE_OFFSET_DATA => {
                assert!(ch.payload[8..].iter().all(|&b| b == 0xab));
                covered.push((at, (ch.payload.len() - 8) as u64, false));
            }
            other => panic!("unexpected chunk type {other}"),
        }
        if ch.flags & wire::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(covered, vec![(0, 4096, true), (4096, 4096, false), (8192, 8192, true)]);

    // Block status in the 64-bit form: context, count, then (length, flags) as u64 pairs.
    c.xreq(wire::CMD_BLOCK_STATUS, 0, 3, 0, 65536, &[]);
    let (ch, _) = c.xchunk();
    assert_eq!((ch.typ, ch.flags), (wire::REPLY_TYPE_BLOCK_STATUS_EXT, wire::REPLY_FLAG_DONE));
    let words: Vec<u64> = ch.payload[8..].chunks(8).map(|w| u64::from_be_bytes(w.try_into().unwrap())).collect();
    assert_eq!(&ch.payload[4..8], &3u32.to_be_bytes());
    assert_eq!(words, vec![4096, 3, 4096, 0, 65536 - 8192, 3]);

    // A 64-bit length is read as one: 5 GiB is past the end of a 1 MiB disk.
    c.xreq(wire::CMD_WRITE_ZEROES, 0, 4, 0, 5 << 30, &[]);
    let (ch, _) = c.xchunk();
    assert_eq!(ch.typ, wire::REPLY_TYPE_ERROR);
    assert!(String::from_utf8_lossy(&ch.payload[6..]).contains(&(5u64 << 30).to_string()));

    // A payload on a command that takes none is skipped and refused; the stream stays in step.
    c.xreq(wire::CMD_BLOCK_STATUS, wire::CMD_FLAG_PAYLOAD_LEN, 5, 0, 8, &[7; 8]);
    let (ch, _) = c.xchunk();
    assert_eq!((ch.typ, ch.handle), (wire::REPLY_TYPE_ERROR, 5));
    assert_eq!(&ch.payload[0..4], &wire::EINVAL.to_be_bytes());
    // WRITE may carry the flag.
    c.xreq(wire::CMD_WRITE, wire::CMD_FLAG_PAYLOAD_LEN, 6, 0, 512, &[1; 512]);
    assert_eq!(c.xchunk().0.typ, wire::REPLY_TYPE_NONE);
    c.xreq(wire::CMD_FLUSH, 0, 7, 0, 0, &[]);
    assert_eq!(c.xchunk().0.typ, wire::REPLY_TYPE_NONE);
    c.xreq(wire::CMD_DISC, 0, 8, 0, 0, &[]);
    assert!(join(t).is_ok());
}

#[test]
fn export_name_after_extended_headers_disconnects() {
    let (mut c, t) = start();
    c.greet(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES);
    assert_eq!(c.opt(wire::OPT_EXTENDED_HEADERS, &[])[0].0, wire::REP_ACK);
    c.send_opt(wire::OPT_EXPORT_NAME, b"disk");
    assert!(c.closed());
    assert!(matches!(join(t), Err(NbdError::Protocol(_))));
}

// ---------------------------------------------------------------- memory bounds

/// One 32 MiB disk holding a byte pattern that names each 4 KiB block.
struct BigDisk(Arc<MemDisk>);

const BIG: u64 = 32 << 20;

impl BigDisk {
    fn new() -> Arc<Self> {
        let disk = MemDisk::new(BIG);
        let mut block = vec![0u8; 4096];
        for b in 0..BIG / 4096 {
            block.fill((b % 251) as u8 + 1);
            disk.write_at(b * 4096, &block, false).unwrap();
        }
        Arc::new(BigDisk(Arc::new(disk)))
    }
}

impl ExportProvider for BigDisk {
    fn list(&self) -> Vec<ExportInfo> {
        vec![ExportInfo::new("big", "")]
    }

    fn open(&self, _: &str) -> Result<Arc<dyn BlockDevice>, OpenError> {
        Ok(self.0.clone())
    }
}

fn check_pattern(at: u64, data: &[u8]) {
    for (i, b) in data.iter().enumerate() {
        let block = (at + i as u64) / 4096;
        assert_eq!(*b, (block % 251) as u8 + 1, "byte {} of the disk", at + i as u64);
    }
}

/// A client sends 8 reads of 32 MiB and takes none of the replies: before, each worker held a
/// whole 32 MiB reply (the daemon grew by 128 MiB per such client); now a long read is read
/// and sent a piece at a time, and at most one read per worker holds a piece of the pool
/// (reserved before it is queued, so workers never wait for the pool). Then the client reads
/// everything, and every byte is right, in both reply forms.
#[test]
fn a_client_not_reading_pins_one_piece_per_worker() {
    for structured in [false, true] {
        let buffers = crate::BufferPool::new(1 << 30);
        let limits = Limits { buffers: buffers.clone(), ..Limits::default() };
        let (mut c, t) = start_with(BigDisk::new(), limits);
        c.go("big", structured, false);
        for h in 0..8 {
            c.req(wire::CMD_READ, 0, h, 0, BIG as u32, &[]);
        }
        // Let the workers run into the full socket.
        thread::sleep(Duration::from_millis(500));
        let pinned = buffers.peak();
        assert!(
            pinned <= 4 << 20,
            "structured={structured}: {} MiB pinned by a client taking no replies",
            pinned >> 20
        );
        if structured {
            // Chunks of different replies interleave; each reply ends with its DONE chunk.
            let mut got = HashMap::new();
            let mut done = 0;
            while done < 8 {
                let ch = c.chunk();
                assert_eq!(ch.typ, wire::REPLY_TYPE_OFFSET_DATA);
                let at = u64::from_be_bytes(ch.payload[0..8].try_into().unwrap());
                check_pattern(at, &ch.payload[8..]);
                *got.entry(ch.handle).or_insert(0u64) += ch.payload.len() as u64 - 8;
                if ch.flags & wire::REPLY_FLAG_DONE != 0 {
                    done += 1;
                }
            }
            assert_eq!(got, (0..8).map(|h| (h, BIG)).collect::<HashMap<_, _>>());
        } else {
            for _ in 0..8 {
                let (err, _) = c.simple();
                assert_eq!(err, 0);
                check_pattern(0, &c.read_n(BIG as usize));
            }
        }
        c.disc();
        assert!(join(t).is_ok());
        assert_eq!(buffers.in_use(), 0);
        eprintln!("structured={structured}: peak {} KiB held", buffers.peak() >> 10);
    }
}

/// Write payloads of every connection come out of one pool: two clients writing to a slow
/// device never hold more than the pool, and every write lands.
#[test]
fn write_payloads_of_all_connections_share_one_bound() {
    let buffers = crate::BufferPool::new(1 << 20);
    let limits = Limits { buffers: buffers.clone(), ..Limits::default() };
    let exports = TestExports::new(SlowDisk::new(None, Duration::from_millis(10)));
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let (mut c, t) = start_with(exports.clone(), limits.clone());
            c.go("slow", false, false);
            let writer = thread::spawn(move || {
                let mut w = c.s.try_clone().unwrap();
                for h in 0..16u64 {
                    let mut b =
                        Request { flags: 0, typ: wire::CMD_WRITE, handle: h, offset: (i * 512) << 10, len: 256 << 10 }
                            .encode()
                            .to_vec();
                    b.resize(b.len() + (256 << 10), i as u8 + 1);
                    w.write_all(&b).unwrap();
                }
                for _ in 0..16 {
                    assert_eq!(c.simple().0, 0);
                }
                c.disc();
            });
            (writer, t)
        })
        .collect();
    for (writer, t) in clients {
        writer.join().unwrap();
        assert!(join(t).is_ok());
    }
    assert!(buffers.peak() <= 1 << 20, "{} KiB held at once", buffers.peak() >> 10);
    assert!(buffers.peak() >= 256 << 10);
    assert_eq!(buffers.in_use(), 0);
}

/// Reads and writes of one connection through a pool that holds one request: workers must
/// never wait for the pool (the queued writes holding it could only be run by them). Before,
/// four reads taken by the four workers could wait for the bytes a queued write held: a hang.
#[test]
fn reads_and_writes_through_a_one_request_pool_never_deadlock() {
    let buffers = crate::BufferPool::new(1 << 20);
    let limits = Limits { buffers: buffers.clone(), ..Limits::default() };
    let (mut c, t) = start_with(BigDisk::new(), limits);
    c.go("big", false, false);
    let mut w = c.s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        for round in 0..20u64 {
            let mut b = Vec::new();
            for h in 0..4 {
                b.extend_from_slice(
                    &Request { flags: 0, typ: wire::CMD_READ, handle: round * 8 + h, offset: h << 20, len: 1 << 20 }
                        .encode(),
                );
            }
            for h in 4..8 {
                b.extend_from_slice(
                    &Request { flags: 0, typ: wire::CMD_WRITE, handle: round * 8 + h, offset: 16 << 20, len: 1 << 20 }
                        .encode(),
                );
                b.resize(b.len() + (1 << 20), 0x77);
            }
            w.write_all(&b).unwrap();
        }
    });
    for _ in 0..160 {
        let (err, handle) = c.simple();
        assert_eq!(err, 0);
        if handle % 8 < 4 {
            c.read_n(1 << 20);
        }
    }
    sender.join().unwrap();
    c.disc();
    assert!(join(t).is_ok());
    assert!(buffers.peak() <= 2 << 20, "{} KiB held", buffers.peak() >> 10);
}

/// A client that announces a write and then sends only part of it is cut off when the payload
/// does not arrive in time, and holds meanwhile only the pool bytes of what it sent: another
/// client is served. Before, it held the whole announced length for ever.
#[test]
fn a_write_payload_that_stops_half_way_is_cut_off() {
    let buffers = crate::BufferPool::new(2 << 20);
    let limits = Limits { buffers: buffers.clone(), reply_timeout: Duration::from_millis(500), ..Limits::default() };
    let exports = BigDisk::new();
    let (mut stalled, t1) = start_with(exports.clone(), limits.clone());
    stalled.go("big", false, false);
    let mut b = Request { flags: 0, typ: wire::CMD_WRITE, handle: 1, offset: 0, len: 8 << 20 }.encode().to_vec();
    b.resize(b.len() + (1 << 20), 0x11);
    stalled.s.write_all(&b).unwrap();
    // Another client writes and reads back meanwhile.
    let (mut other, t2) = start_with(exports, limits);
    other.go("big", false, false);
    other.s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    other.req(wire::CMD_WRITE, 0, 2, 16 << 20, 1 << 20, &vec![0x22; 1 << 20]);
    assert_eq!(other.simple(), (0, 2));
    other.disc();
    assert!(join(t2).is_ok());
    assert!(started.elapsed() < Duration::from_secs(3), "the other client waited {:?}", started.elapsed());
    // The stalled one is cut off by the payload deadline.
    assert!(matches!(join(t1), Err(NbdError::Io(_))));
    assert_eq!(buffers.in_use(), 0);
}

// ---------------------------------------------------------------- fuzzing

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn run(prefix: impl FnOnce(&mut Client), junk: &[u8]) {
        let limits = Limits { handshake_timeout: Duration::from_secs(2), ..Limits::default() };
        let (mut c, t) = start_with(TestExports::new(SlowDisk::new(None, Duration::ZERO)), limits);
        prefix(&mut c);
        // Drain whatever the server says so it never blocks on a full socket.
        let mut reader = c.s.try_clone().unwrap();
        let drain = thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        let _ = c.s.write_all(junk);
        let _ = c.s.shutdown(std::net::Shutdown::Write);
        let _ = join(t);
        let _ = drain.join();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_during_handshake(junk in proptest::collection::vec(any::<u8>(), 0..512)) {
            run(|_| {}, &junk);
        }

        #[test]
        fn random_options(opts in proptest::collection::vec((0u32..16, proptest::collection::vec(any::<u8>(), 0..64)), 0..8)) {
            let mut bytes = wire::FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            for (opt, data) in opts {
                bytes.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
                bytes.extend_from_slice(&opt.to_be_bytes());
                bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
                bytes.extend_from_slice(&data);
            }
            run(|c| { c.read_n(18); }, &bytes);
        }

        #[test]
        fn random_requests(reqs in proptest::collection::vec((0u16..10, 0u16..32, 0u64..(2 * DISK_SIZE), 0u32..70_000), 0..16)) {
            let mut bytes = Vec::new();
            for (i, (typ, flags, offset, len)) in reqs.into_iter().enumerate() {
                bytes.extend_from_slice(&Request { flags, typ, handle: i as u64, offset, len: u64::from(len) }.encode());
                if typ == wire::CMD_WRITE {
                    bytes.resize(bytes.len() + len as usize, 0x5a);
                }
            }
            run(|c| { c.go("disk", true, true); }, &bytes);
        }
    }
}
