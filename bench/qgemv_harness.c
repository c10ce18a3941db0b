// The decoder linears of a SmolLM2-135M single-stream decode step (30 layers x qkv 960x576, o 576x576,
// gate_up 3072x576, down 576x1536), one row of bf16 x, called natively as decode_step.c calls them: qgemv.c
// (int4 g64 or int8 g64 / g128, bf16 scales, random codes) or gemm.c's bf16 panels (BITS 16), the weights in
// one 2 MB-aligned buffer advised MADV_HUGEPAGE (NO_HUGE=1: not), as shoal/model/huge_pages.py places them.
// Prints the best and median step over STEPS (the first two dropped) and each shape's ms a step.
//   cc -O2 -fopenmp bench/qgemv_harness.c -o /tmp/qgemv_harness -ldl
//   cc -Ishoal/kernels -O3 -march=native -fno-math-errno -ffp-contract=fast -fopenmp -shared -fPIC \
//       shoal/kernels/qgemv.c -o /tmp/qgemv.so -lmvec -lm      (gemm.c -> /tmp/gemm.so likewise)
//   /tmp/qgemv_harness /tmp/qgemv.so {4,8} THREADS [STEPS];  /tmp/qgemv_harness /tmp/gemm.so 16 THREADS [STEPS]
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
typedef void (*qgemv_fn)(const void *, int, const int32_t *, const void *, int, const int8_t *, const void *, void *, int, int, int, int, int, int, int, int);
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }
int main(int argc, char **argv) {
    void *h = dlopen(argv[1], RTLD_NOW); if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    qgemv_fn f = (qgemv_fn)dlsym(h, "shoal_qgemv");
    void (*g)(const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, int, int, int, int) = dlsym(h, "shoal_gemm_bf16_panels");
    int bits = atoi(argv[2]), threads = atoi(argv[3]), steps = argc > 4 ? atoi(argv[4]) : 40;
    if (steps < 3 || steps > 1000) { fprintf(stderr, "STEPS must be 3..1000\n"); return 1; }
    int N[4] = {960, 576, 3072, 576}, K[4] = {576, 576, 576, 1536}, Gs[4] = {64, 64, 64, bits == 8 ? 128 : 64};
    size_t total = 0, off[30][4];
    for (int l = 0; l < 30; l++) for (int s = 0; s < 4; s++) { off[l][s] = total; total += (size_t)N[s] * K[s] * bits / 8; total = (total + 63) & ~63ul; }
    size_t len = (total + (2 << 20)) & ~((2ul << 20) - 1);
    uint8_t *raw = mmap(NULL, len + (2ul << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) { perror("mmap"); return 1; }
    uint8_t *w = (uint8_t *)(((uintptr_t)raw + (2ul << 20) - 1) & ~((2ul << 20) - 1));
    if (getenv("NO_HUGE") == NULL) madvise(w, len, MADV_HUGEPAGE);
    srand(1); for (size_t i = 0; i < total; i++) w[i] = rand();
    uint16_t *scale[4], *x[4], *y = malloc(3072 * 2);
    for (int s = 0; s < 4; s++) {
        int G = K[s] / Gs[s]; scale[s] = malloc((size_t)N[s] * G * 2);
        for (int i = 0; i < N[s] * G; i++) scale[s][i] = 0x3c00 + (rand() & 0x7f); // ~0.008
        x[s] = malloc(K[s] * 2); for (int i = 0; i < K[s]; i++) x[s][i] = 0x3f80 ^ (rand() & 0x807f);
    }
    double t[1000], per[4] = {0};
    for (int r = 0; r < steps; r++) {
        double t0 = now();
        for (int l = 0; l < 30; l++) for (int s = 0; s < 4; s++) {
            double a = now();
            if (bits == 16) g(x[s], (const uint16_t *)(w + off[l][s]), NULL, y, 1, N[s], K[s], threads);
            else f(x[s], 1, (const int32_t *)(w + off[l][s]), scale[s], 1, NULL, NULL, y, 1, N[s], K[s], Gs[s], bits, 1, threads, 0);
            if (r >= 2) per[s] += now() - a;
        }
        t[r] = now() - t0;
    }
    qsort(t + 2, steps - 2, sizeof(double), cmp);
    printf("best %.3f ms median %.3f ms (%.1f MB: %.1f GB/s best); per shape ms/step: %.3f %.3f %.3f %.3f\n", t[2] * 1e3, t[2 + (steps - 2) / 2] * 1e3,
           total / 1e6, total / t[2] / 1e9, per[0] / (steps - 2) * 1e3, per[1] / (steps - 2) * 1e3, per[2] / (steps - 2) * 1e3, per[3] / (steps - 2) * 1e3);
    return 0;
}
