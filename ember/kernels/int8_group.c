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
#ifdef _OPENMP
#include <omp.h>
#endif
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

/* R weight rows (stride K) against NB rows of x (stride K): R * NB dot products; R, NB and HAS_OFF are
 * constants after inlining. Each 32-value chunk of a weight row is dequantized once into 4 vectors and used for
 * the NB rows of x, and each 8 values of x are loaded once for the R weight rows. */
INLINE void block_kernel(const int8_t *q, const float *s, const float *m, int64_t ng, int gshift, const float *x,
                         int64_t K, int64_t k0, int64_t k1, float *y, int64_t N, const int R, const int NB,
                         const int HAS_OFF) {
    /* accumulators per dot product: enough independent FMA chains to hide the FMA latency */
    const int KA = R * NB >= 6 ? 1 : R * NB >= 3 ? 2 : 4;
    __m256 acc[8 * 4];
    for (int i = 0; i < R * NB * KA; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t c = k0; c < k1; c += 32) {
        const int64_t g0 = c >> gshift, g1 = (c + 16) >> gshift;
        __m256 w[2][4];
        for (int r = 0; r < R; r++) {
            const int8_t *qr = q + r * K + c;
            const __m256 s0 = _mm256_broadcast_ss(s + r * ng + g0), s1 = _mm256_broadcast_ss(s + r * ng + g1);
            w[r][0] = _mm256_mul_ps(load8(qr), s0);
            w[r][1] = _mm256_mul_ps(load8(qr + 8), s0);
            w[r][2] = _mm256_mul_ps(load8(qr + 16), s1);
            w[r][3] = _mm256_mul_ps(load8(qr + 24), s1);
            if (HAS_OFF) {
                const __m256 m0 = _mm256_broadcast_ss(m + r * ng + g0), m1 = _mm256_broadcast_ss(m + r * ng + g1);
                w[r][0] = _mm256_add_ps(w[r][0], m0);
                w[r][1] = _mm256_add_ps(w[r][1], m0);
                w[r][2] = _mm256_add_ps(w[r][2], m1);
                w[r][3] = _mm256_add_ps(w[r][3], m1);
            }
        }
        for (int j = 0; j < 4; j++)
            for (int b = 0; b < NB; b++) {
                const __m256 xv = _mm256_loadu_ps(x + b * K + c + 8 * j);
                for (int r = 0; r < R; r++) {
                    __m256 *a = &acc[(r * NB + b) * KA + j % KA];
                    *a = _mm256_fmadd_ps(w[r][j], xv, *a);
                }
            }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) {
            __m256 t = acc[(r * NB + b) * KA];
            for (int k = 1; k < KA; k++) t = _mm256_add_ps(t, acc[(r * NB + b) * KA + k]);
            y[b * N + r] = (k0 ? y[b * N + r] : 0.0f) + hsum(t);
        }
}

typedef void (*block_fn)(const int8_t *, const float *, const float *, int64_t, int, const float *, int64_t,
                         int64_t, int64_t, float *, int64_t);
#define BLOCK_FN(R, NB, OFF)                                                                                    \
    static void block_##R##_##NB##_##OFF(const int8_t *q, const float *s, const float *m, int64_t ng, int gshift, \
                                         const float *x, int64_t K, int64_t k0, int64_t k1, float *y, int64_t N) {\
        block_kernel(q, s, m, ng, gshift, x, K, k0, k1, y, N, R, NB, OFF);                                      \
    }
#define BLOCK_FNS(R, NB) BLOCK_FN(R, NB, 0) BLOCK_FN(R, NB, 1)
BLOCK_FNS(1, 1) BLOCK_FNS(1, 2) BLOCK_FNS(1, 3) BLOCK_FNS(1, 4)
BLOCK_FNS(2, 1) BLOCK_FNS(2, 2) BLOCK_FNS(2, 3) BLOCK_FNS(2, 4)
/* [has offset][rows - 1][batch rows] */
static const block_fn BLOCK_TABLE[2][2][5] = {
    {{NULL, block_1_1_0, block_1_2_0, block_1_3_0, block_1_4_0},
     {NULL, block_2_1_0, block_2_2_0, block_2_3_0, block_2_4_0}},
    {{NULL, block_1_1_1, block_1_2_1, block_1_3_1, block_1_4_1},
     {NULL, block_2_1_1, block_2_2_1, block_2_3_1, block_2_4_1}},
};
#define MAX_NB 4

#else /* portable fallback */

static void row_scalar(const int8_t *q, const float *s, const float *m, int gshift, const float *x, int64_t K,
                       int64_t k0, int64_t k1, float *y, int64_t N, int NB, int has_off) {
    for (int b = 0; b < NB; b++) {
        const float *xb = x + b * K;
        float acc[8] = {0};
        for (int64_t i = k0; i < k1; i += 8) {
            for (int k = 0; k < 8; k++) {
                const int64_t g = (i + k) >> gshift;
                float w = s[g] * (float)q[i + k];
                if (has_off) w = w + m[g];
                acc[k] += w * xb[i + k];
            }
        }
        y[b * N] = (k0 ? y[b * N] : 0.0f) + ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
}

#define MAX_NB 8
#endif

/* Returns 0 on success, -1 on unsupported arguments (K not a multiple of 32, G not 16 or 32). */
int ember_int8_group_matmul(const float *x, int64_t B, int64_t K, const int8_t *q, const float *scale,
                            const float *offset, int64_t N, int64_t G, float *y, int nthreads) {
    if (K % 32 || (G != 16 && G != 32) || B < 0 || N < 0) return -1;
    const int gshift = G == 16 ? 4 : 5;
    const int64_t ng = K / G;
    if (nthreads < 1) nthreads = 1;
    const int64_t pairs = (N + 1) / 2; /* rows 2p and 2p + 1 (the last one alone when N is odd) */
    /* Tiles: KT values of K, so that up to MAX_NB rows of x (24 KiB) stay in L1 while a chunk of weight rows is
     * swept; PC pairs of weight rows (~256 KiB of q), so that they stay in L2 while the batch is swept. */
    const int64_t nb_max = B < MAX_NB ? (B > 0 ? B : 1) : MAX_NB;
    const int64_t KT = (6144 / nb_max) & ~(int64_t)31, PC = K >= 128 * 1024 ? 1 : (128 * 1024) / K;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && pairs > 1)
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t t = 0, nt = 1;
#endif
        const int64_t p_end = pairs * (t + 1) / nt;
        for (int64_t pc = pairs * t / nt; pc < p_end; pc += PC) {
            const int64_t pe = pc + PC < p_end ? pc + PC : p_end;
            for (int64_t b = 0; b < B;) {
                const int nb = B - b >= MAX_NB ? MAX_NB : (int)(B - b);
                for (int64_t k0 = 0; k0 < K; k0 += KT) {
                    const int64_t k1 = k0 + KT < K ? k0 + KT : K;
                    for (int64_t p = pc; p < pe; p++) {
                        const int64_t o = 2 * p;
                        const int rows = o + 1 < N ? 2 : 1;
                        const int8_t *qo = q + o * K;
                        const float *so = scale + o * ng;
                        const float *mo = offset ? offset + o * ng : NULL;
#if defined(__AVX2__) && defined(__FMA__)
                        BLOCK_TABLE[offset != NULL][rows - 1][nb](qo, so, mo, ng, gshift, x + b * K, K, k0, k1,
                                                                  y + b * N + o, N);
#else
                        for (int r = 0; r < rows; r++)
                            row_scalar(qo + r * K, so + r * ng, mo ? mo + r * ng : NULL, gshift, x + b * K, K, k0, k1,
                                       y + b * N + o + r, N, nb, offset != NULL);
#endif
                    }
                }
                b += nb;
            }
        }
    }
    return 0;
}
