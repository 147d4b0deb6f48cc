//! The source side: pre-copy, convergence, stop-and-copy, commit.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::endpoint::{connect, Conn, Endpoint};
use super::wire::{self, PageBatch, WireError, BATCH_PAGES};
use super::{mib_s, MigrationError, Progress, Report, CONNECT_TIMEOUT, IO_TIMEOUT, MAX_PASSES};
use crate::snapshot::format::{Header, PAGE};
use crate::snapshot::state;
use crate::vcpu::Vcpus;
use crate::vm::Vm;

/// How to migrate.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// The destination.
    pub to: Endpoint,
    /// Longest acceptable pause of the guest.
    pub max_downtime: Duration,
    /// Bandwidth limit in bytes per second (pre-copy only).
    pub max_bandwidth: Option<u64>,
    /// Bound on the whole migration.
    pub timeout: Duration,
}

impl SendOptions {
    /// Options with the defaults for `to`.
    pub fn new(to: Endpoint) -> Self {
        Self {
            to,
            max_downtime: super::DEFAULT_MAX_DOWNTIME,
            max_bandwidth: None,
            timeout: super::DEFAULT_TIMEOUT,
        }
    }
}

/// Why a migration ended without the source exiting.
#[derive(Debug)]
pub enum SendError {
    /// Failed before *commit*: the source runs as it did before.
    Failed(MigrationError),
    /// The link failed after *commit*: the destination may or may not run
    /// the guest. The source stays paused; the operator decides.
    Unconfirmed(MigrationError),
}

impl SendError {
    /// The underlying error.
    pub fn error(&self) -> &MigrationError {
        match self {
            SendError::Failed(e) | SendError::Unconfirmed(e) => e,
        }
    }
}

/// Pages of each RAM region, one bit per page.
struct PageBits {
    regions: Vec<(u64, Vec<u64>)>,
}

impl PageBits {
    fn empty(vm: &Vm) -> Self {
        Self {
            regions: vm
                .ram
                .mem
                .iter()
                .map(|r| {
                    (
                        r.start_addr().0,
                        vec![0u64; (r.len() / PAGE).div_ceil(64) as usize],
                    )
                })
                .collect(),
        }
    }

    /// Sets the page at `gpa`; returns whether it was set before.
    fn set(&mut self, gpa: u64) -> bool {
        for (base, bits) in &mut self.regions {
            if gpa < *base {
                continue;
            }
            let page = ((gpa - *base) / PAGE) as usize;
            if let Some(w) = bits.get_mut(page / 64) {
                let m = 1u64 << (page % 64);
                let was = *w & m != 0;
                *w |= m;
                return was;
            }
        }
        false
    }

    /// ORs per-region bitmaps (in region order) into this set.
    fn merge(&mut self, other: Vec<Vec<u64>>) {
        for ((_, bits), o) in self.regions.iter_mut().zip(other) {
            for (b, o) in bits.iter_mut().zip(o) {
                *b |= o;
            }
        }
    }

    fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|(_, b)| b.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Takes the addresses of the set pages, clearing the set.
    fn drain(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for (base, bits) in &mut self.regions {
            for (i, w) in bits.iter_mut().enumerate() {
                let mut v = std::mem::take(w);
                while v != 0 {
                    let b = v.trailing_zeros() as u64;
                    v &= v - 1;
                    out.push(*base + (i as u64 * 64 + b) * PAGE);
                }
            }
        }
        out
    }
}

/// The sending state of one migration.
struct Sender<'a> {
    vm: &'a Vm,
    conn: Conn,
    opts: &'a SendOptions,
    cancel: &'a AtomicBool,
    start: Instant,
    sent: PageBits,
    batch: PageBatch,
    page: Vec<u8>,
    bytes: u64,
    pages_sent: u64,
    pages_resent: u64,
    /// Bytes and time spent sending, for the bandwidth.
    send_bytes: u64,
    send_time: Duration,
    /// Time reading guest memory, and hashing and writing frames.
    copy_time: Duration,
    write_time: Duration,
    /// Stop-and-copy steps, in order.
    phases: serde_json::Map<String, serde_json::Value>,
    /// The last measured dirty rate (MiB/s), dirty bytes and pass.
    dirty_rate: f64,
    dirty_bytes: u64,
    passes: u32,
    /// What the destination reads (from its handshake answer).
    reads: Option<crate::compat::Reads>,
}

/// Turns a stream error into the migration error for `phase`, adding what
/// the destination said if it sent an error before the stream broke.
fn stream(conn: &mut Conn, phase: &'static str, source: WireError) -> MigrationError {
    let mut peer = None;
    if matches!(source, WireError::Io(_) | WireError::Closed) {
        // The destination may have written why it stopped before closing.
        let _ = match conn {
            Conn::Tcp(s) => s.set_read_timeout(Some(Duration::from_millis(200))),
            Conn::Unix(s) => s.set_read_timeout(Some(Duration::from_millis(200))),
        };
        let mut buf = Vec::new();
        if let Ok(tag) = wire::read_frame(conn, &mut buf) {
            if tag == wire::ERROR || tag == wire::REFUSE {
                peer = Some(wire::error_text(&buf));
            }
        }
    }
    MigrationError::Stream {
        phase,
        source,
        peer,
    }
}

impl Sender<'_> {
    fn check_limits(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(MigrationError::Cancelled);
        }
        if self.start.elapsed() > self.opts.timeout {
            if self.passes == 0 && self.dirty_bytes == 0 {
                return Err(MigrationError::Timeout(self.opts.timeout.as_secs()));
            }
            return Err(self.no_convergence(format!(
                "--timeout {} s reached",
                self.opts.timeout.as_secs()
            )));
        }
        Ok(())
    }

    fn no_convergence(&self, limit: String) -> MigrationError {
        MigrationError::NoConvergence {
            dirty_mib_s: self.dirty_rate,
            bandwidth_mib_s: self.bandwidth() / (1024.0 * 1024.0),
            remaining_mib: self.dirty_bytes as f64 / (1024.0 * 1024.0),
            passes: self.passes,
            elapsed_s: self.start.elapsed().as_secs_f64(),
            limit,
        }
    }

    fn phase(&mut self, name: &str, since: Instant) {
        self.phases
            .insert(name.to_string(), json!(crate::api::ms(since)));
    }

    fn bandwidth(&self) -> f64 {
        let secs = self.send_time.as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.send_bytes as f64 / secs
    }

    fn flush_batch(&mut self, phase: &'static str) -> Result<(), MigrationError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let sent = self.batch.send(&mut self.conn);
        self.write_time += t.elapsed();
        match sent {
            Ok(n) => {
                self.bytes += n;
                Ok(())
            }
            Err(e) => Err(stream(&mut self.conn, phase, e)),
        }
    }

    /// Sends the pages at `gpas`. In the first pass (`skip_zero`) zero
    /// pages are left out: the destination's memory starts out zero.
    fn send_pages(
        &mut self,
        gpas: impl Iterator<Item = u64>,
        skip_zero: bool,
        paced: bool,
        phase: &'static str,
    ) -> Result<u64, MigrationError> {
        let t = Instant::now();
        let before = self.bytes;
        let mut n = 0u64;
        for gpa in gpas {
            let c = Instant::now();
            self.vm
                .ram
                .mem
                .read_slice(&mut self.page, GuestAddress(gpa))
                .map_err(|e| MigrationError::Memory(format!("reading {gpa:#x}: {e}")))?;
            let zero = skip_zero && wire::is_zero(&self.page);
            self.copy_time += c.elapsed();
            if zero {
                continue;
            }
            if self.sent.set(gpa) {
                self.pages_resent += 1;
            }
            self.batch.push(gpa, &self.page);
            n += 1;
            if self.batch.len() >= BATCH_PAGES {
                self.flush_batch(phase)?;
                if paced {
                    self.check_limits()?;
                    self.pace(t, self.bytes - before);
                }
            }
        }
        self.flush_batch(phase)?;
        self.pages_sent += n;
        self.send_bytes += self.bytes - before;
        self.send_time += t.elapsed();
        Ok(n)
    }

    /// Sleeps as long as `--max-bandwidth` asks.
    fn pace(&self, since: Instant, bytes: u64) {
        if let Some(limit) = self.opts.max_bandwidth.filter(|l| *l > 0) {
            let due = Duration::from_secs_f64(bytes as f64 / limit as f64);
            if let Some(wait) = due.checked_sub(since.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }

    fn progress(&self, iteration: u32, pages: u64, dirty: u64, dirty_rate: f64) -> Progress {
        Progress {
            iteration,
            pages,
            dirty_pages: dirty,
            dirty_rate_mib_s: dirty_rate,
            bandwidth_mib_s: self.bandwidth() / (1024.0 * 1024.0),
            bytes: self.bytes,
            elapsed_ms: crate::api::ms(self.start),
        }
    }

    fn take_dirty(&self, into: &mut PageBits) -> Result<(), MigrationError> {
        let bits = self
            .vm
            .ram
            .take_dirty(&self.vm.vm)
            .map_err(|e| MigrationError::Memory(e.to_string()))?;
        into.merge(bits);
        Ok(())
    }

    /// Reads the destination's answer to the header.
    fn handshake(&mut self) -> Result<(), MigrationError> {
        let (manifest, host) = state::header_parts(self.vm)?;
        let header = Header::new(&self.vm.machine.name, manifest, host);
        const PHASE: &str = "sending the header";
        wire::write_header(&mut self.conn, &header)
            .map_err(|e| stream(&mut self.conn, PHASE, e))?;
        let mut buf = Vec::new();
        let tag = wire::read_frame(&mut self.conn, &mut buf)
            .map_err(|e| stream(&mut self.conn, "waiting for the destination to accept", e))?;
        match tag {
            wire::ACCEPT => self.fit_destination(&buf),
            wire::REFUSE => Err(MigrationError::Refused(wire::error_text(&buf))),
            wire::ERROR => Err(MigrationError::Destination(wire::error_text(&buf))),
            t => Err(MigrationError::Stream {
                phase: "waiting for the destination to accept",
                source: wire::unexpected(t),
                peer: None,
            }),
        }
    }

    /// Checks, before the guest is paused, that the destination reads every
    /// section this guest's state needs (what its *accept* says it reads;
    /// a destination that predates that field reads what the oldest
    /// release with live migration reads), then sends the option ROM
    /// images (optional sections, skipped by destinations that do not know
    /// them) so the destination serves the guest's own images.
    fn fit_destination(&mut self, accept: &[u8]) -> Result<(), MigrationError> {
        let reads = crate::compat::Reads::of_destination(accept)
            .map_err(|e| MigrationError::Target(e.to_string()))?;
        crate::compat::check_guest(
            &self.vm.machine.name,
            self.vm.cfg.firmware.is_some(),
            &reads,
        )
        .map_err(|e| MigrationError::Target(e.to_string()))?;
        crate::compat::check(&state::plan(self.vm), &reads)
            .map_err(|e| MigrationError::Target(e.to_string()))?;
        const PHASE: &str = "sending the option ROM images";
        for s in state::images(self.vm) {
            wire::write_section(&mut self.conn, &s.name, s.version, s.optional, &s.bytes)
                .map_err(|e| stream(&mut self.conn, PHASE, e))?;
            self.bytes += s.bytes.len() as u64;
        }
        self.reads = Some(reads);
        Ok(())
    }

    /// Pre-copy passes; returns the pages still dirty when they converged.
    fn precopy(
        &mut self,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(PageBits, u32), MigrationError> {
        let populated = self.vm.ram.populated();
        let first = populated
            .iter()
            .flat_map(|&(gpa, len)| (0..len / PAGE).map(move |i| gpa + i * PAGE));
        let t0 = Instant::now();
        let pages = self.send_pages(first, true, true, "sending memory")?;
        self.pass_marker(0, pages)?;
        progress(&self.progress(0, pages, 0, 0.0));
        let mut last_sync = t0;
        let mut pending = PageBits::empty(self.vm);
        let mut before = None;
        loop {
            self.take_dirty(&mut pending)?;
            let now = Instant::now();
            let dirty = pending.count();
            self.dirty_bytes = dirty * PAGE;
            self.dirty_rate = mib_s(self.dirty_bytes, (now - last_sync).as_secs_f64());
            last_sync = now;
            let bw = self.bandwidth().max(1.0);
            let estimate = Duration::from_secs_f64(self.dirty_bytes as f64 / bw);
            let limit = self.opts.max_downtime;
            if super::converged(estimate, limit, dirty, before, self.passes) {
                return Ok((pending, self.passes));
            }
            before = Some(dirty);
            self.check_limits()?;
            if self.passes >= MAX_PASSES {
                return Err(self.no_convergence(format!(
                    "the last pass would need {} ms of downtime, the limit is {} ms",
                    estimate.as_millis(),
                    self.opts.max_downtime.as_millis()
                )));
            }
            self.passes += 1;
            let pass = self.passes;
            let gpas = pending.drain();
            let pages = self.send_pages(gpas.into_iter(), false, true, "sending memory")?;
            self.pass_marker(pass, pages)?;
            progress(&self.progress(pass, pages, dirty, self.dirty_rate));
        }
    }

    /// Ends a pass and waits until the destination has stored it, so that
    /// the bandwidth is measured end to end and nothing is left queued for
    /// the destination when the guest is paused.
    fn pass_marker(&mut self, pass: u32, pages: u64) -> Result<(), MigrationError> {
        const PHASE: &str = "sending memory";
        let t = Instant::now();
        wire::write_json(
            &mut self.conn,
            wire::PASS,
            &json!({"iteration": pass, "pages": pages}),
        )
        .map_err(|e| stream(&mut self.conn, PHASE, e))?;
        let mut buf = Vec::new();
        let r = wire::read_frame(&mut self.conn, &mut buf);
        self.send_time += t.elapsed();
        self.write_time += t.elapsed();
        match r {
            Ok(wire::PASS_STORED) => Ok(()),
            Ok(wire::ERROR) => Err(MigrationError::Destination(wire::error_text(&buf))),
            Ok(t) => Err(MigrationError::Stream {
                phase: PHASE,
                source: wire::unexpected(t),
                peer: None,
            }),
            Err(e) => Err(stream(&mut self.conn, PHASE, e)),
        }
    }

    /// With the guest paused: the last pages, every state section, and the
    /// destination's *ready*. Returns the number of final pages.
    fn stop_and_copy(
        &mut self,
        vcpus: &Mutex<Vcpus>,
        mut pending: PageBits,
    ) -> Result<u64, MigrationError> {
        let t = Instant::now();
        for f in &self.vm.disk_files {
            f.sync_data()
                .map_err(|e| MigrationError::Memory(format!("cannot flush a disk image: {e}")))?;
        }
        self.phase("flush_ms", t);
        let t = Instant::now();
        self.take_dirty(&mut pending)?;
        let gpas = pending.drain();
        let n = self.send_pages(gpas.into_iter(), false, false, "sending the last pages")?;
        self.phase("last_pages_ms", t);
        let t = Instant::now();
        let sections = {
            let v = vcpus.lock().unwrap_or_else(|e| e.into_inner());
            state::collect(self.vm, &v)?
        };
        if let Some(reads) = &self.reads {
            // The state may have changed since the check before pre-copy.
            crate::compat::check(
                &crate::compat::written(&sections, &state::plan(self.vm)),
                reads,
            )
            .map_err(|e| MigrationError::Target(e.to_string()))?;
        }
        self.phase("collect_ms", t);
        const PHASE: &str = "sending the device and vCPU state";
        // One write for all of it: the destination wakes once, not once a
        // section.
        let mut out = Vec::new();
        for s in &sections {
            wire::write_section(&mut out, &s.name, s.version, s.optional, &s.bytes)
                .map_err(|e| stream(&mut self.conn, PHASE, e))?;
        }
        wire::write_json(
            &mut out,
            wire::STATE_END,
            &json!({"sections": sections.len()}),
        )
        .map_err(|e| stream(&mut self.conn, PHASE, e))?;
        self.conn
            .write_all(&out)
            .map_err(|e| stream(&mut self.conn, PHASE, WireError::Io(e)))?;
        self.bytes += out.len() as u64;
        self.phase("state_ms", t);
        let t = Instant::now();
        let mut buf = Vec::new();
        const WAIT: &str = "waiting for the destination to load the state";
        let ready = wire::read_frame(&mut self.conn, &mut buf);
        self.phase("ready_wait_ms", t);
        match ready {
            Ok(wire::READY) => Ok(n),
            Ok(wire::ERROR) | Ok(wire::REFUSE) => {
                Err(MigrationError::Destination(wire::error_text(&buf)))
            }
            Ok(t) => Err(MigrationError::Stream {
                phase: WAIT,
                source: wire::unexpected(t),
                peer: None,
            }),
            Err(e) => Err(stream(&mut self.conn, WAIT, e)),
        }
    }
}

/// Migrates `vm` (running or paused) to `opts.to`. On success the guest
/// runs at the destination and this VM must not run again: the caller
/// ends. `progress` is called after each pre-copy pass; `cancel` is
/// checked between batches (before *commit* only).
pub fn send(
    vm: &Vm,
    vcpus: &Mutex<Vcpus>,
    opts: &SendOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, SendError> {
    let start = Instant::now();
    let conn = connect(&opts.to, CONNECT_TIMEOUT).map_err(|source| {
        SendError::Failed(MigrationError::Connect {
            to: opts.to.to_string(),
            source,
        })
    })?;
    let _ = conn.set_timeouts(IO_TIMEOUT);
    let mut s = Sender {
        vm,
        conn,
        opts,
        cancel,
        start,
        sent: PageBits::empty(vm),
        batch: PageBatch::default(),
        page: vec![0u8; PAGE as usize],
        bytes: 0,
        pages_sent: 0,
        pages_resent: 0,
        send_bytes: 0,
        send_time: Duration::ZERO,
        copy_time: Duration::ZERO,
        write_time: Duration::ZERO,
        phases: serde_json::Map::new(),
        dirty_rate: 0.0,
        dirty_bytes: 0,
        passes: 0,
        reads: None,
    };
    let was_paused = vcpus.lock().unwrap_or_else(|e| e.into_inner()).is_paused();
    let abort = |s: &mut Sender<'_>, e: MigrationError| {
        let _ = wire::write_json(&mut s.conn, wire::ABORT, &json!({"error": e.to_string()}));
        s.conn.shutdown();
        SendError::Failed(e)
    };
    if let Err(e) = s.handshake() {
        return Err(abort(&mut s, e));
    }
    // A restored VM whose memory is still coming in: all of it first (the
    // guest runs meanwhile); pre-copy reads populated memory only.
    if let Some(l) = &vm.lazy {
        if let Err(e) = l.wait_loaded() {
            return Err(abort(&mut s, MigrationError::Memory(e.to_string())));
        }
    }
    if let Err(e) = vm.ram.set_dirty_logging(&vm.vm, true) {
        return Err(abort(&mut s, MigrationError::Memory(e.to_string())));
    }
    let stop_logging = || {
        let _ = vm.ram.set_dirty_logging(&vm.vm, false);
    };
    let precopy_start = Instant::now();
    let (pending, passes) = match s.precopy(progress) {
        Ok(r) => r,
        Err(e) => {
            stop_logging();
            return Err(abort(&mut s, e));
        }
    };
    let precopy_ms = crate::api::ms(precopy_start);
    // The collecting code runs once now, not for the first time in the
    // pause.
    let t = Instant::now();
    state::rehearse_collect(vm);
    s.phase("rehearse_ms", t);
    // Stop-and-copy: from here the guest is paused.
    let paused_at = Instant::now();
    let paused = {
        let mut v = vcpus.lock().unwrap_or_else(|e| e.into_inner());
        vm.pause(&mut v)
    };
    s.phase("pause_ms", paused_at);
    if let Err(e) = paused {
        stop_logging();
        return Err(abort(&mut s, e.into()));
    }
    if let Some(reason) = vm.exit.reason() {
        // The guest powered off or reset just before the pause: it ends
        // here, as it asked, and is not sent anywhere.
        stop_logging();
        return Err(abort(
            &mut s,
            MigrationError::GuestEnded(format!("{reason:?}")),
        ));
    }
    let resume_here = |s: &mut Sender<'_>, e: MigrationError| {
        stop_logging();
        let err = abort(s, e);
        if !was_paused {
            let mut v = vcpus.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(r) = vm.resume(&mut v) {
                eprintln!(
                    "abide: error: cannot resume the guest after the failed migration: {}",
                    crate::error_chain(&r)
                );
            }
        }
        err
    };
    let final_pages = match s.stop_and_copy(vcpus, pending) {
        Ok(n) => n,
        Err(e) => return Err(resume_here(&mut s, e)),
    };
    let paused_ms = crate::api::ms(paused_at);
    let committed_at = Instant::now();
    if let Err(e) = wire::write_json(&mut s.conn, wire::COMMIT, &json!({"paused_ms": paused_ms})) {
        // Not written: the destination cannot have it.
        let e = stream(&mut s.conn, "sending commit", e);
        return Err(resume_here(&mut s, e));
    }
    // Committed: whatever happens now, this side must not run the guest.
    let mut buf = Vec::new();
    const WAIT: &str = "waiting for the destination to resume the guest (after commit)";
    let resumed =
        match wire::read_frame(&mut s.conn, &mut buf) {
            Ok(wire::RESUMED) => wire::parse_json::<serde_json::Value>(wire::RESUMED, &buf)
                .map_err(|e| MigrationError::Stream {
                    phase: WAIT,
                    source: e,
                    peer: None,
                }),
            Ok(wire::ERROR) => Err(MigrationError::Destination(wire::error_text(&buf))),
            Ok(t) => Err(MigrationError::Stream {
                phase: WAIT,
                source: wire::unexpected(t),
                peer: None,
            }),
            Err(e) => Err(MigrationError::Stream {
                phase: WAIT,
                source: e,
                peer: None,
            }),
        };
    let downtime_ms = crate::api::ms(paused_at);
    let resumed = resumed.map_err(SendError::Unconfirmed)?;
    s.conn.shutdown();
    s.phase("resume_wait_ms", committed_at);
    let mut phases = serde_json::Map::new();
    phases.insert("precopy_ms".into(), json!(precopy_ms));
    phases.insert("copy_ms".into(), json!(s.copy_time.as_secs_f64() * 1e3));
    phases.insert("send_ms".into(), json!(s.write_time.as_secs_f64() * 1e3));
    phases.extend(std::mem::take(&mut s.phases));
    if let Some(d) = resumed["phases"].as_object() {
        for (k, v) in d {
            phases.insert(format!("destination_{k}"), v.clone());
        }
    }
    Ok(Report {
        status: "migrated",
        downtime_ms,
        destination_downtime_ms: resumed["downtime_ms"].as_f64().unwrap_or(0.0),
        total_ms: crate::api::ms(start),
        iterations: passes,
        bytes: s.bytes,
        pages_sent: s.pages_sent,
        pages_resent: s.pages_resent,
        final_pages,
        to: opts.to.to_string(),
        phases,
    })
}
