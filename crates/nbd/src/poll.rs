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
//! idle connection does not poll at all and a busy one polls at most the longest poll. A daemon-wide count
//! bounds how many readers poll at once (half the CPUs by default), so hundreds of busy
//! connections cannot spend every CPU spinning.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The longest poll unless configured: QEMU's default `poll-max-ns`. On the project's machine
/// 32 µs and 64 µs gave the same figures (4 KiB writes at QD1: 18–19k IOPS, 10k without).
pub const DEFAULT_LONGEST: Duration = Duration::from_micros(32);

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
}

impl InputPolling {
    /// Readers poll for at most `longest` before they block, at most `pollers` at once.
    /// Either one 0 turns polling off.
    pub fn new(longest: Duration, pollers: usize) -> InputPolling {
        let longest = if pollers == 0 { Duration::ZERO } else { longest };
        InputPolling { longest, inner: Arc::new(Slots { max: pollers, polling: AtomicUsize::new(0) }) }
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
        Poller { polling: self.clone(), window: Duration::ZERO }
    }

    fn try_start(&self) -> Option<PollSlot<'_>> {
        let slots = &self.inner;
        slots
            .polling
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < slots.max).then_some(n + 1))
            .ok()
            .map(|_| PollSlot { slots })
    }
}

impl Default for InputPolling {
    /// 32 µs (QEMU's default `poll-max-ns`), by half the CPUs (at least one).
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        InputPolling::new(DEFAULT_LONGEST, (cpus / 2).max(1))
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

/// One reader's adaptive window.
pub(crate) struct Poller {
    polling: InputPolling,
    window: Duration,
}

impl Poller {
    /// Reads with `try_read` (a read that does not wait: `None` when nothing has arrived)
    /// until it gives something or the window is over; `Polled::Block` if the reader should
    /// block now. Call [`Poller::blocked`] with the whole wait once the blocking read returns.
    pub(crate) fn poll(&mut self, mut try_read: impl FnMut() -> Option<io::Result<usize>>) -> Polled {
        if self.window.is_zero() {
            return Polled::Block;
        }
        let Some(_slot) = self.polling.try_start() else {
            return Polled::Block;
        };
        let began = Instant::now();
        loop {
            if let Some(r) = try_read() {
                return Polled::Read(r);
            }
            if began.elapsed() >= self.window {
                return Polled::Block;
            }
            std::hint::spin_loop();
        }
    }

    /// Adapts the window to a wait that polling did not cover (`waited`: from the start of the
    /// poll to the end of the blocking read).
    pub(crate) fn blocked(&mut self, waited: Duration) {
        let longest = self.polling.longest;
        self.window = if waited > longest * GROWS_WITHIN {
            Duration::ZERO
        } else if self.window.is_zero() {
            FIRST_WINDOW.min(longest)
        } else {
            (self.window * 2).min(longest)
        };
    }

    /// True if the reader polls before its next blocking read.
    pub(crate) fn polls(&self) -> bool {
        !self.window.is_zero()
    }

    /// The current window (for tests).
    #[cfg(test)]
    pub(crate) fn window(&self) -> Duration {
        self.window
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
            p.poll(|| {
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
        p.blocked(Duration::ZERO);
        p.blocked(Duration::ZERO);
        let mut tries = 0;
        let got = p.poll(|| {
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
        let got = first.poll(|| {
            let r = second.poll(|| {
                second_tries += 1;
                None
            });
            assert!(matches!(r, Polled::Block));
            Some(Ok(1))
        });
        assert!(matches!(got, Polled::Read(Ok(1))));
        assert_eq!(second_tries, 0, "the second reader polled beside the first");
        // Once the first is done its place is free again.
        let got = second.poll(|| Some(Ok(2)));
        assert!(matches!(got, Polled::Read(Ok(2))));
    }

    #[test]
    fn polling_off_never_polls() {
        let polling = InputPolling::off();
        let mut p = polling.poller();
        p.blocked(Duration::ZERO);
        assert_eq!(p.window(), Duration::ZERO);
        assert!(matches!(p.poll(|| Some(Ok(1))), Polled::Block));
    }
}
