//! What the control thread shares with the API thread: the VM's state and
//! description, the event log, the sources of metrics, and the wake-up
//! eventfd of the API thread. The API thread answers reads (`vm.info`,
//! `vm.manifest`, `vm.metrics`, events) from here without ever waiting for
//! the control thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use abide_devices::virtio::metrics::DeviceMetrics;
use serde::Serialize;
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use crate::api::events::EventLog;
use crate::spec::VmSpec;
use crate::vcpu::exits::ExitCounters;

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// `abide serve` with no VM yet (or after `vm.delete`).
    #[default]
    NotCreated,
    /// Built from a configuration, not booted.
    Created,
    /// vCPUs run.
    Running,
    /// vCPUs and devices are stopped; the guest does not notice.
    Paused,
    /// An outgoing live migration runs (the guest runs on meanwhile).
    Migrating,
    /// Waiting for an incoming live migration; no guest runs here yet.
    Incoming,
    /// The guest powered off, reset, crashed, or was powered off.
    Shutdown,
}

impl VmState {
    /// The name used in JSON.
    pub fn name(self) -> &'static str {
        match self {
            VmState::NotCreated => "not-created",
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Migrating => "migrating",
            VmState::Incoming => "incoming",
            VmState::Shutdown => "shutdown",
        }
    }
}

/// A virtio function's counters.
#[derive(Debug)]
pub struct DeviceSource {
    /// PCI slot.
    pub slot: u8,
    /// Model (`virtio-blk`, …).
    pub model: &'static str,
    /// Counters.
    pub metrics: Arc<DeviceMetrics>,
}

/// Live counters of the current VM.
#[derive(Debug, Default)]
pub struct Sources {
    /// Exits of each vCPU, by index.
    pub vcpus: Vec<Arc<ExitCounters>>,
    /// Each virtio function.
    pub devices: Vec<DeviceSource>,
}

/// The VM as the API reports it.
#[derive(Debug, Default)]
pub struct Status {
    /// State.
    pub state: VmState,
    /// Configuration (the `vm.create` schema).
    pub spec: Option<VmSpec>,
    /// Machine type, resolved (`pc` becomes `pc-3.0`).
    pub machine: Option<String>,
    /// CPU model the vCPUs run.
    pub cpu_model: Option<String>,
    /// When the guest first ran in this process (boot or restore).
    pub running_since: Option<Instant>,
    /// How long it had run when it ended.
    pub ran_for: Option<std::time::Duration>,
    /// How the VM ended.
    pub exit: Option<Value>,
    /// The configuration the VM was built from.
    pub config: Option<crate::config::VmConfig>,
    /// Its guest ABI manifest and host-side settings (`abide manifest`),
    /// computed on the first request.
    pub manifest: Option<Arc<Value>>,
    /// Counters.
    pub sources: Option<Arc<Sources>>,
}

impl Status {
    /// Milliseconds since the guest first ran here (frozen once it ended).
    pub fn uptime_ms(&self) -> Option<u64> {
        self.ran_for
            .or_else(|| self.running_since.map(|t| t.elapsed()))
            .map(|d| d.as_millis() as u64)
    }
}

/// Snapshot and restore figures of this process.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    /// Snapshots written.
    pub snapshots: u64,
    /// Snapshots that failed.
    pub snapshot_failures: u64,
    /// The last snapshot written (path, bytes, timings).
    pub last_snapshot: Option<Value>,
    /// Restores done.
    pub restores: u64,
    /// Restores refused or failed.
    pub restore_failures: u64,
    /// The last restore (timings).
    pub last_restore: Option<Value>,
}

impl Figures {
    /// Records a snapshot written.
    pub fn snapshot_done(&mut self, report: Value) {
        self.snapshots += 1;
        self.last_snapshot = Some(report);
    }

    /// Records a restore.
    pub fn restore_done(&mut self, report: Value) {
        self.restores += 1;
        self.last_restore = Some(report);
    }
}

/// Live migration figures of this process (either direction).
#[derive(Debug, Default, Serialize)]
pub struct MigrationFigures {
    /// Outgoing migrations that moved the guest away.
    pub sent: u64,
    /// Outgoing migrations that failed (or whose end is unconfirmed).
    pub send_failures: u64,
    /// The last outgoing migration that moved the guest (its report:
    /// downtime, bytes, passes, phases).
    pub last_sent: Option<Value>,
    /// Incoming migrations whose guest runs here.
    pub received: u64,
    /// Incoming migrations that failed.
    pub receive_failures: u64,
    /// The last incoming migration (source version, bytes, pages, downtime).
    pub last_received: Option<Value>,
}

impl MigrationFigures {
    /// Records an outgoing migration's result (`status` is `migrated`,
    /// `failed` or `unconfirmed`).
    pub fn send_done(&mut self, result: &Value) {
        if result["status"] == "migrated" {
            self.sent += 1;
            self.last_sent = Some(result.clone());
        } else {
            self.send_failures += 1;
        }
    }

    /// Records an incoming migration whose guest runs here.
    pub fn receive_done(&mut self, report: Value) {
        self.received += 1;
        self.last_received = Some(report);
    }
}

/// Counters of the API itself.
#[derive(Debug, Default)]
pub struct ApiCounters {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections refused (too many at once).
    pub refused: AtomicU64,
    /// Requests answered, by status class (index 1 = 1xx … 5 = 5xx).
    pub responses: [AtomicU64; 6],
    /// Clients dropped for being too slow (request or write timeout).
    pub timeouts: AtomicU64,
}

impl ApiCounters {
    /// Counts a response with `status`.
    pub fn answered(&self, status: u16) {
        let class = usize::from(status / 100).min(5);
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        let r = |i: usize| self.responses[i].load(Ordering::Relaxed);
        json!({
            "connections": self.connections.load(Ordering::Relaxed),
            "refused_connections": self.refused.load(Ordering::Relaxed),
            "timeouts": self.timeouts.load(Ordering::Relaxed),
            "responses_2xx": r(2),
            "responses_4xx": r(4),
            "responses_5xx": r(5),
        })
    }
}

/// Everything shared between the control thread and the API thread.
#[derive(Debug)]
pub struct Shared {
    /// The VM.
    pub status: Mutex<Status>,
    /// Events.
    pub events: EventLog,
    /// Wakes the API thread (events published, replies ready).
    pub wake: Arc<EventFd>,
    /// Snapshot and restore figures.
    pub figures: Mutex<Figures>,
    /// Live migration figures.
    pub migration_figures: Mutex<MigrationFigures>,
    /// API counters.
    pub api: ApiCounters,
    /// The outgoing migration (at most one at a time).
    pub migration: crate::migration::Job,
    /// What an incoming migration is doing (empty: none).
    pub incoming: Arc<Mutex<String>>,
}

impl Shared {
    /// Fresh shared state.
    pub fn new() -> std::io::Result<Arc<Self>> {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok(Arc::new(Self {
            status: Mutex::new(Status::default()),
            events: EventLog::new(wake.clone()),
            wake,
            figures: Mutex::new(Figures::default()),
            migration_figures: Mutex::new(MigrationFigures::default()),
            api: ApiCounters::default(),
            migration: crate::migration::Job::default(),
            incoming: Arc::default(),
        }))
    }

    /// Locks the status.
    pub fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM's state.
    pub fn state(&self) -> VmState {
        self.status().state
    }

    /// Moves to `state`, publishing a `state` event if it changed.
    pub fn set_state(&self, state: VmState) {
        let previous = {
            let mut s = self.status();
            std::mem::replace(&mut s.state, state)
        };
        if previous != state {
            self.events.publish(
                "state",
                json!({"state": state.name(), "previous": previous.name()}),
            );
        }
    }

    /// The migration's status for the API: the outgoing one's state
    /// (`none`, `active`, `migrated`, `failed`, `unconfirmed`), destination,
    /// last pre-copy pass and error, and what an incoming one is doing.
    pub fn migration_json(&self) -> Value {
        let mut v = serde_json::to_value(self.migration.status()).unwrap_or(Value::Null);
        let phase = self
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        v["incoming"] = if phase.is_empty() {
            Value::Null
        } else {
            json!({ "phase": phase })
        };
        v
    }

    /// Locks the figures.
    pub fn figures(&self) -> std::sync::MutexGuard<'_, Figures> {
        self.figures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the migration figures.
    pub fn migration_figures(&self) -> std::sync::MutexGuard<'_, MigrationFigures> {
        self.migration_figures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}
