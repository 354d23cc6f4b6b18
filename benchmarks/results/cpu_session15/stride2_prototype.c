/* Prototype, not used by dynprune (BENCHMARKS.md, session 15): a stride-2 3x3 convolution as the fused
   block's register tiles, on a zero-padded input; the epilogue is a stand-in, not the SiLU.
   gcc -O3 -std=gnu99 -march=native -fopenmp -shared -fPIC -o /tmp/s2.so stride2_prototype.c */
#include <stdint.h>
#include <string.h>
typedef float vec __attribute__((vector_size(64)));
typedef float vecu __attribute__((vector_size(64), aligned(4)));
#define VL 16
#define NV 2
#define MR 10
static inline vec vload(const float *p) { return *(const vecu *)p; }
/* xp: padded input (h+2, w+2, K); out (ho, wo, N); stride 2; w (9, K, ldw) */
void conv_s2(const float *xp, int64_t h, int64_t w, int64_t K, const float *wt, int64_t ldw, const float *b,
             float *out, int64_t N) {
    const int64_t ho = h / 2, wo = w / 2, pw = w + 2, xtiles = (wo + MR - 1) / MR, ntiles = (N + 31) / 32;
    #pragma omp parallel for schedule(static) collapse(2)
    for (int64_t y = 0; y < ho; ++y)
        for (int64_t tile = 0; tile < xtiles * ntiles; ++tile) {
            const int64_t x0 = tile / ntiles * MR, n0 = tile % ntiles * 32;
            const int64_t mr = wo - x0 < MR ? wo - x0 : MR;
            vec acc[MR][NV];
            for (int j = 0; j < NV; ++j) { vec bb = vload(b + n0 + j * VL); for (int i = 0; i < MR; ++i) acc[i][j] = bb; }
            for (int t = 0; t < 9; ++t) {
                const float *xt = xp + ((2 * y + t / 3) * pw + 2 * x0 + t % 3) * K;
                const float *wr = wt + t * K * ldw + n0;
                for (int64_t k = 0; k < K; ++k) {
                    vec w0 = vload(wr + k * ldw), w1 = vload(wr + k * ldw + 16);
                    for (int i = 0; i < MR; ++i) { float v = xt[2 * i * K + k]; acc[i][0] += w0 * v; acc[i][1] += w1 * v; }
                }
            }
            for (int64_t i = 0; i < mr; ++i)
                for (int j = 0; j < NV; ++j) {
                    vec v = acc[i][j];
                    v = v / (1.0f + v * v * 0.0f + 1.0f);  /* stand-in epilogue cost */
                    memcpy(out + (y * wo + x0 + i) * N + n0 + j * VL, &v, sizeof v);
                }
        }
}
