//! Counts of vCPU exits by reason, one set per vCPU, read by the metrics
//! endpoint while the vCPU runs.

use std::sync::atomic::{AtomicU64, Ordering};

use kvm_ioctls::VcpuExit;

/// The reasons counted, in the order [`ExitCounters::counts`] reports them.
pub const REASONS: [&str; 12] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "hlt",
    "intr",
    "irq_window_open",
    "shutdown",
    "system_event",
    "internal_error",
    "fail_entry",
    "other",
];

/// Exits of one vCPU by reason.
#[derive(Debug, Default)]
pub struct ExitCounters {
    counts: [AtomicU64; REASONS.len()],
}

fn slot(exit: &VcpuExit<'_>) -> usize {
    match exit {
        VcpuExit::IoIn(..) => 0,
        VcpuExit::IoOut(..) => 1,
        VcpuExit::MmioRead(..) => 2,
        VcpuExit::MmioWrite(..) => 3,
        VcpuExit::Hlt => 4,
        VcpuExit::Intr => 5,
        VcpuExit::IrqWindowOpen => 6,
        VcpuExit::Shutdown => 7,
        VcpuExit::SystemEvent(..) => 8,
        VcpuExit::InternalError => 9,
        VcpuExit::FailEntry(..) => 10,
        _ => 11,
    }
}

impl ExitCounters {
    /// Counts one exit.
    pub fn count(&self, exit: &VcpuExit<'_>) {
        self.counts[slot(exit)].fetch_add(1, Ordering::Relaxed);
    }

    /// (reason, count) for every reason in [`REASONS`].
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        REASONS
            .iter()
            .zip(&self.counts)
            .map(|(r, c)| (*r, c.load(Ordering::Relaxed)))
            .collect()
    }

    /// Exits of all reasons.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason() {
        let c = ExitCounters::default();
        c.count(&VcpuExit::Hlt);
        c.count(&VcpuExit::Hlt);
        c.count(&VcpuExit::Shutdown);
        c.count(&VcpuExit::Debug(Default::default()));
        let counts = c.counts();
        assert_eq!(counts.len(), REASONS.len());
        let get = |r: &str| counts.iter().find(|(n, _)| *n == r).map(|(_, v)| *v);
        assert_eq!(get("hlt"), Some(2));
        assert_eq!(get("shutdown"), Some(1));
        assert_eq!(get("other"), Some(1));
        assert_eq!(get("io_in"), Some(0));
        assert_eq!(c.total(), 4);
    }
}
