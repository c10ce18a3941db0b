/* bfloat16 <-> float32, one value at a time, for the kernels' scalar edges (bias, stores, tails).
 *
 * bf16 is the upper half of an IEEE float32 (Google Brain's format; the layout torch's c10::BFloat16 uses).
 * Widening is exact. Narrowing rounds to nearest, ties to even, as torch does; a NaN stays a NaN (quiet,
 * its sign and upper payload kept) instead of rounding into infinity. Included by gemm.c, gemv.c, qgemv.c
 * and paged_decode_attention.c; the build key of a kernel covers this file (kernels/__init__.py).
 */
#ifndef SHOAL_BF16_H
#define SHOAL_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
#endif
