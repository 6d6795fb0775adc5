//! A store in a regular file or on a raw block device.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Backend, MediumRoom};

/// Most buffers one `preadv`/`pwritev` takes on Linux.
const IOV_MAX: usize = 1024;

/// A store in a file (grown sparsely, space reserved with `fallocate`) or on a block device.
pub struct FileBackend {
    file: File,
    path: PathBuf,
    is_device: bool,
    device_size: u64,
    /// Length the file is known to have reached.
    reserved: AtomicU64,
}

impl FileBackend {
    /// Opens (and with `create`, creates) the store at `path`.
    pub fn open(path: &Path, writable: bool, create: bool) -> io::Result<Self> {
        let file =
            OpenOptions::new().read(true).write(writable).create(create && writable).truncate(false).open(path)?;
        let meta = file.metadata()?;
        let is_device = meta.file_type().is_block_device();
        let device_size = if is_device {
            // Seeking to the end is the portable way to learn a block device's size.
            use std::io::{Seek, SeekFrom};
            let mut f = &file;
            f.seek(SeekFrom::End(0))?
        } else {
            0
        };
        let reserved = if is_device { device_size } else { meta.len() };
        Ok(FileBackend { file, path: path.to_path_buf(), is_device, device_size, reserved: AtomicU64::new(reserved) })
    }

    /// The open file, for locking.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path the store was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True if the store is on a block device.
    pub fn is_device(&self) -> bool {
        self.is_device
    }
}

impl Backend for FileBackend {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    // Past the end of a sparse file: reads as zeros.
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        // One `preadv` for the lot (the usual case); whatever it left — a short read at the end
        // of a sparse file, an interrupted call, more buffers than IOV_MAX — is finished a
        // buffer at a time.
        let head = bufs.len().min(IOV_MAX);
        let mut done = match rustix::io::preadv(&self.file, &mut bufs[..head], offset) {
            Ok(n) => n,
            Err(e) if e == rustix::io::Errno::INTR => 0,
            Err(e) => return Err(e.into()),
        };
        let mut at = offset;
        for buf in bufs.iter_mut() {
            let skip = done.min(buf.len());
            done -= skip;
            if skip < buf.len() {
                self.read_at(at + skip as u64, &mut buf[skip..])?;
            }
            at += buf.len() as u64;
        }
        Ok(())
    }

    fn try_read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<bool> {
        // `preadv2(RWF_NOWAIT)` reads only what the page cache holds: EAGAIN or a short read
        // means some of it would come from the disk. A kernel or file system without the flag
        // (EOPNOTSUPP) is answered the same way, and so is a read reaching past the end of the
        // file (the blocking path fills that with zeros).
        if bufs.len() > IOV_MAX {
            return Ok(false);
        }
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        match rustix::io::preadv2(&self.file, bufs, offset, rustix::io::ReadWriteFlags::NOWAIT) {
            Ok(n) => Ok(n == want),
            Err(e)
                if e == rustix::io::Errno::AGAIN
                    || e == rustix::io::Errno::OPNOTSUPP
                    || e == rustix::io::Errno::INTR =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        // As reads: one `pwritev`, then a buffer at a time for what it left.
        let head = bufs.len().min(IOV_MAX);
        let mut done = match rustix::io::pwritev(&self.file, &bufs[..head], offset) {
            Ok(n) => n,
            Err(e) if e == rustix::io::Errno::INTR => 0,
            Err(e) => return Err(e.into()),
        };
        let mut at = offset;
        for buf in bufs {
            let skip = done.min(buf.len());
            done -= skip;
            if skip < buf.len() {
                self.file.write_all_at(&buf[skip..], at + skip as u64)?;
            }
            at += buf.len() as u64;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        if self.is_device { self.file.sync_all() } else { self.file.sync_data() }
    }

    fn buffers_writes(&self) -> bool {
        true // buffered I/O: the page cache (of the file or of the block device) takes writes
    }

    fn extend(&self, len: u64) -> io::Result<()> {
        if self.is_device {
            return if len <= self.device_size { Ok(()) } else { Err(io::Error::from_raw_os_error(libc::ENOSPC)) };
        }
        if len > self.reserved.load(Ordering::Acquire) {
            if self.file.metadata()?.len() < len {
                self.file.set_len(len)?;
            }
            self.reserved.fetch_max(len, Ordering::AcqRel);
        }
        Ok(())
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_device {
            return if offset.saturating_add(len) <= self.device_size {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            };
        }
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, offset as libc::off_t, len as libc::off_t) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            // A file system without fallocate cannot promise space; writes report ENOSPC then.
            if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(err);
            }
        }
        Ok(())
    }

    fn capacity(&self) -> u64 {
        if self.is_device { self.device_size } else { u64::MAX }
    }

    fn size(&self) -> io::Result<u64> {
        if self.is_device { Ok(self.device_size) } else { Ok(self.file.metadata()?.len()) }
    }

    /// A device: the store may grow to the device's end (`used` is the part the store covers).
    /// A file: the file system it lives on, as `df` shows it (`available` is what an
    /// unprivileged writer may still take).
    fn room(&self, store_bytes: u64) -> io::Result<Option<MediumRoom>> {
        if self.is_device {
            let used = store_bytes.min(self.device_size);
            return Ok(Some(MediumRoom {
                medium: format!("device {}", self.path.display()),
                used,
                limit: Some(self.device_size),
                available: self.device_size - used,
            }));
        }
        let st = rustix::fs::fstatvfs(&self.file)?;
        let unit = st.f_frsize;
        Ok(Some(MediumRoom {
            medium: format!("file system of {}", self.path.display()),
            used: st.f_blocks.saturating_sub(st.f_bfree).saturating_mul(unit),
            limit: Some(st.f_blocks.saturating_mul(unit)),
            available: st.f_bavail.saturating_mul(unit),
        }))
    }
}
