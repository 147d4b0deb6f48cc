//! virtio-net (virtio 1.x, section 5.1): one receive and one transmit
//! queue in front of a frame backend, normally a tap device.
//!
//! No offloads are offered, so the 12-byte `virtio_net_hdr` (VERSION_1:
//! with `num_buffers`) carries nothing on transmit and is all zeros but
//! `num_buffers = 1` on receive. The tap is opened with `IFF_VNET_HDR` and
//! a 12-byte header; the device writes zero headers to it and ignores the
//! ones it reads, so a guest cannot ask the host kernel for GSO or checksum
//! work that was never negotiated.
//!
//! Receive: when the tap is readable, one frame is read into a scratch
//! buffer and copied into the next receive chain. When the guest has no
//! receive buffer the frame is kept and the tap is no longer polled until
//! the guest kicks the receive queue. Transmit: each chain is gathered
//! (header skipped) and written to the tap as one frame; transmit chains
//! are returned with length 0. Malformed chains are returned with length 0
//! (their frame dropped); chains that cannot be returned at all put the
//! device into DEVICE_NEEDS_RESET.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use crate::GuestMem;
use event_manager::{EventOps, EventSet, Events};
use virtio_queue::DescriptorChain;

use super::worker::{
    collect_chain, take_queues, total_len, Handler, SegCursor, Unusable, WorkerQueue, WorkerSlot,
};
use super::{
    check_config_len, check_features, check_queues, device_type, read_config_bytes, ActivateError,
    Activation, ModelError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use abide_machines::{NetConfig, VirtioModel};

pub use abide_machines::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};

/// The features this model implements; it offers exactly the ones the
/// machine declares.
pub const NET_SUPPORTED_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_RING_F_EVENT_IDX;

/// The device's name in messages.
const DEVICE: &str = "virtio-net";

/// `virtio_net_hdr` size with VERSION_1 (also the tap's vnet header size).
pub const NET_HDR_LEN: usize = 12;
/// Largest buffer (header and frame) handled in either direction.
pub const MAX_BUFFER_LEN: usize = 65562;
/// Largest frame (without the header).
pub const MAX_FRAME_LEN: usize = MAX_BUFFER_LEN - NET_HDR_LEN;
/// Size of the configuration space this model implements: `mac`,
/// `status`, `max_virtqueue_pairs`; a machine exposes a prefix of it.
pub const CONFIG_LEN: usize = 10;
/// Where the fields a feature makes valid end: `mac`, `status`.
const CONFIG_FIELDS: &[(u64, usize)] = &[(VIRTIO_NET_F_MAC, 6), (VIRTIO_NET_F_STATUS, 8)];

/// Receive queue index.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index.
pub const TX_QUEUE: u16 = 1;

/// Frames or chains handled per wakeup before the worker looks at other
/// events.
const BUDGET: usize = 256;
/// Event data of the worker's sources.
const EV_RX: u32 = 0;
const EV_TX: u32 = 1;
const EV_BACKEND: u32 = 2;

/// Where frames go to and come from.
pub trait NetBackend: AsRawFd + Send + Sync + 'static {
    /// Reads one frame (without any header) into `buf`. `WouldBlock` when
    /// none is waiting; `InvalidData` for a frame that was dropped.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame (without any header).
    fn send(&self, frame: &[u8]) -> io::Result<()>;
}

const TUNSETIFF: u64 = 0x4004_54ca;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUNGETIFF: u64 = 0x8004_54d2;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFNAMSIZ: usize = 16;

/// `struct ifreq` with the flags member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> Self {
        Self {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }
}

/// A tap device opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a
/// 12-byte vnet header, no offloads, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
}

impl Tap {
    /// Opens (creating if allowed) the tap interface `name` through
    /// `/dev/net/tun`.
    pub fn open(name: &str) -> io::Result<Self> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid tap name {name:?}"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq::new();
        req.name[..bytes.len()].copy_from_slice(bytes);
        req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads (and updates) a `struct ifreq`; `req` is
        // one, laid out as the kernel expects, and outlives the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let tap = Self { file };
        tap.configure()?;
        Ok(tap)
    }

    /// Takes a tap file descriptor opened elsewhere (e.g. by an
    /// orchestrator). It must be a tap with `IFF_NO_PI | IFF_VNET_HDR`;
    /// it is switched to a 12-byte header, no offloads and non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let tap = Self {
            file: File::from(fd),
        };
        let mut req = IfReq::new();
        // SAFETY: TUNGETIFF fills a `struct ifreq`; `req` is one and
        // outlives the call.
        let r = unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNGETIFF as _, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.flags & want != want {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "tap flags {:#x} lack IFF_TAP|IFF_NO_PI|IFF_VNET_HDR",
                    req.flags
                ),
            ));
        }
        tap.configure()?;
        Ok(tap)
    }

    /// [`Tap::from_fd`] on a raw descriptor.
    ///
    /// # Safety
    ///
    /// `fd` must be an open descriptor that nothing else owns; the `Tap`
    /// takes ownership and closes it (also on error).
    pub unsafe fn from_raw_fd(fd: RawFd) -> io::Result<Self> {
        // SAFETY: the caller hands over ownership of an open descriptor.
        Self::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// A second handle on the same tap queue (a duplicated descriptor),
    /// e.g. for the VMM to send frames of its own on the guest's port.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
        })
    }

    /// The interface name.
    pub fn name(&self) -> io::Result<String> {
        let mut req = IfReq::new();
        // SAFETY: TUNGETIFF fills a `struct ifreq`; `req` is one and
        // outlives the call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNGETIFF as _, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        Ok(String::from_utf8_lossy(&req.name[..end]).into_owned())
    }

    fn configure(&self) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let size: libc::c_int = NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer; `size`
        // is one and outlives the call.
        if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ as _, &size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, 0 as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        set_nonblocking(fd)
    }

    /// A `Tap` over any descriptor speaking the tap framing (vnet header
    /// plus frame per datagram), without tap ioctls: for tests.
    #[cfg(test)]
    pub(crate) fn unconfigured(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        Ok(Self {
            file: File::from(fd),
        })
    }
}

/// Whether `fd` (owned elsewhere, left open) is a tun/tap descriptor.
pub fn is_tap(fd: RawFd) -> bool {
    let mut req = IfReq::new();
    // SAFETY: TUNGETIFF fills a `struct ifreq`; `req` is one and outlives
    // the call. On a descriptor that is not a tun/tap it fails (ENOTTY,
    // EBADFD or EINVAL) without side effects.
    unsafe { libc::ioctl(fd, TUNGETIFF as _, &mut req) == 0 }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor we own; no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an int flag set; no pointers.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // The host's header is ignored: no offloads are negotiated.
        let mut hdr = [0u8; NET_HDR_LEN];
        let n =
            (&self.file).read_vectored(&mut [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf)])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        n.checked_sub(NET_HDR_LEN)
            .ok_or_else(|| io::ErrorKind::InvalidData.into())
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        let hdr = [0u8; NET_HDR_LEN];
        let n = (&self.file).write_vectored(&[IoSlice::new(&hdr), IoSlice::new(frame)])?;
        if n != NET_HDR_LEN + frame.len() {
            return Err(io::ErrorKind::WriteZero.into());
        }
        Ok(())
    }
}

/// Everything the VMM decides about a virtio-net device: the backend and
/// MAC, and the machine's virtio-net model.
#[derive(Debug)]
pub struct NetParams<B> {
    /// The frame backend (normally a [`Tap`]).
    pub backend: B,
    /// MAC address in the config space.
    pub mac: [u8; 6],
    /// Queues, features, configuration length (the machine's).
    pub model: VirtioModel,
    /// `status` and `max_virtqueue_pairs` (the machine's).
    pub config: NetConfig,
}

impl<B> NetParams<B> {
    /// A card with `backend` and `mac`, as `model` describes.
    pub fn new(backend: B, mac: [u8; 6], model: &VirtioModel, config: NetConfig) -> Self {
        Self {
            backend,
            mac,
            model: model.clone(),
            config,
        }
    }
}

/// Errors creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The machine declares something this model cannot implement.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Checks the machine's virtio-net model.
fn check_model(m: &VirtioModel, c: &NetConfig) -> Result<(), ModelError> {
    check_features(DEVICE, device_type::NET, m.features, NET_SUPPORTED_FEATURES)?;
    // One receive and one transmit queue.
    check_queues(DEVICE, m.num_queues, 2..=2, m.queue_size, 2)?;
    check_config_len(DEVICE, m.config_len, CONFIG_LEN, m.features, CONFIG_FIELDS)?;
    if c.status != VIRTIO_NET_S_LINK_UP {
        return Err(ModelError::value(
            DEVICE,
            "status",
            c.status,
            "the link is always up (VIRTIO_NET_S_LINK_UP = 1)",
        ));
    }
    if c.max_virtqueue_pairs != 1 {
        return Err(ModelError::value(
            DEVICE,
            "max_virtqueue_pairs",
            c.max_virtqueue_pairs,
            "this model has one queue pair",
        ));
    }
    Ok(())
}

/// A virtio-net device.
#[derive(Debug)]
pub struct Net<B: NetBackend = Tap> {
    backend: Arc<B>,
    features: u64,
    queue_size: u16,
    config: Vec<u8>,
    worker: WorkerSlot<NetWorker<B>>,
}

impl<B: NetBackend> Net<B> {
    /// Creates the device.
    pub fn new(p: NetParams<B>) -> Result<Self, NetError> {
        check_model(&p.model, &p.config)?;
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&p.mac);
        config[6..8].copy_from_slice(&p.config.status.to_le_bytes());
        config[8..10].copy_from_slice(&p.config.max_virtqueue_pairs.to_le_bytes());
        Ok(Self {
            backend: Arc::new(p.backend),
            features: p.model.features,
            queue_size: p.model.queue_size,
            config: config[..p.model.config_len as usize].to_vec(),
            worker: WorkerSlot::new(DEVICE),
        })
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn worker_for(&self, a: Activation) -> Result<NetWorker<B>, ActivateError> {
        let event_idx = a.features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = take_queues(a.queues, 2, event_idx)?;
        queues.sort_by_key(|q| q.index);
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx)) = (it.next(), it.next()) else {
            return Err(ActivateError::BadQueues(
                "both the receive and transmit queues are required".into(),
            ));
        };
        Ok(NetWorker {
            mem: a.mem,
            rx,
            tx,
            backend: self.backend.clone(),
            metrics: a.interrupt.metrics(),
            irq: a.interrupt,
            rx_frame: vec![0u8; MAX_FRAME_LEN],
            rx_pending: None,
            tx_frame: vec![0u8; MAX_FRAME_LEN],
            backend_polled: false,
            backend_gone: false,
        })
    }

    /// Whether a worker thread is running (for tests).
    #[cfg(test)]
    fn running(&self) -> bool {
        self.worker.running()
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u16 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; 2]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config_len(&self) -> u32 {
        self.config.len() as u32
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is only writable by legacy drivers, so the device has no
        // guest-writable state beyond the transport's: a snapshot needs
        // nothing from it. A received frame still waiting for a receive
        // buffer survives a pause but not a restore in a new process: it
        // is lost, as a frame on a wire may be.
    }

    super::worker::worker_lifecycle!();
}

/// Why receiving stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxStop {
    /// The backend has nothing more (or the budget ran out): keep polling.
    Drained,
    /// The guest has no receive buffer: stop polling until it kicks.
    NoBuffers,
    /// The backend failed for good, or the receive queue is broken.
    Dead,
}

/// The network device's worker.
struct NetWorker<B> {
    mem: GuestMem,
    rx: WorkerQueue,
    tx: WorkerQueue,
    backend: Arc<B>,
    irq: Arc<dyn VirtioInterrupt>,
    metrics: Arc<super::metrics::DeviceMetrics>,
    rx_frame: Vec<u8>,
    /// Length of a frame in `rx_frame` still waiting for a buffer.
    rx_pending: Option<usize>,
    tx_frame: Vec<u8>,
    backend_polled: bool,
    backend_gone: bool,
}

/// Copies a received frame into a receive chain; returns the used length
/// (0 when the chain is malformed or too small: the frame is dropped).
fn deliver(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    frame: &[u8],
    max: usize,
) -> Result<u32, Unusable> {
    let segs = collect_chain(chain, max)?;
    if segs.iter().any(|s| !s.usable(mem, true)) {
        return Ok(0);
    }
    let need = NET_HDR_LEN + frame.len();
    if total_len(&segs) < need as u64 {
        return Ok(0);
    }
    let mut hdr = [0u8; NET_HDR_LEN];
    // num_buffers
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
    let mut c = SegCursor::new(&segs);
    match (c.write_from(mem, &hdr), c.write_from(mem, frame)) {
        (Ok(a), Ok(b)) if a + b == need => Ok(need as u32),
        _ => Ok(0),
    }
}

/// Sends the frame of one transmit chain; returns the used length (0).
/// Frames sent count as bytes taken; dropped ones as errors.
fn transmit<B: NetBackend>(
    mem: &GuestMem,
    backend: &B,
    buf: &mut [u8],
    chain: DescriptorChain<&GuestMem>,
    max: usize,
    metrics: &super::metrics::DeviceMetrics,
) -> Result<u32, Unusable> {
    let segs = collect_chain(chain, max)?;
    let total = total_len(&segs);
    if segs.iter().any(|s| !s.usable(mem, false))
        || total <= NET_HDR_LEN as u64
        || total > MAX_BUFFER_LEN as u64
    {
        metrics.error();
        return Ok(0);
    }
    let n = total as usize - NET_HDR_LEN;
    let mut c = SegCursor::new(&segs);
    c.skip(NET_HDR_LEN);
    // A frame the host refuses is dropped, as on a wire.
    match c.read_into(mem, &mut buf[..n]) {
        Ok(got) if got == n && backend.send(&buf[..n]).is_ok() => metrics.took(n as u64),
        _ => metrics.error(),
    }
    Ok(0)
}

impl<B: NetBackend> NetWorker<B> {
    /// Sends the available transmit chains.
    fn process_tx(&mut self) {
        let max = self.tx.max_chain();
        let (mem, backend, buf) = (&self.mem, self.backend.as_ref(), &mut self.tx_frame);
        let metrics = &self.metrics;
        self.tx.drain(mem, self.irq.as_ref(), BUDGET, |chain| {
            transmit(mem, backend, buf, chain, max, metrics)
        });
    }

    /// Moves frames from the backend into receive buffers.
    fn process_rx(&mut self) -> RxStop {
        let stop = self.receive();
        self.rx.notify(&self.mem, self.irq.as_ref());
        stop
    }

    fn receive(&mut self) -> RxStop {
        if self.backend_gone {
            return RxStop::Dead;
        }
        let max = self.rx.max_chain();
        for _ in 0..BUDGET {
            if self.rx.broken {
                return RxStop::Dead;
            }
            let len = match self.rx_pending {
                Some(n) => n,
                None => match self.backend.recv(&mut self.rx_frame) {
                    Ok(n) => n.min(MAX_FRAME_LEN),
                    Err(e) => match e.kind() {
                        io::ErrorKind::WouldBlock => return RxStop::Drained,
                        io::ErrorKind::Interrupted | io::ErrorKind::InvalidData => continue,
                        _ => {
                            self.backend_gone = true;
                            return RxStop::Dead;
                        }
                    },
                },
            };
            self.rx_pending = Some(len);
            let chain = match self.rx.pop(&self.mem) {
                Ok(Some(c)) => c,
                Ok(None) => match self.rx.rearm(&self.mem) {
                    Ok(true) => continue,
                    Ok(false) => return RxStop::NoBuffers,
                    Err(Unusable) => {
                        self.rx.fail(self.irq.as_ref());
                        return RxStop::Dead;
                    }
                },
                Err(Unusable) => {
                    self.rx.fail(self.irq.as_ref());
                    return RxStop::Dead;
                }
            };
            let head = chain.head_index();
            let used = deliver(&self.mem, chain, &self.rx_frame[..len], max)
                .and_then(|n| self.rx.add_used(&self.mem, head, n).map(|()| n));
            match used {
                Ok(0) => {
                    self.metrics.completed(1, 0);
                    self.metrics.error();
                }
                Ok(n) => self.metrics.completed(1, u64::from(n)),
                Err(Unusable) => {
                    self.rx.fail(self.irq.as_ref());
                    return RxStop::Dead;
                }
            }
            self.rx_pending = None;
        }
        RxStop::Drained
    }

    fn backend_events(&self) -> Events {
        Events::with_data(self.backend.as_ref(), EV_BACKEND, EventSet::IN)
    }

    /// Receives, then polls the backend only while that can make progress.
    fn rx_and_update_polling(&mut self, ops: &mut EventOps) {
        let want = self.process_rx() == RxStop::Drained;
        if want != self.backend_polled {
            let ev = self.backend_events();
            let r = if want { ops.add(ev) } else { ops.remove(ev) };
            if r.is_ok() {
                self.backend_polled = want;
            } else if want {
                // Cannot poll the backend: receiving is over.
                self.backend_gone = true;
            }
        }
    }
}

impl<B: NetBackend> Handler for NetWorker<B> {
    fn init(&mut self, ops: &mut EventOps) -> Result<(), event_manager::Error> {
        ops.add(Events::with_data(&self.rx.kick, EV_RX, EventSet::IN))?;
        ops.add(Events::with_data(&self.tx.kick, EV_TX, EventSet::IN))?;
        ops.add(self.backend_events())?;
        self.backend_polled = true;
        Ok(())
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_RX => {
                let _ = self.rx.kick.read();
                self.rx_and_update_polling(ops);
            }
            EV_TX => {
                let _ = self.tx.kick.read();
                self.process_tx();
            }
            _ => self.rx_and_update_polling(ops),
        }
    }

    fn failed(&mut self) {
        self.irq.set_needs_reset();
    }

    fn queues(&self) -> Vec<&WorkerQueue> {
        vec![&self.rx, &self.tx]
    }
}

/// For the fuzz targets (feature `fuzzing`): delivers `frame` into one
/// chain, or transmits one chain to a backend that drops it, as the worker
/// does.
#[cfg(feature = "fuzzing")]
pub(super) fn fuzz_chain(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    max: usize,
    receive: Option<&[u8]>,
) -> Result<u32, Unusable> {
    struct Drop;
    impl std::os::fd::AsRawFd for Drop {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            -1
        }
    }
    impl NetBackend for Drop {
        fn recv(&self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn send(&self, frame: &[u8]) -> io::Result<()> {
            assert!(frame.len() <= MAX_FRAME_LEN, "a {}-byte frame", frame.len());
            Ok(())
        }
    }
    match receive {
        Some(frame) => deliver(mem, chain, frame, max),
        None => {
            let mut buf = vec![0u8; MAX_BUFFER_LEN];
            let metrics = super::metrics::DeviceMetrics::default();
            transmit(mem, &Drop, &mut buf, chain, max, &metrics)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use vm_memory::{Bytes, GuestAddress};

    use super::super::worker::testutil::*;
    use super::super::worker::{test_irq, TestInterrupt};
    use super::*;

    const QSIZE: u16 = 16;
    const RXQ: u64 = 0x1000;
    const TXQ: u64 = 0x3000;
    const BUF: u64 = 0x10_0000;
    const RXBUF: u64 = 0x20_0000;
    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    /// pc-1.0's virtio-net over `backend`, with queues of `QSIZE`.
    fn params<B>(backend: B) -> NetParams<B> {
        let m = abide_machines::pc_1_0();
        let mut p = NetParams::new(backend, MAC, &m.virtio.net, m.virtio.net_config);
        p.model.queue_size = QSIZE;
        p
    }

    /// A device over one end of a datagram socketpair; the test holds the
    /// other end, speaking the tap framing.
    fn net() -> (Net<Tap>, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().expect("socketpair");
        let tap = Tap::unconfigured(OwnedFd::from(a)).expect("tap");
        b.set_nonblocking(true).expect("nonblocking");
        (Net::new(params(tap)).expect("net"), b)
    }

    struct Rig<'m> {
        w: NetWorker<Tap>,
        irq: Arc<TestInterrupt>,
        rx: Driver<'m>,
        tx: Driver<'m>,
    }

    fn rig<'m>(n: &Net<Tap>, mem: &'m GuestMem) -> Rig<'m> {
        let rx = Driver::new(mem, RXQ, QSIZE);
        let tx = Driver::new(mem, TXQ, QSIZE);
        let (irq, i) = test_irq();
        let w = n
            .worker_for(Activation {
                mem: mem.clone(),
                features: n.features(),
                queues: vec![tx.active(TX_QUEUE), rx.active(RX_QUEUE)],
                interrupt: i,
            })
            .expect("worker");
        Rig { w, irq, rx, tx }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn peer_send(peer: &UnixDatagram, hdr_byte: u8, f: &[u8]) {
        let mut d = vec![hdr_byte; NET_HDR_LEN];
        d.extend_from_slice(f);
        peer.send(&d).expect("peer send");
    }

    fn peer_recv(peer: &UnixDatagram) -> Option<Vec<u8>> {
        let mut b = vec![0u8; MAX_BUFFER_LEN + 100];
        let n = peer.recv(&mut b).ok()?;
        b.truncate(n);
        Some(b)
    }

    #[test]
    fn config_and_features() {
        let (n, _peer) = net();
        assert_eq!(n.device_type(), device_type::NET);
        assert_eq!(n.queue_max_sizes(), vec![QSIZE, QSIZE]);
        // Exactly what pc-1.0 declares.
        assert_eq!(n.features(), abide_machines::pc_1_0().virtio.net.features);
        let mut c = [0u8; CONFIG_LEN];
        n.read_config(0, &mut c);
        assert_eq!(&c[..6], &MAC);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), VIRTIO_NET_S_LINK_UP);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
    }

    /// The refusal of pc-1.0's model edited by `edit`.
    fn refusal(edit: impl FnOnce(&mut NetParams<Detached>)) -> String {
        let mut p = params(Detached::new().expect("detached"));
        edit(&mut p);
        match Net::new(p) {
            Err(NetError::Model(e)) => e.to_string(),
            Ok(_) => panic!("expected a refusal"),
        }
    }

    #[test]
    fn undeclarable_values_are_refused() {
        // Offloads are never offered: declaring one is refused, not masked.
        let e = refusal(|p| p.model.features |= 1);
        assert!(
            e.contains("virtio-net") && e.contains("VIRTIO_NET_F_CSUM (bit 0)"),
            "{e}"
        );
        let e = refusal(|p| p.model.features |= abide_machines::VIRTIO_NET_F_MQ);
        assert!(e.contains("VIRTIO_NET_F_MQ"), "{e}");
        let e = refusal(|p| p.model.features &= !VIRTIO_F_VERSION_1);
        assert!(e.contains("VIRTIO_F_VERSION_1"), "{e}");
        let e = refusal(|p| p.model.num_queues = 4);
        assert!(
            e.contains("num_queues = 4") && e.contains("exactly 2"),
            "{e}"
        );
        let e = refusal(|p| p.config.status = 0);
        assert!(e.contains("status = 0"), "{e}");
        let e = refusal(|p| p.config.max_virtqueue_pairs = 2);
        assert!(e.contains("max_virtqueue_pairs = 2"), "{e}");
        let e = refusal(|p| p.model.config_len = 6);
        assert!(e.contains("config_len = 6"), "STATUS needs 8 bytes: {e}");
        let e = refusal(|p| p.model.config_len = 12);
        assert!(e.contains("config_len = 12"), "{e}");
    }

    #[test]
    fn tx_sends_frames_with_a_zero_header() {
        let (n, peer) = net();
        let mem = memory();
        let mut r = rig(&n, &mem);
        // Guest header with garbage (e.g. GSO flags) and a split frame.
        mem.write_slice(&[0xff; NET_HDR_LEN], GuestAddress(BUF))
            .expect("hdr");
        let f = frame(1514, 7);
        mem.write_slice(&f[..100], GuestAddress(BUF + 0x1000))
            .expect("frame");
        mem.write_slice(&f[100..], GuestAddress(BUF + 0x2000))
            .expect("frame");
        let h = r.tx.chain(&[
            (BUF, NET_HDR_LEN as u32, false),
            (BUF + 0x1000, 100, false),
            (BUF + 0x2000, 1414, false),
        ]);
        r.tx.submit(h);
        // Header and frame in one descriptor.
        mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(BUF + 0x4000))
            .expect("hdr");
        mem.write_slice(&f[..60], GuestAddress(BUF + 0x4000 + 12))
            .expect("frame");
        let h2 = r.tx.chain(&[(BUF + 0x4000, 72, false)]);
        r.tx.submit(h2);
        r.w.process_tx();
        assert_eq!(r.tx.used(0), (u32::from(h), 0));
        assert_eq!(r.tx.used(1), (u32::from(h2), 0));
        assert_eq!(r.irq.signals(TX_QUEUE), 1);
        let got = peer_recv(&peer).expect("frame 1");
        assert_eq!(&got[..NET_HDR_LEN], &[0u8; NET_HDR_LEN]);
        assert_eq!(&got[NET_HDR_LEN..], &f[..]);
        let got = peer_recv(&peer).expect("frame 2");
        assert_eq!(&got[NET_HDR_LEN..], &f[..60]);
        assert!(peer_recv(&peer).is_none());
    }

    #[test]
    fn tx_drops_malformed_chains() {
        let (n, peer) = net();
        let mem = memory();
        let mut r = rig(&n, &mem);
        let bad: [&[(u64, u32, bool)]; 6] = [
            &[(BUF, 12, false), (BUF + 0x1000, 64, true)],
            &[(BUF, 12, false), (0xFFF_FFFF_F000, 64, false)],
            &[(BUF, 12, false), (BUF + 0x1000, 0, false)],
            &[(BUF, 12, false)],
            &[(BUF, 8, false)],
            &[
                (BUF, 12, false),
                (BUF + 0x1000, MAX_FRAME_LEN as u32 + 1, false),
            ],
        ];
        for (k, bufs) in bad.iter().enumerate() {
            let h = r.tx.chain(bufs);
            r.tx.submit(h);
            r.w.process_tx();
            assert_eq!(r.tx.used(k as u16), (u32::from(h), 0), "case {k}");
            assert!(peer_recv(&peer).is_none(), "case {k}");
        }
        // The largest frame goes through.
        let h = r.tx.chain(&[
            (BUF, 12, false),
            (BUF + 0x1000, MAX_FRAME_LEN as u32, false),
        ]);
        r.tx.submit(h);
        r.w.process_tx();
        assert_eq!(
            peer_recv(&peer).map(|f| f.len()),
            Some(MAX_BUFFER_LEN),
            "largest frame"
        );
        assert!(!r.irq.needs_reset());
        // A loop cannot be returned.
        r.tx.raw_desc(0, BUF, 12, F_NEXT, 0);
        r.tx.submit(0);
        r.w.process_tx();
        assert!(r.irq.needs_reset());
        assert!(peer_recv(&peer).is_none());
    }

    #[test]
    fn rx_delivers_frames() {
        let (n, peer) = net();
        let mem = memory();
        let mut r = rig(&n, &mem);
        // Nothing waiting: keep polling.
        assert_eq!(r.w.process_rx(), RxStop::Drained);
        // A frame but no buffer: it is kept, polling stops.
        let f = frame(1000, 3);
        peer_send(&peer, 0xaa, &f);
        assert_eq!(r.w.process_rx(), RxStop::NoBuffers);
        assert_eq!(r.w.rx_pending, Some(1000));
        // Two buffers (split), two frames.
        let f2 = frame(60, 9);
        peer_send(&peer, 0xaa, &f2);
        let h =
            r.rx.chain(&[(RXBUF, 500, true), (RXBUF + 0x1000, 1526, true)]);
        r.rx.submit(h);
        let h2 = r.rx.chain(&[(RXBUF + 0x2000, 1526, true)]);
        r.rx.submit(h2);
        assert_eq!(r.w.process_rx(), RxStop::Drained);
        assert_eq!(r.rx.used(0), (u32::from(h), 1012));
        assert_eq!(r.rx.used(1), (u32::from(h2), 72));
        assert_eq!(r.irq.signals(RX_QUEUE), 1);
        let mut got = vec![0u8; 1012];
        mem.read_slice(&mut got[..500], GuestAddress(RXBUF))
            .expect("read");
        mem.read_slice(&mut got[500..], GuestAddress(RXBUF + 0x1000))
            .expect("read");
        assert_eq!(&got[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&got[12..], &f[..]);
        let mut got = vec![0u8; 72];
        mem.read_slice(&mut got, GuestAddress(RXBUF + 0x2000))
            .expect("read");
        assert_eq!(&got[12..], &f2[..]);
    }

    #[test]
    fn rx_malformed_chains() {
        let (n, peer) = net();
        let mem = memory();
        let mut r = rig(&n, &mem);
        let bad: [&[(u64, u32, bool)]; 4] = [
            &[(RXBUF, 1526, false)],
            &[(0xFFF_FFFF_F000, 1526, true)],
            &[(RXBUF, 1526, true), (RXBUF, 0, true)],
            // Too small for the frame.
            &[(RXBUF, 100, true)],
        ];
        for (k, bufs) in bad.iter().enumerate() {
            peer_send(&peer, 0, &frame(200, k as u8));
            let h = r.rx.chain(bufs);
            r.rx.submit(h);
            assert_eq!(r.w.process_rx(), RxStop::Drained, "case {k}");
            assert_eq!(r.rx.used(k as u16), (u32::from(h), 0), "case {k}");
        }
        // Good one afterwards.
        peer_send(&peer, 0, &frame(200, 99));
        let h = r.rx.chain(&[(RXBUF, 1526, true)]);
        r.rx.submit(h);
        assert_eq!(r.w.process_rx(), RxStop::Drained);
        assert_eq!(r.rx.used(4), (u32::from(h), 212));
        assert!(!r.irq.needs_reset());
        // Bad head: the queue is given up on.
        peer_send(&peer, 0, &frame(200, 100));
        r.rx.submit(QSIZE + 5);
        assert_eq!(r.w.process_rx(), RxStop::Dead);
        assert!(r.irq.needs_reset());
        assert_eq!(r.rx.used_idx(), 5);
    }

    /// A backend that is always readable and always fails.
    struct Broken {
        fd: vmm_sys_util::eventfd::EventFd,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl AsRawFd for Broken {
        fn as_raw_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
    }

    impl NetBackend for Broken {
        fn recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(io::Error::from_raw_os_error(libc::EIO))
        }

        fn send(&self, _frame: &[u8]) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
    }

    #[test]
    fn failing_backend_is_no_longer_polled() {
        let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        fd.write(1).expect("readable");
        let p = params(Broken {
            fd,
            reads: Default::default(),
        });
        let mut n = Net::new(p).expect("net");
        let mem = memory();
        let rx = Driver::new(&mem, RXQ, QSIZE);
        let mut tx = Driver::new(&mem, TXQ, QSIZE);
        let (t, irq) = test_irq();
        let qtx = tx.active(TX_QUEUE);
        let ktx = qtx.kick.try_clone().expect("kick");
        n.activate(Activation {
            mem: mem.clone(),
            features: n.features(),
            queues: vec![rx.active(RX_QUEUE), qtx],
            interrupt: irq,
        })
        .expect("activate");
        let reads = || n.backend().reads.load(std::sync::atomic::Ordering::SeqCst);
        assert!(wait_for(|| reads() == 1));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(reads(), 1, "a dead backend must not be polled");
        // Transmit still completes chains (frames dropped).
        let h = tx.chain(&[(BUF, 12, false), (BUF + 12, 60, false)]);
        tx.submit(h);
        ktx.write(1).expect("kick");
        assert!(tx.wait_used(1));
        assert!(!t.needs_reset());
        n.reset();
        assert!(!n.running());
    }

    #[test]
    fn activation_needs_both_queues() {
        let (mut n, _peer) = net();
        let mem = memory();
        let d = Driver::new(&mem, RXQ, QSIZE);
        let (_t, irq) = test_irq();
        let res = n.activate(Activation {
            mem: mem.clone(),
            features: n.features(),
            queues: vec![d.active(RX_QUEUE)],
            interrupt: irq,
        });
        assert!(matches!(res, Err(ActivateError::BadQueues(_))));
        assert!(!n.running());
    }

    #[test]
    fn threaded_rx_tx_reset() {
        let (mut n, peer) = net();
        let mem = memory();
        for round in 0..2u64 {
            let mut rx = Driver::new(&mem, RXQ + round * 0x4000, QSIZE);
            let mut tx = Driver::new(&mem, TXQ + round * 0x4000, QSIZE);
            let (t, irq) = test_irq();
            let (qrx, qtx) = (rx.active(RX_QUEUE), tx.active(TX_QUEUE));
            let (krx, ktx) = (
                qrx.kick.try_clone().expect("kick"),
                qtx.kick.try_clone().expect("kick"),
            );
            n.activate(Activation {
                mem: mem.clone(),
                features: n.features(),
                queues: vec![qrx, qtx],
                interrupt: irq,
            })
            .expect("activate");
            assert!(n.running());

            // A frame arrives before any buffer: held until the guest kicks.
            let f = frame(300, round as u8);
            peer_send(&peer, 0, &f);
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(rx.used_idx(), 0);
            let h = rx.chain(&[(RXBUF, 1526, true)]);
            rx.submit(h);
            krx.write(1).expect("kick");
            assert!(rx.wait_used(1), "rx used ring did not advance");
            assert_eq!(rx.used(0), (u32::from(h), 312));
            assert!(wait_for(|| t.signals(RX_QUEUE) == 1));

            // Polling resumed: the next frame goes straight in.
            let h = rx.chain(&[(RXBUF, 1526, true)]);
            rx.submit(h);
            krx.write(1).expect("kick");
            peer_send(&peer, 0, &f);
            assert!(rx.wait_used(2), "second frame");

            // Transmit.
            mem.write_slice(&f, GuestAddress(BUF + 12)).expect("frame");
            let h = tx.chain(&[(BUF, 12, false), (BUF + 12, 300, false)]);
            tx.submit(h);
            ktx.write(1).expect("kick");
            assert!(tx.wait_used(1), "tx used ring did not advance");
            let mut got = None;
            assert!(wait_for(|| {
                got = peer_recv(&peer);
                got.is_some()
            }));
            assert_eq!(got.map(|g| g[12..].to_vec()), Some(f));

            n.reset();
            assert!(!n.running());
            assert_eq!(Arc::strong_count(&n.backend), 1);
        }
    }

    /// Prepared paused (as a restore does), the device does not even
    /// poll the backend; a frame waiting there is delivered on resume, and
    /// a frame held for lack of buffers survives a pause.
    #[test]
    fn paused_activation_and_resume() {
        let (mut n, peer) = net();
        let mem = memory();
        let mut rx = Driver::new(&mem, RXQ, QSIZE);
        let tx = Driver::new(&mem, TXQ, QSIZE);
        let (t, irq) = test_irq();
        let h = rx.chain(&[(RXBUF, 1526, true)]);
        rx.submit(h);
        let f = frame(200, 7);
        peer_send(&peer, 0, &f);
        n.activate_paused(Activation {
            mem: mem.clone(),
            features: n.features(),
            queues: vec![rx.active(RX_QUEUE), tx.active(TX_QUEUE)],
            interrupt: irq,
        })
        .expect("activate paused");
        assert!(!n.running());
        let p = n.pause();
        assert_eq!(p.len(), 2, "both queues reported");
        assert!(p.iter().all(|q| q.next_avail == 0 && q.next_used == 0));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(rx.used_idx(), 0, "nothing received while paused");
        assert_eq!(t.signals(RX_QUEUE), 0);
        n.resume().expect("resume");
        assert!(n.running());
        assert!(rx.wait_used(1), "frame delivered after resume");
        assert_eq!(rx.used(0), (u32::from(h), 212));
        assert!(wait_for(|| t.signals(RX_QUEUE) == 1));

        // No buffer: the next frame is held by the device, across a pause.
        peer_send(&peer, 0, &f);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let p = n.pause();
        let rxp = p.iter().find(|q| q.index == RX_QUEUE).expect("rx");
        assert_eq!((rxp.next_avail, rxp.next_used), (1, 1));
        let h = rx.chain(&[(RXBUF, 1526, true)]);
        rx.submit(h);
        n.resume().expect("resume");
        assert!(rx.wait_used(2), "held frame delivered");
        n.reset();
        assert!(n.worker.is_empty());
        assert!(n.pause().is_empty(), "reset dropped everything");
    }

    #[test]
    fn only_taps_are_taps() {
        let (a, _b) = UnixDatagram::pair().expect("pair");
        assert!(!is_tap(a.as_raw_fd()));
        assert!(!is_tap(-1));
    }

    #[test]
    fn tap_open_checks_names() {
        for name in ["", "0123456789abcdef", "a\0b"] {
            let e = Tap::open(name).expect_err("bad name");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        }
        // A socket is not a tap.
        let (a, _b) = UnixDatagram::pair().expect("socketpair");
        assert!(Tap::from_fd(OwnedFd::from(a)).is_err());
    }

    #[test]
    fn tap_open_if_permitted() {
        // Needs /dev/net/tun and CAP_NET_ADMIN; skipped otherwise.
        let tap = match Tap::open("abidetest0") {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tap test skipped: {e}");
                return;
            }
        };
        assert_eq!(tap.name().expect("name"), "abidetest0");
        // The same tap handed over as a descriptor.
        let dup = tap.file.try_clone().expect("dup");
        let tap2 = Tap::from_fd(OwnedFd::from(dup)).expect("from_fd");
        assert_eq!(tap2.name().expect("name"), "abidetest0");
        let mut b = [0u8; 64];
        // Nothing queued on a down interface.
        assert_eq!(
            tap.recv(&mut b).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock)
        );
    }
}

/// A backend with no host side, for describing a card without running it
/// (`abide manifest`): sent frames are dropped and nothing ever arrives.
#[derive(Debug)]
pub struct Detached {
    never_readable: vmm_sys_util::eventfd::EventFd,
}

impl Detached {
    /// A detached backend.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            never_readable: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }
}

impl AsRawFd for Detached {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.never_readable.as_raw_fd()
    }
}

impl NetBackend for Detached {
    fn recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn send(&self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }
}
