//! Saving and restoring device state for snapshots.
//!
//! Each device owns its state type, versioned, in its own module. Restore
//! accepts any version up to the device's current one and refuses newer
//! ones. A device that cannot save its state says so with an error: nothing
//! is silently skipped.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors saving or restoring device state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// State written by a newer device model.
    #[error("{device}: state version {found} is newer than this Abide's {supported}")]
    NewerVersion {
        /// Device kind.
        device: &'static str,
        /// Version found.
        found: u32,
        /// Newest supported.
        supported: u32,
    },
    /// State bytes that do not parse.
    #[error("{device}: state does not parse: {reason}")]
    Malformed {
        /// Device kind.
        device: &'static str,
        /// Why.
        reason: String,
    },
    /// State that parses but cannot be applied.
    #[error("{device}: state is invalid: {reason}")]
    Invalid {
        /// Device kind.
        device: &'static str,
        /// Why.
        reason: String,
    },
}

/// A device whose guest-visible state can be saved and restored.
pub trait Persist {
    /// Device kind, used in errors and section names.
    const KIND: &'static str;
    /// Current version of [`Persist::State`].
    const VERSION: u32;
    /// The saved state.
    type State: Serialize + DeserializeOwned;

    /// Captures the state. The device must be quiescent (vCPUs paused).
    fn save(&self) -> Self::State;

    /// Applies a state saved with version `version` (at most [`Persist::VERSION`]).
    fn restore(&mut self, version: u32, state: Self::State) -> Result<(), PersistError>;

    /// Saves as a versioned JSON section payload.
    fn save_section(&self) -> (u32, Vec<u8>) {
        // Serializing plain data structs to a Vec cannot fail.
        let bytes = serde_json::to_vec(&self.save()).unwrap_or_default();
        (Self::VERSION, bytes)
    }

    /// Restores from a section payload written by [`Persist::save_section`].
    fn restore_section(&mut self, version: u32, bytes: &[u8]) -> Result<(), PersistError> {
        if version > Self::VERSION {
            return Err(PersistError::NewerVersion {
                device: Self::KIND,
                found: version,
                supported: Self::VERSION,
            });
        }
        let state = serde_json::from_slice(bytes).map_err(|e| PersistError::Malformed {
            device: Self::KIND,
            reason: e.to_string(),
        })?;
        self.restore(version, state)
    }
}
