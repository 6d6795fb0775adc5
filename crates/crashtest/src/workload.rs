//! Scripted VDI workloads on a recording store, with a model of what was acknowledged, and the
//! checker that holds every crash state to that model.
//!
//! Every 512-byte sector the workload writes names itself: which VDI wrote it (a tag), the
//! virtual block, a version and the sector's index. So a crash state that shows a VDI another
//! VDI's data, a metadata block, data of the wrong place or a version older than the last one
//! acknowledged is caught and named.

use std::collections::BTreeMap;
use std::sync::Arc;

use blockdev::BlockDevice;
use blockstore::{BLOCK_SIZE, BlockStore, CreateOptions, MemBackend, OpenOptions};
use vdi::{Registry, SnapshotId, VdiId};

use crate::recorder::{Op, Recorder, Stamp};
use crate::states::{CrashState, Rng, last_sync_before};

const SECTOR: usize = 512;
const MAGIC: &[u8; 4] = b"PXCT";

/// What a block holds: zeros, or version `version` written by the VDI tagged `tag`.
pub type Content = Option<(u32, u64)>;

/// A span of log positions: an operation started at `.0` and had returned at `.1`.
pub type Span = (usize, usize);

/// One state a block went through.
#[derive(Debug, Clone)]
struct Change {
    content: Content,
    span: Span,
}

#[derive(Debug, Clone)]
struct VdiModel {
    tag: u32,
    blocks: u64,
    history: Vec<Vec<Change>>,
    created: Span,
    deleted: Option<Span>,
}

#[derive(Debug, Clone)]
struct SnapModel {
    vdi: VdiId,
    content: Vec<Content>,
    created: Span,
    /// Taken by a schedule: durable at the next commit, not by its own.
    created_lazily: bool,
    deleted: Option<Span>,
    /// Deleted by a schedule's retention: durable at the next commit.
    deleted_lazily: bool,
}

/// One write a thread of [`Run::concurrent`] made: its block, what it wrote, and when.
#[derive(Debug, Clone)]
pub struct ThreadWrite {
    /// The virtual block written (whole).
    pub vblock: u64,
    /// What it wrote.
    pub content: Content,
    /// Stamped just before the call and just after it returned.
    pub span: (Stamp, Stamp),
}

/// What one thread writing beside others did to its VDI, for [`Run::record_threads`].
#[derive(Debug, Clone)]
pub struct ThreadLog {
    /// The VDI it wrote and flushed.
    pub vdi: VdiId,
    /// Its writes, in order.
    pub writes: Vec<ThreadWrite>,
    /// Its flushes, stamped just before and just after each.
    pub flushes: Vec<(Stamp, Stamp)>,
}

/// What the workload did and had acknowledged, in log positions.
#[derive(Debug, Clone, Default)]
pub struct Model {
    vdis: BTreeMap<VdiId, VdiModel>,
    snaps: BTreeMap<SnapshotId, SnapModel>,
    /// Operations that make everything completed before their start durable: flushes, FUA
    /// writes, registry operations, commits.
    barriers: Vec<Span>,
    /// Creating the store itself.
    created: Span,
}

/// The bytes of one block of `content` at virtual block `vblock`.
pub fn block_bytes(content: Content, vblock: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    let Some((tag, version)) = content else { return b };
    for (s, sector) in b.chunks_mut(SECTOR).enumerate() {
        sector[..4].copy_from_slice(MAGIC);
        sector[4..8].copy_from_slice(&tag.to_le_bytes());
        sector[8..16].copy_from_slice(&vblock.to_le_bytes());
        sector[16..24].copy_from_slice(&version.to_le_bytes());
        sector[24..28].copy_from_slice(&(s as u32).to_le_bytes());
        for (i, x) in sector[28..].iter_mut().enumerate() {
            *x = (tag as u8).wrapping_mul(31).wrapping_add(version as u8).wrapping_add(i as u8);
        }
    }
    b
}

/// Reads what a sector says it is; `Err` describes a sector that is neither zeros nor ours.
fn decode_sector(sector: &[u8], vblock: u64, index: usize) -> Result<Content, String> {
    if sector.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let u32_at = |a: usize| u32::from_le_bytes([sector[a], sector[a + 1], sector[a + 2], sector[a + 3]]);
    let u64_at = |a: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&sector[a..a + 8]);
        u64::from_le_bytes(x)
    };
    if &sector[..4] != MAGIC {
        return Err(format!("foreign bytes (not written by any VDI: metadata or garbage) {:02x?}", &sector[..16]));
    }
    let (tag, vb, version, s) = (u32_at(4), u64_at(8), u64_at(16), u32_at(24) as usize);
    if vb != vblock || s != index {
        return Err(format!("data of block {vb} sector {s} (tag {tag} version {version}) in the wrong place"));
    }
    let want = block_bytes(Some((tag, version)), vblock);
    if sector != &want[index * SECTOR..(index + 1) * SECTOR] {
        return Err(format!("a mangled sector claiming tag {tag} version {version}"));
    }
    Ok(Some((tag, version)))
}

/// A workload in progress: the recording store, its registry and the model.
pub struct Run {
    /// The medium, recording.
    pub recorder: Recorder,
    /// The registry on it.
    pub reg: Arc<Registry>,
    /// What was done and acknowledged.
    pub model: Model,
    rng: Rng,
    next_tag: u32,
    version: u64,
}

impl Run {
    /// A new store on a recorder, with a small journal so commits and the release queue work
    /// hard.
    pub fn new(seed: u64, journal_slot_blocks: u64) -> Run {
        Run::on(Recorder::new(), seed, journal_slot_blocks)
    }

    /// [`Run::new`] on the medium `recorder` passes its writes to.
    pub fn on(recorder: Recorder, seed: u64, journal_slot_blocks: u64) -> Run {
        let create = CreateOptions { journal_slot_blocks, max_blocks: 0 };
        let store = BlockStore::create(Arc::new(recorder.clone()), &create, &OpenOptions::default())
            .expect("creating the recorded store");
        let reg = Registry::open(Arc::new(store)).expect("registry");
        let model = Model { created: (0, recorder.position()), ..Model::default() };
        Run { recorder, reg, model, rng: Rng::new(seed), next_tag: 1, version: 0 }
    }

    fn pos(&self) -> usize {
        self.recorder.position()
    }

    /// A random number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n as usize) as u64
    }

    /// Creates a VDI of `blocks` 4 KiB blocks.
    pub fn create(&mut self, name: &str, blocks: u64) -> VdiId {
        let s = self.pos();
        let id = self.reg.create_vdi(name, Some(blocks * BLOCK_SIZE as u64)).expect("create");
        let span = (s, self.pos());
        self.add_vdi(id, blocks, vec![None; blocks as usize], span);
        id
    }

    fn add_vdi(&mut self, id: VdiId, blocks: u64, initial: Vec<Content>, span: Span) {
        let tag = self.next_tag;
        self.next_tag += 1;
        let history = initial.into_iter().map(|c| vec![Change { content: c, span: (0, 0) }]).collect();
        self.model.vdis.insert(id, VdiModel { tag, blocks, history, created: span, deleted: None });
        self.model.barriers.push(span);
    }

    /// Writes a new version of `count` consecutive blocks from `vblock` (FUA if `fua`).
    pub fn write(&mut self, id: VdiId, vblock: u64, count: u64, fua: bool) {
        let tag = self.model.vdis[&id].tag;
        let mut data = Vec::with_capacity(count as usize * BLOCK_SIZE);
        let mut contents = Vec::new();
        for k in 0..count {
            self.version += 1;
            let c = Some((tag, self.version));
            data.extend_from_slice(&block_bytes(c, vblock + k));
            contents.push(c);
        }
        let s = self.pos();
        let dev = self.reg.open_vdi(id, true).expect("open for writing");
        dev.write_at(vblock * BLOCK_SIZE as u64, &data, fua).expect("write");
        drop(dev);
        let span = (s, self.pos());
        let v = self.model.vdis.get_mut(&id).expect("modelled VDI");
        for (k, c) in contents.into_iter().enumerate() {
            v.history[(vblock + k as u64) as usize].push(Change { content: c, span });
        }
        if fua {
            self.model.barriers.push(span);
        }
    }

    /// Discards `count` whole blocks from `vblock`.
    pub fn discard(&mut self, id: VdiId, vblock: u64, count: u64) {
        let s = self.pos();
        let dev = self.reg.open_vdi(id, true).expect("open for discard");
        dev.discard(vblock * BLOCK_SIZE as u64, count * BLOCK_SIZE as u64).expect("discard");
        drop(dev);
        let span = (s, self.pos());
        let v = self.model.vdis.get_mut(&id).expect("modelled VDI");
        for k in vblock..vblock + count {
            v.history[k as usize].push(Change { content: None, span });
        }
    }

    /// Flushes (commits) the store.
    pub fn flush(&mut self, id: VdiId) {
        let s = self.pos();
        self.reg.open_vdi(id, true).expect("open for flush").flush().expect("flush");
        self.model.barriers.push((s, self.pos()));
    }

    fn latest(&self, id: VdiId) -> Vec<Content> {
        self.model.vdis[&id].history.iter().map(|h| h.last().and_then(|c| c.content)).collect()
    }

    /// Takes a snapshot.
    pub fn snapshot(&mut self, id: VdiId) -> SnapshotId {
        let content = self.latest(id);
        let s = self.pos();
        let sid = self.reg.snapshot(id).expect("snapshot");
        let span = (s, self.pos());
        self.model.snaps.insert(
            sid,
            SnapModel { vdi: id, content, created: span, created_lazily: false, deleted: None, deleted_lazily: false },
        );
        self.model.barriers.push(span);
        sid
    }

    /// Takes a snapshot as a fast schedule does ([`vdi::Registry::snapshot_scheduled`]): made
    /// at once, durable only at the next commit — no barrier of its own.
    pub fn snapshot_scheduled(&mut self, id: VdiId) -> SnapshotId {
        let content = self.latest(id);
        let s = self.pos();
        let sid = self.reg.snapshot_scheduled(id, vdi::Durability::NextCommit).expect("scheduled snapshot");
        let span = (s, self.pos());
        self.model.snaps.insert(
            sid,
            SnapModel { vdi: id, content, created: span, created_lazily: true, deleted: None, deleted_lazily: false },
        );
        sid
    }

    /// Deletes a snapshot as a fast schedule's retention does: durable at the next commit.
    pub fn delete_snapshot_lazily(&mut self, sid: SnapshotId) {
        let s = self.pos();
        self.reg.delete_snapshot_with(sid, vdi::Durability::NextCommit).expect("delete snapshot");
        let span = (s, self.pos());
        let snap = self.model.snaps.get_mut(&sid).expect("modelled snapshot");
        snap.deleted = Some(span);
        snap.deleted_lazily = true;
    }

    /// Runs up to `steps` reclaim steps without committing them, as the background reclaimer
    /// does between its commits.
    pub fn reclaim_uncommitted(&mut self, steps: usize) {
        for _ in 0..steps {
            if self.reg.reclaim_step().expect("reclaim step").remaining == 0 {
                break;
            }
        }
    }

    /// Clones a snapshot into a new VDI.
    pub fn clone_snapshot(&mut self, name: &str, sid: SnapshotId) -> VdiId {
        let content = self.model.snaps[&sid].content.clone();
        let blocks = content.len() as u64;
        let s = self.pos();
        let id = self.reg.clone_snapshot(name, sid).expect("clone");
        let span = (s, self.pos());
        self.add_vdi(id, blocks, content, span);
        id
    }

    /// Deletes a snapshot (its space goes to the release queue).
    pub fn delete_snapshot(&mut self, sid: SnapshotId) {
        let s = self.pos();
        self.reg.delete_snapshot(sid).expect("delete snapshot");
        let span = (s, self.pos());
        self.model.snaps.get_mut(&sid).expect("modelled snapshot").deleted = Some(span);
        self.model.barriers.push(span);
    }

    /// Deletes a VDI and its snapshots.
    pub fn delete_vdi(&mut self, id: VdiId) {
        let s = self.pos();
        self.reg.delete_vdi(id).expect("delete VDI");
        let span = (s, self.pos());
        self.model.vdis.get_mut(&id).expect("modelled VDI").deleted = Some(span);
        for snap in self.model.snaps.values_mut().filter(|x| x.vdi == id && x.deleted.is_none()) {
            snap.deleted = Some(span);
        }
        self.model.barriers.push(span);
    }

    /// Runs `steps` reclaim steps, then commits.
    pub fn reclaim(&mut self, steps: usize) {
        let s = self.pos();
        for _ in 0..steps {
            if self.reg.reclaim_step().expect("reclaim step").remaining == 0 {
                break;
            }
        }
        self.reg.store().commit().expect("commit");
        self.model.barriers.push((s, self.pos()));
    }

    /// Writers on several VDIs at once, one thread each: `rounds` rounds of a few writes to
    /// random blocks, each thread flushing every other round, recorded by
    /// [`Run::record_threads`].
    pub fn concurrent(&mut self, ids: &[VdiId], rounds: u64) {
        let start_version = self.version;
        let logs: Vec<ThreadLog> = std::thread::scope(|scope| {
            let handles: Vec<_> = ids
                .iter()
                .enumerate()
                .map(|(k, &id)| {
                    let reg = self.reg.clone();
                    let rec = self.recorder.clone();
                    let tag = self.tag(id);
                    let blocks = self.model.vdis[&id].blocks;
                    let mut rng = Rng::new(self.rng.next_u64() ^ k as u64);
                    scope.spawn(move || {
                        let dev = reg.open_vdi(id, true).expect("open for writing");
                        let mut log = ThreadLog { vdi: id, writes: Vec::new(), flushes: Vec::new() };
                        // Versions far apart per thread, so no two writes share one.
                        let mut version = start_version + 1_000_000 * (k as u64 + 1);
                        for round in 0..rounds {
                            for _ in 0..3 {
                                version += 1;
                                let vb = rng.below(blocks as usize) as u64;
                                let c = Some((tag, version));
                                let s = rec.stamp();
                                dev.write_at(vb * BLOCK_SIZE as u64, &block_bytes(c, vb), false).expect("write");
                                log.writes.push(ThreadWrite { vblock: vb, content: c, span: (s, rec.stamp()) });
                            }
                            if round % 2 == 1 {
                                let s = rec.stamp();
                                dev.flush().expect("flush");
                                log.flushes.push((s, rec.stamp()));
                            }
                        }
                        log
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("writer thread")).collect()
        });
        let moved = self.record_threads(&logs);
        if moved > 0 {
            eprintln!(
                "concurrent phase: {moved} writes returned after another thread's flush began at their last position"
            );
        }
        self.version = start_version + 1_000_000 * (ids.len() as u64 + 1);
    }

    /// Records what threads writing at once did: every write as a change, every flush as a
    /// barrier.
    ///
    /// A log position alone cannot order two threads' instants when no change was logged
    /// between them: a write whose data reached the medium may still be mapping its block when
    /// another thread's flush begins its commit, and both then read the same position. A flush
    /// covers only the writes that returned before it began, so stamps order them: a write
    /// that returned after a flush of another thread began at the same position ends, in the
    /// model, one position later — not required by that flush, required by every barrier
    /// begun after the next change. Returns how many writes that moved.
    pub fn record_threads(&mut self, logs: &[ThreadLog]) -> usize {
        let flush_starts: Vec<(VdiId, Stamp)> =
            logs.iter().flat_map(|t| t.flushes.iter().map(|f| (t.vdi, f.0))).collect();
        let mut moved = 0;
        for t in logs {
            let v = self.model.vdis.get_mut(&t.vdi).expect("modelled VDI");
            for w in &t.writes {
                let (start, end) = w.span;
                let behind_a_flush = flush_starts
                    .iter()
                    .any(|&(other, f)| other != t.vdi && f.position == end.position && f.seq < end.seq);
                moved += usize::from(behind_a_flush);
                let end = end.position + usize::from(behind_a_flush);
                v.history[w.vblock as usize].push(Change { content: w.content, span: (start.position, end) });
            }
            self.model.barriers.extend(t.flushes.iter().map(|(s, e)| (s.position, e.position)));
        }
        moved
    }

    /// The tag VDI `id` writes into its sectors.
    pub fn tag(&self, id: VdiId) -> u32 {
        self.model.vdis[&id].tag
    }

    /// Takes a snapshot with a name (the VDI's snapshot-name table is rewritten).
    pub fn snapshot_named(&mut self, id: VdiId, name: &str) -> SnapshotId {
        let content = self.latest(id);
        let s = self.pos();
        let sid = self.reg.snapshot_named(id, name).expect("named snapshot");
        let span = (s, self.pos());
        self.model.snaps.insert(
            sid,
            SnapModel { vdi: id, content, created: span, created_lazily: false, deleted: None, deleted_lazily: false },
        );
        self.model.barriers.push(span);
        sid
    }

    /// Rolls VDI `id` back to its snapshot `sid`.
    pub fn rollback(&mut self, id: VdiId, sid: SnapshotId) {
        let content = self.model.snaps[&sid].content.clone();
        let s = self.pos();
        self.reg.rollback(id, sid).expect("rollback");
        let span = (s, self.pos());
        self.record_whole(id, &content, span);
    }

    /// Re-imports VDI `id`'s own contents with `changes` blocks changed (some to zeros): the
    /// import forks the VDI's tree and writes only the changed blocks.
    pub fn refill(&mut self, id: VdiId, changes: u64) {
        let tag = self.model.vdis[&id].tag;
        let mut contents = self.latest(id);
        for k in 0..changes {
            let b = self.below(contents.len() as u64) as usize;
            self.version += 1;
            contents[b] = if k % 4 == 3 { None } else { Some((tag, self.version)) };
        }
        let stats = self.fill_with(id, &contents);
        assert!(
            stats.blocks_written <= changes,
            "a re-import wrote {} blocks for {changes} changes",
            stats.blocks_written
        );
    }

    /// Imports an image of `blocks` blocks into VDI `id` (an atomic swap of its tree).
    pub fn import(&mut self, id: VdiId, blocks: u64) {
        let tag = self.model.vdis[&id].tag;
        let contents: Vec<Content> = (0..blocks)
            .map(|b| {
                self.version += 1;
                if b % 3 == 2 { None } else { Some((tag, self.version)) }
            })
            .collect();
        self.fill_with(id, &contents);
    }

    /// Fills VDI `id` from an image of `contents` (one per block from block 0; the VDI's
    /// blocks past them read as zeros afterwards) and records it.
    fn fill_with(&mut self, id: VdiId, contents: &[Content]) -> vdi::ImportStats {
        let image: Vec<u8> = contents.iter().enumerate().flat_map(|(b, c)| block_bytes(*c, b as u64)).collect();
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), &image).expect("writing the image");
        let s = self.pos();
        let stats = self.reg.fill(id, file.path(), &mut |_, _| {}).expect("import");
        let span = (s, self.pos());
        self.record_whole(id, contents, span);
        stats
    }

    /// Records that every block of VDI `id` took `contents` (zeros past its end) in one
    /// operation over `span`, a barrier.
    fn record_whole(&mut self, id: VdiId, contents: &[Content], span: Span) {
        let v = self.model.vdis.get_mut(&id).expect("modelled VDI");
        for (b, h) in v.history.iter_mut().enumerate() {
            h.push(Change { content: contents.get(b).copied().flatten(), span });
        }
        self.model.barriers.push(span);
    }
}

/// Runs the standard scripted workload: golden image, snapshot, clone, copy-on-write writes to
/// both, FUA, flushes, discards (single blocks and a whole subtree), a second snapshot,
/// snapshot delete, bounded reclaim, VDI delete and reclaim, a new VDI reusing the freed
/// blocks, overwrites in place with a flush and a FUA write, two VDIs written and flushed by concurrent threads, an import, and unflushed writes
/// at the end.
pub fn standard(seed: u64, journal_slot_blocks: u64) -> Run {
    standard_on(Run::new(seed, journal_slot_blocks))
}

/// [`standard`] on the run `r` (a store on another medium).
pub fn standard_on(mut r: Run) -> Run {
    let blocks = 1024;
    let g = r.create("golden", blocks);
    for i in 0..12 {
        let at = r.below(blocks - 16);
        let n = 1 + r.below(16);
        r.write(g, at, n, i % 5 == 4);
        if i % 4 == 3 {
            r.flush(g);
        }
    }
    r.write(g, 512, 64, false);
    r.flush(g);
    let s1 = r.snapshot(g);
    let c = r.clone_snapshot("clone", s1);
    for i in 0..10 {
        let (who, at) = (if i % 2 == 0 { c } else { g }, r.below(blocks - 4));
        let n = 1 + r.below(4);
        r.write(who, at, n, i == 7);
        if i % 3 == 2 {
            r.flush(who);
        }
    }
    r.discard(g, 512, 512);
    let one = r.below(512);
    r.discard(c, one, 1);
    r.flush(c);
    let s2 = r.snapshot(c);
    r.write(c, 3, 2, false);
    r.delete_snapshot(s1);
    r.reclaim(2);
    r.write(c, 700, 8, true);
    r.delete_vdi(g);
    r.reclaim(1000);
    let v = r.create("reuser", blocks);
    let mut written = 0;
    for _ in 0..6 {
        let at = r.below(blocks - 32);
        let n = 8 + r.below(24);
        r.write(v, at, n, false);
        written = at;
    }
    r.flush(v);
    // Overwrites in place (the blocks are v's own and written): the flush and the FUA write
    // change no metadata, so only their syncs make the data durable.
    r.write(v, written, 4, false);
    r.flush(v);
    r.write(v, written + 4, 2, true);
    r.concurrent(&[c, v], 8);
    r.import(v, 40);
    r.delete_snapshot(s2);
    r.write(c, 20, 4, false);
    r.flush(c);
    r.reclaim(1000);
    r.write(v, 100, 3, false);
    r.write(c, 21, 1, false);
    r
}

/// Snapshot churn as a 10 ms schedule with retention makes it: a small VDI written a block at a
/// time, a snapshot after each write and the one before deleted, flushes now and then — more
/// than a snapshot-log block's worth, so the deletes unlink and free full log blocks — then a
/// clone of the last snapshot, reclaim, and unflushed writes at the end.
pub fn snapshot_churn(seed: u64, journal_slot_blocks: u64) -> Run {
    let mut r = Run::new(seed, journal_slot_blocks);
    let blocks = 16;
    let v = r.create("churn", blocks);
    r.write(v, 0, blocks, false);
    r.flush(v);
    let mut previous = None;
    let rounds = 2 * vdi::SNAPSHOTS_PER_LOG_BLOCK as u64 + 3;
    for i in 0..rounds {
        let at = r.below(blocks);
        r.write(v, at, 1, i % 7 == 6);
        if i % 3 == 2 {
            r.flush(v);
        }
        let s = r.snapshot(v);
        if let Some(p) = previous.replace(s) {
            r.delete_snapshot(p);
        }
        if i % 25 == 24 {
            r.reclaim(4);
        }
    }
    // The freed log blocks took their deleted snapshots with them.
    let listed = r.reg.snapshots(v).expect("snapshots").len();
    assert!(listed < vdi::SNAPSHOTS_PER_LOG_BLOCK, "{listed} snapshots still listed: no log block was freed");
    if let Some(s) = previous {
        let c = r.clone_snapshot("late-clone", s);
        r.write(c, 2, 1, false);
        r.flush(c);
    }
    r.reclaim(1000);
    r.write(v, 5, 2, false);
    r
}

/// A fast snapshot schedule as parallaxd runs it: a snapshot after each write and retention
/// keeping three, both durable only at the next commit (the guest's flushes, FUA writes, and
/// the reclaimer's own commits), with reclaim steps left uncommitted between them — then a
/// clone of the newest snapshot (committed), reclaim, and unflushed writes at the end. A crash
/// may lose the snapshots and deletions since the last commit, never one a commit covered.
pub fn scheduled_snapshots(seed: u64, journal_slot_blocks: u64) -> Run {
    let mut r = Run::new(seed, journal_slot_blocks);
    let blocks = 16;
    let v = r.create("scheduled", blocks);
    r.write(v, 0, blocks, false);
    r.flush(v);
    let mut kept = std::collections::VecDeque::new();
    let rounds = vdi::SNAPSHOTS_PER_LOG_BLOCK as u64 + 3;
    for i in 0..rounds {
        let at = r.below(blocks);
        r.write(v, at, 1, i % 11 == 10);
        kept.push_back(r.snapshot_scheduled(v));
        if kept.len() > 3
            && let Some(oldest) = kept.pop_front()
        {
            r.delete_snapshot_lazily(oldest);
        }
        if i % 5 == 4 {
            r.reclaim_uncommitted(3);
        }
        if i % 4 == 3 {
            r.flush(v);
        }
        if i % 17 == 16 {
            r.reclaim(2);
        }
    }
    if let Some(&newest) = kept.back() {
        let c = r.clone_snapshot("from-schedule", newest);
        r.write(c, 1, 1, false);
        r.flush(c);
    }
    r.reclaim(1000);
    r.write(v, 3, 2, false);
    r.snapshot_scheduled(v);
    r
}

/// What an operator does to a golden image and its clones: a named snapshot, a clone re-filled
/// with a near copy of the golden image (the import forks the clone's tree and writes only the
/// changed blocks), rollbacks to a named snapshot and to a clone's parent snapshot, a named
/// snapshot deleted (the name table rewritten and shrunk), reclaim, and unflushed writes.
pub fn operator_ops(seed: u64, journal_slot_blocks: u64) -> Run {
    let mut r = Run::new(seed, journal_slot_blocks);
    let blocks = 256;
    let g = r.create("golden", blocks);
    r.write(g, 0, 64, false);
    r.write(g, 128, 32, false);
    r.flush(g);
    let release = r.snapshot_named(g, "release");
    let c = r.clone_snapshot("vm", release);
    r.refill(c, 7);
    r.write(c, 10, 2, false);
    let mine = r.snapshot_named(c, "mine");
    r.write(c, 0, 16, false);
    r.flush(c);
    r.rollback(c, mine);
    r.write(c, 3, 1, false);
    r.flush(c);
    r.delete_snapshot(mine);
    r.write(g, 60, 8, true);
    r.refill(g, 3);
    r.reclaim(1000);
    r.rollback(g, release);
    r.write(g, 200, 4, false);
    r.write(c, 5, 1, false);
    r
}

/// What checking one crash state found.
pub type Verdict = Result<(), String>;

/// Checks one crash state against the model: the store opens, `check` is clean, every
/// operation completed before the cut is there, nothing that had not started is, and every
/// sector of every VDI and snapshot holds a version its history allows — never another VDI's
/// data or a metadata block — and a new snapshot gets an id never handed out. With
/// `reclaim`, the release queue is then emptied and the store checked again. The state's
/// image is consumed.
pub fn check_state(state: &mut CrashState, log: &[Op], model: &Model, reclaim: bool) -> Verdict {
    let cut = state.cut;
    let done = |span: Span| last_sync_before(log, span.1).is_some_and(|p| p < cut.durable) && span.1 <= cut.horizon;
    let started = |span: Span| span.0 < cut.horizon;
    // A change made durable only by a later commit: done once a barrier begun after it is.
    let done_lazily = |span: Span| model.barriers.iter().any(|b| b.0 >= span.1 && done(*b));
    // Everything that completed before the start of a completed barrier must be durable.
    let required = model.barriers.iter().filter(|b| done(**b)).map(|b| b.0).max().unwrap_or(0);
    // The medium takes the image over (a state is checked once; images can be 70 MB).
    let backend = Arc::new(MemBackend::from_image(std::mem::take(&mut state.image)));
    let store = match BlockStore::open(backend, &OpenOptions::default()) {
        Ok(s) => s,
        // A store whose creation never completed may be anything but a store.
        Err(_) if !done(model.created) => return Ok(()),
        Err(e) => return Err(format!("store refuses to open: {e}")),
    };
    let reg = Registry::open(Arc::new(store)).map_err(|e| format!("registry refuses to open: {e}"))?;
    let report = reg.check(false).map_err(|e| format!("check failed to run: {e}"))?;
    if !report.is_clean() {
        let p: Vec<String> = report.problems.iter().take(5).map(|p| p.to_string()).collect();
        return Err(format!("check finds {} problems: {}", report.problems.len(), p.join("; ")));
    }
    for (id, v) in &model.vdis {
        let exists = reg.info(*id).is_ok();
        let gone = v.deleted.is_some_and(done);
        let must = done(v.created) && !v.deleted.is_some_and(started);
        let must_not = !started(v.created) || gone;
        if must && !exists {
            return Err(format!("VDI {id} was created (acknowledged) but is missing"));
        }
        if must_not && exists {
            return Err(format!("VDI {id} exists but its creation had not started or its delete completed"));
        }
        if !exists {
            continue;
        }
        let dev = reg.open_vdi(*id, false).map_err(|e| format!("VDI {id} does not open: {e}"))?;
        let mut buf = vec![0u8; v.blocks as usize * BLOCK_SIZE];
        dev.read_at(0, &mut buf).map_err(|e| format!("VDI {id} read fails: {e}"))?;
        for (b, hist) in v.history.iter().enumerate() {
            let allowed = allowed(hist, required, cut.horizon);
            let block = &buf[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
            for s in 0..BLOCK_SIZE / SECTOR {
                let got = decode_sector(&block[s * SECTOR..(s + 1) * SECTOR], b as u64, s)
                    .map_err(|e| format!("VDI {id} block {b} sector {s}: {e}"))?;
                if !allowed.contains(&got) {
                    return Err(format!(
                        "VDI {id} block {b} sector {s} holds {got:?}; allowed {allowed:?} (required from log position {required})"
                    ));
                }
            }
        }
    }
    for (sid, snap) in &model.snaps {
        let live = reg.snapshot_info(*sid).ok().filter(|i| !i.deleted).is_some();
        let vdi_deleted = model.vdis.get(&snap.vdi).and_then(|v| v.deleted);
        let created = if snap.created_lazily { done_lazily(snap.created) } else { done(snap.created) };
        let deleted = snap.deleted.is_some_and(|d| if snap.deleted_lazily { done_lazily(d) } else { done(d) });
        let must = created && !snap.deleted.is_some_and(started);
        let must_not = !started(snap.created) || deleted || vdi_deleted.is_some_and(done);
        if must && !live {
            return Err(format!("snapshot {sid} was taken (acknowledged) but is missing"));
        }
        if must_not && live {
            return Err(format!("snapshot {sid} is live but it was never taken or its delete completed"));
        }
        if !live {
            continue;
        }
        let dev =
            reg.open_source(vdi::Source::Snapshot(*sid)).map_err(|e| format!("snapshot {sid} does not open: {e}"))?;
        let mut buf = vec![0u8; snap.content.len() * BLOCK_SIZE];
        dev.read_at(0, &mut buf).map_err(|e| format!("snapshot {sid} read fails: {e}"))?;
        for (b, want) in snap.content.iter().enumerate() {
            let block = &buf[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
            if block != block_bytes(*want, b as u64).as_slice() {
                let got = decode_sector(&block[..SECTOR], b as u64, 0);
                return Err(format!("snapshot {sid} block {b} holds {got:?}, taken as {want:?}"));
            }
        }
    }
    // No id handed out before the cut names a different snapshot now — not even one a crash
    // lost (a scheduled snapshot's): the next snapshot gets a new id.
    let handed = model.snaps.iter().filter(|(_, s)| s.created.1 <= cut.horizon).map(|(sid, _)| *sid).max();
    if let (Some(handed), Some(vdi)) = (handed, reg.list().first().map(|v| v.id)) {
        let next = reg.snapshot(vdi).map_err(|e| format!("a snapshot after the crash fails: {e}"))?;
        if next <= handed {
            return Err(format!(
                "snapshot id {next} handed out again after the crash (ids up to {handed} were in use)"
            ));
        }
    }
    if reclaim {
        reg.reclaim_all(&mut |_, _| {}).map_err(|e| format!("reclaim after the crash fails: {e}"))?;
        let report = reg.check(false).map_err(|e| format!("check after reclaim failed to run: {e}"))?;
        if !report.is_clean() || report.pending_reclaim != 0 {
            let p: Vec<String> = report.problems.iter().take(5).map(|p| p.to_string()).collect();
            return Err(format!("after reclaim, check finds: {}", p.join("; ")));
        }
    }
    Ok(())
}

/// The contents a block may show after a crash: the last change that completed before a
/// completed barrier began, and every change after it that had started before the cut.
fn allowed(hist: &[Change], required: usize, horizon: usize) -> Vec<Content> {
    let base = hist.iter().rposition(|c| c.span.1 <= required).unwrap_or(0);
    let mut out: Vec<Content> = vec![hist[base].content];
    for c in &hist[base + 1..] {
        if c.span.0 < horizon {
            out.push(c.content);
        }
    }
    out
}
