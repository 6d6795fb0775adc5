//! Import from raw images or devices, export to them, and comparison.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use blockstore::BLOCK_SIZE;

use crate::registry::{Registry, Source};
use crate::{Result, VdiError};

/// Bytes moved per step of an import or export.
pub(crate) const CHUNK: usize = 4 << 20;

/// What an import did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ImportStats {
    /// Size of the image in bytes.
    pub image_bytes: u64,
    /// Bytes read from the image (holes are not read).
    pub bytes_read: u64,
    /// 4 KiB blocks stored (their contents differed from what the VDI held).
    pub blocks_written: u64,
    /// Blocks that already held the image's bytes, left alone (and still shared).
    pub blocks_unchanged: u64,
    /// Blocks that held data where the image has zeros, unmapped.
    pub blocks_cleared: u64,
    /// All-zero blocks of the image (not stored).
    pub zero_blocks: u64,
    /// Bytes skipped as holes without reading.
    pub hole_bytes: u64,
}

/// What an export did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ExportStats {
    /// Size of the exported image.
    pub bytes: u64,
    /// Bytes of data written (the rest is holes).
    pub data_bytes: u64,
}

/// The outcome of comparing a VDI or snapshot with an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Comparison {
    /// First byte offset where they differ, or `None` if identical. Where one is longer, the
    /// extra part must read as zeros to count as identical.
    pub first_difference: Option<u64>,
    /// Size of the VDI or snapshot.
    pub source_size: u64,
    /// Size of the image.
    pub image_size: u64,
}

pub(crate) fn file_err(op: String) -> impl FnOnce(std::io::Error) -> VdiError {
    move |source| VdiError::File { op, source }
}

/// Size of a regular file or block device.
pub fn image_size(f: &File, path: &Path) -> Result<u64> {
    let mut f = f;
    f.seek(SeekFrom::End(0)).map_err(file_err(format!("finding the size of {}", path.display())))
}

/// The next data region at or after `pos`: `(start, end)`, or `None` past the last one.
pub(crate) fn next_data(f: &File, pos: u64, size: u64) -> Option<(u64, u64)> {
    let fd = f.as_raw_fd();
    // SAFETY: lseek on a descriptor we own with plain integer arguments; errors are checked.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let err = std::io::Error::last_os_error();
        // ENXIO: no data after pos. Anything else (e.g. a device or pipe): treat all as data.
        return if err.raw_os_error() == Some(libc::ENXIO) { None } else { Some((pos, size)) };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    let end = if end < 0 { size } else { (end as u64).min(size) };
    Some((start as u64, end))
}

impl Registry {
    /// Writes a VDI or snapshot into `out` as a raw image. A regular file is written sparsely
    /// (holes and zero blocks are skipped and the file is truncated to size); anything else
    /// (a pipe, a device) gets every byte.
    pub fn export(
        self: &Arc<Self>,
        src: Source,
        out: &mut File,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ExportStats> {
        let dev = self.open_source(src)?;
        let size = dev.size();
        let seekable = out.metadata().map(|m| m.is_file()).unwrap_or(false);
        let mut stats = ExportStats { bytes: size, data_bytes: 0 };
        let werr = || file_err("writing the export".to_string());
        if seekable {
            out.set_len(0).map_err(werr())?;
            out.set_len(size).map_err(werr())?;
        }
        let extents = dev.extents(0, size).map_err(|e| VdiError::Damaged(e.to_string()))?;
        let mut buf = vec![0u8; CHUNK];
        let zeros = vec![0u8; CHUNK];
        for ext in extents {
            let mut at = ext.offset;
            let end = ext.offset + ext.len;
            while at < end {
                let n = ((end - at) as usize).min(CHUNK);
                if ext.kind == blockdev::ExtentKind::Hole {
                    if !seekable {
                        out.write_all(&zeros[..n]).map_err(werr())?;
                    }
                } else {
                    dev.read_at(at, &mut buf[..n]).map_err(|e| VdiError::Damaged(e.to_string()))?;
                    if seekable {
                        // Skip zero blocks to keep the file sparse.
                        for (i, b) in buf[..n].chunks(BLOCK_SIZE).enumerate() {
                            if b.iter().any(|&x| x != 0) {
                                out.write_all_at(b, at + (i * BLOCK_SIZE) as u64).map_err(werr())?;
                                stats.data_bytes += b.len() as u64;
                            }
                        }
                    } else {
                        out.write_all(&buf[..n]).map_err(werr())?;
                        stats.data_bytes += n as u64;
                    }
                }
                at += n as u64;
                progress(at, size);
            }
        }
        out.flush().map_err(werr())?;
        Ok(stats)
    }

    /// Compares a VDI or snapshot with the image at `path`.
    pub fn compare(self: &Arc<Self>, src: Source, path: &Path) -> Result<Comparison> {
        let dev = self.open_source(src)?;
        let f = File::open(path).map_err(file_err(format!("opening {}", path.display())))?;
        let image_size = image_size(&f, path)?;
        let source_size = dev.size();
        let total = source_size.max(image_size);
        let mut a = vec![0u8; CHUNK];
        let mut b = vec![0u8; CHUNK];
        let mut at = 0u64;
        while at < total {
            let n = ((total - at) as usize).min(CHUNK);
            a[..n].fill(0);
            b[..n].fill(0);
            if at < source_size {
                let m = ((source_size - at) as usize).min(n);
                dev.read_at(at, &mut a[..m]).map_err(|e| VdiError::Damaged(e.to_string()))?;
            }
            if at < image_size {
                let m = ((image_size - at) as usize).min(n);
                read_full(&f, at, &mut b[..m]).map_err(file_err(format!("reading {}", path.display())))?;
            }
            if a[..n] != b[..n] {
                let i = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y).unwrap_or(0);
                return Ok(Comparison { first_difference: Some(at + i as u64), source_size, image_size });
            }
            at += n as u64;
        }
        Ok(Comparison { first_difference: None, source_size, image_size })
    }
}

pub(crate) fn read_full(f: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
