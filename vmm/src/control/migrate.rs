//! Live migration as the control thread runs it: an outgoing migration on
//! a thread of its own (the guest runs on, the API keeps answering, and
//! the progress goes out as events), and an incoming one whose received
//! guest becomes this process's VM (`abide receive`, or `abide serve`
//! after `vm.receive-migration`).

use std::sync::mpsc;
use std::time::Duration;

use abide_devices::ExitReason;
use serde_json::{json, Value};

use super::status::VmState;
use super::{limits, Controller, Mode};
use crate::api::routes::{ReceiveMigrationBody, Reply, SendMigrationBody};
use crate::api::server::require;
use crate::api::Listener;
use crate::migration::{announce, incoming, Endpoint, ReceiveOptions, SendOptions};
use crate::Error;

impl Controller {
    /// Waits for an outgoing migration's thread, asking it to give up
    /// first (it does so before its *commit*).
    pub(super) fn join_migration(&mut self) {
        if let Some(h) = self.migration.take() {
            self.shared.migration.cancel();
            let _ = h.join();
        }
    }

    /// `vm.send-migration`: starts migrating the running (or paused) VM.
    pub(super) fn send_migration(
        &mut self,
        state: VmState,
        body: &SendMigrationBody,
    ) -> Result<Value, Reply> {
        require(state, &[VmState::Running, VmState::Paused], "migrate")?;
        let to: Endpoint = body
            .destination_url
            .parse()
            .map_err(|e: String| Reply::error(400, format!("destination_url: {e}")))?;
        let mut opts = SendOptions::new(to);
        if let Some(ms) = body.max_downtime_ms {
            opts.max_downtime = Duration::from_millis(ms);
        }
        opts.max_bandwidth = body.max_bandwidth_mib_s.map(|m| m.saturating_mul(1 << 20));
        if let Some(s) = body.timeout_s {
            opts.timeout = Duration::from_secs(s);
        }
        let (Some(vm), Some(started)) = (self.vm.clone(), self.started.as_ref()) else {
            return Err(Reply::wrong_state(state, "no vCPUs run"));
        };
        let vcpus = started.vcpus.clone();
        // The last migration's thread (it failed, or the guest would be
        // gone) has ended or ends now.
        self.join_migration();
        self.shared
            .migration
            .begin(&opts.to.to_string())
            .map_err(|e| Reply::wrong_state(state, e))?;
        self.shared.set_state(VmState::Migrating);
        let shared = self.shared.clone();
        let spawned = abide_devices::thread("migration").spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Migration);
            let mut event = |mut v: Value| {
                let kind = match v["event"].as_str() {
                    Some("progress") => "migration-progress",
                    _ => "migration-result",
                };
                if let Some(o) = v.as_object_mut() {
                    o.remove("event");
                    o.remove("ok");
                }
                if kind == "migration-result" {
                    shared.migration_figures().send_done(&v);
                }
                shared.events.publish(kind, v);
            };
            if shared.migration.run(&vm, &vcpus, &opts, &mut event) {
                // The guest runs at the destination: this VM ends.
                vm.exit.request(ExitReason::Migrated);
            } else {
                // Failed: the guest runs on here, or stays paused when
                // the link died after commit (the operator decides).
                let paused = vcpus.lock().unwrap_or_else(|e| e.into_inner()).is_paused();
                shared.set_state(if paused {
                    VmState::Paused
                } else {
                    VmState::Running
                });
            }
        });
        match spawned {
            Ok(h) => self.migration = Some(h),
            Err(e) => {
                self.shared.set_state(state);
                return Err(Reply::error(
                    500,
                    format!("cannot start the migration thread: {e}"),
                ));
            }
        }
        Ok(json!({"state": "migrating", "migration": self.shared.migration_json()}))
    }

    /// `vm.receive-migration`: listens for one incoming migration.
    pub(super) fn receive_migration(
        &mut self,
        state: VmState,
        body: &ReceiveMigrationBody,
    ) -> Result<Value, Reply> {
        require(
            state,
            &[VmState::NotCreated, VmState::Incoming],
            "receive a migration",
        )?;
        if self.incoming.is_some() {
            return Err(Reply::wrong_state(
                state,
                "cannot receive a migration: this abide already listens for one",
            ));
        }
        let at: Endpoint = body
            .listen_url
            .parse()
            .map_err(|e: String| Reply::error(400, format!("listen_url: {e}")))?;
        let mut o = self.receive_defaults.clone().unwrap_or_default();
        super::ops::apply_overrides(&mut o.overrides, &body.serial, &body.disk_paths, &body.taps)?;
        let listening = self
            .listen(&at, o)
            .map_err(|e| Reply::error(400, crate::error_chain(&e)))?;
        Ok(json!({"state": self.shared.state().name(), "listening": listening}))
    }

    /// Starts listening on `at`; the state becomes `incoming`.
    fn listen(&mut self, at: &Endpoint, o: ReceiveOptions) -> Result<String, Error> {
        let (tx, rx) = mpsc::channel();
        let shown = incoming::start(
            at,
            o,
            self.shared.incoming.clone(),
            self.incoming_wake.clone(),
            tx,
        )?;
        self.incoming = Some(rx);
        self.shared.set_state(VmState::Incoming);
        Ok(shown)
    }

    /// The incoming migration's thread is done: run the received guest,
    /// or report why there is none.
    pub(super) fn received(&mut self) {
        let Some(rx) = self.incoming.take() else {
            return;
        };
        let result = match rx.try_recv() {
            Ok(r) => r,
            Err(mpsc::TryRecvError::Empty) => {
                self.incoming = Some(rx);
                return;
            }
            Err(mpsc::TryRecvError::Disconnected) => Err(
                crate::migration::MigrationError::Destination("the receiving thread ended".into()),
            ),
        };
        self.shared
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let started = result.map_err(Error::from).map(|incoming| {
            let crate::migration::Incoming {
                mut vm,
                started,
                downtime_ms,
                source_version,
                bytes,
                pages,
            } = incoming;
            // The guest already runs (the receiving thread let it go at
            // *commit*); this thread takes it over.
            let ports = vm.take_net_ports();
            announce::start(ports);
            eprintln!(
                "abide: migration received from Abide {source_version}: {bytes} bytes, {pages} pages; the guest runs here; downtime_ms={downtime_ms}"
            );
            self.adopt(vm);
            let report = json!({
                "source_version": source_version,
                "bytes": bytes,
                "pages": pages,
                "downtime_ms": downtime_ms,
            });
            self.shared.migration_figures().receive_done(report.clone());
            self.shared.events.publish("migration-received", report);
            self.adopt_started(started, VmState::Running);
        });
        if let Err(e) = started {
            let error = crate::error_chain(&e);
            self.vm = None;
            self.started = None;
            self.shared.migration_figures().receive_failures += 1;
            self.shared.events.publish(
                "migration-result",
                json!({"status": "failed", "error": error}),
            );
            if self.mode == Mode::Run {
                self.outcome = Some(Err(e));
            } else {
                self.shared.set_state(VmState::NotCreated);
            }
        }
    }
}

/// `abide receive`: waits for one incoming migration (on `at`, or where the
/// API's `vm.receive-migration` says, with `o`'s overrides as defaults),
/// then runs the guest until it ends.
pub fn receive(
    at: Option<Endpoint>,
    o: ReceiveOptions,
    api: Option<Listener>,
) -> Result<ExitReason, Error> {
    let mut c = Controller::new(Mode::Run)?;
    let server = api
        .map(|l| l.serve(c.shared.clone(), limits()))
        .transpose()?;
    c.shared.set_state(VmState::Incoming);
    *c.shared.incoming.lock().unwrap_or_else(|e| e.into_inner()) =
        "waiting for a vm.receive-migration request on the API".into();
    c.receive_defaults = Some(o.clone());
    if let Some(at) = &at {
        c.listen(at, o)?;
    }
    super::confine()?;
    c.main_loop(server.as_ref().map(|(_, cmds)| cmds));
    c.end_vm(Some("vmm.shutdown"));
    drop(server);
    // Quitting before anything was committed leaves the guest with its
    // source: that is no error.
    c.outcome.take().unwrap_or(Ok(ExitReason::Poweroff))
}
