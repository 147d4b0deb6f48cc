//! Level-triggered INTx for PCI functions.
//!
//! Each INTx line is a resampling irqfd: KVM holds the IOAPIC pin asserted
//! from the device's trigger until the guest's EOI, then signals the line's
//! resample eventfd. A thread here waits on those and re-asserts the line
//! while the device still has an interrupt pending, so no interrupt raised
//! during a handler is lost.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Called after EOI: re-asserts the line if the device is still pending.
pub type ResampleHandler = Box<dyn Fn() + Send>;

struct Entry {
    fd: EventFd,
    handler: ResampleHandler,
}

/// The resample thread of one VM.
pub struct Resampler {
    epoll: Arc<Epoll>,
    entries: Arc<Mutex<Vec<Entry>>>,
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Resampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resampler").finish_non_exhaustive()
    }
}

const STOP_TOKEN: u64 = u64::MAX;

impl Resampler {
    /// Starts the thread.
    pub fn new() -> std::io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        let entries: Arc<Mutex<Vec<Entry>>> = Arc::new(Mutex::new(Vec::new()));
        let (ep, en) = (epoll.clone(), entries.clone());
        let thread = abide_devices::thread("intx-resample").spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Intx);
            let mut events = vec![EpollEvent::default(); 16];
            loop {
                let n = match ep.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                for ev in &events[..n] {
                    if ev.data() == STOP_TOKEN {
                        return;
                    }
                    let list = en.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(e) = list.get(ev.data() as usize) {
                        let _ = e.fd.read();
                        (e.handler)();
                    }
                }
            }
        })?;
        Ok(Self {
            epoll,
            entries,
            stop,
            thread: Some(thread),
        })
    }

    /// Watches `fd` (a KVM resample eventfd) and runs `handler` after each EOI.
    pub fn add(&self, fd: EventFd, handler: ResampleHandler) -> std::io::Result<()> {
        let mut list = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let token = list.len() as u64;
        self.epoll.ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
        list.push(Entry { fd, handler });
        Ok(())
    }
}

impl Drop for Resampler {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn handler_runs_on_resample_and_thread_stops() {
        let r = Resampler::new().expect("resampler");
        let hits = Arc::new(AtomicUsize::new(0));
        let fd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let kick = fd.try_clone().expect("clone");
        let h = hits.clone();
        r.add(
            fd,
            Box::new(move || {
                h.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .expect("add");
        kick.write(1).expect("signal");
        let start = Instant::now();
        while hits.load(Ordering::SeqCst) == 0 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        drop(r); // joins the thread
    }
}
