//! TSS, IDT, exception reporting, the `int 0x80` syscall gate and the
//! ring-3 entry/exit path.

use core::arch::{asm, global_asm};

use crate::boot::{self, KERNEL_CS, TSS_SEL};
use crate::print::Line;
use crate::Global;

pub const SYSCALL_VECTOR: usize = 0x80;
pub const SYS_EXIT: u64 = 0;
pub const SYS_WRITE: u64 = 1;
pub const SYS_TICKS: u64 = 2;
/// map(addr, len, uncached): see `paging::map`; returns 1 on success.
pub const SYS_MAP: u64 = 3;
/// cpuid(leaf | sub << 32, out: *mut [u32; 4]) executed in ring 0: under
/// PVM a ring-3 CPUID is not seen by the VMM (see `fingerprint.rs`).
pub const SYS_CPUID: u64 = 4;

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

static TSS: Global<Tss> = Global::new(Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    // No I/O bitmap: ring-3 port access is governed by IOPL alone.
    iomap_base: core::mem::size_of::<Tss>() as u16,
});

#[repr(C, align(16))]
struct Stack([u8; 16384]);
/// Ring-0 stack used on entry from ring 3 (TSS.RSP0).
static KSTACK: Global<Stack> = Global::new(Stack([0; 16384]));

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    lo: u64,
    hi: u64,
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);
static IDT: Global<Idt> = Global::new(Idt([Gate { lo: 0, hi: 0 }; 256]));

#[repr(C, packed)]
struct DescPtr {
    limit: u16,
    base: u64,
}

extern "C" {
    static exception_stubs: [u64; 32];
    fn syscall_entry();
    fn enter_user_asm(entry: u64, stack: u64, arg: u64) -> u64;
}

fn gate(handler: u64, dpl: u64) -> Gate {
    // 64-bit interrupt gate (type 0xE), present.
    let lo = (handler & 0xFFFF)
        | ((KERNEL_CS as u64) << 16)
        | ((0x8E | (dpl << 5)) << 40)
        | ((handler >> 16) & 0xFFFF) << 48;
    Gate {
        lo,
        hi: handler >> 32,
    }
}

/// BSP: TSS + IDT. APs only call `load_idt`.
pub fn init() {
    let tss = TSS.get();
    let kstack = KSTACK.get();
    tss.rsp[0] = kstack.0.as_ptr() as u64 + kstack.0.len() as u64;
    let base = tss as *const Tss as u64;
    let limit = core::mem::size_of::<Tss>() as u64 - 1;
    let lo = (limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | 0x89 << 40 // present, 64-bit available TSS
        | ((limit >> 16) & 0xF) << 48
        | ((base >> 24) & 0xFF) << 56;
    unsafe {
        let g = &raw mut boot::gdt;
        (*g)[6] = lo;
        (*g)[7] = base >> 32;
        asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack));
    }
    let idt = IDT.get();
    let stubs: &[u64; 32] = unsafe { &exception_stubs };
    for (g, &stub) in idt.0.iter_mut().zip(stubs.iter()) {
        *g = gate(stub, 0);
    }
    idt.0[SYSCALL_VECTOR] = gate(syscall_entry as *const () as u64, 3);
    load_idt();
}

pub fn load_idt() {
    let ptr = DescPtr {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: IDT.get() as *const Idt as u64,
    };
    unsafe { asm!("lidt [{0}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) }
}

/// Load an empty IDT and raise an exception: #UD cannot be delivered,
/// nor can the resulting #GP or #DF, so the CPU shuts down (triple fault).
pub fn triple_fault() -> ! {
    let ptr = DescPtr { limit: 0, base: 0 };
    unsafe {
        asm!("lidt [{0}]", "ud2", in(reg) &ptr, options(noreturn));
    }
}

/// Executes `int3` in ring 0, on purpose: PVM cannot emulate it and ends
/// the VM with an internal error, which the VMM must report with registers.
/// (Hardware KVM delivers #BP, which the exception handler reports.) This
/// is the only `int3` in the guest; nothing else may emit one.
pub fn ring0_int3() -> ! {
    // SAFETY: a breakpoint trap; the IDT's exception handler takes it.
    unsafe {
        asm!(".byte 0xcc", "2:", "hlt", "jmp 2b", options(noreturn));
    }
}

#[repr(C)]
pub struct ExceptionFrame {
    vector: u64,
    err: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

#[no_mangle]
extern "C" fn exception_handler(f: &ExceptionFrame) -> ! {
    let mut l = Line::new("panic");
    l.kd("exception", f.vector)
        .kx("rip", f.rip)
        .kx("err", f.err)
        .kd("cpl", f.cs & 3);
    if f.vector == 14 {
        let cr2: u64;
        unsafe { asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack)) };
        l.kx("cr2", cr2);
    }
    l.print();
    crate::power::reset()
}

/// Registers saved by the #GP stub (see `exc_stub_13`), then the CPU frame.
#[repr(C)]
pub struct GpFrame {
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rax: u64,
    err: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Ring-3 `in`/`out` (imm8 or dx forms, 8/16/32 bits) that raised #GP:
/// do it here and step over it. Returns false for anything else.
#[no_mangle]
extern "C" fn gp_emulate_io(f: &mut GpFrame) -> bool {
    use crate::io::{inb, inl, inw, outb, outl, outw};
    let code = |i: u64| unsafe { core::ptr::read_volatile((f.rip + i) as *const u8) };
    let mut len = 0;
    let mut op = code(0);
    let wide = if op == 0x66 {
        len = 1;
        op = code(1);
        2
    } else {
        4
    };
    let (port, imm) = match op {
        0xE4..=0xE7 => (code(len + 1) as u16, true),
        0xEC..=0xEF => (f.rdx as u16, false),
        _ => return false,
    };
    let width = if op & 1 == 0 { 1 } else { wide };
    if op & 2 == 0 {
        f.rax = match width {
            1 => (f.rax & !0xFF) | inb(port) as u64,
            2 => (f.rax & !0xFFFF) | inw(port) as u64,
            _ => inl(port) as u64,
        };
    } else {
        match width {
            1 => outb(port, f.rax as u8),
            2 => outw(port, f.rax as u16),
            _ => outl(port, f.rax as u32),
        }
    }
    f.rip += len + if imm { 2 } else { 1 };
    true
}

#[no_mangle]
extern "C" fn syscall_dispatch(nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    match nr {
        SYS_WRITE => {
            let len = a1.min(4096) as usize;
            let bytes = unsafe { core::slice::from_raw_parts(a0 as *const u8, len) };
            crate::serial::write(bytes);
            len as u64
        }
        SYS_TICKS => crate::timer::now(),
        SYS_MAP => crate::paging::map(a0, a1, a2 != 0) as u64,
        SYS_CPUID => {
            let r = crate::io::cpuid(a0 as u32, (a0 >> 32) as u32);
            let out = a1 as *mut [u32; 4];
            unsafe { out.write_volatile([r.eax, r.ebx, r.ecx, r.edx]) };
            0
        }
        _ => u64::MAX,
    }
}

/// Enter ring 3 at `entry` with `stack` and `arg` in rdi; returns the value
/// the workload passes to SYS_EXIT.
pub fn enter_user(entry: extern "C" fn(u64) -> !, stack: u64, arg: u64) -> u64 {
    unsafe { enter_user_asm(entry as *const () as u64, stack, arg) }
}

global_asm!(
    r#"
    .section .text.arch, "ax"
    .code64

    .macro EXC_NOERR n
    .balign 16
exc_stub_\n:
    pushq $0
    pushq $\n
    jmp exception_common
    .endm

    .macro EXC_ERR n
    .balign 16
exc_stub_\n:
    pushq $\n
    jmp exception_common
    .endm

    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3
    EXC_NOERR 4
    EXC_NOERR 5
    /* #UD: PVM does not deliver a ring-3 `int 0x80` through the gate;
       it raises #UD at the instruction instead. Treat that as the
       syscall (skip the 2-byte instruction). rcx is free: the syscall
       clobbers it anyway. */
    .balign 16
exc_stub_6:
    testb $3, 8(%rsp)
    jz 1f
    movq (%rsp), %rcx
    cmpw $0x80cd, (%rcx)
    jne 1f
    addq $2, (%rsp)
    jmp syscall_entry
1:  pushq $0
    pushq $6
    jmp exception_common
    EXC_NOERR 7
    EXC_ERR   8
    EXC_NOERR 9
    EXC_ERR   10
    EXC_ERR   11
    EXC_ERR   12
    /* #GP with error code "IDT vector 0x80" from ring 3 on `int 0x80`
       (a hypervisor that only lets DPL-0 gates through): same trick. */
    .balign 16
exc_stub_13:
    cmpq $0x402, (%rsp)
    jne 1f
    testb $3, 16(%rsp)
    jz 1f
    movq 8(%rsp), %rcx
    cmpw $0x80cd, (%rcx)
    jne 1f
    addq $8, %rsp
    addq $2, (%rsp)
    jmp syscall_entry
    /* #GP with error code 0 from ring 3: maybe port I/O that the
       hypervisor does not allow at IOPL=3 (PVM): emulate it. */
1:  cmpq $0, (%rsp)
    jne 3f
    testb $3, 16(%rsp)
    jz 3f
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    movq %rsp, %rdi
    subq $8, %rsp
    call gp_emulate_io
    addq $8, %rsp
    testb %al, %al
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    jz 3f
    addq $8, %rsp
    iretq
3:  pushq $13
    jmp exception_common
    EXC_ERR   14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR   17
    EXC_NOERR 18
    EXC_NOERR 19
    EXC_NOERR 20
    EXC_ERR   21
    EXC_NOERR 22
    EXC_NOERR 23
    EXC_NOERR 24
    EXC_NOERR 25
    EXC_NOERR 26
    EXC_NOERR 27
    EXC_NOERR 28
    EXC_ERR   29
    EXC_ERR   30
    EXC_NOERR 31

exception_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call exception_handler
1:  cli
    hlt
    jmp 1b

    /* int 0x80 from ring 3: rax = number, rdi/rsi/rdx = arguments,
       result in rax. Caller-saved registers are clobbered. */
    .globl syscall_entry
syscall_entry:
    cmpq ${sys_exit}, %rax
    je 2f
    subq $8, %rsp
    movq %rdx, %rcx
    movq %rsi, %rdx
    movq %rdi, %rsi
    movq %rax, %rdi
    call syscall_dispatch
    addq $8, %rsp
    iretq
2:  /* SYS_EXIT: drop the ring-3 context, resume enter_user_asm. */
    movq %rdi, %rax
    movq saved_kernel_rsp(%rip), %rsp
    movw ${kds}, %dx
    movw %dx, %ds
    movw %dx, %es
    movw %dx, %ss
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

    /* enter_user_asm(entry, stack, arg) -> exit value */
    .globl enter_user_asm
enter_user_asm:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, saved_kernel_rsp(%rip)
    pushq ${uds}
    pushq %rsi
    pushq $0x3002              /* IOPL=3, IF=0 */
    pushq ${ucs}
    pushq %rdi
    movq %rdx, %rdi
    xorl %eax, %eax
    xorl %ebx, %ebx
    xorl %ecx, %ecx
    xorl %edx, %edx
    xorl %esi, %esi
    xorl %ebp, %ebp
    iretq

    .section .rodata.arch, "a"
    .balign 8
    .globl exception_stubs
exception_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_stub_\n
    .endr

    .section .bss.arch, "aw", @nobits
    .balign 8
saved_kernel_rsp:
    .skip 8
"#,
    sys_exit = const SYS_EXIT,
    kds = const boot::KERNEL_DS,
    uds = const boot::USER_DS,
    ucs = const boot::USER_CS,
    options(att_syntax)
);
