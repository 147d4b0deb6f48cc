//! A whole VM lifecycle driven through the API alone, with raw HTTP on the
//! Unix socket: `abide serve`, create, boot, pause, resume, snapshot,
//! power-off and delete; then restore into a second `abide serve`, where
//! the guest finishes its work and shuts down on the ACPI power button.
//! Events are checked in order, metrics must move while the guest works.
//!
//! The guest is the test guest on /dev/kvm: a ring-3 checksum workload with
//! a numbered line per round, then a virtio-blk write/verify loop, then a
//! wait for the power button.

use std::path::Path;
use std::time::Duration;

use abide_tests::api::{get, get_ok, kinds, put, put_ok, wait_for_text, Abide, Events};
use abide_tests::{progress_rounds, temp_dir, GuestLine};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);
const ROUNDS: u64 = 400;
const BLK_ITERS: u64 = 300;
/// Resume/pause pairs in quick succession.
const FLIPS: usize = 40;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn exits(metrics: &Value) -> u64 {
    metrics["vcpus"]
        .as_array()
        .expect("vcpus")
        .iter()
        .map(|v| v["exits_total"].as_u64().expect("exits_total"))
        .sum()
}

fn device<'a>(metrics: &'a Value, model: &str) -> &'a Value {
    metrics["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["model"] == model)
        .unwrap_or_else(|| panic!("no {model} in {metrics}"))
}

#[test]
fn lifecycle_through_the_api_with_restore_into_a_second_serve() {
    let dir = temp_dir("api-lifecycle");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).expect("disk");
    let log_a = dir.join("a.log");

    let mut a = Abide::serve(&dir, "a");
    let ping = get_ok(&a.socket, "/api/v1/vmm.ping");
    assert_eq!(ping["state"], "not-created", "{ping}");
    let events = Events::open(&a.socket, Some(0));
    assert_eq!(get(&a.socket, "/api/v1/vm.manifest").status, 409);

    // Create from a JSON configuration.
    let config = json!({
        "machine": "pc-1.0",
        "cpus": 2,
        "memory": "256M",
        "serial": format!("file:{}", log_a.display()),
        "cmdline": format!("quiet rounds={ROUNDS} progress buf-kib=1024 blk-loop={BLK_ITERS} power-button"),
        "disks": [{"path": disk}],
    });
    let info = put_ok(&a.socket, "/api/v1/vm.create", Some(&config.to_string()));
    assert_eq!(info["state"], "created", "{info}");
    assert_eq!(info["machine"], "pc-1.0");
    assert_eq!(info["cpu_model"], "abide-v1");
    assert_eq!(info["abide_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["uptime_ms"], Value::Null, "not booted yet");
    assert_eq!(info["config"]["cpus"], 2);
    assert_eq!(info["config"]["disks"][0]["path"], json!(disk));
    let manifest = get_ok(&a.socket, "/api/v1/vm.manifest");
    assert_eq!(manifest["abi"]["machine"], "pc-1.0", "{manifest}");
    let m0 = get_ok(&a.socket, "/api/v1/vm.metrics");
    assert_eq!(exits(&m0), 0, "nothing ran yet: {m0}");
    // A created VM cannot be paused: 409 naming the state.
    let r = put(&a.socket, "/api/v1/vm.pause", None);
    assert_eq!(
        (r.status, r.json()["state"].clone()),
        (409, json!("created")),
        "{r}"
    );

    // Boot and let the workload run.
    let info = put_ok(&a.socket, "/api/v1/vm.boot", None);
    assert_eq!(info["state"], "running");
    wait_for_text(&log_a, "guest: progress round=50 ", T);
    let m1 = get_ok(&a.socket, "/api/v1/vm.metrics");
    assert!(exits(&m1) > 0, "vCPU exits counted: {m1}");

    // Pause: nothing runs; pausing again is a wrong-state request.
    let p = put_ok(&a.socket, "/api/v1/vm.pause", None);
    assert_eq!(p["state"], "paused");
    assert!(p["pause_ms"].as_f64().is_some(), "{p}");
    let r = put(&a.socket, "/api/v1/vm.pause", None);
    assert_eq!(r.status, 409, "{r}");
    assert_eq!(r.json()["state"], "paused");
    assert!(r.error().contains("paused"), "{r}");
    let frozen = get_ok(&a.socket, "/api/v1/vm.metrics");
    let lines = read(&log_a).lines().count();
    std::thread::sleep(Duration::from_millis(300));
    let still = get_ok(&a.socket, "/api/v1/vm.metrics");
    assert_eq!(
        exits(&frozen),
        exits(&still),
        "a paused guest makes no exits"
    );
    assert_eq!(
        read(&log_a).lines().count(),
        lines,
        "a paused guest prints nothing"
    );
    assert_eq!(get_ok(&a.socket, "/api/v1/vm.info")["state"], "paused");

    // Resume and pause in quick succession (an orchestrator's retries, a
    // snapshot right after a resume): every vCPU follows each time.
    for _ in 0..FLIPS {
        assert_eq!(
            put_ok(&a.socket, "/api/v1/vm.resume", None)["state"],
            "running"
        );
        assert_eq!(
            put_ok(&a.socket, "/api/v1/vm.pause", None)["state"],
            "paused"
        );
    }

    // Resume; the virtio-blk loop starts after the rounds.
    assert_eq!(
        put_ok(&a.socket, "/api/v1/vm.resume", None)["state"],
        "running"
    );
    wait_for_text(&log_a, "guest: blk-loop iter=30 ", T);
    let m2 = get_ok(&a.socket, "/api/v1/vm.metrics");
    assert!(exits(&m2) > exits(&m1), "exits moved: {m1} -> {m2}");
    let blk = device(&m2, "virtio-blk");
    assert!(blk["requests"].as_u64().expect("requests") > 30, "{blk}");
    assert!(
        blk["bytes_from_guest"].as_u64().expect("written") >= 30 * 4096,
        "{blk}"
    );
    assert!(
        blk["bytes_to_guest"].as_u64().expect("read") >= 30 * 4096,
        "{blk}"
    );
    assert_eq!(blk["errors"], 0, "{blk}");
    assert_eq!(blk["needs_reset"], 0, "{blk}");
    let prom = get(&a.socket, "/api/v1/vm.metrics?format=prometheus");
    assert_eq!(prom.status, 200);
    assert!(prom
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    assert!(
        prom.body
            .contains("abide_device_requests_total{slot=\"1\",model=\"virtio-blk\"}"),
        "{prom}"
    );

    // Pause, snapshot (a paused VM stays paused), keep the disk as it is
    // now, power off.
    put_ok(&a.socket, "/api/v1/vm.pause", None);
    let snap = dir.join("vm.snap");
    let report = put_ok(
        &a.socket,
        "/api/v1/vm.snapshot",
        Some(&json!({ "path": snap }).to_string()),
    );
    assert_eq!(report["state"], "paused", "{report}");
    assert_eq!(report["path"], json!(snap));
    let bytes = report["bytes"].as_u64().expect("bytes");
    assert_eq!(bytes, std::fs::metadata(&snap).expect("written").len());
    let disk_b = dir.join("disk-b.img");
    std::fs::copy(&disk, &disk_b).expect("copy disk");
    let m3 = get_ok(&a.socket, "/api/v1/vm.metrics");
    assert_eq!(m3["snapshot"]["snapshots"], 1, "{m3}");
    assert_eq!(m3["snapshot"]["last_snapshot"]["bytes"], bytes, "{m3}");
    assert_eq!(
        put_ok(&a.socket, "/api/v1/vm.power-off", None)["state"],
        "shutdown"
    );
    let info = get_ok(&a.socket, "/api/v1/vm.info");
    assert_eq!(info["exit"]["reason"], "power-off", "{info}");
    let up = info["uptime_ms"].as_u64().expect("uptime");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        get_ok(&a.socket, "/api/v1/vm.info")["uptime_ms"],
        up,
        "frozen at shutdown"
    );
    // The VM of a serve outlives its guest until deleted.
    assert_eq!(put(&a.socket, "/api/v1/vm.boot", None).status, 409);
    assert_eq!(
        put_ok(&a.socket, "/api/v1/vm.delete", None)["state"],
        "not-created"
    );
    assert_eq!(get(&a.socket, "/api/v1/vm.metrics").status, 409);

    let seen = events.wait_for("state", Some("not-created"), T);
    let mut want = vec!["state:created", "state:running", "state:paused"];
    for _ in 0..FLIPS {
        want.extend(["state:running", "state:paused"]);
    }
    want.extend([
        "state:running",
        "state:paused",
        "snapshot-done",
        "power-off",
        "state:shutdown",
        "state:not-created",
    ]);
    assert_eq!(kinds(&seen), want, "{seen:?}");
    let seqs: Vec<u64> = seen
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (0..seen.len() as u64).collect::<Vec<_>>());
    assert!(
        events.head().contains("application/x-ndjson"),
        "{}",
        events.head()
    );
    assert_eq!(seen[5 + 2 * FLIPS]["bytes"], bytes);
    put_ok(&a.socket, "/api/v1/vmm.shutdown", None);
    assert_eq!(a.wait(T), Some(0), "{}", a.output());
    assert!(!a.socket.exists(), "socket removed at exit");

    // Restore into a second serve, with the disk copy, and run at once.
    let log_b = dir.join("b.log");
    let mut b = Abide::serve(&dir, "b");
    let events_b = Events::open(&b.socket, Some(0));
    let restore = json!({
        "path": snap,
        "serial": format!("file:{}", log_b.display()),
        "disk_paths": [{"slot": 1, "path": disk_b}],
        "resume": true,
    });
    let r = put_ok(&b.socket, "/api/v1/vm.restore", Some(&restore.to_string()));
    assert_eq!(r["state"], "running", "{r}");
    let info = get_ok(&b.socket, "/api/v1/vm.info");
    assert_eq!(info["config"]["disks"][0]["path"], json!(disk_b), "{info}");
    wait_for_text(&log_b, "guest: power-button waiting", T);
    let m = get_ok(&b.socket, "/api/v1/vm.metrics");
    assert_eq!(m["snapshot"]["restores"], 1, "{m}");
    assert!(
        device(&m, "virtio-blk")["requests"]
            .as_u64()
            .expect("requests")
            > 0
    );
    // Soft shutdown: the guest sees PWRBTN_STS and powers off.
    let press = put_ok(&b.socket, "/api/v1/vm.power-button", None);
    assert_eq!(press["state"], "running");
    let seen = events_b.wait_for("state", Some("shutdown"), T);
    assert_eq!(
        kinds(&seen),
        [
            "state:running",
            "restore-done",
            "power-button",
            "guest-poweroff",
            "state:shutdown"
        ],
        "{seen:?}"
    );
    let info = get_ok(&b.socket, "/api/v1/vm.info");
    assert_eq!(info["exit"]["reason"], "guest-poweroff", "{info}");
    put_ok(&b.socket, "/api/v1/vmm.shutdown", None);
    assert_eq!(b.wait(T), Some(0), "{}", b.output());

    // The two processes together ran the workload exactly once, and the
    // disk loop verified every block across the restore.
    let joined = format!("{}{}", read(&log_a), read(&log_b));
    assert_eq!(
        progress_rounds(&joined),
        (0..ROUNDS).collect::<Vec<_>>(),
        "{joined}"
    );
    let done = joined
        .lines()
        .filter_map(GuestLine::parse)
        .find(|l| l.topic == "blk-loop" && l.fields.contains_key("iters"))
        .unwrap_or_else(|| panic!("no blk-loop summary\n{joined}"));
    assert_eq!(done.num("iters"), BLK_ITERS);
    assert_eq!(done.num("errors"), 0, "{joined}");
    assert!(read(&log_b).contains("guest: power-button pressed"));
    assert!(read(&log_b).contains("guest: exit how=poweroff"));
}

/// A guest driver that misbehaves (the test guest's `hostile` cases: bad
/// descriptors, impossible ring indices, ...) makes virtio-blk give up on
/// its queue: each DEVICE_NEEDS_RESET is an event and is counted.
#[test]
fn device_errors_from_a_hostile_guest_are_events_and_metrics() {
    let dir = temp_dir("api-device-errors");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 16 << 20]).expect("disk");
    let s = Abide::serve(&dir, "serve");
    let events = Events::open(&s.socket, Some(0));
    let config = json!({
        "machine": "pc-1.0",
        "serial": format!("file:{}", dir.join("guest.log").display()),
        "cmdline": "hostile rng quiet",
        "disks": [{"path": disk}],
        "rng": {},
    });
    put_ok(&s.socket, "/api/v1/vm.create", Some(&config.to_string()));
    put_ok(&s.socket, "/api/v1/vm.boot", None);
    let seen = events.wait_for("state", Some("shutdown"), T);
    let info = get_ok(&s.socket, "/api/v1/vm.info");
    assert_eq!(info["exit"]["reason"], "guest-poweroff", "{info}");
    let errors: Vec<&Value> = seen
        .iter()
        .filter(|e| e["event"] == "device-error")
        .collect();
    assert!(!errors.is_empty(), "no device-error event: {seen:?}");
    for e in &errors {
        assert_eq!(e["error"], "needs-reset", "{e}");
        assert!(e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("DEVICE_NEEDS_RESET")));
    }
    let metrics = get_ok(&s.socket, "/api/v1/vm.metrics");
    let counted: u64 = metrics["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["needs_reset"].as_u64().expect("needs_reset"))
        .sum();
    assert_eq!(counted, errors.len() as u64, "{metrics}\n{seen:?}");
    for e in &errors {
        let slot = e["slot"].as_u64().expect("slot");
        let dev = metrics["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .find(|d| d["slot"].as_u64() == Some(slot))
            .unwrap_or_else(|| panic!("no device at slot {slot}: {metrics}"));
        assert_eq!(dev["model"], e["model"]);
    }
    assert!(
        device(&metrics, "virtio-blk")["errors"]
            .as_u64()
            .expect("errors")
            > 0,
        "requests failed with an error status: {metrics}"
    );
    assert!(
        device(&metrics, "virtio-rng")["bytes_to_guest"]
            .as_u64()
            .expect("bytes")
            > 0,
        "the rng kept working: {metrics}"
    );
}

/// Live migration through the API alone: a VM created and booted on one
/// `abide serve` moves to another that waits with `vm.receive-migration`;
/// both event streams tell the story, and the guest finishes its work at
/// the destination, every round exactly once.
#[test]
fn live_migration_between_two_serves() {
    let dir = temp_dir("api-migration");
    let (log_a, log_b) = (dir.join("a.log"), dir.join("b.log"));
    let mut a = Abide::serve(&dir, "a");
    let mut b = Abide::serve(&dir, "b");
    let events_a = Events::open(&a.socket, Some(0));
    let events_b = Events::open(&b.socket, Some(0));
    let config = json!({
        "machine": "pc-1.0",
        "cpus": 2,
        "memory": "256M",
        "serial": format!("file:{}", log_a.display()),
        "cmdline": format!("quiet rounds={ROUNDS} progress buf-kib=1024 power-button"),
    });
    put_ok(&a.socket, "/api/v1/vm.create", Some(&config.to_string()));
    put_ok(&a.socket, "/api/v1/vm.boot", None);
    wait_for_text(&log_a, "guest: progress round=20 ", T);

    // A destination that is not there: the attempt fails, the guest runs
    // on here, and the metrics count the failure.
    let nobody = format!("unix:{}", dir.join("nobody.sock").display());
    let r = put_ok(
        &a.socket,
        "/api/v1/vm.send-migration",
        Some(&json!({ "destination_url": nobody }).to_string()),
    );
    assert_eq!(r["state"], "migrating", "{r}");
    let seen = events_a.wait_for("migration-result", None, T);
    let failed = seen
        .iter()
        .find(|e| e["event"] == "migration-result")
        .expect("result");
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{failed}"
    );
    let start = std::time::Instant::now();
    while get_ok(&a.socket, "/api/v1/vm.info")["state"] != "running" {
        assert!(start.elapsed() < T, "the failed migration never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = get_ok(&a.socket, "/api/v1/vm.metrics")["migration"].clone();
    assert_eq!(
        (&m["sent"], &m["send_failures"], &m["last_sent"]),
        (&json!(0), &json!(1), &Value::Null),
        "{m}"
    );
    assert_eq!(m["status"]["state"], "failed", "{m}");

    let listen = format!("unix:{}", dir.join("mig.sock").display());
    let r = put_ok(
        &b.socket,
        "/api/v1/vm.receive-migration",
        Some(
            &json!({"listen_url": listen, "serial": format!("file:{}", log_b.display())})
                .to_string(),
        ),
    );
    assert_eq!(r["state"], "incoming", "{r}");
    assert_eq!(r["listening"], json!(listen));
    let waiting = get_ok(&b.socket, "/api/v1/vm.migration");
    assert!(
        waiting["incoming"]["phase"]
            .as_str()
            .is_some_and(|p| p.contains("waiting")),
        "{waiting}"
    );
    let r = put(&b.socket, "/api/v1/vm.pause", None);
    assert_eq!(r.status, 409, "{r}");
    assert!(r.error().contains("no guest runs here yet"), "{r}");

    let r = put_ok(
        &a.socket,
        "/api/v1/vm.send-migration",
        Some(&json!({"destination_url": listen}).to_string()),
    );
    assert_eq!(r["state"], "migrating", "{r}");
    let seen_a = events_a.wait_for("state", Some("shutdown"), T);
    let seen_b = events_b.wait_for("state", Some("running"), T);
    let result = seen_a
        .iter()
        .filter(|e| e["event"] == "migration-result")
        .nth(1)
        .unwrap_or_else(|| panic!("no second migration-result: {seen_a:?}"));
    assert_eq!(result["status"], "migrated", "{result}");
    assert!(result["downtime_ms"].as_f64().is_some(), "{result}");
    let kinds_a: Vec<String> = kinds(&seen_a)
        .into_iter()
        .filter(|k| k != "migration-progress")
        .collect();
    assert_eq!(
        kinds_a,
        [
            "state:created",
            "state:running",
            "state:migrating",
            "migration-result",
            "state:running",
            "state:migrating",
            "migration-result",
            "migrated",
            "state:shutdown"
        ],
        "{seen_a:?}"
    );
    assert!(
        seen_a.iter().any(|e| e["event"] == "migration-progress"),
        "a pre-copy pass at least: {seen_a:?}"
    );
    assert_eq!(
        kinds(&seen_b),
        ["state:incoming", "migration-received", "state:running"],
        "{seen_b:?}"
    );
    let info_a = get_ok(&a.socket, "/api/v1/vm.info");
    assert_eq!(info_a["exit"]["reason"], "migrated", "{info_a}");
    assert_eq!(info_a["migration"]["state"], "migrated", "{info_a}");
    let info_b = get_ok(&b.socket, "/api/v1/vm.info");
    assert_eq!(info_b["machine"], "pc-1.0", "{info_b}");
    assert_eq!(
        info_b["config"]["serial"],
        json!(format!("file:{}", log_b.display()))
    );

    // Migration figures on both sides: the source's report, the
    // destination's view.
    let ma = get_ok(&a.socket, "/api/v1/vm.metrics")["migration"].clone();
    assert_eq!((&ma["sent"], &ma["send_failures"]), (&json!(1), &json!(1)));
    let sent = &ma["last_sent"];
    assert!(sent["bytes"].as_u64().is_some_and(|b| b > 0), "{ma}");
    assert_eq!(sent["bytes"], result["bytes"], "{ma}");
    assert_eq!(sent["downtime_ms"], result["downtime_ms"], "{ma}");
    assert_eq!(ma["status"]["state"], "migrated", "{ma}");
    let prom = get(&a.socket, "/api/v1/vm.metrics?format=prometheus").body;
    for want in [
        "abide_migrations_sent_total 1\n",
        "abide_migration_send_failures_total 1\n",
        "abide_last_migration_downtime_ms ",
    ] {
        assert!(prom.contains(want), "no {want:?} in\n{prom}");
    }
    let mb = get_ok(&b.socket, "/api/v1/vm.metrics")["migration"].clone();
    assert_eq!((&mb["received"], &mb["sent"]), (&json!(1), &json!(0)));
    let got = &mb["last_received"];
    assert!(got["bytes"].as_u64().is_some_and(|b| b > 0), "{mb}");
    assert_eq!(got["source_version"], env!("CARGO_PKG_VERSION"), "{mb}");
    let received = seen_b
        .iter()
        .find(|e| e["event"] == "migration-received")
        .expect("received event");
    assert_eq!(got["pages"], received["pages"], "{mb}");

    // The guest finishes at the destination.
    wait_for_text(&log_b, "guest: power-button waiting", T);
    put_ok(&b.socket, "/api/v1/vm.power-button", None);
    events_b.wait_for("state", Some("shutdown"), T);
    let joined = format!("{}{}", read(&log_a), read(&log_b));
    assert_eq!(
        progress_rounds(&joined),
        (0..ROUNDS).collect::<Vec<_>>(),
        "{joined}"
    );
    for s in [&a, &b] {
        put_ok(&s.socket, "/api/v1/vmm.shutdown", None);
    }
    assert_eq!(a.wait(T), Some(0), "{}", a.output());
    assert_eq!(b.wait(T), Some(0), "{}", b.output());
}

/// How a guest ends is an event, and `vm.info` says it: a guest reset, a
/// triple fault (with the vCPU), a guest power-off. One `abide serve`
/// creates and deletes a VM for each. The host capabilities on the API
/// are those `abide capabilities` prints.
#[test]
fn guest_reset_triple_fault_and_poweroff_are_events() {
    let dir = temp_dir("api-guest-ends");
    let mut s = Abide::serve(&dir, "serve");

    let caps = get_ok(&s.socket, "/api/v1/vmm.capabilities");
    let out = abide_tests::run_abide(&["capabilities"], None, T);
    assert_eq!(out.code, Some(0), "{out}");
    let printed: Value = serde_json::from_str(&out.stdout).expect("capabilities JSON");
    assert_eq!(
        caps, printed,
        "vmm.capabilities and `abide capabilities` differ"
    );
    assert!(
        caps["guest"]["machine_types"]
            .as_array()
            .is_some_and(|m| !m.is_empty()),
        "{caps}"
    );

    let events = Events::open(&s.socket, Some(0));
    for (cmdline, event, want) in [
        ("exit=reset quiet", "guest-reset", "reset"),
        ("fault=triple quiet", "guest-triple-fault", "triple"),
        ("exit=poweroff quiet", "guest-poweroff", "poweroff"),
    ] {
        let log = dir.join(format!("{event}.log"));
        let config = json!({
            "machine": "pc-1.0",
            "serial": format!("file:{}", log.display()),
            "cmdline": cmdline,
        });
        let before = events.all().len();
        put_ok(&s.socket, "/api/v1/vm.create", Some(&config.to_string()));
        put_ok(&s.socket, "/api/v1/vm.boot", None);
        let start = std::time::Instant::now();
        let seen = loop {
            let all = events.all();
            if all[before..]
                .iter()
                .any(|e| e["event"] == "state" && e["state"] == "shutdown")
            {
                break all[before..].to_vec();
            }
            assert!(start.elapsed() < T, "{event}: no shutdown; seen {all:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            kinds(&seen),
            ["state:created", "state:running", event, "state:shutdown"],
            "{seen:?}"
        );
        let info = get_ok(&s.socket, "/api/v1/vm.info");
        assert_eq!(info["exit"]["reason"], event, "{info}");
        if event == "guest-triple-fault" {
            let e = &seen[2];
            assert_eq!(e["vcpu"], 0, "{e}");
            assert!(
                e["error"]
                    .as_str()
                    .is_some_and(|m| m.contains("triple fault")),
                "{e}"
            );
        }
        let line = match want {
            "triple" => "guest: fault how=triple".to_string(),
            how => format!("guest: exit how={how}"),
        };
        let text = read(&log);
        assert!(text.contains(&line), "{event}: no {line:?} in\n{text}");
        assert_eq!(
            put_ok(&s.socket, "/api/v1/vm.delete", None)["state"],
            "not-created"
        );
        // The next VM's events come after this one's deletion.
        let start = std::time::Instant::now();
        while events.all().last().map(|e| kinds(std::slice::from_ref(e)))
            != Some(vec!["state:not-created".to_string()])
        {
            assert!(start.elapsed() < T, "no not-created event");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    put_ok(&s.socket, "/api/v1/vmm.shutdown", None);
    assert_eq!(s.wait(T), Some(0), "{}", s.output());
}
