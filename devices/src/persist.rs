//! Saving and restoring device state for snapshots.
//!
//! Each device owns its state type, versioned, in its own module. Restore
//! accepts any version up to the device's current one and refuses newer
//! ones. A device that cannot save its state says so with an error: nothing
//! is silently skipped.
//!
//! Saving writes the *oldest* layout that holds the state, in the spirit
//! of QEMU's subsections: a device whose state gained a field in layout 2
//! keeps writing layout 1 while that field is at its default, so that an
//! older Abide still reads it ([`Persist::oldest_version`]). When a newer
//! layout is truly needed, [`Needed::why`] says why.

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

/// The state layout a section is written in, and why when that is newer
/// than the first one (an older reader that stops at an older layout is
/// told this reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needed {
    /// Layout version.
    pub version: u32,
    /// Why an older layout cannot hold the state (`None` for version 1).
    pub why: Option<String>,
}

impl Needed {
    /// The first layout: every reader of the section reads it.
    pub fn first() -> Self {
        Self {
            version: 1,
            why: None,
        }
    }

    /// `version`, needed because of `why` (`why` is dropped for version 1).
    pub fn because(version: u32, why: impl Into<String>) -> Self {
        Self {
            version,
            why: (version > 1).then(|| why.into()),
        }
    }
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

    /// The oldest layout of [`Persist::State`] that holds this device's
    /// state now (its JSON must then parse as that layout: fields added
    /// later are left out at their defaults). The default is
    /// [`Persist::VERSION`]: a device that raises its version writes the
    /// new layout until it says here which states an older one still holds.
    /// Cheap and callable while the guest runs (it decides, before the
    /// guest is paused, whether an older release can take the state).
    fn oldest_version(&self) -> Needed {
        Needed::because(
            Self::VERSION,
            format!(
                "{} writes only its state layout {} (no older layout is declared to hold its state)",
                Self::KIND,
                Self::VERSION
            ),
        )
    }

    /// Saves as a versioned JSON section payload, in the oldest layout that
    /// holds the state.
    fn save_section(&self) -> (u32, Vec<u8>) {
        // Serializing plain data structs to a Vec cannot fail.
        let bytes = serde_json::to_vec(&self.save()).unwrap_or_default();
        (self.oldest_version().version, bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A device whose layout 2 added `extra`: layout 1 holds every state
    /// whose `extra` is absent.
    #[derive(Default)]
    struct Gadget {
        level: u8,
        extra: Option<u32>,
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct GadgetState {
        level: u8,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        extra: Option<u32>,
    }

    impl Persist for Gadget {
        const KIND: &'static str = "gadget";
        const VERSION: u32 = 2;
        type State = GadgetState;

        fn save(&self) -> GadgetState {
            GadgetState {
                level: self.level,
                extra: self.extra,
            }
        }

        fn restore(&mut self, _version: u32, s: GadgetState) -> Result<(), PersistError> {
            self.level = s.level;
            self.extra = s.extra;
            Ok(())
        }

        fn oldest_version(&self) -> Needed {
            match self.extra {
                None => Needed::first(),
                Some(x) => Needed::because(2, format!("gadget extra register is set ({x})")),
            }
        }
    }

    /// The same device as its first release had it.
    #[derive(Default)]
    struct GadgetV1 {
        level: u8,
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct GadgetStateV1 {
        level: u8,
    }

    impl Persist for GadgetV1 {
        const KIND: &'static str = "gadget";
        const VERSION: u32 = 1;
        type State = GadgetStateV1;

        fn save(&self) -> GadgetStateV1 {
            GadgetStateV1 { level: self.level }
        }

        fn restore(&mut self, _version: u32, s: GadgetStateV1) -> Result<(), PersistError> {
            self.level = s.level;
            Ok(())
        }
    }

    #[test]
    fn the_oldest_layout_that_holds_the_state_is_written() {
        let plain = Gadget {
            level: 3,
            extra: None,
        };
        let (v, bytes) = plain.save_section();
        assert_eq!(v, 1, "no state needs layout 2");
        // The first release's device reads it.
        let mut old = GadgetV1::default();
        old.restore_section(v, &bytes).expect("layout 1 restores");
        assert_eq!(old.level, 3);

        let extended = Gadget {
            level: 4,
            extra: Some(9),
        };
        let (v, bytes) = extended.save_section();
        assert_eq!(v, 2);
        let why = extended.oldest_version().why.expect("a reason");
        assert!(why.contains("extra register"), "{why}");
        let err = GadgetV1::default()
            .restore_section(v, &bytes)
            .expect_err("layout 2 is newer");
        assert!(
            err.to_string().contains("state version 2 is newer"),
            "{err}"
        );
        // The newer device reads both.
        let mut back = Gadget::default();
        back.restore_section(2, &bytes).expect("layout 2");
        assert_eq!((back.level, back.extra), (4, Some(9)));
    }

    #[test]
    fn a_raised_version_is_written_unless_an_older_layout_is_declared() {
        struct Bumped;
        impl Persist for Bumped {
            const KIND: &'static str = "bumped";
            const VERSION: u32 = 3;
            type State = u8;
            fn save(&self) -> u8 {
                0
            }
            fn restore(&mut self, _v: u32, _s: u8) -> Result<(), PersistError> {
                Ok(())
            }
        }
        let n = Bumped.oldest_version();
        assert_eq!(n.version, 3);
        assert!(n
            .why
            .expect("why")
            .contains("bumped writes only its state layout 3"));
        assert_eq!(Bumped.save_section().0, 3);
    }
}
