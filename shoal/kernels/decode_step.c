/* A whole decode step of a decoder stack in one native call (CPU, float32 or bfloat16): 1-4 tokens, or a
 * batched step of up to decode_step.MAX_TOKENS (256) where every linear has a gemm route.
 *
 * Why: a single-stream decode step of a small model is a few hundred kernel calls (per layer two RMSNorms,
 * four matrix-vector products, rotary, the KV cache write, attention, SiLU-and-mul). Driven from Python, each
 * call costs the interpreter, ctypes and the tensor views and allocations around it: ~1,000 torch ops and
 * ~300 kernel calls a step, a few milliseconds next to a step that streams the weights in 10-20 ms. Here the
 * layer loop runs in C and calls the same kernels (gemv.c, qgemv.c, fused_ops.c, paged_decode_attention.c)
 * through function pointers the caller hands in, so the numbers are the ones the per-op path computes, bit
 * for bit. llama.cpp runs its whole graph natively for the same reason.
 *
 * Linears (linear_t): each is dense in the model dtype (gemv.c) or pack-quantized to int4/int8 with group
 * scales and optional zero points (qgemv.c, the kernel QuantizedLinear calls for 1-4 rows); one dispatch
 * function, `linear`, calls the right kernel, so a layer may mix the two (a layer kept 16-bit by the
 * quantizer beside quantized ones). Steps of more than GEMV_ROWS (4) tokens: every linear must be dense with
 * a gemm route (`gemm` set), the kernel PackedLinear runs for those rows: float32 shoal_gemm_f32_panels over
 * the layer's panels [ceil(n / 16), k, 16] (gemm.pack_panels, PackedLinear's own copy) or shoal_gemm_f32
 * over the weight where no panels were made; bfloat16 shoal_gemm_bf16_panels over its panels
 * [ceil(n / 32), ceil(k / 2), 32, 2] (NULL where gemm.c was built without AVX512-BF16: then bf16 linears
 * carry no gemm route), up to the rows PackedLinear sends it (all, or 47 where its fp32 route measured
 * faster from 48: decode_step.py caps the step there). A bfloat16 linear with panels runs 1-4 rows on
 * them too, as PackedLinear does (gemm.c's decode loop streams them 1.4-2.3x faster than gemv.c the plain
 * weight). qgemv has no form past 4 rows, so quantized models keep 1-4 tokens. check_step refuses a step that breaks this (SHOAL_BAD_INPUT).
 * What a batched step saves is the per-op path's overhead, 5-15 ms a step (SmolLM2-135M, 2 threads, 2-core
 * Zen 4 EPYC, 8/32/64 sequences: float32 1.18/1.15/1.08x a step, bfloat16 1.45/1.25/1.22x; at 128-256
 * 1.00-1.11x; docs/performance.md).
 *
 * Data flow per layer l (vLLM's residual convention: x is the previous sublayer's output, not yet added):
 *   l == 0: residual = embeddings; x = rms_norm(residual) * input_norm
 *   l >  0: residual += x; x = rms_norm(residual) * input_norm
 *   qkv = x W_qkv^T (+ b); rotate the q and k heads of each token at its position (neox style)
 *   k, v of token t -> cache slot slots[t]; q -> its own buffer; attn = paged attention over the blocks
 *   x = attn W_o^T (+ b); residual += x; x = rms_norm(residual) * post_norm
 *   x = silu(gate) * up of x W_gate_up^T; x = x W_down^T (+ b)
 * and finally residual += x; x = rms_norm(residual) * final_norm: the final hidden states, left in x.
 *
 * Layouts (row-major, contiguous, elements of the model dtype unless said): embeddings, x and residual
 * [T, hidden]; qkv [T, (H + 2 Hkv) D]; q and attn [T, H D]; gate_up [T, 2 I]; act [T, I] (the first T rows
 * of buffers sized for the largest step); cos_sin float32 [max_positions, D] (cos in the first half of a
 * row, sin in the second); positions and slots int64 [T];
 * block_tables int32 [T, W]; context_lens int32 [T]; k/v caches [num_slots, Hkv, D]. A dense weight is
 * [n, k]; a quantized one is qgemv.c's: packed int32 [n, k * bits / 32] (or, signed_codes, 8-bit torch's
 * int8 [n, k] as qgemv takes it: a symmetric per-channel layer on torch's int8 route), scale [n, k / group]
 * float32 or bfloat16, zero points int8 [n, k / group] or NULL; biases [n] of the model dtype or NULL.
 *
 * Inputs: the caller (decode_step.py) checks the dtypes, shapes and strides of every tensor once per model
 * and per step. What depends on contents is checked here, in one serial pass before anything is written
 * (SHOAL_BAD_INPUT): every position within the rotary table, every slot within the cache, every context
 * length within its table row and every block id a sequence reads within the cache. A kernel's failure
 * status (the bf16 gemv's allocation) is returned as is.
 */
#include <stdint.h>
#include <string.h>

#define SHOAL_OK 0
#define SHOAL_BAD_INPUT 2
#define SHOAL_STOPPED 3 /* between_layers asked to stop: the step is abandoned (engine/interrupt.py) */
#define GEMV_ROWS 4 /* gemv.c's and qgemv.c's MAX_ROWS: more rows go to a gemm kernel */

/* The kernels' exported signatures (gemv.c, fused_ops.c, paged_decode_attention.c). */
typedef void (*gemv_f32_fn)(const float *, const float *, const float *, float *, int, int, int, int);
typedef int (*gemv_bf16_fn)(const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, int, int, int, int);
typedef void (*rms_norm_fn)(const void *, void *, const void *, void *, int, int, float, int, int, int);
typedef void (*rotary_fn)(void *, const float *, int, int, int, int64_t, int, int);
typedef void (*silu_and_mul_fn)(const void *, void *, int, int, int, int);
typedef int (*attention_fn)(const void *, const void *, const void *, const int32_t *, const int32_t *, void *, int,
                            int, int, int, int, int, int, int, float, int, int);
typedef void (*qgemv_fn)(const void *, int, const int32_t *, const void *, int, const int8_t *, const void *, void *,
                         int, int, int, int, int, int, int, int);
/* gemm.c's (and the bf16 panels kernel's): x, w or panels, bias, y; M, N, K, threads. */
typedef void (*gemm_f32_fn)(const float *, const float *, const float *, float *, int, int, int, int);
typedef void (*gemm_bf16_fn)(const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, int, int, int, int);

typedef struct {
    gemv_f32_fn gemv_f32;
    gemv_bf16_fn gemv_bf16;
    rms_norm_fn rms_norm;
    rotary_fn rotary;
    silu_and_mul_fn silu_and_mul;
    attention_fn attention;
    qgemv_fn qgemv; /* NULL where qgemv.c is not built: then no linear is LINEAR_QUANT */
    gemm_f32_fn gemm_f32;             /* over the plain weight [n, k] */
    gemm_f32_fn gemm_f32_panels;      /* over gemm.c's panels [ceil(n / 16), k, 16] */
    gemm_bf16_fn gemm_bf16_panels;    /* over the bf16 kernel's panels; NULL where it is not built */
} kernels_t;

enum { LINEAR_F32 = 0, LINEAR_BF16 = 1, LINEAR_QUANT = 2 };

typedef struct { /* one linear layer out[T, n] = in[T, k] W^T + bias, W as `kind` says (layouts in the header) */
    int64_t kind;
    const void *w, *bias; /* the dense weight or the packed int32 one; bias may be NULL */
    const void *scale;    /* LINEAR_QUANT only, as are the fields below */
    const int8_t *zero;   /* NULL: symmetric */
    int64_t bits, group, scale_bf16;
    const void *panels; /* dense only: the weight packed for the gemm kernel (rows > GEMV_ROWS), or NULL */
    int64_t gemm;       /* dense only: 1 where steps of more than GEMV_ROWS rows may run this linear */
    int64_t signed_codes; /* LINEAR_QUANT, 8 bits: w is torch's int8 weight [n, k] (signed q), as qgemv takes it */
} linear_t;

typedef struct { /* one decoder layer */
    const void *input_norm, *post_norm;
    linear_t qkv, o, gate_up, down;
    void *k_cache, *v_cache;
    int64_t window; /* sliding window in keys, 0 for none */
} layer_t;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, num_layers;
    int64_t num_slots, block_size, max_positions, bf16;
    float eps, scale;
} dims_t;

typedef struct { /* the step's inputs and scratch, as in the header */
    const void *embeddings, *final_norm;
    const float *cos_sin;
    const int64_t *positions, *slots;
    const int32_t *block_tables, *context_lens;
    void *residual, *x, *qkv, *q, *attn, *gate_up, *act;
    int64_t tokens, table_width, threads;
    /* NULL, or called after every layer but the last, outside any parallel region; non-zero stops the step
     * there (SHOAL_STOPPED), with the layers before it already written to the KV cache, as the per-op
     * forward leaves them when its between-layers call raises */
    int (*between_layers)(void);
} step_t;

#define AT(p, elems) ((char *)(p) + (int64_t)(elems) * es)

/* The activations' dtype (bf16) is the model's; qgemv's use_dot is 1, as QuantizedLinear's call passes it.
 * Up to GEMV_ROWS rows: the matrix-vector kernels, except a bfloat16 linear with panels (and the kernel),
 * which PackedLinear runs on the panels for every row count (gemm.c's decode loop streams them faster).
 * More: the gemm kernel that PackedLinear runs for the same rows (float32 over its panels, else over the
 * plain weight; bfloat16 over its panels), which gemm_ready() has checked is there for every linear before
 * the step began. */
static int linear(const kernels_t *k, const linear_t *w, int bf16, const void *in, void *out, int64_t rows,
                  int64_t n, int64_t kdim, int threads) {
    if (rows > GEMV_ROWS || (w->kind == LINEAR_BF16 && w->panels && k->gemm_bf16_panels)) {
        if (w->kind == LINEAR_BF16)
            k->gemm_bf16_panels(in, w->panels, w->bias, out, (int)rows, (int)n, (int)kdim, threads);
        else if (w->panels)
            k->gemm_f32_panels(in, w->panels, w->bias, out, (int)rows, (int)n, (int)kdim, threads);
        else
            k->gemm_f32(in, w->w, w->bias, out, (int)rows, (int)n, (int)kdim, threads);
        return SHOAL_OK;
    }
    switch (w->kind) {
    case LINEAR_F32:
        k->gemv_f32(in, w->w, w->bias, out, (int)rows, (int)n, (int)kdim, threads);
        return SHOAL_OK;
    case LINEAR_BF16:
        return k->gemv_bf16(in, w->w, w->bias, out, (int)rows, (int)n, (int)kdim, threads);
    default:
        k->qgemv(in, bf16, w->w, w->scale, (int)w->scale_bf16, w->zero, w->bias, out, (int)rows, (int)n, (int)kdim,
                 (int)w->group, (int)w->bits, 1, threads, (int)w->signed_codes);
        return SHOAL_OK;
    }
}

/* Whether linear() can run this linear for more than GEMV_ROWS rows: a dense one marked for it, with the
 * kernel (and for bfloat16 the panels) it will call. */
static int gemm_ready(const kernels_t *k, const linear_t *w) {
    if (!w->gemm) return 0;
    if (w->kind == LINEAR_F32) return w->panels ? k->gemm_f32_panels != NULL : k->gemm_f32 != NULL;
    return w->kind == LINEAR_BF16 && w->panels && k->gemm_bf16_panels;
}

/* q and k heads rotated in place at each token's position; k and v written to the cache; q copied out. */
static void rotate_and_cache(const kernels_t *k, const dims_t *d, const layer_t *layer, const step_t *s) {
    const int64_t es = d->bf16 ? 2 : 4, D = d->head_dim, H = d->heads, Hkv = d->kv_heads;
    const int64_t row = (H + 2 * Hkv) * D;
    for (int64_t t = 0; t < s->tokens; t++) {
        void *qkv_t = AT(s->qkv, t * row);
        k->rotary(qkv_t, s->cos_sin + s->positions[t] * D, 1, (int)(H + Hkv), (int)D, row, (int)d->bf16, 1);
        memcpy(AT(layer->k_cache, s->slots[t] * Hkv * D), AT(qkv_t, H * D), (size_t)(Hkv * D * es));
        memcpy(AT(layer->v_cache, s->slots[t] * Hkv * D), AT(qkv_t, (H + Hkv) * D), (size_t)(Hkv * D * es));
        memcpy(AT(s->q, t * H * D), qkv_t, (size_t)(H * D * es));
    }
}

static int attention_block(const kernels_t *k, const dims_t *d, const layer_t *layer, const step_t *s) {
    const int64_t H = d->heads, D = d->head_dim, T = s->tokens;
    const int threads = (int)s->threads, bf16 = (int)d->bf16;
    int status = linear(k, &layer->qkv, bf16, s->x, s->qkv, T, (H + 2 * d->kv_heads) * D, d->hidden, threads);
    if (status != SHOAL_OK) return status;
    rotate_and_cache(k, d, layer, s);
    status = k->attention(s->q, layer->k_cache, layer->v_cache, s->block_tables, s->context_lens, s->attn, (int)T,
                          (int)H, (int)d->kv_heads, (int)D, (int)s->table_width, (int)d->block_size,
                          (int)(d->num_slots / d->block_size), (int)layer->window, d->scale, bf16, threads);
    if (status != SHOAL_OK) return status;
    return linear(k, &layer->o, bf16, s->attn, s->x, T, d->hidden, H * D, threads);
}

static int mlp_block(const kernels_t *k, const dims_t *d, const layer_t *layer, const step_t *s) {
    const int64_t T = s->tokens, I = d->intermediate;
    const int threads = (int)s->threads, bf16 = (int)d->bf16;
    int status = linear(k, &layer->gate_up, bf16, s->x, s->gate_up, T, 2 * I, d->hidden, threads);
    if (status != SHOAL_OK) return status;
    k->silu_and_mul(s->gate_up, s->act, (int)T, (int)I, bf16, threads);
    return linear(k, &layer->down, bf16, s->act, s->x, T, d->hidden, I, threads);
}

/* At least one token, and for more than GEMV_ROWS a gemm kernel for every linear; each token's position
 * within the rotary table and slot within the cache; each sequence's context length within its table row and
 * every block id it reads within the cache (the attention kernel's own rule). */
static int check_step(const kernels_t *k, const dims_t *d, const layer_t *layers, const step_t *s) {
    const int64_t num_blocks = d->num_slots / d->block_size, W = s->table_width;
    if (s->tokens < 1) return SHOAL_BAD_INPUT;
    if (s->tokens > GEMV_ROWS)
        for (int64_t l = 0; l < d->num_layers; l++) {
            const layer_t *layer = layers + l;
            if (!(gemm_ready(k, &layer->qkv) && gemm_ready(k, &layer->o) && gemm_ready(k, &layer->gate_up) &&
                  gemm_ready(k, &layer->down)))
                return SHOAL_BAD_INPUT;
        }
    for (int64_t t = 0; t < s->tokens; t++) {
        if ((uint64_t)s->positions[t] >= (uint64_t)d->max_positions) return SHOAL_BAD_INPUT;
        if ((uint64_t)s->slots[t] >= (uint64_t)d->num_slots) return SHOAL_BAD_INPUT;
        const int64_t len = s->context_lens[t];
        if (len < 1 || len > W * d->block_size) return SHOAL_BAD_INPUT;
        for (int64_t i = 0; i < (len + d->block_size - 1) / d->block_size; i++)
            if ((uint64_t)s->block_tables[t * W + i] >= (uint64_t)num_blocks) return SHOAL_BAD_INPUT;
    }
    return SHOAL_OK;
}

/* The final hidden states [T, hidden] in s->x; SHOAL_OK or the first failing check's or kernel's status. */
int shoal_decode_step(const kernels_t *k, const dims_t *d, const layer_t *layers, const step_t *s) {
    const int64_t es = d->bf16 ? 2 : 4, T = s->tokens, hidden = d->hidden;
    const int threads = (int)s->threads, bf16 = (int)d->bf16;
    int status = check_step(k, d, layers, s);
    if (status != SHOAL_OK) return status;
    memcpy(s->residual, s->embeddings, (size_t)(T * hidden * es));
    k->rms_norm(s->residual, NULL, layers[0].input_norm, s->x, (int)T, (int)hidden, d->eps, bf16, 0, threads);
    for (int64_t l = 0; l < d->num_layers; l++) {
        const layer_t *layer = layers + l;
        if (l > 0)
            k->rms_norm(s->x, s->residual, layer->input_norm, s->x, (int)T, (int)hidden, d->eps, bf16, 1, threads);
        if ((status = attention_block(k, d, layer, s)) != SHOAL_OK) return status;
        k->rms_norm(s->x, s->residual, layer->post_norm, s->x, (int)T, (int)hidden, d->eps, bf16, 1, threads);
        if ((status = mlp_block(k, d, layer, s)) != SHOAL_OK) return status;
        if (s->between_layers != NULL && l + 1 < d->num_layers && s->between_layers()) return SHOAL_STOPPED;
    }
    k->rms_norm(s->x, s->residual, s->final_norm, s->x, (int)T, (int)hidden, d->eps, bf16, 1, threads);
    return SHOAL_OK;
}
