//! `GET /api/v1/vm.metrics`: the VM's counters as JSON, or as Prometheus
//! text (`?format=prometheus`). Read from live atomics: vCPU exits by
//! reason, each virtio function's requests, bytes and errors, snapshot and
//! restore figures, live migration figures, and the API's own counters.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::control::status::Shared;

/// The metrics as JSON. `None` when there is no VM.
pub fn json(shared: &Shared) -> Option<Value> {
    let (state, sources, uptime_ms) = {
        let s = shared.status();
        (s.state, s.sources.clone()?, s.uptime_ms())
    };
    let vcpus: Vec<Value> = sources
        .vcpus
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let exits: serde_json::Map<String, Value> = c
                .counts()
                .into_iter()
                .map(|(r, n)| (r.to_string(), json!(n)))
                .collect();
            json!({"index": i, "exits_total": c.total(), "exits": exits})
        })
        .collect();
    let devices: Vec<Value> = sources
        .devices
        .iter()
        .map(|d| {
            let c = d.metrics.counts();
            json!({
                "slot": d.slot,
                "model": d.model,
                "requests": c.requests,
                "bytes_to_guest": c.bytes_to_guest,
                "bytes_from_guest": c.bytes_from_guest,
                "errors": c.errors,
                "needs_reset": c.needs_reset,
            })
        })
        .collect();
    let figures = serde_json::to_value(&*shared.figures()).unwrap_or(Value::Null);
    let mut migration = serde_json::to_value(&*shared.migration_figures()).unwrap_or(Value::Null);
    migration["status"] = shared.migration_json();
    Some(json!({
        "state": state.name(),
        "uptime_ms": uptime_ms,
        "vcpus": vcpus,
        "devices": devices,
        "snapshot": figures,
        "migration": migration,
        "api": shared.api.to_json(),
    }))
}

fn line(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    let _ = if labels.is_empty() {
        writeln!(out, "{name} {value}")
    } else {
        writeln!(out, "{name}{{{labels}}} {value}")
    };
}

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
}

/// The same metrics in the Prometheus text format (version 0.0.4).
pub fn prometheus(v: &Value) -> String {
    let mut out = String::new();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    help(
        &mut out,
        "abide_uptime_seconds",
        "gauge",
        "Time since the guest first ran in this process.",
    );
    line(
        &mut out,
        "abide_uptime_seconds",
        "",
        n(&v["uptime_ms"]) as f64 / 1000.0,
    );
    help(
        &mut out,
        "abide_vcpu_exits_total",
        "counter",
        "vCPU exits to the VMM by reason.",
    );
    for cpu in v["vcpus"].as_array().into_iter().flatten() {
        for (reason, count) in cpu["exits"].as_object().into_iter().flatten() {
            line(
                &mut out,
                "abide_vcpu_exits_total",
                &format!("vcpu=\"{}\",reason=\"{reason}\"", n(&cpu["index"])),
                n(count),
            );
        }
    }
    for (field, kind, text) in [
        (
            "requests",
            "counter",
            "Requests completed by a virtio device.",
        ),
        (
            "bytes_to_guest",
            "counter",
            "Bytes a virtio device wrote into guest buffers.",
        ),
        (
            "bytes_from_guest",
            "counter",
            "Bytes a virtio device took from guest buffers.",
        ),
        (
            "errors",
            "counter",
            "Requests a virtio device failed or dropped.",
        ),
        (
            "needs_reset",
            "counter",
            "Times a virtio device raised DEVICE_NEEDS_RESET.",
        ),
    ] {
        let name = format!("abide_device_{field}_total");
        help(&mut out, &name, kind, text);
        for d in v["devices"].as_array().into_iter().flatten() {
            line(
                &mut out,
                &name,
                &format!(
                    "slot=\"{}\",model=\"{}\"",
                    n(&d["slot"]),
                    d["model"].as_str().unwrap_or("")
                ),
                n(&d[field]),
            );
        }
    }
    let s = &v["snapshot"];
    for (field, text) in [
        ("snapshots", "Snapshots written."),
        ("snapshot_failures", "Snapshots that failed."),
        ("restores", "Snapshots restored."),
        ("restore_failures", "Restores refused or failed."),
    ] {
        let name = format!("abide_{field}_total");
        help(&mut out, &name, "counter", text);
        line(&mut out, &name, "", n(&s[field]));
    }
    for (field, text) in [
        ("bytes", "Size of the last snapshot file."),
        ("pause_ms", "Time the last snapshot took to pause the VM."),
        ("save_ms", "Time the last snapshot took to write the file."),
    ] {
        if let Some(x) = s["last_snapshot"][field].as_f64() {
            let name = format!("abide_last_snapshot_{field}");
            help(&mut out, &name, "gauge", text);
            line(&mut out, &name, "", x);
        }
    }
    let m = &v["migration"];
    for (field, name, text) in [
        (
            "sent",
            "migrations_sent",
            "Outgoing live migrations that moved the guest away.",
        ),
        (
            "send_failures",
            "migration_send_failures",
            "Outgoing live migrations that failed or were not confirmed.",
        ),
        (
            "received",
            "migrations_received",
            "Incoming live migrations whose guest runs here.",
        ),
        (
            "receive_failures",
            "migration_receive_failures",
            "Incoming live migrations that failed.",
        ),
    ] {
        let name = format!("abide_{name}_total");
        help(&mut out, &name, "counter", text);
        line(&mut out, &name, "", n(&m[field]));
    }
    for (field, text) in [
        (
            "downtime_ms",
            "Guest downtime of the last outgoing migration (source's view).",
        ),
        ("total_ms", "Duration of the last outgoing migration."),
        ("bytes", "Bytes the last outgoing migration sent."),
        (
            "iterations",
            "Pre-copy passes of the last outgoing migration.",
        ),
    ] {
        if let Some(x) = m["last_sent"][field].as_f64() {
            let name = format!("abide_last_migration_{field}");
            help(&mut out, &name, "gauge", text);
            line(&mut out, &name, "", x);
        }
    }
    let a = &v["api"];
    help(
        &mut out,
        "abide_api_responses_total",
        "counter",
        "API responses by status class.",
    );
    for class in ["2xx", "4xx", "5xx"] {
        line(
            &mut out,
            "abide_api_responses_total",
            &format!("class=\"{class}\""),
            n(&a[format!("responses_{class}")]),
        );
    }
    for (field, text) in [
        ("connections", "API connections accepted."),
        (
            "refused_connections",
            "API connections refused (too many at once).",
        ),
        ("timeouts", "API clients dropped for being too slow."),
    ] {
        let name = format!("abide_api_{field}_total");
        help(&mut out, &name, "counter", text);
        line(&mut out, &name, "", n(&a[field]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text() {
        let v = json!({
            "uptime_ms": 1500,
            "vcpus": [{"index": 0, "exits": {"io_out": 7, "hlt": 1}}],
            "devices": [{"slot": 1, "model": "virtio-blk", "requests": 3,
                "bytes_to_guest": 4096, "bytes_from_guest": 0, "errors": 0, "needs_reset": 1}],
            "snapshot": {"snapshots": 1, "snapshot_failures": 0, "restores": 0,
                "restore_failures": 0, "last_snapshot": {"bytes": 100, "pause_ms": 1.5, "save_ms": 2.0}},
            "migration": {"sent": 1, "send_failures": 2, "received": 0, "receive_failures": 0,
                "last_sent": {"status": "migrated", "downtime_ms": 12.5, "bytes": 4096}},
            "api": {"connections": 2, "refused_connections": 0, "timeouts": 1,
                "responses_2xx": 5, "responses_4xx": 1, "responses_5xx": 0},
        });
        let t = prometheus(&v);
        for want in [
            "abide_uptime_seconds 1.5\n",
            "abide_vcpu_exits_total{vcpu=\"0\",reason=\"io_out\"} 7\n",
            "abide_device_requests_total{slot=\"1\",model=\"virtio-blk\"} 3\n",
            "abide_device_needs_reset_total{slot=\"1\",model=\"virtio-blk\"} 1\n",
            "abide_snapshots_total 1\n",
            "abide_last_snapshot_pause_ms 1.5\n",
            "abide_api_responses_total{class=\"4xx\"} 1\n",
            "abide_api_timeouts_total 1\n",
            "abide_migrations_sent_total 1\n",
            "abide_migration_send_failures_total 2\n",
            "abide_migrations_received_total 0\n",
            "abide_last_migration_downtime_ms 12.5\n",
            "abide_last_migration_bytes 4096\n",
            "# TYPE abide_vcpu_exits_total counter\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
    }
}
