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
//! section payloads                at the offsets the section table gives;
//!                                 page-sized payloads (guest memory) start
//!                                 on a 4 KiB boundary so restore can map
//!                                 them straight from the file
//! ```
//!
//! A reader accepts any section version up to the one it knows. A section
//! it does not know is an error unless the writer marked it optional (a
//! "subsection" an older reader may skip). Every byte is covered by a
//! checksum, so truncation and corruption are caught before any state is
//! loaded. A reader may instead verify a large section piece by piece
//! ([`Snapshot::open_chunked`]): guest memory, when the snapshot also has
//! a `memory.chunks` section (a SHA-256 per chunk, itself verified here),
//! is checked chunk by chunk before any byte of a chunk is used.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// File magic.
pub const MAGIC: &[u8; 8] = b"ABIDESNP";
/// Magic of a live-migration stream, which starts with the same header.
pub const STREAM_MAGIC: &[u8; 8] = b"ABIDEMIG";
/// Newest header format this build reads and writes.
pub const FORMAT: u32 = 1;
/// Alignment of page payloads in the file.
pub const PAGE: u64 = 4096;
/// Length of a SHA-256 digest.
pub const HASH_LEN: usize = 32;
/// Refuse headers larger than this (a corrupt length must not allocate GiBs).
pub const MAX_HEADER: usize = 64 << 20;
/// Sections read into memory are at most this large; bigger ones (guest
/// memory) are only ever mapped or streamed.
const MAX_INLINE: u64 = 256 << 20;

/// Errors reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// I/O.
    #[error("snapshot file I/O failed")]
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
    /// A section that is present but unusable.
    #[error("snapshot section '{name}' is not valid: {reason}")]
    BadSection {
        /// Section.
        name: String,
        /// Why.
        reason: String,
    },
}

/// One entry of the section table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionEntry {
    /// Name (e.g. `vcpu.0`, `pci.00:01.0`, `memory`).
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

impl Header {
    /// A header of this build for `machine`, with its manifest and host
    /// configuration, and no sections yet.
    pub fn new(machine: &str, manifest: Value, host: Value) -> Self {
        Self {
            format: FORMAT,
            abide_version: env!("CARGO_PKG_VERSION").to_string(),
            machine: machine.to_string(),
            manifest,
            host,
            sections: Vec::new(),
        }
    }

    /// The header as it starts a file or stream: `magic`, the JSON's
    /// length (u32 LE), the JSON, and its SHA-256.
    pub fn encode(&self, magic: &[u8; 8]) -> Result<Vec<u8>, SnapshotError> {
        let json = serde_json::to_vec(self).map_err(|e| SnapshotError::Header(e.to_string()))?;
        let mut out = Vec::with_capacity(json.len() + 44);
        out.extend_from_slice(magic);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&Sha256::digest(&json));
        Ok(out)
    }

    /// Checks a header's JSON against its checksum and format, then parses
    /// it. The format is checked before the full schema: a newer writer
    /// may add fields.
    pub fn decode(json: &[u8], hash: &[u8]) -> Result<Self, SnapshotError> {
        if Sha256::digest(json).as_slice() != hash {
            return Err(SnapshotError::HeaderChecksum);
        }
        let raw: Value =
            serde_json::from_slice(json).map_err(|e| SnapshotError::Header(e.to_string()))?;
        let format = raw["format"].as_u64().unwrap_or(0) as u32;
        if format > FORMAT {
            return Err(SnapshotError::NewerFormat {
                found: format,
                supported: FORMAT,
            });
        }
        serde_json::from_value(raw).map_err(|e| SnapshotError::Header(e.to_string()))
    }
}

/// Whether a reader that knows `known` (section name or prefix ending in
/// '.', newest version) takes `entry`: `Ok(false)` for an optional section
/// it does not know (skipped), an error for an unknown mandatory one or a
/// version newer than it reads.
pub fn accept_section(entry: &SectionEntry, known: &[(&str, u32)]) -> Result<bool, SnapshotError> {
    let known_version = known
        .iter()
        .find(|(k, _)| *k == entry.name || (k.ends_with('.') && entry.name.starts_with(k)))
        .map(|(_, v)| *v);
    match known_version {
        None if entry.optional => Ok(false),
        None => Err(SnapshotError::UnknownSection(entry.name.clone())),
        Some(v) if entry.version > v => Err(SnapshotError::NewerSection {
            name: entry.name.clone(),
            found: entry.version,
            supported: v,
        }),
        Some(_) => Ok(true),
    }
}

/// A section's contents.
enum Payload<'a> {
    /// Serialized state.
    Bytes(Vec<u8>),
    /// Pages of guest memory, concatenated, page-aligned in the file.
    Pages(Vec<&'a [u8]>),
}

impl Payload<'_> {
    fn len(&self) -> u64 {
        match self {
            Payload::Bytes(b) => b.len() as u64,
            Payload::Pages(p) => p.iter().map(|s| s.len() as u64).sum(),
        }
    }

    fn sha256(&self) -> String {
        let mut h = Sha256::new();
        match self {
            Payload::Bytes(b) => h.update(b),
            Payload::Pages(p) => p.iter().for_each(|s| h.update(s)),
        }
        hex::encode(h.finalize())
    }

    fn aligned(&self) -> bool {
        matches!(self, Payload::Pages(_))
    }
}

/// Builds a snapshot file.
pub struct Writer<'a> {
    header: Header,
    payloads: Vec<Payload<'a>>,
}

impl std::fmt::Debug for Writer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("machine", &self.header.machine)
            .field("sections", &self.header.sections.len())
            .finish()
    }
}

impl<'a> Writer<'a> {
    /// A snapshot of `machine` with its manifest and host configuration.
    pub fn new(machine: &str, manifest: Value, host: Value) -> Self {
        Self {
            header: Header::new(machine, manifest, host),
            payloads: Vec::new(),
        }
    }

    fn push(&mut self, name: &str, version: u32, optional: bool, payload: Payload<'a>) {
        self.header.sections.push(SectionEntry {
            name: name.to_string(),
            version,
            optional,
            offset: 0,
            length: payload.len(),
            sha256: payload.sha256(),
        });
        self.payloads.push(payload);
    }

    /// Adds a section of serialized state.
    pub fn section(&mut self, name: &str, version: u32, optional: bool, payload: Vec<u8>) {
        self.push(name, version, optional, Payload::Bytes(payload));
    }

    /// Adds a section made of memory pages (each slice a multiple of 4 KiB),
    /// written back to back starting on a page boundary of the file.
    pub fn pages(&mut self, name: &str, version: u32, pages: Vec<&'a [u8]>) {
        self.push(name, version, false, Payload::Pages(pages));
    }

    /// Lays out the file: fills in section offsets. Offsets depend on the
    /// header's own length, so serialize with provisional offsets until the
    /// length settles.
    fn layout(&mut self) -> Result<(), SnapshotError> {
        let mut header_len = 0usize;
        loop {
            let mut offset = (MAGIC.len() + 4 + header_len + HASH_LEN) as u64;
            for (s, p) in self.header.sections.iter_mut().zip(&self.payloads) {
                if p.aligned() {
                    offset = offset.div_ceil(PAGE) * PAGE;
                }
                s.offset = offset;
                offset += s.length;
            }
            let json = serde_json::to_vec(&self.header)
                .map_err(|e| SnapshotError::Header(e.to_string()))?;
            if json.len() == header_len {
                return Ok(());
            }
            header_len = json.len();
        }
    }

    /// Writes the whole file to `out`.
    pub fn write_into(mut self, out: &mut impl Write) -> Result<u64, SnapshotError> {
        self.layout()?;
        // The laid-out header serializes to the length the offsets assume.
        let head = self.header.encode(MAGIC)?;
        out.write_all(&head)?;
        let mut pos = head.len() as u64;
        let zeros = [0u8; PAGE as usize];
        for (s, p) in self.header.sections.iter().zip(&self.payloads) {
            // Only page payloads are padded, by less than a page.
            let pad = usize::try_from(s.offset - pos).unwrap_or(0);
            out.write_all(&zeros[..pad.min(zeros.len())])?;
            match p {
                Payload::Bytes(b) => out.write_all(b)?,
                Payload::Pages(pages) => {
                    for page in pages {
                        out.write_all(page)?;
                    }
                }
            }
            pos = s.offset + s.length;
        }
        Ok(pos)
    }

    /// Serializes the whole file into memory.
    pub fn to_bytes(self) -> Result<Vec<u8>, SnapshotError> {
        let mut out = Vec::new();
        self.write_into(&mut out)?;
        Ok(out)
    }

    /// Writes the file atomically (temporary file, then rename); returns
    /// its size.
    pub fn write_to(self, path: &Path) -> Result<u64, SnapshotError> {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let tmp = path.with_file_name(name);
        let result = (|| {
            let f = File::create(&tmp)?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            let size = self.write_into(&mut w)?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(size)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Where a snapshot's bytes come from.
#[derive(Debug)]
enum Source {
    Bytes(Vec<u8>),
    File(File),
}

impl Source {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        match self {
            Source::Bytes(b) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let src = start
                    .checked_add(buf.len())
                    .and_then(|end| b.get(start..end))
                    .ok_or_else(|| SnapshotError::Truncated("ends early".into()))?;
                buf.copy_from_slice(src);
                Ok(())
            }
            Source::File(f) => f.read_exact_at(buf, offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    SnapshotError::Truncated("ends early".into())
                } else {
                    SnapshotError::Io(e)
                }
            }),
        }
    }

    fn len(&self) -> Result<u64, SnapshotError> {
        Ok(match self {
            Source::Bytes(b) => b.len() as u64,
            Source::File(f) => f.metadata()?.len(),
        })
    }
}

/// A verified snapshot: header checked, every section's bounds and checksum
/// checked, section versions checked against what the reader knows.
#[derive(Debug)]
pub struct Snapshot {
    /// The header.
    pub header: Header,
    source: Source,
    /// Known sections, by name.
    index: BTreeMap<String, usize>,
    /// Accepted chunked sections, not verified here (their reader checks
    /// each chunk).
    chunked: std::collections::BTreeSet<String>,
}

impl Snapshot {
    /// Parses and verifies a snapshot held in memory. `known` gives, for
    /// each section name (or name prefix ending in '.'), the newest version
    /// this reader understands.
    pub fn parse(bytes: Vec<u8>, known: &[(&str, u32)]) -> Result<Self, SnapshotError> {
        Self::verify(Source::Bytes(bytes), known, &[])
    }

    /// Opens and verifies a snapshot file. Every section is read once to
    /// check its checksum; memory sections are not kept in memory.
    pub fn open(path: &Path, known: &[(&str, u32)]) -> Result<Self, SnapshotError> {
        Self::verify(Source::File(File::open(path)?), known, &[])
    }

    /// Like [`Snapshot::open`], but for each (section, hashes) pair of
    /// `chunked` whose hashes section the snapshot has, the section is only
    /// bounds-checked, not hashed whole: the caller verifies it chunk by
    /// chunk against the hashes section (which is verified here) before
    /// using any byte. [`Snapshot::section`] refuses such a section;
    /// [`Snapshot::mapped`] gives where it lies.
    pub fn open_chunked(
        path: &Path,
        known: &[(&str, u32)],
        chunked: &[(&str, &str)],
    ) -> Result<Self, SnapshotError> {
        Self::verify(Source::File(File::open(path)?), known, chunked)
    }

    fn verify(
        source: Source,
        known: &[(&str, u32)],
        chunked_by: &[(&str, &str)],
    ) -> Result<Self, SnapshotError> {
        let total = source.len()?;
        let mut magic = [0u8; 8];
        if total < MAGIC.len() as u64 {
            return Err(SnapshotError::Truncated("no magic".into()));
        }
        source.read_at(0, &mut magic)?;
        if &magic != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let mut len = [0u8; 4];
        source
            .read_at(MAGIC.len() as u64, &mut len)
            .map_err(|_| SnapshotError::Truncated("no header length".into()))?;
        let header_len = u32::from_le_bytes(len) as usize;
        if header_len > MAX_HEADER {
            return Err(SnapshotError::Header(format!(
                "header length {header_len} is implausible"
            )));
        }
        let json_at = (MAGIC.len() + 4) as u64;
        if json_at + header_len as u64 > total {
            return Err(SnapshotError::Truncated("header cut short".into()));
        }
        let mut json = vec![0u8; header_len];
        source.read_at(json_at, &mut json)?;
        let mut hash = [0u8; HASH_LEN];
        source
            .read_at(json_at + header_len as u64, &mut hash)
            .map_err(|_| SnapshotError::Truncated("header checksum missing".into()))?;
        let header = Header::decode(&json, &hash)?;
        let mut index = BTreeMap::new();
        let mut chunked = std::collections::BTreeSet::new();
        for (i, s) in header.sections.iter().enumerate() {
            if !accept_section(s, known)? {
                continue;
            }
            if s.offset.checked_add(s.length).is_none_or(|end| end > total) {
                return Err(SnapshotError::Truncated(format!(
                    "section '{}' cut short",
                    s.name
                )));
            }
            let by_chunks = chunked_by.iter().any(|(n, by)| {
                *n == s.name
                    && header
                        .sections
                        .iter()
                        .any(|h| h.name == *by && accept_section(h, known).unwrap_or(false))
            });
            if by_chunks {
                chunked.insert(s.name.clone());
            } else if hash_range(&source, s.offset, s.length)? != s.sha256 {
                return Err(SnapshotError::SectionChecksum(s.name.clone()));
            }
            if index.insert(s.name.clone(), i).is_some() {
                return Err(SnapshotError::Header(format!(
                    "section '{}' appears twice",
                    s.name
                )));
            }
        }
        Ok(Self {
            header,
            source,
            index,
            chunked,
        })
    }

    fn entry(&self, name: &str) -> Result<&SectionEntry, SnapshotError> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| SnapshotError::MissingSection(name.to_string()))?;
        Ok(&self.header.sections[i])
    }

    /// A verified section's version and payload.
    pub fn section(&self, name: &str) -> Result<(u32, Vec<u8>), SnapshotError> {
        let s = self.entry(name)?;
        if self.chunked.contains(name) {
            return Err(SnapshotError::BadSection {
                name: name.into(),
                reason: "it is verified chunk by chunk and cannot be read whole".into(),
            });
        }
        if s.length > MAX_INLINE {
            return Err(SnapshotError::BadSection {
                name: name.into(),
                reason: format!("{} bytes is too large to load", s.length),
            });
        }
        let mut buf = vec![0u8; s.length as usize];
        self.source.read_at(s.offset, &mut buf)?;
        Ok((s.version, buf))
    }

    /// Where a page section lies in the file: (version, file, offset,
    /// length), verified unless it is chunked (see
    /// [`Snapshot::open_chunked`]). `None` for a snapshot parsed from
    /// memory.
    pub fn mapped(&self, name: &str) -> Result<Option<(u32, &File, u64, u64)>, SnapshotError> {
        let s = self.entry(name)?;
        Ok(match &self.source {
            Source::File(f) => Some((s.version, f, s.offset, s.length)),
            Source::Bytes(_) => None,
        })
    }

    /// Copies `buf.len()` bytes at `offset` within section `name` (restore
    /// maps memory instead; this checks page payloads in tests).
    #[cfg(test)]
    pub fn read_section_at(
        &self,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), SnapshotError> {
        let s = self.entry(name)?;
        if offset.saturating_add(buf.len() as u64) > s.length {
            return Err(SnapshotError::BadSection {
                name: name.into(),
                reason: "read past its end".into(),
            });
        }
        self.source.read_at(s.offset + offset, buf)
    }

    /// Names of the sections this reader accepted.
    pub fn sections(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }
}

fn hash_range(source: &Source, offset: u64, length: u64) -> Result<String, SnapshotError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; length.min(8 << 20) as usize];
    let mut done = 0u64;
    while done < length {
        let n = (length - done).min(buf.len() as u64) as usize;
        source.read_at(offset + done, &mut buf[..n])?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

/// One run of non-zero guest pages in the memory section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRun {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
    /// Offset of the run's bytes within the memory section.
    pub offset: u64,
}

/// Finds the runs of non-zero 4 KiB pages in `data` (guest memory at
/// `base`); zero pages are skipped.
pub fn nonzero_runs(base: u64, data: &[u8]) -> Vec<(u64, std::ops::Range<usize>)> {
    let page = PAGE as usize;
    let is_zero = |p: usize| {
        let chunk = &data[p * page..((p + 1) * page).min(data.len())];
        // Compare 8 bytes at a time: this runs over all of guest RAM.
        let (head, words, tail) = {
            // SAFETY: u64 has no invalid bit patterns; align_to gives the
            // aligned middle part and the unaligned rest.
            unsafe { chunk.align_to::<u64>() }
        };
        head.iter().all(|b| *b == 0)
            && words.iter().all(|w| *w == 0)
            && tail.iter().all(|b| *b == 0)
    };
    let pages = data.len().div_ceil(page);
    let mut runs = Vec::new();
    let mut p = 0;
    while p < pages {
        if is_zero(p) {
            p += 1;
            continue;
        }
        let start = p;
        while p < pages && !is_zero(p) {
            p += 1;
        }
        runs.push((
            base + (start * page) as u64,
            start * page..(p * page).min(data.len()),
        ));
    }
    runs
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
        assert_eq!(s.section("vcpu.0").expect("vcpu"), (1, vec![1u8, 2, 3]));
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

    /// A header that declares a section far larger than the file (or
    /// larger than a section may be) is refused before anything of that
    /// size is read or allocated.
    #[test]
    fn huge_declared_sections_are_refused_without_reading_them() {
        let mut h = Header::new("pc-1.0", json!({}), json!({}));
        h.sections.push(SectionEntry {
            name: "vcpu.0".into(),
            version: 1,
            optional: false,
            offset: 4096,
            length: 1 << 40,
            sha256: "00".repeat(32),
        });
        let bytes = h.encode(MAGIC).expect("encode");
        let err = Snapshot::parse(bytes, KNOWN).expect_err("huge");
        assert!(
            matches!(err, SnapshotError::Truncated(ref w) if w.contains("'vcpu.0' cut short")),
            "{err}"
        );
        // An offset + length that overflows u64 is refused the same way.
        h.sections[0].offset = u64::MAX - 10;
        let bytes = h.encode(MAGIC).expect("encode");
        assert!(matches!(
            Snapshot::parse(bytes, KNOWN),
            Err(SnapshotError::Truncated(_))
        ));
        // A header length past the limit is refused before it is read.
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = Snapshot::parse(b, KNOWN).expect_err("huge header");
        assert!(err.to_string().contains("implausible"), "{err}");
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
    fn zero_pages_are_skipped_and_pages_are_aligned() {
        let mut ram = vec![0u8; 64 * 4096];
        ram[5 * 4096] = 1;
        ram[6 * 4096 + 10] = 2;
        ram[40 * 4096 + 4095] = 3;
        let runs = nonzero_runs(0x10_0000, &ram);
        // Two runs: pages 5-6 and page 40.
        assert_eq!(
            runs,
            vec![
                (0x10_0000 + 5 * 4096, 5 * 4096..7 * 4096),
                (0x10_0000 + 40 * 4096, 40 * 4096..41 * 4096)
            ]
        );
        let mut w = Writer::new("pc-1.0", json!({}), json!({}));
        w.section("vcpu.0", 1, false, vec![1, 2, 3]);
        w.pages(
            "memory",
            1,
            runs.iter().map(|(_, r)| &ram[r.clone()]).collect(),
        );
        let s = Snapshot::parse(w.to_bytes().expect("ser"), KNOWN).expect("parse");
        let e = &s.header.sections[1];
        assert_eq!(e.offset % PAGE, 0, "page payload must be page-aligned");
        assert_eq!(e.length, 3 * 4096);
        let mut page40 = vec![0u8; 4096];
        s.read_section_at("memory", 2 * 4096, &mut page40)
            .expect("read");
        assert_eq!(page40[4095], 3);
        assert!(s.read_section_at("memory", 3 * 4096, &mut page40).is_err());
    }

    /// `open_chunked` leaves a section with chunk hashes to its reader (a
    /// flipped byte there is not caught here, and the section cannot be
    /// read whole), and hashes it whole when the snapshot has no hashes
    /// section, as every reader before the chunks did.
    #[test]
    fn chunked_sections_are_left_to_their_reader_only_with_their_hashes() {
        let dir = std::env::temp_dir().join(format!("abide-fmt-chunked-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let known: &[(&str, u32)] = &[("memory", 1), ("memory.chunks", 1)];
        let chunked: &[(&str, &str)] = &[("memory", "memory.chunks")];
        let ram = vec![7u8; 8192];
        let write = |with_hashes: bool, name: &str| {
            let mut w = Writer::new("pc-1.0", json!({}), json!({}));
            w.pages("memory", 1, vec![&ram[..]]);
            if with_hashes {
                w.section("memory.chunks", 1, true, b"{}".to_vec());
            }
            let path = dir.join(name);
            w.write_to(&path).expect("write");
            let mut bytes = std::fs::read(&path).expect("read");
            let s = Snapshot::open(&path, known).expect("intact");
            let at = s.header.sections[0].offset as usize;
            bytes[at + 100] ^= 1;
            std::fs::write(&path, &bytes).expect("corrupt");
            path
        };
        let path = write(true, "with");
        let s = Snapshot::open_chunked(&path, known, chunked).expect("memory left to its reader");
        assert!(matches!(
            s.section("memory"),
            Err(SnapshotError::BadSection { .. })
        ));
        assert!(s.mapped("memory").expect("entry").is_some());
        assert_eq!(s.section("memory.chunks").expect("hashes").1, b"{}");
        // Whole verification (what older readers do) catches the flip.
        assert!(matches!(
            Snapshot::open(&path, known),
            Err(SnapshotError::SectionChecksum(ref n)) if n == "memory"
        ));
        let path = write(false, "without");
        assert!(matches!(
            Snapshot::open_chunked(&path, known, chunked),
            Err(SnapshotError::SectionChecksum(ref n)) if n == "memory"
        ));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn file_round_trip_and_atomic_write() {
        let dir = std::env::temp_dir().join(format!("abide-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("snap");
        let ram = vec![7u8; 8192];
        let mut w = Writer::new("pc-1.0", json!({}), json!({}));
        w.pages("memory", 1, vec![&ram[..]]);
        let size = w.write_to(&path).expect("write");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), size);
        assert!(!dir.join("snap.partial").exists());
        let s = Snapshot::open(&path, KNOWN).expect("open");
        let (_, _, off, len) = s.mapped("memory").expect("entry").expect("file");
        assert_eq!((off % PAGE, len), (0, 8192));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
