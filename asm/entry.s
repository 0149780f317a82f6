# ksave's entry points: the 64-bit kexec-jump entry (ELF e_entry), the 32-bit
# multiboot 1/2 entry, the common path into Rust, and the jump back.
#
# Everything here lives in the image's one PT_LOAD; nothing outside it is
# written until Rust decides to.

.set KERNEL_CS,   0x10          # Linux's __KERNEL_CS (arch/x86/include/asm/segment.h):
.set KERNEL_DS,   0x18          # after a jump back Linux reloads every segment but CS,
.set CODE32,      0x08          # so ours must name its 64-bit code segment too.
.set CR4_PAE,     1 << 5
.set CR4_OSFXSR,  1 << 9
.set CR4_OSXMMEXCPT, 1 << 10
.set CR4_LA57,    1 << 12
.set MSR_EFER,    0xC0000080
.set EFER_LME,    1 << 8
.set ENTRY_KEXEC, 0
.set ENTRY_MB1,   1
.set ENTRY_MB2,   2
.set ENTRY_UEFI,  3
.set ENTRY_UNKNOWN, 4

# ---------------------------------------------------------------- headers
.section .multiboot, "a"
.balign 8
multiboot1_header:              # Multiboot 0.6.96 section 3.1
.set MB1_MAGIC, 0x1BADB002
.set MB1_FLAGS, (1 << 1) | (1 << 16)   # want mem info; address fields valid (ELF64 on QEMU)
    .long MB1_MAGIC
    .long MB1_FLAGS
    .long -(MB1_MAGIC + MB1_FLAGS)
    .long multiboot1_header     # header_addr
    .long __image_start         # load_addr: the file is loaded from the PT_LOAD's start
    .long __file_end            # load_end_addr
    .long __image_end           # bss_end_addr
    .long ksave_multiboot_entry # entry_addr

.balign 8
multiboot2_header:              # Multiboot2 1.0 section 3.1
.set MB2_MAGIC, 0xE85250D6
    .long MB2_MAGIC
    .long 0                     # i386 protected mode
    .long multiboot2_header_end - multiboot2_header
    .long -(MB2_MAGIC + (multiboot2_header_end - multiboot2_header))
    .balign 8
    .short 3, 0                 # entry address tag
    .long 12
    .long ksave_multiboot_entry
    .balign 8
    .short 0, 0                 # end tag
    .long 8
multiboot2_header_end:

# ---------------------------------------------------------------- kexec jump
.section .text.entry, "ax"
.code64
.global ksave_kexec_entry
ksave_kexec_entry:
    # relocate_kernel_64.S enters here in long mode on the caller's identity
    # map: CR3 = that map's root, RSP in the swap page (+4096-8 before 6.14,
    # -16 from 6.14), [RSP] = the caller's re-entry address, interrupts off;
    # GDTR limit 0 up to 6.15, a GDT in the control page from 7.x. Keep
    # what the CPU says (caller.rs checks the control page against it)
    # before anything changes it. .data, not .bss: bss is cleared below.
    mov (%rsp), %r12                # caller re-entry
    mov %rsp, %r13                  # caller stack
    mov %cr3, %rax
    mov %rax, ksave_entry_cr3(%rip)
    mov %cr4, %rax
    mov %rax, ksave_entry_cr4(%rip)
    sgdt ksave_entry_gdtr(%rip)
    lea 1f(%rip), %r15
    jmp ksave_own_tables
1:  mov $ENTRY_KEXEC, %edi
    mov %r12, %rsi
    mov %r13, %rdx
    jmp ksave_long_common

# ---------------------------------------------------------------- multiboot
.code32
.global ksave_multiboot_entry
ksave_multiboot_entry:
    # Multiboot 1 and 2 both enter in 32-bit protected mode, paging off,
    # EAX = magic, EBX = information structure.
    cli
    cld
    mov %eax, %esi
    mov %ebx, %edi
    lgdt ksave_gdt_ptr
    ljmp $CODE32, $1f
1:  mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $0x80000001, %eax           # long mode available? (CPUID.80000001h:EDX.LM)
    cpuid
    bt $29, %edx
    jnc no_long_mode
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax            # PG | PE
    mov %eax, %cr0
    ljmp $KERNEL_CS, $2f
no_long_mode:
    hlt
    jmp no_long_mode

.code64
2:  mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $ENTRY_UNKNOWN, %eax
    mov $ENTRY_MB1, %ecx
    cmp $0x2BADB002, %esi
    cmove %ecx, %eax
    mov $ENTRY_MB2, %ecx
    cmp $0x36d76289, %esi
    cmove %ecx, %eax
    mov %edi, %esi                  # info pointer, zero-extended
    mov %eax, %edi
    xor %edx, %edx
    jmp ksave_long_common

# ---------------------------------------------------------------- UEFI
# ksave.efi's entry (tools/src/efiimage.rs): UEFI firmware calls it in long
# mode on its identity map, MS x64 ABI: RCX = image handle, RDX = system
# table, interrupts as the firmware has them (UEFI 2.10, 2.3.4). Until
# ExitBootServices, ksave runs on the firmware's GDT, IDT and page tables;
# only the stack is ksave's own (the firmware's may be 128 KiB). Returns
# the EFI_STATUS ksave_efi_main returns, for the firmware to go on.
.global ksave_efi_entry
ksave_efi_entry:
    push %rbp                       # callee-saved in the MS x64 ABI: rbp,
    push %rdi                       # rdi, rsi (rep stosb below)
    push %rsi
    mov %rsp, %rbp
    mov %rcx, %r8
    mov %rdx, %r9
    # The PE loader zeroes what the file does not hold (ksave's bss); the
    # clear here makes it so whatever loaded it.
    mov $__bss_start, %rdi
    mov $__bss_end, %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    rep stosb
    mov %r8, %rcx
    mov %r9, %rdx
    mov $ksave_stack_top, %rsp
    sub $32, %rsp                   # the callee's home space (MS x64 ABI)
    call ksave_efi_main
    mov %rbp, %rsp
    pop %rsi
    pop %rdi
    pop %rbp
    ret

# ksave_efi_take_over(handover: u64) -> !
# After ExitBootServices: ksave's GDT and page tables, as the kexec entry
# takes them, then the common path (bss cleared, ksave's stack) into Rust as
# ENTRY_UEFI. The hand-over lies in .data, which the clear keeps.
.global ksave_efi_take_over
ksave_efi_take_over:
    cli
    mov %rdi, %r13
    lea 1f(%rip), %r15
    jmp ksave_own_tables
1:  mov $ENTRY_UEFI, %edi
    mov %r13, %rsi
    xor %edx, %edx
    jmp ksave_long_common

# ---------------------------------------------------------------- own tables
# ksave's GDT (CS and the data segments reloaded) and its page tables, for
# the ways in that arrive in long mode on another's (a kexec caller's, the
# firmware's). Ours cover our stack and MMIO; a caller's do not map MMIO.
# With 5-level paging on, LA57 cannot be switched off in long mode: our
# 4-level tables hang under a one-entry PML5. Returns by `jmp *%r15`: the
# stack it was entered on may not be mapped once CR3 is ours. Clobbers rax
# and rcx.
ksave_own_tables:
    lgdt ksave_gdt_ptr(%rip)
    pushq $KERNEL_CS
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:  mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov %cr4, %rax
    mov $boot_pml4, %ecx
    test $CR4_LA57, %eax
    jz 2f
    mov $boot_pml5, %ecx
2:  mov %rcx, %cr3
    jmp *%r15

# ---------------------------------------------------------------- common
# rdi = entry kind, rsi = re-entry address or boot info, rdx = caller rsp.
ksave_long_common:
    # SSE: Rust code uses it. CR0: MP on, EM and TS off; CR4: OSFXSR, OSXMMEXCPT.
    mov %cr0, %rax
    and $~((1 << 2) | (1 << 3)), %rax
    or $(1 << 1), %rax
    mov %rax, %cr0
    mov %cr4, %rax
    or $(CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
    mov %rax, %cr4
    fninit
    ldmxcsr mxcsr_default(%rip)
    mov %rdi, %r12
    mov %rsi, %r13
    mov %rdx, %r14
    # bss again on every entry: a second kexec -e re-enters without a reload.
    mov $__bss_start, %rdi
    mov $__bss_end, %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    rep stosb
    mov $ksave_stack_top, %rsp
    xor %ebp, %ebp
    mov %r12, %rdi
    mov %r13, %rsi
    mov %r14, %rdx
    call ksave_main
    ud2

# ---------------------------------------------------------------- paging mode
# ksave_set_paging(la57: u64 (0 or CR4_LA57), root: u64 below 4 GiB)
# Switches between 4- and 5-level paging, which CR4.LA57 can only change
# with paging off (Intel SDM vol. 3A 4.1.2): down to 32-bit compatibility
# code, paging off (long mode goes inactive, EFER.LME stays set), CR4.LA57
# and CR3, paging on, back to 64-bit code. Runs from ksave's identity-mapped
# image below 4 GiB, interrupts off; the stack must be below 4 GiB too.
.global ksave_set_paging
ksave_set_paging:
    push %rbx
    mov %rdi, %rbx
    lea 1f(%rip), %rax
    pushq $CODE32
    pushq %rax
    lretq
.code32
1:  mov %cr0, %eax
    and $0x7fffffff, %eax           # PG off
    mov %eax, %cr0
    mov %cr4, %eax
    and $~CR4_LA57, %eax
    or %ebx, %eax
    mov %eax, %cr4
    mov %esi, %cr3
    mov %cr0, %eax
    or $0x80000000, %eax            # PG on: long mode active again
    mov %eax, %cr0
    ljmp $KERNEL_CS, $2f
.code64
2:  pop %rbx
    ret

# ---------------------------------------------------------------- jump back
# ksave_return_to_caller(reentry: u64, gdtr: *const [u8; 10] or null) -> !
# Calls the caller's re-entry address (shared/KEXEC-JUMP.md: a `call`, whose
# pushed return address the caller keeps as our next entry point). The next
# `kexec -e` enters at the instruction after the call, in the same state as a
# first entry, so it starts over. With `gdtr`, that GDT is loaded first: the
# kernel's own, for kernels that load segments before reloading a GDT
# (caller.rs). From then on no exception can be handled: nothing may fault.
.global ksave_return_to_caller
ksave_return_to_caller:
    test %rsi, %rsi
    jz 1f
    lgdt (%rsi)
1:  call *%rdi
    jmp ksave_kexec_entry

.section .data
.balign 8
.global ksave_entry_cr3, ksave_entry_cr4, ksave_entry_gdtr
ksave_entry_cr3:  .quad 0
ksave_entry_cr4:  .quad 0
ksave_entry_gdtr: .skip 16          # limit (2 bytes), then base (8)

.section .rodata
.balign 4
mxcsr_default:
    .long 0x1f80

# ksave's stack, in bss like everything it writes.
.section .bss.stack, "aw", @nobits
.balign 16
.global ksave_stack
ksave_stack:
    .skip 64 * 1024
.global ksave_stack_top
ksave_stack_top:
