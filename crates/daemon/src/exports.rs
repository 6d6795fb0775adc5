//! The NBD exports of a store: every VDI by name and by id, every snapshot as `NAME@ID`.

use std::collections::HashMap;
use std::sync::Arc;

use blockdev::BlockDevice;
use nbd::{ExportInfo, ExportProvider, OpenError};
use parking_lot::Mutex;
use vdi::{Registry, SnapshotId, VdiError, VdiId};

/// Serves the VDIs and snapshots of one registry.
pub struct VdiExports {
    reg: Arc<Registry>,
    /// VDIs found damaged at start: refused, with the reason.
    damaged: Mutex<HashMap<VdiId, String>>,
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
        VdiExports { reg, damaged: Mutex::new(damaged) }
    }

    /// Opens the device an export name stands for (a VDI read-write, `NAME@ID` read-only), or
    /// says why not. Shared by every transport.
    pub fn open_device(&self, name: &str) -> Result<Arc<dyn BlockDevice>, OpenError> {
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
                let sid: SnapshotId = s.parse().map_err(OpenError::Unknown)?;
                let info = self.reg.snapshot_info(sid).map_err(|e| OpenError::Unknown(e.to_string()))?;
                if info.vdi != id {
                    return Err(OpenError::Unknown(format!("snapshot {sid} is not a snapshot of VDI {id}")));
                }
                let disk = self.reg.open_snapshot(sid).map_err(|e| OpenError::Unknown(e.to_string()))?;
                Ok(Arc::new(disk))
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
                    Ok(d) => Ok(Arc::new(d)),
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
        let r = self.open_device(name);
        match &r {
            Ok(_) => tracing::info!(export = name, "export opened"),
            Err(e) => tracing::warn!(export = name, "export refused: {}", e.message()),
        }
        r
    }
}
