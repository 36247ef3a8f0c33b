/* y[b, o] = sum_i x[b, i] * w[o, i] with w[o, i] = scale[o, i / G] * q[o, i] (+ offset[o, i / G]).
 *
 * q is int8 [N, K], scale/offset float32 [N, K / G] (G = 16 or 32), x float32 [B, K], y float32 [B, N].
 * Each weight is dequantized exactly as ember.quant.ggml.apply_scales does it (a float32 multiply, then a
 * float32 add; built with -ffp-contract=off so the two are never fused), then multiplied into float32
 * accumulators: the result differs from a float32 matmul with the dequantized weight only in summation order.
 * Rows of the weight are split over OpenMP threads; within a row, each 32-value chunk is dequantized once and
 * applied to up to 8 rows of x. Plain C with a ctypes interface (no Python or torch headers).
 */
#include <stddef.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))

int ember_kernels_abi(void) { return 1; }

int ember_kernels_simd(void) {
#if defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX2__) && defined(__FMA__)

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE __m256 load8(const int8_t *q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}

/* One weight row against NB rows of x (stride K); NB and HAS_OFF are constants after inlining. */
INLINE void row_block(const int8_t *q, const float *s, const float *m, int gshift, const float *x, int64_t K,
                      float *y, int64_t N, const int NB, const int HAS_OFF) {
    const int KA = NB == 1 ? 4 : NB <= 3 ? 2 : 1; /* accumulators per x row: enough independent FMA chains */
    __m256 acc[8 * 4];
    for (int i = 0; i < NB * KA; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K; c += 32) {
        const int64_t g0 = c >> gshift, g1 = (c + 16) >> gshift;
        const __m256 s0 = _mm256_broadcast_ss(s + g0), s1 = _mm256_broadcast_ss(s + g1);
        __m256 w[4];
        w[0] = _mm256_mul_ps(load8(q + c), s0);
        w[1] = _mm256_mul_ps(load8(q + c + 8), s0);
        w[2] = _mm256_mul_ps(load8(q + c + 16), s1);
        w[3] = _mm256_mul_ps(load8(q + c + 24), s1);
        if (HAS_OFF) {
            const __m256 m0 = _mm256_broadcast_ss(m + g0), m1 = _mm256_broadcast_ss(m + g1);
            w[0] = _mm256_add_ps(w[0], m0);
            w[1] = _mm256_add_ps(w[1], m0);
            w[2] = _mm256_add_ps(w[2], m1);
            w[3] = _mm256_add_ps(w[3], m1);
        }
        for (int j = 0; j < 4; j++)
            for (int b = 0; b < NB; b++)
                acc[b * KA + j % KA] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + b * K + c + 8 * j),
                                                       acc[b * KA + j % KA]);
    }
    for (int b = 0; b < NB; b++) {
        __m256 t = acc[b * KA];
        for (int k = 1; k < KA; k++) t = _mm256_add_ps(t, acc[b * KA + k]);
        y[b * N] = hsum(t);
    }
}

#define ROW_FN(NB, OFF)                                                                                        \
    static void row_##NB##_##OFF(const int8_t *q, const float *s, const float *m, int gshift, const float *x, \
                                 int64_t K, float *y, int64_t N) {                                             \
        row_block(q, s, m, gshift, x, K, y, N, NB, OFF);                                                       \
    }
#define ROW_FNS(NB) ROW_FN(NB, 0) ROW_FN(NB, 1)
ROW_FNS(1) ROW_FNS(2) ROW_FNS(3) ROW_FNS(4) ROW_FNS(5) ROW_FNS(6) ROW_FNS(7) ROW_FNS(8)

typedef void (*row_fn)(const int8_t *, const float *, const float *, int, const float *, int64_t, float *, int64_t);
static const row_fn ROW_TABLE[2][9] = {
    {NULL, row_1_0, row_2_0, row_3_0, row_4_0, row_5_0, row_6_0, row_7_0, row_8_0},
    {NULL, row_1_1, row_2_1, row_3_1, row_4_1, row_5_1, row_6_1, row_7_1, row_8_1},
};

#else /* portable fallback */

static void row_scalar(const int8_t *q, const float *s, const float *m, int gshift, const float *x, int64_t K,
                       float *y, int64_t N, int NB, int has_off) {
    for (int b = 0; b < NB; b++) {
        const float *xb = x + b * K;
        float acc[8] = {0};
        for (int64_t i = 0; i < K; i += 8) {
            for (int k = 0; k < 8; k++) {
                const int64_t g = (i + k) >> gshift;
                float w = s[g] * (float)q[i + k];
                if (has_off) w = w + m[g];
                acc[k] += w * xb[i + k];
            }
        }
        y[b * N] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
}

#endif

/* Returns 0 on success, -1 on unsupported arguments (K not a multiple of 32, G not 16 or 32). */
int ember_int8_group_matmul(const float *x, int64_t B, int64_t K, const int8_t *q, const float *scale,
                            const float *offset, int64_t N, int64_t G, float *y, int nthreads) {
    if (K % 32 || (G != 16 && G != 32) || B < 0 || N < 0) return -1;
    const int gshift = G == 16 ? 4 : 5;
    const int64_t ng = K / G;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && N > 1)
    for (int64_t o = 0; o < N; o++) {
        const int8_t *qo = q + o * K;
        const float *so = scale + o * ng;
        const float *mo = offset ? offset + o * ng : NULL;
        for (int64_t b = 0; b < B;) {
            const int nb = B - b >= 8 ? 8 : (int)(B - b);
#if defined(__AVX2__) && defined(__FMA__)
            ROW_TABLE[offset != NULL][nb](qo, so, mo, gshift, x + b * K, K, y + b * N + o, N);
#else
            row_scalar(qo, so, mo, gshift, x + b * K, K, y + b * N + o, N, nb, offset != NULL);
#endif
            b += nb;
        }
    }
    return 0;
}
