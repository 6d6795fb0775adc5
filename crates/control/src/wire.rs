//! The frames on a control connection (one request per connection).
//!
//! # Request, client → daemon
//! | bytes | field |
//! |---|---|
//! | 4 | magic `b"PXCV"` |
//! | 4 | protocol version, u32 little endian ([`VERSION`]) |
//! | 4 | payload length, u32 little endian, at most [`MAX_REQUEST`] |
//! | … | payload: for each argument a u32 length and its UTF-8 bytes (at most [`MAX_ARGS`]) |
//!
//! The arguments are the `vdi` command line after the program name, with every path made
//! absolute by the client. The first `sendmsg` carries three descriptors with `SCM_RIGHTS`:
//! the client's stdin, stdout and stderr; the command runs with them as its streams.
//!
//! Version 1 (magic `b"PXC1"`, no version field, the same payload) is still accepted. A
//! request of a version this daemon does not know is answered with [`EXIT_USER`] and a line on
//! the client's stderr naming both versions.
//!
//! # Reply, daemon → client
//! `b"PXR1"` and the command's exit code as an i32 (little endian).

use std::io;

/// The protocol version this build speaks.
pub const VERSION: u32 = 2;
/// Largest request payload accepted.
pub const MAX_REQUEST: usize = 1 << 20;
/// Most arguments in one request.
pub const MAX_ARGS: usize = 4096;
/// Exit code of a request that was refused (bad frame, unknown version, wrong user).
pub const EXIT_USER: i32 = 2;
/// Exit code of a command that failed inside the daemon (a panic).
pub const EXIT_FAILURE: i32 = 3;

const MAGIC_V1: [u8; 4] = *b"PXC1";
const MAGIC: [u8; 4] = *b"PXCV";
const REPLY_MAGIC: [u8; 4] = *b"PXR1";
/// Length of a reply frame.
pub const REPLY_LEN: usize = 8;

pub(crate) fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A request frame's header, once enough bytes have arrived to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version the client speaks.
    pub version: u32,
    /// Bytes of header before the payload.
    pub header_len: usize,
    /// Payload length.
    pub payload_len: usize,
}

/// Parses the header at the start of `data`. `Ok(None)`: more bytes are needed.
pub fn parse_header(data: &[u8]) -> io::Result<Option<Header>> {
    if data.len() < 4 {
        return Ok(None);
    }
    let (version, header_len) = match data[..4].try_into() {
        Ok(MAGIC_V1) => (1, 8),
        Ok(MAGIC) => {
            let Some(v) = data.get(4..8) else { return Ok(None) };
            (u32::from_le_bytes([v[0], v[1], v[2], v[3]]), 12)
        }
        _ => return Err(bad("not a vdi control request")),
    };
    let Some(l) = data.get(header_len - 4..header_len) else { return Ok(None) };
    let payload_len = u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize;
    if payload_len > MAX_REQUEST {
        return Err(bad(format!("request of {payload_len} bytes is over the limit of {MAX_REQUEST}")));
    }
    Ok(Some(Header { version, header_len, payload_len }))
}

/// Encodes a request of the current [`VERSION`] carrying `args`.
pub fn encode_request(args: &[String]) -> io::Result<Vec<u8>> {
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
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend_from_slice(&MAGIC);
    msg.extend_from_slice(&VERSION.to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(&payload);
    Ok(msg)
}

/// Decodes a request payload into arguments, checking every length.
pub fn decode_args(mut payload: &[u8]) -> io::Result<Vec<String>> {
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

/// A reply frame carrying exit code `code`.
pub fn encode_reply(code: i32) -> [u8; REPLY_LEN] {
    let mut msg = [0u8; REPLY_LEN];
    msg[..4].copy_from_slice(&REPLY_MAGIC);
    msg[4..].copy_from_slice(&code.to_le_bytes());
    msg
}

/// The exit code in a reply frame.
pub fn decode_reply(msg: &[u8; REPLY_LEN]) -> io::Result<i32> {
    if msg[..4] != REPLY_MAGIC {
        return Err(bad("parallaxd sent a malformed reply"));
    }
    Ok(i32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn requests_round_trip_and_bad_payloads_are_refused() {
        let args = s(&["create", "ünïcode name", ""]);
        let msg = encode_request(&args).unwrap();
        let h = parse_header(&msg).unwrap().unwrap();
        assert_eq!(h, Header { version: VERSION, header_len: 12, payload_len: msg.len() - 12 });
        assert_eq!(decode_args(&msg[12..]).unwrap(), args);
        for short in 0..12 {
            assert_eq!(parse_header(&msg[..short]).unwrap(), None, "{short} bytes");
        }
        assert!(decode_args(&[1, 0, 0]).is_err());
        assert!(decode_args(&[9, 0, 0, 0, b'a']).is_err());
        assert!(decode_args(&[2, 0, 0, 0, 0xff, 0xfe]).is_err());
        assert!(decode_args(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_header(b"GET / HTTP/1.1").is_err());
        let mut huge = b"PXCV".to_vec();
        huge.extend_from_slice(&2u32.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_header(&huge).is_err());
    }

    #[test]
    fn version_one_requests_still_parse() {
        let mut v1 = b"PXC1".to_vec();
        v1.extend_from_slice(&5u32.to_le_bytes());
        v1.extend_from_slice(&[1, 0, 0, 0, b'x']);
        let h = parse_header(&v1).unwrap().unwrap();
        assert_eq!(h, Header { version: 1, header_len: 8, payload_len: 5 });
        assert_eq!(decode_args(&v1[8..]).unwrap(), s(&["x"]));
    }

    #[test]
    fn replies_round_trip() {
        assert_eq!(decode_reply(&encode_reply(-7)).unwrap(), -7);
        assert!(decode_reply(b"PXR2\0\0\0\0").is_err());
    }
}
