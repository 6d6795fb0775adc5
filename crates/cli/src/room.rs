//! Asking the medium under a store how much room it has, without waiting on it for long. On
//! RADOS the answer is round trips to the monitors, which a sick cluster can hold for the op
//! timeout (a minute); a file system can hang outright (NFS). A question runs on a thread of
//! its own and a command waits [`WAIT`] for it; one still running when the next command asks
//! is waited on again rather than asked twice, so a hung medium costs one thread, not one per
//! command.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

/// How long a command waits for the medium's answer.
pub const WAIT: Duration = Duration::from_secs(5);

/// An answer, or why there is none.
pub type Answer<T> = Result<T, String>;

/// One question to the medium, answered on its thread.
struct Question<T> {
    answer: Mutex<Option<Answer<T>>>,
    answered: Condvar,
}

/// Asks one kind of question of one medium, at most one at a time. A process serves one
/// store, so a `static` of each kind is its only asker.
pub struct Asker<T> {
    running: Mutex<Option<Arc<Question<T>>>>,
}

impl<T: Clone + Send + 'static> Asker<T> {
    /// An asker with no question running.
    pub const fn new() -> Self {
        Asker { running: Mutex::new(None) }
    }

    /// The answer of `ask`, run on a thread of its own (or of the question already running,
    /// which `ask` would repeat), if it comes within `wait`.
    pub fn ask(&'static self, wait: Duration, ask: impl FnOnce() -> Answer<T> + Send + 'static) -> Answer<T> {
        let question = {
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            match &*running {
                Some(q) => q.clone(),
                None => {
                    let q = Arc::new(Question { answer: Mutex::new(None), answered: Condvar::new() });
                    let mine = q.clone();
                    // The thread clears `running` when done; it cannot before the question is
                    // recorded there, as the lock is held until then.
                    std::thread::Builder::new()
                        .name("medium-room".into())
                        .spawn(move || {
                            let answer = ask();
                            *mine.answer.lock().unwrap_or_else(PoisonError::into_inner) = Some(answer);
                            mine.answered.notify_all();
                            self.running.lock().unwrap_or_else(PoisonError::into_inner).take();
                        })
                        .map_err(|e| format!("cannot start a thread to ask the medium: {e}"))?;
                    *running = Some(q.clone());
                    q
                }
            }
        };
        let answer = question.answer.lock().unwrap_or_else(PoisonError::into_inner);
        let (answer, _) =
            question.answered.wait_timeout_while(answer, wait, |a| a.is_none()).unwrap_or_else(PoisonError::into_inner);
        answer.clone().unwrap_or_else(|| Err(format!("the medium did not answer within {} s", wait.as_secs())))
    }
}

impl<T: Clone + Send + 'static> Default for Asker<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_question_that_hangs_is_asked_once_and_times_out_for_everyone() {
        static ASKER: Asker<u32> = Asker::new();
        static ASKED: AtomicUsize = AtomicUsize::new(0);
        let hang = || -> Answer<u32> {
            ASKED.fetch_add(1, Ordering::SeqCst);
            loop {
                std::thread::park();
            }
        };
        for _ in 0..3 {
            let err = ASKER.ask(Duration::from_millis(50), hang).unwrap_err();
            assert!(err.contains("did not answer"), "{err}");
        }
        assert_eq!(ASKED.load(Ordering::SeqCst), 1, "the hung question was asked again");
    }

    #[test]
    fn once_answered_the_next_question_is_asked_anew() {
        static ASKER: Asker<u32> = Asker::new();
        static ASKED: AtomicUsize = AtomicUsize::new(0);
        let count = || Ok(ASKED.fetch_add(1, Ordering::SeqCst) as u32);
        assert_eq!(ASKER.ask(WAIT, count), Ok(0));
        // The thread clears its question just after answering: wait for that, then ask again.
        while ASKER.running.lock().unwrap().is_some() {
            std::thread::yield_now();
        }
        assert_eq!(ASKER.ask(WAIT, count), Ok(1));
    }
}
