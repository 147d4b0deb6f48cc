//! vCPUs: one thread each, running KVM_RUN and dispatching exits to the buses.

pub mod cpuid;
pub mod exits;
pub mod regs;
pub mod state;

use std::fmt::Write as _;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use abide_devices::{Bus, ExitSignal};
use kvm_ioctls::{VcpuExit, VcpuFd};

/// Why a vCPU stopped the VM.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Triple fault or other shutdown condition.
    #[error("vCPU {index} shut down (triple fault): the guest crashed\n{regs}")]
    Shutdown {
        /// vCPU index.
        index: u32,
        /// Register dump.
        regs: String,
    },
    /// KVM could not emulate something.
    #[error("vCPU {index}: KVM internal error (suberror {suberror}); the guest executed something this host's KVM cannot run\n{regs}")]
    Internal {
        /// vCPU index.
        index: u32,
        /// KVM suberror code.
        suberror: u32,
        /// Register dump.
        regs: String,
    },
    /// VM entry failed.
    #[error("vCPU {index}: VM entry failed (hardware reason {reason:#x})\n{regs}")]
    FailEntry {
        /// vCPU index.
        index: u32,
        /// Hardware entry failure reason.
        reason: u64,
        /// Register dump.
        regs: String,
    },
    /// An exit Abide does not handle.
    #[error("vCPU {index}: unexpected exit {what}\n{regs}")]
    Unexpected {
        /// vCPU index.
        index: u32,
        /// Exit kind.
        what: String,
        /// Register dump.
        regs: String,
    },
    /// KVM_RUN itself failed.
    #[error("vCPU {index}: KVM_RUN failed")]
    Run {
        /// vCPU index.
        index: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Formats the vCPU's registers for an error report.
pub fn dump_registers(vcpu: &VcpuFd) -> String {
    let mut s = String::new();
    match vcpu.get_regs() {
        Ok(r) => {
            let _ = writeln!(
                s,
                "  rip={:#018x} rsp={:#018x} rflags={:#010x}",
                r.rip, r.rsp, r.rflags
            );
            let _ = writeln!(
                s,
                "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
                r.rax, r.rbx, r.rcx, r.rdx
            );
            let _ = writeln!(
                s,
                "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8={:#018x}",
                r.rsi, r.rdi, r.rbp, r.r8
            );
        }
        Err(e) => {
            let _ = writeln!(s, "  (registers unavailable: {e})");
        }
    }
    match vcpu.get_sregs() {
        Ok(sr) => {
            let _ = write!(
                s,
                "  cs={:#06x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}+{:#x} gdt={:#x}+{:#x}",
                sr.cs.selector,
                sr.cr0,
                sr.cr3,
                sr.cr4,
                sr.efer,
                sr.idt.base,
                sr.idt.limit,
                sr.gdt.base,
                sr.gdt.limit
            );
        }
        Err(e) => {
            let _ = write!(s, "  (special registers unavailable: {e})");
        }
    }
    s
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    /// Index (== APIC ID).
    pub index: u32,
    /// KVM vCPU.
    pub fd: VcpuFd,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// MSRs saved in snapshots (KVM's index list).
    pub msrs: Arc<Vec<u32>>,
    /// Exits by reason (read by the metrics endpoint).
    pub exits: Arc<exits::ExitCounters>,
}

/// What a paused vCPU thread can be asked to do.
#[derive(Debug)]
pub enum VcpuCommand {
    /// Save the vCPU's state and send it back.
    Save(mpsc::Sender<Result<state::VcpuState, state::StateError>>),
    /// Continue running the guest.
    Resume,
    /// Leave the thread.
    Stop,
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    index: u32,
    handle: JoinHandle<()>,
    commands: mpsc::Sender<VcpuCommand>,
}

/// Shared run control for all vCPUs.
#[derive(Clone, Debug)]
pub struct RunControl {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    exit: ExitSignal,
    errors: mpsc::Sender<VcpuError>,
    paused: mpsc::Sender<u32>,
}

impl RunControl {
    /// Whether vCPUs were told to stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn pausing(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }
}

/// Why the vCPUs could not be paused.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// A vCPU thread ended (the guest powered off or crashed meanwhile).
    #[error("vCPU {0} is no longer running")]
    Ended(u32),
    /// A vCPU did not reach a clean point in time.
    #[error("vCPU {0} did not pause within {1:?}")]
    Timeout(u32, Duration),
}

/// All vCPU threads of a VM.
#[derive(Debug)]
pub struct Vcpus {
    ctl: RunControl,
    threads: Vec<VcpuThread>,
    acks: mpsc::Receiver<u32>,
    paused: bool,
}

const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

fn kick(t: &VcpuThread) {
    // SAFETY: the handle is a live, joinable thread (not yet joined), and
    // the kick signal has a no-op handler installed.
    unsafe {
        libc::pthread_kill(t.handle.as_pthread_t(), kick_signal());
    }
}

impl Vcpus {
    /// Starts one thread per vCPU. Failures are reported on `errors`, and
    /// `exit` is signalled when a vCPU ends the VM.
    pub fn start(
        vcpus: Vec<Vcpu>,
        exit: ExitSignal,
        errors: mpsc::Sender<VcpuError>,
        early: Vec<WaitingThread>,
    ) -> std::io::Result<Self> {
        Self::spawn_all(vcpus, exit, errors, false, early)
    }

    /// Like [`Vcpus::start`], but every thread parks before its first
    /// KVM_RUN. Returns without waiting: the threads take their vCPUs and
    /// park on their own while the caller goes on; [`Vcpus::await_parked`]
    /// must follow before [`Vcpus::resume`] lets the guest run.
    pub fn start_parking(
        vcpus: Vec<Vcpu>,
        exit: ExitSignal,
        errors: mpsc::Sender<VcpuError>,
        early: Vec<WaitingThread>,
    ) -> std::io::Result<Self> {
        Self::spawn_all(vcpus, exit, errors, true, early)
    }

    /// Waits until every thread of [`Vcpus::start_parking`] parked. A
    /// thread that does not is an error, and every thread is stopped.
    pub fn await_parked(&mut self) -> std::io::Result<()> {
        if self.paused {
            return Ok(());
        }
        let mut waiting: Vec<u32> = self.threads.iter().map(|t| t.index).collect();
        let start = Instant::now();
        while !waiting.is_empty() {
            if let Ok(i) = self.acks.recv_timeout(Duration::from_millis(10)) {
                waiting.retain(|w| *w != i);
            } else if start.elapsed() > PAUSE_TIMEOUT
                || self.threads.iter().any(|t| t.handle.is_finished())
            {
                self.stop_all();
                return Err(std::io::Error::other(
                    "a vCPU thread did not reach its pause",
                ));
            }
        }
        self.paused = true;
        Ok(())
    }

    fn spawn_all(
        vcpus: Vec<Vcpu>,
        exit: ExitSignal,
        errors: mpsc::Sender<VcpuError>,
        paused: bool,
        mut early: Vec<WaitingThread>,
    ) -> std::io::Result<Self> {
        let (acked, acks) = mpsc::channel();
        let ctl = RunControl {
            stop: Arc::new(AtomicBool::new(false)),
            pause: Arc::new(AtomicBool::new(paused)),
            exit,
            errors,
            paused: acked,
        };
        let mut me = Self {
            ctl,
            threads: Vec::new(),
            acks,
            paused: false,
        };
        for v in vcpus {
            // A thread started early for this vCPU takes it; otherwise
            // one starts now.
            let thread = match early.iter().position(|t| t.index == v.index) {
                Some(i) => Ok(early.swap_remove(i)),
                None => WaitingThread::start(v.index),
            };
            match thread.and_then(|t| t.take(v, me.ctl.clone())) {
                Ok(t) => me.threads.push(t),
                Err(e) => {
                    me.stop();
                    return Err(e);
                }
            }
        }
        Ok(me)
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops every vCPU at a clean point: out of KVM_RUN, with any pending
    /// port or MMIO access completed, so the saved state is exact.
    pub fn pause(&mut self) -> Result<(), PauseError> {
        if self.paused {
            return Ok(());
        }
        while self.acks.try_recv().is_ok() {}
        self.ctl.pause.store(true, Ordering::Release);
        let mut waiting: Vec<&VcpuThread> = self.threads.iter().collect();
        let start = Instant::now();
        while !waiting.is_empty() {
            if let Some(t) = waiting.iter().find(|t| t.handle.is_finished()) {
                let index = t.index;
                self.resume_threads();
                return Err(PauseError::Ended(index));
            }
            if start.elapsed() > PAUSE_TIMEOUT {
                let index = waiting[0].index;
                self.resume_threads();
                return Err(PauseError::Timeout(index, PAUSE_TIMEOUT));
            }
            // A kick can land just before a thread enters KVM_RUN: repeat.
            for t in &waiting {
                kick(t);
            }
            while let Ok(i) = self.acks.recv_timeout(Duration::from_millis(2)) {
                waiting.retain(|t| t.index != i);
                if waiting.is_empty() {
                    break;
                }
            }
        }
        self.paused = true;
        Ok(())
    }

    /// Saves every vCPU's state (the vCPUs must be paused). The threads
    /// save in parallel.
    pub fn save(&self) -> Result<Vec<state::VcpuState>, state::StateError> {
        let gone = |i: u32| state::StateError::Malformed(format!("vCPU {i} is gone"));
        let mut replies = Vec::new();
        for t in &self.threads {
            let (tx, rx) = mpsc::channel();
            t.commands
                .send(VcpuCommand::Save(tx))
                .map_err(|_| gone(t.index))?;
            replies.push((t.index, rx));
        }
        let mut out = Vec::new();
        for (i, rx) in replies {
            out.push(rx.recv().map_err(|_| gone(i))??);
        }
        Ok(out)
    }

    fn resume_threads(&self) {
        self.ctl.pause.store(false, Ordering::Release);
        for t in &self.threads {
            let _ = t.commands.send(VcpuCommand::Resume);
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) {
        if self.paused {
            self.resume_threads();
            self.paused = false;
        }
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(mut self) {
        self.stop_all();
    }

    /// Stops and joins every vCPU thread, through a shared handle (an
    /// outgoing migration may hold one); afterwards nothing runs.
    pub fn stop_all(&mut self) {
        self.ctl.stop.store(true, Ordering::Release);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.commands.send(VcpuCommand::Stop);
            while !t.handle.is_finished() {
                kick(&t);
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = t.handle.join();
        }
    }
}

/// Tells a kvmclock guest that it was stopped (`KVM_KVMCLOCK_CTRL`), so
/// its soft-lockup and RCU-stall watchdogs do not count the pause. Fails
/// harmlessly when the guest has no kvmclock.
pub fn tell_guest_it_was_paused(fd: &VcpuFd) {
    let _ = fd.kvmclock_ctrl();
}

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Failing here only means kicks fall back to the stop flag checked
        // on the next exit; report it rather than abort.
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            eprintln!("abide: warning: cannot install the vCPU kick handler: {e}");
        }
    });
}

/// A vCPU's thread, started (and confined) before the vCPU is handed to
/// it. Every vCPU thread begins so; an incoming migration starts them
/// while memory arrives, to keep their start out of the guest's downtime.
/// Dropped without a vCPU, the thread ends.
pub struct WaitingThread {
    index: u32,
    handle: JoinHandle<()>,
    commands: mpsc::Sender<VcpuCommand>,
    hand: mpsc::Sender<(Vcpu, RunControl)>,
}

impl WaitingThread {
    /// Starts the thread of vCPU `index`.
    pub fn start(index: u32) -> std::io::Result<Self> {
        install_kick_handler();
        let (commands, rx) = mpsc::channel();
        let (hand, handed) = mpsc::channel::<(Vcpu, RunControl)>();
        let handle = abide_devices::thread(format!("vcpu{index}")).spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
            let Ok((mut me, ctl)) = handed.recv() else {
                return;
            };
            if let Err(e) = me.run_loop(&ctl, &rx) {
                let _ = ctl.errors.send(e);
                // Wake the VMM; the error is on the channel.
                let _ = ctl.exit.eventfd().write(1);
            }
        })?;
        Ok(Self {
            index,
            handle,
            commands,
            hand,
        })
    }

    /// The vCPU index this thread is for.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Hands `vcpu` (of this thread's index) to the thread, which runs it
    /// under `ctl`.
    fn take(self, vcpu: Vcpu, ctl: RunControl) -> std::io::Result<VcpuThread> {
        debug_assert_eq!(vcpu.index, self.index);
        self.hand.send((vcpu, ctl)).map_err(|_| {
            std::io::Error::other(format!(
                "the thread of vCPU {} ended before its vCPU was ready",
                self.index
            ))
        })?;
        Ok(VcpuThread {
            index: self.index,
            handle: self.handle,
            commands: self.commands,
        })
    }
}

impl std::fmt::Debug for WaitingThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitingThread")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Parks the thread until told to resume. Returns false to leave.
    fn park(&mut self, ctl: &RunControl, commands: &mpsc::Receiver<VcpuCommand>) -> bool {
        // Complete any port or MMIO access KVM is waiting on: with
        // immediate_exit set, KVM_RUN finishes it and returns at once.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        let _ = ctl.paused.send(self.index);
        loop {
            match commands.recv() {
                Ok(VcpuCommand::Save(reply)) => {
                    let _ = reply.send(state::VcpuState::save(&self.fd, &self.msrs));
                }
                Ok(VcpuCommand::Resume) => {
                    if !ctl.pausing() {
                        tell_guest_it_was_paused(&self.fd);
                        return true;
                    }
                    // A new pause began before this thread left the last
                    // one (a resume and a pause in quick succession): it is
                    // still parked, so it acknowledges the new pause, which
                    // would otherwise wait for it in vain.
                    let _ = ctl.paused.send(self.index);
                }
                Ok(VcpuCommand::Stop) | Err(_) => return false,
            }
        }
    }

    fn run_loop(
        &mut self,
        ctl: &RunControl,
        commands: &mpsc::Receiver<VcpuCommand>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        while !ctl.stopping() {
            if ctl.pausing() {
                if self.park(ctl, commands) {
                    continue;
                }
                return Ok(());
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(source) => return Err(VcpuError::Run { index, source }),
            };
            self.exits.count(&exit);
            match exit {
                VcpuExit::IoIn(port, data) => {
                    self.pio.read(u64::from(port), data);
                }
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                    // A write that ended the VM (ACPI S5, a reset): this
                    // vCPU runs no further guest code, so the guest cannot
                    // observe that it is still alive while the VMM stops.
                    if ctl.exit.reason().is_some() {
                        return Ok(());
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                    if ctl.exit.reason().is_some() {
                        return Ok(());
                    }
                }
                // With the in-kernel LAPIC, HLT only exits when KVM wants us to
                // look at something; just re-enter.
                VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
                VcpuExit::Shutdown => {
                    return Err(VcpuError::Shutdown {
                        index,
                        regs: dump_registers(&self.fd),
                    })
                }
                VcpuExit::InternalError => {
                    let suberror = {
                        let run = self.fd.get_kvm_run();
                        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                        // `internal` member of the union is the one KVM filled.
                        unsafe { run.__bindgen_anon_1.internal.suberror }
                    };
                    return Err(VcpuError::Internal {
                        index,
                        suberror,
                        regs: dump_registers(&self.fd),
                    });
                }
                VcpuExit::FailEntry(reason, _cpu) => {
                    return Err(VcpuError::FailEntry {
                        index,
                        reason,
                        regs: dump_registers(&self.fd),
                    })
                }
                VcpuExit::SystemEvent(kind, _) => {
                    let reason = match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => abide_devices::ExitReason::Reset,
                        _ => abide_devices::ExitReason::Poweroff,
                    };
                    ctl.exit.request(reason);
                    return Ok(());
                }
                other => {
                    let what = format!("{other:?}");
                    return Err(VcpuError::Unexpected {
                        index,
                        what,
                        regs: dump_registers(&self.fd),
                    });
                }
            }
        }
        Ok(())
    }
}
