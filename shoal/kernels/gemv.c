/* Float32 matrix-vector products for decode: y[m, n] = sum_k x[m, k] * w[n, k] + bias[n], for 1-4 rows of x.
 *
 * Why: at one token per step every weight is read once per step, so decode speed is memory bandwidth.
 * torch's CPU linear (MKL or oneDNN) streams a 3072x576 fp32 weight at about 11 GB/s here whether it has
 * one thread or two, while two threads reading memory reach about 29 GB/s on the same 2-core AMD EPYC.
 * Here each thread streams its own contiguous half of the weight rows, reading every weight once for all
 * rows of x.
 *
 * Layouts (row-major, contiguous): x [M, K], w [N, K], bias [N] or NULL, y [M, N]. M <= MAX_ROWS.
 */
#include <stdint.h>
#include <string.h>

#define VW 8
#define MAX_ROWS 4
typedef float v8f __attribute__((vector_size(VW * sizeof(float))));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum(v8f v) {
    float s = 0.0f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

/* One weight row against the M rows of x; always inlined so that M = 1 gets its own unrolled copy. */
static inline __attribute__((always_inline)) void row_dot(const float *x, const float *wr, int M, int K,
                                                          float *out) {
    v8f acc0[MAX_ROWS], acc1[MAX_ROWS];
    float tail[MAX_ROWS];
    for (int m = 0; m < M; m++) acc0[m] = acc1[m] = (v8f){0}, tail[m] = 0.0f;
    int k = 0;
    for (; k + 2 * VW <= K; k += 2 * VW) {
        v8f w0 = load8(wr + k), w1 = load8(wr + k + VW);
        for (int m = 0; m < M; m++) {
            acc0[m] += w0 * load8(x + (int64_t)m * K + k);
            acc1[m] += w1 * load8(x + (int64_t)m * K + k + VW);
        }
    }
    for (; k < K; k++)
        for (int m = 0; m < M; m++) tail[m] += wr[k] * x[(int64_t)m * K + k];
    for (int m = 0; m < M; m++) out[m] = hsum(acc0[m] + acc1[m]) + tail[m];
}

void shoal_gemv_f32(const float *x, const float *w, const float *bias, float *y, int M, int N, int K,
                    int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int n = 0; n < N; n++) {
        float out[MAX_ROWS];
        if (M == 1) row_dot(x, w + (int64_t)n * K, 1, K, out);
        else row_dot(x, w + (int64_t)n * K, M, K, out);
        float b = bias ? bias[n] : 0.0f;
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = out[m] + b;
    }
}
