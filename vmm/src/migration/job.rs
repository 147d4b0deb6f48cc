//! An outgoing migration as the control API sees it: at most one at a
//! time, running on its own thread while the API keeps serving, with its
//! state and last progress for status queries. The REST API
//! (`vm.send-migration`, `vm.migration`) only starts it and reads it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::{json, Value};

use super::{send, MigrationError, Progress, SendError, SendOptions};
use crate::vcpu::Vcpus;
use crate::vm::Vm;

/// What the last or current migration is doing.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JobStatus {
    /// `none`, `active`, `migrated`, `failed` or `unconfirmed` (the link
    /// failed after *commit*; the guest stays paused here).
    pub state: &'static str,
    /// Destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The last pre-copy pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The one migration of a VM.
#[derive(Debug, Default)]
pub struct Job {
    status: Mutex<JobStatus>,
    cancel: AtomicBool,
}

/// What an operator should know when the link fails after *commit*.
const UNCONFIRMED: &str = "the link failed after commit, so the destination may be running the guest; it stays paused here. Check the destination: if it does not run the guest, resume it here (abide ctl resume); if it does, quit this one";

impl Job {
    fn lock(&self) -> std::sync::MutexGuard<'_, JobStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a migration to `to` as started; refuses a second one.
    pub fn begin(&self, to: &str) -> Result<(), MigrationError> {
        let mut s = self.lock();
        if s.state == "active" {
            return Err(MigrationError::Busy);
        }
        *s = JobStatus {
            state: "active",
            to: Some(to.to_string()),
            progress: None,
            error: None,
        };
        self.cancel.store(false, Ordering::Release);
        Ok(())
    }

    /// Whether a migration runs.
    pub fn is_active(&self) -> bool {
        self.lock().state == "active"
    }

    /// Asks a running migration to give up (honoured before *commit*).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// The status, for the API.
    pub fn status(&self) -> JobStatus {
        let s = self.lock().clone();
        if s.state.is_empty() {
            return JobStatus { state: "none", ..s };
        }
        s
    }

    /// Runs the migration started with [`Job::begin`]. `event` gets a JSON
    /// line per pre-copy pass (`"event": "progress"`) and one at the end
    /// (`"event": "result"`). Returns true when the guest moved: the VM
    /// must then end (the caller's exit signal says `Migrated`).
    pub fn run(
        &self,
        vm: &Vm,
        vcpus: &Mutex<Vcpus>,
        opts: &SendOptions,
        event: &mut dyn FnMut(Value),
    ) -> bool {
        let mut on_pass = |p: &Progress| {
            self.lock().progress = Some(p.clone());
            let mut v = serde_json::to_value(p).unwrap_or_default();
            v["event"] = json!("progress");
            event(v);
        };
        let result = send(vm, vcpus, opts, &self.cancel, &mut on_pass);
        let (state, line) = match &result {
            Ok(report) => {
                let mut v = serde_json::to_value(report).unwrap_or_default();
                v["ok"] = json!(true);
                ("migrated", v)
            }
            Err(SendError::Failed(e)) => {
                let text = crate::error_chain(e);
                eprintln!(
                    "abide: migration to {} failed, the guest runs on here: {text}",
                    opts.to
                );
                (
                    "failed",
                    json!({"ok": false, "status": "failed", "error": text}),
                )
            }
            Err(SendError::Unconfirmed(e)) => {
                let text = format!("{}; {UNCONFIRMED}", crate::error_chain(e));
                eprintln!("abide: migration to {}: {text}", opts.to);
                (
                    "unconfirmed",
                    json!({"ok": false, "status": "unconfirmed", "error": text}),
                )
            }
        };
        {
            let mut s = self.lock();
            s.state = state;
            s.error = line["error"].as_str().map(str::to_string);
        }
        let mut line = line;
        line["event"] = json!("result");
        event(line);
        result.is_ok()
    }
}
