//! Identifiers of VDIs and snapshots.

use std::fmt;
use std::str::FromStr;

/// A VDI's id: small integers handed out in order (0, 1, 2, …) and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct VdiId(pub u32);

/// A snapshot's id, unique across the store for all time: handed out in order from 1, never twice
/// (a crash may leave gaps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct SnapshotId(pub u64);

impl fmt::Display for VdiId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for VdiId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim().parse::<u32>().map(VdiId).map_err(|_| format!("'{s}' is not a VDI id (a number like 0, 1, 2)"))
    }
}

impl FromStr for SnapshotId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().parse::<u64>() {
            Ok(0) | Err(_) => Err(format!("'{s}' is not a snapshot id (a number from 1, as `vdi snap` prints)")),
            Ok(n) => Ok(SnapshotId(n)),
        }
    }
}
