//! The fixed-newstyle handshake: greeting, option haggling, and entering transmission.

use std::io::{self, Read, Write};
use std::sync::Arc;

use blockdev::BlockDevice;
use tracing::{debug, info, warn};

use crate::wire::{self, Parser};
use crate::{ExportProvider, Limits, NbdError, OpenError};

/// Largest option payload accepted; larger announcements end the connection.
pub(crate) const MAX_OPTION_LEN: u32 = 64 << 10;
/// The metadata context id given to `base:allocation`.
pub(crate) const ALLOCATION_CONTEXT_ID: u32 = 1;

/// What the handshake agreed on; everything transmission needs.
pub(crate) struct Session {
    /// The opened export.
    pub device: Arc<dyn BlockDevice>,
    /// The export name the client used.
    pub name: String,
    /// Structured replies were negotiated (always so with extended headers).
    pub structured: bool,
    /// Extended headers were negotiated.
    pub extended: bool,
    /// Context id of `base:allocation` if the client selected it for this export.
    pub allocation_context: Option<u32>,
}

/// How option haggling ended.
pub(crate) enum Outcome {
    /// The client aborted or went away.
    Ended,
    /// An export is open: transmission starts.
    Session(Session),
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next, then haggling goes
    /// on over TLS with this state.
    StartTls(State),
}

/// Per-connection negotiation state.
#[derive(Default)]
pub(crate) struct State {
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export name and whether `base:allocation` was selected by the last SET_META_CONTEXT.
    meta: Option<(String, bool)>,
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended before the first byte.
pub(crate) fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The transmission flags for an export.
pub(crate) fn transmission_flags(read_only: bool, structured: bool, multi_conn: bool) -> u16 {
    let mut flags = wire::TF_HAS_FLAGS;
    if read_only {
        flags |= wire::TF_READ_ONLY;
    } else {
        flags |= wire::TF_SEND_FLUSH
            | wire::TF_SEND_FUA
            | wire::TF_SEND_TRIM
            | wire::TF_SEND_WRITE_ZEROES
            | wire::TF_SEND_FAST_ZERO;
    }
    if structured {
        flags |= wire::TF_SEND_DF;
    }
    if multi_conn {
        flags |= wire::TF_CAN_MULTI_CONN;
    }
    flags
}

/// Sends the greeting and reads the client's flags; `Ok(None)` if the client went away.
pub(crate) fn greet<R: Read, W: Write>(r: &mut R, w: &mut W) -> Result<Option<State>, NbdError> {
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&wire::NBD_MAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&wire::IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(&(wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting)?;
    w.flush()?;

    let mut cf = [0u8; 4];
    if !read_exact_or_eof(r, &mut cf)? {
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::BadClientFlags(client_flags));
    }
    Ok(Some(State { no_zeroes: client_flags & wire::FLAG_C_NO_ZEROES != 0, ..State::default() }))
}

/// Haggles over options until the client opens an export, aborts, or asks for TLS.
/// `tls_active`: this stream is already the TLS session.
pub(crate) fn haggle<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    provider: &dyn ExportProvider,
    limits: &Limits,
    mut st: State,
    tls_active: bool,
) -> Result<Outcome, NbdError> {
    let tls_required = limits.tls.as_ref().is_some_and(|t| t.required()) && !tls_active;
    loop {
        let mut h = [0u8; wire::OPTION_HEADER_LEN];
        if !read_exact_or_eof(r, &mut h)? {
            debug!("client closed the connection during option haggling");
            return Ok(Outcome::Ended);
        }
        let mut p = Parser::new(&h);
        let (magic, option, len) = match (p.u64(), p.u32(), p.u32()) {
            (Some(m), Some(o), Some(l)) => (m, o, l),
            _ => return Err(NbdError::Protocol("short option header".into())),
        };
        if magic != wire::IHAVEOPT {
            return Err(NbdError::BadMagic { expected: wire::IHAVEOPT, got: magic });
        }
        if len > MAX_OPTION_LEN {
            // NBD_OPT_EXPORT_NAME has no error reply: all the server can do is close.
            if option == wire::OPT_EXPORT_NAME {
                return Err(NbdError::OptionTooLarge { option, len, max: MAX_OPTION_LEN });
            }
            // Anything else: skip its data (the stream stays in step) and say why, as
            // qemu-nbd does; the handshake's deadline still bounds a client that never sends it.
            discard(r, u64::from(len))?;
            reply_err(
                w,
                option,
                wire::REP_ERR_TOO_BIG,
                &format!("option data of {len} bytes is over the limit of {MAX_OPTION_LEN}"),
            )?;
            w.flush()?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        debug!(option, len, "option");

        if option == wire::OPT_STARTTLS {
            match (&limits.tls, tls_active) {
                _ if !data.is_empty() => reply_err(w, option, wire::REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?,
                (None, _) => reply_err(w, option, wire::REP_ERR_UNSUP, "TLS is not configured on this server")?,
                (Some(_), true) => reply_err(w, option, wire::REP_ERR_INVALID, "TLS is already in use")?,
                (Some(_), false) => {
                    reply(w, option, wire::REP_ACK, &[])?;
                    w.flush()?;
                    // Nothing said before TLS counts after it: a man in the middle may have
                    // said it.
                    return Ok(Outcome::StartTls(State { no_zeroes: st.no_zeroes, ..State::default() }));
                }
            }
            w.flush()?;
            continue;
        }
        if tls_required && option != wire::OPT_ABORT {
            if option == wire::OPT_EXPORT_NAME {
                return Err(NbdError::Protocol("NBD_OPT_EXPORT_NAME without TLS, which this server requires".into()));
            }
            reply_err(w, option, wire::REP_ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS first")?;
            w.flush()?;
            continue;
        }
        let outcome = match option {
            wire::OPT_EXPORT_NAME => return export_name(w, provider, &st, &data).map(Outcome::Session),
            wire::OPT_ABORT => {
                // The client may already have closed; a failed ACK is fine.
                let _ = w.write_all(&wire::option_reply(option, wire::REP_ACK, &[])).and_then(|_| w.flush());
                return Ok(Outcome::Ended);
            }
            wire::OPT_LIST => list(w, provider, &data),
            wire::OPT_INFO | wire::OPT_GO => match info_or_go(w, provider, limits, &st, option, &data)? {
                Some(session) if option == wire::OPT_GO => {
                    w.flush()?;
                    info!(
                        export = %session.name,
                        structured = session.structured,
                        extended = session.extended,
                        tls = tls_active,
                        "client entered transmission"
                    );
                    return Ok(Outcome::Session(session));
                }
                _ => Ok(()),
            },
            wire::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(w, option, wire::REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                } else if st.extended {
                    reply_err(w, option, wire::REP_ERR_EXT_HEADER_REQD, "extended headers are already in use")
                } else {
                    st.structured = true;
                    reply(w, option, wire::REP_ACK, &[])
                }
            }
            wire::OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    reply_err(w, option, wire::REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
                } else if st.extended {
                    reply_err(w, option, wire::REP_ERR_INVALID, "extended headers were already negotiated")
                } else {
                    // They include structured replies; contexts already chosen stay chosen.
                    st.extended = true;
                    st.structured = true;
                    reply(w, option, wire::REP_ACK, &[])
                }
            }
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => meta_context(w, &mut st, option, &data),
            _ => reply_err(w, option, wire::REP_ERR_UNSUP, "option not supported"),
        };
        outcome?;
        w.flush()?;
    }
}

/// Reads and drops `len` bytes.
pub(crate) fn discard<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client went away in the middle of its data"));
    }
    Ok(())
}

fn reply<W: Write>(w: &mut W, option: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&wire::option_reply(option, typ, data))
}

fn reply_err<W: Write>(w: &mut W, option: u32, typ: u32, message: &str) -> io::Result<()> {
    debug!(option, typ, message, "option refused");
    reply(w, option, typ, wire::truncate_str(message, wire::MAX_STRING_LEN).as_bytes())
}

/// Validates an export name from the wire.
fn export_name_str(raw: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(raw).ok()?;
    (s.len() <= wire::MAX_STRING_LEN && !s.contains('\0')).then_some(s)
}

fn lookup_info(provider: &dyn ExportProvider, name: &str) -> Option<crate::ExportInfo> {
    provider.list().into_iter().find(|e| e.name == name)
}

fn session_for(st: &State, name: &str, device: Arc<dyn BlockDevice>) -> Session {
    let allocation_context = match &st.meta {
        Some((export, true)) if st.structured && export == name => Some(ALLOCATION_CONTEXT_ID),
        _ => None,
    };
    Session { device, name: name.to_owned(), structured: st.structured, extended: st.extended, allocation_context }
}

fn export_name<W: Write>(
    w: &mut W,
    provider: &dyn ExportProvider,
    st: &State,
    data: &[u8],
) -> Result<Session, NbdError> {
    let Some(name) = export_name_str(data) else {
        return Err(NbdError::Protocol("export name is not a valid string".into()));
    };
    if st.extended {
        // Its reply has no way to confirm the headers; the protocol forbids the pair.
        return Err(NbdError::Protocol("NBD_OPT_EXPORT_NAME after extended headers; use NBD_OPT_GO".into()));
    }
    let device = provider.open(name).map_err(|e| {
        warn!(export = name, error = %e, "NBD_OPT_EXPORT_NAME refused; closing");
        NbdError::ExportRefused { name: name.to_owned(), message: e.message().to_owned() }
    })?;
    let multi_conn = lookup_info(provider, name).is_some_and(|i| i.multi_conn);
    let flags = transmission_flags(device.read_only(), st.structured, multi_conn);
    let mut out = Vec::with_capacity(10 + 124);
    out.extend_from_slice(&device.size().to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !st.no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    w.write_all(&out)?;
    w.flush()?;
    info!(export = name, structured = st.structured, "client entered transmission (EXPORT_NAME)");
    Ok(session_for(st, name, device))
}

fn list<W: Write>(w: &mut W, provider: &dyn ExportProvider, data: &[u8]) -> io::Result<()> {
    if !data.is_empty() {
        return reply_err(w, wire::OPT_LIST, wire::REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
    }
    for e in provider.list() {
        let name = wire::truncate_str(&e.name, wire::MAX_STRING_LEN);
        let desc = wire::truncate_str(&e.description, wire::MAX_STRING_LEN);
        let mut d = Vec::with_capacity(4 + name.len() + desc.len());
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(desc.as_bytes());
        reply(w, wire::OPT_LIST, wire::REP_SERVER, &d)?;
    }
    reply(w, wire::OPT_LIST, wire::REP_ACK, &[])
}

/// Handles `NBD_OPT_INFO` and `NBD_OPT_GO`; returns the session if the export was opened.
fn info_or_go<W: Write>(
    w: &mut W,
    provider: &dyn ExportProvider,
    limits: &Limits,
    st: &State,
    option: u32,
    data: &[u8],
) -> io::Result<Option<Session>> {
    let mut p = Parser::new(data);
    let parsed = (|| {
        let name = p.string()?;
        let n = p.u16()?;
        let mut requests = Vec::with_capacity(usize::from(n).min(data.len() / 2));
        for _ in 0..n {
            requests.push(p.u16()?);
        }
        (p.remaining() == 0).then_some((name, requests))
    })();
    let Some((raw_name, requests)) = parsed else {
        reply_err(w, option, wire::REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO")?;
        return Ok(None);
    };
    let Some(name) = export_name_str(raw_name) else {
        reply_err(w, option, wire::REP_ERR_INVALID, "export name is not a valid string")?;
        return Ok(None);
    };
    let device = match provider.open(name) {
        Ok(d) => d,
        Err(e) => {
            let typ = match e {
                OpenError::Unknown(_) => wire::REP_ERR_UNKNOWN,
                OpenError::Refused(_) => wire::REP_ERR_POLICY,
            };
            reply_err(w, option, typ, e.message())?;
            return Ok(None);
        }
    };
    let info = lookup_info(provider, name);
    let multi_conn = info.as_ref().is_some_and(|i| i.multi_conn);
    let flags = transmission_flags(device.read_only(), st.structured, multi_conn);

    let mut export = Vec::with_capacity(12);
    export.extend_from_slice(&wire::INFO_EXPORT.to_be_bytes());
    export.extend_from_slice(&device.size().to_be_bytes());
    export.extend_from_slice(&flags.to_be_bytes());
    reply(w, option, wire::REP_INFO, &export)?;

    let max = limits.max_request_bytes;
    let preferred = device.block_size().max(512).checked_next_power_of_two().unwrap_or(4096).min(max);
    let mut bs = Vec::with_capacity(14);
    bs.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
    bs.extend_from_slice(&1u32.to_be_bytes());
    bs.extend_from_slice(&preferred.to_be_bytes());
    bs.extend_from_slice(&max.to_be_bytes());
    reply(w, option, wire::REP_INFO, &bs)?;

    if requests.contains(&wire::INFO_NAME) {
        let mut d = wire::INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        reply(w, option, wire::REP_INFO, &d)?;
    }
    if requests.contains(&wire::INFO_DESCRIPTION)
        && let Some(desc) = info.as_ref().map(|i| i.description.as_str()).filter(|d| !d.is_empty())
    {
        let mut d = wire::INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(wire::truncate_str(desc, wire::MAX_STRING_LEN).as_bytes());
        reply(w, option, wire::REP_INFO, &d)?;
    }
    reply(w, option, wire::REP_ACK, &[])?;
    Ok(Some(session_for(st, name, device)))
}

/// Handles `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
fn meta_context<W: Write>(w: &mut W, st: &mut State, option: u32, data: &[u8]) -> io::Result<()> {
    let set = option == wire::OPT_SET_META_CONTEXT;
    if set {
        // Replaces the previous selection even when it fails.
        st.meta = None;
    }
    if !st.structured {
        return reply_err(w, option, wire::REP_ERR_INVALID, "negotiate structured replies first");
    }
    let mut p = Parser::new(data);
    let parsed = (|| {
        let name = std::str::from_utf8(p.string()?).ok()?;
        let n = p.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(std::str::from_utf8(p.string()?).ok()?);
        }
        (p.remaining() == 0).then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return reply_err(w, option, wire::REP_ERR_INVALID, "malformed metadata context request");
    };
    let allocation = if set {
        queries.contains(&wire::BASE_ALLOCATION)
    } else {
        queries.is_empty() || queries.iter().any(|q| *q == "base:" || *q == wire::BASE_ALLOCATION)
    };
    if allocation {
        let id = if set { ALLOCATION_CONTEXT_ID } else { 0 };
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(wire::BASE_ALLOCATION.as_bytes());
        reply(w, option, wire::REP_META_CONTEXT, &d)?;
    }
    if set {
        st.meta = Some((name.to_owned(), allocation));
    }
    reply(w, option, wire::REP_ACK, &[])
}
