/* What the C files of ember's kernel library share: SIMD helpers and the thread pool.
 *
 * Threads: one persistent pool (pool.c); the calling thread works too. Work is handed out in chunks from an
 * atomic counter; idle workers spin briefly (the next kernel call of a forward is usually tens of
 * microseconds away) and then sleep on a condition variable. No OpenMP: torch brings its own runtime, and two
 * would spin against each other. One parallel call runs at a time (callers hold a lock around it).
 *
 * The build picks the ISA with compiler flags (ember.kernels.native): AVX2, FMA and F16C at least.
 */
#ifndef EMBER_KERNELS_COMMON_H
#define EMBER_KERNELS_COMMON_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

typedef void (*job_fn)(void *ctx, int64_t chunk);

/* The library lock: a kernel call holds it while it uses the pool or shared scratch. */
void ember_lock(void);
void ember_unlock(void);

/* fn(ctx, c) for every c < chunks on up to nthreads threads (the caller's included); returns when all ran. */
void ember_parallel_for(int nthreads, job_fn fn, void *ctx, int64_t chunks);

/* Weights per fused call (q/k/v, gate/up): ggml_matmul.c's limit. */
#define MAX_SEGMENTS 8

/* ember_matmul and ember_decode_attention without taking the library lock: for a caller that holds it across
 * several kernels (decode_layers.c). Arguments as the public entries'. */
int ember_matmul_locked(const float *x, int64_t B, int64_t K, int nseg, const void *const *w, const int *types,
                        const int64_t *rows, const int64_t *row_bytes, float *y, int64_t ldy, int prep,
                        const float *norm_w, float eps, int nthreads);
int ember_decode_attention_locked(const float *q, const void *k_cache, const void *v_cache, const uint16_t *k_scale,
                                  const uint16_t *v_scale, float *out, int64_t D, int heads, int kv_heads,
                                  int head_dim, const int64_t *blocks, int64_t max_blocks, int64_t start,
                                  const int64_t *lens, int block_size, float scale, float softcap, int64_t window,
                                  int nthreads);

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for 8 lanes: Cody-Waite range reduction and a degree-5 polynomial (Cephes' expf), ~1 ulp. */
INLINE __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

/* The unnormalised softmax of s[0..n) in place, exp(s - max(s)), and its sum (n >= 1). */
INLINE float exp_minus_max(float *s, int64_t n) {
    float mx = s[0];
    for (int64_t t = 1; t < n; t++) mx = s[t] > mx ? s[t] : mx;
    __m256 vsum = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return sum;
}

/* Input preparations the kernels fold in (the caller passes the un-prepared activations):
 * out[k] = silu(gate[k]) * up[k], k < n, from a row [gate | up] (the MLP's gated product); */
INLINE void silu_gate_row(const float *gate_up, int64_t n, float *out) {
    const float *gate = gate_up, *up = gate_up + n;
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) { /* vectorized: a scalar expf here was ~8 us a layer on one thread */
        const __m256 g = _mm256_loadu_ps(gate + k);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                                _mm256_loadu_ps(up + k)));
    }
    for (; k < n; k++) out[k] = gate[k] / (1.0f + expf(-gate[k])) * up[k];
}

/* out = x * rsqrt(mean(x^2) + eps) * w in float32 (RMSNorm, as ember.layers.norm rounds it). */
INLINE void rms_norm_row(const float *x, int64_t n, const float *w, float eps, float *out) {
    __m256 ss = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) ss = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(x + k), ss);
    float sum = hsum(ss);
    for (; k < n; k++) sum += x[k] * x[k];
    const float inv = 1.0f / sqrtf(sum / (float)n + eps);
    for (k = 0; k < n; k++) out[k] = x[k] * inv * w[k];
}

#endif
