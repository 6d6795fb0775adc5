//! Connecting a simulated frontend to a backend's ring socket (the frontend half of the
//! handshake described in `blktap::sim`).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blktap::abi::{Abi, PAGE_SIZE};
use blktap::event::SocketEvents;
use blktap::shm::SharedMem;
use blktap::sim::{Attach, DiskInfo, MAX_RING_PAGE_ORDER, read_handshake_line, send_with_fd};
use rustix::fs::{MemfdFlags, SealFlags, fcntl_add_seals, memfd_create};

use crate::front::FrontRing;
use crate::{Error, Result};

/// A simulated frontend's connection: the ring, its granted memory and the event channel.
#[derive(Debug)]
pub struct SimFrontend {
    /// The frontend half of the ring (initialised).
    pub ring: FrontRing,
    /// All granted pages; grant reference `k` is page `k`.
    pub memory: Arc<SharedMem>,
    /// The event channel.
    pub events: SocketEvents,
    /// What the backend published about the disk.
    pub disk: DiskInfo,
    /// First grant page free for data (the ring occupies the pages before it).
    pub first_data_gref: u32,
}

/// How a simulated frontend lays out its memory.
#[derive(Debug, Clone)]
pub struct FrontendOptions {
    /// The VDI to attach.
    pub vdi: String,
    /// Ring size: `2^ring_page_order` pages.
    pub ring_page_order: u32,
    /// Grant pages for data after the ring.
    pub data_pages: u32,
    /// The ABI to speak.
    pub protocol: Abi,
}

impl SimFrontend {
    /// Creates the grant memory, initialises the ring at grant 0 and attaches to the backend
    /// listening at `socket`.
    pub fn connect(socket: &Path, opts: &FrontendOptions) -> Result<Self> {
        if opts.ring_page_order > MAX_RING_PAGE_ORDER {
            return Err(Error::Protocol("ring-page-order too large".into()));
        }
        let ring_pages = 1u32 << opts.ring_page_order;
        let pages = u64::from(ring_pages) + u64::from(opts.data_pages);
        let fd = memfd_create("blkfront-grants", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(|e| Error::Io(e.into()))?;
        let file = File::from(fd);
        file.set_len(pages * PAGE_SIZE as u64)?;
        fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::SEAL).map_err(|e| Error::Io(e.into()))?;
        let ring_mem = Arc::new(SharedMem::from_file(&file, 0, ring_pages as usize * PAGE_SIZE)?);
        let memory = Arc::new(SharedMem::from_file(&file, 0, pages as usize * PAGE_SIZE)?);
        let ring = FrontRing::init(ring_mem, opts.protocol)?;
        let attach = Attach {
            vdi: opts.vdi.clone(),
            ring_ref: 0,
            ring_page_order: opts.ring_page_order,
            protocol: opts.protocol,
        };
        let stream = UnixStream::connect(socket)?;
        send_with_fd(&stream, format!("{}\n", attach.encode()).as_bytes(), file.as_fd())?;
        // The backend may take a while to open the VDI; it answers or closes.
        let line = read_handshake_line(&stream, Instant::now() + Duration::from_secs(60))?;
        stream.set_read_timeout(None)?;
        let disk = DiskInfo::parse_reply(&line)?;
        Ok(Self { ring, memory, events: SocketEvents::new(stream), disk, first_data_gref: ring_pages })
    }
}
