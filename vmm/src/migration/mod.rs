//! Live migration: pre-copy over TCP or a Unix socket, guarded by the guest
//! ABI, with the snapshot's header and state sections on the wire.
//!
//! The source ([`send`]) connects and sends the header (machine type, full
//! ABI manifest, configuration). The destination ([`receive`]) builds the
//! manifest it would give that machine type with its host-side overrides,
//! and refuses with the field diff before any memory moves. Then pre-copy:
//! a first pass over populated memory, then passes over the pages dirtied
//! meanwhile (KVM's dirty log plus the dirty bitmaps of Abide's own device
//! writes) until what is left fits the downtime limit at the measured
//! bandwidth. Stop-and-copy pauses vCPUs and device workers, flushes the
//! disks and sends the last pages and all state; the destination loads it
//! and answers *ready*, the source answers *commit*, and only then does the
//! destination resume the guest, while the source exits.
//!
//! Failure before *commit* leaves the source as it was, running; the
//! destination exits without having run the guest. A link that dies after
//! *commit* leaves the source paused: only the operator knows whether the
//! destination runs the guest.

pub mod announce;
pub mod client;
pub mod endpoint;
pub mod incoming;
pub mod job;
pub mod receive;
pub mod send;
pub mod wire;

use std::time::Duration;

use serde::Serialize;

pub use endpoint::Endpoint;
pub use job::Job;
pub use receive::{receive, Incoming, ReceiveOptions};
pub use send::{send, SendError, SendOptions};

/// How long connecting to the destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for any single read or write on the stream.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit on the time the guest is paused (QEMU's default).
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(300);
/// Default bound on the whole migration.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Pre-copy passes after which a migration that does not converge fails.
pub const MAX_PASSES: u32 = 30;
/// Pre-copy passes after which a migration whose last pages fit the
/// downtime limit stops, even if each pass still shrinks them.
pub const SOFT_PASSES: u32 = 8;
/// Dirty pages few enough to stop pre-copy at once (within the limit).
pub const FEW_PAGES: u64 = 64;

/// Whether pre-copy stops now and the guest is paused, after pass `passes`
/// left `dirty` pages (the pass before left `before`, if there was one)
/// whose copy is estimated at `estimate`.
///
/// Fitting the limit is not enough: the limit is a bound, not the aim.
/// The first pass takes longest, so the pages it leaves dirty are many;
/// each further pass is shorter and leaves fewer. Pre-copy goes on while a
/// pass shrinks the dirty set by a quarter or more, and stops (within the
/// limit) once it no longer does, once few pages are left, or after
/// [`SOFT_PASSES`] passes.
pub fn converged(
    estimate: Duration,
    limit: Duration,
    dirty: u64,
    before: Option<u64>,
    passes: u32,
) -> bool {
    if estimate > limit {
        return false;
    }
    if dirty <= FEW_PAGES || passes >= SOFT_PASSES {
        return true;
    }
    match before {
        // Shrank by less than a quarter: another pass would not pay.
        Some(before) => dirty.saturating_mul(4) > before.saturating_mul(3),
        None => false,
    }
}

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// No connection.
    #[error("cannot connect to the destination at {to}")]
    Connect {
        /// Address.
        to: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Cannot listen.
    #[error("cannot listen for a migration on {at}")]
    Listen {
        /// Address.
        at: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The stream failed.
    #[error("the migration stream failed while {phase}: {source}{}", peer_said(.peer))]
    Stream {
        /// What was going on.
        phase: &'static str,
        /// Cause.
        source: wire::WireError,
        /// What the peer reported before the stream broke, if anything.
        peer: Option<String>,
    },
    /// The destination refused the guest.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// The destination cannot read what this guest's state needs.
    #[error("the destination cannot take this guest: {0}")]
    Target(String),
    /// The destination failed after accepting.
    #[error("the destination failed: {0}")]
    Destination(String),
    /// The source gave up.
    #[error("the source abandoned the migration: {0}")]
    SourceAborted(String),
    /// The incoming guest's ABI differs from what this Abide gives it.
    #[error("the incoming guest's ABI differs from what this Abide ({}) gives machine '{machine}' with its configuration and the overrides given here; refusing the migration. Differences (source -> here):\n{}", env!("CARGO_PKG_VERSION"), crate::snapshot::format_diff(.diffs))]
    AbiMismatch {
        /// Machine type.
        machine: String,
        /// Field-by-field differences.
        diffs: Vec<crate::manifest::Difference>,
    },
    /// Pre-copy did not converge within its limits.
    #[error("the guest dirties memory faster than it can be sent: dirty rate {dirty_mib_s:.1} MiB/s, bandwidth {bandwidth_mib_s:.1} MiB/s; {remaining_mib:.1} MiB still dirty after {passes} passes in {elapsed_s:.1} s ({limit}). Migration abandoned; the guest keeps running here")]
    NoConvergence {
        /// Last measured dirty rate.
        dirty_mib_s: f64,
        /// Measured bandwidth.
        bandwidth_mib_s: f64,
        /// Dirty memory left.
        remaining_mib: f64,
        /// Passes made.
        passes: u32,
        /// Time spent.
        elapsed_s: f64,
        /// Which limit ended it.
        limit: String,
    },
    /// The whole migration took too long.
    #[error("the migration did not finish within {0} s (--timeout); the guest keeps running here")]
    Timeout(u64),
    /// The guest ended (poweroff, reset) as the migration paused it.
    #[error("the guest ended ({0}) before it could be moved")]
    GuestEnded(String),
    /// Cancelled through the API (quit).
    #[error("the migration was cancelled")]
    Cancelled,
    /// `abide migrate`: the migration did not move the guest.
    #[error("migration {status}: {error}")]
    Failed {
        /// `failed` or `unconfirmed`.
        status: String,
        /// Why.
        error: String,
    },
    /// A migration is already running.
    #[error("a migration is already in progress")]
    Busy,
    /// Guest memory.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Building, pausing or reading the VM, or loading state into it.
    #[error(transparent)]
    Vm(Box<crate::Error>),
}

fn peer_said(peer: &Option<String>) -> String {
    match peer {
        Some(p) => format!(" (the peer reported: {p})"),
        None => String::new(),
    }
}

impl From<crate::Error> for MigrationError {
    fn from(e: crate::Error) -> Self {
        MigrationError::Vm(Box::new(e))
    }
}

impl From<crate::snapshot::RestoreError> for MigrationError {
    fn from(e: crate::snapshot::RestoreError) -> Self {
        MigrationError::Vm(Box::new(crate::Error::Snapshot(e)))
    }
}

/// One pre-copy pass, as the progress callback and the API see it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Progress {
    /// Pass number (0 is the first pass over all populated memory).
    pub iteration: u32,
    /// Pages sent in this pass (zero pages included).
    pub pages: u64,
    /// Dirty pages found when the pass started.
    pub dirty_pages: u64,
    /// Guest dirty rate measured before this pass, MiB/s.
    pub dirty_rate_mib_s: f64,
    /// Bandwidth measured so far, MiB/s.
    pub bandwidth_mib_s: f64,
    /// Bytes sent so far.
    pub bytes: u64,
    /// Time since the migration started.
    pub elapsed_ms: f64,
}

/// What a completed migration did, as `abide migrate` prints it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// `migrated`.
    pub status: &'static str,
    /// From the source pausing the guest to the destination's word that
    /// it runs the guest (the source's view).
    pub downtime_ms: f64,
    /// The destination's view: the source's pause time up to *commit*
    /// plus its own time from *commit* to running the guest.
    pub destination_downtime_ms: f64,
    /// Whole migration, from connecting to the destination's word.
    pub total_ms: f64,
    /// Pre-copy passes after the first.
    pub iterations: u32,
    /// Bytes sent.
    pub bytes: u64,
    /// Pages sent (zero pages included).
    pub pages_sent: u64,
    /// Pages sent more than once.
    pub pages_resent: u64,
    /// Pages sent while the guest was paused.
    pub final_pages: u64,
    /// Where the guest went.
    pub to: String,
    /// Where the time went, in ms: pre-copy (reading guest memory, and
    /// hashing and sending it), and the stop-and-copy steps on the source
    /// (pause, flush, last pages, state, waiting for *ready*, waiting for
    /// the guest to run at the destination) and on the destination (loading
    /// the state, from *commit* to running).
    pub phases: serde_json::Map<String, serde_json::Value>,
}

/// The test-only fault hook: `ABIDE_TEST_MIGRATION_FAULT` makes the
/// destination kill itself at a fixed point (`kill-during-memory`: at the
/// second page frame; `kill-during-state`: at the first state section;
/// `kill-after-commit`: right after reading *commit*), so the tests can
/// check what the source does when the destination dies in each phase.
/// Documented in the README as for tests only.
pub(crate) fn fault(phase: &str) {
    if std::env::var("ABIDE_TEST_MIGRATION_FAULT").is_ok_and(|v| v == phase) {
        eprintln!("abide: test fault hook: dying {phase}");
        // SAFETY: kill(2) on our own pid with a valid signal number.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// MiB/s from bytes and seconds.
pub(crate) fn mib_s(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    bytes as f64 / (1024.0 * 1024.0) / secs
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn pre_copy_goes_on_while_passes_shrink_the_dirty_set() {
        let limit = MS(300);
        // Over the limit: never stop here (the caller fails or goes on).
        assert!(!converged(MS(301), limit, 10, Some(1000), 20));
        // Within the limit after the first, long pass: one more pass.
        assert!(!converged(MS(100), limit, 5000, None, 0));
        // Shrinking by a quarter or more: go on.
        assert!(!converged(MS(50), limit, 700, Some(1000), 1));
        // Shrinking by less: stop.
        assert!(converged(MS(50), limit, 800, Some(1000), 1));
        // Growing: stop.
        assert!(converged(MS(50), limit, 1200, Some(1000), 1));
        // Few pages left, or enough passes: stop.
        assert!(converged(MS(1), limit, FEW_PAGES, None, 0));
        assert!(converged(MS(50), limit, 100, Some(1000), SOFT_PASSES));
        // A paused guest dirties nothing.
        assert!(converged(MS(0), limit, 0, None, 0));
    }
}
