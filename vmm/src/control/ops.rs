//! The requests that change the VM, as the control thread carries them out.

use std::time::Instant;

use serde_json::{json, Value};

use super::status::VmState;
use super::Controller;
use crate::api::routes::{Op, Reply, RestoreBody};
use crate::api::server::{info, require};
use crate::snapshot::{Overrides, RestoreError};
use crate::Error;

/// The status code for an error: the client's input could not work (400)
/// or the host failed (500).
fn status_of(e: &Error) -> u16 {
    match e {
        Error::Config(_)
        | Error::OpenFile { .. }
        | Error::Machine(_)
        | Error::CpuModel(_)
        | Error::CpuUnsupported(_)
        | Error::DeviceConfig(_)
        | Error::RomTooLarge { .. }
        | Error::NoRomSlot { .. }
        | Error::HostVcpus { .. }
        | Error::Boot(_)
        | Error::Spec(_)
        | Error::Virtio(crate::virtio::VirtioSetupError::Tap { .. }) => 400,
        Error::Snapshot(
            RestoreError::File(_)
            | RestoreError::Read { .. }
            | RestoreError::Write { .. }
            | RestoreError::AbiMismatch { .. }
            | RestoreError::Override(_)
            | RestoreError::Unclaimed(_)
            | RestoreError::Malformed { .. }
            // The target release is unknown or cannot read this guest
            // (nothing was paused). Not a 409: that answer names the VM's
            // state, which is not what refused (found by schemathesis).
            | RestoreError::Target { .. },
        ) => 400,
        _ => 500,
    }
}

/// Adds a request's host-side overrides (`vm.restore`,
/// `vm.receive-migration`) to `o`.
pub(super) fn apply_overrides(
    o: &mut Overrides,
    serial: &Option<String>,
    disk_paths: &[crate::api::routes::SlotPath],
    taps: &[crate::api::routes::SlotTap],
) -> Result<(), Reply> {
    if let Some(s) = serial {
        o.serial = Some(crate::config::parse_serial(s).map_err(|e| Reply::error(400, e))?);
    }
    o.disk_paths
        .extend(disk_paths.iter().map(|d| (d.slot, d.path.clone())));
    o.taps.extend(taps.iter().map(|t| {
        (
            t.slot,
            crate::devices_config::NetBackend::Tap(t.tap.clone()),
        )
    }));
    Ok(())
}

fn failure(e: &Error) -> Reply {
    Reply::error(status_of(e), crate::error_chain(e))
}

impl Controller {
    fn state(&self) -> VmState {
        self.shared.state()
    }

    /// Carries out one request.
    pub(super) fn execute(&mut self, op: Op) -> Reply {
        let state = self.state();
        let result = match op {
            Op::Create(spec) => self.create(state, &spec),
            Op::Boot => self.boot(state),
            Op::Pause => self.pause(state),
            Op::Resume => self.resume(state),
            Op::Snapshot(body) => self.snapshot(state, &body),
            Op::Restore(body) => self.restore(state, &body),
            Op::PowerButton => self.power_button(state),
            Op::PowerOff => self.power_off(state),
            Op::Delete => self.delete(state),
            Op::SendMigration(body) => self.send_migration(state, &body),
            Op::ReceiveMigration(body) => self.receive_migration(state, &body),
            Op::Shutdown => {
                self.end_vm(Some("vmm.shutdown"));
                self.quit = true;
                Ok(json!({"state": self.state().name(), "stopping": true}))
            }
            // Reads are answered by the API thread.
            _ => Err(Reply::error(
                500,
                "internal error: a read reached the control thread",
            )),
        };
        match result {
            Ok(v) => Reply::ok(&v),
            Err(r) => r,
        }
    }

    fn create(&mut self, state: VmState, spec: &crate::spec::VmSpec) -> Result<Value, Reply> {
        require(state, &[VmState::NotCreated], "create a VM")?;
        let cfg = spec
            .resolve()
            .map_err(|e| Reply::error(400, crate::error_chain(&e)))?;
        let machine = abide_machines::resolve(&cfg.machine).map_err(|e| failure(&e.into()))?;
        let vm = crate::vm::Vm::build(machine, &cfg).map_err(|e| failure(&e))?;
        self.adopt(vm);
        self.shared.set_state(VmState::Created);
        Ok(self.info_value())
    }

    fn info_value(&self) -> Value {
        info(&self.shared)
    }

    /// The VM and its vCPUs (locked), for requests that need them
    /// running or paused.
    fn vcpus(
        &self,
        state: VmState,
    ) -> Result<
        (
            &crate::vm::Vm,
            std::sync::MutexGuard<'_, crate::vcpu::Vcpus>,
        ),
        Reply,
    > {
        match (self.vm.as_deref(), self.started.as_ref()) {
            (Some(vm), Some(started)) => {
                Ok((vm, started.vcpus.lock().unwrap_or_else(|e| e.into_inner())))
            }
            _ => Err(Reply::wrong_state(state, "no vCPUs run")),
        }
    }

    /// Publishes `event` with `report` and answers with it and the state.
    fn announce(&self, event: &str, report: Value) -> Value {
        self.shared.events.publish(event, report.clone());
        let mut reply = report;
        reply["state"] = json!(self.state().name());
        reply
    }

    fn boot(&mut self, state: VmState) -> Result<Value, Reply> {
        require(state, &[VmState::Created], "boot")?;
        self.start(false).map_err(|e| failure(&e))?;
        Ok(self.info_value())
    }

    fn pause(&mut self, state: VmState) -> Result<Value, Reply> {
        require(state, &[VmState::Running], "pause")?;
        let (vm, mut vcpus) = self.vcpus(state)?;
        let t = Instant::now();
        vm.pause(&mut vcpus).map_err(|e| failure(&e))?;
        let pause_ms = crate::api::ms(t);
        self.shared.set_state(VmState::Paused);
        Ok(json!({"state": "paused", "pause_ms": pause_ms}))
    }

    fn resume(&mut self, state: VmState) -> Result<Value, Reply> {
        require(state, &[VmState::Paused], "resume")?;
        let (vm, mut vcpus) = self.vcpus(state)?;
        vm.resume(&mut vcpus).map_err(|e| failure(&e))?;
        self.shared.set_state(VmState::Running);
        Ok(json!({"state": "running"}))
    }

    fn snapshot(
        &mut self,
        state: VmState,
        body: &crate::api::routes::SnapshotBody,
    ) -> Result<Value, Reply> {
        require(state, &[VmState::Running, VmState::Paused], "snapshot")?;
        let path = &body.path;
        let o = crate::snapshot::SaveOptions {
            target_version: body.target_version.clone(),
            stay_paused: body.stay_paused,
        };
        let (vm, mut vcpus) = self.vcpus(state)?;
        match crate::snapshot::save(vm, &mut vcpus, path, &o) {
            Ok(r) => {
                if o.stay_paused {
                    self.shared.set_state(VmState::Paused);
                }
                let report = json!({
                    "path": path,
                    "bytes": r.bytes,
                    "memory_bytes": r.memory_bytes,
                    "pause_ms": r.pause_ms,
                    "save_ms": r.save_ms,
                    "notes": r.notes,
                });
                self.shared.figures().snapshot_done(report.clone());
                Ok(self.announce("snapshot-done", report))
            }
            Err(e) => {
                self.shared.figures().snapshot_failures += 1;
                let error = crate::error_chain(&e);
                self.shared
                    .events
                    .publish("snapshot-failed", json!({"path": path, "error": error}));
                Err(failure(&e))
            }
        }
    }

    fn restore(&mut self, state: VmState, body: &RestoreBody) -> Result<Value, Reply> {
        require(state, &[VmState::NotCreated], "restore a snapshot")?;
        let mut overrides = Overrides::default();
        apply_overrides(&mut overrides, &body.serial, &body.disk_paths, &body.taps)?;
        let refused = |c: &mut Self, e: &Error| {
            c.shared.figures().restore_failures += 1;
            failure(e)
        };
        let (vm, report) = match crate::snapshot::restore(&body.path, &overrides) {
            Ok(r) => r,
            Err(e) => return Err(refused(self, &e)),
        };
        let figures = json!({
            "path": body.path,
            "verify_ms": report.verify_ms,
            "abi_ms": report.abi_ms,
            "load_ms": report.load_ms,
            "memory": report.memory,
            "memory_ms": report.memory_ms,
            "memory_note": report.memory_note,
        });
        self.adopt(vm);
        if let Err(e) = self.start(!body.resume) {
            self.vm = None;
            self.started = None;
            return Err(refused(self, &e));
        }
        self.shared.figures().restore_done(figures.clone());
        Ok(self.announce("restore-done", figures))
    }

    fn power_button(&mut self, state: VmState) -> Result<Value, Reply> {
        require(state, &[VmState::Running], "press the power button")?;
        let Some(vm) = self.vm.as_ref() else {
            return Err(Reply::wrong_state(state, "no VM"));
        };
        let enabled = {
            let mut pm = vm.legacy.pm.lock().unwrap_or_else(|e| e.into_inner());
            pm.press_power_button();
            pm.sci_pending()
        };
        self.shared
            .events
            .publish("power-button", json!({"guest_listening": enabled}));
        Ok(json!({"state": "running", "guest_listening": enabled}))
    }

    fn power_off(&mut self, state: VmState) -> Result<Value, Reply> {
        require(
            state,
            &[
                VmState::Created,
                VmState::Running,
                VmState::Paused,
                VmState::Migrating,
            ],
            "power off",
        )?;
        if self.started.is_some() {
            self.end_vm(Some("vm.power-off"));
        } else {
            self.shared.status().exit =
                Some(json!({"reason": "power-off", "requested": "vm.power-off"}));
            self.shared
                .events
                .publish("power-off", json!({"requested": "vm.power-off"}));
            self.shared.set_state(VmState::Shutdown);
            self.outcome = Some(Ok(abide_devices::ExitReason::Poweroff));
        }
        Ok(json!({"state": self.state().name()}))
    }

    fn delete(&mut self, state: VmState) -> Result<Value, Reply> {
        require(
            state,
            &[VmState::Created, VmState::Shutdown],
            "delete the VM",
        )?;
        self.started = None;
        self.vm = None;
        {
            let mut s = self.shared.status();
            *s = super::status::Status::default();
            // Keep the state as it was for set_state to announce the change.
            s.state = state;
        }
        self.outcome = None;
        self.shared.set_state(VmState::NotCreated);
        Ok(json!({"state": "not-created"}))
    }
}
