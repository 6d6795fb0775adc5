//! The NBD exports of a store: every VDI by name and by id, every snapshot as `NAME@ID`.

use std::collections::HashMap;
use std::sync::Arc;

use blockdev::BlockDevice;
use nbd::{ExportInfo, ExportProvider, OpenError};
use parking_lot::Mutex;
use vdi::{Registry, SnapshotId, VdiError, VdiId};

use crate::catalog::Changes;

/// Serves the VDIs and snapshots of one registry.
pub struct VdiExports {
    reg: Arc<Registry>,
    /// VDIs found damaged at start: refused, with the reason.
    damaged: Mutex<HashMap<VdiId, String>>,
    /// Told when a client attaches or detaches (the catalog publisher waits on it).
    changes: Option<Arc<Changes>>,
}

/// How long a second writer waits for the first to let go before it is refused.
const WRITER_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

impl VdiExports {
    /// Exports of `reg`; VDIs listed in `damaged` are refused.
    pub fn new(reg: Arc<Registry>, damaged: HashMap<VdiId, String>) -> VdiExports {
        VdiExports { reg, damaged: Mutex::new(damaged), changes: None }
    }

    /// Bumps `changes` whenever a client attaches or detaches.
    pub fn with_changes(self, changes: Arc<Changes>) -> VdiExports {
        VdiExports { changes: Some(changes), ..self }
    }

    /// Opens the device an export name stands for (a VDI read-write, `NAME@ID` or
    /// `NAME@SNAPSHOT-NAME` read-only) for `client` (how the transport reached it), or says why
    /// not. Shared by every transport. The open and, when the device is dropped, the close are
    /// logged with the client and its totals.
    pub fn open_device_for(&self, name: &str, client: &str) -> Result<Arc<dyn BlockDevice>, OpenError> {
        let disk = match self.open_disk(name) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(export = name, client, "export refused: {}", e.message());
                return Err(e);
            }
        };
        disk.set_client(client);
        tracing::info!(export = name, client, writable = !disk.read_only(), "client attached");
        let changes = self.changes.clone();
        if let Some(c) = &changes {
            c.bump();
        }
        Ok(Arc::new(Attached { disk, export: name.to_string(), changes }))
    }

    /// [`VdiExports::open_device_for`] for a client that has no better description.
    pub fn open_device(&self, name: &str) -> Result<Arc<dyn BlockDevice>, OpenError> {
        self.open_device_for(name, vdi::UNNAMED_CLIENT)
    }

    fn open_disk(&self, name: &str) -> Result<Disk, OpenError> {
        if name.is_empty() {
            return Err(OpenError::Unknown(
                "no default export: name a VDI (see `vdi list` or `nbdinfo --list`)".into(),
            ));
        }
        let (vdi_part, snap_part) = match name.rsplit_once('@') {
            Some((v, s)) => (v, Some(s)),
            None => (name, None),
        };
        let id = match self.reg.resolve(vdi_part) {
            Ok(id) => id,
            Err(e) => {
                // A damaged VDI has no readable name; refuse it by id with the reason.
                let damaged = self.damaged.lock();
                return Err(match vdi_part.parse::<VdiId>().ok().and_then(|id| damaged.get(&id).map(|r| (id, r))) {
                    Some((id, reason)) => {
                        OpenError::Refused(format!("VDI {id} is damaged and not served: {reason}; run `vdi check`"))
                    }
                    None => OpenError::Unknown(e.to_string()),
                });
            }
        };
        if let Some(reason) = self.damaged.lock().get(&id) {
            return Err(OpenError::Refused(format!("VDI {id} is damaged and not served: {reason}; run `vdi check`")));
        }
        match snap_part {
            Some(s) => {
                let sid: SnapshotId = match s.parse() {
                    Ok(sid) => sid,
                    Err(_) => self.reg.find_snapshot(id, s).map_err(|e| OpenError::Unknown(e.to_string()))?,
                };
                let info = self.reg.snapshot_info(sid).map_err(|e| OpenError::Unknown(e.to_string()))?;
                if info.vdi != id {
                    return Err(OpenError::Unknown(format!("snapshot {sid} is not a snapshot of VDI {id}")));
                }
                let disk = self.reg.open_snapshot(sid).map_err(|e| OpenError::Unknown(e.to_string()))?;
                Ok(Disk::Snapshot(disk))
            }
            None => {
                if self.reg.size_of(vdi::Source::Vdi(id)).unwrap_or(0) == 0 {
                    return Err(OpenError::Refused(format!(
                        "VDI {id} has no size yet: fill it or create it with --size"
                    )));
                }
                // A client reconnecting at once after an abrupt close may arrive while the old
                // connection is still answering its last requests: give that a moment.
                match self.reg.open_vdi_within(id, true, WRITER_GRACE) {
                    Ok(d) => Ok(Disk::Vdi(d)),
                    Err(VdiError::Busy(_)) => Err(OpenError::Refused(format!(
                        "VDI {id} is already open for writing by another client; one writer at a time"
                    ))),
                    Err(e) => Err(OpenError::Refused(e.to_string())),
                }
            }
        }
    }
}

impl ExportProvider for VdiExports {
    fn list(&self) -> Vec<ExportInfo> {
        let mut out = Vec::new();
        for v in self.reg.list() {
            let desc = format!("VDI {} ({}), read-write", v.id, size_text(v.size));
            out.push(ExportInfo::new(v.name.clone(), desc));
            if let Ok(snaps) = self.reg.snapshots(v.id) {
                for s in snaps.into_iter().filter(|s| !s.deleted) {
                    // A snapshot never changes: any number of connections see the same bytes,
                    // so clients may spread reads over several (NBD_FLAG_CAN_MULTI_CONN).
                    out.push(ExportInfo {
                        multi_conn: true,
                        ..ExportInfo::new(
                            format!("{}@{}", v.name, s.id),
                            format!("snapshot {} of VDI {}, read-only", s.id, v.id),
                        )
                    });
                }
            }
        }
        out
    }

    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, OpenError> {
        self.open_device(name)
    }

    fn open_for(&self, name: &str, client: &str) -> Result<Arc<dyn BlockDevice>, OpenError> {
        self.open_device_for(name, client)
    }
}

/// A VDI or snapshot handle.
enum Disk {
    Vdi(vdi::VdiDisk),
    Snapshot(vdi::SnapshotDisk),
}

impl Disk {
    fn dev(&self) -> &dyn BlockDevice {
        match self {
            Disk::Vdi(d) => d,
            Disk::Snapshot(d) => d,
        }
    }

    fn set_client(&self, client: &str) {
        match self {
            Disk::Vdi(d) => d.set_client(client),
            Disk::Snapshot(d) => d.set_client(client),
        }
    }

    fn read_only(&self) -> bool {
        self.dev().read_only()
    }

    fn report(&self) -> vdi::HandleReport {
        match self {
            Disk::Vdi(d) => d.io_report(),
            Disk::Snapshot(d) => d.io_report(),
        }
    }
}

/// An export opened by one client: the device, and a log line with its totals when it closes.
struct Attached {
    disk: Disk,
    export: String,
    changes: Option<Arc<Changes>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let r = self.disk.report();
        let io = &r.io;
        tracing::info!(
            export = %self.export,
            client = %r.client,
            seconds = format_args!("{:.1}", r.open_seconds),
            reads = io.reads,
            writes = io.writes,
            flushes = io.flushes,
            discards = io.discards,
            read_bytes = io.read_bytes,
            write_bytes = io.write_bytes,
            errors = io.errors,
            "client detached"
        );
        if let Some(c) = &self.changes {
            c.bump();
        }
    }
}

impl BlockDevice for Attached {
    fn size(&self) -> u64 {
        self.disk.dev().size()
    }

    fn block_size(&self) -> u32 {
        self.disk.dev().block_size()
    }

    fn read_only(&self) -> bool {
        self.disk.dev().read_only()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> blockdev::DevResult<()> {
        self.disk.dev().read_at(offset, buf)
    }

    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> blockdev::DevResult<blockdev::TryRead> {
        self.disk.dev().try_read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> blockdev::DevResult<()> {
        self.disk.dev().write_at(offset, data, fua)
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> blockdev::DevResult<()> {
        self.disk.dev().read_vectored_at(offset, bufs)
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[std::io::IoSlice<'_>], fua: bool) -> blockdev::DevResult<()> {
        self.disk.dev().write_vectored_at(offset, bufs, fua)
    }

    fn flush(&self) -> blockdev::DevResult<()> {
        self.disk.dev().flush()
    }

    fn writes_land_in_memory(&self) -> bool {
        self.disk.dev().writes_land_in_memory()
    }

    fn discard(&self, offset: u64, len: u64) -> blockdev::DevResult<()> {
        self.disk.dev().discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> blockdev::DevResult<()> {
        self.disk.dev().write_zeroes(offset, len)
    }

    fn extents(&self, offset: u64, len: u64) -> blockdev::DevResult<Vec<blockdev::Extent>> {
        self.disk.dev().extents(offset, len)
    }
}
