//! Abide test guest: a freestanding x86_64 PVH kernel that reports what
//! the virtual machine looks like from the inside, one `guest: key=value`
//! line per fact, on COM1.
//!
//! Ring 0 is interpreted under PVM (slow), ring 3 runs natively: ring-0
//! work is kept to setup and short loops, the workload runs in ring 3.

#![no_std]
#![no_main]

mod acpi;
mod arch;
mod boot;
mod bootinfo;
mod drivers;
mod fingerprint;
mod io;
mod paging;
mod pci;
mod power;
mod print;
mod rtc;
mod serial;
mod smp;
mod timer;
mod user;
mod virtio;

use core::cell::UnsafeCell;

use print::{error, line, Line};

/// A global touched only by the BSP (or with otherwise externally
/// guaranteed exclusion). Interrupts are never enabled in this guest.
pub struct Global<T>(UnsafeCell<T>);

unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(v: T) -> Self {
        Global(UnsafeCell::new(v))
    }

    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub fn get(&self) -> &mut T {
        unsafe { &mut *self.0.get() }
    }
}

static BOOT_INFO: Global<bootinfo::BootInfo> = Global::new(bootinfo::BootInfo::empty());
static ACPI: Global<acpi::Acpi> = Global::new(acpi::Acpi::empty());

struct Args {
    reset: bool,
    echo: u64,
    triple: bool,
    int3: bool,
    rounds: u64,
    /// Workload buffer size in bytes (`buf-kib=`).
    buf_len: u64,
    progress: bool,
    /// Rewrite the whole workload buffer every round (`dirty`).
    dirty: bool,
    spin: bool,
    power_button: bool,
    /// Period of the `spin` ticker (`tick-us=`).
    tick_us: u64,
    quiet: bool,
    fingerprint: bool,
    dev: drivers::DriverArgs,
}

/// Period of the `spin` loop's `tick` lines.
const SPIN_PERIOD_US: u64 = 200_000;

fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut v = 0u64;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u64;
    }
    Some(v)
}

fn parse_args(cmdline: &[u8]) -> Args {
    let mut a = Args {
        reset: false,
        echo: 0,
        triple: false,
        int3: false,
        rounds: user::DEFAULT_ROUNDS,
        buf_len: user::BUFFER_SIZE,
        progress: false,
        dirty: false,
        spin: false,
        power_button: false,
        tick_us: SPIN_PERIOD_US,
        quiet: false,
        fingerprint: false,
        dev: drivers::DriverArgs {
            pci: false,
            blk: false,
            blk_write: None,
            blk_read: None,
            blk_loop: None,
            blk_id: false,
            rng: false,
            hostile: false,
            ecam: 0,
            ram_end: 0,
            scratch: 0,
            scratch_len: 0,
        },
    };
    for tok in cmdline
        .split(|c| c.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
    {
        let ok = match tok {
            b"exit=poweroff" => {
                a.reset = false;
                true
            }
            b"exit=reset" => {
                a.reset = true;
                true
            }
            b"fault=triple" => {
                a.triple = true;
                true
            }
            b"fault=int3" => {
                a.int3 = true;
                true
            }
            b"quiet" => {
                a.quiet = true;
                true
            }
            b"fingerprint" => {
                a.fingerprint = true;
                true
            }
            b"progress" => {
                a.progress = true;
                true
            }
            b"spin" => {
                a.spin = true;
                true
            }
            b"power-button" => {
                a.power_button = true;
                true
            }
            b"dirty" => {
                a.dirty = true;
                true
            }
            b"pci" => {
                a.dev.pci = true;
                true
            }
            b"virtio-blk" => {
                a.dev.blk = true;
                true
            }
            b"blk-id" => {
                a.dev.blk = true;
                a.dev.blk_id = true;
                true
            }
            b"rng" => {
                a.dev.rng = true;
                true
            }
            b"hostile" => {
                a.dev.hostile = true;
                true
            }
            _ if tok.starts_with(b"blk-write=") => parse_dec(&tok[10..])
                .map(|n| {
                    a.dev.blk = true;
                    a.dev.blk_write = Some(n)
                })
                .is_some(),
            _ if tok.starts_with(b"blk-read=") => parse_dec(&tok[9..])
                .map(|n| {
                    a.dev.blk = true;
                    a.dev.blk_read = Some(n)
                })
                .is_some(),
            _ if tok.starts_with(b"tick-us=") => parse_dec(&tok[8..])
                .filter(|n| (1_000..=10_000_000).contains(n))
                .map(|n| a.tick_us = n)
                .is_some(),
            _ if tok.starts_with(b"blk-loop=") => parse_dec(&tok[9..])
                .map(|n| {
                    a.dev.blk = true;
                    a.dev.blk_loop = Some(n)
                })
                .is_some(),
            _ if tok.starts_with(b"buf-kib=") => parse_dec(&tok[8..])
                .map(|n| {
                    let max = user::BUFFER_SIZE >> 10;
                    if n == 0 || n > max {
                        // Refused: the default size stays.
                        Line::new("error")
                            .ks("what", "buf-kib-out-of-range")
                            .kd("kib", n)
                            .kd("max", max)
                            .print();
                    } else {
                        a.buf_len = n << 10;
                    }
                })
                .is_some(),
            _ if tok.starts_with(b"echo=") => parse_dec(&tok[5..]).map(|n| a.echo = n).is_some(),
            _ if tok.starts_with(b"rounds=") => {
                parse_dec(&tok[7..]).map(|n| a.rounds = n).is_some()
            }
            _ => false,
        };
        if !ok {
            Line::new("warn").key("unknown-arg").sanitized(tok).print();
        }
    }
    a
}

/// A `len`-byte RAM range below 4 GiB (2 MiB aligned) that does not
/// overlap the guest image.
fn user_buffer(bi: &bootinfo::BootInfo, len: u64) -> Option<u64> {
    const TWO_MIB: u64 = 2 << 20;
    let image_end = unsafe { &boot::__image_end as *const u8 as u64 };
    let floor = (image_end + TWO_MIB - 1) & !(TWO_MIB - 1);
    for e in bi.e820() {
        if e.kind != bootinfo::E820_RAM {
            continue;
        }
        let start = (e.addr.max(floor) + TWO_MIB - 1) & !(TWO_MIB - 1);
        let end = e.addr.saturating_add(e.size).min(1 << 32);
        if start + len <= end {
            return Some(start);
        }
    }
    None
}

fn echo(n: u64) {
    line("echo-ready");
    let mut skip_lf = false;
    for _ in 0..n {
        let mut buf = [0u8; 256];
        let mut len = 0;
        let deadline = timer::Deadline::after_us(30_000_000);
        loop {
            if deadline.expired() {
                error("echo-timeout");
                return;
            }
            let c = match serial::try_read() {
                Some(c) => c,
                None => continue,
            };
            if c == b'\n' && skip_lf {
                skip_lf = false;
                continue;
            }
            skip_lf = c == b'\r';
            if c == b'\n' || c == b'\r' {
                break;
            }
            if len < buf.len() {
                buf[len] = c;
                len += 1;
            }
        }
        Line::new("echo").key("line").sanitized(&buf[..len]).print();
    }
}

#[no_mangle]
extern "C" fn kmain(start_info: u32) -> ! {
    serial::init();
    arch::init();

    let bi = BOOT_INFO.get();
    bi.parse(start_info as u64);
    Line::new("boot")
        .kd("version", bi.version as u64)
        .key("cmdline")
        .sanitized(bi.cmdline())
        .print();
    if !bi.magic_ok {
        Line::new("error")
            .ks("what", "bad-start-info")
            .kx("magic", bi.magic as u64)
            .print();
    } else if bi.version < 1 || bi.e820_len == 0 {
        error("no-memmap");
    } else if bi.e820_reported as usize > bi.e820_len {
        Line::new("error")
            .ks("what", "e820-truncated")
            .kd("entries", bi.e820_reported as u64)
            .print();
    }
    let mut args = parse_args(bi.cmdline());

    // Memory map.
    let mut ram = 0u64;
    for e in bi.e820() {
        if e.kind == bootinfo::E820_RAM {
            ram += e.size;
        }
        if !args.quiet {
            Line::new("e820")
                .kx16("addr", e.addr)
                .kx16("size", e.size)
                .kd("type", e.kind as u64)
                .print();
        }
    }
    Line::new("memory")
        .kd("ram_bytes", ram)
        .kd("ram_mib", ram >> 20)
        .print();

    // ACPI, then everything that depends on it.
    let acpi = ACPI.get();
    acpi::parse(bi.rsdp, args.quiet, acpi);
    timer::init(acpi.pm_tmr);
    power::init(acpi);

    smp::start(acpi, bi);

    let now = rtc::now();
    let mut l = Line::new("rtc");
    l.key("date")
        .dec_pad(now.year as u64, 4)
        .byte(b'-')
        .dec_pad(now.month as u64, 2)
        .byte(b'-')
        .dec_pad(now.day as u64, 2);
    l.key("time")
        .dec_pad(now.hour as u64, 2)
        .byte(b':')
        .dec_pad(now.min as u64, 2)
        .byte(b':')
        .dec_pad(now.sec as u64, 2);
    l.kd("epoch", now.epoch()).print();
    if !now.valid() {
        error("rtc-invalid");
    }

    let devices: [(&str, bool); 5] = [
        ("com1", serial::present()),
        ("i8042", io::inb(0x64) != 0xFF),
        ("rtc", now.valid()),
        ("pm-timer", timer::advances()),
        ("acpi", acpi.rsdp != 0),
    ];
    for (name, present) in devices {
        Line::new("device")
            .ks("name", name)
            .kd("present", present as u64)
            .print();
    }

    // The workload uses the first `buf_len` bytes; the whole range
    // (BUFFER_SIZE if there is room, as without `buf-kib=`) is scratch RAM
    // for the device work afterwards.
    let ubuf = user_buffer(bi, user::BUFFER_SIZE)
        .map(|b| (b, user::BUFFER_SIZE))
        .or_else(|| user_buffer(bi, args.buf_len).map(|b| (b, args.buf_len)));
    match ubuf {
        Some((buf, _)) => {
            user::run(args.rounds, buf, args.buf_len, args.progress, args.dirty);
        }
        None => error("no-user-buffer"),
    }

    // ABI fingerprint (ring 3), before any device work touches PCI.
    if args.fingerprint {
        fingerprint::run(&fingerprint::FpArgs {
            acpi: acpi as *const acpi::Acpi,
            boot_info: bi as *const bootinfo::BootInfo,
        });
    }

    // Device work (PCI, virtio), in ring 3, only when asked for.
    if args.dev.any() {
        let d = &mut args.dev;
        d.ecam = acpi.ecam;
        d.ram_end = bi
            .e820()
            .iter()
            .filter(|e| e.kind == bootinfo::E820_RAM)
            .map(|e| e.addr.saturating_add(e.size))
            .max()
            .unwrap_or(0);
        if let Some((buf, len)) = ubuf {
            d.scratch = buf;
            d.scratch_len = len;
        }
        drivers::run(d);
    }

    if args.echo > 0 {
        echo(args.echo);
    }

    if args.triple {
        Line::new("fault").ks("how", "triple").print();
        arch::triple_fault();
    }
    if args.int3 {
        Line::new("fault").ks("how", "int3").print();
        arch::ring0_int3();
    }

    if args.spin {
        user::spin(args.tick_us);
    }
    if args.power_button {
        power::wait_power_button();
    }

    line("done");
    if args.reset {
        Line::new("exit").ks("how", "reset").print();
        power::reset()
    } else {
        Line::new("exit").ks("how", "poweroff").print();
        power::poweroff()
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut l = Line::new("panic");
    l.ks("what", "rust");
    if let Some(loc) = info.location() {
        l.key("file")
            .sanitized(loc.file().as_bytes())
            .kd("line", loc.line() as u64);
    }
    l.print();
    power::reset()
}
