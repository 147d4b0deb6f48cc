//! The control thread: owns the VM through its life (created, running,
//! paused, shut down) and carries out the API's requests one at a time.
//!
//! `abide run` and `abide restore` start with a running VM and end with it
//! (their exit status says how it ended); `abide serve` starts with none and
//! goes on after the VM ends, until `vmm.shutdown`. The control thread is
//! the process's main thread: it waits on the VM's exit event and on
//! requests from the API thread, and never on a client.

mod migrate;
mod ops;
pub mod status;

pub use migrate::receive;

use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use abide_devices::ExitReason;
use serde_json::{json, Value};

use crate::api::{Commands, Listener, ServerLimits};
use crate::migration::incoming::Received;
use crate::vm::{Started, Vm};
use crate::Error;
use status::{Shared, Sources, VmState};

/// Whether the process ends with its VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `abide run` / `abide restore`: the exit status is the VM's fate.
    Run,
    /// `abide serve`: until `vmm.shutdown`.
    Serve,
}

/// The VM and what the control thread knows about it.
struct Controller {
    mode: Mode,
    shared: Arc<Shared>,
    /// Shared with an outgoing migration's thread while it runs.
    vm: Option<Arc<Vm>>,
    started: Option<Started>,
    /// The outgoing migration's thread.
    migration: Option<std::thread::JoinHandle<()>>,
    /// An incoming migration's result, once its thread is done.
    incoming: Option<mpsc::Receiver<Received>>,
    /// Signalled by the incoming migration's thread.
    incoming_wake: Arc<EventFd>,
    /// `abide receive`'s overrides, the defaults of `vm.receive-migration`.
    receive_defaults: Option<crate::migration::ReceiveOptions>,
    /// How the VM ended (the exit status of `run`).
    outcome: Option<Result<ExitReason, Error>>,
    /// `vmm.shutdown` was requested.
    quit: bool,
}

fn poll_readable(fds: &mut [libc::pollfd]) {
    // SAFETY: `fds` is a valid slice of pollfd for the call's duration.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    if r < 0 {
        for f in fds.iter_mut() {
            f.revents = 0;
        }
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

impl Controller {
    fn new(mode: Mode) -> Result<Self, Error> {
        Ok(Self {
            mode,
            shared: Shared::new().map_err(Error::EventFd)?,
            vm: None,
            started: None,
            migration: None,
            incoming: None,
            incoming_wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?),
            receive_defaults: None,
            outcome: None,
            quit: false,
        })
    }

    /// Takes `vm` as this process's VM: publishes its configuration,
    /// manifest and counters, and reports device errors as events.
    fn adopt(&mut self, vm: Vm) {
        let mut sources = Sources {
            vcpus: vm.exit_counters.clone(),
            devices: Vec::new(),
        };
        for f in vm.pci.virtio_functions() {
            let metrics = f
                .function
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .metrics();
            let weak = Arc::downgrade(&self.shared);
            let (slot, model) = (f.slot, f.model);
            metrics.on_needs_reset(Box::new(move || {
                if let Some(shared) = weak.upgrade() {
                    shared.events.publish(
                        "device-error",
                        json!({
                            "slot": slot,
                            "model": model,
                            "error": "needs-reset",
                            "detail": "the device gave up on a request it could not complete and set DEVICE_NEEDS_RESET; the guest driver must reset it",
                        }),
                    );
                }
            }));
            sources.devices.push(status::DeviceSource {
                slot,
                model,
                metrics,
            });
        }
        {
            let mut s = self.shared.status();
            s.spec = Some(crate::spec::VmSpec::from_config(&vm.cfg));
            s.machine = Some(vm.machine.name.clone());
            s.cpu_model = Some(vm.cpu().model.name.clone());
            s.config = Some(vm.cfg.clone());
            s.manifest = None;
            s.sources = Some(Arc::new(sources));
            s.exit = None;
            s.running_since = None;
            s.ran_for = None;
        }
        self.vm = Some(Arc::new(vm));
    }

    /// Starts the adopted VM's vCPUs (parked if `paused`).
    fn start(&mut self, paused: bool) -> Result<(), Error> {
        let Some(vm) = self.vm.as_mut() else {
            return Ok(());
        };
        // Nothing else holds a VM that has not started.
        let vm = Arc::get_mut(vm).ok_or_else(|| {
            Error::Thread(std::io::Error::other("the VM is in use and cannot start"))
        })?;
        let started = vm.start(paused)?;
        self.adopt_started(
            started,
            if paused {
                VmState::Paused
            } else {
                VmState::Running
            },
        );
        Ok(())
    }

    /// Takes the adopted VM's vCPU threads, started elsewhere (by an
    /// incoming migration) or by [`Controller::start`].
    fn adopt_started(&mut self, started: Started, state: VmState) {
        self.started = Some(started);
        self.shared.status().running_since = Some(Instant::now());
        self.shared.set_state(state);
    }

    /// Stops the VM's vCPUs and records how it ended. `requested`: the
    /// API powered it off (otherwise the guest or a vCPU ended it).
    fn end_vm(&mut self, requested: Option<&str>) {
        // An outgoing migration gives up first (before its commit).
        self.join_migration();
        let (Some(vm), Some(started)) = (self.vm.as_ref(), self.started.take()) else {
            return;
        };
        let result = vm.finish(started);
        let error = result.as_ref().err().map(|e| crate::error_chain(e));
        let (event, fields) = match (&result, requested) {
            (_, Some(by)) => ("power-off", json!({"requested": by})),
            (Ok(ExitReason::Poweroff), None) => ("guest-poweroff", json!({})),
            (Ok(ExitReason::Reset), None) => ("guest-reset", json!({})),
            (Ok(ExitReason::Migrated), None) => {
                ("migrated", json!({"to": self.shared.migration.status().to}))
            }
            (Err(Error::Vcpu(crate::vcpu::VcpuError::Shutdown { index, .. })), None) => {
                ("guest-triple-fault", json!({"vcpu": index, "error": error}))
            }
            (Err(_), None) => ("guest-crash", json!({"error": error})),
        };
        let mut exit = json!({"reason": event});
        if let (Value::Object(e), Value::Object(f)) = (&mut exit, &fields) {
            e.extend(f.clone());
        }
        {
            let mut s = self.shared.status();
            s.exit = Some(exit);
            s.ran_for = s.running_since.map(|t| t.elapsed());
        }
        self.shared.events.publish(event, fields);
        self.shared.set_state(VmState::Shutdown);
        self.outcome = Some(match requested {
            Some(_) => Ok(ExitReason::Poweroff),
            None => result,
        });
    }

    /// Serves until the VM ends (`run`) or `vmm.shutdown` (`serve`).
    fn main_loop(&mut self, commands: Option<&Commands>) {
        loop {
            if self.quit || (self.mode == Mode::Run && self.outcome.is_some()) {
                return;
            }
            let exit_fd = match (&self.vm, &self.started) {
                (Some(vm), Some(_)) => Some(vm.exit_event().eventfd().as_raw_fd()),
                _ => None,
            };
            let mut fds = Vec::new();
            if let Some(c) = commands {
                fds.push(pollfd(c.wake.as_raw_fd()));
            }
            if let Some(fd) = exit_fd {
                fds.push(pollfd(fd));
            }
            let incoming = self.incoming.is_some();
            if incoming {
                fds.push(pollfd(self.incoming_wake.as_raw_fd()));
            }
            if fds.is_empty() {
                return;
            }
            poll_readable(&mut fds);
            if incoming && fds.last().is_some_and(|f| f.revents != 0) {
                let _ = self.incoming_wake.read();
                self.received();
            }
            let exit_at = commands.is_some() as usize;
            if exit_fd.is_some() && fds[exit_at].revents != 0 {
                self.end_vm(None);
            }
            if let Some(c) = commands {
                if fds[0].revents != 0 {
                    let _ = c.wake.read();
                }
                while let Ok(cmd) = c.rx.try_recv() {
                    let reply = self.execute(cmd.op);
                    cmd.reply.send(reply);
                    if self.quit {
                        return;
                    }
                }
            }
        }
    }
}

/// Ends the set-up: drops to `--user`/`--group` (once the VM's devices,
/// files and sockets are open) and confines the control thread with its
/// seccomp filter.
pub(crate) fn confine() -> Result<(), Error> {
    crate::privileges::drop_now()?;
    crate::seccomp::install(crate::seccomp::ThreadKind::Control)?;
    Ok(())
}

fn limits() -> ServerLimits {
    ServerLimits::default()
}

/// Runs a built (or restored) VM until it ends, serving the API on `api`
/// if given. `restored`: the restore's figures, for the metrics.
pub fn run(vm: Vm, api: Option<Listener>, restored: Option<Value>) -> Result<ExitReason, Error> {
    let mut c = Controller::new(Mode::Run)?;
    if let Some(r) = restored {
        c.shared.figures().restore_done(r);
    }
    c.adopt(vm);
    let server = api
        .map(|l| l.serve(c.shared.clone(), limits()))
        .transpose()?;
    // Set-up is done: from here on the control thread is confined.
    confine()?;
    c.start(false)?;
    c.main_loop(server.as_ref().map(|(_, cmds)| cmds));
    c.end_vm(Some("vmm.shutdown"));
    // Stopping the API thread lets stream clients read the last events.
    drop(server);
    c.outcome.take().unwrap_or(Ok(ExitReason::Poweroff))
}

/// `abide serve`: no VM until the API creates or restores one; returns at
/// `vmm.shutdown`.
pub fn serve(api: Listener) -> Result<(), Error> {
    let mut c = Controller::new(Mode::Serve)?;
    let (server, commands) = api.serve(c.shared.clone(), limits())?;
    confine()?;
    c.main_loop(Some(&commands));
    c.end_vm(Some("vmm.shutdown"));
    drop(server);
    Ok(())
}
