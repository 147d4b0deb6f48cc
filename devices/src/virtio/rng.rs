//! virtio-rng (virtio 1.x, section 5.4): one queue of device-writable
//! buffers, filled from the host's `getrandom`.
//!
//! At most [`RngParams::max_bytes_per_request`] bytes go into one request,
//! so a guest offering huge buffers cannot stall the worker; the used
//! length says how much was filled. A chain with a device-readable,
//! zero-length or out-of-RAM buffer is returned with length 0.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::DescriptorChain;
use vm_memory::Bytes;

use crate::GuestMem;

use super::worker::{collect_chain, take_queues, Handler, Unusable, WorkerQueue, WorkerSlot};
use super::{
    check_config_len, check_features, check_queues, device_type, ActivateError, Activation,
    ModelError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use abide_machines::VirtioModel;

/// The features this model implements; it offers exactly the ones the
/// machine declares.
pub const RNG_SUPPORTED_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

/// The device's name in messages.
const DEVICE: &str = "virtio-rng";

/// Requests handled per wakeup before the worker looks at other events.
const BUDGET: usize = 64;

/// Everything the VMM decides about a virtio-rng device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RngParams {
    /// Queue, features (the machine's).
    pub model: VirtioModel,
    /// Most bytes filled per request: a host-side bound on the work one
    /// request causes (the device may fill less than a buffer holds).
    pub max_bytes_per_request: u32,
}

impl RngParams {
    /// The device `model` describes, filling at most 64 KiB per request.
    pub fn new(model: &VirtioModel) -> Self {
        Self {
            model: model.clone(),
            max_bytes_per_request: 64 << 10,
        }
    }
}

/// Errors creating an entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// `max_bytes_per_request` is 0.
    #[error("max_bytes_per_request must be at least 1")]
    MaxBytes,
    /// The machine declares something this model cannot implement.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    params: RngParams,
    features: u64,
    worker: WorkerSlot<RngWorker>,
}

impl Rng {
    /// Creates the device.
    pub fn new(params: RngParams) -> Result<Self, RngError> {
        let m = &params.model;
        check_features(DEVICE, device_type::RNG, m.features, RNG_SUPPORTED_FEATURES)?;
        check_queues(DEVICE, m.num_queues, 1..=1, m.queue_size, 1)?;
        check_config_len(DEVICE, m.config_len, 0, m.features, &[])?;
        if params.max_bytes_per_request == 0 {
            return Err(RngError::MaxBytes);
        }
        Ok(Self {
            features: m.features,
            params,
            worker: WorkerSlot::new(DEVICE),
        })
    }

    fn worker_for(&self, a: Activation) -> Result<RngWorker, ActivateError> {
        let event_idx = a.features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queue = take_queues(a.queues, 1, event_idx)?
            .pop()
            .ok_or_else(|| ActivateError::BadQueues("request queue not enabled".into()))?;
        Ok(RngWorker {
            mem: a.mem,
            queue,
            irq: a.interrupt,
            scratch: vec![0u8; self.params.max_bytes_per_request as usize],
        })
    }

    /// Whether a worker thread is running (for tests).
    #[cfg(test)]
    fn running(&self) -> bool {
        self.worker.running()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.params.model.queue_size]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config_len(&self) -> u32 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // No configuration space: the device has no guest-writable state
        // beyond the transport's, so a snapshot needs nothing from it.
    }

    super::worker::worker_lifecycle!();
}

/// Fills `buf` from the kernel's random source.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes and
        // getrandom writes at most that many.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// The entropy device's worker.
struct RngWorker {
    mem: GuestMem,
    queue: WorkerQueue,
    irq: Arc<dyn VirtioInterrupt>,
    scratch: Vec<u8>,
}

/// Fills one chain; returns the bytes written.
fn fill(
    mem: &GuestMem,
    scratch: &mut [u8],
    chain: DescriptorChain<&GuestMem>,
    max: usize,
) -> Result<u32, Unusable> {
    let segs = collect_chain(chain, max)?;
    if segs.iter().any(|s| !s.usable(mem, true)) {
        return Ok(0);
    }
    let mut written = 0usize;
    for s in segs {
        let room = scratch.len() - written;
        if room == 0 {
            break;
        }
        let n = (s.len as usize).min(room);
        let buf = &mut scratch[written..written + n];
        if getrandom(buf).is_err() || mem.write_slice(buf, s.addr).is_err() {
            break;
        }
        written += n;
    }
    Ok(written as u32)
}

impl RngWorker {
    fn process_queue(&mut self) {
        let max = self.queue.max_chain();
        let (mem, scratch) = (&self.mem, &mut self.scratch);
        self.queue.drain(mem, self.irq.as_ref(), BUDGET, |chain| {
            fill(mem, scratch, chain, max)
        });
    }
}

impl Handler for RngWorker {
    fn init(&mut self, ops: &mut EventOps) -> Result<(), event_manager::Error> {
        ops.add(Events::new(&self.queue.kick, EventSet::IN))
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.queue.kick.read();
        self.process_queue();
    }

    fn failed(&mut self) {
        self.irq.set_needs_reset();
    }

    fn queues(&self) -> Vec<&WorkerQueue> {
        vec![&self.queue]
    }
}

/// For the fuzz targets (feature `fuzzing`): fills one chain as the
/// worker does.
#[cfg(feature = "fuzzing")]
pub(super) fn fuzz_chain(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    max: usize,
) -> Result<u32, Unusable> {
    let mut scratch = vec![0u8; 4096];
    fill(mem, &mut scratch, chain, max)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::super::worker::testutil::*;
    use super::super::worker::{test_irq, TestInterrupt};
    use super::*;
    use crate::virtio::QueueProgress;

    const QBASE: u64 = 0x1000;
    const BUF: u64 = 0x10_0000;

    fn worker(r: &Rng, mem: &GuestMem, d: &Driver) -> (RngWorker, Arc<TestInterrupt>) {
        let (t, irq) = test_irq();
        let w = r
            .worker_for(Activation {
                mem: mem.clone(),
                features: r.features(),
                queues: vec![d.active(0)],
                interrupt: irq,
            })
            .expect("worker");
        (w, t)
    }

    fn nonzero(mem: &GuestMem, addr: u64, len: usize) -> bool {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, GuestAddress(addr)).expect("read");
        // 64 random bytes all zero: probability 2^-512.
        b.chunks(64).all(|c| c.iter().any(|&x| x != 0))
    }

    /// pc-1.0's virtio-rng with a queue of `size`.
    fn params(size: u16) -> RngParams {
        let mut p = RngParams::new(&abide_machines::pc_1_0().virtio.rng);
        p.model.queue_size = size;
        p
    }

    #[test]
    fn params_and_features() {
        let r = Rng::new(params(256)).expect("rng");
        assert_eq!(r.device_type(), device_type::RNG);
        assert_eq!(r.queue_max_sizes(), vec![256]);
        assert_eq!(r.features(), VIRTIO_F_VERSION_1);
        assert_eq!(r.config_len(), 0);
        let mut p = params(256);
        p.model.features |= VIRTIO_RING_F_EVENT_IDX;
        assert_eq!(
            Rng::new(p).expect("rng").features(),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        );
    }

    #[test]
    fn undeclarable_values_are_refused() {
        let refusal = |edit: &dyn Fn(&mut RngParams)| {
            let mut p = params(256);
            edit(&mut p);
            match Rng::new(p) {
                Err(RngError::Model(e)) => e.to_string(),
                other => panic!("expected a refusal, got {other:?}"),
            }
        };
        let e = refusal(&|p| p.model.features = 0);
        assert!(
            e.contains("virtio-rng") && e.contains("VIRTIO_F_VERSION_1"),
            "{e}"
        );
        let e = refusal(&|p| p.model.features |= 1 << 28);
        assert!(e.contains("VIRTIO_RING_F_INDIRECT_DESC"), "{e}");
        let e = refusal(&|p| p.model.num_queues = 2);
        assert!(
            e.contains("num_queues = 2") && e.contains("exactly 1"),
            "{e}"
        );
        let e = refusal(&|p| p.model.queue_size = 3);
        assert!(e.contains("queue_size = 3"), "{e}");
        let e = refusal(&|p| p.model.config_len = 4);
        assert!(e.contains("config_len = 4"), "{e}");
    }

    #[test]
    fn fills_buffers() {
        let r = Rng::new(params(16)).expect("rng");
        let mem = memory();
        let mut d = Driver::new(&mem, QBASE, 16);
        let (mut w, irq) = worker(&r, &mem, &d);
        let h = d.chain(&[(BUF, 128, true), (BUF + 0x1000, 64, true)]);
        d.submit(h);
        w.process_queue();
        assert_eq!(d.used(0), (u32::from(h), 192));
        assert!(nonzero(&mem, BUF, 128));
        assert!(nonzero(&mem, BUF + 0x1000, 64));
        assert_eq!(irq.signals(0), 1);
    }

    #[test]
    fn caps_bytes_per_request() {
        let r = Rng::new(RngParams {
            max_bytes_per_request: 4096,
            ..params(16)
        })
        .expect("rng");
        let mem = memory();
        let mut d = Driver::new(&mem, QBASE, 16);
        let (mut w, _irq) = worker(&r, &mem, &d);
        let h = d.chain(&[(BUF, 3000, true), (BUF + 0x10000, 0x20_0000, true)]);
        d.submit(h);
        w.process_queue();
        assert_eq!(d.used(0), (u32::from(h), 4096));
        let mut tail = vec![0u8; 4096];
        mem.read_slice(&mut tail, GuestAddress(BUF + 0x10000 + 1096))
            .expect("read");
        assert!(tail.iter().all(|&b| b == 0));
    }

    #[test]
    fn hostile_chains() {
        let r = Rng::new(params(16)).expect("rng");
        let mem = memory();
        let mut d = Driver::new(&mem, QBASE, 16);
        let (mut w, irq) = worker(&r, &mem, &d);
        // Returned with nothing written.
        let bad: [&[(u64, u32, bool)]; 4] = [
            &[(BUF, 64, false)],
            &[(BUF, 64, true), (BUF, 0, true)],
            &[(0xFFF_FFFF_F000, 64, true)],
            &[(RAM - 32, 64, true)],
        ];
        let mut k = 0u16;
        for (n, bufs) in bad.iter().enumerate() {
            let h = d.chain(bufs);
            d.submit(h);
            w.process_queue();
            assert_eq!(d.used(k), (u32::from(h), 0), "case {n}");
            // A good one still works.
            let h = d.chain(&[(BUF, 64, true)]);
            d.submit(h);
            w.process_queue();
            assert_eq!(d.used(k + 1), (u32::from(h), 64), "after case {n}");
            k += 2;
        }
        assert!(!irq.needs_reset());
        // A loop cannot be returned.
        d.raw_desc(0, BUF, 64, F_NEXT | F_WRITE, 0);
        d.submit(0);
        let before = d.used_idx();
        w.process_queue();
        assert!(irq.needs_reset());
        assert_eq!(d.used_idx(), before);
    }

    #[test]
    fn bad_head_needs_reset() {
        let r = Rng::new(params(16)).expect("rng");
        let mem = memory();
        let d = Driver::new(&mem, QBASE, 16);
        let (mut w, irq) = worker(&r, &mem, &d);
        d.submit(16);
        w.process_queue();
        assert!(irq.needs_reset());
        assert_eq!(d.used_idx(), 0);
    }

    #[test]
    fn threaded_activate_kick_reset() {
        let mut r = Rng::new(params(16)).expect("rng");
        let mem = memory();
        for round in 0..2u64 {
            let mut d = Driver::new(&mem, QBASE + round * 0x2000, 16);
            let (t, irq) = test_irq();
            let q = d.active(0);
            let kick = q.kick.try_clone().expect("kick");
            r.activate(Activation {
                mem: mem.clone(),
                features: r.features(),
                queues: vec![q],
                interrupt: irq,
            })
            .expect("activate");
            assert!(r.running());
            let h = d.chain(&[(BUF, 32, true)]);
            d.submit(h);
            kick.write(1).expect("kick");
            assert!(d.wait_used(1));
            assert!(wait_for(|| t.signals(0) == 1));
            r.reset();
            assert!(!r.running());
            assert!(r.worker.is_empty());
        }
    }

    #[test]
    fn pause_resume_and_paused_activation() {
        let mut r = Rng::new(params(16)).expect("rng");
        assert!(r.pause().is_empty(), "inactive");
        r.resume().expect("inactive resume");
        let mem = memory();
        let mut d = Driver::new(&mem, QBASE, 16);
        let (t, irq) = test_irq();
        let h = d.chain(&[(BUF, 32, true)]);
        d.submit(h);
        r.activate_paused(Activation {
            mem: mem.clone(),
            features: r.features(),
            queues: vec![d.active(0)],
            interrupt: irq,
        })
        .expect("activate paused");
        assert!(!r.running());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(d.used_idx(), 0, "prepared paused: nothing processed");
        r.resume().expect("resume");
        assert!(r.running());
        assert!(d.wait_used(1), "buffer from before the resume taken");
        assert!(wait_for(|| t.signals(0) == 1));
        assert_eq!(
            r.pause(),
            vec![QueueProgress {
                index: 0,
                next_avail: 1,
                next_used: 1
            }]
        );
        r.reset();
        assert!(r.worker.is_empty(), "reset drops the parked worker");
        r.resume().expect("nothing to resume");
        assert!(!r.running());
    }
}
