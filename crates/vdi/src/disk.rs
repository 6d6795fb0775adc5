//! On-disk structures of the VDI registry. Each is one checksummed metadata block that starts
//! with the block store's 16-byte header (magic, CRC32C, own address).

use blockstore::format::{MetaHeaderDisk, seal_meta, verify_meta};
use blockstore::{BLOCK_SIZE, MetaKind};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Magic of a registry block ("VREG").
pub const REGISTRY_MAGIC: u32 = u32::from_le_bytes(*b"VREG");
/// Magic of a VDI record block ("VDIR").
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"VDIR");
/// Magic of a snapshot-log block ("SLOG").
pub const SNAPLOG_MAGIC: u32 = u32::from_le_bytes(*b"SLOG");

/// VDI ids one registry block covers.
pub const REGISTRY_SLOTS: usize = 508;
/// Snapshot records one log block holds.
pub const SNAPLOG_SLOTS: usize = 101;
/// Longest VDI name in bytes.
pub const NAME_MAX: usize = 255;

/// Superblock user slot holding the first registry block.
pub const USER_REGISTRY: usize = 0;
/// Superblock user slot holding the next VDI id.
pub const USER_NEXT_VDI: usize = 1;
/// Superblock user slot holding the next snapshot id (ids start at 1).
pub const USER_NEXT_SNAPSHOT: usize = 2;

/// A registry block: the record addresses of VDI ids `first_id .. first_id + 508`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RegistryDisk {
    /// Block header.
    pub hdr: MetaHeaderDisk,
    /// Next registry block (0: last).
    pub next: U64,
    /// First VDI id this block covers.
    pub first_id: U64,
    /// Record block of each id (0: no such VDI).
    pub records: [U64; REGISTRY_SLOTS],
}
const _: () = assert!(size_of::<RegistryDisk>() == BLOCK_SIZE);

/// A VDI's record.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RecordDisk {
    /// Block header.
    pub hdr: MetaHeaderDisk,
    /// The VDI's id.
    pub id: U64,
    /// Virtual size in bytes (0: not set yet).
    pub size: U64,
    /// Root of the live (writable) radix tree.
    pub root: U64,
    /// Root of a tree being imported, dropped if the import did not finish (0: none).
    pub pending_root: U64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: U64,
    /// Snapshot this VDI was created from (0: none).
    pub parent_snapshot: U64,
    /// First snapshot-log block (0: no snapshots yet).
    pub log_head: U64,
    /// Last snapshot-log block (0: none).
    pub log_tail: U64,
    /// Bytes used in `name`.
    pub name_len: U32,
    /// Zero.
    pub flags: U32,
    /// The name, UTF-8.
    pub name: [u8; 256],
    /// First block of the VDI's snapshot-name table (0: no snapshot has a name). Zero in
    /// stores written before snapshot names existed, which reads as "no names".
    pub snap_names: U64,
    /// Zero.
    pub reserved: [u8; 3744],
}
const _: () = assert!(size_of::<RecordDisk>() == BLOCK_SIZE);
const _: () = assert!(std::mem::offset_of!(RecordDisk, name) == 88);

/// One snapshot in a log block.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub struct SnapEntryDisk {
    /// Snapshot id (0: unused slot).
    pub id: U64,
    /// Root of the snapshot's tree.
    pub root: U64,
    /// When it was taken, nanoseconds since the Unix epoch.
    pub time_ns: U64,
    /// The VDI's size when it was taken.
    pub size: U64,
    /// Bit 0: deleted (root released); bit 1: taken by a schedule.
    pub flags: U64,
}

/// Flag of a deleted snapshot.
pub const SNAP_DELETED: u64 = 1;
/// Flag of a snapshot taken by a schedule (subject to retention) rather than by hand.
pub const SNAP_AUTOMATIC: u64 = 2;
/// Flag of a protected snapshot: it (and its VDI) cannot be deleted until unprotected.
pub const SNAP_PROTECTED: u64 = 4;

/// A snapshot-log block: up to 101 snapshots of one VDI, oldest first, chained.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SnapLogDisk {
    /// Block header.
    pub hdr: MetaHeaderDisk,
    /// Next log block (0: last).
    pub next: U64,
    /// The VDI whose log this is.
    pub vdi: U64,
    /// Slots in use.
    pub count: U32,
    /// Zero.
    pub pad: U32,
    /// The snapshots.
    pub entries: [SnapEntryDisk; SNAPLOG_SLOTS],
    /// Zero.
    pub reserved: [u8; 16],
}
const _: () = assert!(size_of::<SnapLogDisk>() == BLOCK_SIZE);

/// Magic of a snapshot-name block ("SNAM").
pub const SNAPNAMES_MAGIC: u32 = u32::from_le_bytes(*b"SNAM");
/// Longest snapshot name in bytes.
pub const SNAP_NAME_MAX: usize = 55;
/// Names one snapshot-name block holds.
pub const SNAPNAMES_SLOTS: usize = 63;

/// One named snapshot.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub struct SnapNameDisk {
    /// The snapshot (one of this VDI's, not deleted).
    pub snapshot: U64,
    /// Bytes used in `name` (1 to 55).
    pub len: u8,
    /// The name, UTF-8, zero-padded.
    pub name: [u8; SNAP_NAME_MAX],
}

/// A snapshot-name block: up to 63 names of one VDI's snapshots, chained from the record's
/// `snap_names`. The whole table is rewritten when a name is given, changed or dropped.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SnapNamesDisk {
    /// Block header.
    pub hdr: MetaHeaderDisk,
    /// Next name block (0: last).
    pub next: U64,
    /// The VDI whose snapshots these are.
    pub vdi: U64,
    /// Slots in use.
    pub count: U32,
    /// Zero.
    pub pad: U32,
    /// The names.
    pub entries: [SnapNameDisk; SNAPNAMES_SLOTS],
    /// Zero.
    pub reserved: [u8; 24],
}
const _: () = assert!(size_of::<SnapNamesDisk>() == BLOCK_SIZE);

/// Snapshot-name blocks, as the store checks them.
pub static SNAPNAMES_KIND: MetaKind = MetaKind {
    name: "snapshot names",
    seal: |b, a| seal_meta(b, SNAPNAMES_MAGIC, a),
    verify: |b, a| verify_meta(b, SNAPNAMES_MAGIC, a),
};

/// Registry blocks, as the store checks them.
pub static REGISTRY_KIND: MetaKind = MetaKind {
    name: "VDI registry",
    seal: |b, a| seal_meta(b, REGISTRY_MAGIC, a),
    verify: |b, a| verify_meta(b, REGISTRY_MAGIC, a),
};
/// VDI record blocks, as the store checks them.
pub static RECORD_KIND: MetaKind = MetaKind {
    name: "VDI record",
    seal: |b, a| seal_meta(b, RECORD_MAGIC, a),
    verify: |b, a| verify_meta(b, RECORD_MAGIC, a),
};
/// Snapshot-log blocks, as the store checks them.
pub static SNAPLOG_KIND: MetaKind = MetaKind {
    name: "snapshot log",
    seal: |b, a| seal_meta(b, SNAPLOG_MAGIC, a),
    verify: |b, a| verify_meta(b, SNAPLOG_MAGIC, a),
};
