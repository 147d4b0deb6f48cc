//! The API's endpoints (`docs/api/openapi.yaml`): which method and path
//! mean which operation, and the parsing of query parameters and bodies.
//! Everything the client sent is checked here, strictly: unknown fields
//! and parameters are refused, and each refusal says what was wrong.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

use super::http::Request;
use crate::control::status::VmState;
use crate::spec::VmSpec;

/// The prefix of every endpoint.
pub const PREFIX: &str = "/api/v1/";

/// Endpoints and their methods.
pub const ROUTES: &[(&str, &str)] = &[
    ("vmm.ping", "GET"),
    ("vmm.capabilities", "GET"),
    ("vmm.shutdown", "PUT"),
    ("events", "GET"),
    ("vm.info", "GET"),
    ("vm.manifest", "GET"),
    ("vm.metrics", "GET"),
    ("vm.create", "PUT"),
    ("vm.boot", "PUT"),
    ("vm.pause", "PUT"),
    ("vm.resume", "PUT"),
    ("vm.snapshot", "PUT"),
    ("vm.restore", "PUT"),
    ("vm.power-button", "PUT"),
    ("vm.power-off", "PUT"),
    ("vm.delete", "PUT"),
    ("vm.send-migration", "PUT"),
    ("vm.receive-migration", "PUT"),
    ("vm.migration", "GET"),
];

/// `vm.snapshot`'s body.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    /// File to write (relative paths are relative to abide's working
    /// directory).
    pub path: PathBuf,
    /// Write only what this Abide release reads, or refuse before pausing
    /// the guest, naming the section it cannot read.
    #[serde(default)]
    pub target_version: Option<String>,
    /// Leave the guest paused after the save (`abide snapshot --stop`).
    #[serde(default)]
    pub stay_paused: bool,
}

/// A disk image replacing the saved one at a PCI slot.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotPath {
    /// PCI slot of the disk.
    pub slot: u8,
    /// New image.
    pub path: PathBuf,
}

/// A tap interface replacing the saved one at a PCI slot.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotTap {
    /// PCI slot of the network card.
    pub slot: u8,
    /// Tap interface name.
    pub tap: String,
}

/// `vm.restore`'s body: the snapshot and host-side overrides (as
/// `abide restore`'s flags).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    /// Snapshot file.
    pub path: PathBuf,
    /// COM1 output (`stdio`, `null`, `file:PATH`); default: as saved.
    #[serde(default)]
    pub serial: Option<String>,
    /// Other disk images.
    #[serde(default)]
    pub disk_paths: Vec<SlotPath>,
    /// Other tap interfaces.
    #[serde(default)]
    pub taps: Vec<SlotTap>,
    /// Run the guest at once instead of leaving it paused.
    #[serde(default)]
    pub resume: bool,
}

/// `vm.send-migration`'s body (as `abide migrate`'s flags).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationBody {
    /// The destination: `tcp:HOST:PORT` or `unix:PATH` (an `abide receive`).
    pub destination_url: String,
    /// Longest acceptable pause of the guest (default 300 ms).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Pre-copy bandwidth limit in MiB/s (default: none).
    #[serde(default)]
    pub max_bandwidth_mib_s: Option<u64>,
    /// Bound on the whole migration in seconds (default 120).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// `vm.receive-migration`'s body: where to listen, and host-side overrides
/// as for a restore.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationBody {
    /// Where to wait for the source: `tcp:ADDR:PORT` or `unix:PATH`.
    pub listen_url: String,
    /// COM1 output; default: the source's.
    #[serde(default)]
    pub serial: Option<String>,
    /// Other disk images.
    #[serde(default)]
    pub disk_paths: Vec<SlotPath>,
    /// Other tap interfaces.
    #[serde(default)]
    pub taps: Vec<SlotTap>,
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Liveness.
    Ping,
    /// `abide capabilities`.
    Capabilities,
    /// Stop any VM and end the process.
    Shutdown,
    /// Stream (or list) events.
    Events {
        /// First event number wanted (default: the next one).
        since: Option<u64>,
        /// Keep the response open for new events.
        follow: bool,
    },
    /// State, configuration, uptime.
    Info,
    /// The guest ABI manifest.
    Manifest,
    /// Counters.
    Metrics {
        /// Prometheus text instead of JSON.
        prometheus: bool,
    },
    /// Build a VM.
    Create(Box<VmSpec>),
    /// Start a created VM.
    Boot,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Write a snapshot.
    Snapshot(SnapshotBody),
    /// Restore a snapshot into this (empty) abide.
    Restore(Box<RestoreBody>),
    /// Press the ACPI power button.
    PowerButton,
    /// Stop the VM now.
    PowerOff,
    /// Forget a created or shut down VM.
    Delete,
    /// Migrate the VM to another abide.
    SendMigration(Box<SendMigrationBody>),
    /// Wait for a VM from another abide.
    ReceiveMigration(Box<ReceiveMigrationBody>),
    /// The migration's state and progress.
    MigrationStatus,
}

impl Op {
    /// Whether the API thread answers this itself (reads of shared state)
    /// rather than the control thread.
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Op::Ping
                | Op::Capabilities
                | Op::Events { .. }
                | Op::Info
                | Op::Manifest
                | Op::Metrics { .. }
                | Op::MigrationStatus
        )
    }
}

/// A response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
    /// Content type of the body.
    pub content_type: &'static str,
    /// `Allow` header (405 only).
    pub allow: Option<&'static str>,
}

impl Reply {
    /// A JSON response.
    pub fn json(status: u16, v: &Value) -> Self {
        Self {
            status,
            body: v.to_string().into_bytes(),
            content_type: "application/json",
            allow: None,
        }
    }

    /// 200 with a JSON body.
    pub fn ok(v: &Value) -> Self {
        Self::json(200, v)
    }

    /// An error: `{"error": MESSAGE}`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self::json(status, &json!({ "error": message.to_string() }))
    }

    /// A request the VM's state does not allow: 409 naming the state.
    pub fn wrong_state(state: VmState, message: impl std::fmt::Display) -> Self {
        Self::json(
            409,
            &json!({
                "error": format!("{message} (the VM is {})", state.name()),
                "state": state.name(),
            }),
        )
    }

    /// Plain text.
    pub fn text(status: u16, body: String, content_type: &'static str) -> Self {
        Self {
            status,
            body: body.into_bytes(),
            content_type,
            allow: None,
        }
    }
}

fn bad(message: impl std::fmt::Display) -> Reply {
    Reply::error(400, message)
}

/// Bodies of endpoints that take none: empty, or an empty JSON object.
fn no_body(body: &[u8]) -> Result<(), Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match serde_json::from_slice::<serde_json::Map<String, Value>>(body) {
        Ok(m) if m.is_empty() => Ok(()),
        Ok(m) => Err(bad(format!(
            "this endpoint takes no body; unknown field(s): {}",
            m.keys().cloned().collect::<Vec<_>>().join(", ")
        ))),
        Err(e) => Err(bad(format!(
            "this endpoint takes no body (or an empty JSON object): {e}"
        ))),
    }
}

/// A JSON object body; `lists` name its fields that are arrays of objects.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], lists: &[&str]) -> Result<T, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad("a JSON body is required"));
    }
    let invalid = |e: String| bad(format!("invalid request body: {e}"));
    let v: Value = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    crate::spec::check_shape(&v, lists, &[]).map_err(invalid)?;
    serde_json::from_value(v).map_err(|e| invalid(e.to_string()))
}

/// Query parameters: only `allowed` ones, each at most once.
fn query<'a>(req: &'a Request, allowed: &[&str]) -> Result<Vec<(&'a str, &'a str)>, Reply> {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for (k, v) in &req.query {
        if !allowed.contains(&k.as_str()) {
            return Err(bad(if allowed.is_empty() {
                format!("unknown query parameter '{k}': this endpoint takes none")
            } else {
                format!(
                    "unknown query parameter '{k}'; valid: {}",
                    allowed.join(", ")
                )
            }));
        }
        if seen.iter().any(|(s, _)| s == k) {
            return Err(bad(format!("query parameter '{k}' given twice")));
        }
        seen.push((k, v));
    }
    Ok(seen)
}

fn boolean(name: &str, v: &str) -> Result<bool, Reply> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(format!(
            "query parameter {name}='{v}': use true or false"
        ))),
    }
}

/// Maps a request to its operation, or the error response.
pub fn route(req: &Request) -> Result<Op, Reply> {
    let Some(name) = req.path.strip_prefix(PREFIX) else {
        return Err(not_found(&req.path));
    };
    let Some((_, method)) = ROUTES.iter().find(|(n, _)| *n == name) else {
        return Err(not_found(&req.path));
    };
    if req.method != *method {
        return Err(Reply {
            allow: Some(method),
            ..Reply::error(
                405,
                format!("{} {} is not allowed; use {method}", req.method, req.path),
            )
        });
    }
    let params = query(
        req,
        match name {
            "events" => &["since", "follow"],
            "vm.metrics" => &["format"],
            _ => &[],
        },
    )?;
    let body = &req.body;
    Ok(match name {
        "vmm.ping" => no_body(body).map(|()| Op::Ping)?,
        "vmm.capabilities" => no_body(body).map(|()| Op::Capabilities)?,
        "vmm.shutdown" => no_body(body).map(|()| Op::Shutdown)?,
        "events" => {
            no_body(body)?;
            let mut since = None;
            let mut follow = true;
            for (k, v) in params {
                if k == "since" {
                    // Digits only: u64's parser would also take "+5".
                    let digits = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
                    since = Some(v.parse::<u64>().ok().filter(|_| digits).ok_or_else(|| {
                        bad(format!(
                            "query parameter since='{v}': use an event number (0 or more)"
                        ))
                    })?);
                } else {
                    follow = boolean(k, v)?;
                }
            }
            Op::Events { since, follow }
        }
        "vm.info" => no_body(body).map(|()| Op::Info)?,
        "vm.manifest" => no_body(body).map(|()| Op::Manifest)?,
        "vm.metrics" => {
            no_body(body)?;
            let prometheus = match params.first() {
                None | Some((_, "json")) => false,
                Some((_, "prometheus")) => true,
                Some((_, v)) => {
                    return Err(bad(format!(
                        "query parameter format='{v}': use json or prometheus"
                    )))
                }
            };
            Op::Metrics { prometheus }
        }
        "vm.create" => Op::Create(Box::new(
            VmSpec::from_json(body, None).map_err(|e| bad(crate::error_chain(&e)))?,
        )),
        "vm.boot" => no_body(body).map(|()| Op::Boot)?,
        "vm.pause" => no_body(body).map(|()| Op::Pause)?,
        "vm.resume" => no_body(body).map(|()| Op::Resume)?,
        "vm.snapshot" => Op::Snapshot(json_body(body, &[])?),
        "vm.restore" => Op::Restore(Box::new(json_body(body, &["disk_paths", "taps"])?)),
        "vm.power-button" => no_body(body).map(|()| Op::PowerButton)?,
        "vm.power-off" => no_body(body).map(|()| Op::PowerOff)?,
        "vm.delete" => no_body(body).map(|()| Op::Delete)?,
        "vm.send-migration" => Op::SendMigration(Box::new(json_body(body, &[])?)),
        "vm.receive-migration" => {
            Op::ReceiveMigration(Box::new(json_body(body, &["disk_paths", "taps"])?))
        }
        _ => no_body(body).map(|()| Op::MigrationStatus)?,
    })
}

fn not_found(path: &str) -> Reply {
    Reply::error(
        404,
        format!("no endpoint '{path}'; the API is under {PREFIX} (see docs/api/openapi.yaml)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, target: &str, body: &str) -> Request {
        let (path, query) = super::super::http::split_target(target).expect("target");
        Request {
            method: method.into(),
            path,
            query,
            body: body.as_bytes().to_vec(),
            keep_alive: true,
            http10: false,
        }
    }

    fn status(method: &str, target: &str, body: &str) -> u16 {
        route(&req(method, target, body)).map_or_else(|r| r.status, |_| 200)
    }

    #[test]
    fn operations() {
        assert_eq!(route(&req("GET", "/api/v1/vm.info", "")), Ok(Op::Info));
        assert_eq!(
            route(&req("PUT", "/api/v1/vm.pause", " {} ")),
            Ok(Op::Pause)
        );
        assert_eq!(
            route(&req("GET", "/api/v1/events?since=3&follow=false", "")),
            Ok(Op::Events {
                since: Some(3),
                follow: false
            })
        );
        assert_eq!(
            route(&req("GET", "/api/v1/vm.metrics?format=prometheus", "")),
            Ok(Op::Metrics { prometheus: true })
        );
        assert_eq!(
            route(&req("PUT", "/api/v1/vm.snapshot", r#"{"path":"/x"}"#)),
            Ok(Op::Snapshot(SnapshotBody {
                path: "/x".into(),
                target_version: None,
                stay_paused: false
            }))
        );
        let Ok(Op::Create(spec)) = route(&req("PUT", "/api/v1/vm.create", r#"{"cpus":2}"#)) else {
            panic!("create");
        };
        assert_eq!(spec.cpus, 2);
        let Ok(Op::Restore(r)) = route(&req(
            "PUT",
            "/api/v1/vm.restore",
            r#"{"path":"/s","disk_paths":[{"slot":1,"path":"/d"}],"resume":true}"#,
        )) else {
            panic!("restore");
        };
        assert!(r.resume);
        assert_eq!(r.disk_paths[0].slot, 1);
    }

    #[test]
    fn refusals_say_what_was_wrong() {
        assert_eq!(status("GET", "/api/v1/nothing", ""), 404);
        assert_eq!(status("GET", "/elsewhere", ""), 404);
        let r = route(&req("GET", "/api/v1/vm.pause", "")).expect_err("405");
        assert_eq!((r.status, r.allow), (405, Some("PUT")));
        assert_eq!(status("PUT", "/api/v1/vm.pause", r#"{"now":true}"#), 400);
        assert_eq!(status("PUT", "/api/v1/vm.pause", "garbage"), 400);
        assert_eq!(status("GET", "/api/v1/vm.info?x=1", ""), 400);
        assert_eq!(status("GET", "/api/v1/events?since=-1", ""), 400);
        assert_eq!(status("GET", "/api/v1/events?since=%2B5", ""), 400);
        assert_eq!(status("GET", "/api/v1/events?since=", ""), 400);
        assert_eq!(status("GET", "/api/v1/events?since=1&since=2", ""), 400);
        assert_eq!(status("GET", "/api/v1/events?follow=maybe", ""), 400);
        assert_eq!(status("GET", "/api/v1/vm.metrics?format=xml", ""), 400);
        assert_eq!(status("PUT", "/api/v1/vm.snapshot", ""), 400);
        assert_eq!(
            status("PUT", "/api/v1/vm.snapshot", r#"{"path":"/x","x":1}"#),
            400
        );
        assert_eq!(status("PUT", "/api/v1/vm.snapshot", r#"["/x"]"#), 400);
        assert_eq!(
            status(
                "PUT",
                "/api/v1/vm.restore",
                r#"{"path":"/x","taps":[[2,"t"]]}"#
            ),
            400
        );
        let r = route(&req("PUT", "/api/v1/vm.create", r#"{"cpus":1,"bogus":2}"#))
            .expect_err("unknown field");
        let v: Value = serde_json::from_slice(&r.body).expect("json");
        assert!(
            v["error"].as_str().expect("message").contains("bogus"),
            "{v}"
        );
    }
}
