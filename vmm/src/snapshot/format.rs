//! The snapshot file format: a self-describing header any Abide version can
//! read, followed by versioned state sections, each with its own checksum.
//!
//! ```text
//! "ABIDESNP"                      8 bytes, magic
//! header length                   u32 LE
//! header                          JSON (UTF-8): format, writer version,
//!                                 machine type, guest ABI manifest, host
//!                                 configuration, section table
//! header SHA-256                  32 bytes
//! section payloads                at the offsets the section table gives
//! ```
//!
//! A reader accepts any section version up to the one it knows. A section
//! it does not know is an error unless the writer marked it optional (a
//! "subsection" an older reader may skip). Every byte is covered by a
//! checksum, so truncation and corruption are caught before any state is
//! loaded.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::manifest::sha256_hex;

/// File magic.
pub const MAGIC: &[u8; 8] = b"ABIDESNP";
/// Newest header format this build reads and writes.
pub const FORMAT: u32 = 1;
const HASH_LEN: usize = 32;
/// Refuse headers larger than this (a corrupt length must not allocate GiBs).
const MAX_HEADER: usize = 64 << 20;

/// Errors reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// I/O.
    #[error("cannot read the snapshot")]
    Io(#[from] std::io::Error),
    /// Not a snapshot.
    #[error("not an Abide snapshot (bad magic)")]
    BadMagic,
    /// Ends early.
    #[error("the snapshot is truncated: {0}")]
    Truncated(String),
    /// Header checksum mismatch.
    #[error("the snapshot header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    /// Header does not parse.
    #[error("the snapshot header is not valid: {0}")]
    Header(String),
    /// Written by a newer format.
    #[error("the snapshot uses header format {found}; this Abide reads up to {supported}")]
    NewerFormat {
        /// Format found.
        found: u32,
        /// Newest supported.
        supported: u32,
    },
    /// Section checksum mismatch.
    #[error("snapshot section '{0}' is corrupt (checksum mismatch)")]
    SectionChecksum(String),
    /// A mandatory section no device claims.
    #[error("snapshot section '{0}' is not known to this Abide and is not optional")]
    UnknownSection(String),
    /// A section version from the future.
    #[error("snapshot section '{name}' has version {found}; this Abide reads up to {supported}")]
    NewerSection {
        /// Section.
        name: String,
        /// Version found.
        found: u32,
        /// Newest supported.
        supported: u32,
    },
    /// A section the reader needs is absent.
    #[error("snapshot section '{0}' is missing")]
    MissingSection(String),
}

/// One entry of the section table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionEntry {
    /// Name (e.g. `vcpu.0`, `device.00:01.0`, `memory`).
    pub name: String,
    /// Version of this section's layout.
    pub version: u32,
    /// Whether a reader that does not know it may skip it.
    pub optional: bool,
    /// Offset from the start of the file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// SHA-256 of the payload, hex.
    pub sha256: String,
}

/// The snapshot header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Header format.
    pub format: u32,
    /// Version of the Abide that wrote it.
    pub abide_version: String,
    /// Canonical machine type.
    pub machine: String,
    /// The guest ABI manifest (kept as JSON so any reader can show it).
    pub manifest: Value,
    /// Host-side configuration.
    pub host: Value,
    /// Sections in file order.
    pub sections: Vec<SectionEntry>,
}

/// Builds a snapshot file.
#[derive(Debug)]
pub struct Writer {
    header: Header,
    payloads: Vec<Vec<u8>>,
}

impl Writer {
    /// A snapshot of `machine` with its manifest and host configuration.
    pub fn new(machine: &str, manifest: Value, host: Value) -> Self {
        Self {
            header: Header {
                format: FORMAT,
                abide_version: env!("CARGO_PKG_VERSION").to_string(),
                machine: machine.to_string(),
                manifest,
                host,
                sections: Vec::new(),
            },
            payloads: Vec::new(),
        }
    }

    /// Adds a section.
    pub fn section(&mut self, name: &str, version: u32, optional: bool, payload: Vec<u8>) {
        self.header.sections.push(SectionEntry {
            name: name.to_string(),
            version,
            optional,
            offset: 0,
            length: payload.len() as u64,
            sha256: sha256_hex(&payload),
        });
        self.payloads.push(payload);
    }

    /// Serializes the whole file.
    pub fn to_bytes(mut self) -> Result<Vec<u8>, SnapshotError> {
        // Offsets depend on the header's own length: serialize with
        // provisional offsets until the length settles.
        let mut header_len = 0usize;
        let json = loop {
            let mut offset = (MAGIC.len() + 4 + header_len + HASH_LEN) as u64;
            for s in &mut self.header.sections {
                s.offset = offset;
                offset += s.length;
            }
            let json = serde_json::to_vec(&self.header)
                .map_err(|e| SnapshotError::Header(e.to_string()))?;
            if json.len() == header_len {
                break json;
            }
            header_len = json.len();
        };
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&Sha256::digest(&json));
        for p in &self.payloads {
            out.extend_from_slice(p);
        }
        Ok(out)
    }

    /// Writes the file atomically (temporary file, then rename).
    pub fn write_to(self, path: &Path) -> Result<(), SnapshotError> {
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension("partial");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// A verified snapshot: header checked, every section's bounds and checksum
/// checked, section versions checked against what the reader knows.
#[derive(Debug)]
pub struct Snapshot {
    /// The header.
    pub header: Header,
    bytes: Vec<u8>,
    /// Known sections, by name.
    index: BTreeMap<String, usize>,
}

impl Snapshot {
    /// Parses and verifies `bytes`. `known` gives, for each section name
    /// (or name prefix ending in '.'), the newest version this reader
    /// understands.
    pub fn parse(bytes: Vec<u8>, known: &[(&str, u32)]) -> Result<Self, SnapshotError> {
        if bytes.len() < MAGIC.len() {
            return Err(SnapshotError::Truncated("no magic".into()));
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let len_at = MAGIC.len();
        let len = bytes
            .get(len_at..len_at + 4)
            .ok_or_else(|| SnapshotError::Truncated("no header length".into()))?;
        let header_len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if header_len > MAX_HEADER {
            return Err(SnapshotError::Header(format!(
                "header length {header_len} is implausible"
            )));
        }
        let json_at = len_at + 4;
        let json = bytes
            .get(json_at..json_at + header_len)
            .ok_or_else(|| SnapshotError::Truncated("header cut short".into()))?;
        let hash = bytes
            .get(json_at + header_len..json_at + header_len + HASH_LEN)
            .ok_or_else(|| SnapshotError::Truncated("header checksum missing".into()))?;
        if Sha256::digest(json).as_slice() != hash {
            return Err(SnapshotError::HeaderChecksum);
        }
        // Check the format before the full schema: a newer writer may add fields.
        let raw: Value =
            serde_json::from_slice(json).map_err(|e| SnapshotError::Header(e.to_string()))?;
        let format = raw["format"].as_u64().unwrap_or(0) as u32;
        if format > FORMAT {
            return Err(SnapshotError::NewerFormat {
                found: format,
                supported: FORMAT,
            });
        }
        let header: Header =
            serde_json::from_value(raw).map_err(|e| SnapshotError::Header(e.to_string()))?;
        let mut index = BTreeMap::new();
        for (i, s) in header.sections.iter().enumerate() {
            let known_version = known
                .iter()
                .find(|(k, _)| *k == s.name || (k.ends_with('.') && s.name.starts_with(k)))
                .map(|(_, v)| *v);
            match known_version {
                None if s.optional => continue,
                None => return Err(SnapshotError::UnknownSection(s.name.clone())),
                Some(v) if s.version > v => {
                    return Err(SnapshotError::NewerSection {
                        name: s.name.clone(),
                        found: s.version,
                        supported: v,
                    })
                }
                Some(_) => {}
            }
            let start = usize::try_from(s.offset).unwrap_or(usize::MAX);
            let end = start.checked_add(usize::try_from(s.length).unwrap_or(usize::MAX));
            let payload = end.and_then(|e| bytes.get(start..e)).ok_or_else(|| {
                SnapshotError::Truncated(format!("section '{}' cut short", s.name))
            })?;
            if sha256_hex(payload) != s.sha256 {
                return Err(SnapshotError::SectionChecksum(s.name.clone()));
            }
            index.insert(s.name.clone(), i);
        }
        Ok(Self {
            header,
            bytes,
            index,
        })
    }

    /// Reads and verifies a snapshot file.
    pub fn open(path: &Path, known: &[(&str, u32)]) -> Result<Self, SnapshotError> {
        Self::parse(std::fs::read(path)?, known)
    }

    /// A verified section's version and payload.
    pub fn section(&self, name: &str) -> Result<(u32, &[u8]), SnapshotError> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| SnapshotError::MissingSection(name.to_string()))?;
        let s = &self.header.sections[i];
        // Bounds were checked in `parse`.
        let start = s.offset as usize;
        Ok((s.version, &self.bytes[start..start + s.length as usize]))
    }

    /// Names of the sections this reader accepted.
    pub fn sections(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }
}

/// Encodes guest memory sparsely: runs of non-zero 4 KiB pages as
/// `[u64 guest address][u64 length][bytes]`, zero pages skipped.
pub fn encode_sparse(regions: &[(u64, &[u8])]) -> Vec<u8> {
    const PAGE: usize = 4096;
    let mut out = Vec::new();
    for (base, data) in regions {
        let mut page = 0;
        while page * PAGE < data.len() {
            let chunk = |p: usize| &data[p * PAGE..((p + 1) * PAGE).min(data.len())];
            if chunk(page).iter().all(|b| *b == 0) {
                page += 1;
                continue;
            }
            let start = page;
            while page * PAGE < data.len() && !chunk(page).iter().all(|b| *b == 0) {
                page += 1;
            }
            let bytes = &data[start * PAGE..(page * PAGE).min(data.len())];
            out.extend_from_slice(&(base + (start * PAGE) as u64).to_le_bytes());
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
    }
    out
}

/// Decodes [`encode_sparse`] output into (guest address, bytes) runs.
pub fn decode_sparse(mut data: &[u8]) -> Result<Vec<(u64, &[u8])>, SnapshotError> {
    let mut runs = Vec::new();
    while !data.is_empty() {
        let head = data
            .get(..16)
            .ok_or_else(|| SnapshotError::Truncated("memory run header".into()))?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&head[..8]);
        let addr = u64::from_le_bytes(a);
        a.copy_from_slice(&head[8..16]);
        let len = usize::try_from(u64::from_le_bytes(a)).unwrap_or(usize::MAX);
        let bytes = data
            .get(16..16usize.saturating_add(len))
            .ok_or_else(|| SnapshotError::Truncated("memory run".into()))?;
        runs.push((addr, bytes));
        data = &data[16 + len..];
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KNOWN: &[(&str, u32)] = &[("vcpu.", 1), ("memory", 1), ("device.", 2)];

    fn sample() -> Vec<u8> {
        let mut w = Writer::new("pc-1.0", json!({"machine": "pc-1.0"}), json!({"disks": []}));
        w.section("vcpu.0", 1, false, vec![1, 2, 3]);
        w.section("device.00:01.0", 2, false, vec![9; 100]);
        w.section("memory", 1, false, vec![7; 10]);
        w.to_bytes().expect("serialize")
    }

    #[test]
    fn round_trip() {
        let s = Snapshot::parse(sample(), KNOWN).expect("parse");
        assert_eq!(s.header.machine, "pc-1.0");
        assert_eq!(s.header.abide_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(s.section("vcpu.0").expect("vcpu"), (1, &[1u8, 2, 3][..]));
        assert_eq!(s.section("device.00:01.0").expect("dev").1.len(), 100);
        assert!(matches!(
            s.section("nope"),
            Err(SnapshotError::MissingSection(_))
        ));
    }

    #[test]
    fn truncation_is_caught_everywhere() {
        let b = sample();
        for cut in [0, 4, 10, 20, b.len() / 2, b.len() - 1] {
            let r = Snapshot::parse(b[..cut].to_vec(), KNOWN);
            assert!(
                matches!(
                    r,
                    Err(SnapshotError::Truncated(_)) | Err(SnapshotError::Header(_))
                ),
                "cut at {cut}: {r:?}"
            );
        }
    }

    #[test]
    fn any_flipped_byte_is_caught() {
        let b = sample();
        for i in (8..b.len()).step_by(7) {
            let mut c = b.clone();
            c[i] ^= 0x01;
            assert!(
                Snapshot::parse(c, KNOWN).is_err(),
                "flip at {i} went unnoticed"
            );
        }
    }

    #[test]
    fn wrong_magic() {
        let mut b = sample();
        b[0] = b'X';
        assert!(matches!(
            Snapshot::parse(b, KNOWN),
            Err(SnapshotError::BadMagic)
        ));
    }

    #[test]
    fn unknown_and_newer_sections() {
        let mut w = Writer::new("pc-1.0", json!({}), json!({}));
        w.section("gizmo", 1, false, vec![1]);
        let err = Snapshot::parse(w.to_bytes().expect("ser"), KNOWN).expect_err("unknown");
        assert!(matches!(err, SnapshotError::UnknownSection(ref n) if n == "gizmo"));

        let mut w = Writer::new("pc-1.0", json!({}), json!({}));
        w.section("gizmo", 1, true, vec![1]);
        w.section("memory", 1, false, vec![]);
        let s = Snapshot::parse(w.to_bytes().expect("ser"), KNOWN).expect("optional skipped");
        assert_eq!(s.sections().collect::<Vec<_>>(), ["memory"]);

        let mut w = Writer::new("pc-1.0", json!({}), json!({}));
        w.section("device.00:02.0", 3, false, vec![1]);
        let err = Snapshot::parse(w.to_bytes().expect("ser"), KNOWN).expect_err("newer");
        assert!(matches!(
            err,
            SnapshotError::NewerSection {
                found: 3,
                supported: 2,
                ..
            }
        ));
    }

    #[test]
    fn newer_header_format_is_refused() {
        let mut w = Writer::new("pc-1.0", json!({}), json!({}));
        w.header.format = FORMAT + 1;
        let err = Snapshot::parse(w.to_bytes().expect("ser"), KNOWN).expect_err("newer");
        assert!(matches!(err, SnapshotError::NewerFormat { .. }));
    }

    #[test]
    fn sparse_memory_skips_zero_pages() {
        let mut ram = vec![0u8; 64 * 4096];
        ram[5 * 4096] = 1;
        ram[6 * 4096 + 10] = 2;
        ram[40 * 4096 + 4095] = 3;
        let enc = encode_sparse(&[(0x10_0000, &ram)]);
        // Two runs: pages 5-6 and page 40.
        assert_eq!(enc.len(), 2 * 16 + 3 * 4096);
        let runs = decode_sparse(&enc).expect("decode");
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].0, 0x10_0000 + 5 * 4096);
        assert_eq!(runs[0].1.len(), 2 * 4096);
        assert_eq!(runs[1].0, 0x10_0000 + 40 * 4096);
        let mut back = vec![0u8; ram.len()];
        for (addr, bytes) in runs {
            let off = (addr - 0x10_0000) as usize;
            back[off..off + bytes.len()].copy_from_slice(bytes);
        }
        assert_eq!(back, ram);
        assert!(decode_sparse(&enc[..enc.len() - 1]).is_err());
    }
}
