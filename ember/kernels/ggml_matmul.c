/* Matrix products on weights kept in their GGUF form: GGML quantized blocks, bf16 or f16 rows.
 *
 * y[b, n] = sum_k x[b, k] * w[n, k]; x float32 [B, K] row-major, y float32 [B, ldy] (a call writes columns
 * col0 .. col0 + N of it, so fused projections share one output), w [N, row_bytes] as in the file.
 *
 * Quantized weights: x is quantized once per call to int8 exactly as llama.cpp quantizes it for the same weight
 * type (so both engines see the same activation rounding): Q8_0 for the 32-value types (scale amax / 127
 * rounded to fp16, per 32 values), Q8_K for the 256-value K and IQ4_XS types (one scale per 256 values,
 * -127 / the signed extreme). The kernels read a scale d and m = d * sum(q) per 32 values either way (the
 * offset types multiply m). Then the weights are unpacked into int8 lanes in registers and multiplied with
 * integer dot products: AVX-512 VNNI (vpdpbusd) or AVX-VNNI where the build has it, AVX2 maddubs + madd
 * otherwise. Unsigned weights (Q4/Q5 nibbles, 0..31) go straight into the unsigned operand; their offset (-8d,
 * -16d, -dmin*m, +m) multiplies the activation's block sum. Signed weights (Q8_0, Q6_K - 32, IQ4 lookups) use
 * |w| and x * sign(w). Three shapes of loop, chosen per type, ISA and batch (gemm_min_b):
 *   - K-quants: one super-block at a time, products summed in int32 with the sub-block scales applied by madd
 *     (vpdpwssd on AVX-512 VNNI; Q8_K activations make those scales plain integers), 512-bit vectors on AVX-512;
 *   - 32-value types: 8 blocks at a time, their integer sums gathered into one vector (two blocks per 512-bit
 *     vector on AVX-512) so that scales and offsets are vector operations;
 *   - many rows of x (prefill, large batches): weight tiles unpacked once into an interleaved int8 layout in L2
 *     and multiplied against 8 (AVX-512) or 4 rows of x at a time (GEMM section below).
 * The direct loops unpack each weight block once for up to QUANT_NB (8) rows of x, kept in registers: the cost
 * per extra row of x is the integer products alone (speculative verification checks K + 1 rows per sequence).
 *
 * bf16/f16 weights: AVX512-BF16 dot products on x rounded to bf16 where the CPU has them (llama.cpp's scheme),
 * else widened to float32 in registers (shift / F16C) and multiplied with FMAs; 16 weight rows stay in L2 while
 * many rows of x pass. Every row of x sums in one order whatever the number of rows in the call (the same
 * partial sums and the same final reduction), so a sequence's results do not depend on its batch: an
 * outer-product GEMM for bf16 prefill measured 1.35x faster at 512 rows but sums in another order, and a row's
 * result then depended on whether it shared a step with 63 other rows (greedy tokens of a bf16 model changed
 * under concurrency); it was taken out.
 *
 * Rows are handed out to the pool's threads (common.h) in chunks; one call runs at a time (the library lock),
 * since the pool and the activation scratch are shared. AVX-512 VNNI / AVX-VNNI / AVX512-BF16 are used when
 * the build's flags enable them. Plain C, called through ctypes.
 */
#include "common.h"

#include <math.h>
#include <stdlib.h>


int ember_kernels_abi(void) { return 7; }

/* What the build uses for integer dot products: 2 = AVX-512 VNNI, 1 = AVX-VNNI, 0 = AVX2 maddubs. */
int ember_kernels_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return 2;
#elif defined(__AVXVNNI__)
    return 1;
#else
    return 0;
#endif
}

/* GGML type ids (ggml.h) */
enum { T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13,
       T_Q6_K = 14, T_IQ4_NL = 20, T_IQ4_XS = 23, T_BF16 = 30 };

/* ---------------------------------------------------------------------------------------- SIMD helpers */

INLINE float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 8 int32 sums of 4 products each of unsigned a and signed b bytes: lanes 0-3 cover bytes 0-15. */
INLINE __m256i dot_u8s8(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
#else
    /* pairs of products fit int16: |a| <= 128 and |b| <= 127 in every caller */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

/* 16 bytes of packed nibbles -> 32 values: the low nibbles, then the high nibbles. */
INLINE __m256i nibbles32(const uint8_t *p) {
    const __m128i t = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

/* Bit j of x -> 0x10 in byte j (the fifth bit of Q5_0/Q5_1 values). */
INLINE __m256i bit4_of_bits32(uint32_t x) {
    const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                              0x0303030303030303LL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), spread);
    v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL));
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

INLINE __m256i iq4_lookup(__m256i idx) {
    const __m128i t = _mm_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);
    return _mm256_shuffle_epi8(_mm256_set_m128i(t, t), idx);
}

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j from the 12 packed bytes. */
INLINE void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* ------------------------------------------------------------------------- one 32-value unit per type */

/* A unit of a weight row: 32 values in int8 lanes (unsigned 0..31, or signed), its scale s, and its offset o
 * (w = s * q + o) for unsigned types. The direct kernels below inline these per type; the GEMM path unpacks
 * whole tiles with them. Q6_K's unit has its values only: its 16-value scales are read per super-block
 * (k_scales16 / k_scales8). */
typedef struct {
    __m256i q;
    float s, o;
} unit_t;

INLINE void unit_q4_0(const uint8_t *b, int u, unit_t *w) {
    (void)u;
    w->s = f16(b);
    w->o = -8.0f * w->s;
    w->q = nibbles32(b + 2);
}

INLINE void unit_q4_1(const uint8_t *b, int u, unit_t *w) {
    (void)u;
    w->s = f16(b);
    w->o = f16(b + 2);
    w->q = nibbles32(b + 4);
}

INLINE void unit_q5_0(const uint8_t *b, int u, unit_t *w) {
    (void)u;
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    w->s = f16(b);
    w->o = -16.0f * w->s;
    w->q = _mm256_or_si256(nibbles32(b + 6), bit4_of_bits32(qh));
}

INLINE void unit_q5_1(const uint8_t *b, int u, unit_t *w) {
    (void)u;
    uint32_t qh;
    memcpy(&qh, b + 4, 4);
    w->s = f16(b);
    w->o = f16(b + 2);
    w->q = _mm256_or_si256(nibbles32(b + 8), bit4_of_bits32(qh));
}

INLINE void unit_q8_0(const uint8_t *b, int u, unit_t *w) {
    (void)u;
    w->s = f16(b);
    w->q = _mm256_loadu_si256((const __m256i *)(b + 2));
}

INLINE void unit_iq4_nl(const uint8_t *b, int u, unit_t *w) {
    (void)u;
    w->s = f16(b);
    w->q = iq4_lookup(nibbles32(b + 2));
}

INLINE void unit_iq4_xs(const uint8_t *b, int u, unit_t *w) {
    uint16_t sh;
    memcpy(&sh, b + 2, 2);
    const int ls = ((b[4 + u / 2] >> (4 * (u % 2))) & 0xF) | (((sh >> (2 * u)) & 3) << 4);
    w->s = f16(b) * (float)(ls - 32);
    w->q = iq4_lookup(nibbles32(b + 8 + 16 * u));
}

/* Q4_K/Q5_K: unit u is the low (even u) or high (odd u) nibbles of 32 bytes of qs. */
INLINE __m256i k_nibbles(const uint8_t *qs, int u) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * (u / 2)));
    return _mm256_and_si256(u & 1 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
}

INLINE void unit_q4_k(const uint8_t *b, int u, unit_t *w) {
    int sc, m;
    scale_min_k4(u, b + 4, &sc, &m);
    w->s = f16(b) * (float)sc;
    w->o = -f16(b + 2) * (float)m;
    w->q = k_nibbles(b + 16, u);
}

INLINE void unit_q5_k(const uint8_t *b, int u, unit_t *w) {
    int sc, m;
    scale_min_k4(u, b + 4, &sc, &m);
    w->s = f16(b) * (float)sc;
    w->o = -f16(b + 2) * (float)m;
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(u)), _mm256_set1_epi8(1));
    w->q = _mm256_or_si256(k_nibbles(b + 48, u), _mm256_slli_epi16(hi, 4));
}

/* Q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16 values), fp16 d. In each half
 * of 128 values, unit k takes the low (k < 2) or high nibbles of ql[32 * (k & 1)...] and bits 2k..2k+1 of
 * qh; values are q - 32 (signed). The values only (see unit_t). */
INLINE void unit_q6_k(const uint8_t *b, int u, unit_t *w) {
    const int half = u / 4, k = u % 4;
    const __m256i ql = _mm256_loadu_si256((const __m256i *)(b + 64 * half + 32 * (k & 1)));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * half));
    const __m256i lo = _mm256_and_si256(k >> 1 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(0x0F));
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k)), _mm256_set1_epi8(3));
    w->q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
}

/* ------------------------------------------------------------------------------- quantized activations */

typedef struct {
    const int8_t *q; /* [B, K] */
    const float *d;  /* [B, K / 32] scale per block */
    const float *m;  /* [B, K / 32] d * sum(q) per block */
    int64_t K;
} act_t;

INLINE float fp16_round(float f) { return _cvtsh_ss(_cvtss_sh(f, 0)); }

/* One row of x -> int8 in blocks of 256 as ggml's Q8_K: iscale = -127 / (the value of largest magnitude),
 * q = round(x * iscale) (ties to even) capped at 127, d = 1 / iscale. d and m are written per 32 values. */
static void quantize_row_k(const float *x, int64_t K, int8_t *q, float *d, float *m) {
    for (int64_t sb = 0; sb < K / 256; sb++) {
        const float *xb = x + 256 * sb;
        float amax = 0.0f, extreme = 0.0f;
        for (int i = 0; i < 256; i++) {
            const float a = xb[i] < 0 ? -xb[i] : xb[i];
            if (a > amax) {
                amax = a;
                extreme = xb[i];
            }
        }
        const float iscale = amax > 0.0f ? -127.0f / extreme : 0.0f, scale = amax > 0.0f ? 1.0f / iscale : 0.0f;
        const __m256 inv = _mm256_set1_ps(iscale);
        for (int g = 0; g < 8; g++) {
            __m256i sum = _mm256_setzero_si256(), i32[4];
            for (int i = 0; i < 4; i++) {
                i32[i] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 32 * g + 8 * i), inv)),
                                          _mm256_set1_epi32(127));
                sum = _mm256_add_epi32(sum, i32[i]);
            }
            const __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]), p16b = _mm256_packs_epi32(i32[2], i32[3]);
            const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                           _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(q + 256 * sb + 32 * g), p8);
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s = _mm_hadd_epi32(s, s);
            s = _mm_hadd_epi32(s, s);
            d[8 * sb + g] = scale;
            m[8 * sb + g] = scale * (float)_mm_cvtsi128_si32(s);
        }
    }
}

/* One row of x -> int8 blocks of 32 as ggml's Q8_0: q = round(x * 127 / amax) (ties to even), d = amax / 127
 * rounded to fp16. */
static void quantize_row_0(const float *x, int64_t K, int8_t *q, float *d, float *m) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (int64_t g = 0; g < K / 32; g++) {
        const float *xb = x + 32 * g;
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
        }
        __m128 mx = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        mx = _mm_max_ps(mx, _mm_movehl_ps(mx, mx));
        mx = _mm_max_ss(mx, _mm_movehdup_ps(mx));
        const float top = _mm_cvtss_f32(mx), scale = fp16_round(top / 127.0f);
        const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
        __m256i i32[4], sum = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
            sum = _mm256_add_epi32(sum, i32[i]);
        }
        /* packs interleave 128-bit lanes; the permute restores order */
        const __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]), p16b = _mm256_packs_epi32(i32[2], i32[3]);
        const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + 32 * g), p8);
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s = _mm_hadd_epi32(s, s);
        s = _mm_hadd_epi32(s, s);
        d[g] = scale;
        m[g] = scale * (float)_mm_cvtsi128_si32(s);
    }
}

/* ----------------------------------------------------------------------- quantized tiles and row ranges */

/* Rows of x each weight block is unpacked for in the direct loops: the unpacked block stays in registers while
 * up to QUANT_NB rows of x pass. 8 keeps a sum per row of x in registers on AVX2 too (16 vector registers). */
#define QUANT_NB 8

/* Weight rows are prefetched this many rows ahead: the hardware prefetchers alone leave one core's stream of
 * DRAM reads short of what the memory can deliver (decode reads every weight once per token). */
#define PREFETCH_ROWS 4

INLINE void prefetch_row(const uint8_t *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch((const char *)p + i, _MM_HINT_T0);
}

/* The rows r0..r1 of a weight against every row of x, QUANT_NB rows of x at a time (NAME##_tile below; its
 * last argument, the number of rows, is a constant in each case so that each count gets its own loop). */
#define DEFINE_ROWS(NAME)                                                                                        \
    __attribute__((unused)) static void NAME##_rows(const uint8_t *w, int64_t row_bytes, int64_t r0, int64_t r1, \
                                                    const act_t *a, int64_t B, float *y, int64_t ldy) {          \
        for (int64_t b = 0; b < B; b += QUANT_NB) {                                                              \
            const int64_t nb = B - b < QUANT_NB ? B - b : QUANT_NB;                                              \
            for (int64_t r = r0; r < r1; r++) {                                                                  \
                const uint8_t *row = w + r * row_bytes;                                                          \
                prefetch_row(row + PREFETCH_ROWS * row_bytes, row_bytes);                                        \
                float *out = y + b * ldy + r;                                                                    \
                switch (nb) {                                                                                    \
                case 8: NAME##_tile(row, a, b, out, ldy, 8); break;                                              \
                case 7: NAME##_tile(row, a, b, out, ldy, 7); break;                                              \
                case 6: NAME##_tile(row, a, b, out, ldy, 6); break;                                              \
                case 5: NAME##_tile(row, a, b, out, ldy, 5); break;                                              \
                case 4: NAME##_tile(row, a, b, out, ldy, 4); break;                                              \
                case 3: NAME##_tile(row, a, b, out, ldy, 3); break;                                              \
                case 2: NAME##_tile(row, a, b, out, ldy, 2); break;                                              \
                default: NAME##_tile(row, a, b, out, ldy, 1); break;                                             \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }

/* 32-value units with a float scale each: y[j * ldy] = dot(weight row, x row b + j) for j < NB. NB, UNITS,
 * SIGNED and OFFSET are constants after inlining, so every type gets its own specialised loop. */
#define DEFINE_QUANT_KERNEL(NAME, BLOCK_BYTES, UNITS, SIGNED, OFFSET)                                            \
    INLINE void NAME##_tile(const uint8_t *row, const act_t *a, int64_t b, float *y, int64_t ldy, const int NB) { \
        const int64_t groups = a->K / 32, nblocks = groups / (UNITS);                                            \
        __m256 acc[QUANT_NB];                                                                                    \
        float off[QUANT_NB];                                                                                     \
        for (int j = 0; j < NB; j++) {                                                                           \
            acc[j] = _mm256_setzero_ps();                                                                        \
            off[j] = 0.0f;                                                                                       \
        }                                                                                                        \
        for (int64_t ib = 0; ib < nblocks; ib++) {                                                               \
            const uint8_t *blk = row + ib * (BLOCK_BYTES);                                                       \
            for (int u = 0; u < (UNITS); u++) {                                                                  \
                unit_t w;                                                                                        \
                unit_##NAME(blk, u, &w);                                                                         \
                const int64_t g = ib * (UNITS) + u;                                                              \
                const __m256i wq = SIGNED ? _mm256_sign_epi8(w.q, w.q) : w.q;                                    \
                for (int j = 0; j < NB; j++) {                                                                   \
                    __m256i xq = _mm256_loadu_si256((const __m256i *)(a->q + (b + j) * a->K + 32 * g));          \
                    if (SIGNED) xq = _mm256_sign_epi8(xq, w.q);                                                  \
                    const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(wq, xq));                                       \
                    const float dx = a->d[(b + j) * groups + g];                                                 \
                    acc[j] = _mm256_fmadd_ps(p, _mm256_set1_ps(w.s * dx), acc[j]);                               \
                    if (OFFSET) off[j] += w.o * a->m[(b + j) * groups + g];                                      \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        for (int j = 0; j < NB; j++) y[j * ldy] = hsum(acc[j]) + off[j];                                         \
    }                                                                                                            \
    DEFINE_ROWS(NAME)

/*                  name    bytes units signed offset */
DEFINE_QUANT_KERNEL(iq4_xs, 136,  8,    1,     0)

/* 8 int32 vectors -> one vector of their 8 horizontal sums, in order. */
INLINE __m256i hsum8x8(const __m256i p[8]) {
    const __m256i t0 = _mm256_hadd_epi32(p[0], p[1]), t1 = _mm256_hadd_epi32(p[2], p[3]);
    const __m256i t2 = _mm256_hadd_epi32(p[4], p[5]), t3 = _mm256_hadd_epi32(p[6], p[7]);
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* 8 fp16 fields at `p`, `stride` bytes apart -> 8 floats. */
INLINE __m256 f16x8(const uint8_t *p, int stride) {
    uint16_t h[8];
    for (int i = 0; i < 8; i++) memcpy(h + i, p + i * stride, 2);
    /* built in registers: 8 small stores then one wide load would stall on store forwarding */
    return _mm256_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3], (short)h[4],
                                          (short)h[5], (short)h[6], (short)h[7]));
}

/* The 32-value types, 8 blocks at a time: each block's dot product stays an integer until the 8 sums are
 * gathered, so the scales (d_w * d_x) and offsets (o_w * m_x) of 8 blocks take a few vector ops instead of scalar
 * work per block. blocks8 takes the 8 unpacked blocks q[i] (int8 lanes; signed where SIGNED) of one weight row,
 * their scales dw and offsets ow (w = dw * q + ow), and adds their products with NB rows of x to acc[j]. */
#if defined(__AVX512BW__)
/* 512-bit: two blocks per vector, x read in 64-byte loads; the sums of the four vectors are folded by two
 * unpack-and-add levels into one vector whose lanes are partial sums of known blocks (block 2k in lanes 4l + k
 * for l < 2, block 2k + 1 for l >= 2), multiplied by the block scales laid out the same way. acc is summed
 * over all lanes at the end, so the blocks need no further gathering. */
typedef __m512 acc8_t;
INLINE acc8_t acc8_zero(void) { return _mm512_setzero_ps(); }
INLINE float acc8_sum(acc8_t v) { return _mm512_reduce_add_ps(v); }

INLINE __m512i dot512_u8s8(__m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), a, b);
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1));
#endif
}

INLINE void blocks8(const __m256i q[8], __m256 dw, __m256 ow, const int SIGNED, const int OFFSET, const act_t *a,
                    int64_t b, int64_t g0, acc8_t *acc, const int NB) {
    const int64_t groups = a->K / 32;
    __m512i wa[4];
    __mmask64 neg[4];
    for (int k = 0; k < 4; k++) {
        const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(q[2 * k]), q[2 * k + 1], 1);
        neg[k] = SIGNED ? _mm512_movepi8_mask(w) : 0;
        wa[k] = SIGNED ? _mm512_abs_epi8(w) : w;
    }
    const __m512i order = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 1, 3, 5, 7, 1, 3, 5, 7);
    const __m512 dw16 = _mm512_permutexvar_ps(order, _mm512_castps256_ps512(dw)), ow8 = _mm512_zextps256_ps512(ow);
    for (int j = 0; j < NB; j++) {
        const int8_t *xq = a->q + (b + j) * a->K + 32 * g0;
        __m512i p[4];
        for (int k = 0; k < 4; k++) {
            __m512i xv = _mm512_loadu_si512((const void *)(xq + 64 * k));
            if (SIGNED) xv = _mm512_mask_sub_epi8(xv, neg[k], _mm512_setzero_si512(), xv);
            p[k] = dot512_u8s8(wa[k], xv);
        }
        const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(p[0], p[1]), _mm512_unpackhi_epi32(p[0], p[1]));
        const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(p[2], p[3]), _mm512_unpackhi_epi32(p[2], p[3]));
        const __m512i sums = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
        const int64_t at = (b + j) * groups + g0;
        const __m512 dx16 = _mm512_permutexvar_ps(order, _mm512_castps256_ps512(_mm256_loadu_ps(a->d + at)));
        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(dw16, dx16), acc[j]);
        if (OFFSET) acc[j] = _mm512_fmadd_ps(ow8, _mm512_maskz_loadu_ps(0xFF, a->m + at), acc[j]);
    }
}
#else
typedef __m256 acc8_t;
INLINE acc8_t acc8_zero(void) { return _mm256_setzero_ps(); }
INLINE float acc8_sum(acc8_t v) { return hsum(v); }

INLINE void blocks8(const __m256i q[8], __m256 dw, __m256 ow, const int SIGNED, const int OFFSET, const act_t *a,
                    int64_t b, int64_t g0, acc8_t *acc, const int NB) {
    const int64_t groups = a->K / 32;
    __m256i wa[8];
    for (int i = 0; i < 8; i++) wa[i] = SIGNED ? _mm256_sign_epi8(q[i], q[i]) : q[i];
    for (int j = 0; j < NB; j++) {
        const int8_t *xq = a->q + (b + j) * a->K + 32 * g0;
        __m256i p[8];
        for (int i = 0; i < 8; i++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * i));
            if (SIGNED) xv = _mm256_sign_epi8(xv, q[i]);
            p[i] = dot_u8s8(wa[i], xv);
        }
        const int64_t at = (b + j) * groups + g0;
        const __m256 scale = _mm256_mul_ps(dw, _mm256_loadu_ps(a->d + at));
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8x8(p)), scale, acc[j]);
        if (OFFSET) acc[j] = _mm256_fmadd_ps(ow, _mm256_loadu_ps(a->m + at), acc[j]);
    }
}
#endif

/* OFFSET: 0 none, 1 -C * d (Q4_0: C = 8, Q5_0: 16), 2 an fp16 m field at byte M_AT of the block. */
#define DEFINE_BLOCK32_KERNEL(NAME, BLOCK_BYTES, SIGNED, OFFSET, C, M_AT)                                         \
    INLINE void NAME##_tile(const uint8_t *row, const act_t *a, int64_t b, float *y, int64_t ldy, const int NB) { \
        const int64_t groups = a->K / 32, g8 = groups / 8 * 8;                                                   \
        acc8_t acc[QUANT_NB];                                                                                    \
        float tail[QUANT_NB];                                                                                    \
        for (int j = 0; j < NB; j++) {                                                                           \
            acc[j] = acc8_zero();                                                                                \
            tail[j] = 0.0f;                                                                                      \
        }                                                                                                        \
        for (int64_t g0 = 0; g0 < g8; g0 += 8) {                                                                 \
            const uint8_t *blk = row + g0 * (BLOCK_BYTES);                                                       \
            __m256i q[8];                                                                                        \
            for (int i = 0; i < 8; i++) {                                                                        \
                unit_t u;                                                                                        \
                unit_##NAME(blk + i * (BLOCK_BYTES), 0, &u);                                                     \
                q[i] = u.q;                                                                                      \
            }                                                                                                    \
            const __m256 dw = f16x8(blk, BLOCK_BYTES);                                                           \
            const __m256 ow = OFFSET == 1 ? _mm256_mul_ps(dw, _mm256_set1_ps(-(float)(C)))                       \
                            : OFFSET == 2 ? f16x8(blk + (M_AT), BLOCK_BYTES) : _mm256_setzero_ps();              \
            blocks8(q, dw, ow, SIGNED, OFFSET, a, b, g0, acc, NB);                                               \
        }                                                                                                        \
        for (int64_t g = g8; g < groups; g++) { /* the last K / 32 % 8 blocks, one at a time */                  \
            unit_t u;                                                                                            \
            unit_##NAME(row + g * (BLOCK_BYTES), 0, &u);                                                         \
            const __m256i wa = SIGNED ? _mm256_sign_epi8(u.q, u.q) : u.q;                                        \
            for (int j = 0; j < NB; j++) {                                                                       \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(a->q + (b + j) * a->K + 32 * g));             \
                if (SIGNED) xv = _mm256_sign_epi8(xv, u.q);                                                      \
                const int64_t at = (b + j) * groups + g;                                                         \
                tail[j] += hsum(_mm256_cvtepi32_ps(dot_u8s8(wa, xv))) * u.s * a->d[at];                          \
                if (OFFSET) tail[j] += u.o * a->m[at];                                                           \
            }                                                                                                    \
        }                                                                                                        \
        for (int j = 0; j < NB; j++) y[j * ldy] = acc8_sum(acc[j]) + tail[j];                                    \
    }                                                                                                            \
    DEFINE_ROWS(NAME)

/*                    name    bytes signed offset C   m field */
DEFINE_BLOCK32_KERNEL(q4_0,   18,   0,     1,     8,  0)
DEFINE_BLOCK32_KERNEL(q4_1,   20,   0,     2,     0,  2)
DEFINE_BLOCK32_KERNEL(q5_0,   22,   0,     1,     16, 0)
DEFINE_BLOCK32_KERNEL(q5_1,   24,   0,     2,     0,  2)
DEFINE_BLOCK32_KERNEL(q8_0,   34,   1,     0,     0,  0)
DEFINE_BLOCK32_KERNEL(iq4_nl, 18,   1,     0,     0,  0)

/* -------------------------------------------------------------- K-quants: integer sums per super-block */

/* With Q8_K activations (one scale per 256 values), a K-quant super-block's sub-block scales are small
 * integers: products are summed in int32 with the scales applied by madd (maddubs gives int16 pairs, madd
 * multiplies them by the scale and adds), and only the super-block total is converted to float. */

/* int16 lane i of each 128-bit half -> every lane of that half: shuffle masks, one per lane */
static const int8_t broadcast16[8][32] __attribute__((aligned(32))) = {
#define B16(i) {2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, \
                 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1,  \
                 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1}
    B16(0), B16(1), B16(2), B16(3), B16(4), B16(5), B16(6), B16(7)
#undef B16
};

INLINE __m256i broadcast_lane16(__m256i v, int i) {
    return _mm256_shuffle_epi8(v, _mm256_load_si256((const __m256i *)broadcast16[i]));
}

/* The 12 packed bytes of Q4_K/Q5_K scales and mins -> sc[0..7], m[0..7] as 16 bytes. */
INLINE __m128i k4_scales_mins(const uint8_t *p) {
    uint32_t u[4];
    memcpy(u, p, 12);
    const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
    u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
    const uint32_t mins_lo = u[1] & m1;
    u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
    u[2] = mins_lo;
    u[0] &= m1;
    return _mm_loadu_si128((const __m128i *)u);
}

/* Q4_K and Q5_K (HIGH_BITS): w = d * sc_j * q - dmin * m_j for sub-block j of 32 values. */
#define DEFINE_K4_KERNEL(NAME, BLOCK_BYTES, HIGH_BITS)                                                           \
    INLINE void NAME##_tile(const uint8_t *row, const act_t *a, int64_t b, float *y, int64_t ldy, const int NB) { \
        const int64_t groups = a->K / 32;                                                                        \
        const __m256i low4 = _mm256_set1_epi8(0x0F);                                                             \
        __m256 acc[QUANT_NB]; /* the sub-block sums and the mins' term together */                               \
        for (int j = 0; j < NB; j++) acc[j] = _mm256_setzero_ps();                                               \
        for (int64_t sb = 0; sb < a->K / 256; sb++) {                                                            \
            const uint8_t *blk = row + sb * (BLOCK_BYTES);                                                       \
            const __m128i sm = k4_scales_mins(blk + 4);                                                          \
            const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));                           \
            const __m256 mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))),   \
                                              _mm256_set1_ps(-f16(blk + 2)));                                    \
            const float d = f16(blk);                                                                            \
            const uint8_t *qs = blk + (HIGH_BITS ? 48 : 16);                                                     \
            const __m256i qh = HIGH_BITS ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256(); \
            __m256i sumi[QUANT_NB];                                                                              \
            for (int j = 0; j < NB; j++) sumi[j] = _mm256_setzero_si256();                                       \
            for (int c = 0; c < 4; c++) {                                                                        \
                const __m256i bits = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));                         \
                __m256i lo = _mm256_and_si256(bits, low4), hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low4); \
                if (HIGH_BITS) {                                                                                 \
                    const __m256i one = _mm256_set1_epi8(1);                                                     \
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(                                 \
                        _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c)), one), 4));                               \
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(                                 \
                        _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c + 1)), one), 4));                           \
                }                                                                                                \
                const __m256i sl = broadcast_lane16(scales, 2 * c), sh = broadcast_lane16(scales, 2 * c + 1);    \
                for (int j = 0; j < NB; j++) {                                                                   \
                    const int8_t *xq = a->q + (b + j) * a->K + 256 * sb + 64 * c;                                \
                    const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xq));        \
                    const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32))); \
                    sumi[j] = _mm256_add_epi32(sumi[j], _mm256_add_epi32(_mm256_madd_epi16(sl, pl),              \
                                                                         _mm256_madd_epi16(sh, ph)));            \
                }                                                                                                \
            }                                                                                                    \
            for (int j = 0; j < NB; j++) {                                                                       \
                const int64_t g = (b + j) * groups + 8 * sb;                                                     \
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * a->d[g]), _mm256_cvtepi32_ps(sumi[j]), acc[j]);      \
                acc[j] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(a->m + g), acc[j]);                               \
            }                                                                                                    \
        }                                                                                                        \
        for (int j = 0; j < NB; j++) y[j * ldy] = hsum(acc[j]);                                                  \
    }                                                                                                            \
    DEFINE_ROWS(NAME)

DEFINE_K4_KERNEL(q4_k, 144, 0)
DEFINE_K4_KERNEL(q5_k, 176, 1)

/* Q6_K: w = d * sc_i * (q - 32) with one int8 scale sc_i per 16 values. q - 32 is signed, so the products
 * take |w| and x * sign(w). In each half of 128 values, unit k (32 values) takes the low (k < 2) or high
 * nibbles of ql[32 * (k & 1)...] and bits 2k..2k+1 of qh; its two 16-value halves use sc[2k] and sc[2k+1]. */
INLINE void q6_k_tile(const uint8_t *row, const act_t *a, int64_t b, float *y, int64_t ldy, const int NB) {
    const int64_t groups = a->K / 32;
    const __m256i low4 = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3), k32 = _mm256_set1_epi8(32);
    __m256 acc[QUANT_NB];
    for (int j = 0; j < NB; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < a->K / 256; sb++) {
        const uint8_t *blk = row + sb * 210;
        const float d = f16(blk + 208);
        __m256i sumi[QUANT_NB];
        for (int j = 0; j < NB; j++) sumi[j] = _mm256_setzero_si256();
        for (int half = 0; half < 2; half++) {
            /* lanes: [sc 8h .. 8h+7] in both 128-bit halves; unit k uses lane 2k below, 2k+1 above */
            const __m256i sc = _mm256_broadcastsi128_si256(
                _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(blk + 192 + 8 * half))));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * half));
            for (int k = 0; k < 4; k++) {
                const __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + 64 * half + 32 * (k & 1)));
                const __m256i lo = _mm256_and_si256(k >> 1 ? _mm256_srli_epi16(ql, 4) : ql, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k)), three);
                const __m256i w = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), k32);
                const __m256i wabs = _mm256_sign_epi8(w, w);
                const __m256i scale = _mm256_blend_epi32(broadcast_lane16(sc, 2 * k), broadcast_lane16(sc, 2 * k + 1),
                                                         0xF0);
                for (int j = 0; j < NB; j++) {
                    const __m256i xq = _mm256_loadu_si256(
                        (const __m256i *)(a->q + (b + j) * a->K + 256 * sb + 128 * half + 32 * k));
                    const __m256i p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xq, w));
                    sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(scale, p));
                }
            }
        }
        for (int j = 0; j < NB; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * a->d[(b + j) * groups + 8 * sb]), _mm256_cvtepi32_ps(sumi[j]),
                                     acc[j]);
    }
    for (int j = 0; j < NB; j++) y[j * ldy] = hsum(acc[j]);
}
DEFINE_ROWS(q6_k)


#if defined(__AVX512BW__)
/* The same K-quant sums with 512-bit vectors: half the instructions per weight, which is what bounds a
 * matrix-vector product here (the 256-bit loops run out of issue slots before memory bandwidth). */

/* 16-bit lanes [a x16 | b x16] of the 8 int16 in `v` (a, b: lane indexes) */
INLINE __m512i pick16x2(__m512i v, int a, int b) {
    const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi16((short)a), _mm256_set1_epi16((short)b), 1);
    return _mm512_permutexvar_epi16(idx, v);
}

INLINE __m512i load2x256(const int8_t *lo, const int8_t *hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)lo)),
                              _mm256_loadu_si256((const __m256i *)hi), 1);
}

/* acc + the int32 sums of pairs of int16 products s * p: one instruction with AVX-512 VNNI (vpdpwssd). */
INLINE __m512i madd_add512(__m512i acc, __m512i s, __m512i p) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, s, p);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(s, p));
#endif
}

/* Q4_K and Q5_K (HIGH_BITS): 64 bytes of qs are chunks 2c and 2c+1, whose low nibbles are sub-blocks 4c and
 * 4c+2, their high nibbles 4c+1 and 4c+3. Two 128-bit-lane shuffles of the unpacked weights (done once for all
 * rows of x) put sub-blocks 4c, 4c+1 in one vector and 4c+2, 4c+3 in the other, so that each row of x is read
 * as two plain 64-byte loads; per 64 values and row of x the work is then one maddubs and one vpdpwssd (which
 * applies the sub-block scales and sums in int32). The mins' term (-dmin * m_j * sum of x over sub-block j)
 * is added in the same float32 accumulator, in its lower 8 lanes. */
INLINE void k4_512_tile(const uint8_t *row, const act_t *a, int64_t b, float *y, int64_t ldy, const int NB,
                        const int HIGH_BITS) {
    const int64_t groups = a->K / 32, block_bytes = HIGH_BITS ? 176 : 144;
    /* SHUFFLE: the weights are rearranged to match x (for 3+ rows of x) rather than each row of x assembled from
     * two 32-byte loads to match the weights (cheaper for 1-2 rows) */
    const int CH = NB <= 4 ? 2 : 1, SHUFFLE = NB > 2;
    const __m512i low4 = _mm512_set1_epi8(0x0F), one = _mm512_set1_epi8(1);
    __m512 acc[QUANT_NB], accm[QUANT_NB];
    for (int j = 0; j < NB; j++) acc[j] = accm[j] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < a->K / 256; sb++) {
        const uint8_t *blk = row + sb * block_bytes;
        const __m128i sm = k4_scales_mins(blk + 4);
        const __m512i scales = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(sm));
        const __m512 mins = _mm512_zextps256_ps512(_mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))), _mm256_set1_ps(-f16(blk + 2))));
        const float d = f16(blk);
        const uint8_t *qs = blk + (HIGH_BITS ? 48 : 16);
        __m512i qh = _mm512_setzero_si512();
        if (HIGH_BITS) qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 16)));
        /* CH independent int32 sums per row of x: few rows of x alone are too few chains to hide vpdpwssd's
         * latency */
        __m512i sumi[2][QUANT_NB];
        for (int h = 0; h < CH; h++)
            for (int j = 0; j < NB; j++) sumi[h][j] = _mm512_setzero_si512();
        for (int c = 0; c < 2; c++) {
            const __m512i bits = _mm512_loadu_si512((const void *)(qs + 64 * c));
            const __m512i lo = _mm512_and_si512(bits, low4), hi = _mm512_and_si512(_mm512_srli_epi16(bits, 4), low4);
            /* w[v]: sub-blocks (4c + 2v, 4c + 2v + 1) when shuffled, else (4c + v, 4c + v + 2) */
            __m512i w[2] = {lo, hi};
            if (SHUFFLE) {
                w[0] = _mm512_shuffle_i64x2(lo, hi, 0x44);
                w[1] = _mm512_shuffle_i64x2(lo, hi, 0xEE);
            }
            for (int v = 0; v < 2; v++) {
                const int sub0 = SHUFFLE ? 4 * c + 2 * v : 4 * c + v, sub1 = SHUFFLE ? sub0 + 1 : sub0 + 2;
                if (HIGH_BITS) { /* bit s of qh is the fifth bit of sub-block s */
                    const __m512i shift = _mm512_inserti64x4(_mm512_set1_epi16((short)sub0),
                                                             _mm256_set1_epi16((short)sub1), 1);
                    w[v] = _mm512_or_si512(w[v], _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, shift),
                                                                                    one), 4));
                }
                const __m512i scale = pick16x2(scales, sub0, sub1);
                const int h = (2 * c + v) % CH;
                for (int j = 0; j < NB; j++) {
                    const int8_t *xq = a->q + (b + j) * a->K + 256 * sb + 32 * sub0;
                    const __m512i xv = SHUFFLE ? _mm512_loadu_si512((const void *)xq) : load2x256(xq, xq + 64);
                    sumi[h][j] = madd_add512(sumi[h][j], scale, _mm512_maddubs_epi16(w[v], xv));
                }
            }
        }
        for (int j = 0; j < NB; j++) {
            const int64_t g = (b + j) * groups + 8 * sb;
            __m512i total = sumi[0][j];
            for (int h = 1; h < CH; h++) total = _mm512_add_epi32(total, sumi[h][j]);
            const __m512 m = _mm512_maskz_loadu_ps(0xFF, a->m + g), dx = _mm512_set1_ps(d * a->d[g]);
            if (NB <= 4) { /* registers to spare: the mins' term in its own accumulator, two short chains */
                acc[j] = _mm512_fmadd_ps(dx, _mm512_cvtepi32_ps(total), acc[j]);
                accm[j] = _mm512_fmadd_ps(mins, m, accm[j]);
            } else { /* one dependent add per super-block on acc */
                acc[j] = _mm512_add_ps(acc[j], _mm512_fmadd_ps(dx, _mm512_cvtepi32_ps(total), _mm512_mul_ps(mins, m)));
            }
        }
    }
    for (int j = 0; j < NB; j++) y[j * ldy] = _mm512_reduce_add_ps(NB <= 4 ? _mm512_add_ps(acc[j], accm[j]) : acc[j]);
}

INLINE void q4_k512_tile(const uint8_t *row, const act_t *a, int64_t b, float *y, int64_t ldy, const int NB) {
    k4_512_tile(row, a, b, y, ldy, NB, 0);
}
INLINE void q5_k512_tile(const uint8_t *row, const act_t *a, int64_t b, float *y, int64_t ldy, const int NB) {
    k4_512_tile(row, a, b, y, ldy, NB, 1);
}
DEFINE_ROWS(q4_k512)
DEFINE_ROWS(q5_k512)

/* Q6_K: in each half of 128 values, 64 bytes of ql hold units 0-1 (low nibbles, values 0..63) and units 2-3
 * (high nibbles, values 64..127); qh bits 2k..2k+1 belong to unit k. Signed q - 32: |w| and x negated where
 * w < 0 (AVX-512 has no vpsignb). */
INLINE void q6_k512_tile(const uint8_t *row, const act_t *a, int64_t b, float *y, int64_t ldy, const int NB) {
    const int64_t groups = a->K / 32;
    const __m512i low4 = _mm512_set1_epi8(0x0F), three = _mm512_set1_epi8(3), k32 = _mm512_set1_epi8(32);
    const __m512i shift_lo = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const __m512i shift_hi = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
    /* int16 lanes in groups of 8 -> scales 0..3 (low vector) and 4..7 (high vector) of the half */
    const __m512i pick_lo = _mm512_set_epi64(0x0003000300030003LL, 0x0003000300030003LL, 0x0002000200020002LL,
                                             0x0002000200020002LL, 0x0001000100010001LL, 0x0001000100010001LL, 0, 0);
    const __m512i pick_hi = _mm512_add_epi16(pick_lo, _mm512_set1_epi16(4));
    __m512 acc[QUANT_NB];
    for (int j = 0; j < NB; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < a->K / 256; sb++) {
        const uint8_t *blk = row + sb * 210;
        const float d = f16(blk + 208);
        __m512i sumi[QUANT_NB];
        for (int j = 0; j < NB; j++) sumi[j] = _mm512_setzero_si512();
        for (int half = 0; half < 2; half++) {
            const __m512i sc = _mm512_castsi128_si512(
                _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(blk + 192 + 8 * half))));
            const __m512i ql = _mm512_loadu_si512((const void *)(blk + 64 * half));
            const __m256i qh256 = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * half));
            const __m512i qh = _mm512_inserti64x4(_mm512_castsi256_si512(qh256), qh256, 1);
            __m512i w[2];
            w[0] = _mm512_or_si512(_mm512_and_si512(ql, low4),
                                   _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, shift_lo), three), 4));
            w[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
                                   _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, shift_hi), three), 4));
            const __m512i scale[2] = {_mm512_permutexvar_epi16(pick_lo, sc), _mm512_permutexvar_epi16(pick_hi, sc)};
            for (int v = 0; v < 2; v++) {
                w[v] = _mm512_sub_epi8(w[v], k32);
                const __mmask64 neg = _mm512_movepi8_mask(w[v]);
                const __m512i wabs = _mm512_abs_epi8(w[v]);
                for (int j = 0; j < NB; j++) {
                    const __m512i xq = _mm512_loadu_si512(
                        (const void *)(a->q + (b + j) * a->K + 256 * sb + 128 * half + 64 * v));
                    const __m512i xs = _mm512_mask_sub_epi8(xq, neg, _mm512_setzero_si512(), xq);
                    sumi[j] = madd_add512(sumi[j], scale[v], _mm512_maddubs_epi16(wabs, xs));
                }
            }
        }
        for (int j = 0; j < NB; j++)
            acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(d * a->d[(b + j) * groups + 8 * sb]), _mm512_cvtepi32_ps(sumi[j]),
                                     acc[j]);
    }
    for (int j = 0; j < NB; j++) y[j * ldy] = _mm512_reduce_add_ps(acc[j]);
}
DEFINE_ROWS(q6_k512)
#endif

/* ------------------------------------------------------------ GEMM: interleaved int8 tiles for many rows */

/* For batches of GEMM_MIN_B rows and more, each task unpacks GEMM_R weight rows into an int8 tile in a
 * thread-local scratch (a few hundred KB: it stays in L2) laid out so that one vector holds 4 consecutive
 * values of each of the GEMM_R rows; a broadcast of 4 bytes of x then multiplies all GEMM_R rows at once
 * (vpdpbusd, or maddubs + madd), summed in int32 over a block of 16 or 32 values, then scaled in float32.
 * The unpacking costs a few operations per weight once per tile, shared by every row of x.
 * x enters as unsigned (x + 128) since the instructions take one unsigned operand: each block's integer sum
 * starts from -128 * sum(w), precomputed with the tile. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define GEMM_R 16
#define GEMM_NB 8
#define GEMM_ANY_W 1 /* vpdpbusd sums in int32: any int8 weight */
typedef __m512i ivec;
typedef __m512 fvec;
#define IV_LOAD(p) _mm512_load_si512((const void *)(p))
#define IV_SET1(v) _mm512_set1_epi32(v)
#define DOT4(acc, xu, w) _mm512_dpbusd_epi32(acc, xu, w)
#define FV_ZERO() _mm512_setzero_ps()
#define FV_LOAD(p) _mm512_load_ps(p)
#define FV_SET1(v) _mm512_set1_ps(v)
#define FV_CVT(v) _mm512_cvtepi32_ps(v)
#define FV_MUL(a, b) _mm512_mul_ps(a, b)
#define FV_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define FV_STOREU(p, v) _mm512_storeu_ps(p, v)
#else
#define GEMM_R 8
#define GEMM_NB 4
#define GEMM_ANY_W 0 /* maddubs pairs of (x + 128) * w saturate int16 for |w| > 64: small weights only */
typedef __m256i ivec;
typedef __m256 fvec;
#define IV_LOAD(p) _mm256_load_si256((const __m256i *)(p))
#define IV_SET1(v) _mm256_set1_epi32(v)
#define DOT4(acc, xu, w) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(xu, w), _mm256_set1_epi16(1)))
#define FV_ZERO() _mm256_setzero_ps()
#define FV_LOAD(p) _mm256_load_ps(p)
#define FV_SET1(v) _mm256_set1_ps(v)
#define FV_CVT(v) _mm256_cvtepi32_ps(v)
#define FV_MUL(a, b) _mm256_mul_ps(a, b)
#define FV_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define FV_STOREU(p, v) _mm256_storeu_ps(p, v)
#endif
/* Rows of x from which the tiles beat the direct kernels (which unpack each weight block once per 8 rows of x),
 * measured with benchmarks/kernel_ab.py (direct-only against tiles-only builds, 5632 x 2048 matrices from DRAM,
 * docs/benchmarks.md), since the tiles are written with register transposes. AVX-512: ~10 rows for Q4_K, ~12
 * for Q4_0, ~13 for Q6_K, 16-20 for Q8_0. AVX2 (maddubs, int16 sums widened every 2-4 steps): ~16 for Q6_K, ~24
 * for Q4_0; the direct Q4_K/Q5_K loops win at any batch. The other types keep the thresholds measured before
 * the transposes (32-64); IQ4_XS keeps its earlier 16. */
static int64_t gemm_min_b(int type) {
    switch (type) {
#if defined(__AVX512BW__)
    case T_Q4_K: return 10;
    case T_Q4_0: return 12;
    case T_Q6_K: return 13;
    case T_Q8_0: return 20;
    case T_Q4_1: case T_Q5_0: case T_Q5_1: return 32;
    case T_IQ4_NL: return 40;
    case T_Q5_K: return 48;
#else
    case T_Q6_K: return 16;
    case T_Q4_0: return 24;
    case T_Q4_1: case T_Q5_0: case T_Q5_1: return 64;
    case T_Q4_K: case T_Q5_K: return INT64_MAX;
#endif
    default: return 16;
    }
}

typedef struct {
    int8_t *w;  /* [block][G / 4][GEMM_R][4] */
    float *s;   /* [block][GEMM_R] scale */
    float *o;   /* [block][GEMM_R] offset (w = s * q + o) */
    int32_t *c; /* [block][GEMM_R] -128 * sum(q): what x + 128 adds, the start of each block's integer sum */
} tile_t;

/* Values per tile block: 16 for Q6_K (a scale per 16 values), 32 for the others. */
static int gemm_block(int type) { return type == T_Q6_K ? 16 : 32; }

/* Whether the tile path takes this type on this build. */
static int gemm_supports(int type) {
    switch (type) {
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q4_K: case T_Q5_K: case T_Q6_K: return 1;
    case T_Q8_0: case T_IQ4_NL: case T_IQ4_XS: return GEMM_ANY_W;
    default: return 0;
    }
}

/* Unit g (32 values) of a row of any quantized type. */
INLINE void unit_of(int type, const uint8_t *row, int64_t g, unit_t *w) {
    w->o = 0.0f;
    switch (type) {
    case T_Q4_0: unit_q4_0(row + 18 * g, 0, w); break;
    case T_Q4_1: unit_q4_1(row + 20 * g, 0, w); break;
    case T_Q5_0: unit_q5_0(row + 22 * g, 0, w); break;
    case T_Q5_1: unit_q5_1(row + 24 * g, 0, w); break;
    case T_Q8_0: unit_q8_0(row + 34 * g, 0, w); break;
    case T_IQ4_NL: unit_iq4_nl(row + 18 * g, 0, w); break;
    case T_IQ4_XS: unit_iq4_xs(row + 136 * (g / 8), (int)(g % 8), w); break;
    case T_Q4_K: unit_q4_k(row + 144 * (g / 8), (int)(g % 8), w); break;
    case T_Q5_K: unit_q5_k(row + 176 * (g / 8), (int)(g % 8), w); break;
    case T_Q6_K: unit_q6_k(row + 210 * (g / 8), (int)(g % 8), w); break;
    }
}

/* Bytes ahead of the unpacking at which each of a tile's rows is prefetched (the rows read side by side are
 * more streams than the hardware prefetcher follows). */
#define TILE_PREFETCH 256

#if GEMM_R == 16
/* AVX-512: the tile is written with register transposes. Each row gives 64 values at a time in one vector, in
 * order; the 16 rows' vectors are transposed as 16 x 16 dwords, which leaves 4 values of every row in each
 * vector: the tile's layout, stored whole. 128 * sum(q) per block comes from the transposed vectors (one
 * vpdpbusd per 4 values of 16 rows). Q4_K and Q6_K take their scales once per super-block and row in vectors,
 * transposed to the [block][row] layout the same way; the other types per 32-value unit (unit_of). */

/* r[i] = dword i of every r[0..15] (a 16 x 16 dword transpose) */
INLINE void transpose16x16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* r[4g + m], lane L: dword 4L + m of rows 4g .. 4g + 3 */
    for (int g = 0; g < 16; g += 4) {
        r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
        r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
        r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
        r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    /* a 4 x 4 transpose of 128-bit lanes for each m */
    for (int m = 0; m < 4; m++) {
        const __m512i s0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44), s1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xEE);
        const __m512i s2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
        const __m512i s3 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xEE);
        t[m] = _mm512_shuffle_i32x4(s0, s2, 0x88);
        t[4 + m] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
        t[8 + m] = _mm512_shuffle_i32x4(s1, s3, 0x88);
        t[12 + m] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Values 64i .. 64i + 63 of a Q4_K row (chunk i of 32 bytes of qs: low nibbles, then high nibbles). */
INLINE __m512i chunk_q4_k(const uint8_t *row, int64_t i) {
    const __m256i b = _mm256_loadu_si256((const __m256i *)(row + 144 * (i / 4) + 16 + 32 * (i % 4)));
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4)),
                              _mm256_and_si256(_mm256_srli_epi16(b, 4), low4), 1);
}

/* Values 64i .. 64i + 63 of a Q6_K row, q - 32 (see q6_k512_tile for the bit layout). */
INLINE __m512i chunk_q6_k(const uint8_t *row, int64_t i) {
    const uint8_t *blk = row + 210 * (i / 4);
    const int half = (int)(i % 4) / 2, v = (int)(i % 2);
    const __m512i ql = _mm512_loadu_si512((const void *)(blk + 64 * half));
    const __m256i qh256 = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * half));
    const __m512i qh = _mm512_inserti64x4(_mm512_castsi256_si512(qh256), qh256, 1);
    const __m512i shift =
        _mm512_inserti64x4(_mm512_set1_epi16((short)(4 * v)), _mm256_set1_epi16((short)(4 * v + 2)), 1);
    const __m512i lo = _mm512_and_si512(v ? _mm512_srli_epi16(ql, 4) : ql, _mm512_set1_epi8(0x0F));
    const __m512i hi = _mm512_and_si512(_mm512_srlv_epi16(qh, shift), _mm512_set1_epi8(3));
    return _mm512_sub_epi8(_mm512_or_si512(lo, _mm512_slli_epi16(hi, 4)), _mm512_set1_epi8(32));
}

/* The scales of super-block sb of 16 rows in the tile's [block][row] layout: a vector per row (Q4_K: d * sc_j
 * for its 8 sub-blocks, then -dmin * m_j; Q6_K: d * sc_j for its 16 blocks of 16), transposed like the values.
 * Q6_K has no offsets (its tile is read without them). Rows past the matrix get zeros. */
INLINE void k_scales16(int type, const uint8_t *w, int64_t row_bytes, int nrows, int64_t sb, tile_t *t) {
    __m512i v[16];
    for (int r = 0; r < 16; r++) {
        __m512 s = _mm512_setzero_ps();
        if (r < nrows && type == T_Q4_K) {
            const uint8_t *blk = w + r * row_bytes + 144 * sb;
            const __m128i sm = k4_scales_mins(blk + 4);
            const __m512d d = _mm512_castps_pd(_mm512_set1_ps(f16(blk)));
            const __m512 factor =
                _mm512_castpd_ps(_mm512_insertf64x4(d, _mm256_castps_pd(_mm256_set1_ps(-f16(blk + 2))), 1));
            s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sm)), factor);
        } else if (r < nrows) {
            const uint8_t *blk = w + r * row_bytes + 210 * sb;
            s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192)))),
                              _mm512_set1_ps(f16(blk + 208)));
        }
        v[r] = _mm512_castps_si512(s);
    }
    transpose16x16(v);
    if (type == T_Q4_K)
        for (int j = 0; j < 8; j++) {
            _mm512_store_si512((void *)(t->s + (8 * sb + j) * 16), v[j]);
            _mm512_store_si512((void *)(t->o + (8 * sb + j) * 16), v[8 + j]);
        }
    else
        for (int j = 0; j < 16; j++) _mm512_store_si512((void *)(t->s + (16 * sb + j) * 16), v[j]);
}

/* Values 64i .. 64i + 63 of a row of another type: two units from unit_of (one where K / 32 is odd and this is
 * the last chunk), their scales and offsets written to the tile as they come. */
INLINE __m512i chunk_units(int type, const uint8_t *row, int64_t i, int64_t units, int r, int present, tile_t *t) {
    __m256i q[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int h = 0; h < 2 && 2 * i + h < units; h++) {
        unit_t u = {.q = _mm256_setzero_si256()};
        if (present) unit_of(type, row, 2 * i + h, &u);
        else u.s = 0.0f;
        if (type == T_Q4_0 || type == T_Q5_0) { /* w = s * (q - 8 or 16): no offset needed */
            u.q = _mm256_sub_epi8(u.q, _mm256_set1_epi8(present ? (type == T_Q4_0 ? 8 : 16) : 0));
            u.o = 0.0f;
        }
        q[h] = u.q;
        t->s[(2 * i + h) * 16 + r] = u.s;
        t->o[(2 * i + h) * 16 + r] = u.o;
    }
    return _mm512_inserti64x4(_mm512_castsi256_si512(q[0]), q[1], 1);
}

/* TYPE: a constant in each instance (0: `type`), so that the per-row work of the common types has no type
 * switch. */
INLINE void unpack_tile16(int type, const uint8_t *w, int64_t row_bytes, int nrows, int64_t K, tile_t *t,
                          const int TYPE) {
    const int G = gemm_block(type);
    const int64_t units = K / 32;
    const __m512i k128 = _mm512_set1_epi8((char)0x80);
    for (int64_t i = 0; i < (units + 1) / 2; i++) {
        const int n4 = 2 * i + 1 < units ? 16 : 8; /* the 4-value groups of this chunk inside K */
        __m512i v[16];
        if ((TYPE == T_Q4_K || TYPE == T_Q6_K) && i % 4 == 0) k_scales16(TYPE, w, row_bytes, nrows, i / 4, t);
        const int64_t ahead = (2 * i + 2) * row_bytes / units + TILE_PREFETCH;
        for (int r = 0; r < 16; r++) {
            const uint8_t *row = w + r * row_bytes;
            const int present = r < nrows;
            if (present && ahead < row_bytes) _mm_prefetch((const char *)(row + ahead), _MM_HINT_T0);
            if (TYPE == T_Q4_K || TYPE == T_Q6_K) {
                v[r] = !present ? _mm512_setzero_si512() : TYPE == T_Q4_K ? chunk_q4_k(row, i) : chunk_q6_k(row, i);
            } else {
                v[r] = chunk_units(TYPE ? TYPE : type, row, i, units, r, present, t);
            }
        }
        transpose16x16(v);
        for (int k = 0; k < n4; k++) _mm512_store_si512((void *)(t->w + 64 * (16 * i + k)), v[k]);
        for (int h = 0; h < n4 * 4 / G; h++) { /* block (64 i + G h) / G */
            __m512i c = _mm512_setzero_si512();
            for (int k = 0; k < G / 4; k++) c = _mm512_dpbusd_epi32(c, k128, v[h * (G / 4) + k]);
            _mm512_store_si512((void *)(t->c + (64 / G * i + h) * 16), _mm512_sub_epi32(_mm512_setzero_si512(), c));
        }
    }
}

static void unpack_tile(int type, const uint8_t *w, int64_t row_bytes, int nrows, int64_t K, tile_t *t) {
    switch (type) {
    case T_Q4_K: unpack_tile16(type, w, row_bytes, nrows, K, t, T_Q4_K); break;
    case T_Q6_K: unpack_tile16(type, w, row_bytes, nrows, K, t, T_Q6_K); break;
    case T_Q4_0: unpack_tile16(type, w, row_bytes, nrows, K, t, T_Q4_0); break;
    case T_Q8_0: unpack_tile16(type, w, row_bytes, nrows, K, t, T_Q8_0); break;
    default: unpack_tile16(type, w, row_bytes, nrows, K, t, 0); break;
    }
}
#else
/* AVX2: the same with 8 rows, one 32-value unit per row at a time and 8 x 8 dword transposes. */

/* r[i] = dword i of every r[0..7] (an 8 x 8 dword transpose) */
INLINE void transpose8x8(__m256i r[8]) {
    __m256i t[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* r[4g + m], lane L: dword 4L + m of rows 4g .. 4g + 3 */
    for (int g = 0; g < 8; g += 4) {
        r[g] = _mm256_unpacklo_epi64(t[g], t[g + 2]);
        r[g + 1] = _mm256_unpackhi_epi64(t[g], t[g + 2]);
        r[g + 2] = _mm256_unpacklo_epi64(t[g + 1], t[g + 3]);
        r[g + 3] = _mm256_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int m = 0; m < 4; m++) {
        t[m] = _mm256_permute2x128_si256(r[m], r[4 + m], 0x20);
        t[4 + m] = _mm256_permute2x128_si256(r[m], r[4 + m], 0x31);
    }
    for (int i = 0; i < 8; i++) r[i] = t[i];
}

/* The scales of super-block sb of 8 rows in the tile's [block][row] layout (see k_scales16): Q4_K d * sc_j and
 * -dmin * m_j, Q6_K d * sc_j for its blocks 0-7 and 8-15, two vectors per row, each set transposed. */
INLINE void k_scales8(int type, const uint8_t *w, int64_t row_bytes, int nrows, int64_t sb, tile_t *t) {
    __m256i a[8], b[8];
    for (int r = 0; r < 8; r++) {
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        if (r < nrows && type == T_Q4_K) {
            const uint8_t *blk = w + r * row_bytes + 144 * sb;
            const __m128i sm = k4_scales_mins(blk + 4);
            lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)), _mm256_set1_ps(f16(blk)));
            hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))),
                               _mm256_set1_ps(-f16(blk + 2)));
        } else if (r < nrows) {
            const uint8_t *blk = w + r * row_bytes + 210 * sb;
            const __m128i sc = _mm_loadu_si128((const __m128i *)(blk + 192));
            const __m256 d = _mm256_set1_ps(f16(blk + 208));
            lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)), d);
            hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))), d);
        }
        a[r] = _mm256_castps_si256(lo);
        b[r] = _mm256_castps_si256(hi);
    }
    transpose8x8(a);
    transpose8x8(b);
    for (int j = 0; j < 8; j++) {
        if (type == T_Q4_K) {
            _mm256_store_si256((__m256i *)(t->s + (8 * sb + j) * 8), a[j]);
            _mm256_store_si256((__m256i *)(t->o + (8 * sb + j) * 8), b[j]);
        } else {
            _mm256_store_si256((__m256i *)(t->s + (16 * sb + j) * 8), a[j]);
            _mm256_store_si256((__m256i *)(t->s + (16 * sb + 8 + j) * 8), b[j]);
        }
    }
}

INLINE void unpack_tile8(int type, const uint8_t *w, int64_t row_bytes, int nrows, int64_t K, tile_t *t,
                         const int TYPE) {
    const int G = gemm_block(type), kquant = TYPE == T_Q4_K || TYPE == T_Q6_K;
    const int64_t units = K / 32;
    const __m256i k128 = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    for (int64_t g = 0; g < units; g++) {
        if (kquant && g % 8 == 0) k_scales8(TYPE, w, row_bytes, nrows, g / 8, t);
        const int64_t ahead = (g + 1) * row_bytes / units + TILE_PREFETCH;
        __m256i v[8];
        for (int r = 0; r < 8; r++) {
            const uint8_t *row = w + r * row_bytes;
            unit_t u = {.q = _mm256_setzero_si256()};
            if (r < nrows) {
                if (ahead < row_bytes) _mm_prefetch((const char *)(row + ahead), _MM_HINT_T0);
                unit_of(TYPE ? TYPE : type, row, g, &u);
            } else {
                u.s = u.o = 0.0f;
            }
            if (type == T_Q4_0 || type == T_Q5_0) { /* w = s * (q - 8 or 16): no offset needed */
                u.q = _mm256_sub_epi8(u.q, _mm256_set1_epi8(r < nrows ? (type == T_Q4_0 ? 8 : 16) : 0));
                u.o = 0.0f;
            }
            v[r] = u.q;
            if (!kquant) { /* the K-quants' scales come per super-block (k_scales8) */
                t->s[g * 8 + r] = u.s;
                t->o[g * 8 + r] = u.o;
            }
        }
        transpose8x8(v);
        for (int k = 0; k < 8; k++) _mm256_store_si256((__m256i *)(t->w + 32 * (8 * g + k)), v[k]);
        for (int h = 0; h < 32 / G; h++) { /* block (32 g + G h) / G; pairs 128 * (q + q') fit int16 */
            __m256i c = _mm256_setzero_si256();
            for (int k = 0; k < G / 4; k++)
                c = _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(k128, v[h * (G / 4) + k]), ones));
            _mm256_store_si256((__m256i *)(t->c + (32 / G * g + h) * 8), _mm256_sub_epi32(_mm256_setzero_si256(), c));
        }
    }
}

static void unpack_tile(int type, const uint8_t *w, int64_t row_bytes, int nrows, int64_t K, tile_t *t) {
    switch (type) {
    case T_Q4_K: unpack_tile8(type, w, row_bytes, nrows, K, t, T_Q4_K); break;
    case T_Q6_K: unpack_tile8(type, w, row_bytes, nrows, K, t, T_Q6_K); break;
    case T_Q4_0: unpack_tile8(type, w, row_bytes, nrows, K, t, T_Q4_0); break;
    default: unpack_tile8(type, w, row_bytes, nrows, K, t, 0); break;
    }
}
#endif

/* The types whose tile keeps an offset (w = s * q + o); Q4_0/Q5_0 are centred when unpacked instead. */
static int gemm_offset(int type) { return type == T_Q4_1 || type == T_Q5_1 || type == T_Q4_K || type == T_Q5_K; }

/* AVX2 (maddubs): how many 4-value steps of int16 pair sums may be added before widening to int32. A pair of
 * (x + 128) * w is at most 255 * 2 * |w|: 4 steps for |w| <= 16 (Q4_0, Q4_1, Q5_0 centred, Q4_K), 2 for
 * |w| <= 32 (Q5_1, Q5_K, Q6_K). */
static int gemm_sums16(int type) { return type == T_Q5_1 || type == T_Q5_K || type == T_Q6_K ? 2 : 4; }

/* NB rows of x (unsigned, x + 128) against a tile: y[j * ldy + r] for r < nrows. */
INLINE void gemm_micro(const tile_t *t, int64_t nblk, const int G, const int OFF, const int S, const uint8_t *xu,
                       int64_t K, const float *xd, const float *xm, int64_t groups, float *y, int64_t ldy, int nrows,
                       const int NB) {
    fvec acc[GEMM_NB];
    for (int j = 0; j < NB; j++) acc[j] = FV_ZERO();
    for (int64_t blk = 0; blk < nblk; blk++) {
        ivec ia[GEMM_NB];
        const ivec c = IV_LOAD(t->c + blk * GEMM_R);
        for (int j = 0; j < NB; j++) ia[j] = c;
        const int8_t *wb = t->w + blk * G * GEMM_R;
        const uint8_t *xb = xu + blk * G;
#if GEMM_ANY_W
        (void)S;
        for (int k4 = 0; k4 < G / 4; k4++) {
            const ivec wv = IV_LOAD(wb + k4 * 4 * GEMM_R);
            for (int j = 0; j < NB; j++) {
                int32_t x4;
                memcpy(&x4, xb + j * K + 4 * k4, 4);
                ia[j] = DOT4(ia[j], IV_SET1(x4), wv);
            }
        }
#else
        /* maddubs pairs of S steps summed in int16 (gemm_sums16 keeps them in range), then widened by one madd */
        for (int k4 = 0; k4 < G / 4; k4 += S) {
            __m256i p16[GEMM_NB];
            for (int u = 0; u < S; u++) {
                const ivec wv = IV_LOAD(wb + (k4 + u) * 4 * GEMM_R);
                for (int j = 0; j < NB; j++) {
                    int32_t x4;
                    memcpy(&x4, xb + j * K + 4 * (k4 + u), 4);
                    const __m256i p = _mm256_maddubs_epi16(IV_SET1(x4), wv);
                    p16[j] = u ? _mm256_add_epi16(p16[j], p) : p;
                }
            }
            for (int j = 0; j < NB; j++)
                ia[j] = _mm256_add_epi32(ia[j], _mm256_madd_epi16(p16[j], _mm256_set1_epi16(1)));
        }
#endif
        const fvec s = FV_LOAD(t->s + blk * GEMM_R), o = FV_LOAD(t->o + blk * GEMM_R);
        const int64_t g32 = blk * G / 32;
        for (int j = 0; j < NB; j++) {
            acc[j] = FV_FMA(FV_CVT(ia[j]), FV_MUL(s, FV_SET1(xd[j * groups + g32])), acc[j]);
            if (OFF) acc[j] = FV_FMA(o, FV_SET1(xm[j * groups + g32]), acc[j]);
        }
    }
    for (int j = 0; j < NB; j++) {
        if (nrows == GEMM_R) {
            FV_STOREU(y + j * ldy, acc[j]);
        } else {
            float tmp[GEMM_R] __attribute__((aligned(64)));
            FV_STOREU(tmp, acc[j]);
            memcpy(y + j * ldy, tmp, sizeof(float) * nrows);
        }
    }
}

static __thread tile_t tile_scratch;
static __thread int64_t tile_scratch_k;

/* Rows r0..r1 (at most GEMM_R) of a weight against all B rows of x through one tile. */
static int gemm_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t r0, int64_t r1, const act_t *a,
                     const uint8_t *xu, int64_t B, float *y, int64_t ldy) {
    const int64_t K = a->K, groups = K / 32;
    tile_t *t = &tile_scratch;
    if (tile_scratch_k < K) {
        free(t->w);
        const size_t wbytes = (size_t)K * GEMM_R, vbytes = sizeof(float) * (size_t)(K / 16) * GEMM_R;
        uint8_t *mem = aligned_alloc(64, wbytes + 3 * vbytes);
        if (!mem) return -1;
        t->w = (int8_t *)mem;
        t->s = (float *)(mem + wbytes);
        t->o = (float *)(mem + wbytes + vbytes);
        t->c = (int32_t *)(mem + wbytes + 2 * vbytes);
        tile_scratch_k = K;
    }
    const int nrows = (int)(r1 - r0), G = gemm_block(type), offset = gemm_offset(type), sums16 = gemm_sums16(type);
    unpack_tile(type, w + r0 * row_bytes, row_bytes, nrows, K, t);
    const int64_t nblk = K / G;
    for (int64_t b = 0; b < B; b += GEMM_NB) {
        const int64_t nb = B - b < GEMM_NB ? B - b : GEMM_NB;
        const uint8_t *xb = xu + b * K;
        const float *xd = a->d + b * groups, *xm = a->m + b * groups;
        float *out = y + b * ldy + r0;
        /* G, OFF, S and NB as constants: each combination its own loop */
#define MICRO(G_, OFF_, S_, NB_) gemm_micro(t, nblk, G_, OFF_, S_, xb, K, xd, xm, groups, out, ldy, nrows, NB_)
#if GEMM_NB == 8
#define MICRO_ROWS(G_, OFF_, S_)                                                                                 \
    switch (nb) {                                                                                                \
    case 8: MICRO(G_, OFF_, S_, 8); break;                                                                       \
    case 7: MICRO(G_, OFF_, S_, 7); break;                                                                       \
    case 6: MICRO(G_, OFF_, S_, 6); break;                                                                       \
    case 5: MICRO(G_, OFF_, S_, 5); break;                                                                       \
    case 4: MICRO(G_, OFF_, S_, 4); break;                                                                       \
    case 3: MICRO(G_, OFF_, S_, 3); break;                                                                       \
    case 2: MICRO(G_, OFF_, S_, 2); break;                                                                       \
    default: MICRO(G_, OFF_, S_, 1); break;                                                                      \
    }
#else
#define MICRO_ROWS(G_, OFF_, S_)                                                                                 \
    switch (nb) {                                                                                                \
    case 4: MICRO(G_, OFF_, S_, 4); break;                                                                       \
    case 3: MICRO(G_, OFF_, S_, 3); break;                                                                       \
    case 2: MICRO(G_, OFF_, S_, 2); break;                                                                       \
    default: MICRO(G_, OFF_, S_, 1); break;                                                                      \
    }
#endif
        if (G == 16) {
            MICRO_ROWS(16, 0, 2)
        } else if (offset && sums16 == 4) {
            MICRO_ROWS(32, 1, 4)
        } else if (offset) {
            MICRO_ROWS(32, 1, 2)
        } else {
            MICRO_ROWS(32, 0, 4)
        }
#undef MICRO_ROWS
#undef MICRO
    }
    return 0;
}

/* ---------------------------------------------------------------------------------- bf16 / f16 weights */

INLINE __m256 widen_bf16(const uint16_t *p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

INLINE __m256 widen_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

INLINE float bf16_scalar(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Weight rows per pass over x when x has many rows: 16 rows of a 4096-wide bf16 matrix are 128 KB (L2). */
#define HALF_ROW_BLOCK 16
/* Rows of x per pass of the bf16/f16 loops */
#define TILE_B 4

/* R weight rows by NB rows of x: each 8 weights are widened once and used NB times; KU = 2 independent sums per
 * dot product (even k-chunks, odd k-chunks) in every shape, so that a row of x sums in the same order whatever
 * shares its call: a sequence's results do not depend on its batch. */
#define DEFINE_HALF_KERNEL(NAME, WIDEN, SCALAR)                                                                  \
    INLINE void NAME##_tile(const uint16_t *w, int64_t K, const float *x, int64_t ldx, float *y, int64_t ldy,    \
                            const int R, const int NB) {                                                         \
        const int KU = 2;                                                                                        \
        __m256 acc[2][4][TILE_B];                                                                                \
        for (int u = 0; u < KU; u++)                                                                             \
            for (int r = 0; r < R; r++)                                                                          \
                for (int j = 0; j < NB; j++) acc[u][r][j] = _mm256_setzero_ps();                                 \
        int64_t k = 0;                                                                                           \
        for (; k + 8 * KU <= K; k += 8 * KU)                                                                     \
            for (int u = 0; u < KU; u++) {                                                                       \
                __m256 wv[4];                                                                                    \
                for (int r = 0; r < R; r++) wv[r] = WIDEN(w + r * K + k + 8 * u);                                \
                for (int j = 0; j < NB; j++) {                                                                   \
                    const __m256 xv = _mm256_loadu_ps(x + j * ldx + k + 8 * u);                                  \
                    for (int r = 0; r < R; r++) acc[u][r][j] = _mm256_fmadd_ps(wv[r], xv, acc[u][r][j]);         \
                }                                                                                                \
            }                                                                                                    \
        for (int r = 0; r < R; r++)                                                                              \
            for (int j = 0; j < NB; j++) {                                                                       \
                float s = hsum(KU == 2 ? _mm256_add_ps(acc[0][r][j], acc[1][r][j]) : acc[0][r][j]);              \
                for (int64_t t = k; t < K; t++) s += SCALAR(w[r * K + t]) * x[j * ldx + t];                      \
                y[j * ldy + r] = s;                                                                              \
            }                                                                                                    \
    }                                                                                                            \
    static void NAME##_rows(const uint8_t *wbytes, int64_t r0_, int64_t r1_, const float *x, int64_t K,          \
                            int64_t B, float *y, int64_t ldy) {                                                  \
        const uint16_t *w = (const uint16_t *)wbytes;                                                            \
        for (int64_t r0 = r0_; r0 < r1_; r0 += HALF_ROW_BLOCK)                                                   \
        for (int64_t b = 0, r1 = r0 + HALF_ROW_BLOCK < r1_ ? r0 + HALF_ROW_BLOCK : r1_; b < B; b += TILE_B) {    \
            const int64_t nb = B - b < TILE_B ? B - b : TILE_B;                                                  \
            const float *xb = x + b * K;                                                                         \
            int64_t r = r0;                                                                                      \
            if (nb == TILE_B) /* 2 x 2 tiles: 8 accumulators of the 16 registers */                             \
                for (; r + 2 <= r1; r += 2)                                                                      \
                    for (int h = 0; h < TILE_B; h += 2)                                                          \
                        NAME##_tile(w + r * K, K, xb + h * K, K, y + (b + h) * ldy + r, ldy, 2, 2);              \
            for (int64_t j = 0; j < nb; j++) {                                                                   \
                int64_t rr = r;                                                                                  \
                for (; rr + 4 <= r1; rr += 4) {                                                                  \
                    if (B == 1) prefetch_row((const uint8_t *)(w + (rr + PREFETCH_ROWS) * K), 4 * 2 * K);        \
                    NAME##_tile(w + rr * K, K, xb + j * K, K, y + (b + j) * ldy + rr, ldy, 4, 1);                \
                }                                                                                                \
                for (; rr < r1; rr++) NAME##_tile(w + rr * K, K, xb + j * K, K, y + (b + j) * ldy + rr, ldy, 1, 1); \
            }                                                                                                    \
        }                                                                                                        \
    }

DEFINE_HALF_KERNEL(f16, widen_f16, _cvtsh_ss)

#if defined(__AVX512BF16__)
/* Where the CPU has AVX512-BF16, bf16 weights multiply x rounded to bf16 once per call (what llama.cpp does
 * for bf16 weights) with vdpbf16ps: two products per lane, no widening of the weights. */
#define HAVE_BF16_DOT 1

INLINE uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static void to_bf16_row(const float *x, int64_t K, uint16_t *out) {
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(x + k));
        _mm512_storeu_si512((void *)(out + k), (__m512i)v);
    }
    for (; k < K; k++) out[k] = bf16_round(x[k]);
}

INLINE void bf16dot_tile(const uint16_t *w, int64_t K, const uint16_t *x, float *y, int64_t ldy, const int R,
                         const int NB) {
    __m512 acc[4][TILE_B];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NB; j++) acc[r][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i wv[4];
        for (int r = 0; r < R; r++) wv[r] = _mm512_loadu_si512((const void *)(w + r * K + k));
        for (int j = 0; j < NB; j++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(x + j * K + k));
            for (int r = 0; r < R; r++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)xv, (__m512bh)wv[r]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NB; j++) {
            float s = _mm512_reduce_add_ps(acc[r][j]);
            for (int64_t t = k; t < K; t++) s += bf16_scalar(w[r * K + t]) * bf16_scalar(x[j * K + t]);
            y[j * ldy + r] = s;
        }
}

static void bf16dot_rows(const uint8_t *wbytes, int64_t r0_, int64_t r1_, const uint16_t *x, int64_t K, int64_t B,
                         float *y, int64_t ldy) {
    const uint16_t *w = (const uint16_t *)wbytes;
    for (int64_t r0 = r0_; r0 < r1_; r0 += HALF_ROW_BLOCK) /* these rows stay in L2 while every x passes */
    for (int64_t b = 0, r1 = r0 + HALF_ROW_BLOCK < r1_ ? r0 + HALF_ROW_BLOCK : r1_; b < B; b += TILE_B) {
        const int64_t nb = B - b < TILE_B ? B - b : TILE_B;
        const uint16_t *xb = x + b * K;
        int64_t r = r0;
        if (nb == TILE_B)
            for (; r + 4 <= r1; r += 4) bf16dot_tile(w + r * K, K, xb, y + b * ldy + r, ldy, 4, TILE_B);
        for (int64_t j = 0; j < nb; j++) {
            int64_t rr = r;
            for (; rr + 4 <= r1; rr += 4) {
                if (B == 1) prefetch_row((const uint8_t *)(w + (rr + PREFETCH_ROWS) * K), 4 * 2 * K);
                bf16dot_tile(w + rr * K, K, xb + j * K, y + (b + j) * ldy + rr, ldy, 4, 1);
            }
            for (; rr < r1; rr++) bf16dot_tile(w + rr * K, K, xb + j * K, y + (b + j) * ldy + rr, ldy, 1, 1);
        }
    }
}

#else
#define HAVE_BF16_DOT 0
DEFINE_HALF_KERNEL(bf16, widen_bf16, bf16_scalar)
#endif

/* ------------------------------------------------------------------------------------------ entry point */

typedef void (*quant_rows_fn)(const uint8_t *, int64_t, int64_t, int64_t, const act_t *, int64_t, float *,
                              int64_t);
typedef void (*half_rows_fn)(const uint8_t *, int64_t, int64_t, int64_t, const float *, int64_t, int64_t,
                             float *, int64_t);

static quant_rows_fn quant_kernel(int type) {
    switch (type) {
    case T_Q4_0: return q4_0_rows;
    case T_Q4_1: return q4_1_rows;
    case T_Q5_0: return q5_0_rows;
    case T_Q5_1: return q5_1_rows;
    case T_Q8_0: return q8_0_rows;
    case T_IQ4_NL: return iq4_nl_rows;
    case T_IQ4_XS: return iq4_xs_rows;
#if defined(__AVX512BW__)
    case T_Q4_K: return q4_k512_rows;
    case T_Q6_K: return q6_k512_rows;
    case T_Q5_K: return q5_k512_rows;
#else
    case T_Q4_K: return q4_k_rows;
    case T_Q6_K: return q6_k_rows;
    case T_Q5_K: return q5_k_rows;
#endif
    default: return NULL;
    }
}

static int block_values(int type) {
    switch (type) {
    case T_IQ4_XS: case T_Q4_K: case T_Q5_K: case T_Q6_K: return 256;
    case T_BF16: case T_F16: return 1;
    default: return 32;
    }
}

int ember_supports(int type) { return quant_kernel(type) != NULL || type == T_BF16 || type == T_F16; }

/* What ember_matmul applies to x before multiplying (folded into the pass that quantizes it). */
enum { PREP_NONE = 0, PREP_RMS_NORM = 1, PREP_SILU_GATE = 2 };

typedef struct {
    int nseg;
    const uint8_t *w[MAX_SEGMENTS];
    int64_t row_bytes[MAX_SEGMENTS], rows[MAX_SEGMENTS], first[MAX_SEGMENTS + 1]; /* first: prefix of rows */
    int type[MAX_SEGMENTS];
    const float *x;
    int k_activations; /* Q8_K-style (per 256) rather than Q8_0-style activations */
    int prep;                   /* PREP_*: what is applied to the caller's x_in first (x is then that copy) */
    const float *x_in, *norm_w; /* norm_w: the RMSNorm's weight */
    float eps;
    act_t act;
    uint8_t *xu; /* [B, K] q + 128, for the GEMM tiles (NULL when no segment uses them) */
    uint16_t *xbf16; /* [B, K] x rounded to bf16, for bf16 weights where the CPU has a bf16 dot product */
    int failed;
    int64_t B, K, rows_per_chunk, ldy;
    float *y;
} job_t;

/* Row b of x in the forms this call's kernels read: int8 blocks (and x + 128), bf16. */
static void prepare_job(void *ctx, int64_t b) {
    job_t *j = ctx;
    if (j->prep == PREP_SILU_GATE) /* x_in row = [gate | up], 2K wide */
        silu_gate_row(j->x_in + b * 2 * j->K, j->K, (float *)j->x + b * j->K);
    else if (j->prep == PREP_RMS_NORM)
        rms_norm_row(j->x_in + b * j->K, j->K, j->norm_w, j->eps, (float *)j->x + b * j->K);
#if HAVE_BF16_DOT
    if (j->xbf16) to_bf16_row(j->x + b * j->K, j->K, j->xbf16 + b * j->K);
#endif
    if (!j->act.q) return;
    const int64_t g = j->K / 32;
    (j->k_activations ? quantize_row_k : quantize_row_0)(j->x + b * j->K, j->K, (int8_t *)j->act.q + b * j->K,
                                                         (float *)j->act.d + b * g, (float *)j->act.m + b * g);
    if (j->xu) {
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        for (int64_t k = 0; k < j->K; k += 32) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(j->act.q + b * j->K + k));
            _mm256_storeu_si256((__m256i *)(j->xu + b * j->K + k), _mm256_xor_si256(v, flip));
        }
    }
}

static void matmul_job(void *ctx, int64_t chunk) {
    job_t *j = ctx;
    int64_t r0 = chunk * j->rows_per_chunk, r1 = r0 + j->rows_per_chunk;
    if (r1 > j->first[j->nseg]) r1 = j->first[j->nseg];
    for (int s = 0; s < j->nseg && r0 < r1; s++) {
        const int64_t lo = j->first[s], hi = j->first[s + 1];
        if (r0 >= hi) continue;
        const int64_t e = r1 < hi ? r1 : hi;
        float *y = j->y + lo; /* this segment's columns */
        if (j->type[s] == T_BF16) {
#if HAVE_BF16_DOT
            bf16dot_rows(j->w[s], r0 - lo, e - lo, j->xbf16, j->K, j->B, y, j->ldy);
#else
            bf16_rows(j->w[s], r0 - lo, e - lo, j->x, j->K, j->B, y, j->ldy);
#endif
        } else if (j->type[s] == T_F16)
            f16_rows(j->w[s], r0 - lo, e - lo, j->x, j->K, j->B, y, j->ldy);
        else if (j->xu && gemm_supports(j->type[s]) && j->B >= gemm_min_b(j->type[s])) {
            if (gemm_rows(j->type[s], j->w[s], j->row_bytes[s], r0 - lo, e - lo, &j->act, j->xu, j->B, y, j->ldy))
                j->failed = 1;
        } else
            quant_kernel(j->type[s])(j->w[s], j->row_bytes[s], r0 - lo, e - lo, &j->act, j->B, y, j->ldy);
        r0 = e;
    }
}

static int8_t *scratch;
static size_t scratch_bytes;

/* y[B, ldy] (columns 0 .. sum(rows)) = x[B, K] @ concat(w_s).T for nseg weights of the same K.
 * Returns 0, or -1 for an unsupported type, a K that is not whole blocks, or no memory. */
int ember_matmul(const float *x, int64_t B, int64_t K, int nseg, const void *const *w, const int *types,
                 const int64_t *rows, const int64_t *row_bytes, float *y, int64_t ldy, int prep, const float *norm_w,
                 float eps, int nthreads) {
    ember_lock();
    const int rc = ember_matmul_locked(x, B, K, nseg, w, types, rows, row_bytes, y, ldy, prep, norm_w, eps, nthreads);
    ember_unlock();
    return rc;
}

int ember_matmul_locked(const float *x, int64_t B, int64_t K, int nseg, const void *const *w, const int *types,
                        const int64_t *rows, const int64_t *row_bytes, float *y, int64_t ldy, int prep,
                        const float *norm_w, float eps, int nthreads) {
    if (nseg < 1 || nseg > MAX_SEGMENTS || B < 1 || K < 1) return -1;
    job_t j = {.nseg = nseg, .x = x, .B = B, .K = K, .ldy = ldy, .y = y, .x_in = x, .prep = prep, .norm_w = norm_w,
               .eps = eps};
    int quantized = 0, per32 = 0, tiled = 0;
    j.first[0] = 0;
    for (int s = 0; s < nseg; s++) {
        if (!ember_supports(types[s]) || K % block_values(types[s])) return -1;
        if (quant_kernel(types[s]) != NULL) {
            quantized = 1;
            if (block_values(types[s]) == 256) j.k_activations = 1;
            else per32 = 1;
            tiled |= B >= gemm_min_b(types[s]) && gemm_supports(types[s]);
        }
        j.w[s] = w[s];
        j.type[s] = types[s];
        j.rows[s] = rows[s];
        j.row_bytes[s] = row_bytes[s];
        j.first[s + 1] = j.first[s] + rows[s];
    }
    if (j.k_activations && per32) return -1; /* one activation format per call */
    const int64_t total = j.first[nseg];
    if (total == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    int bf16 = 0;
    for (int s = 0; s < nseg; s++) bf16 |= HAVE_BF16_DOT && types[s] == T_BF16;
    /* scratch: int8 x [B, K], x + 128 [B, K] (tiles), d and m [B, K / 32] (quantized), bf16 x [B, K], normed
     * float32 x [B, K] */
    const size_t nq = quantized ? (size_t)B * K : 0, nu = tiled ? (size_t)B * K : 0,
                 nf = quantized ? (size_t)B * (K / 32) : 0, nh = bf16 ? (size_t)B * K : 0,
                 nn = prep ? (size_t)B * K : 0;
    const size_t need = (nq + nu + 63) / 64 * 64 + 2 * sizeof(float) * nf + (2 * nh + 3) / 4 * 4 + 4 * nn + 64;
    if (need > scratch_bytes) {
        free(scratch);
        scratch = aligned_alloc(64, (need + 63) / 64 * 64);
        scratch_bytes = scratch ? need : 0;
        if (!scratch) return -1;
    }
    float *d = (float *)(scratch + (nq + nu + 63) / 64 * 64);
    if (quantized) j.act = (act_t){.q = scratch, .d = d, .m = d + nf, .K = K};
    if (tiled) j.xu = (uint8_t *)scratch + nq;
    if (bf16) j.xbf16 = (uint16_t *)(d + 2 * nf);
    if (prep) j.x = (float *)(d + 2 * nf + (2 * nh + 3) / 4);
    if (quantized || bf16 || prep) {
        if (B >= 16)
            ember_parallel_for(nthreads, prepare_job, &j, B);
        else
            for (int64_t b = 0; b < B; b++) prepare_job(&j, b);
    }
    /* enough chunks for dynamic balance (8 per thread), each a whole number of row pairs; one tile each on
     * the GEMM path */
    int64_t per = total / ((int64_t)nthreads * 8);
    per = per < 2 ? 2 : per + (per & 1);
    j.rows_per_chunk = tiled ? GEMM_R : per;
    ember_parallel_for(nthreads, matmul_job, &j, (total + j.rows_per_chunk - 1) / j.rows_per_chunk);
    return j.failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------ rows of a quantized table */

/* out[i, 0..K) = row ids[i] of a quantized weight [*, row_bytes], dequantized as ember.quant.ggml.dequantize
 * does (scale * q + offset in float32, rounded the same way: no FMA contraction): a quantized embedding's
 * lookup. Returns 0, or -1 for a type without a 32-value unit here (the caller keeps its torch path). */
__attribute__((optimize("fp-contract=off"))) int ember_get_rows(const uint8_t *w, int type, int64_t row_bytes,
                                                               int64_t K, const int64_t *ids, int64_t n,
                                                               float *out) {
    if (!gemm_supports(type) && type != T_Q8_0 && type != T_IQ4_NL && type != T_IQ4_XS) return -1;
    if (K % block_values(type)) return -1;
    /* the types whose unit holds signed values; Q4_0/Q5_0 hold q + 8 / q + 16 with the offset in o */
    const int is_signed = type == T_Q8_0 || type == T_Q6_K || type == T_IQ4_NL || type == T_IQ4_XS;
    const int bias = type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : 0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = w + ids[i] * row_bytes;
        float *y = out + i * K;
        for (int64_t g = 0; g < K / 32; g++) {
            unit_t u = {.s = 0.0f};
            unit_of(type, row, g, &u);
            int8_t q[32];
            _mm256_storeu_si256((__m256i *)q, u.q);
            /* Q6_K's unit holds values only: d times the int8 scale of each 16 values (block: ql, qh, scales, d) */
            const uint8_t *q6 = row + 210 * (g / 8);
            const float d6 = type == T_Q6_K ? _cvtsh_ss(*(const uint16_t *)(q6 + 208)) : 0.0f;
            for (int t = 0; t < 32; t++) {
                const int v = is_signed ? q[t] : (int)(uint8_t)q[t] - bias;
                const float s = type == T_Q6_K ? d6 * (float)(int8_t)q6[192 + 2 * (g % 8) + (t >= 16)] : u.s;
                const float prod = s * (float)v;
                y[32 * g + t] = bias || is_signed ? prod : prod + u.o;
            }
        }
    }
    return 0;
}
