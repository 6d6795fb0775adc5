//! Scheduled snapshots and their retention.

use std::sync::Arc;
use std::time::Instant;

use shutdown::Shutdown;

use vdi::{Registry, VdiId};

use crate::config::Schedule;

/// Takes one round of scheduled snapshots and applies retention. Returns snapshots taken.
pub fn tick(reg: &Registry, schedule: &Schedule, now_ns: u64) -> usize {
    let ids: Vec<VdiId> = if schedule.vdis.is_empty() {
        reg.list().into_iter().filter(|v| v.size > 0).map(|v| v.id).collect()
    } else {
        schedule.vdis.iter().filter_map(|n| reg.resolve(n).ok()).collect()
    };
    let mut taken = 0;
    for id in ids {
        match reg.snapshot_with(id, true) {
            Ok(_) => taken += 1,
            Err(e) => tracing::warn!("scheduled snapshot of VDI {id} failed: {e}"),
        }
        retain(reg, schedule, id, now_ns);
    }
    taken
}

/// Deletes scheduled snapshots of `id` beyond `keep` or older than `keep_for`.
fn retain(reg: &Registry, schedule: &Schedule, id: VdiId, now_ns: u64) {
    let Ok(snaps) = reg.snapshots(id) else { return };
    let mut auto: Vec<_> = snaps.into_iter().filter(|s| s.automatic && !s.deleted).collect();
    auto.sort_by_key(|s| std::cmp::Reverse(s.id));
    for (i, s) in auto.iter().enumerate() {
        let too_many = schedule.keep.is_some_and(|k| i >= k);
        let too_old = schedule.keep_for.is_some_and(|t| now_ns.saturating_sub(s.time_ns) > t.as_nanos() as u64);
        if (too_many || too_old)
            && let Err(e) = reg.delete_snapshot(s.id)
        {
            tracing::debug!("retention could not delete snapshot {}: {e}", s.id);
        }
    }
}

/// Runs the schedule until `stop` is raised: sleeps until the next slot (or the stop), takes
/// the round, repeats.
pub fn run(reg: Arc<Registry>, schedule: Schedule, stop: Shutdown) {
    let mut next = Instant::now() + schedule.every;
    loop {
        if stop.wait_until(next) {
            break;
        }
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64);
        tick(&reg, &schedule, wall.unwrap_or(0));
        next += schedule.every;
        if next < Instant::now() {
            // Fell behind (a slow commit): skip missed slots rather than bursting.
            next = Instant::now() + schedule.every;
        }
    }
}
