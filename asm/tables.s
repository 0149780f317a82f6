# Static descriptor and page tables, in .data so no entry path must build them
# before it can run 64-bit code.

.section .data.tables, "aw"
# GDT laid out like Linux's (arch/x86/include/asm/segment.h): index 1 32-bit
# code, 2 = __KERNEL_CS, 3 = __KERNEL_DS. Index 4-5 take ksave's TSS.
.balign 16
.global ksave_gdt
ksave_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    # 0x08 32-bit code
    .quad 0x00af9a000000ffff    # 0x10 64-bit code
    .quad 0x00cf92000000ffff    # 0x18 data
    .quad 0, 0                  # 0x20 TSS, filled in by Rust
ksave_gdt_end:
.balign 8
.global ksave_gdt_ptr
ksave_gdt_ptr:
    .short ksave_gdt_end - ksave_gdt - 1
    .quad ksave_gdt

# Identity map of the first 4 GiB with 2 MiB pages: all RAM of a small
# machine plus the 32-bit PCI MMIO hole (AHCI, LAPIC, IOAPIC). Intel SDM
# vol. 3A 4.5: PS=bit 7, RW=bit 1, P=bit 0.
.balign 4096
.global boot_pml5
boot_pml5:
    .quad boot_pml4 + 0x3
    .fill 511, 8, 0
.global boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x3
    .fill 511, 8, 0
.global boot_pdpt
boot_pdpt:
    .quad boot_pd + 0x3
    .quad boot_pd + 0x1003
    .quad boot_pd + 0x2003
    .quad boot_pd + 0x3003
    .fill 508, 8, 0
.global boot_pd
boot_pd:
.set page, 0
.rept 2048
    .quad (page << 21) | 0x83
    .set page, page + 1
.endr
