//! Compatibility across releases: what each Abide release reads, and the
//! check that a snapshot or migration stream about to be written fits a
//! given reader.
//!
//! [`RELEASES`] is the one place that says, as data, what each release
//! reads: the snapshot/stream header format, the newest version of each
//! state section, and whether it reads snapshots and migration streams at
//! all. A section a reader does not know is skipped when the writer marks
//! it optional (ROM images, for instance) and refused otherwise.
//!
//! Writers emit the oldest layout that holds each section's state
//! ([`abide_devices::persist::Persist::oldest_version`]); [`check`] then
//! tells, before the guest is paused, whether a reader takes every section,
//! and if not which section needs what and why.

pub mod schema;
pub mod words;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::snapshot::format::FORMAT;

/// The sections 0.2.0 and 0.3.0 read, newest version each (prefixes end
/// in '.'). Their `KNOWN_SECTIONS`, copied from the release commits.
const SECTIONS_0_2: &[(&str, u32)] = &[
    ("vm", 1),
    ("vcpu.", 1),
    ("device.", 1),
    ("pci.", 1),
    ("memory.map", 1),
    ("memory", 1),
];

/// What one released Abide reads.
#[derive(Clone, Copy, Debug)]
pub struct Release {
    /// Version (`0.2.0`).
    pub version: &'static str,
    /// Whether it restores snapshots.
    pub snapshots: bool,
    /// Whether it receives live migrations.
    pub migration: bool,
    /// Newest header format it reads.
    pub format: u32,
    /// Newest version of each section it reads.
    pub sections: &'static [(&'static str, u32)],
    /// The machine types it builds.
    pub machine_types: &'static [&'static str],
    /// Whether it boots guests through firmware (`--firmware`).
    pub firmware: bool,
}

/// The machine types of 0.1.0 to 0.3.0.
const MACHINES_0_1: &[&str] = &["pc-1.0", "pc-2.0"];

/// Every release, oldest first. A new release appends its entry (with the
/// `KNOWN_SECTIONS` of its commit); entries never change afterwards.
pub const RELEASES: &[Release] = &[
    Release {
        version: "0.1.0",
        snapshots: false,
        migration: false,
        format: 0,
        sections: &[],
        machine_types: MACHINES_0_1,
        firmware: false,
    },
    Release {
        version: "0.2.0",
        snapshots: true,
        migration: false,
        format: 1,
        sections: SECTIONS_0_2,
        machine_types: MACHINES_0_1,
        firmware: false,
    },
    Release {
        version: "0.3.0",
        snapshots: true,
        migration: true,
        format: 1,
        sections: SECTIONS_0_2,
        machine_types: MACHINES_0_1,
        firmware: false,
    },
];

/// A reader's capabilities: the header format and section versions it
/// reads. The destination of a migration sends its own in the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reads {
    /// Who reads (an Abide version).
    pub abide_version: String,
    /// Newest header format.
    pub format: u32,
    /// Newest version of each section (name, or prefix ending in '.').
    pub sections: BTreeMap<String, u32>,
    /// The machine types it builds (absent from what readers before 0.4
    /// sent, which are taken from [`RELEASES`] instead).
    #[serde(default)]
    pub machine_types: Vec<String>,
    /// Whether it boots guests through firmware.
    #[serde(default)]
    pub firmware: bool,
}

impl Reads {
    /// What this build reads.
    pub fn this_build() -> Self {
        let machines: Vec<String> = abide_machines::machine_types()
            .into_iter()
            .map(|m| m.name.to_string())
            .collect();
        let mut me = Self::from_table(
            env!("CARGO_PKG_VERSION"),
            FORMAT,
            crate::snapshot::KNOWN_SECTIONS,
        );
        me.machine_types = machines;
        me.firmware = true;
        me
    }

    fn from_table(version: &str, format: u32, sections: &[(&str, u32)]) -> Self {
        Self {
            abide_version: version.to_string(),
            format,
            sections: sections.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            machine_types: Vec::new(),
            firmware: false,
        }
    }

    fn of_release(r: &Release) -> Self {
        let mut me = Self::from_table(r.version, r.format, r.sections);
        me.machine_types = r.machine_types.iter().map(|m| m.to_string()).collect();
        me.firmware = r.firmware;
        me
    }

    /// What release `version` reads from a snapshot (`this_build` for this
    /// build's own version).
    pub fn snapshot_target(version: &str) -> Result<Self, CompatError> {
        if version == env!("CARGO_PKG_VERSION") {
            return Ok(Self::this_build());
        }
        let r = release(version)?;
        if !r.snapshots {
            return Err(CompatError::NoSnapshots(version.to_string()));
        }
        Ok(Self::of_release(r))
    }

    /// What a migration destination that sent no capabilities reads: the
    /// oldest release that speaks migration stream format `format`.
    pub fn oldest_migration_reader(format: u32) -> Result<Self, CompatError> {
        RELEASES
            .iter()
            .find(|r| r.migration && r.format == format)
            .map(Self::of_release)
            .ok_or(CompatError::NoMigrationReader(format))
    }

    /// What a migration destination reads, from its *accept* payload: its
    /// `reads` field, or for a destination that predates that field, the
    /// oldest release that receives migrations.
    pub fn of_destination(accept: &[u8]) -> Result<Self, CompatError> {
        let v: serde_json::Value = serde_json::from_slice(accept).unwrap_or_default();
        match serde_json::from_value::<Self>(v["reads"].clone()) {
            // A release's own word on its machine types where it sent none.
            Ok(mut r) if r.machine_types.is_empty() => {
                if let Ok(known) = release(&r.abide_version) {
                    r.machine_types = known.machine_types.iter().map(|m| m.to_string()).collect();
                    r.firmware = known.firmware;
                }
                Ok(r)
            }
            Ok(r) => Ok(r),
            Err(_) => Self::oldest_migration_reader(FORMAT),
        }
    }

    /// The newest version of section `name` this reader reads (`None`:
    /// it does not know the section).
    pub fn version_of(&self, name: &str) -> Option<u32> {
        self.sections
            .iter()
            .find(|(k, _)| *k == name || (k.ends_with('.') && name.starts_with(k.as_str())))
            .map(|(_, v)| *v)
    }
}

fn release(version: &str) -> Result<&'static Release, CompatError> {
    RELEASES
        .iter()
        .find(|r| r.version == version)
        .ok_or_else(|| CompatError::UnknownRelease {
            given: version.to_string(),
            known: RELEASES
                .iter()
                .map(|r| r.version)
                .chain([env!("CARGO_PKG_VERSION")])
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// A section as it is about to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// Section name.
    pub name: String,
    /// Version it is written in (the oldest that holds its state).
    pub version: u32,
    /// Whether readers that do not know it may skip it.
    pub optional: bool,
    /// Why that version is needed, when newer than 1.
    pub why: Option<String>,
}

/// A reader that cannot take what would be written.
#[derive(Debug, thiserror::Error)]
pub enum CompatError {
    /// Not a release.
    #[error("unknown Abide release '{given}' (known: {known})")]
    UnknownRelease {
        /// Given.
        given: String,
        /// Known versions.
        known: String,
    },
    /// A release without snapshots.
    #[error("Abide {0} does not restore snapshots (snapshots came with 0.2.0)")]
    NoSnapshots(String),
    /// No release reads this migration format.
    #[error("no known Abide release receives migration stream format {0}")]
    NoMigrationReader(u32),
    /// The header format is newer than the reader's.
    #[error("Abide {reader} reads header format {supported}; this Abide writes {found}")]
    Format {
        /// Reader.
        reader: String,
        /// Written.
        found: u32,
        /// Read.
        supported: u32,
    },
    /// A section in a version newer than the reader's.
    #[error("Abide {reader} reads section '{section}' up to version {supported}, but this guest's state needs version {needed}: {why}")]
    Newer {
        /// Reader.
        reader: String,
        /// Section.
        section: String,
        /// Version needed.
        needed: u32,
        /// Version read.
        supported: u32,
        /// Why it is needed.
        why: String,
    },
    /// A machine type the reader does not build.
    #[error("Abide {reader} does not know machine type '{machine}' (it builds {known})")]
    MachineType {
        /// Reader.
        reader: String,
        /// The guest's machine type.
        machine: String,
        /// What it builds.
        known: String,
    },
    /// A firmware-booted guest for a reader without firmware boot.
    #[error("Abide {0} does not boot guests through firmware, and this guest was booted with --firmware")]
    Firmware(String),
    /// A mandatory section the reader does not know.
    #[error("Abide {reader} does not know section '{section}', which this guest needs{}", why.as_ref().map(|w| format!(": {w}")).unwrap_or_default())]
    Unknown {
        /// Reader.
        reader: String,
        /// Section.
        section: String,
        /// Why it is there.
        why: Option<String>,
    },
}

/// Checks that `reads` builds the guest's machine type (`machine`,
/// resolved) and, for a guest booted through firmware (`firmware`), boots
/// through firmware. A reader that did not say which machine types it
/// builds is not checked here (it refuses an unknown one itself, before
/// anything is sent).
pub fn check_guest(machine: &str, firmware: bool, reads: &Reads) -> Result<(), CompatError> {
    if !reads.machine_types.is_empty() && !reads.machine_types.iter().any(|m| m == machine) {
        return Err(CompatError::MachineType {
            reader: reads.abide_version.clone(),
            machine: machine.to_string(),
            known: reads.machine_types.join(", "),
        });
    }
    if firmware && !reads.firmware {
        return Err(CompatError::Firmware(reads.abide_version.clone()));
    }
    Ok(())
}

/// Checks that `reads` takes every section of `planned` (skipping unknown
/// optional ones) and the header format this build writes. The first
/// section it cannot take is named, with why that section needs its
/// version.
pub fn check(planned: &[Planned], reads: &Reads) -> Result<(), CompatError> {
    if FORMAT > reads.format {
        return Err(CompatError::Format {
            reader: reads.abide_version.clone(),
            found: FORMAT,
            supported: reads.format,
        });
    }
    for p in planned {
        match reads.version_of(&p.name) {
            None if p.optional => {}
            None => {
                return Err(CompatError::Unknown {
                    reader: reads.abide_version.clone(),
                    section: p.name.clone(),
                    why: p.why.clone(),
                })
            }
            Some(v) if p.version > v => {
                return Err(CompatError::Newer {
                    reader: reads.abide_version.clone(),
                    section: p.name.clone(),
                    needed: p.version,
                    supported: v,
                    why: p
                        .why
                        .clone()
                        .unwrap_or_else(|| "(no reason given)".to_string()),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The sections as gathered (`sections`), with the reasons from the plan
/// made before the pause (`plan`, same names).
pub fn written(
    sections: &[crate::snapshot::state::StateSection],
    plan: &[Planned],
) -> Vec<Planned> {
    sections
        .iter()
        .map(|s| Planned {
            name: s.name.clone(),
            version: s.version,
            optional: s.optional,
            why: plan
                .iter()
                .find(|p| p.name == s.name)
                .and_then(|p| p.why.clone())
                .filter(|_| s.version > 1),
        })
        .collect()
}

/// Lines saying which sections are written in a version newer than 1 and
/// why (what `abide snapshot` and `abide migrate` print).
pub fn notes(planned: &[Planned]) -> Vec<String> {
    planned
        .iter()
        .filter(|p| p.version > 1)
        .map(|p| {
            format!(
                "section '{}' is written in version {}: {}",
                p.name,
                p.version,
                p.why.as_deref().unwrap_or("(no reason given)")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(name: &str, version: u32, optional: bool, why: Option<&str>) -> Planned {
        Planned {
            name: name.into(),
            version,
            optional,
            why: why.map(str::to_string),
        }
    }

    #[test]
    fn releases_are_data_and_this_build_reads_every_older_section() {
        let versions: Vec<&str> = RELEASES.iter().map(|r| r.version).collect();
        assert_eq!(versions, ["0.1.0", "0.2.0", "0.3.0"]);
        let here = Reads::this_build();
        for r in RELEASES.iter().filter(|r| r.snapshots) {
            for (name, v) in r.sections {
                let probe = name
                    .strip_suffix('.')
                    .map_or(name.to_string(), |p| format!("{p}.0"));
                assert!(
                    here.version_of(&probe).is_some_and(|h| h >= *v),
                    "this build must read {name} v{v} (as {} did)",
                    r.version
                );
            }
        }
    }

    #[test]
    fn targets_are_checked_section_by_section() {
        let r = Reads::snapshot_target("0.2.0").expect("0.2.0");
        let ok = [
            planned("vm", 1, false, None),
            planned("vcpu.0", 1, false, None),
            planned("pci.00:01.0", 1, false, None),
            planned("rom.00:03.0", 1, true, Some("option ROM")),
        ];
        check(&ok, &r).expect("0.2.0 reads version 1 and skips the optional ROM");
        let bumped = [
            planned("vm", 1, false, None),
            planned("device.uart-16550", 2, false, Some("FIFO level saved")),
        ];
        let e = check(&bumped, &r).expect_err("0.2.0 reads device.* up to 1");
        let text = e.to_string();
        assert!(text.contains("section 'device.uart-16550'"), "{text}");
        assert!(text.contains("needs version 2: FIFO level saved"), "{text}");
        let unknown = [planned("gizmo", 1, false, None)];
        let e = check(&unknown, &r).expect_err("mandatory unknown section");
        assert!(
            e.to_string().contains("does not know section 'gizmo'"),
            "{e}"
        );
    }

    #[test]
    fn targets_without_snapshots_or_unknown_are_refused() {
        let e = Reads::snapshot_target("0.1.0").expect_err("0.1.0");
        assert!(e.to_string().contains("does not restore snapshots"), "{e}");
        let e = Reads::snapshot_target("9.9.9").expect_err("unknown");
        assert!(e.to_string().contains("known: 0.1.0, 0.2.0, 0.3.0"), "{e}");
        let same = Reads::snapshot_target(env!("CARGO_PKG_VERSION")).expect("self");
        assert_eq!(same, Reads::this_build());
    }

    #[test]
    fn machine_types_and_firmware_are_checked_against_the_reader() {
        let old = Reads::snapshot_target("0.3.0").expect("0.3.0");
        check_guest("pc-2.0", false, &old).expect("0.3.0 builds pc-2.0");
        let e = check_guest("pc-3.0", false, &old).expect_err("pc-3.0 came later");
        assert_eq!(
            e.to_string(),
            "Abide 0.3.0 does not know machine type 'pc-3.0' (it builds pc-1.0, pc-2.0)"
        );
        let e = check_guest("pc-2.0", true, &old).expect_err("no firmware boot");
        assert!(e.to_string().contains("through firmware"), "{e}");
        let me = Reads::this_build();
        for m in abide_machines::machine_types() {
            check_guest(&m.name, true, &me).expect("this build reads its own guests");
        }
        // A destination of 0.3.0 sent no reads: the table speaks for it.
        let r = Reads::of_destination(br#"{"abide_version":"0.3.0"}"#).expect("0.3.0");
        assert!(check_guest("pc-3.0", false, &r).is_err());
        // One that sent reads without machine types: its release's.
        let sent = serde_json::json!({"reads": {"abide_version": "0.3.0", "format": 1, "sections": {"vm": 1}}});
        let r = Reads::of_destination(sent.to_string().as_bytes()).expect("reads");
        assert_eq!(r.machine_types, ["pc-1.0", "pc-2.0"]);
    }

    #[test]
    fn a_destination_without_capabilities_is_the_oldest_migration_reader() {
        let r = Reads::oldest_migration_reader(1).expect("format 1");
        assert_eq!(r.abide_version, "0.3.0");
        assert!(Reads::oldest_migration_reader(99).is_err());
        // The capabilities travel as JSON.
        let here = Reads::this_build();
        let accept = serde_json::json!({"abide_version": "x", "reads": here});
        let back =
            Reads::of_destination(&serde_json::to_vec(&accept).expect("json")).expect("reads");
        assert_eq!(back, here);
        // 0.3.0's accept has no reads field.
        let old = Reads::of_destination(br#"{"abide_version":"0.3.0"}"#).expect("oldest");
        assert_eq!(old.abide_version, "0.3.0");
    }

    #[test]
    fn notes_say_which_section_needs_a_newer_version_and_why() {
        let p = [
            planned("vm", 1, false, None),
            planned(
                "pci.00:02.0",
                2,
                false,
                Some("virtio-blk: discard queue in use"),
            ),
        ];
        assert_eq!(
            notes(&p),
            ["section 'pci.00:02.0' is written in version 2: virtio-blk: discard queue in use"]
        );
    }
}
