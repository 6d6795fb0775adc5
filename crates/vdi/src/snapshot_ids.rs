//! Snapshot ids: handed out in order and never twice — not even after a crash that lost the
//! snapshot an id was handed to.
//!
//! The superblock slot [`USER_NEXT_SNAPSHOT`] is a ceiling: every id handed out so far is
//! below it, in memory and on disk alike. A snapshot committed before its call returns raises
//! the ceiling in its own transaction, so a crash loses the id with the snapshot. A scheduled
//! snapshot ([`Durability::NextCommit`]) is durable only at some later commit, yet its id is
//! in the caller's hands at once: it must be below the *committed* ceiling, or a crash before
//! that commit would hand the same id to another snapshot. So such ids are reserved ahead,
//! [`RESERVE`] at a time, each reservation riding on whatever commit comes next (a guest's
//! flush, the schedule's own commit); only a schedule that outruns every commit pays for a
//! commit of its own. A clean stop gives the unused reservation back
//! ([`Registry::trim_snapshot_ids`]).

use blockstore::Meta;

use crate::disk::USER_NEXT_SNAPSHOT;
use crate::registry::{Registry, State};
use crate::{Result, SnapshotId};

/// Ids reserved ahead for scheduled snapshots; topped up when fewer than half are left.
pub(crate) const RESERVE: u64 = 1024;

/// The id of a snapshot committed before its call returns: raises the ceiling past it.
pub(crate) fn hand_out_committed(st: &mut State, meta: &mut Meta) -> Result<SnapshotId> {
    let sid = st.next_snapshot;
    if meta.user(USER_NEXT_SNAPSHOT) <= sid {
        meta.set_user(USER_NEXT_SNAPSHOT, sid + 1)?;
    }
    st.next_snapshot = sid + 1;
    Ok(SnapshotId(sid))
}

/// The id of a snapshot durable only at the next commit, if the committed ceiling covers it
/// (else `None`: [`reserve`] first). Tops the reservation up in memory, for the next commit
/// to make durable.
pub(crate) fn hand_out_reserved(st: &mut State, meta: &mut Meta) -> Result<Option<SnapshotId>> {
    let sid = st.next_snapshot;
    if meta.committed_user(USER_NEXT_SNAPSHOT) <= sid {
        return Ok(None);
    }
    if meta.user(USER_NEXT_SNAPSHOT) < sid + RESERVE / 2 {
        meta.set_user(USER_NEXT_SNAPSHOT, sid + RESERVE)?;
    }
    st.next_snapshot = sid + 1;
    assert!(meta.user(USER_NEXT_SNAPSHOT) > sid, "a reserved snapshot id lies above the ceiling");
    Ok(Some(SnapshotId(sid)))
}

/// Makes sure the committed ceiling covers the next id, committing a reservation if not.
pub(crate) fn reserve(reg: &Registry) -> Result<()> {
    let next = reg.state.lock().next_snapshot;
    if reg.store.lock().committed_user(USER_NEXT_SNAPSHOT) > next {
        return Ok(());
    }
    // Race tests hold a reservation here, beside a commit that is running.
    test_point!("vdi::snapshot_ids::reserve");
    reg.transact(|st, meta| {
        let want = st.next_snapshot + RESERVE;
        if meta.user(USER_NEXT_SNAPSHOT) < want {
            meta.set_user(USER_NEXT_SNAPSHOT, want)?;
        }
        Ok(())
    })
}

impl Registry {
    /// Gives back the snapshot ids reserved for scheduled snapshots and not used, so the next
    /// snapshot after a restart continues the sequence. Made durable by the caller's next
    /// commit, which makes every snapshot taken so far durable with it: call it just before a
    /// clean stop's final commit.
    pub fn trim_snapshot_ids(&self) -> Result<()> {
        let next = self.state.lock().next_snapshot;
        if self.store.lock().user(USER_NEXT_SNAPSHOT) <= next {
            return Ok(());
        }
        self.transact_uncommitted(|st, meta| {
            let next = st.next_snapshot;
            if meta.user(USER_NEXT_SNAPSHOT) > next {
                meta.set_user(USER_NEXT_SNAPSHOT, next)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use blockstore::{BlockStore, CreateOptions, MemBackend, OpenOptions};

    use super::*;
    use crate::Problem;

    #[test]
    fn check_reports_and_repairs_a_counter_behind_an_id_in_use() {
        let mem = Arc::new(MemBackend::new());
        let store = BlockStore::create(mem, &CreateOptions::default(), &OpenOptions::default()).unwrap();
        let reg = Registry::open(Arc::new(store)).unwrap();
        let id = reg.create_vdi("vm", Some(1 << 20)).unwrap();
        let taken = [reg.snapshot(id).unwrap(), reg.snapshot(id).unwrap()];
        // Damage: the counter goes back below the ids in use.
        let mut txn = reg.store().begin().unwrap();
        txn.set_user(USER_NEXT_SNAPSHOT, 1).unwrap();
        txn.finish().unwrap();
        reg.store().commit().unwrap();
        let report = reg.check(false).unwrap();
        assert!(
            matches!(report.problems.as_slice(), [Problem::SnapshotIdAhead { snapshot, next: 1 }] if *snapshot == taken[1].0),
            "{:?}",
            report.problems
        );
        // Even so, a new snapshot never reuses an id in use...
        let reopened = Registry::open(reg.store().clone()).unwrap();
        drop(reg);
        let next = reopened.snapshot(id).unwrap();
        assert!(next > taken[1], "snapshot {next} reuses an id in use");
        // ...and repair puts the counter right.
        let mut txn = reopened.store().begin().unwrap();
        txn.set_user(USER_NEXT_SNAPSHOT, 1).unwrap();
        txn.finish().unwrap();
        reopened.store().commit().unwrap();
        assert_eq!(reopened.check(true).unwrap().repaired, 1);
        assert!(reopened.check(false).unwrap().is_clean());
    }
}
