# CPU exception stubs (vectors 0-31): push a uniform frame and hand it to
# Rust, which reports it and stops. Intel SDM vol. 3A 6.3.1 and table 6-1:
# vectors 8, 10-14, 17, 21, 29, 30 push an error code.

.section .text
.code64
.macro exception_stub vector
    .balign 16
exception_\vector:
    .if \vector == 8 || (\vector >= 10 && \vector <= 14) || \vector == 17 || \vector == 21 || \vector == 29 || \vector == 30
    .else
    pushq $0
    .endif
    pushq $\vector
    jmp exception_common
.endm

.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
exception_stub \v
.endr

exception_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    and $-16, %rsp
    call ksave_exception
    ud2

.section .rodata
.balign 8
.global ksave_exception_stubs
ksave_exception_stubs:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_\v
.endr
