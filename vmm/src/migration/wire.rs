//! The migration stream on the wire.
//!
//! ```text
//! source -> destination
//!   header        the snapshot header (format.rs) with magic "ABIDEMIG":
//!                 magic, u32 LE length, JSON (format, writer version,
//!                 machine type, full ABI manifest, VM configuration),
//!                 SHA-256
//!   frames        tag (1 byte), u32 LE length, payload:
//!     'P' pages   u64 count, count x u64 (guest address | ZERO_PAGE),
//!                 4 KiB of data per entry without ZERO_PAGE, a 64-bit
//!                 Fletcher checksum of everything before it
//!     'I' pass    JSON: end of a pre-copy pass; the destination answers
//!                 'i' once it has stored every page before it
//!     'S' section u32 length + JSON section entry (name, version,
//!                 optional, length, SHA-256) and the section's bytes
//!     'E' state end   JSON: number of sections
//!     'C' commit  JSON: ms since the source paused the guest
//!     'A' abort   JSON: why the source gave up
//! destination -> source (JSON payloads)
//!     'K' accept  'R' refuse (reason, field diff)  'i' pass stored
//!     'D' ready (all loaded)
//!     'U' resumed (the destination's downtime)     'X' error
//! ```
//!
//! Every read and write runs under the connection's timeouts, lengths are
//! bounded before anything is allocated, and every payload is checked
//! before it is used: the header and each state section with SHA-256, as
//! in a snapshot file; memory pages, the bulk of the stream, with a 64-bit
//! Fletcher checksum (SHA-256 over every page made pre-copy CPU-bound: in
//! the nested test host it ran at about 8 MiB/s end to end; the stream
//! runs over TCP or a Unix socket, which deliver bytes intact, so the
//! checksum is there to catch framing bugs, not forgery).

use std::io::{self, IoSlice, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::snapshot::format::{Header, SectionEntry, HASH_LEN, MAX_HEADER, PAGE, STREAM_MAGIC};

/// Pages (source): see the module documentation.
pub const PAGES: u8 = b'P';
/// End of a pre-copy pass (source).
pub const PASS: u8 = b'I';
/// One state section (source).
pub const SECTION: u8 = b'S';
/// All state sent (source).
pub const STATE_END: u8 = b'E';
/// Commit: the destination may run the guest (source).
pub const COMMIT: u8 = b'C';
/// The source gives up (source).
pub const ABORT: u8 = b'A';
/// The header is acceptable (destination).
pub const ACCEPT: u8 = b'K';
/// A pre-copy pass is stored (destination).
pub const PASS_STORED: u8 = b'i';
/// The destination refuses the guest (destination).
pub const REFUSE: u8 = b'R';
/// Everything is loaded (destination).
pub const READY: u8 = b'D';
/// The guest runs on the destination (destination).
pub const RESUMED: u8 = b'U';
/// The destination failed (destination).
pub const ERROR: u8 = b'X';

/// Marks a page entry whose page is all zeros (no data follows for it).
pub const ZERO_PAGE: u64 = 1;
/// Pages per `PAGES` frame.
pub const BATCH_PAGES: usize = 256;
/// Largest frame accepted (a corrupt length must not allocate GiBs).
pub const MAX_FRAME: usize = 64 << 20;

/// What went wrong reading the stream.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or timed out.
    #[error("{}", io_text(.0))]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// Not a migration stream.
    #[error("not an Abide migration stream (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// The stream breaks the protocol.
    #[error("malformed migration stream: {0}")]
    Malformed(String),
    /// Header or section refused by the shared snapshot checks.
    #[error(transparent)]
    Format(#[from] crate::snapshot::format::SnapshotError),
}

fn io_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "timed out waiting for the peer".to_string()
        }
        _ => e.to_string(),
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Closed,
        _ => WireError::Io(e),
    })
}

/// Reads exactly `len` bytes into `buf` (replacing its contents), growing
/// it only as the bytes arrive: a peer that declares a large length and
/// then sends little costs what it sent, not what it declared.
fn read_declared(r: &mut impl Read, len: usize, buf: &mut Vec<u8>) -> Result<(), WireError> {
    buf.clear();
    // Enough for any control frame at once; larger payloads grow by
    // doubling as they come.
    buf.reserve(len.min(64 << 10));
    let got = r.take(len as u64).read_to_end(buf).map_err(WireError::Io)?;
    if got < len {
        return Err(WireError::Closed);
    }
    Ok(())
}

/// Writes the stream header.
pub fn write_header(w: &mut impl Write, header: &Header) -> Result<(), WireError> {
    let bytes = header.encode(STREAM_MAGIC)?;
    w.write_all(&bytes)?;
    Ok(())
}

/// Reads and verifies the stream header.
pub fn read_header(r: &mut impl Read) -> Result<Header, WireError> {
    let mut magic = [0u8; 8];
    read_exact(r, &mut magic)?;
    if &magic != STREAM_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let mut len = [0u8; 4];
    read_exact(r, &mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HEADER {
        return Err(WireError::Malformed(format!(
            "header length {len} is implausible"
        )));
    }
    let mut json = Vec::new();
    read_declared(r, len, &mut json)?;
    let mut hash = [0u8; HASH_LEN];
    read_exact(r, &mut hash)?;
    Ok(Header::decode(&json, &hash)?)
}

/// Writes one frame made of `parts`.
pub fn write_frame(w: &mut impl Write, tag: u8, parts: &[&[u8]]) -> Result<(), WireError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).map_err(|_| WireError::Malformed("frame too large".into()))?;
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&len.to_le_bytes());
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
    slices.push(IoSlice::new(&head));
    slices.extend(parts.iter().map(|p| IoSlice::new(p)));
    write_all_vectored(w, &mut slices)?;
    Ok(())
}

fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a frame with a JSON payload.
pub fn write_json<T: Serialize>(w: &mut impl Write, tag: u8, v: &T) -> Result<(), WireError> {
    let body = serde_json::to_vec(v).map_err(|e| WireError::Malformed(e.to_string()))?;
    write_frame(w, tag, &[&body])
}

/// Reads one frame into `buf`; returns its tag.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<u8, WireError> {
    let mut head = [0u8; 5];
    read_exact(r, &mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(WireError::Malformed(format!(
            "frame '{}' of {len} bytes is implausible",
            char::from(head[0]).escape_default()
        )));
    }
    read_declared(r, len, buf)?;
    Ok(head[0])
}

/// The error for a frame that has no business at this point.
pub fn unexpected(tag: u8) -> WireError {
    WireError::Malformed(format!(
        "unexpected frame '{}'",
        char::from(tag).escape_default()
    ))
}

/// Parses a JSON payload.
pub fn parse_json<T: DeserializeOwned>(tag: u8, buf: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(buf).map_err(|e| {
        WireError::Malformed(format!(
            "frame '{}' does not parse: {e}",
            char::from(tag).escape_default()
        ))
    })
}

/// The text of an error-like JSON payload (`{"error": ...}`).
pub fn error_text(buf: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(buf)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(buf).into_owned())
}

/// A 64-bit Fletcher checksum over 8-byte little-endian words of `parts`
/// taken as one byte string (every part but the last a multiple of 8
/// bytes long; a short last word is zero-padded).
pub fn fletcher64(parts: &[&[u8]]) -> u64 {
    let (mut a, mut b) = (0u64, 0u64);
    for part in parts {
        let mut words = part.chunks_exact(8);
        for w in &mut words {
            let mut x = [0u8; 8];
            x.copy_from_slice(w);
            a = a.wrapping_add(u64::from_le_bytes(x));
            b = b.wrapping_add(a);
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut x = [0u8; 8];
            x[..rest.len()].copy_from_slice(rest);
            a = a.wrapping_add(u64::from_le_bytes(x));
            b = b.wrapping_add(a);
        }
    }
    a ^ b.rotate_left(32)
}

const CHECKSUM_LEN: usize = 8;

/// Pages gathered for one `PAGES` frame.
#[derive(Debug, Default)]
pub struct PageBatch {
    entries: Vec<u8>,
    data: Vec<u8>,
    count: u64,
}

/// Whether `page` is all zeros.
pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to gives the aligned
    // middle part and the unaligned rest.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

impl PageBatch {
    /// Adds the 4 KiB page at `gpa`; a zero page travels as its address
    /// only. Returns whether it was a zero page.
    pub fn push(&mut self, gpa: u64, page: &[u8]) -> bool {
        let zero = is_zero(page);
        let entry = if zero { gpa | ZERO_PAGE } else { gpa };
        self.entries.extend_from_slice(&entry.to_le_bytes());
        if !zero {
            self.data.extend_from_slice(page);
        }
        self.count += 1;
        zero
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Sends the batch and empties it; returns the bytes written.
    pub fn send(&mut self, w: &mut impl Write) -> Result<u64, WireError> {
        let count = self.count.to_le_bytes();
        let sum = fletcher64(&[&count, &self.entries, &self.data]).to_le_bytes();
        write_frame(w, PAGES, &[&count, &self.entries, &self.data, &sum])?;
        let n = 5 + 8 + self.entries.len() + self.data.len() + CHECKSUM_LEN;
        self.entries.clear();
        self.data.clear();
        self.count = 0;
        Ok(n as u64)
    }
}

/// A received page: its guest address and bytes (`None`: a zero page).
pub type Page<'a> = (u64, Option<&'a [u8]>);

/// A verified `PAGES` payload.
pub fn parse_pages(buf: &[u8]) -> Result<Vec<Page<'_>>, WireError> {
    let bad = |why: &str| WireError::Malformed(format!("page frame: {why}"));
    if buf.len() < 8 + CHECKSUM_LEN {
        return Err(bad("too short"));
    }
    let (body, sum) = buf.split_at(buf.len() - CHECKSUM_LEN);
    if fletcher64(&[body]).to_le_bytes() != sum {
        return Err(bad("checksum mismatch"));
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&body[..8]);
    let count = usize::try_from(u64::from_le_bytes(c)).unwrap_or(usize::MAX);
    let entries_len = count
        .checked_mul(8)
        .filter(|n| 8 + n <= body.len())
        .ok_or_else(|| bad("more entries than bytes"))?;
    let (entries, mut data) = body[8..].split_at(entries_len);
    let mut out = Vec::with_capacity(count);
    for e in entries.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(e);
        let entry = u64::from_le_bytes(b);
        let gpa = entry & !(PAGE - 1);
        if entry & ZERO_PAGE != 0 {
            out.push((gpa, None));
        } else {
            if data.len() < PAGE as usize {
                return Err(bad("page data cut short"));
            }
            let (page, rest) = data.split_at(PAGE as usize);
            out.push((gpa, Some(page)));
            data = rest;
        }
    }
    if !data.is_empty() {
        return Err(bad("data past the last page"));
    }
    Ok(out)
}

/// Sends one state section.
pub fn write_section(
    w: &mut impl Write,
    name: &str,
    version: u32,
    optional: bool,
    bytes: &[u8],
) -> Result<(), WireError> {
    let entry = SectionEntry {
        name: name.to_string(),
        version,
        optional,
        offset: 0,
        length: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
    };
    let json = serde_json::to_vec(&entry).map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = (json.len() as u32).to_le_bytes();
    write_frame(w, SECTION, &[&len, &json, bytes])
}

/// Parses a `SECTION` payload, checking its length and checksum.
pub fn parse_section(buf: &[u8]) -> Result<(SectionEntry, &[u8]), WireError> {
    let bad = |why: String| WireError::Malformed(format!("section frame: {why}"));
    if buf.len() < 4 {
        return Err(bad("too short".into()));
    }
    let n = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if 4 + n > buf.len() {
        return Err(bad("entry cut short".into()));
    }
    let entry: SectionEntry =
        serde_json::from_slice(&buf[4..4 + n]).map_err(|e| bad(e.to_string()))?;
    let bytes = &buf[4 + n..];
    if bytes.len() as u64 != entry.length {
        return Err(bad(format!(
            "'{}' has {} bytes, its entry says {}",
            entry.name,
            bytes.len(),
            entry.length
        )));
    }
    if hex::encode(Sha256::digest(bytes)) != entry.sha256 {
        return Err(WireError::Format(
            crate::snapshot::format::SnapshotError::SectionChecksum(entry.name.clone()),
        ));
    }
    Ok((entry, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pages_round_trip_and_zero_pages_carry_no_data() {
        let mut b = PageBatch::default();
        let page = vec![7u8; 4096];
        let zero = vec![0u8; 4096];
        assert!(!b.push(0x1000, &page));
        assert!(b.push(0x5000, &zero));
        let mut out = Vec::new();
        let n = b.send(&mut out).expect("send");
        assert_eq!(n as usize, out.len());
        assert!(out.len() < 2 * 4096, "a zero page carries no data");
        let mut r = &out[..];
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).expect("frame"), PAGES);
        let pages = parse_pages(&buf).expect("parse");
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[0], (0x1000, Some(&page[..])));
        assert_eq!(pages[1], (0x5000, None));
        // Any flipped byte is caught, and so are swapped words.
        for i in (0..buf.len()).step_by(97) {
            let mut c = buf.clone();
            c[i] ^= 0x10;
            assert!(parse_pages(&c).is_err(), "flip at {i}");
        }
        let mut c = buf.clone();
        c[16..24].copy_from_slice(&buf[24..32]);
        c[24..32].copy_from_slice(&buf[16..24]);
        assert!(parse_pages(&c).is_err(), "swapped words");
    }

    #[test]
    fn frames_refuse_truncation_and_huge_lengths() {
        let mut out = Vec::new();
        write_json(&mut out, READY, &json!({"ok": true})).expect("write");
        for cut in 0..out.len() {
            let mut r = &out[..cut];
            assert!(read_frame(&mut r, &mut Vec::new()).is_err(), "cut {cut}");
        }
        let mut huge = vec![PAGES];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut r = &huge[..];
        let e = read_frame(&mut r, &mut Vec::new()).expect_err("huge");
        assert!(e.to_string().contains("implausible"), "{e}");
    }

    /// A frame or header that declares a large length (within the limits)
    /// and then ends costs what arrived, not what was declared.
    #[test]
    fn declared_lengths_are_not_allocated_before_the_bytes_arrive() {
        let declared = MAX_FRAME - 1;
        let mut frame = vec![SECTION];
        frame.extend_from_slice(&(declared as u32).to_le_bytes());
        frame.extend_from_slice(&[7u8; 100]);
        let mut buf = Vec::new();
        let e = read_frame(&mut &frame[..], &mut buf).expect_err("cut short");
        assert!(matches!(e, WireError::Closed), "{e}");
        assert!(
            buf.capacity() < 1 << 20,
            "{} bytes reserved for a frame that sent 100",
            buf.capacity()
        );
        let mut header = STREAM_MAGIC.to_vec();
        header.extend_from_slice(&((MAX_HEADER - 1) as u32).to_le_bytes());
        header.extend_from_slice(b"{\"format\":");
        let e = read_header(&mut &header[..]).expect_err("cut short");
        assert!(matches!(e, WireError::Closed), "{e}");
    }

    #[test]
    fn header_magic_and_checksum_are_checked() {
        let h = Header::new("pc-1.0", json!({"machine": "pc-1.0"}), json!({}));
        let mut out = Vec::new();
        write_header(&mut out, &h).expect("write");
        assert_eq!(read_header(&mut &out[..]).expect("read"), h);
        let mut garbage = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        garbage.resize(100, 0);
        let e = read_header(&mut &garbage[..]).expect_err("garbage");
        assert!(
            e.to_string().contains("not an Abide migration stream"),
            "{e}"
        );
        let mut snap = out.clone();
        snap[..8].copy_from_slice(b"ABIDESNP");
        assert!(matches!(
            read_header(&mut &snap[..]),
            Err(WireError::BadMagic(_))
        ));
        let mut flipped = out.clone();
        flipped[20] ^= 1;
        assert!(read_header(&mut &flipped[..]).is_err());
        assert!(matches!(
            read_header(&mut &out[..out.len() - 1]),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn sections_are_checked() {
        let mut out = Vec::new();
        write_section(&mut out, "vcpu.0", 1, false, b"{\"a\":1}").expect("write");
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut &out[..], &mut buf).expect("frame"), SECTION);
        let (e, bytes) = parse_section(&buf).expect("parse");
        assert_eq!(
            (e.name.as_str(), e.version, bytes),
            ("vcpu.0", 1, &b"{\"a\":1}"[..])
        );
        let last = buf.len() - 1;
        buf[last] ^= 1;
        let err = parse_section(&buf).expect_err("corrupt");
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
