/* 8-lane float32 vectors in GCC's generic vector extensions, for the kernels' vector loops: AVX2 registers
 * where the CPU has them, SSE pairs or scalar code elsewhere (GCC lowers them). Loads go through memcpy, so
 * no alignment is assumed. Included by gemm.c, gemv.c, fused_ops.c and argmax.c; the build key of a kernel
 * covers this file (kernels/__init__.py).
 */
#ifndef SHOAL_VEC8_H
#define SHOAL_VEC8_H
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* 8 bfloat16 values widened to float32 (exact: bf16 is the upper half of a float32). */
static inline v8f load8_bf16(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    return (v8f)(__builtin_convertvector(h, v8u) << 16);
}

/* a where mask (a comparison's all-ones lanes), else b: bitwise, so NaN lanes pass through unchanged. */
static inline v8f select8(v8i mask, v8f a, v8f b) { return (v8f)(((v8i)a & mask) | ((v8i)b & ~mask)); }
#endif
