//! vCPUs: one thread each, running KVM_RUN and dispatching exits to the buses.

pub mod cpuid;
pub mod regs;

use std::fmt::Write as _;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

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
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

/// Shared run control for all vCPUs.
#[derive(Clone, Debug)]
pub struct RunControl {
    stop: Arc<AtomicBool>,
    exit: ExitSignal,
    errors: mpsc::Sender<VcpuError>,
}

impl RunControl {
    /// A control reporting failures on `errors` and waking the VMM through `exit`.
    pub fn new(exit: ExitSignal, errors: mpsc::Sender<VcpuError>) -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            exit,
            errors,
        }
    }

    /// Whether vCPUs were told to stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
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

impl Vcpu {
    /// Starts the vCPU on its own thread.
    pub fn spawn(self, ctl: RunControl) -> std::io::Result<VcpuThread> {
        install_kick_handler();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || {
                let mut me = self;
                if let Err(e) = me.run_loop(&ctl) {
                    let _ = ctl.errors.send(e);
                    // Wake the VMM; the error is on the channel.
                    let _ = ctl.exit.eventfd().write(1);
                }
            })?;
        Ok(VcpuThread { handle })
    }

    fn run_loop(&mut self, ctl: &RunControl) -> Result<(), VcpuError> {
        let index = self.index;
        while !ctl.stopping() {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(source) => return Err(VcpuError::Run { index, source }),
            };
            match exit {
                VcpuExit::IoIn(port, data) => {
                    self.pio.read(u64::from(port), data);
                }
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
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

/// Stops all vCPU threads: sets the stop flag and kicks each thread out of
/// KVM_RUN until it has exited.
pub fn stop_all(ctl: &RunControl, threads: Vec<VcpuThread>) {
    ctl.stop.store(true, Ordering::Release);
    for t in threads {
        // A kick can land just before the thread enters KVM_RUN; repeat until
        // the thread is gone.
        while !t.handle.is_finished() {
            // SAFETY: the handle is a live, joinable thread (not yet joined),
            // and the kick signal has a no-op handler installed.
            unsafe {
                libc::pthread_kill(t.handle.as_pthread_t(), kick_signal());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = t.handle.join();
    }
}
