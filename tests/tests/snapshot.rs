//! Save and restore on /dev/kvm with the test guest: a ring-3 checksum
//! workload and a virtio-blk write/verify loop are snapshotted mid-run,
//! the first abide is stopped, and a new process restores and finishes
//! the work. The output of the two processes joined must equal an
//! uninterrupted run's. Corrupt snapshots and snapshots whose guest ABI
//! differs are refused before anything starts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use abide_tests::{
    abide_bin, check_blk_loop, progress_rounds, rom_image, rom_nic, run_abide, run_command,
    sha256_bytes, stable_lines, temp_dir, Outcome, Tap,
};
use abide_tests::{split_snapshot as split, SnapshotParts as Parts};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(120);

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// A running `abide run` with a control socket and COM1 in a file.
struct Running {
    child: Child,
    api: PathBuf,
    serial: PathBuf,
}

impl Running {
    fn start(dir: &Path, args: &[&str]) -> Self {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        Self::launch(dir, "before", &all)
    }

    /// Starts `abide ARGS` (run or restore) with its serial log and control
    /// socket named after `tag`.
    fn launch(dir: &Path, tag: &str, args: &[&str]) -> Self {
        Self::launch_env(dir, tag, args, &[])
    }

    /// [`Running::launch`] with environment variables.
    fn launch_env(dir: &Path, tag: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let api = dir.join(format!("{tag}.sock"));
        let serial = dir.join(format!("{tag}.log"));
        let mut cmd = Command::new(abide_bin());
        cmd.args(args)
            .envs(env.iter().copied())
            .arg("--api-socket")
            .arg(&api)
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("start abide");
        Self { child, api, serial }
    }

    /// Waits until the serial log has a line containing `needle`.
    fn wait_for(&mut self, needle: &str) {
        abide_tests::wait_for_serial(&mut self.child, &self.serial, needle, TIMEOUT);
    }

    /// Snapshots to `path` and stops this abide; returns the reply.
    fn snapshot_and_stop(mut self, path: &Path) -> Value {
        let out = abide_tests::snapshot_and_stop(&self.api, path);
        assert_eq!(out.code, Some(0), "abide snapshot failed\n{out}");
        let reply: Value = serde_json::from_str(out.stdout.trim()).expect("JSON reply");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "abide did not quit cleanly: {status}");
                break;
            }
            assert!(start.elapsed() < TIMEOUT, "abide did not quit");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !self.api.exists(),
            "the API socket should be removed on exit"
        );
        reply
    }
}

impl Running {
    /// Snapshots to `path` and stops this abide, keeping its stderr to
    /// read ([`Running::stderr_text`]).
    fn snapshot_and_stop_keep(&mut self, path: &Path) {
        let out = abide_tests::snapshot_and_stop(&self.api, path);
        assert_eq!(out.code, Some(0), "abide snapshot failed\n{out}");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "abide did not quit cleanly: {status}");
                break;
            }
            assert!(start.elapsed() < TIMEOUT, "abide did not quit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything this abide wrote to stderr (once it has exited).
    fn stderr_text(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn restore(snapshot: &Path, extra: &[&str]) -> Outcome {
    let mut args = vec!["restore", snapshot.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    run_abide(&args, None, TIMEOUT)
}

fn serial_arg(p: &Path) -> String {
    format!("file:{}", p.display())
}

const WORKLOAD: &str = "quiet rounds=300 progress buf-kib=4096";

#[test]
fn checksum_workload_continues_from_the_same_point() {
    let dir = temp_dir("snap-workload");
    let base = ["--machine", "pc-1.0", "--cpus", "2", "--memory", "256M"];

    // The reference: the same workload, uninterrupted.
    let reference = dir.join("reference.log");
    let mut args = vec!["run"];
    args.extend_from_slice(&base);
    let ser = serial_arg(&reference);
    args.extend_from_slice(&["--serial", &ser, "--cmdline", WORKLOAD]);
    let out = run_abide(&args, None, TIMEOUT);
    assert_eq!(out.code, Some(0), "reference run\n{out}");

    let mut args = base.to_vec();
    args.extend_from_slice(&["--cmdline", WORKLOAD]);
    let mut vm = Running::start(&dir, &args);
    vm.wait_for("guest: progress round=40 ");
    let before = vm.serial.clone();
    let snap = dir.join("vm.snap");
    let reply = vm.snapshot_and_stop(&snap);
    assert_eq!(reply["path"], json!(snap), "{reply}");
    // Sparse: 256 MiB of guest RAM, a 4 MiB workload buffer.
    let bytes = reply["bytes"].as_u64().expect("bytes");
    assert!(
        bytes < 16 << 20,
        "snapshot of a mostly empty 256 MiB guest is {bytes} bytes"
    );
    let before_text = read(&before);
    // The last line may be cut by the snapshot: only whole lines count.
    let rounds = progress_rounds;
    let whole = before_text.rsplit_once('\n').map_or("", |(w, _)| w);
    let last_before = *rounds(whole).last().expect("progress before the snapshot");
    assert!(
        last_before < 299,
        "the snapshot came after the workload ended"
    );

    let after = dir.join("after.log");
    let out = restore(&snap, &["--serial", &serial_arg(&after)]);
    assert_eq!(
        out.code,
        Some(0),
        "restored guest should finish and power off\n{out}"
    );
    let after_text = read(&after);
    let joined = format!("{before_text}{after_text}");
    // Every round exactly once, in order, across the two processes.
    assert_eq!(rounds(&joined), (0..300).collect::<Vec<_>>());
    assert!(
        rounds(&joined).len() > rounds(whole).len(),
        "the restored guest must continue after round {last_before}"
    );
    // Serial continues: the two logs joined (a line cut by the snapshot
    // joins up) equal the uninterrupted run, checksums included.
    assert_eq!(
        stable_lines(&joined),
        stable_lines(&read(&reference)),
        "snapshot + restore must give the same output as an uninterrupted run"
    );
    assert!(joined.contains("guest: user cpl=3 rounds=300 checksum="));

    // Again with the memory loader's background pass held back for 10
    // minutes: every chunk the guest uses then comes in on its vCPUs'
    // first touches (through KVM and the userfaultfd), verified, and the
    // run still ends exactly as the uninterrupted one.
    let faulted = dir.join("faulted.log");
    let out = run_command(
        Command::new(abide_bin())
            .args(["restore", snap.to_str().expect("utf-8"), "--serial"])
            .arg(serial_arg(&faulted))
            .env("ABIDE_RESTORE_BACKGROUND_DELAY_MS", "600000")
            .env("ABIDE_RESTORE_TIMINGS", "1"),
        None,
        TIMEOUT,
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains(" memory=lazy "), "{out}");
    assert!(
        !out.stderr.contains("restore memory verified"),
        "the background pass must not have run\n{out}"
    );
    let joined = format!("{before_text}{}", read(&faulted));
    assert_eq!(stable_lines(&joined), stable_lines(&read(&reference)));
}

#[test]
fn a_restored_vm_can_be_snapshotted_again() {
    let dir = temp_dir("snap-twice");
    let workload = "quiet rounds=3000 progress buf-kib=4096";
    let args = ["--machine", "pc-1.0", "--cpus", "2", "--memory", "256M"];
    let mut run = args.to_vec();
    run.extend_from_slice(&["--cmdline", workload]);
    let mut first = Running::start(&dir, &run);
    first.wait_for("guest: progress round=100 ");
    let a = dir.join("a.snap");
    first.snapshot_and_stop(&a);

    // The second process runs from memory mapped out of a.snap, and is
    // itself snapshotted mid-run.
    let mut second = Running::launch(&dir, "second", &["restore", a.to_str().expect("utf-8")]);
    second.wait_for("guest: progress round=150 ");
    // The file a running VM was restored from may be deleted: its pages stay
    // mapped (and b.snap will hold everything).
    std::fs::remove_file(&a).expect("remove a.snap");
    second.wait_for("guest: progress round=300 ");
    let second_log = second.serial.clone();
    let b = dir.join("b.snap");
    second.snapshot_and_stop(&b);

    let third = dir.join("third.log");
    let out = restore(&b, &["--serial", &serial_arg(&third)]);
    assert_eq!(out.code, Some(0), "{out}");
    let joined = format!(
        "{}{}{}",
        read(&dir.join("before.log")),
        read(&second_log),
        read(&third)
    );
    let rounds = progress_rounds(&joined);
    assert_eq!(
        rounds,
        (0..3000).collect::<Vec<_>>(),
        "rounds across three processes"
    );

    let reference = dir.join("reference.log");
    let mut run = vec!["run"];
    run.extend_from_slice(&args);
    let ser = serial_arg(&reference);
    run.extend_from_slice(&["--serial", &ser, "--cmdline", workload]);
    assert_eq!(run_abide(&run, None, TIMEOUT).code, Some(0));
    assert_eq!(stable_lines(&joined), stable_lines(&read(&reference)));
}

#[test]
fn virtio_blk_io_continues_across_restore() {
    let dir = temp_dir("snap-blk");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    let iters = 3000u64;
    let cmdline = format!("quiet rounds=0 blk-loop={iters}");
    let d = format!("path={}", disk.display());
    let args = [
        "--machine",
        "pc-1.0",
        "--memory",
        "256M",
        "--disk",
        &d,
        "--cmdline",
        &cmdline,
    ];
    let mut vm = Running::start(&dir, &args);
    vm.wait_for("guest: blk-loop iter=300 ");
    let before = vm.serial.clone();
    let snap = dir.join("vm.snap");
    vm.snapshot_and_stop(&snap);

    // The restored VM uses a copy of the disk (a host-side override).
    let moved = dir.join("moved.img");
    std::fs::copy(&disk, &moved).expect("copy disk");
    let after = dir.join("after.log");
    let out = restore(
        &snap,
        &[
            "--serial",
            &serial_arg(&after),
            "--disk-path",
            &format!("1={}", moved.display()),
        ],
    );
    assert_eq!(out.code, Some(0), "restored guest\n{out}");
    let joined = format!("{}{}", read(&before), read(&after));
    // The moved image holds what the guest wrote last in every block; the
    // original stopped changing at the snapshot.
    check_blk_loop(&joined, iters, &moved);
}

/// Takes a small snapshot of the test guest, for the refusal tests.
fn small_snapshot(dir: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec!["--machine", "pc-1.0", "--memory", "128M"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--cmdline", "quiet rounds=1 buf-kib=64 spin"]);
    let mut vm = Running::start(dir, &args);
    vm.wait_for("guest: tick n=1");
    let snap = dir.join("small.snap");
    vm.snapshot_and_stop(&snap);
    snap
}

/// Lays a (possibly edited) snapshot out again, with valid checksums, the
/// way a writer would have: what another Abide version could produce.
fn join(mut p: Parts) -> Vec<u8> {
    let mut header_len = 0usize;
    let json = loop {
        let mut off = (8 + 4 + header_len + 32) as u64;
        for (s, data) in p.header["sections"]
            .as_array_mut()
            .expect("sections")
            .iter_mut()
            .zip(&p.payloads)
        {
            if s["name"] == json!("memory") {
                off = off.div_ceil(4096) * 4096;
            }
            s["offset"] = json!(off);
            s["length"] = json!(data.len());
            s["sha256"] = json!(sha256_bytes(data));
            off += data.len() as u64;
        }
        let j = serde_json::to_vec(&p.header).expect("json");
        if j.len() == header_len {
            break j;
        }
        header_len = j.len();
    };
    let mut out = b"ABIDESNP".to_vec();
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    let h = sha256_bytes(&json);
    out.extend_from_slice(
        &(0..32)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).expect("hex"))
            .collect::<Vec<_>>(),
    );
    for (s, data) in p.header["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .zip(&p.payloads)
    {
        let off = s["offset"].as_u64().expect("offset") as usize;
        out.resize(off, 0);
        out.extend_from_slice(data);
    }
    out
}

/// Restoring `bytes` must fail with `needle` in the error, before any
/// guest output.
fn refused(dir: &Path, name: &str, bytes: &[u8], needle: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    let serial = dir.join(format!("{name}.log"));
    let out = restore(&path, &["--serial", &serial_arg(&serial)]);
    assert_eq!(out.code, Some(1), "{name}: restore must be refused\n{out}");
    assert!(
        out.stderr.contains(needle),
        "{name}: expected '{needle}' in the error\n{out}"
    );
    assert!(
        !serial.exists() || read(&serial).is_empty(),
        "{name}: the guest ran before the refusal"
    );
    out.stderr
}

#[test]
fn corrupt_snapshots_are_refused() {
    let dir = temp_dir("snap-corrupt");
    let snap = small_snapshot(&dir, &[]);
    let good = std::fs::read(&snap).expect("read");

    // Sanity: the untouched file restores (the guest then spins; stop it
    // through the API), so the refusals below are the edits' doing.
    restore_ticks_then_quit(&snap, &dir, "untouched");
    let n = good.len();
    refused(&dir, "truncated", &good[..n / 2], "truncated");
    refused(&dir, "truncated-header", &good[..100], "truncated");
    // Guest memory: see memory_is_verified_chunk_by_chunk.
    let mut flipped = good.clone();
    flipped[payload_at(&good, "memory.map") + 5] ^= 0x40;
    refused(
        &dir,
        "flipped-memory-map",
        &flipped,
        "snapshot section 'memory.map' is corrupt (checksum mismatch)",
    );
    let mut flipped = good.clone();
    flipped[200] ^= 0x01;
    refused(&dir, "flipped-header", &flipped, "corrupt");
    let mut magic = good.clone();
    magic[..8].copy_from_slice(b"QEVM\0\0\0\x03");
    refused(&dir, "magic", &magic, "not an Abide snapshot");

    let mut p = split(&good);
    p.header["sections"]
        .as_array_mut()
        .expect("sections")
        .push(json!({"name": "gizmo.0", "version": 1, "optional": false, "offset": 0, "length": 0, "sha256": ""}));
    p.payloads.push(b"{}".to_vec());
    refused(
        &dir,
        "unknown-section",
        &join(p),
        "section 'gizmo.0' is not known to this Abide",
    );

    let mut p = split(&good);
    let vcpu = p.header["sections"]
        .as_array_mut()
        .expect("sections")
        .iter_mut()
        .find(|s| s["name"] == json!("vcpu.0"))
        .expect("vcpu.0");
    vcpu["version"] = json!(99);
    refused(
        &dir,
        "newer-section",
        &join(p),
        "section 'vcpu.0' has version 99; this Abide reads up to 1",
    );

    // An optional subsection an older reader may skip is skipped.
    let mut p = split(&good);
    p.header["sections"]
        .as_array_mut()
        .expect("sections")
        .push(json!({"name": "gizmo.extra", "version": 1, "optional": true, "offset": 0, "length": 0, "sha256": ""}));
    p.payloads.push(b"{}".to_vec());
    let path = dir.join("optional.snap");
    std::fs::write(&path, join(p)).expect("write");
    restore_ticks_then_quit(&path, &dir, "optional");
}

/// Where section `name`'s payload starts in the snapshot `bytes`.
fn payload_at(bytes: &[u8], name: &str) -> usize {
    let p = split(bytes);
    let e = p.header["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .find(|s| s["name"] == json!(name))
        .unwrap_or_else(|| panic!("no section {name}"))
        .clone();
    e["offset"].as_u64().expect("offset") as usize
}

/// Where section `name` of a split snapshot (exact name) is.
fn section_index(p: &Parts, name: &str) -> usize {
    p.header["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .position(|s| s["name"] == json!(name))
        .unwrap_or_else(|| panic!("no section {name}"))
}

/// Section `name` of a split snapshot (exact name): its entry and payload.
fn section_named<'a>(p: &'a Parts, name: &str) -> (&'a Value, &'a [u8]) {
    let i = section_index(p, name);
    (&p.header["sections"][i], &p.payloads[i])
}

/// Guest memory `[gpa, gpa + len)` as a snapshot holds it: the saved runs
/// in place, zeros elsewhere.
fn guest_bytes(p: &Parts, gpa: u64, len: u64) -> Vec<u8> {
    let map: Value = serde_json::from_slice(section_named(p, "memory.map").1).expect("map");
    let mem = section_named(p, "memory").1;
    let mut out = vec![0u8; len as usize];
    for run in map["runs"].as_array().expect("runs") {
        let (rg, rl, ro) = (
            run["gpa"].as_u64().expect("gpa"),
            run["len"].as_u64().expect("len"),
            run["offset"].as_u64().expect("offset"),
        );
        let (s, e) = (rg.max(gpa), (rg + rl).min(gpa + len));
        if s < e {
            let from = (ro + s - rg) as usize;
            out[(s - gpa) as usize..(e - gpa) as usize]
                .copy_from_slice(&mem[from..from + (e - s) as usize]);
        }
    }
    out
}

/// The guest address of byte `at` of the memory section.
fn gpa_of_memory_byte(p: &Parts, at: u64) -> u64 {
    let map: Value = serde_json::from_slice(section_named(p, "memory.map").1).expect("map");
    map["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .find_map(|r| {
            let (g, l, o) = (
                r["gpa"].as_u64()?,
                r["len"].as_u64()?,
                r["offset"].as_u64()?,
            );
            (at >= o && at < o + l).then_some(g + at - o)
        })
        .expect("byte in a run")
}

/// Guest memory travels with a SHA-256 per 256 KiB chunk in the optional
/// `memory.chunks` section (`memory` and `memory.map` stay version 1, so
/// releases before it read the file as before). Restore verifies each
/// chunk on first touch or in the background: a corrupt chunk stops the VM
/// with an error naming it; without a userfaultfd (ABIDE_RESTORE_EAGER)
/// every chunk is verified before the guest runs; without the section (a
/// file of 0.2.0 or 0.3.0) memory is verified whole, before the guest runs.
#[test]
fn memory_is_verified_chunk_by_chunk() {
    let dir = temp_dir("snap-chunks");
    let snap = small_snapshot(&dir, &[]);
    let good = std::fs::read(&snap).expect("read");
    let parts = split(&good);
    for name in ["memory.map", "memory"] {
        let (e, _) = section_named(&parts, name);
        assert_eq!(
            (&e["version"], &e["optional"]),
            (&json!(1), &json!(false)),
            "{e}"
        );
    }
    let (e, chunks) = section_named(&parts, "memory.chunks");
    assert_eq!(
        (&e["version"], &e["optional"]),
        (&json!(1), &json!(true)),
        "{e}"
    );
    let chunks: Value = serde_json::from_slice(chunks).expect("chunks JSON");
    let size = chunks["chunk_size"].as_u64().expect("chunk_size");
    assert_eq!(size, 256 << 10);
    let list = chunks["chunks"].as_array().expect("chunks").clone();
    assert!(list.len() > 1, "{chunks}");
    // Each hash is that of the chunk's guest memory (128 MiB of RAM in one
    // region, so no chunk is cut short), and every saved page is in one.
    for c in &list {
        let gpa = c["gpa"].as_u64().expect("gpa");
        assert_eq!(gpa % size, 0);
        assert_eq!(
            c["sha256"],
            json!(sha256_bytes(&guest_bytes(&parts, gpa, size))),
            "{c}"
        );
    }
    let map: Value = serde_json::from_slice(section_named(&parts, "memory.map").1).expect("map");
    for r in map["runs"].as_array().expect("runs") {
        let g = r["gpa"].as_u64().expect("gpa");
        assert!(
            list.iter()
                .any(|c| c["gpa"].as_u64() == Some(g / size * size)),
            "{r}"
        );
    }

    // Lazily: the guest goes on; a snapshot of the restored VM waits for
    // every chunk to be in (the loader says so first), and restores too.
    let timings = [("ABIDE_RESTORE_TIMINGS", "1")];
    // Restores `from` with `env`, waits for the guest to tick, snapshots
    // it to `to` and stops it; returns its standard error.
    let restore_and_save = |tag: &str, from: &Path, env: &[(&str, &str)], to: &Path| {
        let mut vm =
            Running::launch_env(&dir, tag, &["restore", from.to_str().expect("utf-8")], env);
        vm.wait_for("guest: tick n=");
        vm.snapshot_and_stop_keep(to);
        vm.stderr_text()
    };
    let again = dir.join("again.snap");
    let err = restore_and_save("lazy", &snap, &timings, &again);
    assert!(err.contains(" memory=lazy "), "{err}");
    assert!(
        err.contains(&format!(
            "abide: restore memory verified: {} chunks",
            list.len()
        )),
        "{err}"
    );
    restore_ticks_then_quit(&again, &dir, "again");

    // A flipped bit in the middle of guest memory: the VM stops, exit 1,
    // with the chunk named; never a hang.
    let mem_at = payload_at(&good, "memory");
    let mem_len = section_named(&parts, "memory").1.len();
    let off = mem_len / 2 + 123;
    let gpa = gpa_of_memory_byte(&parts, off as u64);
    let chunk = gpa / size * size;
    let index = list
        .iter()
        .position(|c| c["gpa"].as_u64() == Some(chunk))
        .expect("chunk listed");
    let mut bad = good.clone();
    bad[mem_at + off] ^= 0x10;
    let bad_path = dir.join("bad.snap");
    std::fs::write(&bad_path, &bad).expect("write");
    let named = format!(
        "snapshot memory chunk {index} (guest {chunk:#x}..{:#x}) is corrupt (SHA-256 mismatch)",
        chunk + size
    );
    let serial = dir.join("bad.log");
    let out = restore(&bad_path, &["--serial", &serial_arg(&serial)]);
    assert_eq!(out.code, Some(1), "a corrupt chunk must stop the VM\n{out}");
    assert!(out.stderr.contains(&named), "expected '{named}'\n{out}");

    // Eagerly (no userfaultfd): verified before the guest's first
    // instruction; a good file restores.
    let eager = [("ABIDE_RESTORE_EAGER", "1"), ("ABIDE_RESTORE_TIMINGS", "1")];
    let serial = dir.join("bad-eager.log");
    let out = run_command(
        Command::new(abide_bin())
            .args([
                "restore",
                bad_path.to_str().expect("utf-8"),
                "--serial",
                &serial_arg(&serial),
            ])
            .envs(eager),
        None,
        TIMEOUT,
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains(&named), "expected '{named}'\n{out}");
    assert!(
        !serial.exists() || read(&serial).is_empty(),
        "the guest ran\n{out}"
    );
    let err = restore_and_save("eager", &snap, &eager, &dir.join("eager-again.snap"));
    assert!(err.contains(" memory=eager "), "{err}");
    assert!(err.contains("(ABIDE_RESTORE_EAGER is set)"), "{err}");

    // Hashes that do not match the saved pages, or a corrupt hash section:
    // refused before the guest runs.
    let mut p = split(&good);
    let i = section_index(&p, "memory.chunks");
    let mut edited = chunks.clone();
    edited["chunks"]
        .as_array_mut()
        .expect("chunks")
        .remove(index);
    p.payloads[i] = serde_json::to_vec(&edited).expect("json");
    refused(&dir, "chunk-missing", &join(p), "its chunk has no hash");
    let mut flipped = good.clone();
    flipped[payload_at(&good, "memory.chunks") + 40] ^= 0x01;
    refused(
        &dir,
        "flipped-chunks",
        &flipped,
        "snapshot section 'memory.chunks' is corrupt (checksum mismatch)",
    );

    // Without the section, as 0.2.0 and 0.3.0 wrote: memory is verified
    // whole and mapped; the same flipped bit is refused before the guest
    // runs.
    let strip = |bytes: &[u8]| {
        let mut p = split(bytes);
        let i = section_index(&p, "memory.chunks");
        p.header["sections"]
            .as_array_mut()
            .expect("sections")
            .remove(i);
        p.payloads.remove(i);
        join(p)
    };
    let old = dir.join("old.snap");
    std::fs::write(&old, strip(&good)).expect("write");
    let err = restore_and_save("old", &old, &timings, &dir.join("old-again.snap"));
    assert!(err.contains(" memory=mapped "), "{err}");
    let mut old_bad = strip(&good);
    let at = payload_at(&old_bad, "memory") + off;
    old_bad[at] ^= 0x10;
    refused(
        &dir,
        "old-flipped",
        &old_bad,
        "snapshot section 'memory' is corrupt (checksum mismatch)",
    );
}

/// Restores `snap` with COM1 in a file and a control socket, waits for the
/// guest's `spin` ticks to continue, and quits it through the API.
fn restore_ticks_then_quit(snap: &Path, dir: &Path, tag: &str) {
    let serial = dir.join(format!("{tag}.log"));
    let api = dir.join(format!("{tag}.sock"));
    let mut child = Command::new(abide_bin())
        .args(["restore", snap.to_str().expect("utf-8"), "--serial"])
        .arg(serial_arg(&serial))
        .arg("--api-socket")
        .arg(&api)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("restore");
    let start = Instant::now();
    while !read(&serial).contains("guest: tick n=") {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("{tag}: restore failed: {s}");
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "{tag}: restored guest never ticked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run_abide(
        &["ctl", "--api-socket", api.to_str().expect("utf-8"), "quit"],
        None,
        TIMEOUT,
    );
    assert_eq!(out.code, Some(0), "{out}");
    assert!(child.wait().expect("wait").success());
}

fn edit_manifest(good: &[u8], f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut p = split(good);
    f(&mut p.header["manifest"]);
    join(p)
}

#[test]
fn snapshots_whose_guest_abi_differs_are_refused() {
    let dir = temp_dir("snap-abi");
    let tap = format!("abst{}", std::process::id() % 100_000);
    let _tap = Tap::create(&tap, "the ROM-slot refusal case");
    let rom = dir.join("pxe.rom");
    std::fs::write(&rom, rom_image(64 << 10, 0)).expect("rom");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    let net = format!("tap={tap},rom={}", rom.display());
    let d = format!("path={}", disk.display());
    let snap = small_snapshot(&dir, &["--disk", &d, "--net", &net]);
    let good = std::fs::read(&snap).expect("read");
    let functions = |m: &Value| m["pci"]["functions"].as_array().expect("functions").clone();
    let manifest = split(&good).header["manifest"].clone();
    let net_index = functions(&manifest)
        .iter()
        .position(|f| f["model"] == json!("virtio-net"))
        .expect("net function");

    // A ROM slot from a build whose pc-1.0 had 256 KiB for virtio-net.
    let bytes = edit_manifest(&good, |m| {
        m["pci"]["functions"][net_index]["rom"]["slot_size"] = json!(262144)
    });
    let err = refused(&dir, "rom-slot", &bytes, "guest ABI differs");
    assert!(
        err.contains(&format!(
            "pci.functions[{net_index}].rom.slot_size: 262144 -> 131072"
        )),
        "{err}"
    );

    // One CPUID bit.
    let bytes = edit_manifest(&good, |m| {
        let leaf = m["cpu"]["cpuid"][0]
            .as_array_mut()
            .expect("leaves")
            .iter_mut()
            .find(|l| l["function"] == json!(0x8000_0001u32))
            .expect("leaf 0x80000001");
        let ecx = leaf["ecx"].as_u64().expect("ecx");
        leaf["ecx"] = json!(ecx ^ (1 << 5));
    });
    let err = refused(&dir, "cpuid-bit", &bytes, "guest ABI differs");
    assert!(err.contains("cpu.cpuid[0]["), "{err}");
    assert!(err.contains("].ecx: "), "{err}");

    // A device at another address.
    let bytes = edit_manifest(&good, |m| {
        m["pci"]["functions"][net_index]["bdf"] = json!("00:07.0")
    });
    let err = refused(&dir, "moved-bdf", &bytes, "guest ABI differs");
    assert!(
        err.contains(&format!("pci.functions[{net_index}].bdf: \"00:07.0\" -> ")),
        "{err}"
    );

    // Another machine type.
    let bytes = edit_manifest(&good, |m| m["machine"] = json!("pc-2.0"));
    let err = refused(&dir, "machine", &bytes, "guest ABI differs");
    assert!(err.contains("machine: \"pc-2.0\" -> \"pc-1.0\""), "{err}");

    // A host-side override that changes what the guest sees (a disk of
    // another size changes its capacity) is refused too.
    let big = dir.join("big.img");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(4 << 20))
        .expect("disk");
    let serial = dir.join("big.log");
    let out = restore(
        &snap,
        &[
            "--serial",
            &serial_arg(&serial),
            "--disk-path",
            &format!("1={}", big.display()),
        ],
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("guest ABI differs"), "{out}");
    assert!(out.stderr.contains(".virtio.config: "), "{out}");
    assert!(!serial.exists() || read(&serial).is_empty());

    // The same snapshot restores with a host-side change that the guest
    // cannot see (another tap is not needed; the serial sink moves).
    restore_ticks_then_quit(&snap, &dir, "ok");
}

/// The guest keeps the option ROM it booted with: the host file changes
/// (one byte, as a distribution's iPXE update would) between save and
/// restore, and the restored guest is served the saved image, which a
/// later snapshot carries again. The host file only has to fit the slot.
#[test]
fn the_option_rom_travels_with_the_snapshot() {
    let dir = temp_dir("snap-rom");
    let tap = format!("abro{}", std::process::id() % 100_000);
    let _tap = Tap::create(&tap, "the option-ROM snapshot case");
    let (rom, booted, net) = rom_nic(&dir, &tap, 0x11);
    let mut vm = Running::start(
        &dir,
        &[
            "--machine",
            "pc-1.0",
            "--memory",
            "128M",
            "--net",
            &net,
            "--cmdline",
            "quiet rounds=1 buf-kib=64 spin",
        ],
    );
    vm.wait_for("guest: tick n=1");
    let snap = dir.join("rom.snap");
    vm.snapshot_and_stop(&snap);
    let parts = split(&std::fs::read(&snap).expect("read"));
    let rom_section = |p: &Parts| -> (String, Vec<u8>) {
        let (entry, bytes) = p.section("rom.").expect("a rom.* section");
        assert_eq!(entry["optional"], json!(true), "older readers skip it");
        (
            entry["name"].as_str().expect("name").to_string(),
            bytes.to_vec(),
        )
    };
    let (name, saved) = rom_section(&parts);
    assert_eq!(
        saved, booted,
        "the snapshot carries the image the guest booted with"
    );

    // The host's ROM file changes by one byte.
    let mut updated = booted.clone();
    updated[100] ^= 0xff;
    std::fs::write(&rom, &updated).expect("rom");
    let mut restored = Running::launch(&dir, "after", &["restore", snap.to_str().expect("utf-8")]);
    restored.wait_for("guest: tick n=3");
    let again = dir.join("again.snap");
    restored.snapshot_and_stop(&again);
    let parts = split(&std::fs::read(&again).expect("read"));
    let (name2, image) = rom_section(&parts);
    assert_eq!(name2, name);
    assert_eq!(
        image, booted,
        "the restored guest still has its own image, not the host file's"
    );
    let sha = parts.header["manifest"]["pci"]["functions"]
        .as_array()
        .expect("functions")
        .iter()
        .find_map(|f| f["rom"]["image_sha256"].as_str().map(str::to_string))
        .expect("rom in the manifest");
    assert_eq!(
        sha,
        sha256_bytes(&booted),
        "the manifest describes the image the guest has"
    );

    // A host file larger than the slot is refused, naming the slot.
    std::fs::write(&rom, rom_image(256 << 10, 0x22)).expect("rom");
    let out = restore(&snap, &[]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("131072-byte ROM slot"), "{out}");
}

/// `--target-version`: a release that cannot restore this guest is refused
/// before the guest is paused (it keeps running, no file is written); one
/// that can gets a snapshot with every section in the oldest layout.
/// `abide snapshot --target-version TARGET FILE` through `api`.
fn snapshot_for(api: &str, target: &str, file: &Path) -> abide_tests::Outcome {
    run_abide(
        &[
            "snapshot",
            "--api-socket",
            api,
            "--target-version",
            target,
            file.to_str().expect("utf-8"),
        ],
        None,
        TIMEOUT,
    )
}

#[test]
fn snapshot_target_versions_are_checked_before_pausing() {
    let dir = temp_dir("snap-target");
    let mut vm = Running::start(
        &dir,
        &[
            "--machine",
            "pc-2.0",
            "--cpu",
            "abide-v1",
            "--memory",
            "128M",
            "--cmdline",
            "quiet rounds=1 buf-kib=64 spin",
        ],
    );
    vm.wait_for("guest: tick n=1");
    let api = vm.api.to_str().expect("utf-8").to_string();
    let snap = |target: &str, file: &Path| snapshot_for(&api, target, file);
    for (target, needle) in [
        ("0.1.0", "Abide 0.1.0 does not restore snapshots"),
        (
            "9.9.9",
            "unknown Abide release '9.9.9' (known: 0.1.0, 0.2.0, 0.3.0",
        ),
    ] {
        let file = dir.join(format!("{target}.snap"));
        let out = snap(target, &file);
        assert_eq!(out.code, Some(1), "{out}");
        assert!(out.stderr.contains(needle), "{out}");
        assert!(!file.exists(), "nothing is written for {target}");
        let status = run_abide(&["ctl", "--api-socket", &api, "status"], None, TIMEOUT);
        assert!(
            status.stdout.contains("\"running\""),
            "{target}: never paused\n{status}"
        );
    }
    let file = dir.join("0.2.0.snap");
    let out = snap("0.2.0", &file);
    assert_eq!(out.code, Some(0), "{out}");
    let reply: Value = serde_json::from_str(out.stdout.trim()).expect("reply");
    assert_eq!(
        reply["notes"],
        json!([]),
        "every section in its first layout"
    );
    let parts = split(&std::fs::read(&file).expect("read"));
    for s in parts.header["sections"].as_array().expect("sections") {
        assert_eq!(s["version"], json!(1), "{s}");
    }
    // Guest memory for 0.2.0 and 0.3.0: `memory` in version 1 with its
    // whole-section SHA-256 (what they verify), and the chunk hashes in a
    // section marked optional, which they skip.
    let file3 = dir.join("0.3.0.snap");
    let out = snap("0.3.0", &file3);
    assert_eq!(out.code, Some(0), "{out}");
    for f in [&file, &file3] {
        let parts = split(&std::fs::read(f).expect("read"));
        let (e, data) = section_named(&parts, "memory");
        assert_eq!(e["version"], json!(1), "{e}");
        assert_eq!(e["sha256"], json!(sha256_bytes(data)), "{e}");
        let (c, _) = section_named(&parts, "memory.chunks");
        assert_eq!(c["optional"], json!(true), "{c}");
    }
    vm.snapshot_and_stop(&dir.join("last.snap"));

    // A machine type newer than the target release: refused, nothing
    // written, the guest never paused.
    let dir = temp_dir("snap-target-3");
    let mut vm3 = Running::start(
        &dir,
        &[
            "--machine",
            "pc-3.0",
            "--cpu",
            "abide-v1",
            "--memory",
            "128M",
            "--cmdline",
            "quiet rounds=1 buf-kib=64 spin",
        ],
    );
    vm3.wait_for("guest: tick n=1");
    let api3 = vm3.api.to_str().expect("utf-8").to_string();
    let file = dir.join("pc-3.0-for-0.3.0.snap");
    let out = snapshot_for(&api3, "0.3.0", &file);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("Abide 0.3.0 does not know machine type 'pc-3.0'"),
        "{out}"
    );
    assert!(!file.exists(), "nothing is written");
    let status = run_abide(&["ctl", "--api-socket", &api3, "status"], None, TIMEOUT);
    assert!(
        status.stdout.contains("\"running\""),
        "never paused\n{status}"
    );
    vm3.snapshot_and_stop(&dir.join("last.snap"));
}

#[test]
fn bad_restore_input_is_refused() {
    let dir = temp_dir("snap-input");
    let out = restore(&dir.join("missing.snap"), &[]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("cannot restore '"), "{out}");
    assert!(out.stderr.contains("No such file"), "{out}");
    let snap = small_snapshot(&dir, &[]);
    let out = restore(&snap, &["--disk-path", "5=/tmp/x.img"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("no disk at PCI slot 5"), "{out}");
    let out = restore(&snap, &["--disk-path", "nonsense"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("invalid --disk-path"), "{out}");
    let out = run_abide(
        &[
            "snapshot",
            "--api-socket",
            dir.join("nobody.sock").to_str().expect("utf-8"),
            "x.snap",
        ],
        None,
        TIMEOUT,
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("cannot talk to abide"), "{out}");
}
