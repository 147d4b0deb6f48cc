//! virtio-blk (virtio 1.x, section 5.2): a raw image file behind one or
//! more request queues.
//!
//! Requests are IN (read), OUT (write), FLUSH (`fdatasync`) and GET_ID.
//! Every request is checked before any I/O: a 16-byte device-readable
//! header first, data buffers in the direction of the request, a
//! device-writable status byte last, and a sector range inside the image.
//! A request that breaks a rule is completed with `VIRTIO_BLK_S_IOERR`
//! (`S_UNSUPP` for unknown types); one whose status byte cannot be
//! written, or whose chain does not end, cannot be completed at all and
//! puts the device into DEVICE_NEEDS_RESET.
//!
//! I/O is positional (`pread`/`pwrite`), straight between the file and
//! guest memory through vm-memory slices. With `direct` (the VMM opened the
//! image with `O_DIRECT`) it goes through an aligned bounce buffer instead,
//! as guest buffers need not be aligned.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestMemoryBackend, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile,
};

use super::worker::{
    collect_chain, take_queues, total_len, Handler, SegCursor, Segment, Unusable, WorkerQueue,
    WorkerSlot,
};
use super::{
    check_config_len, check_features, check_queues, device_type, read_config_bytes, ActivateError,
    Activation, ModelError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use abide_machines::{BlkConfig, VirtioModel};

use crate::GuestMem;
pub use abide_machines::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// The features this model implements. `RO` is offered exactly when the
/// disk is read-only (never by a machine type); the others exactly when
/// the machine declares them.
pub const BLOCK_SUPPORTED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_BLK_F_SEG_MAX
    | VIRTIO_BLK_F_BLK_SIZE
    | VIRTIO_BLK_F_FLUSH
    | VIRTIO_BLK_F_MQ
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX;

/// The device's name in messages.
const DEVICE: &str = "virtio-blk";

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device identification string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status: I/O error (also: malformed request).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status: unsupported request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The protocol's sector size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID string.
pub const ID_LEN: usize = 20;
/// Size of the configuration space this model implements (through the
/// `write_zeroes_may_unmap` field of `struct virtio_blk_config`); a machine
/// exposes a prefix of it.
pub const CONFIG_LEN: usize = 0x3c;
/// Where the fields a feature makes valid end: `seg_max`, `blk_size`,
/// `num_queues`.
const CONFIG_FIELDS: &[(u64, usize)] = &[
    (VIRTIO_BLK_F_SEG_MAX, 0x10),
    (VIRTIO_BLK_F_BLK_SIZE, 0x18),
    (VIRTIO_BLK_F_MQ, 0x24),
];

/// Request header size.
const HEADER_LEN: u32 = 16;
/// Most bytes per `pread`/`pwrite`.
const CHUNK: usize = 1 << 20;
/// Bounce buffer size for `direct`.
const BOUNCE_LEN: usize = 256 << 10;
/// Bounce buffer alignment for `direct`.
const BOUNCE_ALIGN: usize = 4096;
/// Requests handled per wakeup before the worker looks at other events.
const BUDGET: usize = 256;

/// Everything the VMM decides about a virtio-blk device: the disk, and
/// the machine's virtio-blk model.
#[derive(Debug)]
pub struct BlockParams {
    /// The raw image. Its size, rounded down to sectors, is the capacity.
    pub file: File,
    /// Refuse writes and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// GET_ID string, at most 20 bytes.
    pub serial: Option<String>,
    /// The file was opened with `O_DIRECT`: use aligned bounce buffers.
    pub direct: bool,
    /// Queues, features, configuration length (the machine's).
    pub model: VirtioModel,
    /// `blk_size` and `seg_max` (the machine's).
    pub config: BlkConfig,
}

impl BlockParams {
    /// A writable disk without serial, buffered I/O, as `model` describes.
    pub fn new(file: File, model: &VirtioModel, config: BlkConfig) -> Self {
        Self {
            file,
            read_only: false,
            serial: None,
            direct: false,
            model: model.clone(),
            config,
        }
    }
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image size could not be read.
    #[error("cannot read the image size")]
    Metadata(#[source] io::Error),
    /// Serial longer than 20 bytes.
    #[error("serial is {0} bytes; at most 20 are allowed")]
    Serial(usize),
    /// The machine declares something this model cannot implement.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Checks the machine's virtio-blk model and returns the features to offer
/// (before `RO`).
fn checked_features(m: &VirtioModel, c: &BlkConfig) -> Result<u64, ModelError> {
    check_features(
        DEVICE,
        device_type::BLOCK,
        m.features & !VIRTIO_BLK_F_RO,
        BLOCK_SUPPORTED_FEATURES,
    )?;
    if m.features & VIRTIO_BLK_F_RO != 0 {
        return Err(ModelError::value(
            DEVICE,
            "features",
            "VIRTIO_BLK_F_RO",
            "read-only is a disk's property (readonly=on), not the machine type's",
        ));
    }
    check_queues(DEVICE, m.num_queues, 1..=u16::MAX, m.queue_size, 4)?;
    check_config_len(DEVICE, m.config_len, CONFIG_LEN, m.features, CONFIG_FIELDS)?;
    if c.seg_max == 0 || c.seg_max > u32::from(m.queue_size) - 2 {
        return Err(ModelError::value(
            DEVICE,
            "seg_max",
            c.seg_max,
            format!(
                "requests of up to the queue size ({}) less the header and status descriptors",
                m.queue_size
            ),
        ));
    }
    if !c.blk_size.is_power_of_two() || !(512..=4096).contains(&c.blk_size) {
        return Err(ModelError::value(
            DEVICE,
            "blk_size",
            c.blk_size,
            "a power of two from 512 to 4096",
        ));
    }
    Ok(m.features)
}

/// The image and its fixed properties, shared with the worker.
#[derive(Debug)]
struct Disk {
    file: File,
    /// In sectors.
    capacity: u64,
    read_only: bool,
    direct: bool,
    id: [u8; ID_LEN],
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<Disk>,
    features: u64,
    num_queues: u16,
    queue_size: u16,
    config: Vec<u8>,
    worker: WorkerSlot<BlockWorker>,
}

impl Block {
    /// Creates the device.
    pub fn new(p: BlockParams) -> Result<Self, BlockError> {
        let len = p.file.metadata().map_err(BlockError::Metadata)?.len();
        let serial = p.serial.unwrap_or_default();
        if serial.len() > ID_LEN {
            return Err(BlockError::Serial(serial.len()));
        }
        let mut features = checked_features(&p.model, &p.config)?;
        let mut id = [0u8; ID_LEN];
        id[..serial.len()].copy_from_slice(serial.as_bytes());
        let capacity = len / SECTOR_SIZE;
        if p.read_only {
            features |= VIRTIO_BLK_F_RO;
        }

        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // size_max (0x08) is not offered.
        config[0x0c..0x10].copy_from_slice(&p.config.seg_max.to_le_bytes());
        config[0x14..0x18].copy_from_slice(&p.config.blk_size.to_le_bytes());
        config[0x22..0x24].copy_from_slice(&p.model.num_queues.to_le_bytes());
        let config = config[..p.model.config_len as usize].to_vec();

        Ok(Self {
            disk: Arc::new(Disk {
                file: p.file,
                capacity,
                read_only: p.read_only,
                direct: p.direct,
                id,
            }),
            features,
            num_queues: p.model.num_queues,
            queue_size: p.model.queue_size,
            config,
            worker: WorkerSlot::new(DEVICE),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    fn worker_for(&self, a: Activation) -> Result<BlockWorker, ActivateError> {
        let event_idx = a.features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = take_queues(a.queues, usize::from(self.num_queues), event_idx)?;
        if queues.is_empty() {
            return Err(ActivateError::BadQueues("no queue enabled".into()));
        }
        Ok(BlockWorker {
            io: BlockIo {
                disk: self.disk.clone(),
                mem: a.mem,
                bounce: self.disk.direct.then(Bounce::new),
                metrics: a.interrupt.metrics(),
            },
            queues,
            irq: a.interrupt,
        })
    }

    /// Whether a worker thread is running (for tests).
    #[cfg(test)]
    fn running(&self) -> bool {
        self.worker.running()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.num_queues)]
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
        // Nothing is writable without VIRTIO_BLK_F_CONFIG_WCE, so the
        // device has no guest-writable state beyond the transport's: a
        // snapshot needs nothing from it. (Requests are never left
        // half-done by a pause; the image itself is the VMM's to keep.)
    }

    super::worker::worker_lifecycle!();
}

/// An aligned scratch buffer for `O_DIRECT` I/O.
#[derive(Debug)]
struct Bounce {
    raw: Vec<u8>,
    start: usize,
}

impl Bounce {
    fn new() -> Self {
        let raw = vec![0u8; BOUNCE_LEN + BOUNCE_ALIGN];
        let start = raw.as_ptr().align_offset(BOUNCE_ALIGN);
        // `align_offset` may give up (usize::MAX); then the kernel will
        // refuse the I/O with EINVAL, which the guest sees as IOERR.
        let start = if start < BOUNCE_ALIGN { start } else { 0 };
        Self { raw, start }
    }

    fn buf(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len]
    }
}

/// Positional I/O on a file as a vm-memory reader/writer: each call is one
/// `pread`/`pwrite` at `offset`, which then advances.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn off(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from_raw_os_error(libc::EINVAL)))
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let off = self.off()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the descriptor is valid while `self.file` is borrowed;
        // `guard` keeps `guard.len()` bytes of guest memory mapped and
        // writable at `guard.as_ptr()` (vm-memory checked the range when it
        // made the slice), and pread writes at most that many bytes.
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                guard.len(),
                off,
            )
        };
        if n < 0 {
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        let n = n as usize;
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let off = self.off()?;
        let guard = buf.ptr_guard();
        // SAFETY: the descriptor is valid while `self.file` is borrowed;
        // `guard` keeps `guard.len()` bytes of guest memory mapped at
        // `guard.as_ptr()`, and pwrite only reads them.
        let n = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                guard.len(),
                off,
            )
        };
        if n < 0 {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        let n = n as usize;
        self.offset += n as u64;
        Ok(n)
    }
}

fn vm_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

/// Request execution against the image.
#[derive(Debug)]
struct BlockIo {
    disk: Arc<Disk>,
    mem: GuestMem,
    bounce: Option<Bounce>,
    metrics: Arc<super::metrics::DeviceMetrics>,
}

impl BlockIo {
    /// Handles one chain; returns the bytes written into it.
    fn handle(&mut self, chain: DescriptorChain<&GuestMem>, max: usize) -> Result<u32, Unusable> {
        let segs = collect_chain(chain, max)?;
        let (status, rest) = segs.split_last().ok_or(Unusable)?;
        if !status.usable(&self.mem, true) {
            return Err(Unusable);
        }
        let (code, written) = match self.execute(rest) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(code) => {
                self.metrics.error();
                (code, 0)
            }
        };
        self.mem
            .write_obj(code, status.addr)
            .map_err(|_| Unusable)?;
        Ok(written + 1)
    }

    /// Runs a request (header and data segments); returns the data bytes
    /// written to the guest or the error status.
    fn execute(&mut self, segs: &[Segment]) -> Result<u32, u8> {
        const IOERR: u8 = VIRTIO_BLK_S_IOERR;
        let (hdr, data) = segs.split_first().ok_or(IOERR)?;
        if hdr.writable || hdr.len != HEADER_LEN {
            return Err(IOERR);
        }
        let raw: [u8; 16] = self.mem.read_obj(hdr.addr).map_err(|_| IOERR)?;
        let mut t = [0u8; 4];
        t.copy_from_slice(&raw[0..4]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&raw[8..16]);
        let (typ, sector) = (u32::from_le_bytes(t), u64::from_le_bytes(s));

        let want_writable = match typ {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => true,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_FLUSH => false,
            _ => return Err(VIRTIO_BLK_S_UNSUPP),
        };
        if data.iter().any(|d| !d.usable(&self.mem, want_writable)) {
            return Err(IOERR);
        }
        let total = total_len(data);
        match typ {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                if typ == VIRTIO_BLK_T_OUT && self.disk.read_only {
                    return Err(IOERR);
                }
                let written = u32::try_from(total).map_err(|_| IOERR)?;
                if !total.is_multiple_of(SECTOR_SIZE) {
                    return Err(IOERR);
                }
                let end = sector.checked_add(total / SECTOR_SIZE).ok_or(IOERR)?;
                if end > self.disk.capacity {
                    return Err(IOERR);
                }
                let offset = sector * SECTOR_SIZE;
                if typ == VIRTIO_BLK_T_IN {
                    self.read(data, offset).map_err(|_| IOERR)?;
                    Ok(written)
                } else {
                    self.write(data, offset).map_err(|_| IOERR)?;
                    self.metrics.took(total);
                    Ok(0)
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if !data.is_empty() {
                    return Err(IOERR);
                }
                self.disk.file.sync_data().map_err(|_| IOERR)?;
                Ok(0)
            }
            _ => {
                let n = (total as usize).min(ID_LEN);
                let done = SegCursor::new(data)
                    .write_from(&self.mem, &self.disk.id[..n])
                    .map_err(|_| IOERR)?;
                Ok(done as u32)
            }
        }
    }

    /// Reads the image at `offset` into the segments.
    fn read(&mut self, segs: &[Segment], offset: u64) -> io::Result<()> {
        let file = &self.disk.file;
        if let Some(bounce) = &mut self.bounce {
            let total = total_len(segs);
            let mut cursor = SegCursor::new(segs);
            let mut done = 0u64;
            while done < total {
                let n = (total - done).min(BOUNCE_LEN as u64) as usize;
                let buf = bounce.buf(n);
                file.read_exact_at(buf, offset + done)?;
                if cursor.write_from(&self.mem, buf).map_err(vm_err)? != n {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                done += n as u64;
            }
            return Ok(());
        }
        let mut at = FileAt { file, offset };
        for s in segs {
            for slice in GuestMemoryBackend::get_slices(&self.mem, s.addr, s.len as usize) {
                let slice = slice.map_err(vm_err)?;
                let mut pos = 0;
                while pos < slice.len() {
                    let n = (slice.len() - pos).min(CHUNK);
                    let mut sub = slice.subslice(pos, n).map_err(vm_err)?;
                    at.read_exact_volatile(&mut sub).map_err(vm_err)?;
                    pos += n;
                }
            }
        }
        Ok(())
    }

    /// Writes the segments to the image at `offset`.
    fn write(&mut self, segs: &[Segment], offset: u64) -> io::Result<()> {
        let file = &self.disk.file;
        if let Some(bounce) = &mut self.bounce {
            let total = total_len(segs);
            let mut cursor = SegCursor::new(segs);
            let mut done = 0u64;
            while done < total {
                let n = (total - done).min(BOUNCE_LEN as u64) as usize;
                let buf = bounce.buf(n);
                if cursor.read_into(&self.mem, buf).map_err(vm_err)? != n {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                file.write_all_at(buf, offset + done)?;
                done += n as u64;
            }
            return Ok(());
        }
        let mut at = FileAt { file, offset };
        for s in segs {
            for slice in GuestMemoryBackend::get_slices(&self.mem, s.addr, s.len as usize) {
                let slice = slice.map_err(vm_err)?;
                let mut pos = 0;
                while pos < slice.len() {
                    let n = (slice.len() - pos).min(CHUNK);
                    let sub = slice.subslice(pos, n).map_err(vm_err)?;
                    at.write_all_volatile(&sub).map_err(vm_err)?;
                    pos += n;
                }
            }
        }
        Ok(())
    }
}

/// The block device's worker: its queues and the image.
struct BlockWorker {
    io: BlockIo,
    queues: Vec<WorkerQueue>,
    irq: Arc<dyn VirtioInterrupt>,
}

impl BlockWorker {
    /// Processes the available requests of queue slot `slot`.
    fn process_queue(&mut self, slot: usize) {
        let Some(q) = self.queues.get_mut(slot) else {
            return;
        };
        let io = &mut self.io;
        let mem = io.mem.clone();
        let max = q.max_chain();
        q.drain(&mem, self.irq.as_ref(), BUDGET, |chain| {
            io.handle(chain, max)
        });
    }
}

impl Handler for BlockWorker {
    fn init(&mut self, ops: &mut EventOps) -> Result<(), event_manager::Error> {
        for (slot, q) in self.queues.iter().enumerate() {
            ops.add(Events::with_data(&q.kick, slot as u32, EventSet::IN))?;
        }
        Ok(())
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let slot = events.data() as usize;
        if let Some(q) = self.queues.get(slot) {
            let _ = q.kick.read();
        }
        self.process_queue(slot);
    }

    fn failed(&mut self) {
        self.irq.set_needs_reset();
    }

    fn queues(&self) -> Vec<&WorkerQueue> {
        self.queues.iter().collect()
    }
}

/// For the fuzz targets (feature `fuzzing`): runs one chain against a
/// disk image in `file` (read-write, `sectors` long), as the worker does.
#[cfg(feature = "fuzzing")]
pub(super) fn fuzz_chain(
    mem: &GuestMem,
    file: File,
    sectors: u64,
    chain: DescriptorChain<&GuestMem>,
    max: usize,
) -> Result<u32, Unusable> {
    let mut io = BlockIo {
        disk: Arc::new(Disk {
            file,
            capacity: sectors,
            read_only: false,
            direct: false,
            id: [0; ID_LEN],
        }),
        mem: mem.clone(),
        bounce: None,
        metrics: Arc::new(super::metrics::DeviceMetrics::default()),
    };
    io.handle(chain, max)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Address, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    use super::super::pci::testutil::{
        enable_msix, enable_queue, layout, negotiate, r as pci_r, transport, w as pci_w,
    };
    use super::super::pci::VirtioPci;
    use super::super::worker::testutil::*;
    use super::super::worker::{test_irq, TestInterrupt};
    use super::*;
    use crate::pci::msix::{MsiMessage, Recorder};
    use crate::pci::PciFunction;
    use crate::persist::Persist;

    const QSIZE: u16 = 16;
    const QBASE: u64 = 0x1000;
    const HDR: u64 = 0x8000;
    const STATUS: u64 = 0x9000;
    const BUF: u64 = 0x10_0000;
    const BUF2: u64 = 0x20_0000;
    const OOB: u64 = 0xFFF_FFFF_F000;
    const SECTORS: u64 = 64;
    /// A status value the device never writes.
    const NO_STATUS: u8 = 0xee;

    struct Rig {
        _tmp: TempFile,
        file: File,
        block: Block,
    }

    /// pc-1.0's virtio-blk with queues of `QSIZE`.
    fn params(file: File) -> BlockParams {
        let m = abide_machines::pc_1_0();
        let mut p = BlockParams::new(file, &m.virtio.blk, m.virtio.blk_config);
        p.model.queue_size = QSIZE;
        p.config.seg_max = u32::from(QSIZE) - 2;
        p
    }

    fn rig(read_only: bool, direct: bool) -> Rig {
        let tmp = TempFile::new().expect("tempfile");
        let file = tmp.as_file().try_clone().expect("clone");
        file.set_len(SECTORS * SECTOR_SIZE).expect("set_len");
        let mut p = params(tmp.as_file().try_clone().expect("clone"));
        p.read_only = read_only;
        p.direct = direct;
        p.serial = Some("abide-serial".into());
        Rig {
            _tmp: tmp,
            file,
            block: Block::new(p).expect("block"),
        }
    }

    fn worker(b: &Block, mem: &GuestMem, d: &Driver) -> (BlockWorker, Arc<TestInterrupt>) {
        let (t, irq) = test_irq();
        let w = b
            .worker_for(Activation {
                mem: mem.clone(),
                features: b.features(),
                queues: vec![d.active(0)],
                interrupt: irq,
            })
            .expect("worker");
        (w, t)
    }

    fn header(mem: &GuestMem, typ: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&typ.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).expect("header");
        mem.write_obj(NO_STATUS, GuestAddress(STATUS))
            .expect("status");
    }

    fn status(mem: &GuestMem) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).expect("status")
    }

    /// Submits a request and runs the queue; returns (status, used len).
    fn request(
        w: &mut BlockWorker,
        d: &mut Driver,
        typ: u32,
        sector: u64,
        data: &[(u64, u32, bool)],
    ) -> (u8, u32) {
        header(d.mem, typ, sector);
        let mut bufs = vec![(HDR, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((STATUS, 1, true));
        let head = d.chain(&bufs);
        d.submit(head);
        let before = d.used_idx();
        w.process_queue(0);
        assert_eq!(
            d.used_idx(),
            before.wrapping_add(1),
            "request not completed"
        );
        let (id, len) = d.used(before);
        assert_eq!(id, u32::from(head));
        (status(d.mem), len)
    }

    fn good_read(w: &mut BlockWorker, d: &mut Driver) {
        let (s, len) = request(w, d, VIRTIO_BLK_T_IN, 0, &[(BUF2, 512, true)]);
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 513));
    }

    #[test]
    fn config_and_features() {
        let r = rig(false, false);
        let b = &r.block;
        assert_eq!(b.device_type(), device_type::BLOCK);
        assert_eq!(b.queue_max_sizes(), vec![QSIZE]);
        let f = b.features();
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & VIRTIO_BLK_F_SEG_MAX, 0);
        assert_ne!(f & VIRTIO_BLK_F_BLK_SIZE, 0);
        assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
        assert_eq!(
            f & (VIRTIO_BLK_F_RO | VIRTIO_BLK_F_MQ | VIRTIO_RING_F_EVENT_IDX),
            0
        );
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), SECTORS);
        let mut c = [0u8; 4];
        b.read_config(0x0c, &mut c);
        assert_eq!(u32::from_le_bytes(c), u32::from(QSIZE - 2));
        b.read_config(0x14, &mut c);
        assert_eq!(u32::from_le_bytes(c), 512);
        let mut c = [0u8; 2];
        b.read_config(0x22, &mut c);
        assert_eq!(u16::from_le_bytes(c), 1);
        // Past the end reads as zero.
        let mut c = [0xffu8; 4];
        b.read_config(CONFIG_LEN as u64, &mut c);
        assert_eq!(c, [0; 4]);
    }

    #[test]
    fn multiqueue_and_read_only() {
        let tmp = TempFile::new().expect("tempfile");
        let m = abide_machines::pc_2_0();
        let mut p = BlockParams::new(
            tmp.as_file().try_clone().expect("clone"),
            &m.virtio.blk,
            m.virtio.blk_config,
        );
        p.read_only = true;
        let b = Block::new(p).expect("block");
        // Exactly the declared features, plus RO for this disk.
        assert_eq!(b.features(), m.virtio.blk.features | VIRTIO_BLK_F_RO);
        assert_eq!(b.queue_max_sizes(), vec![1024; 4]);
        let mut c = [0u8; 4];
        b.read_config(0x22, &mut c[..2]);
        assert_eq!(u16::from_le_bytes([c[0], c[1]]), 4);
        b.read_config(0x0c, &mut c);
        assert_eq!(u32::from_le_bytes(c), 1022);

        let mut p = params(tmp.as_file().try_clone().expect("clone"));
        p.serial = Some("x".repeat(21));
        assert!(matches!(Block::new(p), Err(BlockError::Serial(21))));
    }

    /// Builds a device from pc-1.0's model edited by `edit`; returns the
    /// refusal's message.
    fn refusal(edit: impl FnOnce(&mut BlockParams)) -> String {
        let tmp = TempFile::new().expect("tempfile");
        let mut p = params(tmp.as_file().try_clone().expect("clone"));
        edit(&mut p);
        match Block::new(p) {
            Err(BlockError::Model(e)) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn undeclarable_values_are_refused() {
        let e = refusal(|p| p.model.features |= 1 << 13);
        assert!(
            e.contains("virtio-blk") && e.contains("VIRTIO_BLK_F_DISCARD (bit 13)"),
            "{e}"
        );
        let e = refusal(|p| p.model.features &= !VIRTIO_F_VERSION_1);
        assert!(e.contains("VIRTIO_F_VERSION_1"), "{e}");
        let e = refusal(|p| p.model.features |= VIRTIO_BLK_F_RO);
        assert!(e.contains("readonly=on"), "{e}");
        let e = refusal(|p| p.model.num_queues = 0);
        assert!(e.contains("num_queues = 0"), "{e}");
        let e = refusal(|p| p.model.queue_size = 100);
        assert!(e.contains("queue_size = 100"), "{e}");
        let e = refusal(|p| p.config.seg_max = u32::from(QSIZE));
        assert!(e.contains("seg_max = 16"), "{e}");
        let e = refusal(|p| p.config.blk_size = 1000);
        assert!(e.contains("blk_size = 1000"), "{e}");
        let e = refusal(|p| p.model.config_len = 0x40);
        assert!(e.contains("config_len = 64"), "{e}");
        // MQ makes num_queues (0x22..0x24) valid: it must be exposed.
        let e = refusal(|p| {
            p.model.features |= VIRTIO_BLK_F_MQ;
            p.model.config_len = 0x20;
        });
        assert!(e.contains("config_len = 32"), "{e}");
    }

    #[test]
    fn config_is_cut_to_the_declared_length() {
        let tmp = TempFile::new().expect("tempfile");
        tmp.as_file().set_len(SECTORS * SECTOR_SIZE).expect("len");
        let mut p = params(tmp.as_file().try_clone().expect("clone"));
        p.model.features = VIRTIO_F_VERSION_1;
        p.model.config_len = 8;
        let b = Block::new(p).expect("block");
        assert_eq!(b.config_len(), 8);
        let mut c = [0xffu8; 16];
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c[..8].try_into().expect("8")), SECTORS);
        assert_eq!(c[8..], [0; 8]);
    }

    /// Dirty bits of guest memory's single region, as page numbers.
    fn dirty_pages(mem: &GuestMem) -> Vec<u64> {
        use vm_memory::GuestMemoryBackend;
        let region = mem.iter().next().expect("region");
        let bits = std::ops::Deref::deref(region).bitmap().get_and_reset();
        let mut pages = Vec::new();
        for (i, w) in bits.iter().enumerate() {
            for b in 0..64 {
                if w & (1 << b) != 0 {
                    pages.push(i as u64 * 64 + b);
                }
            }
        }
        pages
    }

    /// Live migration depends on it: every byte the device writes into
    /// guest memory from its own thread (read data, status, used ring) is
    /// marked in guest memory's dirty bitmap, which KVM's log never sees.
    #[test]
    fn device_writes_to_guest_memory_are_marked_dirty() {
        for direct in [false, true] {
            let r = rig(false, direct);
            let mem = memory();
            let mut d = Driver::new(&mem, QBASE, QSIZE);
            let (mut w, _irq) = worker(&r.block, &mem, &d);
            header(&mem, VIRTIO_BLK_T_IN, 0);
            dirty_pages(&mem); // forget the test's own setup writes
            let (s, _) = request(
                &mut w,
                &mut d,
                VIRTIO_BLK_T_IN,
                0,
                &[(BUF2, 512, true), (BUF2 + 0x3000, 512, true)],
            );
            assert_eq!(s, VIRTIO_BLK_S_OK);
            let pages = dirty_pages(&mem);
            // The test wrote the header again (request() does); the device
            // wrote both data buffers, the status byte and the used ring.
            for (what, addr) in [
                ("data", BUF2),
                ("second data buffer", BUF2 + 0x3000),
                ("status", STATUS),
                ("used ring", d.used_addr().raw_value()),
            ] {
                assert!(
                    pages.contains(&(addr / 4096)),
                    "direct={direct}: the {what} page {:#x} is not marked dirty: {pages:x?}",
                    addr / 4096
                );
            }
            // Pages nobody wrote stay clean.
            assert!(!pages.contains(&((BUF2 + 0x1000) / 4096)), "{pages:x?}");
        }
    }

    fn round_trip(direct: bool) {
        let r = rig(false, direct);
        let mem = memory();
        let mut d = Driver::new(&mem, QBASE, QSIZE);
        let (mut w, irq) = worker(&r.block, &mem, &d);

        // Write 3 sectors at sector 5 from unevenly split buffers.
        let pattern: Vec<u8> = (0..1536u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&pattern[..100], GuestAddress(BUF))
            .expect("fill");
        mem.write_slice(&pattern[100..], GuestAddress(BUF + 0x1000))
            .expect("fill");
        let (s, len) = request(
            &mut w,
            &mut d,
            VIRTIO_BLK_T_OUT,
            5,
            &[(BUF, 100, false), (BUF + 0x1000, 1436, false)],
        );
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1));
        let mut on_disk = vec![0u8; 1536];
        r.file
            .read_exact_at(&mut on_disk, 5 * 512)
            .expect("read back");
        assert_eq!(on_disk, pattern);

        // Read them back into other, differently split buffers.
        let (s, len) = request(
            &mut w,
            &mut d,
            VIRTIO_BLK_T_IN,
            5,
            &[(BUF2, 1000, true), (BUF2 + 0x1000, 536, true)],
        );
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1537));
        let mut got = vec![0u8; 1536];
        mem.read_slice(&mut got[..1000], GuestAddress(BUF2))
            .expect("read");
        mem.read_slice(&mut got[1000..], GuestAddress(BUF2 + 0x1000))
            .expect("read");
        assert_eq!(got, pattern);

        // Flush.
        let (s, len) = request(&mut w, &mut d, VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1));

        // GET_ID.
        let (s, len) = request(&mut w, &mut d, VIRTIO_BLK_T_GET_ID, 0, &[(BUF2, 20, true)]);
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(BUF2)).expect("id");
        assert_eq!(&id[..12], b"abide-serial");
        assert_eq!(&id[12..], &[0u8; 8]);

        // The last sector is in range; a request ending past it is not.
        let (s, _) = request(
            &mut w,
            &mut d,
            VIRTIO_BLK_T_IN,
            SECTORS - 1,
            &[(BUF2, 512, true)],
        );
        assert_eq!(s, VIRTIO_BLK_S_OK);
        assert_eq!(irq.signals(0), 5);
        assert!(!irq.needs_reset());
    }

    #[test]
    fn read_write_flush_get_id() {
        round_trip(false);
    }

    #[test]
    fn read_write_through_bounce_buffer() {
        // `direct` without O_DIRECT on the file still takes the bounce path.
        round_trip(true);
    }

    #[test]
    fn large_request_spans_bounce_chunks() {
        let tmp = TempFile::new().expect("tempfile");
        let file = tmp.as_file().try_clone().expect("clone");
        file.set_len(4 << 20).expect("set_len");
        let pattern: Vec<u8> = (0..(600 << 10) as u32).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&pattern, 4096).expect("fill");
        let mut p = params(file);
        p.direct = true;
        let b = Block::new(p).expect("block");
        let mem = memory();
        let mut d = Driver::new(&mem, QBASE, QSIZE);
        let (mut w, _irq) = worker(&b, &mem, &d);
        let (s, len) = request(
            &mut w,
            &mut d,
            VIRTIO_BLK_T_IN,
            8,
            &[(BUF, 600 << 10, true)],
        );
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, (600 << 10) + 1));
        let mut got = vec![0u8; 600 << 10];
        mem.read_slice(&mut got, GuestAddress(BUF)).expect("read");
        assert!(got == pattern);
    }

    #[test]
    fn read_only_refuses_writes() {
        let r = rig(true, false);
        assert_ne!(r.block.features() & VIRTIO_BLK_F_RO, 0);
        let mem = memory();
        let mut d = Driver::new(&mem, QBASE, QSIZE);
        let (mut w, irq) = worker(&r.block, &mem, &d);
        mem.write_slice(&[0xaa; 512], GuestAddress(BUF))
            .expect("fill");
        let (s, len) = request(&mut w, &mut d, VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, false)]);
        assert_eq!((s, len), (VIRTIO_BLK_S_IOERR, 1));
        let mut on_disk = [0u8; 512];
        r.file.read_exact_at(&mut on_disk, 0).expect("read");
        assert_eq!(on_disk, [0u8; 512]);
        // Reads and flushes still work.
        good_read(&mut w, &mut d);
        let (s, _) = request(&mut w, &mut d, VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!(s, VIRTIO_BLK_S_OK);
        assert!(!irq.needs_reset());
    }

    /// Requests the device must complete with an error status; the queue
    /// keeps working afterwards.
    #[test]
    fn malformed_requests_get_an_error_status() {
        let r = rig(false, false);
        let mem = memory();
        let mut d = Driver::new(&mem, QBASE, QSIZE);
        let (mut w, irq) = worker(&r.block, &mem, &d);
        let ioerr = (VIRTIO_BLK_S_IOERR, 1);
        type Case = (&'static str, u32, u64, Vec<(u64, u32, bool)>, (u8, u32));
        let cases: Vec<Case> = vec![
            (
                "data out of RAM",
                VIRTIO_BLK_T_IN,
                0,
                vec![(OOB, 512, true)],
                ioerr,
            ),
            (
                "data straddling the end of RAM",
                VIRTIO_BLK_T_IN,
                0,
                vec![(RAM - 256, 512, true)],
                ioerr,
            ),
            (
                "zero-length data",
                VIRTIO_BLK_T_IN,
                0,
                vec![(BUF, 0, true)],
                ioerr,
            ),
            (
                "zero-length among data",
                VIRTIO_BLK_T_IN,
                0,
                vec![(BUF, 512, true), (BUF, 0, true)],
                ioerr,
            ),
            (
                "read into readable",
                VIRTIO_BLK_T_IN,
                0,
                vec![(BUF, 512, false)],
                ioerr,
            ),
            (
                "write from writable",
                VIRTIO_BLK_T_OUT,
                0,
                vec![(BUF, 512, true)],
                ioerr,
            ),
            (
                "id into readable",
                VIRTIO_BLK_T_GET_ID,
                0,
                vec![(BUF, 20, false)],
                ioerr,
            ),
            (
                "flush with data",
                VIRTIO_BLK_T_FLUSH,
                0,
                vec![(BUF, 512, false)],
                ioerr,
            ),
            (
                "partial sector",
                VIRTIO_BLK_T_IN,
                0,
                vec![(BUF, 100, true)],
                ioerr,
            ),
            (
                "sector at capacity",
                VIRTIO_BLK_T_IN,
                SECTORS,
                vec![(BUF, 512, true)],
                ioerr,
            ),
            (
                "range past capacity",
                VIRTIO_BLK_T_OUT,
                SECTORS - 1,
                vec![(BUF, 1024, false)],
                ioerr,
            ),
            (
                "sector overflow",
                VIRTIO_BLK_T_IN,
                u64::MAX,
                vec![(BUF, 512, true)],
                ioerr,
            ),
            (
                "sector * 512 overflow",
                VIRTIO_BLK_T_IN,
                u64::MAX / 256,
                vec![(BUF, 512, true)],
                ioerr,
            ),
            ("unknown type", 99, 0, vec![], (VIRTIO_BLK_S_UNSUPP, 1)),
            (
                "discard (not offered)",
                11,
                0,
                vec![(BUF, 16, false)],
                (VIRTIO_BLK_S_UNSUPP, 1),
            ),
        ];
        for (name, typ, sector, data, want) in cases {
            assert_eq!(request(&mut w, &mut d, typ, sector, &data), want, "{name}");
            good_read(&mut w, &mut d);
        }

        // Header problems: writable, short, long, outside RAM.
        for (name, hdr) in [
            ("writable header", (HDR, 16, true)),
            ("short header", (HDR, 8, false)),
            ("long header", (HDR, 32, false)),
            ("header out of RAM", (OOB, 16, false)),
        ] {
            header(&mem, VIRTIO_BLK_T_IN, 0);
            let head = d.chain(&[hdr, (BUF, 512, true), (STATUS, 1, true)]);
            d.submit(head);
            let before = d.used_idx();
            w.process_queue(0);
            assert_eq!(d.used_idx(), before.wrapping_add(1), "{name}");
            assert_eq!(d.used(before), (u32::from(head), 1), "{name}");
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR, "{name}");
            good_read(&mut w, &mut d);
        }

        // Only a status byte.
        mem.write_obj(NO_STATUS, GuestAddress(STATUS))
            .expect("status");
        let head = d.chain(&[(STATUS, 1, true)]);
        d.submit(head);
        w.process_queue(0);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        good_read(&mut w, &mut d);
        assert!(!irq.needs_reset());
    }

    /// Submits `head` and runs the queue; checks the device gave up.
    fn expect_needs_reset(r: &Rig, mem: &GuestMem, d: &mut Driver, setup: impl Fn(&Driver) -> u16) {
        let (mut w, irq) = worker(&r.block, mem, d);
        header(mem, VIRTIO_BLK_T_IN, 0);
        let head = setup(d);
        d.submit(head);
        let before = d.used_idx();
        w.process_queue(0);
        assert!(irq.needs_reset());
        assert_eq!(d.used_idx(), before);
        assert_eq!(status(mem), NO_STATUS);
        // The queue stays stopped, even for a good request.
        let head = d.chain(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
        d.submit(head);
        w.process_queue(0);
        assert_eq!(d.used_idx(), before);
        assert_eq!(irq.signals(0), 0);
    }

    /// Requests that cannot be completed: NEEDS_RESET, the queue stops, and
    /// after a reset (a fresh queue and worker) the device works again.
    #[test]
    fn unreportable_requests_need_reset() {
        let r = rig(false, false);
        type Setup = Box<dyn Fn(&Driver) -> u16>;
        let cases: Vec<(&str, Setup)> = vec![
            (
                "status not writable",
                Box::new(|d: &Driver| {
                    d.raw_desc(0, HDR, 16, F_NEXT, 1);
                    d.raw_desc(1, BUF, 512, F_NEXT | F_WRITE, 2);
                    d.raw_desc(2, STATUS, 1, 0, 0);
                    0
                }),
            ),
            (
                "zero-length status",
                Box::new(|d: &Driver| {
                    d.raw_desc(0, HDR, 16, F_NEXT, 1);
                    d.raw_desc(1, STATUS, 0, F_WRITE, 0);
                    0
                }),
            ),
            (
                "status out of RAM",
                Box::new(|d: &Driver| {
                    d.raw_desc(0, HDR, 16, F_NEXT, 1);
                    d.raw_desc(1, OOB, 1, F_WRITE, 0);
                    0
                }),
            ),
            (
                "self loop",
                Box::new(|d: &Driver| {
                    d.raw_desc(0, HDR, 16, F_NEXT, 0);
                    0
                }),
            ),
            (
                "loop back to 1 (longer than the queue)",
                Box::new(|d: &Driver| {
                    d.raw_desc(0, HDR, 16, F_NEXT, 1);
                    for i in 1..QSIZE {
                        let next = if i + 1 < QSIZE { i + 1 } else { 1 };
                        d.raw_desc(i, BUF + 16 * u64::from(i), 16, F_NEXT | F_WRITE, next);
                    }
                    0
                }),
            ),
            (
                "next index past the table",
                Box::new(|d: &Driver| {
                    d.raw_desc(0, HDR, 16, F_NEXT, QSIZE + 3);
                    0
                }),
            ),
            (
                "head index past the table",
                Box::new(|d: &Driver| {
                    d.raw_desc(0, HDR, 16, F_NEXT, 1);
                    d.raw_desc(1, BUF, 512, F_NEXT | F_WRITE, 2);
                    d.raw_desc(2, STATUS, 1, F_WRITE, 0);
                    QSIZE
                }),
            ),
            (
                "indirect table out of RAM",
                Box::new(|d: &Driver| {
                    d.raw_desc(0, OOB, 64, 4, 0);
                    0
                }),
            ),
        ];
        for (name, setup) in cases {
            let mem = memory();
            let mut d = Driver::new(&mem, QBASE, QSIZE);
            expect_needs_reset(&r, &mem, &mut d, setup);
            // Reset: the driver sets the queue up again.
            let mut d = Driver::new(&mem, QBASE + 0x2000, QSIZE);
            let (mut w, irq) = worker(&r.block, &mem, &d);
            good_read(&mut w, &mut d);
            assert!(!irq.needs_reset(), "{name}");
        }
    }

    #[test]
    fn impossible_avail_index_needs_reset() {
        let r = rig(false, false);
        let mem = memory();
        let d = Driver::new(&mem, QBASE, QSIZE);
        let (mut w, irq) = worker(&r.block, &mem, &d);
        mem.write_obj(QSIZE + 1, d.mock.avail_addr().unchecked_add(2))
            .expect("avail idx");
        w.process_queue(0);
        assert!(irq.needs_reset());
        assert_eq!(d.used_idx(), 0);
    }

    #[test]
    fn indirect_chain() {
        let r = rig(false, false);
        let mem = memory();
        let d = Driver::new(&mem, QBASE, QSIZE);
        let (mut w, irq) = worker(&r.block, &mem, &d);
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let table = 0x3000u64;
        let descs = [
            (HDR, 16u32, F_NEXT, 1u16),
            (BUF, 20, F_NEXT | F_WRITE, 2),
            (STATUS, 1, F_WRITE, 0),
        ];
        for (i, (a, l, f, n)) in descs.iter().enumerate() {
            let raw = virtio_queue::desc::RawDescriptor::from(
                virtio_queue::desc::split::Descriptor::new(*a, *l, *f, *n),
            );
            mem.write_obj(raw, GuestAddress(table + 16 * i as u64))
                .expect("indirect");
        }
        d.raw_desc(0, table, 48, 4, 0);
        d.submit(0);
        w.process_queue(0);
        assert_eq!(d.used(0), (0, 21));
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert!(!irq.needs_reset());
    }

    #[test]
    fn budget_bounds_one_wakeup() {
        let r = rig(false, false);
        let mem = memory();
        let mut d = Driver::new(&mem, QBASE, 512);
        let (t, irq) = test_irq();
        let mut w = r
            .block
            .worker_for(Activation {
                mem: mem.clone(),
                features: r.block.features(),
                queues: vec![d.active(0)],
                interrupt: irq,
            })
            .expect("worker");
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        for _ in 0..300 {
            let h = d.chain(&[(HDR, 16, false), (STATUS, 1, true)]);
            d.submit(h);
        }
        w.process_queue(0);
        assert_eq!(usize::from(d.used_idx()), BUDGET);
        // The queue kicked itself to come back.
        assert_eq!(w.queues[0].kick.read().expect("self kick"), 1);
        w.process_queue(0);
        assert_eq!(d.used_idx(), 300);
        assert_eq!(t.signals(0), 2);
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let tmp = TempFile::new().expect("tempfile");
        let mut p = params(tmp.as_file().try_clone().expect("clone"));
        p.model.features |= VIRTIO_RING_F_EVENT_IDX;
        let b = Block::new(p).expect("block");
        assert_ne!(b.features() & VIRTIO_RING_F_EVENT_IDX, 0);
        let mem = memory();
        let mut d = Driver::new(&mem, QBASE, QSIZE);
        let (mut w, irq) = worker(&b, &mem, &d);
        let used_event = d.mock.avail_addr().unchecked_add(4 + 2 * u64::from(QSIZE));
        let avail_event = d.used_addr().unchecked_add(4 + 8 * u64::from(QSIZE));
        // used_event 0: interrupt after the first completion.
        mem.write_obj(0u16, used_event).expect("used_event");
        let (s, _) = request(&mut w, &mut d, VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!(s, VIRTIO_BLK_S_OK);
        assert_eq!(irq.signals(0), 1);
        // The device asks to be kicked for the next entry.
        assert_eq!(mem.read_obj::<u16>(avail_event).expect("avail_event"), 1);
        // The driver wants an interrupt only after entry 10.
        mem.write_obj(10u16, used_event).expect("used_event");
        let (s, _) = request(&mut w, &mut d, VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!(s, VIRTIO_BLK_S_OK);
        assert_eq!(irq.signals(0), 1);
        assert_eq!(mem.read_obj::<u16>(avail_event).expect("avail_event"), 2);
    }

    #[test]
    fn threaded_activate_kick_reset() {
        let mut r = rig(false, false);
        let mem = memory();
        for round in 0..2u64 {
            // After a reset the driver sets its queue up again.
            let mut d = Driver::new(&mem, QBASE + round * 0x2000, QSIZE);
            let (t, irq) = test_irq();
            let q = d.active(0);
            let kick = q.kick.try_clone().expect("kick");
            r.block
                .activate(Activation {
                    mem: mem.clone(),
                    features: r.block.features(),
                    queues: vec![q],
                    interrupt: irq,
                })
                .expect("activate");
            assert!(r.block.running());
            header(&mem, VIRTIO_BLK_T_GET_ID, 0);
            let head = d.chain(&[(HDR, 16, false), (BUF, 20, true), (STATUS, 1, true)]);
            d.submit(head);
            kick.write(1).expect("kick");
            assert!(d.wait_used(1), "used ring did not advance");
            assert!(wait_for(|| t.signals(0) == 1));
            assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
            r.block.reset();
            assert!(!r.block.running());
            // The worker's handle on the image went away with its thread.
            assert_eq!(Arc::strong_count(&r.block.disk), 1);
        }
        // Dropping an active device stops its thread too.
        let (_t, irq) = test_irq();
        let d = Driver::new(&mem, QBASE + 0x8000, QSIZE);
        r.block
            .activate(Activation {
                mem: mem.clone(),
                features: r.block.features(),
                queues: vec![d.active(0)],
                interrupt: irq,
            })
            .expect("activate");
        let disk = r.block.disk.clone();
        assert_eq!(Arc::strong_count(&disk), 3);
        drop(r.block);
        assert_eq!(Arc::strong_count(&disk), 1);
    }

    #[test]
    fn activation_rejects_unknown_queues() {
        let mut r = rig(false, false);
        let mem = memory();
        let d = Driver::new(&mem, QBASE, QSIZE);
        let (_t, irq) = test_irq();
        let res = r.block.activate(Activation {
            mem: mem.clone(),
            features: r.block.features(),
            queues: vec![d.active(1)],
            interrupt: irq,
        });
        assert!(matches!(res, Err(ActivateError::BadQueues(_))));
        assert!(!r.block.running());
    }

    /// A device over `file` with the rig's parameters.
    fn block_over(file: &File) -> Block {
        let mut p = params(file.try_clone().expect("clone"));
        p.serial = Some("abide-serial".into());
        Block::new(p).expect("block")
    }

    /// Submits a read of `sector` into `buf` and notifies the queue
    /// through the transport; returns the chain head.
    fn submit_read(t: &mut VirtioPci, d: &mut Driver, sector: u64, buf: u64) -> u16 {
        header(d.mem, VIRTIO_BLK_T_IN, sector);
        let head = d.chain(&[(HDR, 16, false), (buf, 512, true), (STATUS, 1, true)]);
        d.submit(head);
        pci_w(t, u64::from(layout().notify), 0, 2);
        head
    }

    /// A request made available while the device was paused survives a
    /// snapshot: the restored device (a new transport and model over the
    /// same memory and image) completes it after resuming, exactly once,
    /// and the queue positions go on from where they were.
    #[test]
    fn snapshot_completes_a_request_left_pending() {
        let r = rig(false, false);
        r.file.write_all_at(&[0x11; 512], 512).expect("sector 1");
        r.file.write_all_at(&[0x22; 512], 1024).expect("sector 2");
        let mem = memory();
        let mut d = Driver::new(&mem, QBASE, QSIZE);
        let rings = (
            d.mock.desc_table_addr().raw_value(),
            d.mock.avail_addr().raw_value(),
            d.used_addr().raw_value(),
        );
        let rec_a = Arc::new(Recorder::default());
        let mut a = transport(Box::new(r.block), mem.clone(), rec_a.clone());
        negotiate(&mut a, VIRTIO_F_VERSION_1);
        enable_msix(&mut a, 1, 0x4041);
        enable_queue(&mut a, 0, QSIZE, rings, 1);
        pci_w(&mut a, 0x14, 0x0f, 1);
        assert_eq!(pci_r(&mut a, 0x14, 1), 0x0f, "running, no NEEDS_RESET");

        // The first request completes normally.
        let head1 = submit_read(&mut a, &mut d, 1, BUF);
        assert!(d.wait_used(1), "first request not completed");
        assert_eq!(d.used(0), (u32::from(head1), 513));
        assert!(wait_for(|| rec_a.fired.lock().expect("lock").contains(&1)));
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(BUF)).expect("read");
        assert_eq!(data, [0x11; 512]);

        // Paused: the second request is made available and notified but
        // not taken.
        a.pause();
        let head2 = submit_read(&mut a, &mut d, 2, BUF2);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(d.used_idx(), 1, "a paused device takes nothing");
        let (v, bytes) = a.save_state().expect("save");
        let saved = a.save();
        assert_eq!(
            (saved.queues[0].next_avail, saved.queues[0].next_used),
            (1, 1)
        );
        drop(a);

        // A new process: fresh transport and model, state restored.
        let rec_b = Arc::new(Recorder::default());
        let mut b = transport(Box::new(block_over(&r.file)), mem.clone(), rec_b.clone());
        b.restore_state(v, &bytes).expect("restore");
        let msg = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x4041,
        };
        assert!(rec_b.routes.lock().expect("lock").contains(&(1, Some(msg))));
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(d.used_idx(), 1, "nothing runs before resume");
        assert!(rec_b.fired.lock().expect("lock").is_empty());
        assert_eq!(status(&mem), NO_STATUS);

        b.resume().expect("resume");
        assert!(d.wait_used(2), "pending request not completed");
        assert_eq!(d.used(0), (u32::from(head1), 513));
        assert_eq!(d.used(1), (u32::from(head2), 513));
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        mem.read_slice(&mut data, GuestAddress(BUF2)).expect("read");
        assert_eq!(data, [0x22; 512]);
        assert!(wait_for(|| !rec_b.fired.lock().expect("lock").is_empty()));
        // Joined: everything the device did is visible. Nothing was done
        // twice.
        b.pause();
        let s = b.save();
        assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (2, 2));
        assert_eq!(d.used_idx(), 2);
        // And it goes on after a plain pause/resume.
        b.resume().expect("resume");
        submit_read(&mut b, &mut d, 1, BUF2);
        assert!(d.wait_used(3));
        mem.read_slice(&mut data, GuestAddress(BUF2)).expect("read");
        assert_eq!(data, [0x11; 512]);
    }
}
