//! Scheduled snapshots and their retention.

use std::sync::Arc;
use std::time::Instant;

use shutdown::Shutdown;

use vdi::{Durability, Registry, VdiId};

use crate::config::Schedule;

/// What one round of the schedule did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Round {
    /// Snapshots taken.
    pub taken: usize,
    /// Snapshots retention deleted.
    pub deleted: usize,
    /// Snapshots that failed.
    pub failed: usize,
}

/// A schedule this frequent logs each snapshot at DEBUG and a summary every minute at INFO;
/// a slower one logs each snapshot and deletion at INFO.
const QUIET_BELOW: std::time::Duration = std::time::Duration::from_secs(1);

/// A schedule faster than this does not commit each round: its snapshots and retention are
/// durable at the store's next commit (a guest's flush), and the schedule commits them itself
/// at the first round this long after the first round not yet committed (so within this plus
/// one interval, plus a slow round's time). A slower one commits each round.
/// At a snapshot every 10 ms, a commit per snapshot and per deletion was two hundred commits a
/// second writing the same count blocks again and again (docs/design.md).
pub const COMMIT_WITHIN: std::time::Duration = QUIET_BELOW;

/// How durable a schedule's rounds are made: at once, or at the next commit (see
/// [`COMMIT_WITHIN`]).
pub fn durability(schedule: &Schedule) -> Durability {
    if schedule.every >= COMMIT_WITHIN { Durability::Now } else { Durability::NextCommit }
}

/// Takes one round of scheduled snapshots and applies retention. Returns snapshots taken.
pub fn tick(reg: &Registry, schedule: &Schedule, now_ns: u64) -> usize {
    tick_round(reg, schedule, now_ns).taken
}

/// [`tick`], saying what it did.
pub fn tick_round(reg: &Registry, schedule: &Schedule, now_ns: u64) -> Round {
    let loud = schedule.every >= QUIET_BELOW;
    let ids: Vec<VdiId> = if schedule.vdis.is_empty() {
        reg.list().into_iter().filter(|v| v.size > 0).map(|v| v.id).collect()
    } else {
        schedule.vdis.iter().filter_map(|n| reg.resolve(n).ok()).collect()
    };
    let mut round = Round::default();
    let durability = durability(schedule);
    for id in ids {
        match reg.snapshot_scheduled(id, durability) {
            Ok(sid) => {
                round.taken += 1;
                if loud {
                    tracing::info!(vdi = %id, snapshot = %sid, "scheduled snapshot taken");
                } else {
                    tracing::debug!(vdi = %id, snapshot = %sid, "scheduled snapshot taken");
                }
            }
            Err(e) => {
                round.failed += 1;
                tracing::warn!("scheduled snapshot of VDI {id} failed: {e}");
            }
        }
        round.deleted += retain(reg, schedule, id, now_ns, loud, durability);
    }
    round
}

/// Deletes scheduled snapshots of `id` beyond `keep` or older than `keep_for`; returns how
/// many.
fn retain(reg: &Registry, schedule: &Schedule, id: VdiId, now_ns: u64, loud: bool, durability: Durability) -> usize {
    let Ok(snaps) = reg.snapshots(id) else { return 0 };
    let mut deleted = 0;
    let mut auto: Vec<_> = snaps.into_iter().filter(|s| s.automatic && !s.deleted).collect();
    auto.sort_by_key(|s| std::cmp::Reverse(s.id));
    for (i, s) in auto.iter().enumerate() {
        let too_many = schedule.keep.is_some_and(|k| i >= k);
        let too_old = schedule.keep_for.is_some_and(|t| now_ns.saturating_sub(s.time_ns) > t.as_nanos() as u64);
        if !(too_many || too_old) {
            continue;
        }
        match reg.delete_snapshot_with(s.id, durability) {
            Ok(()) => {
                deleted += 1;
                let why = if too_many { "beyond --keep" } else { "older than --keep-for" };
                if loud {
                    tracing::info!(vdi = %id, snapshot = %s.id, "scheduled snapshot deleted ({why})");
                } else {
                    tracing::debug!(vdi = %id, snapshot = %s.id, "scheduled snapshot deleted ({why})");
                }
            }
            // Open by a reader (an export of it): retried next round.
            Err(e) => tracing::debug!("retention could not delete snapshot {}: {e}", s.id),
        }
    }
    deleted
}

/// Runs the schedule until `stop` is raised: sleeps until the next slot (or the stop), takes
/// the round, repeats. Rounds not committed when it stops are committed by the daemon's final
/// commit.
pub fn run(reg: Arc<Registry>, schedule: Schedule, stop: Shutdown) {
    const SUMMARY_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
    let mut next = Instant::now() + schedule.every;
    let mut summary = (Instant::now(), Round::default());
    // When the oldest round not yet committed by the schedule was taken.
    let mut uncommitted: Option<Instant> = None;
    loop {
        if stop.wait_until(next) {
            break;
        }
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64);
        let r = tick_round(&reg, &schedule, wall.unwrap_or(0));
        summary.1.taken += r.taken;
        summary.1.deleted += r.deleted;
        summary.1.failed += r.failed;
        if durability(&schedule) == Durability::NextCommit && r.taken + r.deleted > 0 {
            uncommitted.get_or_insert_with(Instant::now);
        }
        if uncommitted.is_some_and(|since| since.elapsed() >= COMMIT_WITHIN) {
            uncommitted = None;
            if let Err(e) = reg.store().commit() {
                tracing::warn!("committing scheduled snapshots: {e}");
            }
        }
        if schedule.every < QUIET_BELOW && summary.0.elapsed() >= SUMMARY_EVERY {
            let s = summary.1;
            tracing::info!(
                taken = s.taken,
                deleted = s.deleted,
                failed = s.failed,
                "scheduled snapshots in the last minute"
            );
            summary = (Instant::now(), Round::default());
        }
        next += schedule.every;
        if next < Instant::now() {
            // Fell behind (a slow commit): skip missed slots rather than bursting.
            next = Instant::now() + schedule.every;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use blockstore::{BlockStore, CreateOptions, MemBackend, OpenOptions};

    use super::*;

    fn schedule(every: Duration) -> Schedule {
        Schedule { every, vdis: Vec::new(), keep: Some(2), keep_for: None }
    }

    #[test]
    fn a_fast_schedule_rides_on_commits_and_a_slow_one_commits_each_round() {
        let store = BlockStore::create(Arc::new(MemBackend::new()), &CreateOptions::default(), &OpenOptions::default())
            .unwrap();
        let reg = Registry::open(Arc::new(store)).unwrap();
        let id = reg.create_vdi("vm", Some(1 << 20)).unwrap();
        let fast = schedule(Duration::from_millis(10));
        assert_eq!(durability(&fast), Durability::NextCommit);
        for round in 0..5 {
            let r = tick_round(&reg, &fast, 0);
            assert_eq!((r.taken, r.failed), (1, 0), "round {round}");
            assert!(reg.store().lock().has_changes(), "round {round} of a 10 ms schedule committed itself");
        }
        let live = || reg.snapshots(id).unwrap().iter().filter(|s| !s.deleted).count();
        assert_eq!(live(), 2, "retention keeps two");
        let slow = schedule(Duration::from_secs(60));
        assert_eq!(durability(&slow), Durability::Now);
        let r = tick_round(&reg, &slow, 0);
        assert_eq!((r.taken, r.deleted), (1, 1));
        assert!(!reg.store().lock().has_changes(), "a slow schedule's round is durable when it returns");
    }
}
