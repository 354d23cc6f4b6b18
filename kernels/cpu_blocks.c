/* The compiled CPU backend of a gated bottleneck: the whole block on one image in one call.
 *
 * dp_block_forward pools the block input, runs both ManiDP gates (fc1 -> ReLU -> fc2 + bias ->
 * ReLU), keeps the groups whose saliency reaches the threshold (the decision of Gate.group_keep
 * in dynprune/gates.py), builds both kept-channel lists, each padded to a multiple of its pad_to
 * with zero-scaled copies, gathers the kept weights, then runs the block's three products on the
 * kept channels with bias, SiLU, saliency scale and shortcut fused, tiled in vector registers.
 * dp_dense_forward runs the same products on every channel of an un-gated block. Python
 * (kernels/cpu_blocks.py) compiles this file on first use; its specification is the reference
 * backend (kernels/reference.py), which the tests compare it with.
 */
#define _POSIX_C_SOURCE 199309L  /* clock_gettime under -std=c99 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <time.h>

/* Built with -fopenmp where PyTorch runs on GNU OpenMP (kernels/cpu_blocks.py checks): the
   parallel loops below then run on PyTorch's own thread pool, whose workers are still spinning
   from the block's previous matrix product, and follow torch.set_num_threads. Built without it,
   the pragmas are ignored and the step is serial. Only large loops go parallel: a parallel
   region costs a few microseconds, the small blocks' whole step about 50. */
#define POOL_CHUNK 64                  /* pixels per float partial sum of the pool */
#define POOL_PARALLEL_MIN (1 << 16)    /* pool in parallel from this many input values */
#define GATHER_PARALLEL_MIN (1 << 15)  /* gathers in parallel from this many weights */

typedef struct {
    int64_t c, h1, h2, hid1, hid2, g1, g2, group1, group2, taps, pad_to1, pad_to2;
    const float *fc1_t;      /* (c, hid1 + hid2): both gates' first layer side by side */
    const float *fc2a_t;     /* (hid1, g1): gate 1's second layer */
    const float *fc2b_t;     /* (hid2, g2): gate 2's second layer */
    const float *fc2_b;      /* (g1 + g2) */
    const float *thresholds; /* (g1 + g2), already >= the smallest positive float */
    const float *rows;       /* (h1 + h2, c + 1): W1 | b1 rows, then W3^T | b2 rows */
    double *pooled;          /* scratch (c) */
    float *chunk_sums;       /* scratch (chunk_capacity, c): the pool's per-chunk partial sums */
    int64_t chunk_capacity;  /* chunks of POOL_CHUNK pixels that chunk_sums holds */
    float *hidden;           /* scratch (hid1 + hid2) */
    float *saliency;         /* out (g1 + g2) */
    int64_t *index;          /* out (h1 + pad_to1 + h2 + pad_to2): rows of `rows`, gate 1 then gate 2 */
    float *scale;            /* out, same length: each slot's saliency, 0 for padding */
    float *rows_out;         /* out (h1 + pad_to1 + h2 + pad_to2, c + 1) */
    int64_t *counts;         /* out: kept1, kept2, slots1, slots2 */
    int64_t *run_bounds;     /* scratch (h1 + pad_to1 + 1): first slot of each run of gate 1's list */
    int64_t *run_bounds2;    /* scratch (h2 + pad_to2 + 1): the same for gate 2's list */
    const float *w1_kn;      /* (c, h1): W1 transposed, a row per input channel */
    const float *w2_tio;     /* (taps, h1, h2): W2 with the input channel before the output one */
    const float *b3;         /* (round16(c) + 16): cv3's bias, zero padded */
    float *w1_out;           /* out (c, round16(h1 + pad_to1)): kept columns of W1 transposed */
    float *b1_out;           /* out (round16(h1 + pad_to1) + 16) */
    float *w2t_out;          /* out (taps, h1 + pad_to1, round16(h2 + pad_to2)) */
    float *b2_out;           /* out (round16(h2 + pad_to2) + 16) */
    float *maps;             /* scratch (map_capacity): cv1's zero-bordered output, then the 3x3's */
    int64_t map_capacity;
    double *gate_seconds;    /* out: dp_block_forward's time before its products (the gates' cost) */
    int64_t *macs;           /* out: multiply-adds dp_block_forward's products ran, vector lanes included */
    int64_t *gathered;       /* dp_block_forward's last gather: slots1, slots2, then its index lists (capacity + 2);
                                slots1 = -1 before the first (the caller sets it, and again when weights change) */
    int64_t *reused;         /* out: 1 where this call reused the last gather (the same kept lists), else 0 */
    float *constant_row;     /* scratch (c): the block's constant output where a gate keeps nothing */
} dp_block;

/* Kept channels of one gate from its group decisions, padded; returns the slot count. */
static int64_t kept_list(const float *saliency, const float *thresholds, int64_t groups, int64_t group,
                         int64_t width, int64_t offset, int64_t pad_to, int64_t *index, float *scale,
                         int64_t *kept_out) {
    int64_t n = 0;
    for (int64_t g = 0; g < groups; ++g) {
        if (!(saliency[g] >= thresholds[g])) continue;
        for (int64_t j = 0; j < group; ++j) {
            int64_t ch = g * group + j;
            if (ch >= width) break;
            index[n] = offset + ch;
            scale[n] = saliency[g];
            ++n;
        }
    }
    *kept_out = n;
    int64_t slots = n + (pad_to - n % pad_to) % pad_to;
    for (int64_t k = n; k < slots; ++k) { /* zero-scaled copies of the first kept channel */
        index[k] = index[0];
        scale[k] = 0.0f;
    }
    return slots;
}

static inline int gates_and_kept_lists(const dp_block *b, const float *pixels, int64_t hw) {
    const int64_t c = b->c, hid = b->hid1 + b->hid2;

    /* global average pool: float sums over chunks of POOL_CHUNK pixels (vectorized loops),
       then the chunks added in double (hw is up to 6400 at 320 px). The chunks are fixed, so
       the result is the same for any number of threads. */
    const int64_t chunks = (hw + POOL_CHUNK - 1) / POOL_CHUNK;
    if (chunks > b->chunk_capacity) return -1;
    #pragma omp parallel for schedule(static) if (hw * c >= POOL_PARALLEL_MIN)
    for (int64_t q = 0; q < chunks; ++q) {
        float *sum = b->chunk_sums + q * c;
        const int64_t p1 = (q + 1) * POOL_CHUNK < hw ? (q + 1) * POOL_CHUNK : hw;
        for (int64_t k = 0; k < c; ++k) sum[k] = 0.0f;
        for (int64_t p = q * POOL_CHUNK; p < p1; ++p) {
            const float *px = pixels + p * c;
            for (int64_t k = 0; k < c; ++k) sum[k] += px[k];
        }
    }
    for (int64_t k = 0; k < c; ++k) b->pooled[k] = 0.0;
    for (int64_t q = 0; q < chunks; ++q)
        for (int64_t k = 0; k < c; ++k) b->pooled[k] += b->chunk_sums[q * c + k];
    /* both gates' first layer, then ReLU */
    for (int64_t j = 0; j < hid; ++j) b->hidden[j] = 0.0f;
    for (int64_t k = 0; k < c; ++k) {
        const float v = (float)(b->pooled[k] / (double)hw);
        const float *w = b->fc1_t + k * hid;
        for (int64_t j = 0; j < hid; ++j) b->hidden[j] += v * w[j];
    }
    for (int64_t j = 0; j < hid; ++j) b->hidden[j] = b->hidden[j] > 0.0f ? b->hidden[j] : 0.0f;
    /* second layers (block-diagonal: each gate reads its own hidden units), bias, ReLU */
    for (int64_t g = 0; g < b->g1 + b->g2; ++g) b->saliency[g] = b->fc2_b[g];
    for (int64_t j = 0; j < b->hid1; ++j) {
        const float v = b->hidden[j];
        const float *w = b->fc2a_t + j * b->g1;
        for (int64_t g = 0; g < b->g1; ++g) b->saliency[g] += v * w[g];
    }
    for (int64_t j = 0; j < b->hid2; ++j) {
        const float v = b->hidden[b->hid1 + j];
        const float *w = b->fc2b_t + j * b->g2;
        for (int64_t g = 0; g < b->g2; ++g) b->saliency[b->g1 + g] += v * w[g];
    }
    for (int64_t g = 0; g < b->g1 + b->g2; ++g) b->saliency[g] = b->saliency[g] > 0.0f ? b->saliency[g] : 0.0f;

    int64_t kept1, kept2;
    const int64_t slots1 = kept_list(b->saliency, b->thresholds, b->g1, b->group1, b->h1, 0, b->pad_to1,
                                     b->index, b->scale, &kept1);
    const int64_t slots2 = kept_list(b->saliency + b->g1, b->thresholds + b->g1, b->g2, b->group2, b->h2, b->h1,
                                     b->pad_to2, b->index + slots1, b->scale + slots1, &kept2);
    b->counts[0] = kept1;
    b->counts[1] = kept2;
    b->counts[2] = slots1;
    b->counts[3] = slots2;
    return 0;
}

/* Start of each run of consecutive channels in the kept list index[0, n), then n: the run count. */
static int64_t kept_runs(const int64_t *index, int64_t n, int64_t *bounds) {
    int64_t runs = 0;
    for (int64_t i = 0; i < n; ++i)
        if (i == 0 || index[i] != index[i - 1] + 1) bounds[runs++] = i;
    bounds[runs] = n;
    return runs;
}

/* W3^T | b2 rows of gate 2's slots, rows [first, slots1 + slots2) of rows_out. */
static inline void gather_rows(const dp_block *b, int64_t first) {
    const int64_t c = b->c, width = c + 1, slots1 = b->counts[2], slots2 = b->counts[3];
    #pragma omp parallel for schedule(static) if ((slots1 + slots2 - first) * width >= GATHER_PARALLEL_MIN)
    for (int64_t r = first; r < slots1 + slots2; ++r)
        memcpy(b->rows_out + r * width, b->rows + b->index[r] * width, (size_t)width * sizeof(float));
}

/* Pixels per chunk of the pool, for the caller sizing chunk_sums. */
int64_t dp_pool_chunk(void) { return POOL_CHUNK; }

/* ---------------------------------------------------------------------------------------------
 * The whole compact block in one call: dp_block_forward.
 *
 * The step above, then the block's three products on the kept channels, each fused with what
 * follows it: cv1 + b1 + SiLU into a zero-bordered map, the 3x3 + b2 + SiLU, cv3 + b3 + the
 * shortcut, in one OpenMP region with a barrier between the three (threads take whole image
 * rows, so most of what a thread reads it wrote itself). Why not PyTorch's matrix products and
 * oneDNN's convolution, as the dense network runs: on compact widths (16-144 channels) these run
 * at half the dense layers' speed per FLOP on two cores, and each call costs a pass over its
 * output for the bias, the SiLU or the add, plus a weight reorder and a call of Python; measured
 * in BENCHMARKS.md. The products use GCC's vector extensions (also in clang), as
 * wide as the target's registers: AVX-512 or AVX2 on x86-64, NEON on ARM.
 */
/* The tile of one product: MR pixels of an image row x NV vectors of VL output channels, all
   its sums in registers. Sized to the register file of the target the library is built for
   (-march=native where the compiler has it; kernels/cpu_blocks.py keys its cache on the CPU). */
#if defined(__AVX512F__)
#define VL 16  /* 32 zmm registers: 20 sums, 2 weight vectors, a broadcast */
#define NV 2
#define MR 10
#elif defined(__AVX__)
#define VL 8   /* 16 ymm registers: 10 sums */
#define NV 2
#define MR 5
#elif defined(__aarch64__)
#define VL 4   /* NEON, 32 q registers: 20 sums */
#define NV 4
#define MR 5
#else
#define VL 4   /* SSE2 and anything else: 16 registers or fewer: 10 sums */
#define NV 2
#define MR 5
#endif
#define NR (VL * NV)
#define ROUND16(n) (((n) + 15) / 16 * 16)
#define INLINE static inline __attribute__((always_inline))

typedef float vec __attribute__((vector_size(VL * 4)));
typedef float vecu __attribute__((vector_size(VL * 4), aligned(4)));  /* unaligned loads and stores */
typedef int32_t veci __attribute__((vector_size(VL * 4)));

/* Lane-wise conversions: GCC 9+ and clang have a builtin; older GCC (JetPack 4's GCC 7) loops. */
#if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9)) && !defined(DP_NO_CONVERTVECTOR)
#define TO_INT(v) __builtin_convertvector((v), veci)
#define TO_FLOAT(v) __builtin_convertvector((v), vec)
#else
INLINE veci TO_INT(vec v) {
    veci r;
    for (int l = 0; l < VL; ++l) r[l] = (int32_t)v[l];
    return r;
}
INLINE vec TO_FLOAT(veci v) {
    vec r;
    for (int l = 0; l < VL; ++l) r[l] = (float)v[l];
    return r;
}
#endif

INLINE vec vload(const float *p) { return *(const vecu *)p; }
INLINE void vstore(float *p, vec v) { *(vecu *)p = v; }

/* exp of VL lanes: Cephes' expf (range reduction by ln 2, degree-6 polynomial; about 1 ulp). */
INLINE vec vexp(vec x) {
    const vec hi = (vec){0} + 88.3762626647949f, lo = (vec){0} - 88.3762626647949f;
    veci m = x > hi;
    x = (vec)(((veci)hi & m) | ((veci)x & ~m));
    m = x < lo;
    x = (vec)(((veci)lo & m) | ((veci)x & ~m));
    vec fx = x * 1.44269504088896341f + 0.5f;
    veci n = TO_INT(fx);
    vec nf = TO_FLOAT(n);
    n += (veci)(nf > fx);  /* floor, not truncation, for negative arguments */
    nf = TO_FLOAT(n);
    x = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vec p = (vec){0} + 1.9875691500e-4f;
    p = p * x + 1.3981999507e-3f;
    p = p * x + 8.3334519073e-3f;
    p = p * x + 4.1665795894e-2f;
    p = p * x + 1.6666665459e-1f;
    p = p * x + 5.0000001201e-1f;
    vec y = p * x * x + x + 1.0f;
    veci e = (n + 127) << 23;
    vec scale;
    memcpy(&scale, &e, sizeof scale);
    return y * scale;
}

/* One product of the block: out[p, n] = epilogue(sum_t sum_k x[p + tap t][k] w[t][k][n] + bias[n]). */
typedef struct {
    const float *x;        /* the input map, pixels of xs floats, rows of xrow floats */
    int64_t xs, xrow;
    int64_t taps, K;       /* taps (1 or 9) and input channels */
    int64_t tap_off[9];    /* each tap's offset in floats from a pixel's top-left input */
    const float *w;        /* (taps, K, ldw); reads go up to NR floats past a row's N */
    int64_t ldw, N;
    const float *bias;     /* (N), readable up to NR floats past N */
    const float *res;      /* shortcut added after the bias, or NULL: pixels of rs floats, rows of rrow */
    int64_t rs, rrow;
    float *out;            /* pixels of os floats, rows of orow floats */
    int64_t os, orow;
    int silu;
    const float *scale;    /* each output channel's factor after the SiLU, or NULL; readable up to NR past N */
} product;

/* acc += the tile's sums over every tap and input channel: mr pixels from x0 in row y, nv vectors
   from output channel n0. Inlined twice: with constant bounds (MR, NV) for the common tile, so
   that the compiler unrolls the pixels and keeps every sum in a register, and with the edge's. */
INLINE void tile_sums(const product *q, int64_t y, int64_t x0, int64_t mr, int64_t n0, int64_t nv, vec acc[MR][NV]) {
    const float *xbase = q->x + y * q->xrow + x0 * q->xs;
    for (int64_t t = 0; t < q->taps; ++t) {
        const float *xt = xbase + q->tap_off[t];
        const float *wt = q->w + t * q->K * q->ldw + n0;
        for (int64_t k = 0; k < q->K; ++k) {
            vec wv[NV];
            for (int j = 0; j < NV; ++j) wv[j] = vload(wt + k * q->ldw + j * VL);
            for (int64_t i = 0; i < mr; ++i) {
                const float v = xt[i * q->xs + k];
                for (int64_t j = 0; j < nv; ++j) acc[i][j] += wv[j] * v;
            }
        }
    }
}

/* Pixels [x0, x0 + mr) of output row y, output channels [n0, n0 + NR) (fewer at the end). */
INLINE void product_tile(const product *q, int64_t y, int64_t x0, int64_t mr, int64_t n0) {
    const int64_t left = (q->N - n0 + VL - 1) / VL, nv = left < NV ? left : NV;  /* vectors with real lanes */
    vec acc[MR][NV];
    for (int j = 0; j < NV; ++j) {
        const vec bias = vload(q->bias + n0 + j * VL);
        for (int i = 0; i < MR; ++i) acc[i][j] = bias;
    }
    if (mr == MR && nv == NV)  /* the common case, compiled with every loop bound a constant */
        tile_sums(q, y, x0, MR, n0, NV, acc);
    else
        tile_sums(q, y, x0, mr, n0, nv, acc);
    for (int64_t i = 0; i < mr; ++i) {
        float *o = q->out + y * q->orow + (x0 + i) * q->os + n0;
        const float *r = q->res ? q->res + y * q->rrow + (x0 + i) * q->rs + n0 : NULL;
        for (int j = 0; j < nv; ++j) {
            const int64_t lanes = q->N - n0 - j * VL;
            vec v = acc[i][j];
            if (q->silu) v = v / (1.0f + vexp(-v));
            if (q->scale) v *= vload(q->scale + n0 + j * VL);
            if (lanes >= VL) {
                if (r) v += vload(r + j * VL);
                vstore(o + j * VL, v);
            } else {  /* the last, partial vector: only the real lanes are read and written */
                vec add = {0};
                if (r) memcpy(&add, r + j * VL, (size_t)lanes * sizeof(float));
                v += add;
                memcpy(o + j * VL, &v, (size_t)lanes * sizeof(float));
            }
        }
    }
}

/* Every tile of an h x w output, shared among the threads of the enclosing parallel region
   (called by all of them; the loop's end is a barrier). Adds the multiply-adds its tiles ran
   (vector lanes past N included) to *macs. */
INLINE void product_run(const product *q, int64_t h, int64_t w, int64_t *macs) {
    const int64_t xtiles = (w + MR - 1) / MR, ntiles = (q->N + NR - 1) / NR;
    int64_t done = 0;
    #pragma omp for schedule(static) collapse(2)
    for (int64_t y = 0; y < h; ++y)
        for (int64_t tile = 0; tile < xtiles * ntiles; ++tile) {
            const int64_t x0 = tile / ntiles * MR, n0 = tile % ntiles * NR;
            const int64_t mr = w - x0 < MR ? w - x0 : MR, left = (q->N - n0 + VL - 1) / VL;
            product_tile(q, y, x0, mr, n0);
            done += mr * (left < NV ? left : NV) * VL * q->taps * q->K;
        }
    #pragma omp atomic
    *macs += done;
}

/* Seconds from start to now (the gates' share of dp_block_forward). */
static double seconds_since(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) + 1e-9 * (double)(now.tv_nsec - start->tv_nsec);
}

/* Floats of scratch block_products needs: cv1's zero-bordered map, then the 3x3's output. */
static int64_t map_floats(int64_t h, int64_t w, int64_t n1, int64_t n2) {
    return (h + 2) * (w + 2) * n1 + h * w * n2;
}

/* The three products of a block on one image, given its weights laid out for them: cv1 (c ->
   n1, W1 transposed (c, ld1)) + b1 + SiLU into y1, a zero-bordered (h + 2, w + 2, n1) map; the
   3x3 (W2 as (taps, n1, ld2)) + b2 + SiLU into y2 (h * w, n2); cv3 (W3^T rows (n2, ld3)) + b3 +
   the shortcut into out. scale1 and scale2 (or NULL) multiply y1's and y2's channels after their
   SiLU: the gates' saliencies. n1 and n2 > 0. */
static void block_products(const float *pixels, int64_t h, int64_t w, int64_t c, int64_t n1, int64_t n2,
                           int64_t taps, const float *w1, int64_t ld1, const float *b1, const float *scale1,
                           const float *w2, int64_t ld2, const float *b2, const float *scale2, const float *w3,
                           int64_t ld3, const float *b3, float *y1, float *y2, float *out, int64_t *macs) {
    const int64_t pw = w + 2;
    product cv1 = {.x = pixels, .xs = c, .xrow = w * c, .taps = 1, .K = c, .tap_off = {0}, .w = w1,
                   .ldw = ld1, .N = n1, .bias = b1, .res = NULL,
                   .out = y1 + (pw + 1) * n1, .os = n1, .orow = pw * n1, .silu = 1, .scale = scale1};
    product cv2 = {.x = y1, .xs = n1, .xrow = pw * n1, .taps = taps, .K = n1, .w = w2,
                   .ldw = ld2, .N = n2, .bias = b2, .res = NULL,
                   .out = y2, .os = n2, .orow = w * n2, .silu = 1, .scale = scale2};
    for (int64_t t = 0; t < taps; ++t) cv2.tap_off[t] = (t / 3 * pw + t % 3) * n1;
    product cv3 = {.x = y2, .xs = n2, .xrow = w * n2, .taps = 1, .K = n2, .tap_off = {0}, .w = w3,
                   .ldw = ld3, .N = c, .bias = b3, .res = pixels, .rs = c, .rrow = w * c,
                   .out = out, .os = c, .orow = w * c, .silu = 0, .scale = NULL};
    *macs = 0;
    #pragma omp parallel if (h * w * c >= POOL_PARALLEL_MIN / 4)
    {
        /* cv1's map has a zero border (the 3x3's padding): its top and bottom rows, then the
           left and right pixel of every row */
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < h + 2; ++r) {
            float *row = y1 + r * pw * n1;
            if (r == 0 || r == h + 1) {
                memset(row, 0, (size_t)(pw * n1) * sizeof(float));
            } else {
                memset(row, 0, (size_t)n1 * sizeof(float));
                memset(row + (pw - 1) * n1, 0, (size_t)n1 * sizeof(float));
            }
        }
        product_run(&cv1, h, w, macs);
        product_run(&cv2, h, w, macs);
        product_run(&cv3, h, w, macs);
    }
}

/* The block on one image: pixels (h * w, c) float32 NHWC in, out (h * w, c) NHWC. Returns 0,
   -1 where chunk_sums is too small for the pool, -2 where maps is too small for this input and
   these kept widths (the caller grows them and calls again). counts: kept1, kept2, slots1, slots2. */
int dp_block_forward(const dp_block *b, const float *pixels, int64_t h, int64_t w, float *out) {
    const int64_t c = b->c, hw = h * w, taps = b->taps;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (gates_and_kept_lists(b, pixels, hw) != 0) return -1;
    const int64_t slots1 = b->counts[2], slots2 = b->counts[3];
    const int64_t ld1 = ROUND16(slots1), ld2 = ROUND16(slots2);
    if (map_floats(h, w, slots1, slots2) > b->map_capacity) return -2;
    float *y1 = b->maps, *y2 = b->maps + map_floats(h, w, slots1, 0);

    const float *w3 = b->rows_out + slots1 * (c + 1);
    if (slots1 == 0 || slots2 == 0) {
        /* A gate keeps nothing: the 3x3's output is its bias (or nothing reaches cv3), so the
           block adds one constant row to its shortcut: b3 + s2 * silu(b2) @ W3^T over gate 2's slots */
        gather_rows(b, slots1);
        b->gathered[0] = -1;  /* the rows above overwrote part of the kept gather */
        *b->reused = 0;
        float *row = b->constant_row;
        memcpy(row, b->b3, (size_t)c * sizeof(float));
        for (int64_t o = 0; o < slots2; ++o) {
            const float v = b->rows[b->index[slots1 + o] * (c + 1) + c];
            const float silu = v / (1.0f + expf(-v)) * b->scale[slots1 + o];
            for (int64_t n = 0; n < c; ++n) row[n] += silu * w3[o * (c + 1) + n];
        }
        *b->macs = slots2 * c;
        *b->gate_seconds = seconds_since(&start);
        #pragma omp parallel for schedule(static) if (hw * c >= POOL_PARALLEL_MIN)
        for (int64_t p = 0; p < hw; ++p)
            for (int64_t n = 0; n < c; ++n) out[p * c + n] = pixels[p * c + n] + row[n];
        return 0;
    }
    /* The gathered weights depend on the kept lists alone (the saliencies scale the activations,
       in the products' epilogues), so a frame that keeps the same channels as the last one reuses
       them. On a video stream most blocks do, most frames (demo video: 68-99% of frames per block,
       BENCHMARKS.md); distinct images mostly do not. */
    const int64_t n_index = slots1 + slots2;
    int64_t *last = b->gathered;
    const int reuse = last[0] == slots1 && last[1] == slots2
                      && memcmp(last + 2, b->index, (size_t)n_index * sizeof(int64_t)) == 0;
    *b->reused = reuse;
    if (!reuse) {
        gather_rows(b, slots1);  /* W3^T rows and b2 of gate 2's slots */
        /* Runs of consecutive channels in both kept lists (group gates: runs of 8 or 16), so that the
           gathers below copy a run at a time */
        const int64_t *out_index = b->index + slots1, *bounds1 = b->run_bounds, *bounds2 = b->run_bounds2;
        const int64_t runs1 = kept_runs(b->index, slots1, b->run_bounds);
        const int64_t runs2 = kept_runs(out_index, slots2, b->run_bounds2);
        /* W1 transposed, the kept output channels as columns, padded with zeros to ld1 */
        for (int64_t k = 0; k < c; ++k) {
            const float *src = b->w1_kn + k * b->h1;
            float *dst = b->w1_out + k * ld1;
            for (int64_t r = 0; r < runs1; ++r) {
                const int64_t i0 = bounds1[r];
                memcpy(dst + i0, src + b->index[i0], (size_t)(bounds1[r + 1] - i0) * sizeof(float));
            }
            for (int64_t i = slots1; i < ld1; ++i) dst[i] = 0.0f;
        }
        for (int64_t i = 0; i < ld1 + 16; ++i) b->b1_out[i] = i < slots1 ? b->rows[b->index[i] * (c + 1) + c] : 0.0f;
        for (int64_t o = 0; o < ld2 + 16; ++o) b->b2_out[o] = o < slots2 ? b->rows[out_index[o] * (c + 1) + c] : 0.0f;
        /* W2 as (tap, kept input, kept output), padded with zeros to ld2 */
        #pragma omp parallel for schedule(static) if (taps * slots1 * ld2 >= GATHER_PARALLEL_MIN)
        for (int64_t ti = 0; ti < taps * slots1; ++ti) {
            const int64_t t = ti / slots1, i = ti % slots1;
            const float *src = b->w2_tio + (t * b->h1 + b->index[i]) * b->h2 - b->h1;  /* gate 2's index is offset by h1 */
            float *dst = b->w2t_out + ti * ld2;
            for (int64_t r = 0; r < runs2; ++r) {
                const int64_t o0 = bounds2[r];
                memcpy(dst + o0, src + out_index[o0], (size_t)(bounds2[r + 1] - o0) * sizeof(float));
            }
            for (int64_t o = slots2; o < ld2; ++o) dst[o] = 0.0f;
        }
        last[0] = slots1;
        last[1] = slots2;
        memcpy(last + 2, b->index, (size_t)n_index * sizeof(int64_t));
    }

    *b->gate_seconds = seconds_since(&start);
    block_products(pixels, h, w, c, slots1, slots2, taps, b->w1_out, ld1, b->b1_out, b->scale, b->w2t_out, ld2,
                   b->b2_out, b->scale + slots1, w3, c + 1, b->b3, y1, y2, out, b->macs);
    return 0;
}

/* Floats per vector of dp_block_forward's products (its multiply-adds count whole vectors). */
int64_t dp_vector_floats(void) { return VL; }

/* An un-gated block for the dense network, on weights laid out once (dp_dense_forward): the
   same products as a compact block's, on every channel. */
typedef struct {
    int64_t c, h1, h2, taps;
    const float *w1;   /* (c, ld1): W1 transposed */
    const float *b1;   /* (ld1 + 16) */
    const float *w2;   /* (taps, h1, ld2) */
    const float *b2;   /* (ld2 + 16) */
    const float *w3;   /* (h2, ld3): W3 transposed */
    const float *b3;   /* (ld3 + 16) */
    int64_t ld1, ld2, ld3;
    float *maps;       /* scratch (map_capacity) */
    int64_t map_capacity;
    int64_t *macs;     /* out */
} dp_dense;

/* Returns 0, or -2 where maps is too small for an h x w input (the caller grows it). */
int dp_dense_forward(const dp_dense *d, const float *pixels, int64_t h, int64_t w, float *out) {
    if (map_floats(h, w, d->h1, d->h2) > d->map_capacity) return -2;
    block_products(pixels, h, w, d->c, d->h1, d->h2, d->taps, d->w1, d->ld1, d->b1, NULL, d->w2, d->ld2, d->b2,
                   NULL, d->w3, d->ld3, d->b3, d->maps, d->maps + map_floats(h, w, d->h1, 0), out, d->macs);
    return 0;
}
