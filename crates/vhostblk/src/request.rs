//! One virtio-blk request (virtio 1.2 §5.2.6): its header, data and status byte, found in the
//! guest's memory in whatever descriptor layout the driver chose, and executed on the device.

use std::panic::{AssertUnwindSafe, catch_unwind};

use blockdev::{BlockDevice, DevError};
use tracing::{debug, warn};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::guest_io::{self, DataPath};

/// The unit of `sector` in a request header.
pub(crate) const SECTOR: u64 = 512;

// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

// Status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Length of the request header: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: usize = 16;
/// Length of one discard / write-zeroes segment: sector (le64), sectors (le32), flags (le32).
const SEGMENT_LEN: usize = 16;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
const FLAG_UNMAP: u32 = 1;
/// Length of the GET_ID answer.
pub(crate) const ID_LEN: usize = 20;
/// Most bytes copied between guest memory and the device at once.
const CHUNK: usize = 1 << 20;

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    /// Where it is in guest memory.
    pub addr: GuestAddress,
    /// Its length.
    pub len: u32,
}

/// A request's buffers as the driver must order them: all device-readable ones, then all
/// device-writable ones.
#[derive(Debug, Default)]
pub(crate) struct Buffers {
    /// What the device reads: the header, then (OUT, DISCARD, WRITE_ZEROES) the data.
    pub readable: Vec<Segment>,
    /// What the device writes: (IN, GET_ID) the data, then the status byte.
    pub writable: Vec<Segment>,
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Calls `copy(guest address, range of the caller's buffer)` for each piece of the `len` bytes
/// that start `skip` bytes into `segs`; fails if the buffers are shorter or a copy fails.
pub(crate) fn walk(
    segs: &[Segment],
    mut skip: u64,
    len: usize,
    mut copy: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
) -> Result<(), u8> {
    let mut done = 0;
    for s in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(s.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = ((seg_len - skip) as usize).min(len - done);
        let addr = s.addr.checked_add(skip).ok_or(S_IOERR)?;
        if !copy(addr, done..done + n) {
            return Err(S_IOERR);
        }
        done += n;
        skip = 0;
    }
    if done == len { Ok(()) } else { Err(S_IOERR) }
}

/// Copies `out.len()` bytes that start `skip` bytes into `segs` out of guest memory.
fn gather<M: Bytes<GuestAddress>>(mem: &M, segs: &[Segment], skip: u64, out: &mut [u8]) -> Result<(), u8> {
    let len = out.len();
    walk(segs, skip, len, |addr, r| mem.read_slice(&mut out[r], addr).is_ok())
}

/// Copies `data` into guest memory, starting `skip` bytes into `segs`.
fn scatter<M: Bytes<GuestAddress>>(mem: &M, segs: &[Segment], skip: u64, data: &[u8]) -> Result<(), u8> {
    walk(segs, skip, data.len(), |addr, r| mem.write_slice(&data[r], addr).is_ok())
}

thread_local! {
    /// Each request thread's bounce buffer between guest memory and the device, kept across
    /// requests: a fresh zeroed megabyte per request cost a page fault per 4 KiB (or a memset).
    static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's bounce buffer of [`CHUNK`] bytes (whatever an earlier request
/// left in it: every use overwrites what it reads).
fn with_buffer<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    BOUNCE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < CHUNK {
                buf.resize(CHUNK, 0);
            }
            f(&mut buf[..CHUNK])
        }
        // Not reentrant in practice (a device does not call back into us); if it ever is, a
        // private buffer does.
        Err(_) => f(&mut vec![0u8; CHUNK]),
    })
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn status_of(e: &DevError) -> u8 {
    match e {
        DevError::Unsupported(_) => S_UNSUPP,
        _ => S_IOERR,
    }
}

/// Executes the request in `b` on `dev` and writes its status byte. Returns the bytes written
/// into the writable buffers (the used length the driver is told).
pub(crate) fn execute(dev: &dyn BlockDevice, mem: &GuestMemoryMmap, path: DataPath, b: &Buffers, serial: &[u8]) -> u32 {
    let writable = total(&b.writable);
    if writable == 0 {
        debug!("virtio-blk request without room for a status byte; dropped");
        return 0;
    }
    // A device that panics fails this request, not the queue (nor the worker) serving it.
    let outcome =
        catch_unwind(AssertUnwindSafe(|| run(dev, mem, path, b, writable - 1, serial))).unwrap_or_else(|_| {
            warn!("the device panicked executing a virtio-blk request; it fails with an I/O error");
            Err(S_IOERR)
        });
    let (status, data) = match outcome {
        Ok(data) => (S_OK, data),
        Err(status) => (status, 0),
    };
    if scatter(mem, &b.writable, writable - 1, &[status]).is_err() {
        return 0;
    }
    u32::try_from(data + 1).unwrap_or(u32::MAX)
}

/// Runs the request; `Ok` with the data bytes written into the writable buffers.
fn run(
    dev: &dyn BlockDevice,
    mem: &GuestMemoryMmap,
    path: DataPath,
    b: &Buffers,
    data_in: u64,
    serial: &[u8],
) -> Result<u64, u8> {
    let mut header = [0u8; HEADER_LEN];
    gather(mem, &b.readable, 0, &mut header)?;
    let typ = le32(&header[0..4]);
    let sector = le64(&header[8..16]);
    let data_out = total(&b.readable) - HEADER_LEN as u64;
    let range = |len: u64| -> Result<u64, u8> {
        let offset = sector.checked_mul(SECTOR).ok_or(S_IOERR)?;
        match offset.checked_add(len) {
            Some(end) if end <= dev.size() && len.is_multiple_of(SECTOR) => Ok(offset),
            _ => Err(S_IOERR),
        }
    };
    match typ {
        T_IN => {
            let offset = range(data_in)?;
            // Buffers the data could not all be put in fail the request before the device is
            // asked for anything (on the bounce path, it would be read and then thrown away).
            if !b.writable.iter().all(|s| mem.check_range(s.addr, s.len as usize)) {
                return Err(S_IOERR);
            }
            let mut done = 0u64;
            while done < data_in {
                let n = ((data_in - done) as usize).min(CHUNK);
                // Straight into the guest's buffers; through our own when the memory is not
                // for that, the buffers overlap or are too many (or are not all in guest
                // memory, which then fails the request).
                let direct = (path == DataPath::Direct).then(|| guest_io::writable(mem, &b.writable, done, n));
                match direct.flatten() {
                    Some(mut bufs) => dev.read_vectored_at(offset + done, &mut bufs).map_err(|e| status_of(&e))?,
                    None => with_buffer(|buf| {
                        dev.read_at(offset + done, &mut buf[..n]).map_err(|e| status_of(&e))?;
                        scatter(mem, &b.writable, done, &buf[..n])
                    })?,
                }
                done += n as u64;
            }
            Ok(data_in)
        }
        T_OUT => {
            if dev.read_only() {
                return Err(S_IOERR);
            }
            let offset = range(data_out)?;
            let mut done = 0u64;
            while done < data_out {
                let n = ((data_out - done) as usize).min(CHUNK);
                let from = HEADER_LEN as u64 + done;
                let direct = (path == DataPath::Direct).then(|| guest_io::readable(mem, &b.readable, from, n));
                match direct.flatten() {
                    Some(bufs) => dev.write_vectored_at(offset + done, &bufs, false).map_err(|e| status_of(&e))?,
                    None => with_buffer(|buf| {
                        gather(mem, &b.readable, from, &mut buf[..n])?;
                        dev.write_at(offset + done, &buf[..n], false).map_err(|e| status_of(&e))
                    })?,
                }
                done += n as u64;
            }
            Ok(0)
        }
        T_FLUSH => {
            if !dev.read_only() {
                dev.flush().map_err(|e| status_of(&e))?;
            }
            Ok(0)
        }
        T_GET_ID => {
            let mut id = [0u8; ID_LEN];
            let n = serial.len().min(ID_LEN);
            id[..n].copy_from_slice(&serial[..n]);
            let n = (data_in as usize).min(ID_LEN);
            scatter(mem, &b.writable, 0, &id[..n])?;
            Ok(n as u64)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if dev.read_only() {
                return Err(S_IOERR);
            }
            if data_out == 0 || !data_out.is_multiple_of(SEGMENT_LEN as u64) || data_out > 64 * SEGMENT_LEN as u64 {
                return Err(S_UNSUPP);
            }
            for i in 0..data_out / SEGMENT_LEN as u64 {
                let mut seg = [0u8; SEGMENT_LEN];
                gather(mem, &b.readable, HEADER_LEN as u64 + i * SEGMENT_LEN as u64, &mut seg)?;
                let (start, sectors, flags) = (le64(&seg[0..8]), le32(&seg[8..12]), le32(&seg[12..16]));
                let offset = start.checked_mul(SECTOR).ok_or(S_IOERR)?;
                let len = u64::from(sectors) * SECTOR;
                if offset.checked_add(len).is_none_or(|end| end > dev.size()) {
                    return Err(S_IOERR);
                }
                if typ == T_DISCARD {
                    if flags != 0 {
                        return Err(S_UNSUPP);
                    }
                    match dev.discard(offset, len) {
                        // A discard is a hint.
                        Ok(()) | Err(DevError::Unsupported(_)) => {}
                        Err(e) => return Err(status_of(&e)),
                    }
                } else {
                    if flags & !FLAG_UNMAP != 0 {
                        return Err(S_UNSUPP);
                    }
                    write_zeroes(dev, offset, len)?;
                }
            }
            Ok(0)
        }
        other => {
            debug!(typ = other, "unsupported virtio-blk request");
            Err(S_UNSUPP)
        }
    }
}

/// Zeroes the range: as holes where the device can, as zero bytes where it cannot.
fn write_zeroes(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<(), u8> {
    match dev.write_zeroes(offset, len) {
        Ok(()) => Ok(()),
        Err(DevError::Unsupported(_)) => {
            let zeros = vec![0u8; (len as usize).min(CHUNK)];
            let mut done = 0u64;
            while done < len {
                let n = ((len - done) as usize).min(CHUNK);
                dev.write_at(offset + done, &zeros[..n], false).map_err(|e| status_of(&e))?;
                done += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(status_of(&e)),
    }
}

#[cfg(test)]
mod tests {
    use blockdev::MemDisk;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, typ: u32, sector: u64) -> Segment {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&typ.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
        Segment { addr: GuestAddress(at), len: HEADER_LEN as u32 }
    }

    fn seg(at: u64, len: u32) -> Segment {
        Segment { addr: GuestAddress(at), len }
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        let mut s = [0u8];
        mem.read_slice(&mut s, GuestAddress(at)).unwrap();
        s[0]
    }

    #[test]
    fn writes_then_reads_across_scattered_buffers() {
        for path in [DataPath::Direct, DataPath::Bounce] {
            scattered_buffers(path);
        }
    }

    fn scattered_buffers(path: DataPath) {
        let (m, dev) = (mem(), MemDisk::new(1 << 20));
        // OUT of 8 KiB at sector 8, from two buffers of 3 KiB and 5 KiB.
        m.write_slice(&[0xaa; 3072], GuestAddress(0x10000)).unwrap();
        m.write_slice(&[0xbb; 5120], GuestAddress(0x20000)).unwrap();
        let out = Buffers {
            readable: vec![header(&m, 0x1000, T_OUT, 8), seg(0x10000, 3072), seg(0x20000, 5120)],
            writable: vec![seg(0x2000, 1)],
        };
        assert_eq!(execute(&dev, &m, path, &out, b""), 1);
        assert_eq!(status(&m, 0x2000), S_OK);
        // IN of the same 8 KiB into one buffer whose last byte is the status (any layout).
        let inn = Buffers { readable: vec![header(&m, 0x1000, T_IN, 8)], writable: vec![seg(0x30000, 8193)] };
        assert_eq!(execute(&dev, &m, path, &inn, b""), 8193);
        let mut got = vec![0u8; 8193];
        m.read_slice(&mut got, GuestAddress(0x30000)).unwrap();
        assert!(got[..3072].iter().all(|&b| b == 0xaa) && got[3072..8192].iter().all(|&b| b == 0xbb));
        assert_eq!(got[8192], S_OK);
    }

    /// A disk that says which read call served it.
    struct Which {
        disk: MemDisk,
        vectored: std::sync::atomic::AtomicUsize,
        plain: std::sync::atomic::AtomicUsize,
    }

    impl BlockDevice for Which {
        fn size(&self) -> u64 {
            self.disk.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> blockdev::DevResult<()> {
            self.plain.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.disk.read_at(offset, buf)
        }
        fn read_vectored_at(&self, offset: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> blockdev::DevResult<()> {
            self.vectored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut at = offset;
            for b in bufs.iter_mut() {
                self.disk.read_at(at, b)?;
                at += b.len() as u64;
            }
            Ok(())
        }
        fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> blockdev::DevResult<()> {
            self.disk.write_at(offset, data, fua)
        }
        fn flush(&self) -> blockdev::DevResult<()> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> blockdev::DevResult<()> {
            self.disk.discard(offset, len)
        }
        fn extents(&self, offset: u64, len: u64) -> blockdev::DevResult<Vec<blockdev::Extent>> {
            self.disk.extents(offset, len)
        }
    }

    #[test]
    fn reads_go_straight_into_guest_buffers_unless_they_overlap() {
        use std::sync::atomic::Ordering::Relaxed;
        let m = mem();
        let dev = Which { disk: MemDisk::new(1 << 20), vectored: Default::default(), plain: Default::default() };
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        dev.disk.write_at(0, &data, false).unwrap();
        // Two separate buffers: one vectored read into guest memory, no copy of ours.
        let apart = Buffers {
            readable: vec![header(&m, 0x1000, T_IN, 0)],
            writable: vec![seg(0x10000, 3072), seg(0x20000, 5120), seg(0x2000, 1)],
        };
        assert_eq!(execute(&dev, &m, DataPath::Direct, &apart, b""), 8193);
        assert_eq!((dev.vectored.load(Relaxed), dev.plain.load(Relaxed)), (1, 0));
        let mut got = vec![0u8; 8192];
        m.read_slice(&mut got[..3072], GuestAddress(0x10000)).unwrap();
        m.read_slice(&mut got[3072..], GuestAddress(0x20000)).unwrap();
        assert!(got == data && status(&m, 0x2000) == S_OK);
        // Buffers that share bytes: read into our buffer, copied out in order (the later
        // buffer's bytes win where they overlap).
        let overlapping = Buffers {
            readable: vec![header(&m, 0x1000, T_IN, 0)],
            writable: vec![seg(0x30000, 4096), seg(0x30800, 4096), seg(0x2000, 1)],
        };
        assert_eq!(execute(&dev, &m, DataPath::Direct, &overlapping, b""), 8193);
        assert_eq!((dev.vectored.load(Relaxed), dev.plain.load(Relaxed)), (1, 1));
        let mut got = vec![0u8; 6144];
        m.read_slice(&mut got, GuestAddress(0x30000)).unwrap();
        assert!(got[..2048] == data[..2048] && got[2048..] == data[4096..]);
        assert_eq!(status(&m, 0x2000), S_OK);
        // Memory not for direct use: through our buffer too.
        assert_eq!(execute(&dev, &m, DataPath::Bounce, &apart, b""), 8193);
        assert_eq!((dev.vectored.load(Relaxed), dev.plain.load(Relaxed)), (1, 2));
    }

    #[test]
    fn a_read_into_buffers_outside_guest_memory_fails_before_the_device_is_read() {
        use std::sync::atomic::Ordering::Relaxed;
        let m = mem();
        let dev = Which { disk: MemDisk::new(1 << 20), vectored: Default::default(), plain: Default::default() };
        for path in [DataPath::Direct, DataPath::Bounce] {
            let outside = Buffers {
                readable: vec![header(&m, 0x1000, T_IN, 0)],
                writable: vec![seg(0x10000, 512), seg(1 << 40, 512), seg(0x2000, 1)],
            };
            assert_eq!(execute(&dev, &m, path, &outside, b""), 1, "{path:?}");
            assert_eq!(status(&m, 0x2000), S_IOERR, "{path:?}");
        }
        assert_eq!((dev.vectored.load(Relaxed), dev.plain.load(Relaxed)), (0, 0), "the device was read");
    }

    #[test]
    fn bad_requests_get_an_error_status_not_a_panic() {
        let (m, dev) = (mem(), MemDisk::new(1 << 20));
        // Past the end.
        let past = Buffers { readable: vec![header(&m, 0x1000, T_IN, 2048)], writable: vec![seg(0x30000, 513)] };
        assert_eq!(execute(&dev, &m, DataPath::Direct, &past, b""), 1);
        assert_eq!(status(&m, 0x30000 + 512), S_IOERR);
        // Not a multiple of the sector.
        let odd = Buffers { readable: vec![header(&m, 0x1000, T_IN, 0)], writable: vec![seg(0x30000, 101)] };
        execute(&dev, &m, DataPath::Direct, &odd, b"");
        assert_eq!(status(&m, 0x30000 + 100), S_IOERR);
        // A header cut short, an unknown type, a buffer outside guest memory.
        let short = Buffers { readable: vec![seg(0x1000, 8)], writable: vec![seg(0x2000, 1)] };
        execute(&dev, &m, DataPath::Direct, &short, b"");
        assert_eq!(status(&m, 0x2000), S_IOERR);
        let unknown = Buffers { readable: vec![header(&m, 0x1000, 99, 0)], writable: vec![seg(0x2000, 1)] };
        execute(&dev, &m, DataPath::Direct, &unknown, b"");
        assert_eq!(status(&m, 0x2000), S_UNSUPP);
        let outside =
            Buffers { readable: vec![header(&m, 0x1000, T_IN, 0)], writable: vec![seg(1 << 40, 512), seg(0x2000, 1)] };
        execute(&dev, &m, DataPath::Direct, &outside, b"");
        assert_eq!(status(&m, 0x2000), S_IOERR);
        // No status byte at all: nothing written, nothing used.
        let none = Buffers { readable: vec![header(&m, 0x1000, T_FLUSH, 0)], writable: vec![] };
        assert_eq!(execute(&dev, &m, DataPath::Direct, &none, b""), 0);
    }

    #[test]
    fn discard_zeroes_get_id_and_read_only() {
        let (m, dev) = (mem(), MemDisk::new(1 << 20));
        dev.write_at(0, &[7u8; 8192], false).unwrap();
        let mut s = [0u8; SEGMENT_LEN];
        s[0..8].copy_from_slice(&1u64.to_le_bytes());
        s[8..12].copy_from_slice(&2u32.to_le_bytes());
        s[12..16].copy_from_slice(&FLAG_UNMAP.to_le_bytes());
        m.write_slice(&s, GuestAddress(0x5000)).unwrap();
        let wz = Buffers {
            readable: vec![header(&m, 0x1000, T_WRITE_ZEROES, 0), seg(0x5000, 16)],
            writable: vec![seg(0x2000, 1)],
        };
        execute(&dev, &m, DataPath::Direct, &wz, b"");
        assert_eq!(status(&m, 0x2000), S_OK);
        let mut back = vec![0u8; 2048];
        dev.read_at(0, &mut back).unwrap();
        assert!(back[..512].iter().all(|&b| b == 7) && back[512..1536].iter().all(|&b| b == 0));
        assert!(back[1536..].iter().all(|&b| b == 7));

        let id = Buffers {
            readable: vec![header(&m, 0x1000, T_GET_ID, 0)],
            writable: vec![seg(0x6000, 20), seg(0x2000, 1)],
        };
        assert_eq!(execute(&dev, &m, DataPath::Direct, &id, b"parallax-7"), 21);
        let mut got = [0u8; 20];
        m.read_slice(&mut got, GuestAddress(0x6000)).unwrap();
        assert_eq!(&got[..10], b"parallax-7");

        let ro = MemDisk::new(1 << 20).into_read_only();
        let out =
            Buffers { readable: vec![header(&m, 0x1000, T_OUT, 0), seg(0x10000, 512)], writable: vec![seg(0x2000, 1)] };
        execute(&ro, &m, DataPath::Direct, &out, b"");
        assert_eq!(status(&m, 0x2000), S_IOERR);
    }
}
