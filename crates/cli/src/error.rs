//! Exit codes, and the error a command fails with: a message that says what went wrong and
//! what to do, and the exit code it maps to.

use blockstore::StoreError;
use vdi::VdiError;

/// Success.
pub const EXIT_OK: i32 = 0;
/// The answer is "no": `validate` found a difference, `check` found problems.
pub const EXIT_NO: i32 = 1;
/// A usage or user error: unknown VDI or snapshot, name taken, image too large, bad size,
/// store locked, not a store… The command can be fixed by the user.
pub const EXIT_USER: i32 = 2;
/// A failure of the store or the system: damaged store, full store, I/O error.
pub const EXIT_FAILURE: i32 = 3;
/// The output's reader went away (broken pipe): 128 + SIGPIPE, as a tool killed by the signal
/// exits, without a message.
pub const EXIT_BROKEN_PIPE: i32 = 141;

const DAMAGE_HINT: &str =
    "`vdi check` shows the extent of the damage if the store still opens; restore it from a backup";

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Exit code: [`EXIT_USER`] or [`EXIT_FAILURE`].
    pub code: i32,
    /// What went wrong and what to do, in words.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl Failure {
    /// A user error (exit 2).
    pub fn user(message: impl Into<String>) -> Failure {
        Failure { code: EXIT_USER, message: message.into() }
    }

    /// A store or system failure (exit 3).
    pub fn system(message: impl Into<String>) -> Failure {
        Failure { code: EXIT_FAILURE, message: message.into() }
    }

    /// The same failure with `context: ` put in front of the message.
    pub fn context(mut self, context: impl std::fmt::Display) -> Failure {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The same failure with a sentence appended.
    pub fn hint(mut self, hint: &str) -> Failure {
        self.message = format!("{}; {hint}", self.message);
        self
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        match &e {
            StoreError::Locked { .. } => {
                Failure::user(format!("{e}; wait for it to finish and retry, or pass --wait to queue behind it"))
            }
            StoreError::NotAStore(_) => Failure::user(format!(
                "{e}; check --store (or PARALLAX_STORE), or give the path of a file that does not exist yet to \
                 create a new store"
            )),
            StoreError::UnsupportedVersion { .. } => {
                Failure::user(format!("{e}; use the Parallax release that created this store"))
            }
            StoreError::NoSpace { .. } => Failure::system(format!(
                "{e}; free space with `vdi snap-delete` or `vdi delete`, or move the store to a larger disk \
                 (stores made with `vdi init --max-size` cannot grow past that size)"
            )),
            StoreError::Corrupt { .. } | StoreError::Damaged(_) | StoreError::OutOfRange(_) => {
                Failure::system(format!("the store is damaged: {e}; {DAMAGE_HINT}"))
            }
            StoreError::ReadOnly => Failure::system(format!("{e} (a command that changes it was run read-only)")),
            _ => Failure::system(e.to_string()),
        }
    }
}

impl From<VdiError> for Failure {
    fn from(e: VdiError) -> Failure {
        match e {
            VdiError::Store(s) => s.into(),
            VdiError::Damaged(_) => Failure::system(format!("the store is damaged: {e}; {DAMAGE_HINT}")),
            VdiError::File { .. } => Failure::user(e.to_string()),
            other => Failure::user(other.to_string()),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::system(e.to_string())
    }
}

/// Result of a command: the exit code on success ([`EXIT_OK`] or [`EXIT_NO`]).
pub type CmdResult = Result<i32, Failure>;
