//! Building the media a power cut could leave behind, from a recorded log.
//!
//! The medium model (docs/format.md §1): a completed sync makes every write completed before it
//! durable; a change not followed by a completed sync may be lost, land out of order with
//! other such changes, or — for a write — be torn, each 512-byte sector holding its old or its
//! new contents. So a crash between sync k and sync k+1 leaves everything up to sync k plus any
//! subset of the changes issued in between, applied in any order, each possibly torn.

use crate::recorder::Op;

/// Where a crash state was cut, for the checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Log position just past the last sync known complete: an operation whose last sync lies
    /// before this had completed (its effects must all be there).
    pub durable: usize,
    /// Log position of the first sync that did not complete: nothing at or after it happened.
    pub horizon: usize,
}

/// How the unsynced changes of a state were treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    /// Every unsynced change lost.
    NoneLanded,
    /// Every unsynced change landed, in order.
    AllInOrder,
    /// Every unsynced change but one landed, in order.
    OneDropped,
    /// A prefix landed in order and the next write was torn at sector boundaries.
    TornPrefix,
    /// A random subset landed, in order.
    Subset,
    /// A random subset landed in a random order, some writes torn.
    Reordered,
}

impl Variant {
    /// True if the variant may drop or reorder an unsynced change (not just cut the sequence).
    pub fn drops_or_reorders(self) -> bool {
        matches!(self, Variant::OneDropped | Variant::Subset | Variant::Reordered)
    }
}

/// One medium a power cut could leave.
pub struct CrashState {
    /// The bytes on the medium.
    pub image: Vec<u8>,
    /// Where the crash was.
    pub cut: Cut,
    /// How the unsynced changes were treated.
    pub variant: Variant,
    /// A description to reproduce it by: window, which changes landed, which were torn.
    pub describe: String,
}

/// A small deterministic random source (xorshift64*), so every failing state can be rebuilt.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded; a seed of 0 is replaced.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// How a change is applied: whole, or only some of its sectors.
#[derive(Clone)]
enum Landing {
    Whole,
    Sectors(Vec<bool>),
}

fn apply(image: &mut Vec<u8>, op: &Op, how: &Landing) {
    match op {
        Op::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            match how {
                Landing::Whole => image[*offset as usize..end].copy_from_slice(data),
                Landing::Sectors(keep) => {
                    for (i, chunk) in data.chunks(512).enumerate() {
                        if keep.get(i).copied().unwrap_or(false) {
                            let at = *offset as usize + i * 512;
                            image[at..at + chunk.len()].copy_from_slice(chunk);
                        }
                    }
                }
            }
        }
        Op::Extend { len } => {
            if (image.len() as u64) < *len {
                image.resize(*len as usize, 0);
            }
        }
        Op::Sync => {}
    }
}

fn sectors(op: &Op) -> usize {
    match op {
        Op::Write { data, .. } => data.len().div_ceil(512),
        _ => 1,
    }
}

fn random_tear(rng: &mut Rng, op: &Op) -> Landing {
    let n = sectors(op);
    if n <= 1 || matches!(op, Op::Extend { .. }) {
        return Landing::Whole;
    }
    let mut keep: Vec<bool> = (0..n).map(|_| rng.next_u64() & 1 == 1).collect();
    // A tear keeps some sectors and loses others; make sure it is one.
    keep[0] = true;
    keep[n - 1] = false;
    Landing::Sectors(keep)
}

/// Calls `f` with crash states built from `log`: for every window between two syncs, the
/// state with nothing unsynced landed, with everything landed, and — up to about `max_states`
/// in all, spread over the windows — states with one change dropped, a torn prefix, random
/// subsets and random reorders with tears. Deterministic for a given `seed`.
pub fn for_each_state(log: &[Op], max_states: usize, seed: u64, f: &mut dyn FnMut(CrashState)) {
    let syncs: Vec<usize> = log.iter().enumerate().filter(|(_, o)| **o == Op::Sync).map(|(i, _)| i).collect();
    // Window w: the changes after sync w-1 (or the start) up to sync w (or the end).
    let mut windows: Vec<(usize, usize, usize)> = Vec::new(); // (first op, end op, durable)
    let mut start = 0;
    for &s in &syncs {
        windows.push((start, s, start));
        start = s + 1;
    }
    windows.push((start, log.len(), start));
    let busy: Vec<&(usize, usize, usize)> = windows.iter().filter(|(a, b, _)| b > a).collect();
    let extra_per_window = (max_states.saturating_sub(2 * busy.len()) / busy.len().max(1)).max(1);
    let mut rng = Rng::new(seed);
    let mut base: Vec<u8> = Vec::new();
    let mut applied = 0;
    for &(first, end, durable) in &windows {
        while applied < first {
            apply(&mut base, &log[applied], &Landing::Whole);
            applied += 1;
        }
        let ops: Vec<usize> = (first..end).filter(|&i| log[i] != Op::Sync).collect();
        let cut = Cut { durable, horizon: end };
        let emit = |f: &mut dyn FnMut(CrashState), variant: Variant, plan: &[(usize, Landing)], describe: String| {
            let mut image = base.clone();
            for (i, how) in plan {
                apply(&mut image, &log[*i], how);
            }
            f(CrashState { image, cut, variant, describe });
        };
        if ops.is_empty() {
            continue;
        }
        emit(f, Variant::NoneLanded, &[], format!("ops {first}..{end}: none landed"));
        let all: Vec<(usize, Landing)> = ops.iter().map(|&i| (i, Landing::Whole)).collect();
        emit(f, Variant::AllInOrder, &all, format!("ops {first}..{end}: all landed in order"));
        let mut budget = extra_per_window;
        // Each single change dropped (spread over the window when there are many).
        let drops = ops.len().min(budget.div_ceil(3).max(1));
        for d in 0..drops {
            let skip = ops[d * ops.len() / drops];
            let plan: Vec<(usize, Landing)> =
                ops.iter().filter(|&&i| i != skip).map(|&i| (i, Landing::Whole)).collect();
            emit(f, Variant::OneDropped, &plan, format!("ops {first}..{end}: all but op {skip} landed"));
            budget = budget.saturating_sub(1);
        }
        // A prefix in order, the next write torn.
        if budget > 0 {
            let k = rng.below(ops.len());
            let mut plan: Vec<(usize, Landing)> = ops[..k].iter().map(|&i| (i, Landing::Whole)).collect();
            let tear = random_tear(&mut rng, &log[ops[k]]);
            plan.push((ops[k], tear));
            emit(f, Variant::TornPrefix, &plan, format!("ops {first}..{end}: prefix to op {} torn", ops[k]));
            budget -= 1;
        }
        // Random subsets, in order and reordered with tears.
        let mut n = 0;
        while budget > 0 {
            let reorder = n % 2 == 1;
            n += 1;
            budget -= 1;
            let mut plan: Vec<(usize, Landing)> = Vec::new();
            for &i in &ops {
                if rng.next_u64() & 1 == 1 {
                    let how =
                        if reorder && rng.below(4) == 0 { random_tear(&mut rng, &log[i]) } else { Landing::Whole };
                    plan.push((i, how));
                }
            }
            if reorder {
                for a in (1..plan.len()).rev() {
                    let b = rng.below(a + 1);
                    plan.swap(a, b);
                }
            }
            let order: Vec<String> = plan
                .iter()
                .map(|(i, how)| if matches!(how, Landing::Whole) { format!("{i}") } else { format!("{i}~") })
                .collect();
            let variant = if reorder { Variant::Reordered } else { Variant::Subset };
            emit(f, variant, &plan, format!("ops {first}..{end}: landed [{}]", order.join(" ")));
        }
    }
}

/// The position of the last sync at or before `pos` (exclusive of `pos` itself), if any.
pub fn last_sync_before(log: &[Op], pos: usize) -> Option<usize> {
    log[..pos.min(log.len())].iter().rposition(|o| *o == Op::Sync)
}
