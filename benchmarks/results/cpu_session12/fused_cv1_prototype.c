#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#define MR 6

__attribute__((target("avx2,fma")))
static inline __m256 exp256(__m256 x) {
    /* Cephes expf: 2^n * P(r), |r| <= ln2/2 */
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365478515625f);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

__attribute__((target("avx2,fma")))
static inline __m256 silu256(__m256 v) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), v));
    return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* out (m, n) = silu(x (m, k; ld ldx) @ wp (k, npad) + bias (npad)); npad multiple of 8 */
__attribute__((target("avx2,fma")))
void pw_silu(const float *x, int64_t m, int64_t k, int64_t ldx, const float *wp, const float *bias,
             int64_t n, int64_t npad, float *out) {
    const int64_t blocks = (m + MR - 1) / MR;
    #pragma omp parallel for schedule(static) if (m * k * n >= (1 << 17))
    for (int64_t bi = 0; bi < blocks; ++bi) {
        const int64_t r0 = bi * MR;
        const int64_t mr = m - r0 < MR ? m - r0 : MR;
        for (int64_t j0 = 0; j0 < npad; j0 += 16) {
            const int wide = j0 + 16 <= npad;
            __m256 acc[MR][2];
            const __m256 b0 = _mm256_loadu_ps(bias + j0);
            const __m256 b1 = wide ? _mm256_loadu_ps(bias + j0 + 8) : _mm256_setzero_ps();
            for (int r = 0; r < MR; ++r) { acc[r][0] = b0; acc[r][1] = b1; }
            const float *xr = x + r0 * ldx;
            if (mr == MR && wide) {
                for (int64_t q = 0; q < k; ++q) {
                    const __m256 w0 = _mm256_loadu_ps(wp + q * npad + j0);
                    const __m256 w1 = _mm256_loadu_ps(wp + q * npad + j0 + 8);
                    for (int r = 0; r < MR; ++r) {
                        const __m256 a = _mm256_broadcast_ss(xr + r * ldx + q);
                        acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
                    }
                }
            } else {
                for (int64_t q = 0; q < k; ++q) {
                    const __m256 w0 = _mm256_loadu_ps(wp + q * npad + j0);
                    const __m256 w1 = wide ? _mm256_loadu_ps(wp + q * npad + j0 + 8) : _mm256_setzero_ps();
                    for (int r = 0; r < mr; ++r) {
                        const __m256 a = _mm256_broadcast_ss(xr + r * ldx + q);
                        acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
                    }
                }
            }
            for (int r = 0; r < mr; ++r) {
                float *o = out + (r0 + r) * n + j0;
                const int64_t left = n - j0;
                __m256 v0 = silu256(acc[r][0]);
                if (left >= 8) _mm256_storeu_ps(o, v0);
                else { float t[8]; _mm256_storeu_ps(t, v0); memcpy(o, t, left * 4); continue; }
                if (left > 8 && wide) {
                    __m256 v1 = silu256(acc[r][1]);
                    if (left >= 16) _mm256_storeu_ps(o + 8, v1);
                    else { float t[8]; _mm256_storeu_ps(t, v1); memcpy(o + 8, t, (left - 8) * 4); }
                }
            }
        }
    }
}
