//! Polling for a client's next bytes before blocking for them.
//!
//! A request–reply client at queue depth 1 sends its next request a few microseconds after it
//! has the last reply. If the reader blocks in the meantime, its CPU goes idle, and the
//! request then has to wake it — on a virtual machine an interrupt to a halted virtual CPU,
//! which took longer than the request itself on the project's machine (4 KiB writes at QD1
//! ran 5× faster with client and server pinned to one CPU than to two). So before a reader
//! blocks it first tries, for a short while, to read without blocking.
//!
//! The time it polls adapts, much as QEMU's event loop does (`poll-max-ns`): a wait that
//! polling did not cover but that ended within four times the longest poll lets the window
//! grow (from 4 µs, doubling, up to the longest); a longer wait resets it to nothing, so an
//! idle connection does not poll at all. Eight polls of the whole longest window in a row
//! that catch nothing close it for a rest of blocking waits that doubles with each such
//! close, so a client that is just too slow to be caught is not polled for in vain on every
//! request. A daemon-wide count
//! bounds how many readers poll at once (half the CPUs by default), so hundreds of busy
//! connections cannot spend every CPU spinning.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The longest poll unless configured: QEMU's default `poll-max-ns`. On the project's machine
/// 32 µs and 64 µs gave the same figures (4 KiB writes at QD1: 18–19k IOPS, 10k without).
pub const DEFAULT_LONGEST: Duration = Duration::from_micros(32);

/// The longest poll [`InputPolling::new`] takes (a longer one is cut to it): far beyond any
/// useful poll (the daemon allows 1 ms), and far from where four times the longest, which
/// closes an idle connection's window, would overflow and never close it.
pub const MAX_LONGEST: Duration = Duration::from_secs(10);

/// The first window a connection polls for, once its waits have been short.
const FIRST_WINDOW: Duration = Duration::from_micros(4);

/// A blocking wait up to this many times the longest poll lets the window grow; a longer one
/// resets it. Not the longest poll itself: a reader that does not poll lets its CPU go idle,
/// so the wait it measures includes its own wake-up, and a client whose requests would be
/// caught by polling looks slower than the longest poll until the reader does poll.
const GROWS_WITHIN: u32 = 4;

/// How long readers poll before blocking, and how many may poll at once. Clones share the
/// count of readers polling, so every server given the same limits is bounded together.
#[derive(Clone, Debug)]
pub struct InputPolling {
    longest: Duration,
    inner: Arc<Slots>,
}

#[derive(Debug)]
struct Slots {
    max: usize,
    polling: AtomicUsize,
    #[cfg(test)]
    probe: probe::Probe,
}

impl InputPolling {
    /// Readers poll for at most `longest` (capped at [`MAX_LONGEST`]) before they block, at
    /// most `pollers` at once. Either one 0 turns polling off.
    pub fn new(longest: Duration, pollers: usize) -> InputPolling {
        let longest = if pollers == 0 { Duration::ZERO } else { longest.min(MAX_LONGEST) };
        let slots = Slots {
            max: pollers,
            polling: AtomicUsize::new(0),
            #[cfg(test)]
            probe: probe::Probe::default(),
        };
        InputPolling { longest, inner: Arc::new(slots) }
    }

    /// No reader polls: every wait for input blocks at once.
    pub fn off() -> InputPolling {
        InputPolling::new(Duration::ZERO, 0)
    }

    /// The longest a reader polls.
    pub fn longest(&self) -> Duration {
        self.longest
    }

    /// Readers allowed to poll at once.
    pub fn max_pollers(&self) -> usize {
        self.inner.max
    }

    /// One reader's poller, starting with no window.
    pub(crate) fn poller(&self) -> Poller {
        Poller::new(self.clone())
    }

    fn try_start(&self) -> Option<PollSlot<'_>> {
        let slots = &self.inner;
        let slot = slots
            .polling
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < slots.max).then_some(n + 1))
            .ok()
            .map(|_| PollSlot { slots });
        #[cfg(test)]
        if slot.is_some() {
            slots.probe.poll_started();
        }
        slot
    }

    /// What the tests watch and steer of the readers sharing these limits.
    #[cfg(test)]
    pub(crate) fn probe(&self) -> &probe::Probe {
        &self.inner.probe
    }
}

impl Default for InputPolling {
    /// 32 µs (QEMU's default `poll-max-ns`), by half the CPUs — none on a machine with one,
    /// where a polling reader would hold the CPU its client needs to send the next request.
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        InputPolling::new(DEFAULT_LONGEST, cpus / 2)
    }
}

impl PartialEq for InputPolling {
    /// The same settings and the same count of readers polling.
    fn eq(&self, other: &Self) -> bool {
        self.longest == other.longest && Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for InputPolling {}

/// A reader's place among those polling; given back when dropped.
struct PollSlot<'a> {
    slots: &'a Slots,
}

impl Drop for PollSlot<'_> {
    fn drop(&mut self) {
        self.slots.polling.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one poll gave.
pub(crate) enum Polled {
    /// The read done without waiting (bytes, end of stream or an error).
    Read(io::Result<usize>),
    /// Nothing arrived in the window (or the reader did not poll): block for it.
    Block,
}

/// How the last poll ended, for [`Poller::blocked`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LastPoll {
    /// No poll: the window was closed.
    None,
    /// The window was open but every reader allowed to poll was polling.
    NoSlot,
    /// The reader polled its whole window and nothing came.
    Missed,
    /// Something came within the window.
    Caught,
}

/// One reader's adaptive window.
pub(crate) struct Poller {
    polling: InputPolling,
    window: Duration,
    last: LastPoll,
    /// Polls of the whole longest window in a row that caught nothing.
    misses: u32,
    /// Blocking waits to sit out before the window may open again, after it closed on misses.
    rest: u32,
    /// The rest the next close on a miss imposes: doubles with each such close, back to one
    /// once a poll catches something.
    backoff: u32,
}

/// The longest rest after misses, in blocking waits.
const MAX_BACKOFF: u32 = 1024;

/// Polls of the whole longest window in a row that catch nothing before the window closes.
/// Not one: a client at QD1 whose next request is usually caught is sometimes a little late
/// (closing at every miss halved QD1 reads, 40–44k → 25k IOPS, as the window then spent
/// most requests closed or growing again).
const MISSES_TO_CLOSE: u32 = 8;

impl Poller {
    fn new(polling: InputPolling) -> Poller {
        Poller { polling, window: Duration::ZERO, last: LastPoll::None, misses: 0, rest: 0, backoff: 1 }
    }

    /// Reads with `try_read` (a read that does not wait: `None` when nothing has arrived)
    /// until it gives something or the window is over; `Polled::Block` if the reader should
    /// block now. Call [`Poller::blocked`] with the whole wait once the blocking read returns.
    ///
    /// `deadline_in` is the time left before the read's deadline, for the rest of a request
    /// (its payload): the poll then ends by it, and catching those bytes says nothing about
    /// how soon the client sends its next request, so it does not end a run of misses.
    pub(crate) fn poll(
        &mut self,
        deadline_in: Option<Duration>,
        mut try_read: impl FnMut() -> Option<io::Result<usize>>,
    ) -> Polled {
        if self.window.is_zero() {
            self.last = LastPoll::None;
            return self.block();
        }
        let Some(_slot) = self.polling.try_start() else {
            self.last = LastPoll::NoSlot;
            return self.block();
        };
        let window = deadline_in.map_or(self.window, |left| self.window.min(left));
        let began = Instant::now();
        loop {
            if let Some(r) = try_read() {
                self.last = LastPoll::Caught;
                if deadline_in.is_none() {
                    self.misses = 0;
                    self.backoff = 1;
                }
                return Polled::Read(r);
            }
            if began.elapsed() >= window {
                self.last = LastPoll::Missed;
                return self.block();
            }
            std::hint::spin_loop();
        }
    }

    /// Declines to poll this once (the reader knows nothing useful can come yet); the wait
    /// that follows still goes to [`Poller::blocked`], as one without a poll.
    pub(crate) fn not_now(&mut self) -> Polled {
        // A reader turned away by the count is still not polling (see `polls`).
        if self.last != LastPoll::NoSlot {
            self.last = LastPoll::None;
        }
        self.block()
    }

    /// Tells the reader to block now.
    fn block(&self) -> Polled {
        #[cfg(test)]
        self.polling.inner.probe.blocking();
        Polled::Block
    }

    /// Adapts the window to a wait that polling did not cover (`waited`: from the start of the
    /// poll to the end of the blocking read).
    ///
    /// - A wait over four times the longest poll (an idle client) closes the window.
    /// - Eight misses in a row with the window at its longest close it too, and it stays
    ///   closed for a rest of blocking waits that doubles with each such close (up to 1,024)
    ///   until a poll catches something: a client whose requests come a little too late to
    ///   be caught (over a network, say) is not polled for in vain every time.
    /// - Otherwise a short wait opens the window (4 µs) or doubles it, up to the longest.
    pub(crate) fn blocked(&mut self, waited: Duration) {
        #[cfg(test)]
        let waited = waited + self.polling.inner.probe.read_returned();
        let longest = self.polling.longest;
        if waited > longest.saturating_mul(GROWS_WITHIN) {
            self.window = Duration::ZERO;
        } else if self.last == LastPoll::Missed && self.window >= longest {
            self.misses += 1;
            if self.misses >= MISSES_TO_CLOSE {
                self.window = Duration::ZERO;
                self.misses = 0;
                self.rest = self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        } else if self.rest > 0 {
            self.rest -= 1;
        } else if self.window.is_zero() {
            self.window = FIRST_WINDOW.min(longest);
        } else {
            self.window = self.window.saturating_mul(2).min(longest);
        }
    }

    /// True if the reader is polling for the client's next request: its window is open and
    /// its last poll was not turned away by the daemon-wide count.
    pub(crate) fn polls(&self) -> bool {
        !self.window.is_zero() && self.last != LastPoll::NoSlot
    }

    /// The current window (for tests).
    #[cfg(test)]
    pub(crate) fn window(&self) -> Duration {
        self.window
    }
}

/// What tests watch and steer in the readers that share one [`InputPolling`], so that they
/// wait on events instead of sleeping.
#[cfg(test)]
pub(crate) mod probe {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use parking_lot::{Condvar, Mutex};

    #[derive(Debug, Default)]
    pub(crate) struct Probe {
        /// Polls begun.
        started: AtomicUsize,
        /// True from a reader's decision to block (after its poll, or without one) until its
        /// blocking read returns.
        blocking: Mutex<bool>,
        changed: Condvar,
        /// Added to the next wait a reader measures: a client idle that long.
        idle: Mutex<Duration>,
    }

    impl Probe {
        pub(super) fn poll_started(&self) {
            self.started.fetch_add(1, Ordering::Relaxed);
        }

        pub(super) fn blocking(&self) {
            *self.blocking.lock() = true;
            self.changed.notify_all();
        }

        /// The blocking read returned: what to add to the wait it measured.
        pub(super) fn read_returned(&self) -> Duration {
            *self.blocking.lock() = false;
            std::mem::take(&mut *self.idle.lock())
        }

        /// Polls begun so far.
        pub(crate) fn polls_started(&self) -> usize {
            self.started.load(Ordering::Relaxed)
        }

        /// Waits until a reader has decided to block (its poll, if any, is over).
        pub(crate) fn wait_until_a_reader_blocks(&self) {
            let mut blocking = self.blocking.lock();
            while !*blocking {
                let timed_out = self.changed.wait_for(&mut blocking, Duration::from_secs(5)).timed_out();
                assert!(!timed_out || *blocking, "no reader came to block within 5 s");
            }
        }

        /// The next wait a reader measures counts as `idle` longer, as if the client had sat
        /// idle that long before it sent its next request.
        pub(crate) fn pretend_idle(&self, idle: Duration) {
            *self.idle.lock() = idle;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_grows_with_short_waits_and_resets_after_a_long_one() {
        let polling = InputPolling::new(Duration::from_micros(32), 1);
        let mut p = polling.poller();
        assert_eq!(p.window(), Duration::ZERO);
        let short = Duration::from_micros(10);
        let seen: Vec<u128> = (0..5)
            .map(|_| {
                p.blocked(short);
                p.window().as_micros()
            })
            .collect();
        assert_eq!(seen, [4, 8, 16, 32, 32]);
        // A wait a little longer than the longest poll still counts as short: the reader's own
        // wake-up is in it.
        p.blocked(Duration::from_micros(100));
        assert_eq!(p.window(), Duration::from_micros(32));
        p.blocked(Duration::from_micros(129));
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn an_idle_reader_does_not_poll() {
        let polling = InputPolling::new(Duration::from_micros(32), 1);
        let mut p = polling.poller();
        let mut tries = 0;
        assert!(matches!(
            p.poll(None, || {
                tries += 1;
                None
            }),
            Polled::Block
        ));
        assert_eq!(tries, 0, "a window of nothing tries no read");
    }

    #[test]
    fn a_poll_returns_what_arrives_within_the_window() {
        let polling = InputPolling::new(Duration::from_secs(5), 1);
        let mut p = polling.poller();
        // Open the window to its longest (5 s), so no pause of this thread can outlast it.
        for _ in 0..30 {
            p.blocked(Duration::ZERO);
        }
        assert_eq!(p.window(), Duration::from_secs(5));
        let mut tries = 0;
        let got = p.poll(None, || {
            tries += 1;
            (tries == 3).then_some(Ok(7))
        });
        assert!(matches!(got, Polled::Read(Ok(7))));
        assert_eq!(tries, 3);
    }

    #[test]
    fn no_more_readers_poll_at_once_than_allowed() {
        let polling = InputPolling::new(Duration::from_secs(5), 1);
        let mut first = polling.poller();
        let mut second = polling.poller();
        first.blocked(Duration::ZERO);
        second.blocked(Duration::ZERO);
        let mut second_tries = 0;
        // While the first polls, the second finds no place and blocks at once.
        let got = first.poll(None, || {
            let r = second.poll(None, || {
                second_tries += 1;
                None
            });
            assert!(matches!(r, Polled::Block));
            Some(Ok(1))
        });
        assert!(!second.polls(), "a reader turned away by the count does not count as polling");
        // Nor after a wait it was not to poll for: only its next poll can give it a place.
        second.not_now();
        second.blocked(Duration::ZERO);
        assert!(!second.polls(), "a wait without a poll gave a turned-away reader a place");
        assert!(matches!(got, Polled::Read(Ok(1))));
        assert_eq!(second_tries, 0, "the second reader polled beside the first");
        // Once the first is done its place is free again.
        let got = second.poll(None, || Some(Ok(2)));
        assert!(matches!(got, Polled::Read(Ok(2))));
    }

    #[test]
    fn misses_at_the_longest_window_close_it_for_a_rest_that_doubles_until_a_catch() {
        let longest = Duration::from_micros(20);
        let polling = InputPolling::new(longest, 1);
        let mut p = polling.poller();
        let short = Duration::from_micros(5);
        let open = |p: &mut Poller| {
            while p.window() < longest {
                p.blocked(short);
            }
        };
        let miss = |p: &mut Poller| {
            assert!(matches!(p.poll(None, || None), Polled::Block));
            p.blocked(Duration::from_micros(30));
        };
        let misses = |p: &mut Poller| {
            for n in 1..MISSES_TO_CLOSE {
                miss(p);
                assert_eq!(p.window(), longest, "still open after {n} misses");
            }
            miss(p);
        };
        // Closed waits until the window opens again, for rests of 1, 2, 4.
        let mut rests = Vec::new();
        for _ in 0..3 {
            open(&mut p);
            misses(&mut p);
            assert_eq!(p.window(), Duration::ZERO);
            let mut closed = 0;
            while p.window().is_zero() {
                p.blocked(short);
                closed += 1;
            }
            rests.push(closed - 1);
        }
        assert_eq!(rests, [1, 2, 4]);
        // A catch brings the rest back to one, and starts the count of misses again.
        open(&mut p);
        for _ in 1..MISSES_TO_CLOSE {
            miss(&mut p);
        }
        assert!(matches!(p.poll(None, || Some(Ok(1))), Polled::Read(Ok(1))));
        misses(&mut p);
        let mut closed = 0;
        while p.window().is_zero() {
            p.blocked(short);
            closed += 1;
        }
        assert_eq!(closed - 1, 1);
        // A miss below the longest window only lets it grow.
        let polling = InputPolling::new(longest, 1);
        let mut p = polling.poller();
        p.blocked(short);
        miss(&mut p);
        assert_eq!(p.window(), Duration::from_micros(8));
    }

    #[test]
    fn a_payloads_bytes_caught_do_not_end_a_run_of_misses() {
        // A client whose next request always comes too late but whose payloads are caught at
        // once is still stopped being polled for.
        let longest = Duration::from_micros(20);
        let polling = InputPolling::new(longest, 1);
        let mut p = polling.poller();
        while p.window() < longest {
            p.blocked(Duration::from_micros(5));
        }
        let mut misses = 0;
        while !p.window().is_zero() {
            assert!(matches!(p.poll(None, || None), Polled::Block));
            p.blocked(Duration::from_micros(50));
            misses += 1;
            if misses > MISSES_TO_CLOSE {
                break;
            }
            if !p.window().is_zero() {
                let payload = p.poll(Some(Duration::from_secs(60)), || Some(Ok(1)));
                assert!(matches!(payload, Polled::Read(Ok(1))));
            }
        }
        assert_eq!(misses, MISSES_TO_CLOSE);
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn a_poll_ends_by_the_reads_deadline() {
        let polling = InputPolling::new(Duration::from_secs(5), 1);
        let mut p = polling.poller();
        while p.window() < Duration::from_secs(5) {
            p.blocked(Duration::from_micros(1));
        }
        let began = Instant::now();
        assert!(matches!(p.poll(Some(Duration::from_millis(5)), || None), Polled::Block));
        assert!(began.elapsed() < Duration::from_secs(1), "polled {:?} past a 5 ms deadline", began.elapsed());
    }

    #[test]
    fn the_longest_poll_is_bounded_so_an_idle_wait_still_closes_the_window() {
        let polling = InputPolling::new(Duration::MAX, 1);
        assert_eq!(polling.longest(), MAX_LONGEST);
        let mut p = polling.poller();
        for _ in 0..40 {
            p.blocked(Duration::from_micros(10));
        }
        assert_eq!(p.window(), MAX_LONGEST);
        p.blocked(Duration::from_secs(3600));
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn polling_off_never_polls() {
        let polling = InputPolling::off();
        let mut p = polling.poller();
        p.blocked(Duration::ZERO);
        assert_eq!(p.window(), Duration::ZERO);
        assert!(matches!(p.poll(None, || Some(Ok(1))), Polled::Block));
    }
}
