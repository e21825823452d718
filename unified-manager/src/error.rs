//! The manager's errors.

use std::path::PathBuf;

/// What can go wrong in the manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A byte-tier operation failed.
    #[error(transparent)]
    Bytes(#[from] byte_tier::Error),
    /// A memory-tier operation failed.
    #[error(transparent)]
    Memory(#[from] memory_tier::Error),
    /// The server could not be reached or refused a change.
    #[error("server: {0}")]
    Server(String),
    /// No model is attached under this handle.
    #[error("no model is attached as #{0}")]
    NotAttached(u32),
    /// A preset or configuration document is invalid; `field` is the path to the value
    /// at fault (`memory_patch[0].transform`).
    #[error("{document}: field `{field}`: {message}")]
    Invalid {
        /// The document (a file or a preset name).
        document: String,
        /// The path of the field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// No preset has this name.
    #[error("no preset named {0:?}")]
    NoSuchPreset(String),
    /// A change failed, and undoing what had been done before it failed too: the error a
    /// user most needs to see, since something is left half-applied.
    #[error("{error}; rolling back what was already done also failed: {}", rollback.join("; "))]
    RollbackFailed {
        /// What failed first.
        error: Box<Error>,
        /// Each undo step that failed, with why.
        rollback: Vec<String>,
    },
    /// A preset's or pipeline's request cannot be carried out as asked.
    #[error("{0}")]
    Refused(String),
    /// The etcd cluster could not be reached, or refused a call.
    #[error("etcd at {endpoints}: {message}")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// What went wrong.
        message: String,
    },
    /// A fleet's state in etcd is not what this version writes (edited by hand, or by
    /// another version); nothing was changed.
    #[error("fleet {fleet:?}: malformed {key}: {message}; nothing was changed")]
    FleetState {
        /// The fleet.
        fleet: String,
        /// The key at fault.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A fleet operation was refused before anything changed (no members, members with
    /// different models, a rollout already in flight, an unknown rollout).
    #[error("fleet {fleet:?}: {message}")]
    FleetRefused {
        /// The fleet.
        fleet: String,
        /// Why.
        message: String,
    },
    /// Another rollout of the fleet is in flight.
    #[error("fleet {fleet:?}: rollout {rollout} is in flight (phase {phase}); nothing was changed")]
    RolloutInFlight {
        /// The fleet.
        fleet: String,
        /// The rollout in flight.
        rollout: String,
        /// Its phase.
        phase: String,
    },
    /// A rollout was aborted: no replica changed.
    #[error("fleet {fleet:?}: rollout {rollout} aborted: {reason}; no replica changed")]
    RolloutAborted {
        /// The fleet.
        fleet: String,
        /// The rollout.
        rollout: String,
        /// Why (a refusal with the member's reason, a member gone, the deadline).
        reason: String,
    },
    /// A rolling rollout stopped (a failed health check, a member that did not apply in
    /// time or left) and the members that had applied took the change back out.
    #[error(
        "fleet {fleet:?}: rolling rollout {rollout} stopped and rolled back: {reason}; {}",
        rollback_summary(reverted, pending)
    )]
    RolloutRolledBack {
        /// The fleet.
        fleet: String,
        /// The rollout.
        rollout: String,
        /// Why it stopped.
        reason: String,
        /// Members that had applied and reverted.
        reverted: Vec<String>,
        /// Members that had applied and had not reverted when the wait ended (they do
        /// when they converge).
        pending: Vec<String>,
    },
    /// A file could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Error {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(
        document: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Error {
        Error::Invalid {
            document: document.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The manager's result type.
pub type Result<T> = std::result::Result<T, Error>;

fn rollback_summary(reverted: &[String], pending: &[String]) -> String {
    let mut text = if reverted.is_empty() {
        "no replica had applied it".to_owned()
    } else {
        format!("reverted on {}", reverted.join(", "))
    };
    if !pending.is_empty() {
        text.push_str(&format!(
            "; {} still hold it and revert when they converge",
            pending.join(", ")
        ));
    }
    text
}
