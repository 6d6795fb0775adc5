//! The crash-state suite: every power-cut state of scripted workloads must open, pass `check`,
//! keep every acknowledged write, snapshot, clone and delete, and never show a VDI another's
//! data or a metadata block. `CRASH_STATES=N` sets how many states (CI runs the default);
//! `cargo xtask crash-states --states N` runs more in release mode.

use std::collections::BTreeMap;

use crashtest::states::{CrashState, Cut, Variant, for_each_state};
use crashtest::workload::{self, check_state};

fn states_wanted() -> usize {
    std::env::var("CRASH_STATES").ok().and_then(|s| s.parse().ok()).unwrap_or(2400)
}

type Workload = fn(u64, u64) -> workload::Run;

fn run_suite(workload: Workload, seed: u64, journal_slot_blocks: u64, states: usize) -> (usize, Vec<String>) {
    run_suite_of(workload(seed, journal_slot_blocks), seed, journal_slot_blocks, states)
}

fn run_suite_of(run: workload::Run, seed: u64, journal_slot_blocks: u64, states: usize) -> (usize, Vec<String>) {
    let log = run.recorder.log();
    let model = run.model.clone();
    drop(run);
    let mut tried = 0usize;
    let mut by_variant: BTreeMap<Variant, (usize, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for_each_state(&log, states, seed, &mut |mut st: CrashState| {
        tried += 1;
        let verdict = check_state(&mut st, &log, &model, tried.is_multiple_of(8));
        let e = by_variant.entry(st.variant).or_default();
        e.0 += 1;
        if let Err(why) = verdict {
            e.1 += 1;
            failures.push(format!(
                "[{:?}, durable to {}, cut at {}] {}: {why}",
                st.variant, st.cut.durable, st.cut.horizon, st.describe
            ));
        }
    });
    eprintln!(
        "seed {seed}, journal slot {journal_slot_blocks} blocks: {} logged operations, {tried} crash states, {} failed",
        log.len(),
        failures.len()
    );
    for (v, (n, f)) in &by_variant {
        eprintln!("  {v:?}: {n} states, {f} failed");
    }
    (tried, failures)
}

#[test]
fn every_crash_state_of_the_standard_workload_is_consistent() {
    let wanted = states_wanted();
    let mut tried = 0;
    let mut failures = Vec::new();
    // Two seeds: a tiny journal (many commits, the release queue spread over many of them) and
    // the default one.
    for (seed, journal) in [(1u64, 64u64), (2, 8192)] {
        let (t, f) = run_suite(workload::standard, seed, journal, wanted / 2);
        tried += t;
        failures.extend(f);
    }
    report(wanted, tried, &failures);
}

/// Snapshot churn: a snapshot per write, the one before deleted, so snapshot-log blocks fill,
/// empty and are freed at every instant of the power cut.
#[test]
fn every_crash_state_of_snapshot_churn_is_consistent() {
    let wanted = states_wanted() / 6;
    let (tried, failures) = run_suite(workload::snapshot_churn, 4, 64, wanted);
    report(wanted, tried, &failures);
}

/// A fast schedule's snapshots and retention, durable only at the next commit: the power cut
/// may take the ones since the last commit, never one a commit covered, and never leaves a
/// state `check` finds fault with.
#[test]
fn every_crash_state_of_scheduled_snapshots_is_consistent() {
    let wanted = states_wanted() / 6;
    let (tried, failures) = run_suite(workload::scheduled_snapshots, 6, 64, wanted);
    report(wanted, tried, &failures);
}

/// Operator operations: named snapshots, a clone re-filled with only its changed blocks, and
/// rollbacks, cut by the power at every instant.
#[test]
fn every_crash_state_of_operator_operations_is_consistent() {
    let wanted = states_wanted() / 6;
    let (tried, failures) = run_suite(workload::operator_ops, 5, 64, wanted);
    report(wanted, tried, &failures);
}

/// The standard workload run on a store in RADOS (`cargo xtask test` starts the cluster): the
/// engine reads back what RADOS holds at every step, and every power-cut state of the writes and
/// syncs it sent is checked. RADOS can leave fewer states than these (see docs/design.md): a
/// completed write is durable, one object's writes are atomic and in order.
#[test]
fn every_crash_state_of_the_standard_workload_on_rados_is_consistent() {
    let Some(cluster) = cephtest::cluster("every_crash_state_of_the_standard_workload_on_rados_is_consistent") else {
        return;
    };
    let (loc, opts) = cluster.fresh_store("crash-states", "test-host");
    let medium = rados::open_medium(&loc, &opts, false, true, false).expect("a fresh store medium in RADOS");
    assert!(medium.created);
    let (seed, journal) = (6u64, 64u64);
    let run = workload::standard_on(workload::Run::on(crashtest::Recorder::on(medium.backend), seed, journal));
    let wanted = states_wanted() / 8;
    let (tried, failures) = run_suite_of(run, seed, journal, wanted);
    drop(medium.lease);
    report(wanted, tried, &failures);
}

fn report(wanted: usize, tried: usize, failures: &[String]) {
    eprintln!("crash states: {tried} tried, {} failed", failures.len());
    for f in failures.iter().take(10) {
        eprintln!("FAILED {f}");
    }
    assert!(failures.is_empty(), "{} of {tried} crash states failed; first: {}", failures.len(), failures[0]);
    assert!(tried >= wanted * 9 / 10, "only {tried} crash states were built");
}

#[test]
fn the_checker_catches_a_lost_acknowledged_write() {
    // The final state with its last window's writes dropped, but judged as if the window's
    // sync had completed: acknowledged data is missing, and the checker must say so.
    let run = workload::standard(3, 64);
    let log = run.recorder.log();
    let model = run.model.clone();
    drop(run);
    let mut states = Vec::new();
    for_each_state(&log, 1, 3, &mut |st| states.push(st));
    let all_synced = log.len();
    let early = states.into_iter().filter(|s| s.variant == Variant::NoneLanded).nth(40).expect("enough windows");
    let mut lying = CrashState { cut: Cut { durable: all_synced, horizon: all_synced }, ..early };
    let verdict = check_state(&mut lying, &log, &model, false);
    assert!(verdict.is_err(), "a state missing acknowledged writes passed the checker");
    eprintln!("caught, as it should be: {}", verdict.unwrap_err());
}
