//! Plumbing shared by the virtio device workers.
//!
//! Each active device runs on its own thread ([`Worker`]): an event-manager
//! loop waiting on the device's event sources (queue kicks, backend fds) and
//! on a stop eventfd. Stopping writes the stop eventfd and joins the thread;
//! because the loop only looks at the stop event between two handler calls,
//! no request is ever left half-done.
//!
//! The rest of this module turns guest descriptor chains into checked
//! [`Segment`] lists ([`collect_chain`]), moves bytes between guest memory
//! and host buffers ([`SegCursor`]) and drives a queue
//! ([`WorkerQueue::drain`]). The guest controls every descriptor, so all of
//! it is defensive: a chain that does not end, a head index past the queue,
//! a ring that cannot be read or written is reported as [`Unusable`] and the
//! queue is given up on (DEVICE_NEEDS_RESET) rather than guessed at.

use std::io;
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, ActiveQueue, QueueProgress, VirtioInterrupt};
use crate::GuestMem;

/// Device work running on a [`Worker`] thread.
pub(crate) trait Handler: Send + 'static {
    /// Registers the handler's event sources.
    fn init(&mut self, ops: &mut EventOps) -> Result<(), event_manager::Error>;
    /// Handles one ready event source of the handler's.
    fn process(&mut self, events: Events, ops: &mut EventOps);
    /// The event loop itself failed; the worker is about to exit.
    fn failed(&mut self) {}
    /// The handler's queues (for their progress when paused, and to look
    /// at them again when resumed).
    fn queues(&self) -> Vec<&WorkerQueue>;
}

/// Wraps a handler with the stop eventfd.
struct Runner<H> {
    handler: H,
    stop: EventFd,
    stopped: bool,
    init_error: Option<event_manager::Error>,
}

impl<H: Handler> MutEventSubscriber for Runner<H> {
    fn init(&mut self, ops: &mut EventOps) {
        let r = ops
            .add(Events::new(&self.stop, EventSet::IN))
            .and_then(|()| self.handler.init(ops));
        if let Err(e) = r {
            self.init_error = Some(e);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.stopped {
            return;
        }
        if events.fd() == self.stop.as_raw_fd() {
            let _ = self.stop.read();
            self.stopped = true;
            return;
        }
        self.handler.process(events, ops);
    }
}

fn em_error(e: event_manager::Error) -> io::Error {
    io::Error::other(e)
}

/// Called first on every worker thread with the device model's name
/// (`virtio-blk`, ...). The VMM sets it once, to install the thread's
/// seccomp filter; the device models know nothing of seccomp.
static THREAD_START: std::sync::OnceLock<fn(&'static str)> = std::sync::OnceLock::new();

/// Sets the function every device worker thread calls when it starts,
/// before it handles any event. Only the first call takes effect.
pub fn set_worker_start_hook(hook: fn(&'static str)) {
    let _ = THREAD_START.set(hook);
}

fn thread_started(kind: &'static str) {
    if let Some(hook) = THREAD_START.get() {
        hook(kind);
    }
}

/// A device worker thread. Dropping it stops and joins the thread.
pub(crate) struct Worker<H> {
    stop: EventFd,
    thread: Option<JoinHandle<Option<H>>>,
}

impl<H> std::fmt::Debug for Worker<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl<H: Handler> Worker<H> {
    /// Registers `handler`'s event sources and starts its thread.
    pub(crate) fn spawn(name: &'static str, handler: H) -> io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let mut em = EventManager::<Runner<H>>::new().map_err(em_error)?;
        let id = em.add_subscriber(Runner {
            handler,
            stop: stop.try_clone()?,
            stopped: false,
            init_error: None,
        });
        let init_error = em.subscriber_mut(id).map_err(em_error)?.init_error.take();
        if let Some(e) = init_error {
            return Err(em_error(e));
        }
        let kind = name;
        let thread = crate::thread(name).spawn(move || {
            thread_started(kind);
            run(em, id)
        })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// The lifecycle half of [`super::VirtioDevice`] (activate, activate_paused,
/// pause, resume, reset) for a model whose work runs on a [`WorkerSlot`]
/// field `worker`, with handlers built by its `worker_for(Activation)`.
/// Written once here so the models cannot drift apart.
macro_rules! worker_lifecycle {
    () => {
        fn activate(
            &mut self,
            a: $crate::virtio::Activation,
        ) -> Result<(), $crate::virtio::ActivateError> {
            self.reset();
            let worker = self.worker_for(a);
            self.worker.start(worker)
        }

        fn activate_paused(
            &mut self,
            a: $crate::virtio::Activation,
        ) -> Result<(), $crate::virtio::ActivateError> {
            self.reset();
            let worker = self.worker_for(a);
            self.worker.start_paused(worker)
        }

        fn pause(&mut self) -> Vec<$crate::virtio::QueueProgress> {
            self.worker.pause()
        }

        fn resume(&mut self) -> Result<(), $crate::virtio::ActivateError> {
            self.worker.resume()
        }

        fn reset(&mut self) {
            self.worker.stop();
        }
    };
}
pub(crate) use worker_lifecycle;

/// A device model's handler: running on its [`Worker`] thread, parked
/// (the device is paused), or absent (the device is not active). This is
/// what each model's `activate`, `pause`, `resume` and `reset` go through.
pub(crate) struct WorkerSlot<H> {
    name: &'static str,
    running: Option<Worker<H>>,
    parked: Option<H>,
}

impl<H> std::fmt::Debug for WorkerSlot<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSlot")
            .field("name", &self.name)
            .field("running", &self.running)
            .field("parked", &self.parked.is_some())
            .finish()
    }
}

impl<H: Handler> WorkerSlot<H> {
    /// An empty slot whose threads are called `name`.
    pub(crate) fn new(name: &'static str) -> Self {
        Self {
            name,
            running: None,
            parked: None,
        }
    }

    /// Starts `handler` on a new thread, dropping whatever was there.
    pub(crate) fn start(&mut self, handler: Result<H, ActivateError>) -> Result<(), ActivateError> {
        self.stop();
        let handler = handler?;
        self.running = Some(Worker::spawn(self.name, handler).map_err(ActivateError::Worker)?);
        Ok(())
    }

    /// Keeps `handler` parked, as if started and paused at once: no thread
    /// runs, nothing is processed, until [`WorkerSlot::resume`].
    pub(crate) fn start_paused(
        &mut self,
        handler: Result<H, ActivateError>,
    ) -> Result<(), ActivateError> {
        self.stop();
        self.parked = Some(handler?);
        Ok(())
    }

    /// Stops and joins the thread and drops the handler, running or
    /// parked.
    pub(crate) fn stop(&mut self) {
        if let Some(w) = self.running.take() {
            w.stop();
        }
        self.parked = None;
    }

    /// Stops the thread (between two handler calls, so no request is
    /// half-done), parks the handler and returns its queues' progress.
    /// Nothing when empty; the same progress again when already paused.
    /// A thread that panicked took its handler with it: then there is no
    /// progress to report either.
    pub(crate) fn pause(&mut self) -> Vec<QueueProgress> {
        if let Some(w) = self.running.take() {
            self.parked = w.stop();
        }
        self.parked
            .as_ref()
            .map(|h| {
                h.queues()
                    .iter()
                    .map(|q| QueueProgress {
                        index: q.index,
                        next_avail: q.queue.next_avail(),
                        next_used: q.queue.next_used(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Restarts a parked handler on a new thread, kicking each of its
    /// queues so that buffers made available meanwhile are taken. Nothing
    /// to do when nothing is parked.
    pub(crate) fn resume(&mut self) -> Result<(), ActivateError> {
        let Some(handler) = self.parked.take() else {
            return Ok(());
        };
        for q in handler.queues() {
            // Only fails if the counter would overflow: it is non-zero
            // then, which is all a kick needs.
            let _ = q.kick.write(1);
        }
        self.running = Some(Worker::spawn(self.name, handler).map_err(ActivateError::Worker)?);
        Ok(())
    }

    /// Whether a worker thread is running (for tests).
    #[cfg(test)]
    pub(crate) fn running(&self) -> bool {
        self.running.as_ref().is_some_and(|w| !w.finished())
    }

    /// Whether a handler is parked (for tests).
    #[cfg(test)]
    pub(crate) fn paused(&self) -> bool {
        self.parked.is_some()
    }

    /// Whether the slot holds no handler at all (for tests).
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.running.is_none() && self.parked.is_none()
    }
}

impl<H> Worker<H> {
    /// Stops the thread, waits for it, and returns the handler (`None` if the
    /// thread panicked).
    pub(crate) fn stop(mut self) -> Option<H> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Option<H> {
        let thread = self.thread.take()?;
        // Only fails if the counter would overflow, and then it is non-zero
        // anyway: the thread wakes up either way.
        let _ = self.stop.write(1);
        thread.join().ok().flatten()
    }

    /// Whether the thread has exited (for tests).
    #[cfg(test)]
    pub(crate) fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl<H> Drop for Worker<H> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run<H: Handler>(mut em: EventManager<Runner<H>>, id: SubscriberId) -> Option<H> {
    loop {
        let result = em.run();
        let runner = em.subscriber_mut(id).ok()?;
        if runner.stopped {
            break;
        }
        if result.is_err() {
            runner.handler.failed();
            break;
        }
    }
    em.remove_subscriber(id).ok().map(|r| r.handler)
}

/// A request that cannot be completed, not even with an error status: the
/// device gives up on the queue and asks the driver for a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Unusable;

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl Segment {
    /// Whether the whole segment lies in guest RAM.
    pub(crate) fn in_memory(&self, mem: &GuestMem) -> bool {
        GuestMemoryBackend::check_range(mem, self.addr, self.len as usize)
    }

    /// Whether the device can use the segment in the direction it needs:
    /// device-writable exactly when `device_writes`, not empty, and wholly
    /// in guest RAM.
    pub(crate) fn usable(&self, mem: &GuestMem, device_writes: bool) -> bool {
        self.writable == device_writes && self.len != 0 && self.in_memory(mem)
    }
}

/// Reads a chain's descriptors. Fails (the chain cannot even be returned
/// with an error) when the chain is empty or does not end: a head index
/// past the queue, a loop, more than `max` descriptors, a `next` index past
/// the table, an unreadable descriptor or a bad indirect table. Buffer
/// addresses are not checked here.
pub(crate) fn collect_chain(
    chain: DescriptorChain<&GuestMem>,
    max: usize,
) -> Result<Vec<Segment>, Unusable> {
    let mut segs = Vec::new();
    let mut ended = false;
    // The iterator stops by itself after at most a table's worth of
    // descriptors; it just does not say whether the chain really ended.
    for d in chain {
        if segs.len() == max {
            return Err(Unusable);
        }
        segs.push(Segment {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        });
        ended = !d.has_next();
    }
    if ended {
        Ok(segs)
    } else {
        Err(Unusable)
    }
}

/// Total length of `segs`.
pub(crate) fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// A position in a list of segments, copying to or from guest memory.
#[derive(Debug)]
pub(crate) struct SegCursor<'a> {
    segs: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> SegCursor<'a> {
    pub(crate) fn new(segs: &'a [Segment]) -> Self {
        Self {
            segs,
            index: 0,
            offset: 0,
        }
    }

    /// The next piece of at most `max` bytes, advancing past it.
    fn next_piece(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        loop {
            let s = self.segs.get(self.index)?;
            let left = s.len - self.offset;
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = (left as usize).min(max);
            let addr = s.addr.checked_add(u64::from(self.offset))?;
            self.offset += n as u32;
            return Some((addr, n));
        }
    }

    /// Skips `n` bytes; returns how many were skipped.
    pub(crate) fn skip(&mut self, mut n: usize) -> usize {
        let mut done = 0;
        while n > 0 {
            let Some((_, k)) = self.next_piece(n) else {
                break;
            };
            n -= k;
            done += k;
        }
        done
    }

    /// Copies `buf` into guest memory at the cursor; returns the bytes
    /// copied (less than `buf.len()` when the segments run out).
    pub(crate) fn write_from(
        &mut self,
        mem: &GuestMem,
        buf: &[u8],
    ) -> Result<usize, GuestMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let Some((addr, n)) = self.next_piece(buf.len() - done) else {
                break;
            };
            mem.write_slice(&buf[done..done + n], addr)?;
            done += n;
        }
        Ok(done)
    }

    /// Fills `buf` from guest memory at the cursor; returns the bytes
    /// copied (less than `buf.len()` when the segments run out).
    pub(crate) fn read_into(
        &mut self,
        mem: &GuestMem,
        buf: &mut [u8],
    ) -> Result<usize, GuestMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let Some((addr, n)) = self.next_piece(buf.len() - done) else {
                break;
            };
            mem.read_slice(&mut buf[done..done + n], addr)?;
            done += n;
        }
        Ok(done)
    }
}

/// A queue owned by a device worker.
pub(crate) struct WorkerQueue {
    /// Queue index in the device.
    pub index: u16,
    /// The queue.
    pub queue: Queue,
    /// The driver's notifications.
    pub kick: EventFd,
    /// The device gave up on this queue (DEVICE_NEEDS_RESET was raised).
    pub broken: bool,
    /// Used entries added since the last interrupt.
    pending_used: bool,
}

impl std::fmt::Debug for WorkerQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerQueue")
            .field("index", &self.index)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl WorkerQueue {
    /// Takes over an activated queue.
    pub(crate) fn new(q: ActiveQueue, event_idx: bool) -> Self {
        let mut queue = q.queue;
        queue.set_event_idx(event_idx);
        Self {
            index: q.index,
            queue,
            kick: q.kick,
            broken: false,
            pending_used: false,
        }
    }

    /// The most descriptors a chain may have.
    pub(crate) fn max_chain(&self) -> usize {
        usize::from(self.queue.size())
    }

    /// Whether the driver has made buffers available that were not taken.
    pub(crate) fn has_available(&self, mem: &GuestMem) -> Result<bool, Unusable> {
        let avail = self
            .queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_err(|_| Unusable)?;
        Ok(avail.0 != self.queue.next_avail())
    }

    /// Takes the next available chain. `Ok(None)` when there is none;
    /// `Err` when the available ring cannot be read or its index is
    /// impossible (more entries than the queue holds).
    pub(crate) fn pop<'m>(
        &mut self,
        mem: &'m GuestMem,
    ) -> Result<Option<DescriptorChain<&'m GuestMem>>, Unusable> {
        if self.broken {
            return Err(Unusable);
        }
        if !self.has_available(mem)? {
            return Ok(None);
        }
        let mut iter = self.queue.iter(mem).map_err(|_| Unusable)?;
        // The driver said there is an entry but it cannot be read.
        iter.next().map(Some).ok_or(Unusable)
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub(crate) fn add_used(&mut self, mem: &GuestMem, head: u16, len: u32) -> Result<(), Unusable> {
        self.queue.add_used(mem, head, len).map_err(|_| Unusable)?;
        self.pending_used = true;
        Ok(())
    }

    /// Gives up on the queue and asks the driver for a reset.
    pub(crate) fn fail(&mut self, irq: &dyn VirtioInterrupt) {
        if !self.broken {
            self.broken = true;
            irq.set_needs_reset();
        }
    }

    /// Interrupts the driver if used entries were added (and, with
    /// EVENT_IDX, the driver asked for it).
    pub(crate) fn notify(&mut self, mem: &GuestMem, irq: &dyn VirtioInterrupt) {
        if !self.pending_used {
            return;
        }
        self.pending_used = false;
        if self.queue.needs_notification(mem).unwrap_or(true) {
            irq.signal_used_queue(self.index);
        }
    }

    /// Re-arms driver notifications once the queue looks empty. Returns
    /// whether more chains arrived meanwhile.
    pub(crate) fn rearm(&mut self, mem: &GuestMem) -> Result<bool, Unusable> {
        if self.queue.event_idx_enabled() {
            self.queue.enable_notification(mem).map_err(|_| Unusable)
        } else {
            Ok(false)
        }
    }

    /// Completes up to `budget` chains with `handle`, which returns the
    /// number of bytes it wrote into the chain, then interrupts the driver.
    /// If the budget runs out the queue kicks itself so the worker comes
    /// back after looking at its other events (a stop request in
    /// particular). Any [`Unusable`] gives up on the queue.
    pub(crate) fn drain<F>(
        &mut self,
        mem: &GuestMem,
        irq: &dyn VirtioInterrupt,
        budget: usize,
        mut handle: F,
    ) where
        F: FnMut(DescriptorChain<&GuestMem>) -> Result<u32, Unusable>,
    {
        let mut done = 0;
        let (mut completed, mut bytes) = (0u64, 0u64);
        let result = loop {
            if self.broken {
                break Ok(());
            }
            if done == budget {
                let _ = self.kick.write(1);
                break Ok(());
            }
            let chain = match self.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => match self.rearm(mem) {
                    Ok(true) => continue,
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                },
                Err(e) => break Err(e),
            };
            done += 1;
            let head = chain.head_index();
            match handle(chain).and_then(|len| self.add_used(mem, head, len).map(|()| len)) {
                Ok(len) => {
                    completed += 1;
                    bytes += u64::from(len);
                }
                Err(e) => break Err(e),
            }
        };
        if completed > 0 {
            irq.metrics().completed(completed, bytes);
        }
        self.notify(mem, irq);
        if result.is_err() {
            self.fail(irq);
        }
    }
}

/// Splits a device's activation queues into worker queues, checking each
/// index against `count`.
pub(crate) fn take_queues(
    queues: Vec<ActiveQueue>,
    count: usize,
    event_idx: bool,
) -> Result<Vec<WorkerQueue>, super::ActivateError> {
    let mut out: Vec<WorkerQueue> = Vec::with_capacity(queues.len());
    for q in queues {
        if usize::from(q.index) >= count || out.iter().any(|w| w.index == q.index) {
            return Err(super::ActivateError::BadQueues(format!(
                "unexpected queue {}",
                q.index
            )));
        }
        out.push(WorkerQueue::new(q, event_idx));
    }
    Ok(out)
}

/// An interrupt handle for tests: counts signals and records NEEDS_RESET.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct TestInterrupt {
    pub used: std::sync::Mutex<Vec<u16>>,
    pub needs_reset: std::sync::atomic::AtomicBool,
    pub metrics: std::sync::Arc<super::metrics::DeviceMetrics>,
}

#[cfg(test)]
impl TestInterrupt {
    pub(crate) fn needs_reset(&self) -> bool {
        self.needs_reset.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn signals(&self, index: u16) -> usize {
        self.used
            .lock()
            .map(|v| v.iter().filter(|&&i| i == index).count())
            .unwrap_or(0)
    }
}

#[cfg(test)]
impl VirtioInterrupt for TestInterrupt {
    fn signal_used_queue(&self, index: u16) {
        if let Ok(mut v) = self.used.lock() {
            v.push(index);
        }
    }

    fn signal_config_change(&self) {}

    fn set_needs_reset(&self) {
        self.needs_reset
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.metrics.needs_reset();
    }

    fn metrics(&self) -> std::sync::Arc<super::metrics::DeviceMetrics> {
        self.metrics.clone()
    }
}

/// Wraps a test interrupt for an [`super::Activation`].
#[cfg(test)]
pub(crate) fn test_irq() -> (
    std::sync::Arc<TestInterrupt>,
    std::sync::Arc<dyn VirtioInterrupt>,
) {
    let t = std::sync::Arc::new(TestInterrupt::default());
    let d: std::sync::Arc<dyn VirtioInterrupt> = t.clone();
    (t, d)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Driver-side helpers for device tests: a split queue in guest memory
    //! built with virtio-queue's mock, and descriptor writers.

    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use crate::GuestMem;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use crate::virtio::ActiveQueue;

    pub(crate) const F_NEXT: u16 = 1;
    pub(crate) const F_WRITE: u16 = 2;

    /// Guest RAM size for tests.
    pub(crate) const RAM: u64 = 0x40_0000;

    pub(crate) fn memory() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest memory")
    }

    /// A driver's view of one queue at `base`.
    ///
    /// The descriptor table and available ring come from virtio-queue's
    /// mock; the used ring is placed here, because the mock (0.18) puts it
    /// `size` bytes rather than `2 * size` bytes after the available ring
    /// start, overlapping the end of the available ring.
    pub(crate) struct Driver<'m> {
        pub mock: MockSplitQueue<'m, GuestMem>,
        pub mem: &'m GuestMem,
        pub size: u16,
        used_addr: GuestAddress,
        next_desc: u16,
    }

    impl<'m> Driver<'m> {
        pub(crate) fn new(mem: &'m GuestMem, base: u64, size: u16) -> Self {
            let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
            let avail_end = mock.avail_addr().raw_value() + 6 + 2 * u64::from(size);
            let used_addr = GuestAddress((avail_end + 3) & !3);
            mem.write_slice(&vec![0u8; 6 + 8 * usize::from(size)], used_addr)
                .expect("used ring");
            Self {
                mock,
                mem,
                size,
                used_addr,
                next_desc: 0,
            }
        }

        /// The device-side queue.
        pub(crate) fn queue(&self) -> Queue {
            let mut q = self.mock.create_queue::<Queue>().expect("queue");
            let a = self.used_addr.raw_value();
            q.set_used_ring_address(Some(a as u32), Some((a >> 32) as u32));
            q
        }

        /// The used ring's address.
        pub(crate) fn used_addr(&self) -> GuestAddress {
            self.used_addr
        }

        /// An activation queue with a fresh kick eventfd.
        pub(crate) fn active(&self, index: u16) -> ActiveQueue {
            ActiveQueue {
                index,
                queue: self.queue(),
                kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            }
        }

        /// Writes descriptor `i` as given (no `next` fix-ups).
        pub(crate) fn raw_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            self.mock
                .desc_table()
                .store(
                    i,
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
                )
                .expect("store descriptor");
        }

        /// Writes a chain of (addr, len, writable) buffers into free table
        /// slots, linking them with NEXT; returns the head index.
        pub(crate) fn chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let n = bufs.len() as u16;
            if self.next_desc + n > self.size {
                self.next_desc = 0;
            }
            let head = self.next_desc;
            for (k, &(addr, len, w)) in bufs.iter().enumerate() {
                let i = head + k as u16;
                let last = k + 1 == bufs.len();
                let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                self.raw_desc(i, addr, len, flags, if last { 0 } else { i + 1 });
            }
            self.next_desc += n;
            head
        }

        /// Publishes `head` in the available ring.
        pub(crate) fn submit(&self, head: u16) {
            let avail = self.mock.avail_addr();
            let idx: u16 = self
                .mem
                .read_obj(avail.unchecked_add(2))
                .expect("avail idx");
            let slot = avail.unchecked_add(4 + 2 * u64::from(idx % self.size));
            self.mem.write_obj(head, slot).expect("avail ring");
            self.mem
                .write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
                .expect("avail idx");
        }

        /// The used ring index.
        pub(crate) fn used_idx(&self) -> u16 {
            self.mem
                .load(self.used_addr.unchecked_add(2), Ordering::Acquire)
                .expect("used idx")
        }

        /// Used element `n`: (head, len).
        pub(crate) fn used(&self, n: u16) -> (u32, u32) {
            let e = self
                .used_addr
                .unchecked_add(4 + 8 * u64::from(n % self.size));
            let id: u32 = self.mem.read_obj(e).expect("used id");
            let len: u32 = self.mem.read_obj(e.unchecked_add(4)).expect("used len");
            (id, len)
        }

        /// Waits (bounded) until the used index reaches `want`.
        pub(crate) fn wait_used(&self, want: u16) -> bool {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if self.used_idx() == want {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            false
        }
    }

    /// Waits (bounded) for `f`.
    pub(crate) fn wait_for(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::testutil::*;
    use super::*;

    struct Counter {
        fd: EventFd,
        hits: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Handler for Counter {
        fn init(&mut self, ops: &mut EventOps) -> Result<(), event_manager::Error> {
            ops.add(Events::new(&self.fd, EventSet::IN))
        }

        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.fd.read();
            self.hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }

        fn queues(&self) -> Vec<&WorkerQueue> {
            Vec::new()
        }
    }

    /// Takes one queue's chains, counting them.
    struct QueueCounter {
        mem: GuestMem,
        queue: WorkerQueue,
        irq: Arc<dyn VirtioInterrupt>,
    }

    impl Handler for QueueCounter {
        fn init(&mut self, ops: &mut EventOps) -> Result<(), event_manager::Error> {
            ops.add(Events::new(&self.queue.kick, EventSet::IN))
        }

        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.queue.kick.read();
            let mem = &self.mem;
            self.queue.drain(mem, self.irq.as_ref(), 64, |_| Ok(0));
        }

        fn queues(&self) -> Vec<&WorkerQueue> {
            vec![&self.queue]
        }
    }

    #[test]
    fn slot_pauses_parks_and_resumes() {
        let mem = memory();
        let mut d = Driver::new(&mem, 0x1000, 8);
        let (t, irq) = test_irq();
        let q = d.active(0);
        let kick = q.kick.try_clone().expect("kick");
        let mut slot = WorkerSlot::new("test-slot");
        assert!(slot.pause().is_empty(), "pausing an empty slot");
        assert!(slot.resume().is_ok(), "resuming an empty slot");
        assert!(slot.is_empty());
        slot.start(Ok(QueueCounter {
            mem: mem.clone(),
            queue: WorkerQueue::new(q, false),
            irq,
        }))
        .expect("start");
        assert!(slot.running());
        let h = d.chain(&[(0x10_0000, 16, true)]);
        d.submit(h);
        kick.write(1).expect("kick");
        assert!(d.wait_used(1));
        let p = slot.pause();
        assert_eq!(
            p,
            vec![QueueProgress {
                index: 0,
                next_avail: 1,
                next_used: 1
            }]
        );
        assert!(!slot.running() && slot.paused());
        assert_eq!(slot.pause(), p, "pausing again: same progress");
        // Made available while paused (without a kick): not taken, and
        // taken on resume.
        for _ in 0..2 {
            let h = d.chain(&[(0x10_0000, 16, true)]);
            d.submit(h);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(d.used_idx(), 1);
        slot.resume().expect("resume");
        assert!(slot.running() && !slot.paused());
        assert!(d.wait_used(3), "buffers from the pause are taken");
        assert!(wait_for(|| t.signals(0) >= 2));
        assert_eq!(slot.pause()[0].next_avail, 3);
        // Reset drops the parked handler.
        slot.stop();
        assert!(slot.is_empty());
        assert!(slot.pause().is_empty());
    }

    #[test]
    fn worker_runs_and_stops() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = Worker::spawn(
            "test-worker",
            Counter {
                fd: fd.try_clone().expect("clone"),
                hits: hits.clone(),
            },
        )
        .expect("spawn");
        fd.write(1).expect("kick");
        assert!(wait_for(
            || hits.load(std::sync::atomic::Ordering::SeqCst) == 1
        ));
        let h = w.stop().expect("handler back");
        assert_eq!(h.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn dropping_the_worker_joins_it() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = Worker::spawn(
            "test-worker",
            Counter {
                fd,
                hits: hits.clone(),
            },
        )
        .expect("spawn");
        drop(w);
        // The handler (and its Arc) went away with the thread.
        assert_eq!(Arc::strong_count(&hits), 1);
    }

    #[test]
    fn chains_that_do_not_end_are_unusable() {
        let mem = memory();
        let d = Driver::new(&mem, 0x1000, 8);
        let mut q = d.queue();
        // Loop: 0 -> 1 -> 0.
        d.raw_desc(0, 0x10_0000, 16, F_NEXT, 1);
        d.raw_desc(1, 0x10_0000, 16, F_NEXT, 0);
        d.submit(0);
        // Next index past the table.
        d.raw_desc(2, 0x10_0000, 16, F_NEXT, 200);
        d.submit(2);
        // Head past the table.
        d.submit(9);
        // A good one.
        d.raw_desc(3, 0x10_0000, 16, 0, 0);
        d.submit(3);
        let mut it = q.iter(&mem).expect("iter");
        for _ in 0..3 {
            let c = it.next().expect("chain");
            assert_eq!(collect_chain(c, 8), Err(Unusable));
        }
        let c = it.next().expect("chain");
        assert_eq!(collect_chain(c, 8).expect("good").len(), 1);
    }

    #[test]
    fn impossible_avail_index_is_unusable() {
        let mem = memory();
        let d = Driver::new(&mem, 0x1000, 8);
        let mut wq = WorkerQueue::new(d.active(0), false);
        mem.write_obj(100u16, d.mock.avail_addr().unchecked_add(2))
            .expect("avail idx");
        assert!(wq.pop(&mem).is_err());
    }

    #[test]
    fn cursor_scatters_and_gathers() {
        let mem = memory();
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 3,
                writable: true,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 5,
                writable: true,
            },
        ];
        let mut c = SegCursor::new(&segs);
        assert_eq!(c.skip(2), 2);
        assert_eq!(c.write_from(&mem, b"abcdefgh").expect("write"), 6);
        let mut out = [0u8; 6];
        let mut c = SegCursor::new(&segs);
        c.skip(2);
        assert_eq!(c.read_into(&mem, &mut out).expect("read"), 6);
        assert_eq!(&out, b"abcdef");
    }
}
