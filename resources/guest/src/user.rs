//! The ring-3 workload. Runs at native speed under PVM (only ring 0 is
//! interpreted); talks to the kernel exclusively through `int 0x80`.

use core::arch::asm;

use crate::arch::{enter_user, SYS_CPUID, SYS_EXIT, SYS_MAP, SYS_TICKS, SYS_WRITE};
use crate::print::Line;
use crate::Global;

pub const BUFFER_SIZE: u64 = 16 << 20;
pub const DEFAULT_ROUNDS: u64 = 8;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[repr(C)]
struct UserArgs {
    rounds: u64,
    buf: u64,
    len: u64,
    /// Print a `progress` line after every round.
    progress: u64,
    /// Rewrite the whole buffer at the start of every round.
    dirty: u64,
}

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static USTACK: Global<Stack> = Global::new(Stack([0; 16384]));
static ARGS: Global<UserArgs> = Global::new(UserArgs {
    rounds: 0,
    buf: 0,
    len: 0,
    progress: 0,
    dirty: 0,
});

/// Run the checksum workload in ring 3 over `[buf, buf+len)`; returns the
/// checksum the workload exited with. With `progress`, a line per round:
/// `guest: progress round=<r> sum=0x<16 hex>` (the running checksum).
/// With `dirty`, every round first rewrites the whole buffer (the xorshift
/// stream continues), so the guest dirties `len` bytes per round.
pub fn run(rounds: u64, buf: u64, len: u64, progress: bool, dirty: bool) -> u64 {
    let a = ARGS.get();
    a.rounds = rounds;
    a.buf = buf;
    a.len = len;
    a.progress = progress as u64;
    a.dirty = dirty as u64;
    let st = USTACK.get();
    // Entered like a call: rsp % 16 == 8 at the first instruction.
    let top = st.0.as_ptr() as u64 + st.0.len() as u64 - 8;
    enter_user(user_main, top, a as *const UserArgs as u64)
}

/// Run `entry(arg)` in ring 3 on the workload stack (which is free once
/// `run` has returned); returns the value passed to SYS_EXIT.
pub fn call(entry: extern "C" fn(u64) -> !, arg: u64) -> u64 {
    let st = USTACK.get();
    let top = st.0.as_ptr() as u64 + st.0.len() as u64 - 8;
    enter_user(entry, top, arg)
}

#[inline(always)]
fn syscall(nr: u64, a0: u64, a1: u64) -> u64 {
    syscall3(nr, a0, a1, 0)
}

#[inline(always)]
fn syscall3(nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let ret: u64;
    unsafe {
        asm!("int 0x80", inlateout("rax") nr => ret, in("rdi") a0, in("rsi") a1, in("rdx") a2,
             clobber_abi("C"));
    }
    ret
}

/// Ring 3: make `[addr, addr+len)` accessible (identity), uncached if asked.
pub fn sys_map(addr: u64, len: u64, uncached: bool) -> bool {
    syscall3(SYS_MAP, addr, len, uncached as u64) == 1
}

/// CPUID executed by the kernel (ring 0).
pub fn sys_cpuid(leaf: u32, sub: u32) -> crate::io::Cpuid {
    let mut r = [0u32; 4];
    syscall(
        SYS_CPUID,
        leaf as u64 | (sub as u64) << 32,
        r.as_mut_ptr() as u64,
    );
    crate::io::Cpuid {
        eax: r[0],
        ebx: r[1],
        ecx: r[2],
        edx: r[3],
    }
}

pub fn sys_write(b: &[u8]) {
    syscall(SYS_WRITE, b.as_ptr() as u64, b.len() as u64);
}

pub fn sys_ticks() -> u64 {
    syscall(SYS_TICKS, 0, 0)
}

pub fn sys_exit(v: u64) -> ! {
    syscall(SYS_EXIT, v, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// Ring 3, never returns: `guest: tick n=<n>` (n = 1, 2, ...) every
/// `period_us` of PM-timer time. Between clock reads (system calls) it
/// spins natively; after a jump of the clock (e.g. a restore) it does not
/// try to catch up, so the lines never come in a burst.
extern "C" fn spin_main(period_us: u64) -> ! {
    let period = crate::timer::us_to_ticks(period_us).max(1);
    let mut next = sys_ticks() + period;
    let mut n = 0u64;
    loop {
        for _ in 0..SPIN_POLL {
            core::hint::spin_loop();
        }
        let now = sys_ticks();
        if now < next {
            continue;
        }
        n += 1;
        Line::new("tick").kd("n", n).print();
        next += period;
        if next <= now {
            next = now + period;
        }
    }
}

/// `pause` instructions between clock reads in `spin`: a few ms at most
/// (10-140 cycles each), and few kernel entries (each clock read is an
/// interpreted system call plus a PM-timer exit under PVM).
const SPIN_POLL: u32 = 100_000;

/// Run the `spin` loop in ring 3 on the workload stack; never returns.
pub fn spin(period_us: u64) -> ! {
    call(spin_main, period_us);
    // spin_main never exits; should it, stay put.
    loop {
        core::hint::spin_loop();
    }
}

extern "C" fn user_main(argp: u64) -> ! {
    let a = unsafe { &*(argp as *const UserArgs) };
    let cpl = crate::io::read_cs() & 3;
    let words = (a.len / 8) as usize;
    let p = a.buf as *mut u64;
    let t0 = sys_ticks();

    // Deterministic fill (xorshift64).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        unsafe { p.add(i).write(x) };
    }

    // FNV-1a over 64-bit words; each round perturbs one word so rounds
    // differ, and the round hashes are folded into the checksum.
    let mut sum: u64 = 0;
    for r in 0..a.rounds {
        if a.dirty != 0 {
            for i in 0..words {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                unsafe { p.add(i).write(x) };
            }
        }
        let mut h = FNV_OFFSET ^ r;
        for i in 0..words {
            h ^= unsafe { p.add(i).read() };
            h = h.wrapping_mul(FNV_PRIME);
        }
        sum = sum.rotate_left(5) ^ h;
        if words > 0 {
            let k = (r as usize).wrapping_mul(4099) % words;
            unsafe { p.add(k).write(p.add(k).read() ^ h) };
        }
        if a.progress != 0 {
            Line::new("progress")
                .kd("round", r)
                .kx16("sum", sum)
                .print();
        }
        sys_ticks(); // keeps the kernel's PM-timer extension from missing a wrap
    }
    let ticks = sys_ticks() - t0;

    let mut l = Line::new("user");
    l.kd("cpl", cpl as u64)
        .kd("rounds", a.rounds)
        .kx16("checksum", sum)
        .kd("ticks", ticks);
    sys_write(l.finish());
    sys_exit(sum)
}
