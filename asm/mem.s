# memcpy, memmove, memset, memcmp/bcmp for a freestanding image. In assembly
# so the compiler cannot turn them back into calls to themselves; `rep movsb`
# and `rep stosb` are fast on CPUs with ERMSB (Intel SDM vol. 1 7.3.9.3).

.section .text
.code64
.global memcpy
memcpy:
    mov %rdi, %rax
    mov %rdx, %rcx
    rep movsb
    ret

.global memmove
memmove:
    mov %rdi, %rax
    mov %rdx, %rcx
    cmp %rsi, %rdi
    jbe 1f                      # dest below src: forward copy is safe
    lea -1(%rsi,%rdx), %rsi
    lea -1(%rdi,%rdx), %rdi
    std
    rep movsb
    cld
    ret
1:  rep movsb
    ret

.global memset
memset:
    mov %rdi, %r9
    mov %esi, %eax
    mov %rdx, %rcx
    rep stosb
    mov %r9, %rax
    ret

.global memcmp
.global bcmp
memcmp:
bcmp:
    xor %eax, %eax
    mov %rdx, %rcx
    test %rcx, %rcx
    jz 2f
    repe cmpsb
    je 2f
    movzbl -1(%rdi), %eax
    movzbl -1(%rsi), %ecx
    sub %ecx, %eax
2:  ret
