//! Diff streams: the blocks that changed between two snapshots, written so that another store
//! can replay them (`vdi export-diff` / `vdi import-diff`, as `rbd export-diff` does).
//!
//! The format (all integers little-endian; docs/format.md §7.2):
//!
//! ```text
//! magic   "PXDIFF\r\n" then u32 version (1)
//! records, each a tag byte:
//!   'f' u32 n, n bytes   name of the snapshot the diff starts from (absent: from nothing)
//!   't' u32 n, n bytes   name of the snapshot it ends at (absent: unnamed, or a live VDI)
//!   's' u64              size of the disk at the end, in bytes
//!   'w' u64 off, u64 n, n bytes   these bytes changed
//!   'z' u64 off, u64 n            these bytes are zeros now
//!   'e' u32 crc          end: CRC32C of every byte before this record's tag
//! ```
//!
//! 'f', 't' and 's' come before the first 'w' or 'z'; 's' is required; ranges are in
//! ascending order, do not overlap and lie inside the size. A reader applies nothing unless
//! the stream ends with a correct 'e' record: an import is one [`crate::Import`].

use std::io::{Read, Write};
use std::sync::Arc;

use blockstore::BLOCK_SIZE;

use crate::registry::{Registry, Source};
use crate::{Result, SnapshotId, VdiError, VdiId};

/// The stream's first eight bytes.
pub const DIFF_MAGIC: &[u8; 8] = b"PXDIFF\r\n";
/// The version this code writes and reads.
pub const DIFF_VERSION: u32 = 1;
/// Largest 'w' record written, and read into memory at once.
const MAX_RECORD: u64 = 4 << 20;

/// What a diff export or import moved.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiffStats {
    /// Size of the disk at the end of the diff.
    pub size: u64,
    /// Bytes carried as data.
    pub data_bytes: u64,
    /// Bytes carried as zeros (no data in the stream).
    pub zero_bytes: u64,
    /// The starting snapshot's name, if the stream has one.
    pub from_name: Option<String>,
    /// The ending snapshot's name, if the stream has one.
    pub to_name: Option<String>,
}

/// A writer that keeps a running CRC32C of what passes through.
struct Crc<W> {
    inner: W,
    crc: u32,
}

impl<W: Write> Crc<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.inner.write_all(bytes)
    }
}

fn out_err(e: std::io::Error) -> VdiError {
    VdiError::File { op: "writing the diff stream".into(), source: e }
}

fn in_err(e: std::io::Error) -> VdiError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        VdiError::BadDiff("the stream ends early (truncated?)".into())
    } else {
        VdiError::File { op: "reading the diff stream".into(), source: e }
    }
}

impl Registry {
    /// Writes the changes from snapshot `from` (or from nothing: every block, holes as zeros)
    /// to `to` — a snapshot, or a VDI as it is now — as a diff stream. Shared subtrees are
    /// skipped unread.
    pub fn export_diff(
        self: &Arc<Self>,
        from: Option<SnapshotId>,
        to: Source,
        out: &mut dyn Write,
    ) -> Result<DiffStats> {
        let dev = self.open_source(to)?;
        let size = dev.size();
        let name_of = |s: SnapshotId| self.snapshot_info(s).ok().and_then(|i| i.name);
        // The importer finds the base by name: a diff from an unnamed snapshot would look
        // like a whole disk and apply on top of anything.
        let from_name = match from {
            None => None,
            Some(f) => Some(name_of(f).ok_or(VdiError::UnnamedBase(f))?),
        };
        let to_name = match to {
            Source::Snapshot(s) => name_of(s),
            Source::Vdi(_) => None,
        };
        // Ranges to send, in order: (offset, len). From nothing, the whole disk.
        let ranges: Vec<(u64, u64)> = match from {
            Some(f) => self.diff(Source::Snapshot(f), to)?,
            None => vec![(0, size)],
        };
        let mut w = Crc { inner: std::io::BufWriter::with_capacity(1 << 20, out), crc: 0 };
        w.put(DIFF_MAGIC).map_err(out_err)?;
        w.put(&DIFF_VERSION.to_le_bytes()).map_err(out_err)?;
        for (tag, name) in [(b'f', &from_name), (b't', &to_name)] {
            if let Some(n) = name {
                w.put(&[tag]).map_err(out_err)?;
                w.put(&(n.len() as u32).to_le_bytes()).map_err(out_err)?;
                w.put(n.as_bytes()).map_err(out_err)?;
            }
        }
        w.put(b"s").map_err(out_err)?;
        w.put(&size.to_le_bytes()).map_err(out_err)?;
        let mut stats = DiffStats { size, from_name, to_name, ..Default::default() };
        let mut buf = vec![0u8; MAX_RECORD as usize];
        let dev_err = |e: blockdev::DevError| VdiError::Damaged(e.to_string());
        for (off, len) in ranges {
            let end = (off + len).min(size);
            let mut at = off;
            while at < end {
                // Holes of the tree go as zeros unread; data is read and split into runs of
                // zero and non-zero blocks.
                for ext in dev.extents(at, (end - at).min(MAX_RECORD)).map_err(dev_err)? {
                    if ext.kind == blockdev::ExtentKind::Hole {
                        put_zero(&mut w, ext.offset, ext.len, &mut stats)?;
                        continue;
                    }
                    let data = &mut buf[..ext.len as usize];
                    dev.read_at(ext.offset, data).map_err(dev_err)?;
                    let mut i = 0usize;
                    while i < data.len() {
                        let step = (data.len() - i).min(BLOCK_SIZE);
                        let zero = data[i..i + step].iter().all(|&b| b == 0);
                        let mut j = i + step;
                        while j < data.len() {
                            let s = (data.len() - j).min(BLOCK_SIZE);
                            if data[j..j + s].iter().all(|&b| b == 0) != zero {
                                break;
                            }
                            j += s;
                        }
                        let o = ext.offset + i as u64;
                        if zero {
                            put_zero(&mut w, o, (j - i) as u64, &mut stats)?;
                        } else {
                            w.put(b"w").map_err(out_err)?;
                            w.put(&o.to_le_bytes()).map_err(out_err)?;
                            w.put(&((j - i) as u64).to_le_bytes()).map_err(out_err)?;
                            w.put(&data[i..j]).map_err(out_err)?;
                            stats.data_bytes += (j - i) as u64;
                        }
                        i = j;
                    }
                }
                at = (at + MAX_RECORD).min(end);
            }
        }
        let crc = w.crc;
        w.put(b"e").map_err(out_err)?;
        w.put(&crc.to_le_bytes()).map_err(out_err)?;
        w.inner.flush().map_err(out_err)?;
        Ok(stats)
    }

    /// Applies a diff stream to VDI `id`, atomically: nothing changes unless the whole stream
    /// is read and its checksum is right. If the stream starts from a named snapshot, the VDI
    /// must have a snapshot of that name (the diff applies on top of it); if it ends at a named
    /// snapshot, the VDI gets a snapshot of that name afterwards. Blocks that already hold the
    /// stream's bytes are left alone (and stay shared).
    pub fn import_diff(self: &Arc<Self>, id: VdiId, input: &mut dyn Read) -> Result<DiffStats> {
        let mut r = CrcReader { inner: input, crc: 0 };
        let mut magic = [0u8; 8];
        r.get(&mut magic)?;
        if &magic != DIFF_MAGIC {
            return Err(VdiError::BadDiff("not a Parallax diff stream (wrong magic)".into()));
        }
        let version = r.u32()?;
        if version != DIFF_VERSION {
            return Err(VdiError::BadDiff(format!("version {version}; this build reads version {DIFF_VERSION}")));
        }
        let mut stats = DiffStats::default();
        let mut size = None;
        let mut import: Option<crate::Import> = None;
        let mut last_end = 0u64;
        let mut buf = Vec::new();
        loop {
            let crc_before = r.crc;
            let tag = r.u8()?;
            match tag {
                b'f' | b't' if import.is_none() => {
                    let n = r.u32()? as usize;
                    if n == 0 || n > crate::disk::SNAP_NAME_MAX {
                        return Err(VdiError::BadDiff(format!("a snapshot name of {n} bytes")));
                    }
                    let mut name = vec![0u8; n];
                    r.get(&mut name)?;
                    let name = String::from_utf8(name)
                        .map_err(|_| VdiError::BadDiff("a snapshot name that is not UTF-8".into()))?;
                    // Checked now, before anything is written, not when the snapshot is taken.
                    crate::snap_names::check_snapshot_name(&name)?;
                    if tag == b'f' {
                        self.find_snapshot(id, &name)?;
                        stats.from_name = Some(name);
                    } else {
                        if let Ok(other) = self.find_snapshot(id, &name) {
                            return Err(VdiError::SnapshotNameTaken { vdi: id, name, other });
                        }
                        stats.to_name = Some(name);
                    }
                }
                b's' if import.is_none() => {
                    let s = r.u64()?;
                    if s == 0 || s > crate::MAX_VDI_SIZE || !s.is_multiple_of(512) {
                        return Err(VdiError::BadDiff(format!("a disk size of {s} bytes")));
                    }
                    size = Some(s);
                }
                b'w' | b'z' => {
                    let size = size.ok_or_else(|| VdiError::BadDiff("data before the size record".into()))?;
                    if import.is_none() {
                        import = Some(self.begin_import_resized(id, size)?);
                    }
                    let imp = import.as_mut().ok_or_else(|| VdiError::Damaged("import vanished".into()))?;
                    let (off, len) = (r.u64()?, r.u64()?);
                    let end = off.checked_add(len).filter(|e| *e <= size);
                    if off < last_end || end.is_none() || len == 0 {
                        return Err(VdiError::BadDiff(format!(
                            "range {off}+{len} is out of order, empty or past the disk's end"
                        )));
                    }
                    // A stream from nothing describes the whole disk: its ranges tile it.
                    if stats.from_name.is_none() && off != last_end {
                        return Err(VdiError::BadDiff(format!(
                            "a stream with no starting snapshot leaves bytes {last_end}..{off} undescribed"
                        )));
                    }
                    last_end = off + len;
                    if tag == b'z' {
                        imp.write_zeroes(off, len)?;
                        stats.zero_bytes += len;
                    } else {
                        if len > MAX_RECORD {
                            return Err(VdiError::BadDiff(format!("a data record of {len} bytes")));
                        }
                        buf.resize(len as usize, 0);
                        r.get(&mut buf)?;
                        imp.write_bytes(off, &buf)?;
                        stats.data_bytes += len;
                    }
                }
                b'e' => {
                    let want = r.u32()?;
                    if want != crc_before {
                        return Err(VdiError::BadDiff("checksum mismatch: the stream is damaged".into()));
                    }
                    // Two streams run together (`cat a b`) must not apply the first alone.
                    let mut more = [0u8; 1];
                    if r.inner.read(&mut more).map_err(in_err)? != 0 {
                        return Err(VdiError::BadDiff("bytes follow the end record".into()));
                    }
                    break;
                }
                other => {
                    return Err(VdiError::BadDiff(format!("unexpected record tag 0x{other:02x}")));
                }
            }
        }
        let size = size.ok_or_else(|| VdiError::BadDiff("no size record".into()))?;
        if stats.from_name.is_none() && last_end != size {
            return Err(VdiError::BadDiff(format!(
                "a stream with no starting snapshot leaves bytes {last_end}..{size} undescribed"
            )));
        }
        let import = match import {
            Some(i) => i,
            None => self.begin_import_resized(id, size)?,
        };
        // The data and the ending snapshot land together: nothing writes between them.
        import.commit_and_snapshot(size, stats.to_name.as_deref())?;
        stats.size = size;
        Ok(stats)
    }
}

fn put_zero<W: Write>(w: &mut Crc<W>, off: u64, len: u64, stats: &mut DiffStats) -> Result<()> {
    w.put(b"z").map_err(out_err)?;
    w.put(&off.to_le_bytes()).map_err(out_err)?;
    w.put(&len.to_le_bytes()).map_err(out_err)?;
    stats.zero_bytes += len;
    Ok(())
}

/// A reader that keeps a running CRC32C of what it returns.
struct CrcReader<'a> {
    inner: &'a mut dyn Read,
    crc: u32,
}

impl CrcReader<'_> {
    fn get(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(in_err)?;
        self.crc = crc32c::crc32c_append(self.crc, buf);
        Ok(())
    }
    fn u8(&mut self) -> Result<u8> {
        let mut b = [0u8; 1];
        self.get(&mut b)?;
        Ok(b[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.get(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.get(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}
