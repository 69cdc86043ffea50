// x86 kernels for ggml-block weights x int8-quantised activations.
//
// This file is included several times by ember_kernels.cpp, once per ISA, inside
// `namespace <isa> { ... }` and a `#pragma GCC target(...)` region, with EMBER_VNNI set to 0/1 and
// EMBER_MR to the activation-row tile. The code uses 256-bit vectors throughout: decode (M=1) is
// bound by memory bandwidth, not vector width; the AVX-512 builds gain EVEX encodings, 32 vector
// registers (so a taller activation tile for prefill) and, with VNNI, vpdpbusd in place of the
// vpmaddubsw + vpmaddwd pair.
//
// Activations are quantised per row, like ggml's Q8_0 / Q8_K:
//  - 32-blocks (for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0): int8 q[K], float d[K/32], float ds[K/32] = d * sum(q)
//  - 256-blocks (for the K-quants):           int8 q[K], float d[K/256], int16 bs[K/16] = sums of 16
// Weights are dotted as unsigned codes (u8) against the signed activations (s8), the code offset
// (-8, -16, -32) or min folded in through the activation block sums.

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int32_t hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

static inline float f16at(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

// u8 x s8 -> 8 int32 lanes, each the sum of 4 adjacent products, added to acc.
static inline __m256i dot_add(__m256i acc, __m256i u, __m256i s) {
#if EMBER_VNNI
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// u8 x s8 with an int16 weight per pair of products (K-quant sub-block scales) -> 8 int32 lanes.
static inline __m256i dot_scaled(__m256i u, __m256i s, __m256i scale16) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), scale16);
}

// 16 bytes of nibbles -> 32 bytes: low nibbles (elements 0..15) then high nibbles (16..31).
static inline __m256i nibbles32(const uint8_t* p) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256i b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}

// 4 bytes of bits (little-endian uint32) -> 32 bytes, 0x10 where bit i is set.
static inline __m256i bits32_x10(const uint8_t* p) {
    uint32_t x;
    std::memcpy(&x, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x)), shuf);
    const __m256i m = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(b, m), m), _mm256_set1_epi8(0x10));
}

static inline __m256i loadu(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Software prefetch of the weight stream, EMBER_PF bytes ahead (one stream per thread: a row's
// blocks, then the next row's, contiguous): hardware prefetchers alone leave single-row GEMV
// short of bandwidth.
#ifndef EMBER_PF
#define EMBER_PF 2048
#endif
template <int BYTES>
static inline void prefetch_block(const uint8_t* w) {
    for (int o = 0; o < BYTES; o += 64) _mm_prefetch(reinterpret_cast<const char*>(w + EMBER_PF + o), _MM_HINT_T0);
}

// ---------------------------------------------------------------------------------------------
// Activation quantisation of one row (float or bf16) into the layouts above.
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// 32 values -> 32 int8 stored at q (scale id), returns the 4 int32 vectors' sums in two halves.
template <class T>
static inline void quant32(const T* x, float id, int8_t* q, int32_t* sum_lo16, int32_t* sum_hi16) {
    const __m256 mul = _mm256_set1_ps(id);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x), mul));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + 8), mul));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + 16), mul));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + 24), mul));
    *sum_lo16 = hsum8i(_mm256_add_epi32(i0, i1));
    *sum_hi16 = hsum8i(_mm256_add_epi32(i2, i3));
    i0 = _mm256_packs_epi32(i0, i1);
    i2 = _mm256_packs_epi32(i2, i3);
    i0 = _mm256_packs_epi16(i0, i2);
    i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), i0);
}

// max |x| of a block; NaN when the block holds a NaN (vmaxps alone would drop it), so the block's
// scale is NaN and the outputs it feeds are NaN, as with the float reference.
template <class T>
static inline float absmax(const T* x, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 v = load8(x + i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    if (!_mm256_testz_ps(nan, nan)) return std::numeric_limits<float>::quiet_NaN();
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <class T>
static void quantize_row(const T* x, int64_t K, bool kquant, int8_t* q, float* d, float* ds, int16_t* bs) {
    if (kquant) {
        for (int64_t b = 0; b < K / 256; ++b) {
            const float amax = absmax(x + 256 * b, 256);
            const float dd = amax / 127.0f;
            const float id = amax > 0 ? 127.0f / amax : 0.0f;
            d[b] = dd;
            for (int j = 0; j < 8; ++j) {
                int32_t s0, s1;
                quant32(x + 256 * b + 32 * j, id, q + 256 * b + 32 * j, &s0, &s1);
                bs[16 * b + 2 * j] = static_cast<int16_t>(s0);
                bs[16 * b + 2 * j + 1] = static_cast<int16_t>(s1);
            }
        }
    } else {
        for (int64_t b = 0; b < K / 32; ++b) {
            const float amax = absmax(x + 32 * b, 32);
            const float dd = amax / 127.0f;
            const float id = amax > 0 ? 127.0f / amax : 0.0f;
            int32_t s0, s1;
            quant32(x + 32 * b, id, q + 32 * b, &s0, &s1);
            d[2 * b] = dd;  // (scale, scale * sum) pairs: one 8-byte load for the dot kernels
            d[2 * b + 1] = dd * static_cast<float>(s0 + s1);
        }
    }
}

static void quantize_rows(const Ctx& c, int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
        int8_t* q = c.aq + m * c.K;
        float* d = c.ad + m * c.nd * (c.kquant ? 1 : 2);
        float* ds = nullptr;
        int16_t* bs = c.abs ? c.abs + m * (c.K / 16) : nullptr;
        if (c.x_bf16)
            quantize_row(static_cast<const uint16_t*>(c.x) + m * c.ldx, c.K, c.kquant, q, d, ds, bs);
        else
            quantize_row(static_cast<const float*>(c.x) + m * c.ldx, c.K, c.kquant, q, d, ds, bs);
    }
}

// ---------------------------------------------------------------------------------------------
// Per-type dot kernels: one weight row (w) against MR activation rows starting at m0 -> res[MR].

#define EMBER_ACT_ROWS                                         \
    const int8_t* yq[MR];                                      \
    const float* yd[MR];                                       \
    for (int i = 0; i < MR; ++i) {                             \
        yq[i] = c.aq + (m0 + i) * c.K;                         \
        yd[i] = c.ad + (m0 + i) * c.nd * (c.kquant ? 1 : 2);   \
    }

// Q8_0: d f16, qs[32] int8. Signed x signed via the sign trick: |w| (u8) x sign(y, w) (s8).
struct KQ8_0 {
    template <int MR>
    static void dot(const Ctx& c, const uint8_t* w, int64_t m0, float* res) {
        EMBER_ACT_ROWS
        __m256 acc[MR];
        for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
        const int64_t nb = c.K / 32;
        for (int64_t b = 0; b < nb; ++b, w += 34) {
            if (MR == 1) prefetch_block<34>(w);
            const float dw = f16at(w);
            const __m256i q = loadu(w + 2);
            const __m256i aq = _mm256_sign_epi8(q, q);
            for (int i = 0; i < MR; ++i) {
                const __m256i y = _mm256_sign_epi8(loadu(yq[i] + 32 * b), q);
                const __m256i p = dot_add(_mm256_setzero_si256(), aq, y);
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * yd[i][2 * b]), _mm256_cvtepi32_ps(p), acc[i]);
            }
        }
        for (int i = 0; i < MR; ++i) res[i] = hsum8(acc[i]);
    }
};

// The 4/5-bit 32-blocks: codes u in [0, 2^bits), value = d*u - d*off (Q4_0/Q5_0) or d*u + m (Q4_1/Q5_1).
template <int BYTES, int QS_AT, int QH_AT, bool HAS_MIN, int OFF>
struct K32 {
    template <int MR>
    static void dot(const Ctx& c, const uint8_t* w, int64_t m0, float* res) {
        EMBER_ACT_ROWS
        __m256 acc[MR];
        __m128 corr[MR];  // lane 1: sum over blocks of (m or d) * (activation scale * code sum)
        for (int i = 0; i < MR; ++i) {
            acc[i] = _mm256_setzero_ps();
            corr[i] = _mm_setzero_ps();
        }
        const int64_t nb = c.K / 32;
        for (int64_t b = 0; b < nb; ++b, w += BYTES) {
            if (MR == 1) prefetch_block<BYTES>(w);
            uint32_t dm;
            std::memcpy(&dm, w, 4);
            __m128 sc = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(dm)));  // [d, m]
            if (!HAS_MIN) sc = _mm_moveldup_ps(sc);                                 // [d, d]
            __m256i u = nibbles32(w + QS_AT);
            if (QH_AT >= 0) u = _mm256_or_si256(u, bits32_x10(w + (QH_AT >= 0 ? QH_AT : 0)));
            for (int i = 0; i < MR; ++i) {
                const __m128 p = _mm_mul_ps(sc, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(yd[i] + 2 * b))));
                const __m256i dp = dot_add(_mm256_setzero_si256(), u, loadu(yq[i] + 32 * b));
                acc[i] = _mm256_fmadd_ps(_mm256_broadcastss_ps(p), _mm256_cvtepi32_ps(dp), acc[i]);
                corr[i] = _mm_add_ps(corr[i], p);
            }
        }
        for (int i = 0; i < MR; ++i) {
            const float cl = _mm_cvtss_f32(_mm_movehdup_ps(corr[i]));
            res[i] = hsum8(acc[i]) + (HAS_MIN ? cl : -static_cast<float>(OFF) * cl);
        }
    }
};
using KQ4_0 = K32<18, 2, -1, false, 8>;
using KQ4_1 = K32<20, 4, -1, true, 0>;
using KQ5_0 = K32<22, 6, 2, false, 16>;
using KQ5_1 = K32<24, 8, 4, true, 0>;

// shuffle controls: all 16-bit lanes = int16 element i of a 128-bit lane
alignas(32) static const uint8_t kSplat16[8][32] = {
#define S(i) 2 * i, 2 * i + 1
#define R8(i) S(i), S(i), S(i), S(i), S(i), S(i), S(i), S(i)
    {R8(0), R8(0)}, {R8(1), R8(1)}, {R8(2), R8(2)}, {R8(3), R8(3)},
    {R8(4), R8(4)}, {R8(5), R8(5)}, {R8(6), R8(6)}, {R8(7), R8(7)},
};
// low 128-bit lane = int16 element 2k, high lane = element 2k+1
alignas(32) static const uint8_t kSplat16Pair[4][32] = {
    {R8(0), R8(1)}, {R8(2), R8(3)}, {R8(4), R8(5)}, {R8(6), R8(7)},
#undef R8
#undef S
};

static inline void k4_scales(const uint8_t* s12, uint32_t utmp[4]) {
    std::memcpy(utmp, s12, 12);
    const uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
    utmp[3] = ((utmp[2] >> 4) & kmask2) | (((utmp[1] >> 6) & kmask3) << 4);
    const uint32_t uaux = utmp[1] & kmask1;
    utmp[1] = (utmp[2] & kmask2) | (((utmp[0] >> 6) & kmask3) << 4);
    utmp[2] = uaux;
    utmp[0] &= kmask1;
}

// Q4_K (144 bytes: d, dmin, scales[12], qs[128]) and Q5_K (176: d, dmin, scales[12], qh[32], qs[128]).
template <bool FIVE>
struct KQ45_K {
    template <int MR>
    static void dot(const Ctx& c, const uint8_t* w, int64_t m0, float* res) {
        EMBER_ACT_ROWS
        const int16_t* ybs[MR];
        for (int i = 0; i < MR; ++i) ybs[i] = c.abs + (m0 + i) * (c.K / 16);
        __m256 acc[MR];
        for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        const __m256i m10 = _mm256_set1_epi8(0x10);
        const int64_t nb = c.K / 256;
        constexpr int BYTES = FIVE ? 176 : 144;
        constexpr int QS = FIVE ? 48 : 16;
        for (int64_t b = 0; b < nb; ++b, w += BYTES) {
            if (MR == 1) prefetch_block<BYTES>(w);
            const float d = f16at(w), dmin = f16at(w + 2);
            uint32_t ut[4];
            k4_scales(w + 4, ut);
            const __m128i mins16 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, static_cast<int>(ut[3]), static_cast<int>(ut[2])));
            __m256i mdup = _mm256_cvtepu16_epi32(mins16);
            mdup = _mm256_or_si256(mdup, _mm256_slli_epi32(mdup, 16));
            const __m256i S = _mm256_broadcastsi128_si256(
                _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, static_cast<int>(ut[1]), static_cast<int>(ut[0]))));
            __m256i sumi[MR];
            for (int i = 0; i < MR; ++i) {
                const __m256i ms = _mm256_madd_epi16(mdup, loadu(ybs[i] + 16 * b));
                acc[i] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * yd[i][b]), _mm256_cvtepi32_ps(ms), acc[i]);
                sumi[i] = _mm256_setzero_si256();
            }
            __m256i H = FIVE ? loadu(w + 16) : _mm256_setzero_si256();
            for (int j = 0; j < 4; ++j) {
                const __m256i q4 = loadu(w + QS + 32 * j);
                __m256i lo = _mm256_and_si256(q4, m4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
                if (FIVE) {
                    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(H, 4), m10));
                    H = _mm256_srli_epi16(H, 1);
                    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(H, 4), m10));
                    H = _mm256_srli_epi16(H, 1);
                }
                const __m256i slo = _mm256_shuffle_epi8(S, loadu(kSplat16[2 * j]));
                const __m256i shi = _mm256_shuffle_epi8(S, loadu(kSplat16[2 * j + 1]));
                for (int i = 0; i < MR; ++i) {
                    const int8_t* y = yq[i] + 256 * b + 64 * j;
                    const __m256i p0 = dot_scaled(lo, loadu(y), slo);
                    const __m256i p1 = dot_scaled(hi, loadu(y + 32), shi);
                    sumi[i] = _mm256_add_epi32(sumi[i], _mm256_add_epi32(p0, p1));
                }
            }
            for (int i = 0; i < MR; ++i)
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * yd[i][b]), _mm256_cvtepi32_ps(sumi[i]), acc[i]);
        }
        for (int i = 0; i < MR; ++i) res[i] = hsum8(acc[i]);
    }
};
using KQ4_K = KQ45_K<false>;
using KQ5_K = KQ45_K<true>;

// Q6_K (210 bytes: ql[128], qh[64], scales[16] int8, d f16). Codes u in [0, 64), value = u - 32.
struct KQ6_K {
    template <int MR>
    static void dot(const Ctx& c, const uint8_t* w, int64_t m0, float* res) {
        EMBER_ACT_ROWS
        const int16_t* ybs[MR];
        for (int i = 0; i < MR; ++i) ybs[i] = c.abs + (m0 + i) * (c.K / 16);
        __m256 acc[MR];
        for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        const __m256i m30 = _mm256_set1_epi8(0x30);
        const int64_t nb = c.K / 256;
        for (int64_t b = 0; b < nb; ++b, w += 210) {
            if (MR == 1) prefetch_block<210>(w);
            const float d = f16at(w + 208);
            const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 192));
            const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
            __m256i sumi[MR];
            for (int i = 0; i < MR; ++i) {
                const __m256i o = _mm256_madd_epi16(sc16, loadu(ybs[i] + 16 * b));
                sumi[i] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(o, 5));
            }
            for (int h = 0; h < 2; ++h) {
                const uint8_t* ql = w + 64 * h;
                const uint8_t* qh = w + 128 + 32 * h;
                const __m256i S = _mm256_broadcastsi128_si256(h ? _mm256_extracti128_si256(sc16, 1) : _mm256_castsi256_si128(sc16));
                const __m256i A = loadu(ql), B = loadu(ql + 32), Hb = loadu(qh);
                __m256i q[4];
                q[0] = _mm256_or_si256(_mm256_and_si256(A, m4), _mm256_and_si256(_mm256_slli_epi16(Hb, 4), m30));
                q[1] = _mm256_or_si256(_mm256_and_si256(B, m4), _mm256_and_si256(_mm256_slli_epi16(Hb, 2), m30));
                q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), m4), _mm256_and_si256(Hb, m30));
                q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), m4),
                                       _mm256_and_si256(_mm256_srli_epi16(Hb, 2), m30));
                for (int k = 0; k < 4; ++k) {
                    const __m256i sk = _mm256_shuffle_epi8(S, loadu(kSplat16Pair[k]));
                    for (int i = 0; i < MR; ++i) {
                        const __m256i y = loadu(yq[i] + 256 * b + 128 * h + 32 * k);
                        sumi[i] = _mm256_add_epi32(sumi[i], dot_scaled(q[k], y, sk));
                    }
                }
            }
            for (int i = 0; i < MR; ++i)
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * yd[i][b]), _mm256_cvtepi32_ps(sumi[i]), acc[i]);
        }
        for (int i = 0; i < MR; ++i) res[i] = hsum8(acc[i]);
    }
};
#undef EMBER_ACT_ROWS


#if EMBER_VNNI
// ---------------------------------------------------------------------------------------------
// Prefill GEMM for the K-quants with AVX-512 VNNI (M >= 16). The int8 activations of 16 rows are
// transposed so one 512-bit vector holds 4 consecutive K values of each of the 16 rows; a weight
// tile (TN rows) is unpacked once to one unsigned code byte per value plus integer sub-block
// scales; then each vpdpbusd multiplies 4 codes of one weight row (broadcast) by those 16x4
// activations: 64 MACs an instruction, the 16 lanes being 16 output rows. Sub-block scales are
// applied in int32 once per sub-block, float scales once per 256-block.
struct ActV {
    int64_t K, MG;
    const int8_t* q;     // [MG][K/4][16][4]
    const int32_t* bs;   // [MG][K/16][16]   sums of 16 codes
    const float* d;      // [MG][K/256][16]  per-256 scales (0 for padding rows)
};

static void build_actv(const Ctx& c, int64_t g0, int64_t g1, int8_t* q, int32_t* bs, float* d) {
    const int64_t K = c.K, nk4 = K / 4, n16 = K / 16, n256 = K / 256;
    for (int64_t g = g0; g < g1; ++g) {
        int32_t* qd = reinterpret_cast<int32_t*>(q + g * K * 16);
        for (int r = 0; r < 16; ++r) {
            const int64_t m = 16 * g + r;
            if (m < c.M) {
                const int32_t* src = reinterpret_cast<const int32_t*>(c.aq + m * K);
                for (int64_t k = 0; k < nk4; ++k) qd[k * 16 + r] = src[k];
                for (int64_t k = 0; k < n16; ++k) bs[(g * n16 + k) * 16 + r] = c.abs[m * n16 + k];
                for (int64_t b = 0; b < n256; ++b) d[(g * n256 + b) * 16 + r] = c.ad[m * c.nd + b];
            } else {
                for (int64_t k = 0; k < nk4; ++k) qd[k * 16 + r] = 0;
                for (int64_t k = 0; k < n16; ++k) bs[(g * n16 + k) * 16 + r] = 0;
                for (int64_t b = 0; b < n256; ++b) d[(g * n256 + b) * 16 + r] = 0.0f;
            }
        }
    }
}

#endif  // EMBER_VNNI

// One weight tile, unpacked: codes [TN][K], scales [TN][K/SUB], mins [TN][K/32], d/dmin [TN][K/256].
struct WTile {
    uint8_t* u;
    int32_t* sc;
    int32_t* mn;
    float* d;
    float* dmin;
};

// Unpack one row of Q4_K / Q5_K / Q6_K blocks.
static void unpack_row(int64_t type, const uint8_t* w, int64_t K, uint8_t* u, int32_t* sc, int32_t* mn, float* d,
                       float* dmin) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int64_t nb = K / 256;
    if (type == 14) {
        const __m256i m30 = _mm256_set1_epi8(0x30);
        for (int64_t b = 0; b < nb; ++b, w += 210, u += 256) {
            d[b] = f16at(w + 208);
            for (int i = 0; i < 16; ++i) sc[16 * b + i] = static_cast<int8_t>(w[192 + i]);
            for (int h = 0; h < 2; ++h) {
                const __m256i A = loadu(w + 64 * h), B = loadu(w + 64 * h + 32), Hb = loadu(w + 128 + 32 * h);
                uint8_t* o = u + 128 * h;
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(o),
                    _mm256_or_si256(_mm256_and_si256(A, m4), _mm256_and_si256(_mm256_slli_epi16(Hb, 4), m30)));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32),
                    _mm256_or_si256(_mm256_and_si256(B, m4), _mm256_and_si256(_mm256_slli_epi16(Hb, 2), m30)));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 64),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), m4), _mm256_and_si256(Hb, m30)));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 96),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), m4),
                                    _mm256_and_si256(_mm256_srli_epi16(Hb, 2), m30)));
            }
        }
        return;
    }
    const bool five = type == 13;
    const __m256i m10 = _mm256_set1_epi8(0x10);
    for (int64_t b = 0; b < nb; ++b, w += five ? 176 : 144, u += 256) {
        d[b] = f16at(w);
        dmin[b] = f16at(w + 2);
        uint32_t ut[4];
        k4_scales(w + 4, ut);
        const uint8_t* scb = reinterpret_cast<const uint8_t*>(ut);
        for (int i = 0; i < 8; ++i) {
            sc[8 * b + i] = scb[i];
            mn[8 * b + i] = scb[8 + i];
        }
        const uint8_t* qs = w + (five ? 48 : 16);
        __m256i H = five ? loadu(w + 16) : _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
            const __m256i q4 = loadu(qs + 32 * j);
            __m256i lo = _mm256_and_si256(q4, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            if (five) {
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(H, 4), m10));
                H = _mm256_srli_epi16(H, 1);
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(H, 4), m10));
                H = _mm256_srli_epi16(H, 1);
            }
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + 64 * j), lo);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + 64 * j + 32), hi);
        }
    }
}


// ---------------------------------------------------------------------------------------------
// Prefill GEMM for the K-quants without VNNI (M >= 16): weight tiles unpacked once (code bytes,
// plus each 32-value group's int16 scales as a ready vector), so the inner loop is just
// vpmaddubsw + vpmaddwd + vpaddd per 32 values and activation row, no nibble or scale decoding.
struct WTileA {
    std::vector<uint8_t> u;     // [TN][K] codes
    std::vector<int16_t> sv;    // [TN][K/32][16] scales per int16 lane of the vpmaddubsw result
    std::vector<int16_t> aux;   // [TN][K/256][16] Q4_K/Q5_K: mins, each twice; Q6_K: the 16 scales
    std::vector<float> d, dmin; // [TN][K/256]
    std::vector<int32_t> sc, mn;
};

static void unpack_tile_a(const Ctx& c, int64_t type, int64_t n, int64_t r, WTileA& T) {
    const int64_t K = c.K, nb = K / 256, SUB = type == 14 ? 16 : 32;
    unpack_row(type, c.w + n * c.row_bytes, K, T.u.data() + r * K, T.sc.data(), T.mn.data(), T.d.data() + r * nb,
               T.dmin.data() + r * nb);
    int16_t* sv = T.sv.data() + r * (K / 32) * 16;
    int16_t* aux = T.aux.data() + r * nb * 16;
    for (int64_t g = 0; g < K / 32; ++g)
        for (int l = 0; l < 16; ++l)  // lane l of vpmaddubsw covers values 2l, 2l+1 of the group
            sv[16 * g + l] = static_cast<int16_t>(SUB == 32 ? T.sc[g] : T.sc[2 * g + l / 8]);
    for (int64_t b = 0; b < nb; ++b)
        for (int l = 0; l < 16; ++l)
            aux[16 * b + l] = static_cast<int16_t>(type == 14 ? T.sc[16 * b + l] : T.mn[8 * b + l / 2]);
}

template <int MR, bool Q6>
static void gemm_a_dot(const WTileA& T, int64_t r, const Ctx& c, int64_t m0, float* res) {
    const int64_t K = c.K, nb = K / 256;
    const uint8_t* u = T.u.data() + r * K;
    const int16_t* sv = T.sv.data() + r * (K / 32) * 16;
    const int16_t* aux = T.aux.data() + r * nb * 16;
    const float* d = T.d.data() + r * nb;
    const float* dmin = T.dmin.data() + r * nb;
    const int8_t* yq[MR];
    const float* yd[MR];
    const int16_t* ybs[MR];
    for (int i = 0; i < MR; ++i) {
        yq[i] = c.aq + (m0 + i) * K;
        yd[i] = c.ad + (m0 + i) * c.nd;
        ybs[i] = c.abs + (m0 + i) * (K / 16);
    }
    __m256 acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        __m256i sumi[MR];
        const __m256i ax = loadu(aux + 16 * b);
        for (int i = 0; i < MR; ++i) {
            const __m256i o = _mm256_madd_epi16(ax, loadu(ybs[i] + 16 * b));
            if (Q6) {  // codes are value + 32: take 32 * sum(scale * x) off
                sumi[i] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(o, 5));
            } else {   // mins: dmin * sum(min * x)
                acc[i] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin[b] * yd[i][b]), _mm256_cvtepi32_ps(o), acc[i]);
                sumi[i] = _mm256_setzero_si256();
            }
        }
        for (int g = 0; g < 8; ++g) {
            const __m256i code = loadu(u + 256 * b + 32 * g);
            const __m256i scl = loadu(sv + 16 * (8 * b + g));
            for (int i = 0; i < MR; ++i)
                sumi[i] = _mm256_add_epi32(sumi[i], _mm256_madd_epi16(_mm256_maddubs_epi16(code, loadu(yq[i] + 256 * b + 32 * g)), scl));
        }
        for (int i = 0; i < MR; ++i)
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d[b] * yd[i][b]), _mm256_cvtepi32_ps(sumi[i]), acc[i]);
    }
    for (int i = 0; i < MR; ++i) res[i] = hsum8(acc[i]);
}

static void gemm_kquant_rows_a(const Ctx& c, int64_t type, int64_t n0, int64_t n1) {
    constexpr int64_t TN = 16;
    const int64_t K = c.K, nb = K / 256;
    WTileA T;
    T.u.resize(TN * K);
    T.sv.resize(TN * (K / 32) * 16);
    T.aux.resize(TN * nb * 16);
    T.d.resize(TN * nb);
    T.dmin.resize(TN * nb);
    T.sc.resize(K / 16);
    T.mn.resize(K / 32);
    const bool q6 = type == 14;
    float res[4];
    for (int64_t nt = n0; nt < n1; nt += TN) {
        const int64_t rows = std::min(TN, n1 - nt);
        for (int64_t r = 0; r < rows; ++r) unpack_tile_a(c, type, nt + r, r, T);
        int64_t m = 0;
        for (; m + 4 <= c.M; m += 4)
            for (int64_t r = 0; r < rows; ++r) {
                if (q6) gemm_a_dot<4, true>(T, r, c, m, res);
                else gemm_a_dot<4, false>(T, r, c, m, res);
                for (int i = 0; i < 4; ++i) c.out[(m + i) * c.N + nt + r] = res[i];
            }
        for (; m < c.M; ++m)
            for (int64_t r = 0; r < rows; ++r) {
                if (q6) gemm_a_dot<1, true>(T, r, c, m, res);
                else gemm_a_dot<1, false>(T, r, c, m, res);
                c.out[m * c.N + nt + r] = res[0];
            }
    }
}

#if EMBER_VNNI
// 8 weight rows (t0..t0+7 of the tile) x 16 activation rows (group g), all of K -> out.
// SUB: values per integer scale (32 for Q4_K/Q5_K, 16 for Q6_K); MIN: Q4_K/Q5_K mins; BIAS: Q6_K's 32.
template <int SUB, bool MIN, int BIAS>
static void micro_8x16(const WTile& W, int64_t t0, int64_t K, const ActV& A, int64_t g, float* acc_out) {
    constexpr int NT = 8;
    const int64_t nb = K / 256, nsub = K / SUB;
    const int8_t* aq = A.q + g * K * 16;
    const int32_t* abs = A.bs + g * (K / 16) * 16;
    const float* ad = A.d + g * nb * 16;
    __m512 facc[NT];
    for (int t = 0; t < NT; ++t) facc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        __m512i s1[NT];
        for (int t = 0; t < NT; ++t) s1[t] = _mm512_setzero_si512();
        for (int s = 0; s < 256 / SUB; ++s) {
            const int64_t sb = b * (256 / SUB) + s;  // sub-block index in the row
            __m512i a16[NT];
            for (int t = 0; t < NT; ++t) a16[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int gg = 0; gg < SUB / 4; ++gg) {
                const int64_t kg = sb * (SUB / 4) + gg;
                const __m512i codes = _mm512_loadu_si512(aq + kg * 64);
                for (int t = 0; t < NT; ++t) {
                    int32_t w4;
                    std::memcpy(&w4, W.u + (t0 + t) * K + 4 * kg, 4);
                    a16[t] = _mm512_dpbusd_epi32(a16[t], _mm512_set1_epi32(w4), codes);
                }
            }
            __m512i bias = _mm512_setzero_si512();
            if (BIAS) {  // sum over the sub-block's 16 values of BIAS * x
                bias = _mm512_slli_epi32(_mm512_loadu_si512(abs + sb * 16), BIAS == 32 ? 5 : 0);
            }
            for (int t = 0; t < NT; ++t) {
                __m512i v = BIAS ? _mm512_sub_epi32(a16[t], bias) : a16[t];
                s1[t] = _mm512_add_epi32(s1[t], _mm512_mullo_epi32(v, _mm512_set1_epi32(W.sc[(t0 + t) * nsub + sb])));
            }
        }
        const __m512 d1 = _mm512_loadu_ps(ad + b * 16);
        if (MIN) {
            __m512i s2[NT];
            for (int t = 0; t < NT; ++t) s2[t] = _mm512_setzero_si512();
            for (int s = 0; s < 8; ++s) {
                const __m512i bs32 = _mm512_add_epi32(_mm512_loadu_si512(abs + (16 * b + 2 * s) * 16),
                                                      _mm512_loadu_si512(abs + (16 * b + 2 * s + 1) * 16));
                for (int t = 0; t < NT; ++t)
                    s2[t] = _mm512_add_epi32(s2[t], _mm512_mullo_epi32(bs32, _mm512_set1_epi32(W.mn[(t0 + t) * (K / 32) + 8 * b + s])));
            }
            for (int t = 0; t < NT; ++t) {
                __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s1[t]), _mm512_set1_ps(W.d[(t0 + t) * nb + b]));
                f = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(s2[t]), _mm512_set1_ps(W.dmin[(t0 + t) * nb + b]), f);
                facc[t] = _mm512_fmadd_ps(f, d1, facc[t]);
            }
        } else {
            for (int t = 0; t < NT; ++t)
                facc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s1[t]), _mm512_set1_ps(W.d[(t0 + t) * nb + b])),
                                          d1, facc[t]);
        }
    }
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(acc_out + 16 * t, facc[t]);
}

// Rows [n0, n1) of the output, all M: weight tiles of TN rows, each unpacked once.
static void gemm_kquant_rows(const Ctx& c, const ActV& A, int64_t type, int64_t n0, int64_t n1) {
    constexpr int64_t TN = 32;
    const int64_t K = c.K, SUB = type == 14 ? 16 : 32;
    std::vector<uint8_t> u(TN * K);
    std::vector<int32_t> sc(TN * (K / 16)), mn(TN * (K / 32));
    std::vector<float> d(TN * (K / 256)), dmin(TN * (K / 256));
    WTile W{u.data(), sc.data(), mn.data(), d.data(), dmin.data()};
    alignas(64) float res[8 * 16];
    for (int64_t nt = n0; nt < n1; nt += TN) {
        const int64_t rows = std::min(TN, n1 - nt);
        const int64_t rows8 = (rows + 7) / 8 * 8;
        for (int64_t r = 0; r < rows8; ++r) {
            if (r < rows) {
                unpack_row(type, c.w + (nt + r) * c.row_bytes, K, W.u + r * K, W.sc + r * (K / SUB),
                           W.mn + r * (K / 32), W.d + r * (K / 256), W.dmin + r * (K / 256));
            } else {  // padding rows of the last 8: zero codes and scales
                std::memset(W.u + r * K, 0, K);
                std::fill(W.sc + r * (K / SUB), W.sc + (r + 1) * (K / SUB), 0);
                std::fill(W.mn + r * (K / 32), W.mn + (r + 1) * (K / 32), 0);
                std::fill(W.d + r * (K / 256), W.d + (r + 1) * (K / 256), 0.0f);
                std::fill(W.dmin + r * (K / 256), W.dmin + (r + 1) * (K / 256), 0.0f);
            }
        }
        for (int64_t g = 0; g < A.MG; ++g) {
            const int64_t mrows = std::min<int64_t>(16, c.M - 16 * g);
            for (int64_t t0 = 0; t0 < rows8; t0 += 8) {
                if (type == 14) micro_8x16<16, false, 32>(W, t0, K, A, g, res);
                else micro_8x16<32, true, 0>(W, t0, K, A, g, res);
                const int64_t tn = std::min<int64_t>(8, rows - t0);
                for (int64_t t = 0; t < tn; ++t)
                    for (int64_t i = 0; i < mrows; ++i) c.out[(16 * g + i) * c.N + nt + t0 + t] = res[16 * t + i];
            }
        }
    }
}

// The 32-blocks (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0): float scales per 32 on both sides, so each
// sub-block's int32 sums go to float at once: y += dw * (dx * sum(u*q) - BIAS * dx*sum(q)) [+ m * dx*sum(q)].
struct ActV32 {
    int64_t K, MG;
    const int8_t* q;    // [MG][K/4][16][4]
    const float* d;     // [MG][K/32][16]  scales
    const float* ds;    // [MG][K/32][16]  scale * sum of codes
};

static void build_actv32(const Ctx& c, int64_t g0, int64_t g1, int8_t* q, float* d, float* ds) {
    const int64_t K = c.K, nk4 = K / 4, n32 = K / 32;
    for (int64_t g = g0; g < g1; ++g) {
        int32_t* qd = reinterpret_cast<int32_t*>(q + g * K * 16);
        for (int r = 0; r < 16; ++r) {
            const int64_t m = 16 * g + r;
            const bool real = m < c.M;
            const int32_t* src = real ? reinterpret_cast<const int32_t*>(c.aq + m * K) : nullptr;
            for (int64_t k = 0; k < nk4; ++k) qd[k * 16 + r] = real ? src[k] : 0;
            for (int64_t k = 0; k < n32; ++k) {
                d[(g * n32 + k) * 16 + r] = real ? c.ad[(m * c.nd + k) * 2] : 0.0f;
                ds[(g * n32 + k) * 16 + r] = real ? c.ad[(m * c.nd + k) * 2 + 1] : 0.0f;
            }
        }
    }
}

// codes (unsigned, value = d * (u - bias) [+ m]) of one row of 32-blocks
static void unpack_row32(int64_t type, const uint8_t* w, int64_t K, uint8_t* u, float* dw, float* mw) {
    const int64_t nb = K / 32;
    for (int64_t b = 0; b < nb; ++b, u += 32) {
        __m256i v;
        switch (type) {
            case 2: dw[b] = f16at(w); v = nibbles32(w + 2); w += 18; break;
            case 3: dw[b] = f16at(w); mw[b] = f16at(w + 2); v = nibbles32(w + 4); w += 20; break;
            case 6: dw[b] = f16at(w); v = _mm256_or_si256(nibbles32(w + 6), bits32_x10(w + 2)); w += 22; break;
            case 7: dw[b] = f16at(w); mw[b] = f16at(w + 2); v = _mm256_or_si256(nibbles32(w + 8), bits32_x10(w + 4)); w += 24; break;
            default: dw[b] = f16at(w); v = _mm256_xor_si256(loadu(w + 2), _mm256_set1_epi8(static_cast<char>(0x80))); w += 34; break;
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(u), v);
    }
}

template <int BIAS, bool MIN>
static void micro32_8x16(const uint8_t* U, const float* DW, const float* MW, int64_t t0, int64_t K, const ActV32& A,
                         int64_t g, float* acc_out) {
    constexpr int NT = 8;
    const int64_t nb = K / 32;
    const int8_t* aq = A.q + g * K * 16;
    const float* ad = A.d + g * nb * 16;
    const float* ads = A.ds + g * nb * 16;
    __m512 facc[NT];
    for (int t = 0; t < NT; ++t) facc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        __m512i a16[NT];
        for (int t = 0; t < NT; ++t) a16[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int gg = 0; gg < 8; ++gg) {
            const int64_t kg = b * 8 + gg;
            const __m512i codes = _mm512_loadu_si512(aq + kg * 64);
            for (int t = 0; t < NT; ++t) {
                int32_t w4;
                std::memcpy(&w4, U + (t0 + t) * K + 4 * kg, 4);
                a16[t] = _mm512_dpbusd_epi32(a16[t], _mm512_set1_epi32(w4), codes);
            }
        }
        const __m512 dx = _mm512_loadu_ps(ad + b * 16);
        const __m512 dsx = _mm512_loadu_ps(ads + b * 16);
        const __m512 bterm = _mm512_mul_ps(dsx, _mm512_set1_ps(-static_cast<float>(BIAS)));
        for (int t = 0; t < NT; ++t) {
            const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a16[t]), dx, bterm);
            facc[t] = _mm512_fmadd_ps(f, _mm512_set1_ps(DW[(t0 + t) * nb + b]), facc[t]);
            if (MIN) facc[t] = _mm512_fmadd_ps(dsx, _mm512_set1_ps(MW[(t0 + t) * nb + b]), facc[t]);
        }
    }
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(acc_out + 16 * t, facc[t]);
}

static void gemm_q32_rows(const Ctx& c, const ActV32& A, int64_t type, int64_t n0, int64_t n1) {
    constexpr int64_t TN = 32;
    const int64_t K = c.K, nb = K / 32;
    std::vector<uint8_t> u(TN * K);
    std::vector<float> dw(TN * nb), mw(TN * nb);
    alignas(64) float res[8 * 16];
    for (int64_t nt = n0; nt < n1; nt += TN) {
        const int64_t rows = std::min(TN, n1 - nt);
        const int64_t rows8 = (rows + 7) / 8 * 8;
        for (int64_t r = 0; r < rows8; ++r) {
            if (r < rows) {
                unpack_row32(type, c.w + (nt + r) * c.row_bytes, K, u.data() + r * K, dw.data() + r * nb, mw.data() + r * nb);
            } else {
                std::memset(u.data() + r * K, 0, K);
                std::fill(dw.data() + r * nb, dw.data() + (r + 1) * nb, 0.0f);
                std::fill(mw.data() + r * nb, mw.data() + (r + 1) * nb, 0.0f);
            }
        }
        for (int64_t g = 0; g < A.MG; ++g) {
            const int64_t mrows = std::min<int64_t>(16, c.M - 16 * g);
            for (int64_t t0 = 0; t0 < rows8; t0 += 8) {
                switch (type) {
                    case 2: micro32_8x16<8, false>(u.data(), dw.data(), mw.data(), t0, K, A, g, res); break;
                    case 3: case 7: micro32_8x16<0, true>(u.data(), dw.data(), mw.data(), t0, K, A, g, res); break;
                    case 6: micro32_8x16<16, false>(u.data(), dw.data(), mw.data(), t0, K, A, g, res); break;
                    default: micro32_8x16<128, false>(u.data(), dw.data(), mw.data(), t0, K, A, g, res); break;
                }
                const int64_t tn = std::min<int64_t>(8, rows - t0);
                for (int64_t t = 0; t < tn; ++t)
                    for (int64_t i = 0; i < mrows; ++i) c.out[(16 * g + i) * c.N + nt + t0 + t] = res[16 * t + i];
            }
        }
    }
}
#endif  // EMBER_VNNI

// ---------------------------------------------------------------------------------------------
// Row driver: rows [n0, n1) of the output for all M activation rows.
template <class KERN>
static void run_rows(const Ctx& c, int64_t n0, int64_t n1) {
    constexpr int MR = EMBER_MR;
    constexpr int64_t NC = 8;  // weight rows per tile: the activation tile stays in L1 across them
    float res[MR];
    for (int64_t nn = n0; nn < n1; nn += NC) {
        const int64_t ne = std::min(nn + NC, n1);
        int64_t m = 0;
        for (; m + MR <= c.M; m += MR)
            for (int64_t n = nn; n < ne; ++n) {
                KERN::template dot<MR>(c, c.w + n * c.row_bytes, m, res);
                for (int i = 0; i < MR; ++i) c.out[(m + i) * c.N + n] = res[i];
            }
        for (; m < c.M; ++m)
            for (int64_t n = nn; n < ne; ++n) {
                KERN::template dot<1>(c, c.w + n * c.row_bytes, m, res);
                c.out[m * c.N + n] = res[0];
            }
    }
}

static RowsFn rows_fn(int64_t type) {
    switch (type) {
        case 2: return run_rows<KQ4_0>;
        case 3: return run_rows<KQ4_1>;
        case 6: return run_rows<KQ5_0>;
        case 7: return run_rows<KQ5_1>;
        case 8: return run_rows<KQ8_0>;
        case 12: return run_rows<KQ4_K>;
        case 13: return run_rows<KQ5_K>;
        case 14: return run_rows<KQ6_K>;
        default: return nullptr;
    }
}
