// ember native CPU kernels: float32 Linears on 16-bit integers (AVX2 vpmaddwd), for encoders on
// CPUs without AVX-512 (issue 14: AVX2 has no bf16 arithmetic, and float32 FMA tops out at 16 MACs a
// cycle; vpmaddwd + vpaddd give 24 on Intel, ~32 on AMD Zen 3).
//
// Ops (namespace `ember`):
//   int16_mm(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, int out_features, bool gelu, int isa) -> Tensor
//       y = x @ W^T + bias for x [..., K] float32 and W held as int16 codes, |code| <= 2047 (12 bits),
//       w_scale [N] float32 per output row, w packed [ceil(N/16)][K2][16][2] (K2 = K rounded up to a
//       multiple of 4, halved: column n's k pair p at w[n/16][p][n%16]; padding zero). x is quantised
//       per call, per row: amax / 8191 is the row's scale and each value becomes rint(x * (8191 /
//       amax)) (|code| <= 8191, 14 bits; a zero row gives zeros, a row holding a NaN or an infinity
//       NaNs). The products are summed exactly in
//       int32 over chunks of 128 k (2 * 64 * 8191 * 2047 < 2^31), each chunk's sum converted to
//       float32 and added in order into a float32 accumulator starting at 0; y = (acc * x_scale[m])
//       * w_scale[n] + bias[n]. ember.kernels.int16_reference computes the same in PyTorch. gelu: the
//       exact GELU of y, fused (erf by Abramowitz & Stegun 7.1.26: within 1e-7 of torch's F.gelu).
//       isa >= 1 and a CPU with AVX2 (else an error: the caller uses the reference).
//
// Kernel: a 6-row x 16-column register tile (12 int32 accumulators, 2 weight vectors, 1 broadcast,
// 1 product) in inline assembly (GCC spills the intrinsic version's accumulators); activations
// packed per call as [M/6][K2][6][2] so a tile reads one stream; threads split (24-row block, panel)
// pairs, row blocks outermost so a block's activations stay in L1 while the weight panels stream.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#define EMBER_I16_X86 1
#include <immintrin.h>
#else
#define EMBER_I16_X86 0
#endif

namespace ember_int16 {

constexpr int W_MAX = 2047, A_MAX = 8191;
constexpr int64_t CHUNK = 64;  // k pairs summed in int32: 2 * CHUNK * A_MAX * W_MAX < 2^31
constexpr int64_t NR = 16;     // columns of a weight panel
constexpr int64_t RB = 24;     // rows of a task (a multiple of the tile's 6)

#if EMBER_I16_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=off")  // (acc * sa) * sw + bias rounded step by step, as the reference

// the 8x8 transpose of 32-bit lanes: v[j] lane i <- v[i] lane j
static inline void transpose8(__m256* v) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

// rows [m0, m0 + nr) (m0 a multiple of 6, nr <= 6) of x [M, K] to the int16 codes of their tile,
// [K2 pairs][6 rows][2] at qb (rows past nr and k past K are zero); s[m] = row m's scale
static void quantize_block(const float* x, int64_t K, int64_t K2, int64_t m0, int64_t nr, int16_t* qb, float* s) {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    float inv[6] = {0, 0, 0, 0, 0, 0};
    for (int64_t r = 0; r < nr; ++r) {
        const float* xr = x + (m0 + r) * K;
        __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            const __m256 v = _mm256_loadu_ps(xr + k);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v, absm));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // max_ps would drop a NaN
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h);
        bool finite = _mm256_movemask_ps(nan) == 0;
        for (; k < K; ++k) {
            finite = finite && !std::isnan(xr[k]);
            amax = std::max(amax, std::fabs(xr[k]));
        }
        finite = finite && amax <= std::numeric_limits<float>::max();
        // a row with a NaN or an infinity gives NaN outputs (its codes are zero, its scale NaN)
        s[m0 + r] = finite ? amax / A_MAX : std::numeric_limits<float>::quiet_NaN();
        inv[r] = finite && amax > 0 ? A_MAX / amax : 0.0f;
    }
    int32_t* out = reinterpret_cast<int32_t*>(qb);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {  // 8 pairs x 6 rows: codes per row, then transposed to pair-major
        __m256 v[8];
        for (int r = 0; r < 8; ++r) {
            if (r >= nr) {
                v[r] = _mm256_setzero_ps();
                continue;
            }
            const float* xr = x + (m0 + r) * K + k;
            const __m256 vi = _mm256_set1_ps(inv[r]);  // cvtps rounds to nearest even, as rint and torch.round
            const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr), vi));
            const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + 8), vi));
            v[r] = _mm256_castsi256_ps(_mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
        }
        transpose8(v);
        int32_t* o = out + (k / 2) * 6;
        for (int j = 0; j < 7; ++j)  // 8 lanes: the 2 past the 6 rows are the next pair's, stored next
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 6 * j), _mm256_castps_si256(v[j]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 42), _mm_castps_si128(_mm256_castps256_ps128(v[7])));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(o + 46), _mm_castps_si128(_mm256_extractf128_ps(v[7], 1)));
    }
    for (; k < 2 * K2; ++k)
        for (int64_t r = 0; r < 6; ++r)
            qb[((k / 2) * 6 + r) * 2 + (k & 1)] =
                r < nr && k < K ? static_cast<int16_t>(std::nearbyint(x[(m0 + r) * K + k] * inv[r])) : 0;
}

// One k pair (u = 0/1 of an unrolled pair of pairs) of a 6-row x 16-column tile: the two weight vectors,
// then per row a broadcast 32-bit pair of activations, two vpmaddwd and two vpaddd.
#define EMBER_ROW(addr, a0, a1)                                                                   \
    "vpbroadcastd " addr ", %%ymm14\n\t"                                                          \
    "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"                                                      \
    "vpaddd %%ymm15, %%ymm" #a0 ", %%ymm" #a0 "\n\t"                                              \
    "vpmaddwd %%ymm13, %%ymm14, %%ymm14\n\t"                                                      \
    "vpaddd %%ymm14, %%ymm" #a1 ", %%ymm" #a1 "\n\t"
#define EMBER_PAIR(qo, wo)                                                                        \
    "vmovdqa " wo "(%[w]), %%ymm12\n\t"                                                           \
    "vmovdqa " wo "+32(%[w]), %%ymm13\n\t"                                                        \
    EMBER_ROW(qo "(%[q])", 0, 1) EMBER_ROW(qo "+4(%[q])", 2, 3) EMBER_ROW(qo "+8(%[q])", 4, 5)      \
    EMBER_ROW(qo "+12(%[q])", 6, 7) EMBER_ROW(qo "+16(%[q])", 8, 9) EMBER_ROW(qo "+20(%[q])", 10, 11)
#define EMBER_FLUSH(i, off)                                                                       \
    "vcvtdq2ps %%ymm" #i ", %%ymm" #i "\n\t"                                                      \
    "vaddps " off "(%[f]), %%ymm" #i ", %%ymm" #i "\n\t"                                          \
    "vmovups %%ymm" #i ", " off "(%[f])\n\t"

// 6 rows x 16 columns over n k pairs (n even, >= 2): int32 sums of CHUNK pairs at most, each added
// into f[12][8] (float32, row r's columns at f + 16 r) as it completes. q: row 0's activations at the
// first pair ([pair][6 rows][2]); w: the panel's first pair ([pair][16 columns][2]).
static inline void mk6x16(const int16_t* q, const int16_t* w, int64_t n, float* f) {
    int64_t cnt;
    asm volatile(
        "2:\n\t"
        "vpxor %%xmm0, %%xmm0, %%xmm0\n\t" "vpxor %%xmm1, %%xmm1, %%xmm1\n\t"
        "vpxor %%xmm2, %%xmm2, %%xmm2\n\t" "vpxor %%xmm3, %%xmm3, %%xmm3\n\t"
        "vpxor %%xmm4, %%xmm4, %%xmm4\n\t" "vpxor %%xmm5, %%xmm5, %%xmm5\n\t"
        "vpxor %%xmm6, %%xmm6, %%xmm6\n\t" "vpxor %%xmm7, %%xmm7, %%xmm7\n\t"
        "vpxor %%xmm8, %%xmm8, %%xmm8\n\t" "vpxor %%xmm9, %%xmm9, %%xmm9\n\t"
        "vpxor %%xmm10, %%xmm10, %%xmm10\n\t" "vpxor %%xmm11, %%xmm11, %%xmm11\n\t"
        "mov %[n], %[cnt]\n\t"
        "cmp %[chunk], %[cnt]\n\t"
        "jle 3f\n\t"
        "mov %[chunk], %[cnt]\n\t"
        "3:\n\t"
        "sub %[cnt], %[n]\n\t"
        "1:\n\t"
        EMBER_PAIR("0", "0") EMBER_PAIR("24", "64")
        "add $48, %[q]\n\t"
        "add $128, %[w]\n\t"
        "sub $2, %[cnt]\n\t"
        "jnz 1b\n\t"
        EMBER_FLUSH(0, "0") EMBER_FLUSH(1, "32") EMBER_FLUSH(2, "64") EMBER_FLUSH(3, "96")
        EMBER_FLUSH(4, "128") EMBER_FLUSH(5, "160") EMBER_FLUSH(6, "192") EMBER_FLUSH(7, "224")
        EMBER_FLUSH(8, "256") EMBER_FLUSH(9, "288") EMBER_FLUSH(10, "320") EMBER_FLUSH(11, "352")
        "test %[n], %[n]\n\t"
        "jnz 2b\n\t"
        : [q] "+r"(q), [w] "+r"(w), [n] "+r"(n), [cnt] "=&r"(cnt)
        : [f] "r"(f), [chunk] "i"(CHUNK)
        : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
          "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}
#undef EMBER_FLUSH
#undef EMBER_PAIR
#undef EMBER_ROW

#include "avx2_math.h"  // exp256

// the exact GELU, x * (1 + erf(x / sqrt 2)) / 2, with erf as Abramowitz & Stegun 7.1.26 (|error| <
// 1.5e-7; ATen's vectorised erf uses the same formula)
static inline __m256 gelu(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
    const __m256 az = _mm256_andnot_ps(sign, z);
    const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), az, one));
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    const __m256 e = exp256(_mm256_xor_ps(sign, _mm256_mul_ps(az, az)));
    const __m256 erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(p, t), e, one);  // 1 - p t exp(-z^2)
    const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign, z));
    return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(one, erf));
}

// rows [m0, m1) (m0 a multiple of 6, m1 - m0 <= RB) x the panel at n0: the tiles, then
// y = (acc * sa[m]) * sw[n] + bias[n], and the GELU of that when asked
static void panel_rows(const int16_t* q, const float* sa, int64_t K2, const int16_t* wp, const float* sw,
                       const float* bias, bool act, int64_t n0, int64_t N, int64_t m0, int64_t m1, float* out) {
    alignas(32) float acc[RB * NR];
    std::fill(acc, acc + RB * NR, 0.0f);
    for (int64_t m = m0; m < m1; m += 6) mk6x16(q + m * 2 * K2, wp, K2, acc + (m - m0) * NR);
    const int64_t nn = std::min<int64_t>(NR, N - n0);
    alignas(32) float sw16[NR] = {}, b16[NR] = {}, row[NR];
    std::copy(sw + n0, sw + n0 + nn, sw16);
    if (bias) std::copy(bias + n0, bias + n0 + nn, b16);
    for (int64_t m = m0; m < m1; ++m) {
        const float* f = acc + (m - m0) * NR;
        const __m256 vs = _mm256_set1_ps(sa[m]);
        for (int c = 0; c < NR; c += 8) {
            __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_load_ps(f + c), vs), _mm256_load_ps(sw16 + c));
            if (bias) y = _mm256_add_ps(y, _mm256_load_ps(b16 + c));
            if (act) y = gelu(y);
            _mm256_store_ps(row + c, y);
        }
        std::copy(row, row + nn, out + m * N + n0);
    }
}
#pragma GCC pop_options

static bool cpu_has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

at::Tensor int16_mm(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& w_scale,
                    const c10::optional<at::Tensor>& bias, int64_t out_features, bool act, int64_t isa) {
    TORCH_CHECK(x_in.dim() >= 1 && x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
                "ember.int16_mm: x must be a float32 CPU tensor of at least 1 dimension");
    const int64_t K = x_in.size(-1), N = out_features, K2 = (K + 3) / 4 * 2, NP = (N + NR - 1) / NR;
    TORCH_CHECK(w.dim() == 4 && w.is_contiguous() && w.scalar_type() == at::kShort && w.size(0) == NP &&
                    w.size(1) == K2 && w.size(2) == NR && w.size(3) == 2,
                "ember.int16_mm: w must be contiguous int16 [", NP, ", ", K2, ", 16, 2] for K=", K, ", N=", N);
    TORCH_CHECK(w_scale.dim() == 1 && w_scale.is_contiguous() && w_scale.scalar_type() == at::kFloat &&
                    w_scale.size(0) == N, "ember.int16_mm: w_scale must be contiguous float32 [", N, "]");
    const bool has_bias = bias.has_value() && bias->defined();
    if (has_bias)
        TORCH_CHECK(bias->dim() == 1 && bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->size(0) == N,
                    "ember.int16_mm: bias must be contiguous float32 [", N, "]");
    const at::Tensor x = x_in.contiguous();
    c10::SmallVector<int64_t, 6> out_sizes(x.sizes().begin(), x.sizes().end());
    out_sizes.back() = N;
    at::Tensor out = at::empty(out_sizes, x.options());
    if (N == 0 || out.numel() == 0) return out;
    if (K == 0) {
        TORCH_CHECK(!act, "ember.int16_mm: gelu with K=0");
        return has_bias ? out.copy_(bias->expand_as(out)) : out.zero_();
    }
    const int64_t M = x.numel() / K;
#if EMBER_I16_X86
    TORCH_CHECK(isa >= 1 && cpu_has_avx2(), "ember.int16_mm: needs AVX2 (use ember.kernels.int16_reference)");
    const int64_t MB = (M + 5) / 6;
    at::Tensor q = at::empty({MB * 6, 2 * K2}, x.options().dtype(at::kShort));
    at::Tensor sa = at::empty({M}, x.options());
    const float* xd = x.data_ptr<float>();
    int16_t* qd = q.data_ptr<int16_t>();
    float* sad = sa.data_ptr<float>();
    at::parallel_for(0, MB, 4, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
            quantize_block(xd, K, K2, 6 * b, std::min<int64_t>(6, M - 6 * b), qd + b * 12 * K2, sad);
    });
    const int16_t* wd = w.data_ptr<int16_t>();
    const float* sw = w_scale.data_ptr<float>();
    const float* bd = has_bias ? bias->data_ptr<float>() : nullptr;
    float* od = out.data_ptr<float>();
    const int64_t nrb = (M + RB - 1) / RB;
    at::parallel_for(0, NP * nrb, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t rb = t / NP, pn = t % NP, m0 = rb * RB;
            panel_rows(qd, sad, K2, wd + pn * K2 * NR * 2, sw, bd, act, pn * NR, N, m0, std::min(M, m0 + RB), od);
        }
    });
    return out;
#else
    TORCH_CHECK(false, "ember.int16_mm: x86 only (use ember.kernels.int16_reference)");
#endif
}

}  // namespace ember_int16

TORCH_LIBRARY_FRAGMENT(ember, m) {
    m.def("int16_mm(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, int out_features, bool gelu, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember, CPU, m) {
    m.impl("int16_mm", &ember_int16::int16_mm);
}
