//! The two ways into the guest, in assembly because nothing can run in Rust
//! before there is a stack (and, for QEMU, before there is long mode).
//!
//! * `ferry_entry64` (ELF `e_entry`): Ferry starts every vCPU here, already
//!   in 64-bit ring 3, with RDI = vCPU index and RSI = `hvm_start_info`. It
//!   only picks this vCPU's stack and calls [`crate::ferry_main`], so this
//!   path runs no privileged instruction at all: on nested PVM every ring-0
//!   instruction goes through KVM's emulator.
//! * `pvh_entry32` (Xen PVH note): QEMU starts the boot vCPU here in 32-bit
//!   protected mode with EBX = `hvm_start_info`. A stub of a few dozen
//!   ring-0 instructions (no loops: each one is emulated) enters long mode
//!   with static page tables, loads a GDT with the selectors Ferry uses and
//!   a TSS whose I/O bitmap allows every port (this host ignores IOPL), and
//!   `iretq`s to `ferry_entry64` in ring 3 with RDI = 0.
//!
//! The page tables (identity map of the low 4 GiB, 2 MiB pages, User bit
//! set) are assembled as data, so no ring-0 loop has to build them. 4 GiB
//! is enough under QEMU: the working set lives in the RAM range that holds
//! `ws_base`, and QEMU never lets a RAM range cross the hole below 4 GiB.
//! Ferry maps all guest RAM itself and never uses these tables.

use core::arch::global_asm;

use crate::{MAX_CPUS, STACK_SHIFT, STACK_SIZE};

/// Size of the stack used only to report a vCPU index beyond [`MAX_CPUS`].
const OVERFLOW_STACK_SIZE: usize = 16 * 1024;

global_asm!(
    r#"
    /* ---- PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen" ---------- */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz, "Xen" and its NUL */
    .long 4                     /* descsz, a 32-bit physical address */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_entry32
    .balign 4

    /* ---- QEMU: 32-bit protected mode, paging off, EBX = start_info ---- */
    .section .text.pvh_entry32, "ax", @progbits
    .code32
    .globl pvh_entry32
pvh_entry32:
    cld
    /* The TSS base is split over three descriptor fields, which the
       assembler cannot do with a relocatable address: patch it here.
       The image sits below 4 GiB, so the upper base half stays 0. */
    mov $ferry_tss, %eax
    mov %ax, ferry_gdt_tss + 2
    shr $16, %eax
    mov %al, ferry_gdt_tss + 4
    mov %ah, ferry_gdt_tss + 7
    /* CR4: PAE | OSFXSR | OSXMMEXCPT (Rust code uses SSE). */
    mov $0x620, %eax
    mov %eax, %cr4
    mov $ferry_pml4, %eax
    mov %eax, %cr3
    /* EFER.LME */
    mov $0xc0000080, %ecx
    mov $0x100, %eax
    xor %edx, %edx
    wrmsr
    /* CR0: PG | AM | WP | NE | ET | MP | PE, as Ferry sets it. */
    mov $0x80050033, %eax
    mov %eax, %cr0
    lgdt ferry_gdt_ptr
    ljmp $0x08, $ferry_long64

    .code64
ferry_long64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $0x38, %ax
    ltr %ax
    /* Upper register halves are undefined after the mode switch. */
    mov $(ferry_stacks + {stack_size}), %rsp
    mov %ebx, %esi
    xor %edi, %edi
    /* iretq frame to ring 3: SS, RSP, RFLAGS (IF = 0), CS, RIP */
    pushq $0x2b
    pushq $(ferry_stacks + {stack_size})
    pushq $0x2
    pushq $0x33
    pushq $ferry_entry64
    iretq

    /* ---- Ferry (and QEMU after the stub): 64-bit ring 3 ---------------- */
    .section .text.ferry_entry64, "ax", @progbits
    .globl ferry_entry64
ferry_entry64:
    cmp ${max_cpus}, %rdi
    jae ferry_entry64_overflow
    /* RSP = top of this vCPU's stack (16-byte aligned; the call below
       leaves it as the ABI expects at a function entry). */
    lea 1(%rdi), %rax
    shl ${stack_shift}, %rax
    lea ferry_stacks(%rip), %rsp
    add %rax, %rsp
    call {main}
ferry_entry64_spin:
    pause
    jmp ferry_entry64_spin
ferry_entry64_overflow:
    /* One shared stack for every vCPU beyond the supported count: take it
       under a lock that is never released (the vCPU that reports exits). */
    mov $1, %eax
    xchg %eax, ferry_overflow_lock(%rip)
    test %eax, %eax
    jz ferry_entry64_overflow_locked
    pause
    jmp ferry_entry64_overflow
ferry_entry64_overflow_locked:
    lea ferry_overflow_stack_top(%rip), %rsp
    call {too_many}
    jmp ferry_entry64_spin

    /* ---- GDT and TSS ---------------------------------------------------- */
    .section .data.ferry_gdt, "aw", @progbits
    .balign 16
ferry_gdt:
    .quad 0                     /* 0x00 null */
    .quad 0x00af9a000000ffff    /* 0x08 ring-0 64-bit code (QEMU stub) */
    .quad 0x00cf92000000ffff    /* 0x10 ring-0 data (QEMU stub) */
    .quad 0                     /* 0x18 unused */
    .quad 0                     /* 0x20 unused */
    .quad 0x00cff2000000ffff    /* 0x28 ring-3 data: SS = DS = ES = 0x2b */
    .quad 0x00affa000000ffff    /* 0x30 ring-3 64-bit code: CS = 0x33 */
ferry_gdt_tss:                  /* 0x38 64-bit TSS, 16 bytes */
    .word ferry_tss_end - ferry_tss - 1
    .word 0                     /* base 15:0, patched by the stub */
    .byte 0                     /* base 23:16, patched */
    .byte 0x89                  /* present, DPL 0, available 64-bit TSS */
    .byte 0                     /* limit 19:16, flags */
    .byte 0                     /* base 31:24, patched */
    .long 0                     /* base 63:32 */
    .long 0                     /* reserved */
ferry_gdt_end:
    .balign 8
ferry_gdt_ptr:
    .word ferry_gdt_end - ferry_gdt - 1
    .long ferry_gdt

    /* No stack switch to ring 0 ever happens (no IDT, no interrupts), so
       RSP0 and the ISTs stay 0. The bitmap is all zero: every port is
       allowed, and the trailing 0xff ends it as the SDM asks. */
    .balign 16
ferry_tss:
    .long 0                     /* reserved */
    .quad 0, 0, 0               /* RSP0-2 */
    .quad 0                     /* reserved */
    .quad 0, 0, 0, 0, 0, 0, 0   /* IST1-7 */
    .quad 0                     /* reserved */
    .word 0                     /* reserved */
    .word ferry_tss_iomap - ferry_tss
ferry_tss_iomap:
    .fill 8192, 1, 0
    .byte 0xff
ferry_tss_end:

    /* ---- identity page tables for the QEMU path ------------------------- */
    .section .data.ferry_pagetables, "aw", @progbits
    .balign 4096
ferry_pml4:
    .quad ferry_pdpt + 0x7      /* present, writable, user */
    .fill 511, 8, 0
ferry_pdpt:
    .quad ferry_pd + 0x0007
    .quad ferry_pd + 0x1007
    .quad ferry_pd + 0x2007
    .quad ferry_pd + 0x3007
    .fill 508, 8, 0
ferry_pd:                       /* 2048 x 2 MiB: present, writable, user, PS */
    .set ferry_pd_index, 0
    .rept 2048
    .quad (ferry_pd_index << 21) | 0x87
    .set ferry_pd_index, ferry_pd_index + 1
    .endr

    /* ---- stacks --------------------------------------------------------- */
    .section .bss.ferry_stacks, "aw", @nobits
    .balign 4096
ferry_stacks:
    .skip {stack_size} * {max_cpus}
    .balign 16
ferry_overflow_stack:
    .skip {overflow_stack_size}
ferry_overflow_stack_top:
ferry_overflow_lock:
    .skip 8

    .text
"#,
    stack_size = const STACK_SIZE,
    stack_shift = const STACK_SHIFT,
    max_cpus = const MAX_CPUS,
    overflow_stack_size = const OVERFLOW_STACK_SIZE,
    main = sym crate::ferry_main,
    too_many = sym crate::ferry_too_many_cpus,
    options(att_syntax)
);

// Cargo does not know that the link depends on link.ld (it is passed as a
// linker argument); naming it here puts it in rustc's dep-info, so an edit
// to it relinks the guest.
const _: &str = include_str!("../link.ld");
