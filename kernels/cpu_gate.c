/* CPU host step of one gated bottleneck for one image, in one call.
 *
 * Pool the block input, run both ManiDP gates (fc1 -> ReLU -> fc2 + bias -> ReLU), keep the
 * groups whose saliency reaches the threshold, build both kept-channel lists, each padded to a
 * multiple of its pad_to with zero-scaled copies, and gather the saliency-scaled weights of the
 * three convolutions. Python (kernels/cpu_gate.py) compiles this file on first use; its
 * reference is CompactBottleneck's NumPy path (dynprune/compact.py), which the tests compare
 * it with. Done in NumPy, this step is a few dozen calls of about a microsecond each, three to
 * five times slower inside the running network, where every call finds cold caches; here it is
 * one call whose cost is the memory it reads.
 */
#include <stdint.h>
#include <string.h>

/* Built with -fopenmp where PyTorch runs on GNU OpenMP (kernels/cpu_gate.py checks): the
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
    const float *w2_ohwi;    /* (h2, taps, h1) */
    double *pooled;          /* scratch (c) */
    float *chunk_sums;       /* scratch (chunk_capacity, c): the pool's per-chunk partial sums */
    int64_t chunk_capacity;  /* chunks of POOL_CHUNK pixels that chunk_sums holds */
    float *hidden;           /* scratch (hid1 + hid2) */
    float *saliency;         /* out (g1 + g2) */
    int64_t *index;          /* out (h1 + pad_to1 + h2 + pad_to2): rows of `rows`, gate 1 then gate 2 */
    float *scale;            /* out, same length: each slot's saliency, 0 for padding */
    float *rows_out;         /* out (h1 + pad_to1 + h2 + pad_to2, c + 1) */
    float *w2_out;           /* out (h2 + pad_to2, taps, h1 + pad_to1) as (slots2, taps, slots1) */
    int64_t *counts;         /* out: kept1, kept2, slots1, slots2 */
    int64_t *run_bounds;     /* scratch (h1 + pad_to1 + 1): first slot of each run of gate 1's list */
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

/* On x86-64 with GCC, an AVX2+FMA clone of the whole step is picked at load time where the CPU
   has them (vector gathers for W2, wider pool and MLP loops); elsewhere the portable build. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
int dp_block_plan(const dp_block *b, const float *pixels, int64_t hw) {
    const int64_t c = b->c, hid = b->hid1 + b->hid2, width = c + 1;

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

    /* W1 | b1 rows for gate 1's slots; W3^T | b2 rows for gate 2's, W3 scaled by saliency */
    #pragma omp parallel for schedule(static) if ((slots1 + slots2) * width >= GATHER_PARALLEL_MIN)
    for (int64_t r = 0; r < slots1 + slots2; ++r) {
        float *row = b->rows_out + r * width;
        memcpy(row, b->rows + b->index[r] * width, (size_t)width * sizeof(float));
        if (r >= slots1) {
            const float s = b->scale[r];
            for (int64_t k = 0; k < c; ++k) row[k] *= s;
        }
    }
    /* W2 rows of gate 2's slots, columns of gate 1's, each column scaled by its saliency, as
       (slots2, taps, slots1). Where gate 1's list is made of long runs of consecutive channels
       (group gates: runs of 8 or 16) they are copied a run at a time, with contiguous loads
       that vectorise; a per-slot index needs a vector gather, slow on x86. In the network
       (nano, 320 px, keep 0.48) runs cut group-8 gates' W2 gather from 243-270 to 207-237 us
       a frame, but made group-1 gates' slower (317-377 -> 362-516 us: runs of one or two), so
       single channels keep the per-slot loop. Storing W2 group-major, so that only kept
       groups' weights are read, was slower still (284-348 us): the writes stride across taps. */
    if (kept1 > 0 && kept2 > 0) {
        int64_t runs = 0;
        for (int64_t i = 0; i < slots1; ++i)
            if (i == 0 || b->index[i] != b->index[i - 1] + 1) b->run_bounds[runs++] = i;
        b->run_bounds[runs] = slots1;
        const int64_t *bounds = b->run_bounds;
        const int by_runs = runs * 4 <= slots1;  /* runs of 4 or more on average */
        #pragma omp parallel for schedule(static) if (slots2 * b->taps * slots1 >= GATHER_PARALLEL_MIN)
        for (int64_t o = 0; o < slots2; ++o) {
            const float *src = b->w2_ohwi + (b->index[slots1 + o] - b->h1) * b->taps * b->h1;
            float *dst = b->w2_out + o * b->taps * slots1;
            for (int64_t t = 0; t < b->taps; ++t) {
                const float *src_tap = src + t * b->h1;
                float *dst_tap = dst + t * slots1;
                if (!by_runs) {
                    for (int64_t i = 0; i < slots1; ++i) dst_tap[i] = src_tap[b->index[i]] * b->scale[i];
                    continue;
                }
                for (int64_t r = 0; r < runs; ++r) {
                    const int64_t i0 = bounds[r], n = bounds[r + 1] - i0;
                    const float *from = src_tap + b->index[i0];
                    const float *scale = b->scale + i0;
                    float *to = dst_tap + i0;
                    for (int64_t k = 0; k < n; ++k) to[k] = from[k] * scale[k];
                }
            }
        }
    }
    return 0;
}

/* Pixels per chunk of the pool, for the caller sizing chunk_sums. */
int64_t dp_pool_chunk(void) { return POOL_CHUNK; }
