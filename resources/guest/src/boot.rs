//! Boot path: PVH note, 32-bit entry, long-mode switch, GDT, AP entry and
//! the real-mode AP trampoline.
//!
//! Everything here runs in ring 0, which PVM interprets instruction by
//! instruction, so the code is deliberately short: one loop of 2048
//! iterations fills the page directories, everything else is straight-line.

use core::arch::global_asm;

/// GDT selectors (must match the table below).
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x20 | 3;
pub const USER_CS: u16 = 0x28 | 3;
pub const TSS_SEL: u16 = 0x30;

/// Maximum number of CPUs (BSP included) the guest will start.
pub const MAX_CPUS: usize = 64;
/// Stack size of each application processor.
pub const AP_STACK_SIZE: usize = 4096;

/// Physical address the AP trampoline is copied to (4 KiB aligned, < 1 MiB).
pub const TRAMPOLINE_ADDR: u64 = 0x8000;

extern "C" {
    pub static ap_trampoline_start: u8;
    pub static ap_trampoline_end: u8;
    pub static mut gdt: [u64; 8];
    pub static __image_start: u8;
    pub static __image_end: u8;
}

global_asm!(
    r#"
    /* ---------------------------------------------------------------- */
    /* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen".          */
    .section .note.pvh, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .quad pvh_start32

    /* ---------------------------------------------------------------- */
    /* Page tables (identity map of 0..4 GiB with 2 MiB pages).          */
    .section .bss.pagetables, "aw", @nobits
    .balign 4096
    .globl boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096

    .section .bss.stacks, "aw", @nobits
    .balign 16
bsp_stack:
    .skip 32768
bsp_stack_top:
    .balign 16
    .globl ap_stacks
ap_stacks:
    .skip {max_aps} * {ap_stack_size}

    /* ---------------------------------------------------------------- */
    /* GDT: shared by the BSP boot path, the AP trampoline and the       */
    /* kernel. Accessed bits are preset so the CPU never writes it.      */
    .section .data.gdt, "aw"
    .balign 16
    .globl gdt
gdt:
    .quad 0                         /* 0x00 null                     */
    .quad 0x00AF9B000000FFFF        /* 0x08 kernel code, 64-bit      */
    .quad 0x00CF93000000FFFF        /* 0x10 kernel data              */
    .quad 0x00CF9B000000FFFF        /* 0x18 kernel code, 32-bit      */
    .quad 0x00CFF3000000FFFF        /* 0x20 user data (DPL 3)        */
    .quad 0x00AFFB000000FFFF        /* 0x28 user code, 64-bit (DPL 3)*/
    .quad 0, 0                      /* 0x30 TSS, filled at runtime   */
gdt_end:
    .balign 16
    .globl gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    /* ---------------------------------------------------------------- */
    .section .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                 /* hvm_start_info, kept in esi   */
    lgdtl gdt_ptr
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    ljmpl $0x18, $1f
1:
    movl $(boot_pdpt + 0x7), boot_pml4
    movl $(boot_pd + 0x0007), boot_pdpt
    movl $(boot_pd + 0x1007), boot_pdpt + 8
    movl $(boot_pd + 0x2007), boot_pdpt + 16
    movl $(boot_pd + 0x3007), boot_pdpt + 24
    /* PD entries: P|RW|US|PS; the top GiB (MMIO) also gets PWT|PCD. */
    movl $boot_pd, %edi
    movl $0x87, %eax
    movl $1536, %ecx
2:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    decl %ecx
    jnz 2b
    orl $0x18, %eax
    movl $512, %ecx
3:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    decl %ecx
    jnz 3b
    jmp enter_long

    /* BSP: 32-bit -> 64-bit switch (APs: see ap_entry32).            */
enter_long:
    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE                           */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          /* EFER                          */
    rdmsr
    orl $0x100, %eax                /* LME                           */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE                       */
    movl %eax, %cr0
    ljmpl $0x08, $long_entry

    /* APs arrive here from the trampoline in 32-bit protected mode.   */
    .globl ap_entry32
ap_entry32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_entry64

    .code64
long_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    leaq bsp_stack_top(%rip), %rsp
    movl %esi, %edi
    call kmain
4:  cli
    hlt
    jmp 4b

ap_entry64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $1, %eax
    lock xaddl %eax, ap_ticket(%rip)
    cmpl ${max_aps}, %eax
    jae 5f
    movl %eax, %edi
    incl %eax
    shll $12, %eax
    leaq ap_stacks(%rip), %rsp
    addq %rax, %rsp
    call ap_main
5:  cli
    hlt
    jmp 5b

    /* ---------------------------------------------------------------- */
    /* Real-mode AP trampoline, copied to a page below 1 MiB. The AP     */
    /* starts at CS:IP = (page >> 4):0; everything is CS-relative until  */
    /* the far jump into ap_entry32 (absolute, in the kernel image).    */
    .section .rodata.trampoline, "a"
    .balign 16
    .code16
    .globl ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_tramp_gdtptr - ap_trampoline_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $ap_entry32
    .balign 8
ap_tramp_gdtptr:
    .word gdt_end - gdt - 1
    .long gdt
    .globl ap_trampoline_end
ap_trampoline_end:
    .code64
"#,
    max_aps = const MAX_CPUS - 1,
    ap_stack_size = const AP_STACK_SIZE,
    options(att_syntax)
);

// The AP stack computation in ap_entry64 shifts by 12.
const _: () = assert!(AP_STACK_SIZE == 4096);

#[no_mangle]
static ap_ticket: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
