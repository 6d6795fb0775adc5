//! Protocol constants and the byte layout of NBD messages (all integers big-endian).
//!
//! Only pure encoding and decoding lives here; nothing in this module does I/O.

/// `NBDMAGIC`, first word of the server greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second word of the greeting and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of a transmission request once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of every reply chunk once extended headers are negotiated.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// `NBD_REP_ERR_TLS_REQD`: upgrade to TLS first.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// `NBD_REP_ERR_TOO_BIG`: the option's data is larger than the server accepts.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`: not without extended headers (here: structured replies asked
/// for after extended headers were agreed).
pub const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;

// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers only: the length field counts a payload that follows the header.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status with 64-bit lengths, the only form allowed with extended headers.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Error values allowed on the wire.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Name of the one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an extended transmission request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_HEADER_LEN: usize = 32;
/// Length of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest string (export name, error message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Maps an errno (as from [`blockdev::DevError::errno`]) to one of the values the protocol allows.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        1 => EPERM,
        5 => EIO,
        12 => ENOMEM,
        22 => EINVAL,
        28 | 122 | 27 => ENOSPC, // ENOSPC, EDQUOT, EFBIG
        75 => EOVERFLOW,
        95 => ENOTSUP,
        108 => ESHUTDOWN,
        _ => EIO,
    }
}

/// A decoded transmission request header (compact or extended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub typ: u16,
    /// Opaque handle ("cookie") echoed in the reply.
    pub handle: u64,
    /// First byte addressed.
    pub offset: u64,
    /// Length in bytes: 32 bits in a compact header, 64 in an extended one. For WRITE (and,
    /// with [`CMD_FLAG_PAYLOAD_LEN`], any command) the length of the payload that follows.
    pub len: u64,
}

impl Request {
    /// Decodes a compact header; `Err` carries the bad magic.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, u32> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Request {
            flags: be16(&b[4..6]),
            typ: be16(&b[6..8]),
            handle: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: u64::from(be32(&b[24..28])),
        })
    }

    /// Decodes an extended header; `Err` carries the bad magic.
    pub fn decode_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Result<Request, u32> {
        let magic = be32(&b[0..4]);
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Request {
            flags: be16(&b[4..6]),
            typ: be16(&b[6..8]),
            handle: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be64(&b[24..32]),
        })
    }

    /// Encodes a compact header (used by tests acting as a client); `len` must fit 32 bits.
    #[cfg(test)]
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&(self.len as u32).to_be_bytes());
        b
    }

    /// Encodes an extended header (used by tests acting as a client).
    #[cfg(test)]
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Writes a simple reply header into the first [`SIMPLE_REPLY_LEN`] bytes of `out`.
pub fn put_simple_reply(out: &mut [u8], error: u32, handle: u64) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    put_simple_reply(&mut b, error, handle);
    b
}

/// The header every chunk of one reply carries: the request's handle and offset, and whether
/// the connection uses extended headers (32-byte chunk headers with a 64-bit length and the
/// request's offset) or structured replies (20-byte headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// The request's handle.
    pub handle: u64,
    /// The request's offset (echoed in extended headers).
    pub offset: u64,
    /// Extended headers were negotiated.
    pub extended: bool,
}

impl ReplyTo {
    /// Length of one chunk header.
    pub fn header_len(&self) -> usize {
        if self.extended { EXTENDED_HEADER_LEN } else { CHUNK_HEADER_LEN }
    }

    /// Writes a chunk header into the first [`ReplyTo::header_len`] bytes of `out`. A compact
    /// header's length is 32 bits; callers never build larger compact chunks.
    pub fn put_header(&self, out: &mut [u8], flags: u16, typ: u16, len: u64) {
        let magic = if self.extended { EXTENDED_REPLY_MAGIC } else { STRUCTURED_REPLY_MAGIC };
        out[0..4].copy_from_slice(&magic.to_be_bytes());
        out[4..6].copy_from_slice(&flags.to_be_bytes());
        out[6..8].copy_from_slice(&typ.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        if self.extended {
            out[16..24].copy_from_slice(&self.offset.to_be_bytes());
            out[24..32].copy_from_slice(&len.to_be_bytes());
        } else {
            debug_assert!(len <= u64::from(u32::MAX));
            out[16..20].copy_from_slice(&(len as u32).to_be_bytes());
        }
    }

    /// A complete chunk with `payload`.
    pub fn chunk(&self, flags: u16, typ: u16, payload: &[u8]) -> Vec<u8> {
        let head = self.header_len();
        let mut b = vec![0u8; head + payload.len()];
        self.put_header(&mut b, flags, typ, payload.len() as u64);
        b[head..].copy_from_slice(payload);
        b
    }

    /// The final `NBD_REPLY_TYPE_NONE` chunk: success without data.
    pub fn done(&self) -> Vec<u8> {
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[])
    }

    /// Length of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk's head: the header and the offset.
    pub fn data_head_len(&self) -> usize {
        self.header_len() + 8
    }

    /// Writes the head of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying `len` bytes from
    /// `offset` into the first [`ReplyTo::data_head_len`] bytes of `out`; the data follows it.
    pub fn put_data_head(&self, out: &mut [u8], flags: u16, offset: u64, len: u64) {
        self.put_header(out, flags, REPLY_TYPE_OFFSET_DATA, len + 8);
        out[self.header_len()..self.data_head_len()].copy_from_slice(&offset.to_be_bytes());
    }

    /// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
    pub fn hole(&self, flags: u16, offset: u64, len: u32) -> Vec<u8> {
        let mut p = [0u8; 12];
        p[0..8].copy_from_slice(&offset.to_be_bytes());
        p[8..12].copy_from_slice(&len.to_be_bytes());
        self.chunk(flags, REPLY_TYPE_OFFSET_HOLE, &p)
    }

    /// An `NBD_REPLY_TYPE_ERROR` chunk marked done; `message` is cut to the string limit.
    pub fn error(&self, error: u32, message: &str) -> Vec<u8> {
        let msg = truncate_str(message, MAX_STRING_LEN);
        let mut p = Vec::with_capacity(6 + msg.len());
        p.extend_from_slice(&error.to_be_bytes());
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &p)
    }

    /// A block status chunk marked done; `extents` are (length, flags) pairs. Extended headers
    /// get `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (64-bit lengths and flags, with a count); compact
    /// ones `NBD_REPLY_TYPE_BLOCK_STATUS`, whose lengths the caller keeps within 32 bits.
    pub fn block_status(&self, context: u32, extents: &[(u64, u32)]) -> Vec<u8> {
        let mut p = Vec::with_capacity(8 + 16 * extents.len());
        p.extend_from_slice(&context.to_be_bytes());
        if self.extended {
            p.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for &(len, flags) in extents {
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&u64::from(flags).to_be_bytes());
            }
            return self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, &p);
        }
        for &(len, flags) in extents {
            debug_assert!(len <= u64::from(u32::MAX));
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &p)
    }
}

/// An option reply: header followed by `data`.
pub fn option_reply(option: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A bounds-checked reader over option data; every getter returns `None` past the end.
pub struct Parser<'a> {
    buf: &'a [u8],
}

impl<'a> Parser<'a> {
    /// Parses `buf` from its start.
    pub fn new(buf: &'a [u8]) -> Self {
        Parser { buf }
    }

    /// Takes the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    /// Takes a big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(be16)
    }

    /// Takes a big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(be32)
    }

    /// Takes a big-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(be64)
    }

    /// Takes a u32 length followed by that many bytes.
    pub fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()?;
        self.bytes(usize::try_from(len).ok()?)
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r =
            Request { flags: CMD_FLAG_FUA, typ: CMD_WRITE, handle: 0x0102_0304_0506_0708, offset: 1 << 40, len: 4096 };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[6..8], &[0, 1]);
        assert_eq!(Request::decode(&b), Ok(r));
    }

    #[test]
    fn request_bad_magic() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
        assert_eq!(Request::decode(&b), Err(0x1256_0953));
    }

    #[test]
    fn reply_layouts() {
        assert_eq!(simple_reply(22, 7), [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]);
        let to = ReplyTo { handle: 9, offset: 0, extended: false };
        let c = to.hole(REPLY_FLAG_DONE, 4096, 512);
        assert_eq!(c.len(), 32);
        assert_eq!(&c[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&c[4..8], &[0, 1, 0, 2]);
        assert_eq!(&c[16..20], &12u32.to_be_bytes());
        assert_eq!(&c[20..28], &4096u64.to_be_bytes());
        assert_eq!(&c[28..32], &512u32.to_be_bytes());
        let to = ReplyTo { handle: 1, offset: 0, extended: false };
        let e = to.error(EINVAL, "bad");
        assert_eq!(&e[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&e[16..20], &9u32.to_be_bytes());
        assert_eq!(&e[20..24], &22u32.to_be_bytes());
        assert_eq!(&e[24..26], &3u16.to_be_bytes());
        assert_eq!(&e[26..], b"bad");
        let bs = to.block_status(5, &[(4096, 3), (512, 0)]);
        assert_eq!(&bs[16..20], &20u32.to_be_bytes());
        assert_eq!(&bs[20..24], &5u32.to_be_bytes());
        assert_eq!(&bs[24..32], &[0, 0, 16, 0, 0, 0, 0, 3]);
        let o = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(&o[0..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
    }

    #[test]
    fn extended_layouts() {
        let r = Request { flags: 0, typ: CMD_TRIM, handle: 7, offset: 1 << 33, len: 5 << 32 };
        let b = r.encode_extended();
        assert_eq!(&b[0..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(&b[24..32], &(5u64 << 32).to_be_bytes());
        assert_eq!(Request::decode_extended(&b), Ok(r));
        assert_eq!(Request::decode_extended(&[0u8; EXTENDED_REQUEST_LEN]), Err(0));
        let to = ReplyTo { handle: 7, offset: 1 << 33, extended: true };
        let d = to.done();
        assert_eq!(d.len(), 32);
        assert_eq!(&d[0..4], &[0x6e, 0x8a, 0x27, 0x8c]);
        assert_eq!(&d[4..8], &[0, 1, 0, 0]);
        assert_eq!(&d[8..16], &7u64.to_be_bytes());
        assert_eq!(&d[16..24], &(1u64 << 33).to_be_bytes());
        assert_eq!(&d[24..32], &0u64.to_be_bytes());
        let bs = to.block_status(1, &[(5 << 32, 3)]);
        assert_eq!(&bs[6..8], &REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
        assert_eq!(&bs[24..32], &24u64.to_be_bytes());
        assert_eq!(&bs[32..40], &[0, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(&bs[40..48], &(5u64 << 32).to_be_bytes());
        assert_eq!(&bs[48..56], &3u64.to_be_bytes());
    }

    #[test]
    fn error_message_is_bounded() {
        let long = "é".repeat(5000);
        let e = ReplyTo { handle: 1, offset: 0, extended: false }.error(EIO, &long);
        let msg_len = u16::from_be_bytes([e[24], e[25]]) as usize;
        assert!(msg_len <= MAX_STRING_LEN);
        assert!(std::str::from_utf8(&e[26..]).is_ok());
        assert_eq!(e.len(), 26 + msg_len);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(nbd_errno(blockdev::DevError::ReadOnly.errno()), EPERM);
        assert_eq!(nbd_errno(blockdev::DevError::NoSpace.errno()), ENOSPC);
        assert_eq!(nbd_errno(blockdev::DevError::Io("x".into()).errno()), EIO);
        assert_eq!(nbd_errno(blockdev::DevError::OutOfRange { offset: 0, len: 1, size: 0 }.errno()), EINVAL);
        assert_eq!(nbd_errno(blockdev::DevError::Unsupported("x").errno()), ENOTSUP);
        assert_eq!(nbd_errno(4), EIO);
    }

    #[test]
    fn parser_is_bounds_checked() {
        let data = [0, 0, 0, 3, b'a', b'b', b'c', 0, 1];
        let mut p = Parser::new(&data);
        assert_eq!(p.string(), Some(&b"abc"[..]));
        assert_eq!(p.u16(), Some(1));
        assert_eq!(p.u16(), None);
        let mut p = Parser::new(&[0xff, 0xff, 0xff, 0xff, 1]);
        assert_eq!(p.string(), None);
    }
}
