# The application processors' way in (src/smp.rs). A start-up IPI starts
# each in real mode at CS:IP = vector << 8 : 0 (Intel SDM vol. 3A 9.4.4.1,
# 11.6.1), so the first few instructions run from a copy of
# ksave_ap_startup in a page below 1 MiB. They load ksave's GDT, turn on
# protected mode and jump into ksave's image, which is linked below 4 GiB
# (linker.ld): long mode on ksave's page tables (the BSP's CR3, CR4 and
# EFER bits, in KSAVE_AP_CR3, _CR4, _EFER), a stack of its own, Rust.

.set CODE32,      0x08          # asm/tables.s's GDT
.set KERNEL_CS,   0x10
.set KERNEL_DS,   0x18
.set MSR_EFER,    0xC0000080

.section .rodata
.code16
.balign 16
.global ksave_ap_startup, ksave_ap_startup_end
ksave_ap_startup:
    cli
    cld
    lgdtl %cs:(ap_gdt_ptr - ksave_ap_startup)
    mov %cr0, %eax
    or $1, %eax                     # PE
    mov %eax, %cr0
    ljmpl $CODE32, $ksave_ap_entry32
.balign 8
ap_gdt_ptr:                         # a 32-bit base: ksave's GDT lies below 4 GiB
    .short 6 * 8 - 1
    .long ksave_gdt
ksave_ap_startup_end:

.section .text
.code32
ksave_ap_entry32:
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov KSAVE_AP_CR4, %eax          # PAE (and LA57 if the BSP runs it), SSE
    mov %eax, %cr4
    mov KSAVE_AP_CR3, %eax          # ksave's page tables, below 4 GiB
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or KSAVE_AP_EFER, %eax          # LME, and NXE as the BSP has it
    wrmsr
    # All of CR0, not OR-ed into what INIT left (which keeps CD and NW: a
    # CPU never started since power-on would run uncached): PG, NE, ET,
    # MP, PE; EM and TS clear for SSE. Long mode is active from here.
    mov $0x80000033, %eax
    mov %eax, %cr0
    ljmp $KERNEL_CS, $1f
.code64
    # DS, ES and SS hold the flat data segment loaded above, valid in long
    # mode too; FS and GS only need to be null (nothing uses them).
1:  xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    # Which AP this is: the order of arrival. Those beyond the stacks wait.
    mov $1, %eax
    lock xadd %eax, KSAVE_AP_ARRIVED(%rip)
    cmp KSAVE_AP_STACK_COUNT(%rip), %eax
    jae 9f
    mov %eax, %edi
    lea 1(%rax), %rax
    imul KSAVE_AP_STACK_SIZE(%rip), %rax
    lea KSAVE_AP_STACKS(%rip), %rsp
    add %rax, %rsp
    xor %ebp, %ebp
    fninit
    sub $8, %rsp                    # as after a call: RSP + 8 aligned to 16
    push $0x1f80                    # MXCSR's default: all exceptions masked
    ldmxcsr (%rsp)
    add $16, %rsp
    call ksave_ap_main
9:  cli
    hlt
    jmp 9b
