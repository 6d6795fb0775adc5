//! The xenstore vocabulary of a blkif device (Xen's `io/xenbus.h` and `io/blkif.h`): paths,
//! states, and validated parsing of what the toolstack and the frontend wrote.

use super::store::XenStore;
use crate::abi::Abi;
use crate::sim::{MAX_RING_PAGE_ORDER, parse_protocol};
use crate::{Error, Result};

/// `enum xenbus_state`: where each end of a device is in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenbusState {
    /// 0: not yet known.
    Unknown,
    /// 1: setting up.
    Initialising,
    /// 2: the backend waits for the frontend's ring details (its features are published).
    InitWait,
    /// 3: the frontend published its ring details.
    Initialised,
    /// 4: the ring is live.
    Connected,
    /// 5: shutting down.
    Closing,
    /// 6: shut down.
    Closed,
    /// 7: reconfiguring (not used by blkif).
    Reconfiguring,
    /// 8: reconfigured (not used by blkif).
    Reconfigured,
}

impl XenbusState {
    /// The state of a xenstore `state` value, if it is one.
    pub fn parse(value: &str) -> Option<Self> {
        Some(match number::<u32>(value)? {
            0 => Self::Unknown,
            1 => Self::Initialising,
            2 => Self::InitWait,
            3 => Self::Initialised,
            4 => Self::Connected,
            5 => Self::Closing,
            6 => Self::Closed,
            7 => Self::Reconfiguring,
            8 => Self::Reconfigured,
            _ => return None,
        })
    }

    /// The xenstore value of the state.
    pub fn value(self) -> &'static str {
        match self {
            Self::Unknown => "0",
            Self::Initialising => "1",
            Self::InitWait => "2",
            Self::Initialised => "3",
            Self::Connected => "4",
            Self::Closing => "5",
            Self::Closed => "6",
            Self::Reconfiguring => "7",
            Self::Reconfigured => "8",
        }
    }
}

/// The directory holding the blkif backends of domain `backend_domid`, by frontend domain.
pub fn backend_root(backend_domid: u32) -> String {
    format!("/local/domain/{backend_domid}/backend/vbd")
}

/// Parses a decimal xenstore number (surrounding ASCII whitespace allowed, nothing else).
pub fn number<T: std::str::FromStr>(value: &str) -> Option<T> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

fn protocol_error(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

/// Reads `dir/key`, which must exist.
pub fn required(store: &impl XenStore, dir: &str, key: &str) -> Result<String> {
    store.read(&format!("{dir}/{key}"))?.ok_or_else(|| protocol_error(format!("missing {dir}/{key}")))
}

/// Reads `dir/key` as a number, which must exist.
pub fn required_number<T: std::str::FromStr>(store: &impl XenStore, dir: &str, key: &str) -> Result<T> {
    let v = required(store, dir, key)?;
    number(&v).ok_or_else(|| protocol_error(format!("{dir}/{key} = '{}' is not a number", v.escape_debug())))
}

/// Reads a `state` node; a missing node reads as `None`, a bad value is an error.
pub fn read_state(store: &impl XenStore, dir: &str) -> Result<Option<XenbusState>> {
    match store.read(&format!("{dir}/state"))? {
        None => Ok(None),
        Some(v) => XenbusState::parse(&v)
            .map(Some)
            .ok_or_else(|| protocol_error(format!("{dir}/state = '{}' is not a xenbus state", v.escape_debug()))),
    }
}

/// The disk named by a `params` value: `parallax:VDI` or just `VDI`, where VDI is a name or
/// a numeric id (passed on to the disk opener as is).
pub fn parse_params(params: &str) -> Result<String> {
    let target = params.trim_ascii();
    let target = target.strip_prefix("parallax:").unwrap_or(target).trim_ascii();
    if target.is_empty() {
        return Err(protocol_error("params names no VDI"));
    }
    if target.chars().any(|c| c.is_control()) {
        return Err(protocol_error(format!("params '{}' has control characters", target.escape_debug())));
    }
    Ok(target.to_string())
}

/// What the toolstack wrote in the backend directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The disk to open (from `params`).
    pub target: String,
    /// The frontend's directory (`frontend`).
    pub frontend: String,
    /// The frontend's domain (`frontend-id`).
    pub frontend_id: u32,
    /// `mode` is `r`/`ro`: serve the disk read-only.
    pub read_only: bool,
    /// `discard-enable` is not `0`.
    pub discard: bool,
}

impl BackendConfig {
    /// Reads and checks the toolstack's keys of the backend directory `dir` of a device the
    /// directory layout says belongs to `frontend_id`.
    pub fn read(store: &impl XenStore, dir: &str, frontend_id: u32) -> Result<Self> {
        let target = parse_params(&required(store, dir, "params")?)?;
        let frontend = required(store, dir, "frontend")?;
        let id: u32 = required_number(store, dir, "frontend-id")?;
        if id != frontend_id {
            return Err(protocol_error(format!("{dir}/frontend-id is {id}, expected {frontend_id}")));
        }
        let expected = format!("/local/domain/{frontend_id}/");
        if !frontend.starts_with(&expected) || frontend.contains("..") || frontend.ends_with('/') {
            return Err(protocol_error(format!(
                "{dir}/frontend '{}' is not below {expected}",
                frontend.escape_debug()
            )));
        }
        let mode = store.read(&format!("{dir}/mode"))?.unwrap_or_default();
        let read_only = matches!(mode.trim_ascii(), "r" | "ro");
        let discard = store.read(&format!("{dir}/discard-enable"))?.is_none_or(|v| v.trim_ascii() != "0");
        Ok(Self { target, frontend, frontend_id, read_only, discard })
    }
}

/// The most queues (rings) one device may have, whatever the backend is configured with: each
/// queue is a thread and a worker pool of the backend.
pub const MAX_QUEUES: u32 = 16;

/// One queue's ring as the frontend published it (`ring-ref*`, `event-channel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRing {
    /// Grant references of the ring pages, in order (`2^ring-page-order` of them).
    pub ring_refs: Vec<u32>,
    /// The frontend's event channel port of this queue.
    pub event_channel: u32,
}

/// What the frontend wrote to connect its rings: `multi-queue-num-queues`, `ring-page-order`
/// and `protocol` in its directory; each queue's `ring-ref*` and `event-channel` in the
/// directory itself (one queue) or in `queue-0` .. `queue-N-1` (several), as Linux's blkfront
/// writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingRequest {
    /// The queues, in order; never empty, never more than the backend offered.
    pub queues: Vec<QueueRing>,
    /// The ABI of the ring slots (the same for every queue).
    pub protocol: Abi,
}

impl RingRequest {
    /// Reads and checks the frontend's ring keys in its directory `dir`, for a backend that
    /// offered at most `max_queues` queues (`multi-queue-max-queues`).
    pub fn read(store: &impl XenStore, dir: &str, max_queues: u32) -> Result<Self> {
        let num_queues = match store.read(&format!("{dir}/multi-queue-num-queues"))? {
            None => 1,
            Some(q) => match number::<u32>(&q) {
                Some(n) if (1..=max_queues).contains(&n) => n,
                _ => {
                    return Err(protocol_error(format!(
                        "multi-queue-num-queues '{}' is not a number from 1 to multi-queue-max-queues {max_queues}",
                        q.escape_debug()
                    )));
                }
            },
        };
        let order: u32 = match store.read(&format!("{dir}/ring-page-order"))? {
            None => 0,
            Some(v) => number(&v)
                .ok_or_else(|| protocol_error(format!("ring-page-order '{}' is not a number", v.escape_debug())))?,
        };
        if order > MAX_RING_PAGE_ORDER {
            return Err(protocol_error(format!(
                "ring-page-order {order} above max-ring-page-order {MAX_RING_PAGE_ORDER}"
            )));
        }
        let queues = if num_queues == 1 {
            vec![QueueRing::read(store, dir, order)?]
        } else {
            (0..num_queues)
                .map(|q| QueueRing::read(store, &format!("{dir}/queue-{q}"), order))
                .collect::<Result<_>>()?
        };
        let protocol = match store.read(&format!("{dir}/protocol"))? {
            None => Abi::X86_64,
            Some(p) => parse_protocol(p.trim_ascii())
                .ok_or_else(|| protocol_error(format!("unknown protocol '{}'", p.escape_debug())))?,
        };
        Ok(Self { queues, protocol })
    }
}

impl QueueRing {
    /// Reads one queue's keys in `dir`, for rings of `2^order` pages.
    fn read(store: &impl XenStore, dir: &str, order: u32) -> Result<Self> {
        let ring_refs = if order == 0 && store.read(&format!("{dir}/ring-ref"))?.is_some() {
            vec![required_number(store, dir, "ring-ref")?]
        } else {
            (0..1u32 << order).map(|i| required_number(store, dir, &format!("ring-ref{i}"))).collect::<Result<_>>()?
        };
        let event_channel = required_number(store, dir, "event-channel")?;
        Ok(Self { ring_refs, event_channel })
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::MemStore;
    use super::*;

    #[test]
    fn states_and_numbers() {
        for v in 0..=8u32 {
            let s = XenbusState::parse(&v.to_string()).unwrap();
            assert_eq!(s.value(), v.to_string());
        }
        assert_eq!(XenbusState::parse("4\n"), Some(XenbusState::Connected));
        for bad in ["", "9", "-1", "+4", "4x", "0x4", "99999999999999999999"] {
            assert_eq!(XenbusState::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn params_accept_prefix_and_bare_names() {
        assert_eq!(parse_params("parallax:1").unwrap(), "1");
        assert_eq!(parse_params("guest-root").unwrap(), "guest-root");
        assert_eq!(parse_params(" parallax:web@snap1 ").unwrap(), "web@snap1");
        assert!(parse_params("parallax:").is_err());
        assert!(parse_params("").is_err());
        assert!(parse_params("a\nb").is_err());
    }

    #[test]
    fn ring_keys_are_validated() {
        let s = MemStore::new();
        let d = "/local/domain/5/device/vbd/768";
        s.write(&format!("{d}/ring-ref"), "8").unwrap();
        s.write(&format!("{d}/event-channel"), "12").unwrap();
        let r = RingRequest::read(&s, d, 1).unwrap();
        let queue = QueueRing { ring_refs: vec![8], event_channel: 12 };
        assert_eq!(r, RingRequest { queues: vec![queue], protocol: Abi::X86_64 });
        s.write(&format!("{d}/protocol"), "x86_32-abi").unwrap();
        assert_eq!(RingRequest::read(&s, d, 1).unwrap().protocol, Abi::X86_32);
        s.write(&format!("{d}/protocol"), "arm-abi").unwrap();
        assert!(RingRequest::read(&s, d, 1).is_err());
        s.rm(&format!("{d}/protocol")).unwrap();
        s.write(&format!("{d}/ring-page-order"), "1").unwrap();
        assert!(RingRequest::read(&s, d, 1).is_err(), "ring-ref0/1 missing");
        s.write(&format!("{d}/ring-ref0"), "20").unwrap();
        s.write(&format!("{d}/ring-ref1"), "21").unwrap();
        assert_eq!(RingRequest::read(&s, d, 1).unwrap().queues[0].ring_refs, [20, 21]);
        s.write(&format!("{d}/ring-page-order"), "5").unwrap();
        assert!(RingRequest::read(&s, d, 1).is_err());
        s.write(&format!("{d}/ring-page-order"), "4294967296").unwrap();
        assert!(RingRequest::read(&s, d, 1).is_err());
        s.write(&format!("{d}/ring-page-order"), "0").unwrap();
        s.write(&format!("{d}/event-channel"), "x").unwrap();
        assert!(RingRequest::read(&s, d, 1).is_err());
        s.write(&format!("{d}/event-channel"), "3").unwrap();
        s.write(&format!("{d}/multi-queue-num-queues"), "4").unwrap();
        assert!(RingRequest::read(&s, d, 2).is_err(), "more queues than offered");
        s.write(&format!("{d}/multi-queue-num-queues"), "0").unwrap();
        assert!(RingRequest::read(&s, d, 2).is_err());
        s.write(&format!("{d}/multi-queue-num-queues"), "1").unwrap();
        assert_eq!(RingRequest::read(&s, d, 2).unwrap().queues.len(), 1, "one queue: the flat layout");
    }

    #[test]
    fn several_queues_are_read_from_their_directories() {
        let s = MemStore::new();
        let d = "/local/domain/5/device/vbd/768";
        s.write(&format!("{d}/multi-queue-num-queues"), "2").unwrap();
        s.write(&format!("{d}/ring-page-order"), "1").unwrap();
        // A flat ring-ref beside the queues is not what any queue uses.
        s.write(&format!("{d}/ring-ref"), "99").unwrap();
        s.write(&format!("{d}/event-channel"), "98").unwrap();
        for (q, first) in [(0, 20), (1, 30)] {
            s.write(&format!("{d}/queue-{q}/ring-ref0"), &first.to_string()).unwrap();
            s.write(&format!("{d}/queue-{q}/ring-ref1"), &(first + 1).to_string()).unwrap();
            s.write(&format!("{d}/queue-{q}/event-channel"), &(first + 5).to_string()).unwrap();
        }
        let r = RingRequest::read(&s, d, 4).unwrap();
        let expected = vec![
            QueueRing { ring_refs: vec![20, 21], event_channel: 25 },
            QueueRing { ring_refs: vec![30, 31], event_channel: 35 },
        ];
        assert_eq!(r.queues, expected);
        assert!(RingRequest::read(&s, d, 1).is_err(), "two queues asked, one offered");
        s.rm(&format!("{d}/queue-1/event-channel")).unwrap();
        let err = RingRequest::read(&s, d, 4).unwrap_err().to_string();
        assert!(err.contains("queue-1/event-channel"), "{err}");
    }

    #[test]
    fn backend_config_checks_the_frontend_path() {
        let s = MemStore::new();
        let d = "/local/domain/0/backend/vbd/5/768";
        s.write(&format!("{d}/params"), "parallax:7").unwrap();
        s.write(&format!("{d}/frontend"), "/local/domain/5/device/vbd/768").unwrap();
        s.write(&format!("{d}/frontend-id"), "5").unwrap();
        s.write(&format!("{d}/mode"), "r").unwrap();
        let c = BackendConfig::read(&s, d, 5).unwrap();
        assert_eq!(c.target, "7");
        assert!(c.read_only && c.discard);
        assert!(BackendConfig::read(&s, d, 6).is_err());
        s.write(&format!("{d}/frontend"), "/local/domain/6/device/vbd/768").unwrap();
        assert!(BackendConfig::read(&s, d, 5).is_err());
    }
}
