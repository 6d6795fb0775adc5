//! Deterministic race tests: a thread is held at a named pause point (the `fail` crate, through
//! `crashtest::pause`) at the instant a race used to bite, the other side of the race runs, and
//! the outcome is checked. No sleeps and no luck involved. Fail points are process-wide, so every
//! test here holds `scenario()`: they run one at a time.
//!
//! - Finding 3 of the engine-safety review: an operation that fails after changing metadata
//!   must not undo a write another VM made (and flushed) while it was failing.
//! - Open against delete: a VDI being opened can never be deleted under the new handle.
//! - A registry operation that misses the metadata cache reads the medium without holding the
//!   metadata lock: another VM's writes and flushes go on while it waits for the read.
//! - Whole-tree walks for `vdi info` and `vdi diff` run on a frozen view: a VM writes while one
//!   is stopped, and the walk reports the instant it froze.
//! - The online check: while `vdi check` walks the store, guests write, snapshot, delete,
//!   reclaim and commit, and the check still reports exactly the instant it froze. A stress
//!   variant runs checks back to back beside a busy VM and the background reclaimer.
//! - A commit keeps the blocks it freed from reuse until the data I/O that began before it has
//!   ended, while I/O that begins meanwhile neither waits for it nor holds it up.
//! - A lookup that missed the cache, whose block is freed and reused while it reads it, walks
//!   again instead of reporting damage.
//! - The crash-state checker orders a write that returns just as another thread's flush begins
//!   by stamps, not by log position alone.
//! - A read that does not wait (an NBD reader's) keeps the block it found from reuse.

use std::sync::Arc;
use std::time::Duration;

use blockdev::BlockDevice;
use blockstore::{BlockStore, CreateOptions, MemBackend, OpenOptions};
use crashtest::pause::{Pause, scenario};
use vdi::{Registry, VdiError, VdiId};

fn new_registry(mem: &MemBackend) -> Arc<Registry> {
    let create = CreateOptions { journal_slot_blocks: 1024, max_blocks: 0 };
    // A small cache: blocks are evicted and read back, freed while not in memory, and so on.
    let open = OpenOptions { cache_blocks: 64, ..OpenOptions::default() };
    let store = BlockStore::create(Arc::new(mem.clone()), &create, &open).unwrap();
    Registry::open(Arc::new(store)).unwrap()
}

fn reopen(mem: &MemBackend) -> Arc<Registry> {
    let open = OpenOptions { cache_blocks: 64, ..OpenOptions::default() };
    Registry::open(Arc::new(BlockStore::open(Arc::new(mem.clone()), &open).unwrap())).unwrap()
}

fn write_blocks(reg: &Arc<Registry>, id: VdiId, first: u64, n: u64, byte: u8) {
    write_to(&reg.open_vdi(id, true).unwrap(), first, n, byte);
}

/// Writes blocks through an open handle (as a running VM does) and flushes.
fn write_to(dev: &dyn BlockDevice, first: u64, n: u64, byte: u8) {
    for b in first..first + n {
        dev.write_at(b * 4096, &[byte; 4096], false).unwrap();
    }
    dev.flush().unwrap();
}

fn read_block(reg: &Arc<Registry>, id: VdiId, block: u64) -> u8 {
    let mut buf = [0u8; 4096];
    reg.open_vdi(id, false).unwrap().read_at(block * 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == buf[0]), "block {block} of VDI {id} is torn");
    buf[0]
}

fn assert_clean(reg: &Registry, when: &str) {
    let report = reg.check(false).unwrap();
    assert!(report.is_clean(), "{when}: {:?}", report.problems);
}

/// Runs `work` on another thread and waits for it; a watchdog turns a deadlock (the work
/// blocked behind a lock the paused thread holds) into a failure instead of a hung test.
fn run_alongside(what: &str, work: impl FnOnce() + Send + 'static) {
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let worker = std::thread::spawn(move || {
        work();
        let _ = done_tx.send(());
    });
    match done.recv_timeout(Duration::from_secs(120)) {
        Ok(()) => worker.join().unwrap(),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => std::panic::resume_unwind(worker.join().unwrap_err()),
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
            panic!("{what} never finished while the other thread was paused: it waits on that thread's lock")
        }
    }
}

#[test]
fn a_failing_operation_never_undoes_a_write_made_while_it_fails() {
    let _fp = scenario();
    let mem = MemBackend::new();
    let reg = new_registry(&mem);
    let failing = reg.create_vdi("failing", Some(64 << 20)).unwrap();
    let bystander = reg.create_vdi("bystander", Some(64 << 20)).unwrap();
    write_blocks(&reg, failing, 0, 8, 1);
    write_blocks(&reg, bystander, 0, 8, 1);
    let snaps_before = reg.all_snapshots().len();
    // Running VMs: their disks are open before the operation starts.
    let vm_bystander = reg.open_vdi(bystander, true).unwrap();
    let vm_failing = reg.open_vdi(failing, true).unwrap();

    // The snapshot changes metadata, then fails; it stops after its rollback, where the old
    // store-wide abort() used to run with the locks already released.
    fail::cfg("vdi::transact::before_finish", "1*return").unwrap();
    let paused = Pause::arm("vdi::transact::rolled_back");
    let op = {
        let reg = reg.clone();
        std::thread::spawn(move || reg.snapshot(failing))
    };
    paused.wait_reached();
    // Meanwhile the bystander VM allocates new blocks, overwrites old ones and flushes: all
    // acknowledged.
    // (The snapshotted VDI's own I/O waits for its snapshot, by design; other VMs' must not.)
    run_alongside("the bystander VM's writes", move || write_to(&vm_bystander, 4, 12, 2));
    paused.resume();
    let failed = op.join().unwrap();
    write_to(&vm_failing, 20, 2, 3);
    drop(vm_failing);
    assert!(failed.is_err(), "the injected failure fails the snapshot");
    assert_eq!(reg.all_snapshots().len(), snaps_before, "the failed snapshot left nothing behind");

    for (b, want) in [(0, 1), (3, 1), (4, 2), (15, 2)] {
        assert_eq!(read_block(&reg, bystander, b), want, "bystander block {b}");
    }
    assert_eq!(read_block(&reg, failing, 20), 3, "a write to the failing VDI itself");
    assert_clean(&reg, "after the failure");
    drop(reg);
    let reg = reopen(&mem);
    for (b, want) in [(0, 1), (3, 1), (4, 2), (15, 2)] {
        assert_eq!(read_block(&reg, bystander, b), want, "bystander block {b} after reopening");
    }
    assert_eq!(read_block(&reg, failing, 20), 3);
    assert_clean(&reg, "after reopening");
}

#[test]
fn a_vdi_being_opened_cannot_be_deleted_under_its_handle() {
    let _fp = scenario();
    let mem = MemBackend::new();
    let reg = new_registry(&mem);
    let id = reg.create_vdi("vm", Some(16 << 20)).unwrap();
    // The open stops where the old code had counted nothing yet (the registry lock released).
    let paused = Pause::arm("vdi::open_vdi::counted");
    let opener = {
        let reg = reg.clone();
        std::thread::spawn(move || reg.open_vdi(id, true))
    };
    paused.wait_reached();
    let r = reg.clone();
    run_alongside("the delete", move || {
        let deleted = r.delete_vdi(id);
        assert!(matches!(deleted, Err(VdiError::InUse(_))), "delete of a VDI being opened: {deleted:?}");
    });
    paused.resume();
    let dev = opener.join().unwrap().expect("the open succeeds");
    dev.write_at(0, &[7; 4096], false).unwrap();
    dev.flush().unwrap();
    drop(dev);
    assert_eq!(read_block(&reg, id, 0), 7);
    reg.delete_vdi(id).expect("closed: the delete goes through");
    assert!(reg.open_vdi(id, false).is_err());
    assert_clean(&reg, "after the delete");
}

#[test]
fn the_store_stays_in_use_while_a_check_walks_it() {
    let _fp = scenario();
    let mem = MemBackend::new();
    let reg = new_registry(&mem);
    let a = reg.create_vdi("a", Some(256 << 20)).unwrap();
    let b = reg.create_vdi("b", Some(256 << 20)).unwrap();
    write_blocks(&reg, a, 0, 600, 1);
    write_blocks(&reg, b, 0, 600, 2);
    let golden = reg.snapshot(a).unwrap();
    let clone = reg.clone_snapshot("clone", golden).unwrap();
    write_blocks(&reg, clone, 100, 50, 3);
    let old_snap = reg.snapshot(b).unwrap();
    write_blocks(&reg, b, 0, 300, 4);
    // Written but not flushed: at the check's instant these nodes and counts exist only in
    // memory, and they are freed (b is deleted) before the check reads them.
    let vm_b = reg.open_vdi(b, true).unwrap();
    for blk in 600..700 {
        vm_b.write_at(blk * 4096, &[9; 4096], false).unwrap();
    }
    drop(vm_b);
    let (vdis, snapshots) = (reg.list().len(), reg.all_snapshots().len());

    let paused = Pause::arm("vdi::check::frozen");
    let checker = {
        let reg = reg.clone();
        std::thread::spawn(move || reg.check(false))
    };
    paused.wait_reached();
    // Everything that changes metadata, while the check holds its view: overwrites in place,
    // copy-on-write, snapshots, deleting a snapshot and a whole VDI, freeing their blocks, and
    // new allocations that must not reuse what the view still shows.
    let r = reg.clone();
    run_alongside("guest I/O and registry operations", move || {
        write_blocks(&r, a, 0, 200, 5);
        write_blocks(&r, clone, 0, 200, 6);
        r.snapshot(clone).unwrap();
        write_blocks(&r, clone, 0, 100, 7);
        r.delete_snapshot(old_snap).unwrap();
        r.delete_vdi(b).unwrap();
        r.reclaim_all(&mut |_, _| {}).unwrap();
        let c = r.create_vdi("c", Some(256 << 20)).unwrap();
        write_blocks(&r, c, 0, 3000, 8);
        r.store().commit().unwrap();
    });
    paused.resume();
    let report = checker.join().unwrap().expect("the check runs");
    assert!(report.is_clean(), "the check saw a torn state: {:?}", report.problems);
    assert_eq!((report.vdis, report.snapshots), (vdis, snapshots), "the check saw the instant it froze");

    // And the store as it is now.
    let now = reg.check(false).unwrap();
    assert!(now.is_clean(), "{:?}", now.problems);
    assert_eq!(now.vdis, vdis, "b deleted, c created");
    assert_eq!(read_block(&reg, clone, 0), 7);
    assert_eq!(read_block(&reg, clone, 150), 6);
    assert_eq!(read_block(&reg, clone, 300), 1, "still shared with the golden snapshot");
}

#[test]
fn checks_beside_a_busy_vm_and_the_reclaimer_are_always_clean() {
    let _fp = scenario();
    let mem = MemBackend::new();
    let reg = new_registry(&mem);
    let _reclaimer = reg.start_reclaimer();
    let vm = reg.create_vdi("vm", Some(256 << 20)).unwrap();
    write_blocks(&reg, vm, 0, 1000, 1);
    let (done_tx, done) = crossbeam_channel::bounded::<()>(1);
    let busy = {
        let reg = reg.clone();
        std::thread::spawn(move || {
            let dev = reg.open_vdi(vm, true).unwrap();
            let mut snaps = Vec::new();
            for round in 0..40u64 {
                // Overwrites (copy-on-write after each snapshot) and new blocks.
                for i in 0..64 {
                    let blk = (round * 97 + i * 13) % 1600;
                    dev.write_at(blk * 4096, &[round as u8; 4096], false).unwrap();
                }
                if round % 3 == 0 {
                    dev.flush().unwrap();
                }
                snaps.push(reg.snapshot(vm).unwrap());
                if snaps.len() > 4 {
                    reg.delete_snapshot(snaps.remove(0)).unwrap();
                }
                if round % 10 == 9 {
                    let clone = reg.clone_snapshot(&format!("c{round}"), snaps[0]).unwrap();
                    write_blocks(&reg, clone, 0, 50, 0xC0);
                    reg.delete_vdi(clone).unwrap();
                }
            }
            drop(done_tx);
        })
    };
    let mut checks = 0;
    while checks < 3 || done.try_recv() == Err(crossbeam_channel::TryRecvError::Empty) {
        let report = reg.check(false).expect("the check runs");
        assert!(report.is_clean(), "check {checks} beside a busy VM: {:?}", report.problems);
        checks += 1;
    }
    busy.join().unwrap();
    eprintln!("{checks} checks ran beside the VM");
    reg.reclaim_all(&mut |_, _| {}).unwrap();
    assert_clean(&reg, "at the end");
}

#[test]
fn a_registry_operation_reads_missing_metadata_without_the_lock() {
    let _fp = scenario();
    use crashtest::pause::MediumGate;
    let gate = Arc::new(MediumGate::new(MemBackend::new()));
    let create = CreateOptions { journal_slot_blocks: 1024, max_blocks: 0 };
    let open = OpenOptions { cache_blocks: 64, ..OpenOptions::default() };
    let store = BlockStore::create(gate.clone(), &create, &open).unwrap();
    let reg = Registry::open(Arc::new(store)).unwrap();
    let renamed = reg.create_vdi("renamed", Some(16 << 20)).unwrap();
    let busy = reg.create_vdi("busy", Some(4 << 30)).unwrap();
    let vm = reg.open_vdi(busy, true).unwrap();
    // Blocks 2 MiB apart: each needs its own tree node, so the small cache turns over and the
    // other VDI's record is no longer in memory.
    for i in 0..600u64 {
        vm.write_at(i * (2 << 20), &[1; 4096], false).unwrap();
        if i % 100 == 99 {
            vm.flush().unwrap();
        }
    }
    vm.flush().unwrap();
    let (go_tx, go) = crossbeam_channel::bounded::<()>(0);
    let op = {
        let reg = reg.clone();
        std::thread::spawn(move || {
            go.recv().unwrap();
            reg.rename(renamed, "renamed-2")
        })
    };
    let read = gate.arm(op.thread().id());
    go_tx.send(()).unwrap();
    read.wait_reached();
    // The rename is stuck reading the medium: the VM's writes and flushes must not wait for it.
    run_alongside("the VM's writes", move || {
        for i in 0..64u64 {
            vm.write_at(i * (2 << 20), &[2; 4096], false).unwrap();
        }
        vm.flush().unwrap();
    });
    read.resume();
    op.join().unwrap().expect("the rename succeeds after its read");
    assert_eq!(reg.info(renamed).unwrap().name, "renamed-2");
    assert_eq!(read_block(&reg, busy, 0), 2);
    assert_clean(&reg, "after the rename");
}

#[test]
fn whole_tree_walks_for_info_and_diff_leave_the_store_running() {
    let _fp = scenario();
    let mem = MemBackend::new();
    let reg = new_registry(&mem);
    let id = reg.create_vdi("vm", Some(256 << 20)).unwrap();
    write_blocks(&reg, id, 0, 100, 1);
    let snap = reg.snapshot(id).unwrap();
    write_blocks(&reg, id, 0, 10, 2);
    let vm = reg.open_vdi(id, true).unwrap();
    for (what, walk) in [
        (
            "mapped_blocks",
            Box::new(move |r: &Registry| r.mapped_blocks(vdi::Source::Vdi(id)).unwrap())
                as Box<dyn Fn(&Registry) -> u64 + Send>,
        ),
        (
            "diff",
            Box::new(move |r: &Registry| {
                r.diff(vdi::Source::Snapshot(snap), vdi::Source::Vdi(id)).unwrap().iter().map(|(_, l)| l / 4096).sum()
            }),
        ),
    ] {
        let before = walk(&reg);
        let paused = Pause::arm("vdi::walk_frozen::frozen");
        let walker = {
            let reg = reg.clone();
            std::thread::spawn(move || walk(&reg))
        };
        paused.wait_reached();
        run_alongside_ref(what, || write_to(&vm, 200, 50, 3));
        paused.resume();
        assert_eq!(walker.join().unwrap(), before, "{what} reports the instant it froze");
    }
    assert_eq!(reg.mapped_blocks(vdi::Source::Vdi(id)).unwrap(), 150);
}

/// [`run_alongside`] for work that borrows: the watchdog is a scoped thread.
fn run_alongside_ref(what: &str, work: impl FnOnce() + Send) {
    let (done_tx, done) = crossbeam_channel::bounded(1);
    std::thread::scope(|s| {
        s.spawn(move || {
            work();
            let _ = done_tx.send(());
        });
        if let Err(crossbeam_channel::RecvTimeoutError::Timeout) = done.recv_timeout(Duration::from_secs(120)) {
            panic!("{what}: the VM's writes never finished while the walk was paused");
        }
    });
}

#[test]
fn an_import_whose_swap_fails_leaks_nothing() {
    let _fp = scenario();
    let mem = MemBackend::new();
    let reg = new_registry(&mem);
    let id = reg.create_vdi("vm", Some(16 << 20)).unwrap();
    write_blocks(&reg, id, 0, 8, 1);
    reg.store().commit().unwrap();
    let allocated = reg.store().lock().space().allocated;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.raw");
    std::fs::write(&image, vec![0xAB; 4 << 20]).unwrap();
    // The import's first transaction (its new tree) goes through; the swap fails.
    fail::cfg("vdi::transact::before_finish", "1*off->1*return").unwrap();
    assert!(reg.fill(id, &image, &mut |_, _| {}).is_err(), "the swap fails");
    fail::remove("vdi::transact::before_finish");
    assert_eq!(read_block(&reg, id, 0), 1, "the VDI keeps its old tree");
    assert_clean(&reg, "after the failed import");
    reg.reclaim_all(&mut |_, _| {}).unwrap();
    reg.store().commit().unwrap();
    assert_eq!(reg.store().lock().space().allocated, allocated, "the imported blocks were freed");
    // And a later import works.
    reg.fill(id, &image, &mut |_, _| {}).unwrap();
    assert_eq!(read_block(&reg, id, 0), 0xAB);
    assert_clean(&reg, "after the second import");
}

/// A commit that is running may be making a lowered snapshot-id ceiling durable (a clean
/// stop's `trim_snapshot_ids`): a scheduled snapshot taken meanwhile must not take an id
/// below the ceiling that commit writes without reserving — or a crash right after it would
/// hand the same id out again.
#[test]
fn a_scheduled_snapshot_beside_a_commit_lowering_the_id_ceiling_reserves_its_id() {
    let _fp = scenario();
    use crashtest::pause::MediumGate;
    let mem = MemBackend::new();
    let gate = Arc::new(MediumGate::new(mem.clone()));
    let create = CreateOptions { journal_slot_blocks: 1024, max_blocks: 0 };
    let store = BlockStore::create(gate.clone(), &create, &OpenOptions::default()).unwrap();
    let reg = Registry::open(Arc::new(store)).unwrap();
    let id = reg.create_vdi("vm", Some(1 << 20)).unwrap();
    for _ in 0..3 {
        reg.snapshot_scheduled(id, vdi::Durability::NextCommit).unwrap();
    }
    reg.trim_snapshot_ids().unwrap();
    // A commit (a guest's flush, say) starts with the lowered ceiling and stops before its
    // commit point.
    let (go_tx, go) = crossbeam_channel::bounded::<()>(0);
    let commit = {
        let reg = reg.clone();
        std::thread::spawn(move || {
            go.recv().unwrap();
            reg.store().commit()
        })
    };
    let sync = gate.arm_sync(commit.thread().id());
    go_tx.send(()).unwrap();
    sync.wait_reached();
    // The scheduled snapshot sees the running commit's ceiling and reserves ids first.
    let reserve = Pause::arm("vdi::snapshot_ids::reserve");
    let snap = {
        let reg = reg.clone();
        std::thread::spawn(move || reg.snapshot_scheduled(id, vdi::Durability::NextCommit))
    };
    reserve.wait_reached();
    reserve.resume();
    sync.resume();
    let held = commit.join().unwrap().unwrap();
    assert!(held.blocks > 0, "the held commit carried the lowered ceiling (it had changes to write)");
    let sid = snap.join().unwrap().unwrap();
    // A power cut now: the id handed out must not be handed out again.
    let after = Registry::open(Arc::new(
        BlockStore::open(Arc::new(MemBackend::from_image(mem.durable_image())), &OpenOptions::default()).unwrap(),
    ))
    .unwrap();
    let next = after.snapshot(id).unwrap();
    assert!(next > sid, "snapshot {next} reuses the id {sid} handed out before the power cut");
}

/// A commit copies and seals its blocks' images outside the metadata lock (a commit of
/// thousands of blocks held every VM's I/O for ~20 ms doing it under the lock): a write goes
/// on meanwhile, and a block it changes is written by this commit as it was when the commit
/// began and by the next one as changed.
#[test]
fn writes_go_on_while_a_commit_copies_its_blocks_and_it_writes_them_as_they_were() {
    let _fp = scenario();
    let mem = MemBackend::new();
    let reg = new_registry(&mem);
    let id = reg.create_vdi("vm", Some(4 << 20)).unwrap();
    let dev = Arc::new(reg.open_vdi(id, true).unwrap());
    // Blocks 0 and 1 share a leaf, so both writes below change the same node.
    write_to(&*dev, 0, 1, 0xA0);
    dev.write_at(4096, &[0xA1; 4096], false).unwrap();
    let sealing = Pause::arm("blockstore::commit::sealing");
    let commit = {
        let reg = reg.clone();
        std::thread::spawn(move || reg.store().commit())
    };
    sealing.wait_reached();
    // The commit has taken its blocks (block 1 mapped) and is copying them.
    let dev2 = dev.clone();
    run_alongside("a write while a commit copies its blocks", move || {
        dev2.write_at(2 * 4096, &[0xA2; 4096], false).unwrap();
    });
    sealing.resume();
    assert!(commit.join().unwrap().unwrap().blocks > 0);
    // A power cut now: the commit holds block 1, not block 2 (mapped after it began).
    let cut = MemBackend::from_image(mem.durable_image());
    let after = reopen(&cut);
    assert_eq!((read_block(&after, id, 0), read_block(&after, id, 1)), (0xA0, 0xA1));
    assert_eq!(read_block(&after, id, 2), 0, "a change made after the commit began is in it");
    assert_clean(&after, "after a power cut behind the held commit");
    // The next commit holds it.
    dev.flush().unwrap();
    let after = reopen(&MemBackend::from_image(mem.durable_image()));
    assert_eq!(read_block(&after, id, 2), 0xA2);
    assert_clean(&after, "after the next commit");
}

/// With a background committer, a write that finds a quarter of the journal used asks it to
/// commit and does not wait; at half a write commits itself (back-pressure), even while the
/// committer is busy, so the other half stays free for transactions under way.
#[test]
fn a_write_filling_a_quarter_of_the_journal_leaves_the_commit_to_the_committer() {
    let _fp = scenario();
    let mem = MemBackend::new();
    let create = CreateOptions { journal_slot_blocks: 64, max_blocks: 0 };
    let store = BlockStore::create(Arc::new(mem.clone()), &create, &OpenOptions::default()).unwrap();
    let reg = Registry::open(Arc::new(store)).unwrap();
    let id = reg.create_vdi("vm", Some(1 << 30)).unwrap();
    reg.store().commit().unwrap();
    let committer = reg.start_committer();
    let held = Pause::arm("vdi::committer::before_commit");
    let dev = reg.open_vdi(id, true).unwrap();
    let generation = || reg.store().lock().superblock().generation;
    let before = generation();
    // One block per 2 MiB: every write makes a new leaf (and changes a count block).
    let write_leaf = |leaf: u64| dev.write_at(leaf * (2 << 20), &[0xC0; 4096], false).unwrap();
    let mut leaf = 0u64;
    while generation() == before && !reg.store().lock().commit_soon() {
        write_leaf(leaf);
        leaf += 1;
    }
    assert_eq!(generation(), before, "the write that filled a quarter of the journal committed itself");
    held.wait_reached();
    // The committer is held: writes go on until half, where one commits itself.
    while generation() == before {
        assert!(leaf < 512, "no write ever committed while the committer was held");
        write_leaf(leaf);
        leaf += 1;
    }
    held.resume();
    drop(committer);
    reg.store().commit().unwrap();
    let after = reopen(&MemBackend::from_image(mem.durable_image()));
    for l in 0..leaf {
        assert_eq!(read_block(&after, id, l * 512), 0xC0, "leaf {l}");
    }
    assert_clean(&after, "after the writes");
}

/// A commit makes the blocks it freed reusable only after every data I/O that began before it
/// (and so may have found them) has ended; I/O that begins while it waits, on any VDI, goes on
/// without waiting for it, and the commit does not wait for that I/O.
#[test]
fn a_commit_reuses_no_block_under_earlier_io_and_stops_no_new_io() {
    let _fp = scenario();
    let store = Arc::new(
        BlockStore::create(
            Arc::new(MemBackend::new()),
            &CreateOptions { journal_slot_blocks: 64, max_blocks: 0 },
            &OpenOptions::default(),
        )
        .unwrap(),
    );
    let mut t = store.begin().unwrap();
    let block = t.alloc_data().unwrap();
    t.finish().unwrap();
    store.commit().unwrap();
    // A read that found the block is under way when the block is freed.
    let earlier = store.io_guard();
    let mut t = store.begin().unwrap();
    t.decref(block).unwrap();
    t.finish().unwrap();
    // Stopped once it has moved the I/O epoch on, before it waits.
    let releasing = Pause::arm("blockstore::commit::releasing");
    let (committed_tx, committed) = crossbeam_channel::bounded(1);
    let commit = {
        let store = store.clone();
        std::thread::spawn(move || {
            store.commit().unwrap();
            committed_tx.send(()).unwrap();
        })
    };
    releasing.wait_reached();
    releasing.resume();
    // New I/O starts, and stays under way, while the commit waits for the earlier read.
    let (later_release, later_wait) = crossbeam_channel::bounded::<()>(0);
    let (later_started_tx, later_started) = crossbeam_channel::bounded::<()>(1);
    let later = {
        let store = store.clone();
        std::thread::spawn(move || {
            let _guard = store.io_guard();
            later_started_tx.send(()).unwrap();
            let _ = later_wait.recv();
        })
    };
    later_started.recv_timeout(Duration::from_secs(120)).expect("new I/O waited for a commit waiting for earlier I/O");
    assert!(
        committed.recv_timeout(Duration::from_millis(200)).is_err(),
        "the commit ended while a read that found a block it freed was under way"
    );
    assert!(store.lock().is_pending_free(block), "a block freed under a read in flight became reusable");
    drop(earlier);
    committed.recv_timeout(Duration::from_secs(120)).expect("the commit waited for I/O that began after it");
    commit.join().unwrap();
    assert!(!store.lock().is_pending_free(block), "the commit released the block once the read ended");
    drop(later_release);
    later.join().unwrap();
}

/// A read served without waiting (`try_read_at`, what an NBD connection's reader tries) holds
/// the I/O guard from its lookup to the end of its data read, as a worker's read does: the
/// block it found, left by a copy-on-write and freed by a snapshot's deletion meanwhile, is not
/// made reusable while it reads, and the read returns the bytes the block held.
#[test]
fn a_read_that_does_not_wait_keeps_the_block_it_found_from_reuse() {
    use blockdev::TryRead;
    let _fp = scenario();
    let mem = MemBackend::new();
    let reg = new_registry(&mem);
    let id = reg.create_vdi("vm", Some(16 << 20)).unwrap();
    let dev = Arc::new(reg.open_vdi(id, true).unwrap());
    write_to(&*dev, 0, 1, 0xAA);
    let snap = reg.snapshot(id).unwrap();
    // The read finds block 0 (shared with the snapshot) and is held before reading its data.
    let looked_up = Pause::arm("vdi::try_read::looked_up");
    let reader = {
        let dev = dev.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let r = dev.try_read_at(0, &mut buf).unwrap();
            (r, buf)
        })
    };
    looked_up.wait_reached();
    // Meanwhile the VM overwrites the block (copied on write: the VDI lets go of it), the
    // snapshot is deleted and reclaimed (the last reference goes), and a commit frees it.
    let (freed_tx, freed) = crossbeam_channel::bounded(1);
    let other = {
        let (reg, dev) = (reg.clone(), dev.clone());
        std::thread::spawn(move || {
            dev.write_at(0, &[0xBB; 4096], false).unwrap();
            reg.delete_snapshot(snap).unwrap();
            reg.reclaim_all(&mut |_, _| {}).unwrap();
            reg.store().commit().unwrap();
            freed_tx.send(()).unwrap();
        })
    };
    assert!(
        freed.recv_timeout(Duration::from_millis(500)).is_err(),
        "the commit freeing the block ended while a read that found it was under way"
    );
    looked_up.resume();
    let (r, buf) = reader.join().unwrap();
    assert!(matches!(r, TryRead::Done(_)), "the read was answered: {r:?}");
    assert!(buf.iter().all(|&b| b == 0xAA), "the read saw the block in another use");
    freed.recv_timeout(Duration::from_secs(120)).expect("the commit ended once the read had");
    other.join().unwrap();
    assert_eq!(read_block(&reg, id, 0), 0xBB);
    let report = reg.check(false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// A lookup that misses the metadata cache reads the block without the lock. Meanwhile the
/// block can be unlinked, its free committed and the block reused for data. What the read then
/// finds is not damage: the lookup walks again from what is current now. Reporting it as a
/// corrupt node (as `load` did) failed a guest's read or write with EIO under load.
#[test]
fn a_lookup_whose_missing_block_is_freed_and_reused_meanwhile_walks_again() {
    use blockstore::format::{seal_meta, verify_meta};
    use blockstore::{BLOCK_SIZE, BlockAddr, MetaKind};
    use crashtest::pause::MediumGate;
    static TEST_KIND: MetaKind = MetaKind {
        name: "test",
        seal: |b, a| seal_meta(b, 0x5453_4554, a),
        verify: |b, a| verify_meta(b, 0x5453_4554, a),
    };
    let _fp = scenario();
    for reused in [true, false] {
        let gate = Arc::new(MediumGate::new(MemBackend::new()));
        let create = CreateOptions { journal_slot_blocks: 64, max_blocks: 0 };
        let open = OpenOptions::default();
        let store = BlockStore::create(gate.clone(), &create, &open).unwrap();
        // User slot 0 names one metadata block: a one-node "tree".
        let node = store
            .with_transaction(|t| {
                let a = t.alloc_meta(&TEST_KIND)?;
                t.write(a, &TEST_KIND)?[100] = 7;
                t.set_user(0, a.0)?;
                Ok(a)
            })
            .unwrap();
        store.commit().unwrap();
        drop(store);
        // Reopened: nothing is cached, so the lookup misses.
        let store = Arc::new(BlockStore::open(gate.clone(), &open).unwrap());
        let (go_tx, go) = crossbeam_channel::bounded::<()>(0);
        let lookup = {
            let store = store.clone();
            std::thread::spawn(move || {
                go.recv().unwrap();
                store.with_cached(|m| match m.user(0) {
                    0 => Ok(None),
                    a => Ok(Some(m.read(BlockAddr(a), &TEST_KIND)?[100])),
                })
            })
        };
        let read = gate.arm(lookup.thread().id());
        go_tx.send(()).unwrap();
        read.wait_reached();
        // The lookup is reading the block. Meanwhile it is unlinked and freed, the free is
        // committed, and (in the first round) a data write reuses the block.
        store
            .with_transaction(|t| {
                t.set_user(0, 0)?;
                t.decref(node)?;
                Ok(())
            })
            .unwrap();
        store.commit().unwrap();
        assert_eq!(store.lock().refcount(node).unwrap(), 0, "the block is free again");
        if reused {
            store.write_data(node, 0, &[0xAB; BLOCK_SIZE]).unwrap();
        }
        read.resume();
        let found = lookup.join().unwrap();
        assert_eq!(found.expect("the lookup walks again instead of reporting damage"), None, "reused: {reused}");
    }
}

/// The crash-state checker's clock: a write whose data is on the medium but whose block is not
/// yet mapped when another thread's flush begins its commit is not covered by that flush — and
/// when no change is logged between the flush's start and the write's return, both read the
/// same log position. Built here deterministically (the write held between its data and its
/// mapping, the commit held after taking its blocks); the checker must accept every crash state
/// of it. Red when the model orders the two by log position alone: the states right after the
/// flush then "lose" the write (the failure a long `crash-states` run hit on a loaded machine).
#[test]
fn a_write_mapping_its_block_as_another_threads_flush_begins_is_not_held_to_that_flush() {
    use crashtest::states::for_each_state;
    use crashtest::workload::{Run, ThreadLog, ThreadWrite, block_bytes, check_state};
    let _fp = scenario();
    let mut run = Run::new(9, 64);
    let (a, b) = (run.create("a", 64), run.create("b", 64));
    let content = Some((run.tag(a), 77));
    let held_write = Pause::arm("vdi::write::data_written");
    let writer = {
        let (reg, rec) = (run.reg.clone(), run.recorder.clone());
        std::thread::spawn(move || {
            let dev = reg.open_vdi(a, true).unwrap();
            let s = rec.stamp();
            dev.write_at(5 * 4096, &block_bytes(content, 5), false).unwrap();
            (s, rec.stamp())
        })
    };
    held_write.wait_reached();
    let held_commit = Pause::arm("blockstore::commit::sealing");
    let flusher = {
        let (reg, rec) = (run.reg.clone(), run.recorder.clone());
        std::thread::spawn(move || {
            let dev = reg.open_vdi(b, true).unwrap();
            let s = rec.stamp();
            dev.flush().unwrap();
            (s, rec.stamp())
        })
    };
    held_commit.wait_reached();
    // The commit has taken its blocks without the write's mapping; the write now returns
    // before the commit logs anything.
    held_write.resume();
    let write = writer.join().unwrap();
    held_commit.resume();
    let flush = flusher.join().unwrap();
    assert_eq!(write.1.position, flush.0.position, "the write returned at the position its flush began");
    assert!(flush.0 < write.1, "the flush began first");
    let logs = [
        ThreadLog { vdi: a, writes: vec![ThreadWrite { vblock: 5, content, span: write }], flushes: vec![] },
        ThreadLog { vdi: b, writes: vec![], flushes: vec![flush] },
    ];
    assert_eq!(run.record_threads(&logs), 1, "the write is ordered after the flush");
    let log = run.recorder.log();
    let (model, mut failures, mut tried) = (run.model.clone(), Vec::new(), 0);
    drop(run);
    for_each_state(&log, 400, 9, &mut |mut st| {
        tried += 1;
        if let Err(why) = check_state(&mut st, &log, &model, false) {
            failures.push(format!("[{:?}, durable to {}] {why}", st.variant, st.cut.durable));
        }
    });
    assert!(tried > 20, "only {tried} crash states");
    assert!(failures.is_empty(), "{} of {tried} crash states failed; first: {}", failures.len(), failures[0]);
}
