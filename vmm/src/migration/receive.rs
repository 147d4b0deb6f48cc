//! The destination side: check the guest ABI, build the VM, take memory
//! and state, answer *ready*, wait for *commit*.

use std::time::Instant;

use serde_json::json;
use vm_memory::{Bytes, GuestAddress};

use super::endpoint::Conn;
use super::wire::{self, WireError};
use super::{MigrationError, IO_TIMEOUT};
use crate::snapshot::format::accept_section;
use crate::snapshot::state::{self, Sections};
use crate::snapshot::{Overrides, KNOWN_SECTIONS};
use crate::vm::{Start, Started, Vm};

/// How to receive.
#[derive(Clone, Debug, Default)]
pub struct ReceiveOptions {
    /// Host-side settings that differ from the source's (as for restore).
    pub overrides: Overrides,
}

/// A received guest: built, loaded, committed, and running here (its
/// vCPU threads started parked before *ready* and were let go at
/// *commit*); the source has been told.
pub struct Incoming {
    /// The VM.
    pub vm: Vm,
    /// Its vCPU threads.
    pub(crate) started: Started,
    /// The guest's downtime as this side saw it (the source's pause up
    /// to *commit*, then up to the guest running here).
    pub downtime_ms: f64,
    /// The source's Abide version.
    pub source_version: String,
    /// Bytes received.
    pub bytes: u64,
    /// Pages received.
    pub pages: u64,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("source_version", &self.source_version)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

fn stream(phase: &'static str) -> impl FnOnce(WireError) -> MigrationError {
    move |source| MigrationError::Stream {
        phase,
        source,
        peer: None,
    }
}

fn unexpected(phase: &'static str, tag: u8) -> MigrationError {
    MigrationError::Stream {
        phase,
        source: wire::unexpected(tag),
        peer: None,
    }
}

/// Tells the source why this side gives up (best effort) and passes the
/// error on.
fn tell(conn: &mut Conn, tag: u8, e: MigrationError) -> MigrationError {
    let text = crate::error_chain(&e);
    let _ = wire::write_json(conn, tag, &json!({"error": text}));
    conn.shutdown();
    e
}

/// Receives one migration on `conn`. Returns once the source committed:
/// the guest is then this process's to run. Any failure before that ends
/// here, with nothing run.
pub fn receive(
    mut conn: Conn,
    o: &ReceiveOptions,
    status: &mut dyn FnMut(&str),
) -> Result<Incoming, MigrationError> {
    let _ = conn.set_timeouts(IO_TIMEOUT);
    status("checking the guest ABI");
    let header = match wire::read_header(&mut conn) {
        Ok(h) => h,
        Err(e) => {
            return Err(tell(
                &mut conn,
                wire::ERROR,
                stream("reading the header")(e),
            ))
        }
    };
    let refuse = |conn: &mut Conn, e: MigrationError| tell(conn, wire::REFUSE, e);
    // The source sends its option ROM images after this header: their
    // fields are compared once the images are in (`state::check_roms`).
    let (cfg, diffs) = match state::config_for(&header, &o.overrides, &Default::default()) {
        Ok((cfg, diffs)) => (
            cfg,
            diffs
                .into_iter()
                .filter(|d| !state::is_rom_image_field(d))
                .collect::<Vec<_>>(),
        ),
        Err(e) => return Err(refuse(&mut conn, e.into())),
    };
    if !diffs.is_empty() {
        let e = MigrationError::AbiMismatch {
            machine: header.machine.clone(),
            diffs,
        };
        return Err(refuse(&mut conn, e));
    }
    let machine = match abide_machines::resolve(&cfg.machine) {
        Ok(m) => m,
        Err(e) => return Err(refuse(&mut conn, crate::Error::from(e).into())),
    };
    let mut vm = match Vm::build_with(machine, &cfg, Start::Restore)
        .and_then(|mut vm| vm.await_slots().map(|()| vm))
    {
        Ok(vm) => vm,
        Err(e) => return Err(refuse(&mut conn, e.into())),
    };
    // The load code runs once now, not for the first time in the pause.
    let t = Instant::now();
    if let Err(e) = state::rehearse_load(&mut vm) {
        return Err(refuse(&mut conn, e.into()));
    }
    let rehearse_ms = crate::api::ms(t);
    // The vCPU threads start while memory arrives; at the switch-over they
    // only take their vCPUs.
    let t = Instant::now();
    if let Err(e) = vm.start_threads_early() {
        return Err(refuse(&mut conn, e.into()));
    }
    let early_threads_ms = crate::api::ms(t);
    let mut report = take(&mut conn, &mut vm, &header, status)?;
    report.phases["early_threads_ms"] = json!(early_threads_ms);
    report.phases["rehearse_ms"] = json!(rehearse_ms);
    // The vCPU threads take their vCPUs now, with their state loaded, and
    // park while *ready* goes out: after *commit* the guest only has to
    // be let go.
    let t = Instant::now();
    let started = match vm.start_parking() {
        Ok(s) => s,
        Err(e) => return Err(tell(&mut conn, wire::ERROR, e.into())),
    };
    let threads_ms = crate::api::ms(t);
    let (committed_at, paused_ms) = match await_commit(&mut conn, status) {
        Ok(c) => c,
        Err(e) => {
            // Nothing ran: the threads leave from where they are parked.
            let _ = vm.finish(started);
            return Err(e);
        }
    };
    // Committed: the guest is this side's to run, once every vCPU thread
    // parked (long done, normally).
    let resumed = {
        let mut v = started.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        v.await_parked()
            .map_err(crate::Error::Thread)
            .and_then(|()| vm.resume(&mut v))
    };
    if let Err(e) = resumed {
        // The source stays paused (it learns why): the operator decides.
        let e = tell(&mut conn, wire::ERROR, e.into());
        let _ = vm.finish(started);
        return Err(e);
    }
    let start_ms = crate::api::ms(committed_at);
    let downtime_ms = paused_ms + start_ms;
    report.phases["threads_ms"] = json!(threads_ms);
    report.phases["start_ms"] = json!(start_ms);
    let answer = json!({"downtime_ms": downtime_ms, "phases": report.phases});
    if let Err(e) = wire::write_json(&mut conn, wire::RESUMED, &answer) {
        eprintln!("abide: warning: cannot tell the source that the guest runs here: {e}");
    }
    conn.shutdown();
    Ok(Incoming {
        vm,
        started,
        downtime_ms,
        source_version: header.abide_version,
        bytes: report.bytes,
        pages: report.pages,
    })
}

/// What [`take`] received.
struct Taken {
    bytes: u64,
    pages: u64,
    phases: serde_json::Value,
}

/// From *accept* to the state loaded into `vm`: memory, then every state
/// section.
fn take(
    conn: &mut Conn,
    vm: &mut Vm,
    header: &crate::snapshot::format::Header,
    status: &mut dyn FnMut(&str),
) -> Result<Taken, MigrationError> {
    if let Err(e) = wire::write_json(
        conn,
        wire::ACCEPT,
        &json!({
            "abide_version": env!("CARGO_PKG_VERSION"),
            "reads": crate::compat::Reads::this_build(),
        }),
    ) {
        return Err(stream("accepting")(e));
    }
    status("receiving memory");
    // Buffered: the state sections come in one write and are read here
    // without a system call each. The source sends nothing after a pass
    // marker or the state's end before this side answers, so nothing is
    // left in the buffer when this function returns.
    let mut reader = std::io::BufReader::with_capacity(256 << 10, &mut *conn);
    let mut buf = Vec::new();
    let mut sections = Sections::default();
    let mut bytes = 0u64;
    let mut pages = 0u64;
    let mut page_frames = 0u64;
    loop {
        let tag = match wire::read_frame(&mut reader, &mut buf) {
            Ok(t) => t,
            Err(e) => {
                return Err(tell(
                    reader.get_mut(),
                    wire::ERROR,
                    stream("receiving memory and state")(e),
                ))
            }
        };
        bytes += 5 + buf.len() as u64;
        let step = match tag {
            wire::PAGES => {
                page_frames += 1;
                if page_frames == 2 {
                    super::fault("kill-during-memory");
                }
                store_pages(vm, &buf).map(|n| pages += n)
            }
            wire::PASS => {
                if let Ok(v) = wire::parse_json::<serde_json::Value>(tag, &buf) {
                    status(&format!("receiving memory (pass {})", v["iteration"]));
                }
                wire::write_json(reader.get_mut(), wire::PASS_STORED, &json!({}))
                    .map_err(stream("receiving memory"))
            }
            wire::SECTION => {
                super::fault("kill-during-state");
                status("receiving state");
                take_section(&mut sections, &buf)
            }
            wire::STATE_END => break,
            wire::ABORT => Err(MigrationError::SourceAborted(wire::error_text(&buf))),
            t => Err(unexpected("receiving memory and state", t)),
        };
        if let Err(e) = step {
            return Err(tell(reader.get_mut(), wire::ERROR, e));
        }
    }
    drop(reader);
    status("loading state");
    let t = Instant::now();
    let mut load_times = state::LoadTimes::default();
    let loaded = state::load_timed(vm, &sections, &[], &mut load_times)
        .and_then(|()| state::check_roms(vm, &header.manifest));
    if let Err(e) = loaded {
        return Err(tell(conn, wire::ERROR, e.into()));
    }
    let load_ms = crate::api::ms(t);
    Ok(Taken {
        bytes,
        pages,
        phases: json!({"load_ms": load_ms, "load": load_times}),
    })
}

/// Answers *ready* and waits for *commit*. Returns when it came, with the
/// source's pause so far (ms).
fn await_commit(
    conn: &mut Conn,
    status: &mut dyn FnMut(&str),
) -> Result<(Instant, f64), MigrationError> {
    let mut buf = Vec::new();
    wire::write_json(conn, wire::READY, &json!({})).map_err(stream("answering ready"))?;
    status("waiting for commit");
    const WAIT: &str = "waiting for commit (the guest stays with the source)";
    let tag = wire::read_frame(conn, &mut buf).map_err(stream(WAIT))?;
    let committed_at = Instant::now();
    super::fault("kill-after-commit");
    match tag {
        wire::COMMIT => {}
        wire::ABORT => return Err(MigrationError::SourceAborted(wire::error_text(&buf))),
        t => return Err(unexpected(WAIT, t)),
    }
    let commit: serde_json::Value = wire::parse_json(tag, &buf).map_err(stream(WAIT))?;
    Ok((committed_at, commit["paused_ms"].as_f64().unwrap_or(0.0)))
}

/// Writes a verified page frame into guest memory; returns the pages.
fn store_pages(vm: &Vm, buf: &[u8]) -> Result<u64, MigrationError> {
    let pages = wire::parse_pages(buf).map_err(stream("receiving memory"))?;
    let n = pages.len() as u64;
    for (gpa, data) in pages {
        let r = match data {
            Some(d) => vm
                .ram
                .mem
                .write_slice(d, GuestAddress(gpa))
                .map_err(|e| e.to_string()),
            None => vm.ram.zero_page(gpa).map_err(|e| e.to_string()),
        };
        r.map_err(|e| MigrationError::Stream {
            phase: "receiving memory",
            source: WireError::Malformed(format!("page {gpa:#x} is not guest RAM: {e}")),
            peer: None,
        })?;
    }
    Ok(n)
}

/// Checks one state section against the versions this build reads.
fn take_section(sections: &mut Sections, buf: &[u8]) -> Result<(), MigrationError> {
    let (entry, bytes) = wire::parse_section(buf).map_err(stream("receiving state"))?;
    let keep = accept_section(&entry, KNOWN_SECTIONS)
        .map_err(|e| stream("receiving state")(WireError::Format(e)))?;
    if keep {
        sections
            .insert(&entry.name, entry.version, bytes.to_vec())
            .map_err(|e| stream("receiving state")(WireError::Format(e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str, version: u32, optional: bool) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write_section(&mut out, name, version, optional, b"{}").expect("write");
        let mut buf = Vec::new();
        wire::read_frame(&mut &out[..], &mut buf).expect("frame");
        buf
    }

    #[test]
    fn sections_are_checked_against_this_builds_versions() {
        let mut s = Sections::default();
        take_section(&mut s, &frame("vcpu.0", 1, false)).expect("known");
        let e = take_section(&mut s, &frame("vcpu.1", 99, false)).expect_err("newer");
        assert!(e.to_string().contains("has version 99"), "{e}");
        let e = take_section(&mut s, &frame("gizmo", 1, false)).expect_err("unknown");
        assert!(e.to_string().contains("not known to this Abide"), "{e}");
        take_section(&mut s, &frame("gizmo.extra", 1, true)).expect("optional skipped");
        let e = take_section(&mut s, &frame("vcpu.0", 1, false)).expect_err("twice");
        assert!(e.to_string().contains("appears twice"), "{e}");
        use crate::snapshot::state::SectionSource;
        assert_eq!(s.names(), ["vcpu.0"]);
    }

    /// Open-ended names (`vcpu.N`) cannot make the destination keep
    /// state without end: the count and the total are bounded.
    #[test]
    fn a_stream_cannot_pile_up_state_sections() {
        use crate::snapshot::state::{MAX_SECTIONS, MAX_SECTION_BYTES};
        let mut s = Sections::default();
        for i in 0..MAX_SECTIONS {
            take_section(&mut s, &frame(&format!("vcpu.{i}"), 1, false)).expect("within");
        }
        let e = take_section(&mut s, &frame("vcpu.999999", 1, false)).expect_err("one more");
        assert!(
            e.to_string().contains("more than 4096 state sections"),
            "{e}"
        );

        let mut s = Sections::default();
        let quarter = MAX_SECTION_BYTES / 4;
        for i in 0..4 {
            s.insert(&format!("rom.{i}"), 1, vec![0; quarter])
                .expect("within");
        }
        let e = s
            .insert("rom.4", 1, vec![0; 1])
            .expect_err("past the total");
        assert!(e.to_string().contains("in all (at 'rom.4')"), "{e}");
    }
}
