//! What a copy-on-write costs after frequent snapshots, in medium bytes per guest write.
//!
//! A VDI filled sequentially, then 4 KiB writes at random offsets with a snapshot every
//! `--every` writes, a flush every 256 writes and retention keeping the newest 100 snapshots
//! (the shape of `cargo xtask bench-snapshots` with 10 ms snapshots at ~6,000 writes/s, without
//! the transport). The medium is memory wrapped in a counter, so the figures are deterministic:
//! bytes written to the medium per guest write, syncs, and writes per second of CPU.
//!
//! Snapshots and retention ride on the flushes' commits, as parallaxd's schedule makes them
//! (`Registry::snapshot_scheduled`); `--commit-each` commits each snapshot, each deletion and
//! each reclaim as the schedule did before, for comparison.
//!
//! `--reclaim-every N` frees deleted snapshots only at every Nth deletion, N at once: what
//! batching the frees saves the medium (docs/design.md, "Next: deferred frees").
//!
//! `cargo run --release -p vdi --example snapshot_churn -- [--size-mib N] [--writes N]
//! [--every N] [--hot PERCENT] [--commit-each] [--reclaim-every N]`

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use blockdev::BlockDevice;
use blockstore::format::GROUP_BLOCKS;
use blockstore::{Backend, BlockStore, CreateOptions, MemBackend, OpenOptions};
use vdi::{Durability, Registry};

/// Memory that counts what is written to it.
struct Counting {
    inner: MemBackend,
    /// Bytes below this offset are the superblock and the journal.
    journal_end: AtomicU64,
    journal_bytes: AtomicU64,
    /// Home writes of reference-count blocks.
    count_bytes: AtomicU64,
    bytes: AtomicU64,
    syncs: AtomicU64,
}

impl Backend for Counting {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        if offset < self.journal_end.load(Ordering::Relaxed) {
            self.journal_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        } else if data.len() == 4096
            && (offset / 4096 - self.journal_end.load(Ordering::Relaxed) / 4096).is_multiple_of(GROUP_BLOCKS)
        {
            self.count_bytes.fetch_add(4096, Ordering::Relaxed);
        }
        self.inner.write_at(offset, data)
    }
    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.inner.sync()
    }
    fn extend(&self, len: u64) -> io::Result<()> {
        self.inner.extend(len)
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.reserve(offset, len)
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

fn main() {
    let size = arg("--size-mib", 1024) << 20;
    let writes = arg("--writes", 60_000);
    let every = arg("--every", 60);
    let hot = arg("--hot", 100).clamp(1, 100);
    let commit_each = std::env::args().any(|a| a == "--commit-each");
    let reclaim_every = arg("--reclaim-every", 1).max(1);
    let mut deleted = 0u64;
    let medium = Arc::new(Counting {
        inner: MemBackend::new(),
        journal_end: AtomicU64::new(0),
        journal_bytes: AtomicU64::new(0),
        count_bytes: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        syncs: AtomicU64::new(0),
    });
    let store = BlockStore::create(medium.clone(), &CreateOptions::default(), &OpenOptions::default()).expect("store");
    medium.journal_end.store(store.lock().superblock().groups_start * 4096, Ordering::Relaxed);
    let reg = Registry::open(Arc::new(store)).expect("registry");
    let id = reg.create_vdi("vm", Some(size)).expect("create");
    let dev = reg.open_vdi(id, true).expect("open");
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..size).step_by(1 << 20) {
        dev.write_at(off, &chunk, false).expect("fill");
    }
    dev.flush().expect("flush");

    let blocks = size / 4096 * hot / 100;
    let block = vec![0xa5u8; 4096];
    let mut snaps = std::collections::VecDeque::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (bytes0, syncs0) = (medium.bytes.load(Ordering::Relaxed), medium.syncs.load(Ordering::Relaxed));
    let journal0 = medium.journal_bytes.load(Ordering::Relaxed);
    let counts0 = medium.count_bytes.load(Ordering::Relaxed);
    let t0 = Instant::now();
    for n in 1..=writes {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        dev.write_at((rng % blocks) * 4096, &block, false).expect("write");
        if n.is_multiple_of(256) {
            dev.flush().expect("flush");
        }
        if n.is_multiple_of(every) {
            if commit_each {
                snaps.push_back(reg.snapshot_scheduled(id, Durability::Now).expect("snapshot"));
            } else {
                snaps.push_back(reg.snapshot_scheduled(id, Durability::NextCommit).expect("snapshot"));
            }
            if snaps.len() > 100 {
                let oldest = snaps.pop_front().expect("oldest");
                if commit_each {
                    reg.delete_snapshot(oldest).expect("delete");
                    reg.reclaim_all(&mut |_, _| {}).expect("reclaim");
                } else {
                    // Reclaim left for the next flush's commit. (parallaxd's reclaimer also
                    // commits 250 ms after its first uncommitted step, and the schedule once a
                    // second: a few more commits a second than this counts.)
                    reg.delete_snapshot_with(oldest, Durability::NextCommit).expect("delete");
                    deleted += 1;
                    while deleted.is_multiple_of(reclaim_every) && reg.reclaim_step().expect("reclaim").remaining > 0 {
                        if reg.store().lock().should_commit() {
                            reg.store().commit().expect("commit");
                        }
                    }
                }
            }
        }
    }
    dev.flush().expect("flush");
    let secs = t0.elapsed().as_secs_f64();
    let bytes = medium.bytes.load(Ordering::Relaxed) - bytes0;
    let syncs = medium.syncs.load(Ordering::Relaxed) - syncs0;
    let journal = medium.journal_bytes.load(Ordering::Relaxed) - journal0;
    let counts = medium.count_bytes.load(Ordering::Relaxed) - counts0;
    println!(
        "{} MiB VDI, {writes} writes over {hot}% of it, a snapshot every {every}{}: {:.1} KiB to the medium per 4 KiB write ({:.1} KiB of it journal, {:.1} KiB count blocks written home), {:.2} syncs per write, {:.0} writes/s; store {} MiB",
        size >> 20,
        if commit_each { " (each committed)" } else { "" },
        bytes as f64 / writes as f64 / 1024.0,
        journal as f64 / writes as f64 / 1024.0,
        counts as f64 / writes as f64 / 1024.0,
        syncs as f64 / writes as f64,
        writes as f64 / secs,
        reg.store().lock().superblock().end_block() / 256
    );
}
