// ember native CPU kernels: the small fused ops of a decoder step (ember.nn.ops registers them).
//
// Ops (namespace `ember`; isa: 0 scalar, 1 avx2, >= 2 avx512, clamped to what the CPU has):
//   rms_norm(Tensor x, Tensor weight, float eps, int isa) -> Tensor
//       x [..., D] float32 / bfloat16, weight [D] float32 / bfloat16. Float32 accumulation; the
//       result is bfloat16 when x and weight are, else float32 (torch's type promotion of
//       `weight * normed.to(x.dtype)`); a bfloat16 x has its normalised value rounded to bfloat16
//       before the scale, as transformers' LlamaRMSNorm does.
//   add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps, int isa) -> (Tensor, Tensor)
//       s = x + delta (x's dtype), rms_norm(s): one pass over the row.
//   silu_mul(Tensor gu, Tensor? up, int isa) -> Tensor
//       silu(g) * u with (g, u) = (gu, up), or the two halves of gu [..., 2F] when up is None.
//       bfloat16: silu(g) rounded to bfloat16 before the product (torch's F.silu(g) * u).
//   decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int isa) -> Tensor
//       one query per row: q [B, H, 1, D], k/v [B, KV, S, D] (H % KV == 0, any strides with a
//       contiguous last dim: cache views work as they are), mask None, bool (True = attend) or
//       additive float32/bfloat16, broadcastable to [B, 1, 1, S]. Scores and softmax in float32;
//       keys split into parts across threads (flash-decoding) when there is enough work, the parts'
//       softmax states merged. Returns [B, H, 1, D] in q's dtype.
//   rope_cache_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos,
//                        int heads, float scale, int isa) -> Tensor
//       one decode token of one row, from its fused projection qkv [heads + 2 KV heads of D] to the
//       attention output [1, 1, heads * D]: q and k rotated (rotate_half form, rotary dim R = cos's
//       last dim <= D, cos/sin [R] for this token), k and v written to column pos of the caches
//       [1, KV, S, D], then decode_attention of q over columns 0..pos. Rotary in float32
//       (bfloat16: rounded after each product and the sum, as the eager ops are).
//   quant_swiglu(Tensor x, Tensor w_gu, int t_gu, int n_gu, Tensor w_down, int t_down, int n_down, int mm_isa,
//                int isa) -> Tensor
//       ggml_mm(silu_mul(ggml_mm(x, w_gu)), w_down): a SwiGLU MLP whose fused gate/up and down
//       projections are GGUF blocks (mm_isa: the isa of the two ggml_mm calls, isa: silu_mul's).
//   quant_rope_cache_attention(Tensor x, Tensor w_qkv, int t_qkv, int n_qkv, Tensor cos, Tensor sin,
//                              Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, int heads, float scale,
//                              Tensor w_o, int t_o, int n_o, int mm_isa, int isa) -> Tensor
//       ggml_mm(rope_cache_attention(ggml_mm(x, w_qkv), ...), w_o): a decode token's attention
//       block from its normed input to the output projection.
//   quant_decoder_layer(x, pending, w1, eps1, <quant_rope_cache_attention's from w_qkv to n_o>, w2, eps2,
//                       <quant_swiglu's from w_gu to n_down>, mm_isa, isa) -> (Tensor, Tensor)
//       a pre-norm Llama layer's decode token: add_rms_norm(x, pending), the attention block, add_rms_norm,
//       the MLP block; returns (the residual stream, the MLP's output), the last add left to the caller.
//   bf16_decoder_layer(x, pending, w1, eps1, w_qkv, cos, sin, k_cache, v_cache, pos, heads, scale, w_o, w2, eps2,
//                      w_gu, w_down, isa) -> (Tensor, Tensor)
//       the same layer with bfloat16 weights [N, K] (the decode GEMV, bf16_mm, for each projection).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define EMBER_OPS_X86 1
#include <immintrin.h>
#else
#define EMBER_OPS_X86 0
#endif

namespace ember_kernels {  // ember_kernels.cpp
at::Tensor ggml_mm(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t out_features, int64_t isa);
at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& w, int64_t isa);
}

namespace ember_ops {

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as c10::BFloat16
    if (std::isnan(f)) return 0x7FC0;
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>((u + (((u >> 16) & 1) + 0x7FFF)) >> 16);
}
static inline float ld_any(const float* p) { return *p; }
static inline float ld_any(const uint16_t* p) { return bf16_to_f32(*p); }
static inline void st_any(float* p, float v) { *p = v; }
static inline void st_any(uint16_t* p, float v) { *p = f32_to_bf16(v); }

// ---------------------------------------------------------------------------------------------
namespace scalar {
struct V {
    float v;
};
constexpr int64_t W = 1;
static inline V vzero() { return {0.0f}; }
static inline V vset(float f) { return {f}; }
static inline V vld(const float* p) { return {*p}; }
static inline V vld(const uint16_t* p) { return {bf16_to_f32(*p)}; }
static inline void vst(float* p, V a) { *p = a.v; }
static inline void vst(uint16_t* p, V a) { *p = f32_to_bf16(a.v); }
static inline V vadd(V a, V b) { return {a.v + b.v}; }
static inline V vsub(V a, V b) { return {a.v - b.v}; }
static inline V vmul(V a, V b) { return {a.v * b.v}; }
static inline V vdiv(V a, V b) { return {a.v / b.v}; }
static inline V vfma(V a, V b, V c) { return {a.v * b.v + c.v}; }
static inline V vexp(V a) { return {std::exp(a.v)}; }
static inline float vsum(V a) { return a.v; }
static inline V vround_bf16(V a) { return {bf16_to_f32(f32_to_bf16(a.v))}; }
#include "ops_impl.h"
}  // namespace scalar

#if EMBER_OPS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
struct V {
    __m256 v;
};
constexpr int64_t W = 8;
static inline V vzero() { return {_mm256_setzero_ps()}; }
static inline V vset(float f) { return {_mm256_set1_ps(f)}; }
static inline V vld(const float* p) { return {_mm256_loadu_ps(p)}; }
static inline V vld(const uint16_t* p) {
    const __m256i i = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(i, 16))};
}
static inline __m256i bf16_bits(__m256 f) {  // rounded bf16 bits in the low half of each lane
    const __m256i b = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}
static inline void vst(float* p, V a) { _mm256_storeu_ps(p, a.v); }
static inline void vst(uint16_t* p, V a) {
    const __m256i r = bf16_bits(a.v);
    const __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(pk));
}
static inline V vround_bf16(V a) { return {_mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(a.v), 16))}; }
static inline V vadd(V a, V b) { return {_mm256_add_ps(a.v, b.v)}; }
static inline V vsub(V a, V b) { return {_mm256_sub_ps(a.v, b.v)}; }
static inline V vmul(V a, V b) { return {_mm256_mul_ps(a.v, b.v)}; }
static inline V vdiv(V a, V b) { return {_mm256_div_ps(a.v, b.v)}; }
static inline V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
static inline float vsum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#include "avx2_math.h"
static inline V vexp(V a) { return {exp256(a.v)}; }
#include "ops_impl.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
namespace avx512 {
struct V {
    __m512 v;
};
constexpr int64_t W = 16;
static inline V vzero() { return {_mm512_setzero_ps()}; }
static inline V vset(float f) { return {_mm512_set1_ps(f)}; }
static inline V vld(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline V vld(const uint16_t* p) {
    const __m512i i = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(i, 16))};
}
static inline __m512i bf16_bits(__m512 f) {
    const __m512i b = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    return _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
}
static inline void vst(float* p, V a) { _mm512_storeu_ps(p, a.v); }
static inline void vst(uint16_t* p, V a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(a.v)));
}
static inline V vround_bf16(V a) { return {_mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(a.v), 16))}; }
static inline V vadd(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline V vsub(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
static inline V vmul(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
static inline V vdiv(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }
static inline V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline float vsum(V a) { return _mm512_reduce_add_ps(a.v); }
// exp: the same polynomial, scaled by 2^n with vscalefps (underflows gracefully to 0)
static inline V vexp(V a) {
    const __m512 x = _mm512_min_ps(_mm512_max_ps(a.v, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.3762626647949f));
    const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    y = _mm512_scalef_ps(y, fx);
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, _mm512_set1_ps(88.7228394f), _CMP_GT_OQ), y,
                                 _mm512_set1_ps(std::numeric_limits<float>::infinity()))};
}
#include "ops_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

static int64_t detect_isa() {
#if EMBER_OPS_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
        return 1;
    return 2;
#else
    return 0;
#endif
}
static int64_t clamp_isa(int64_t isa) {
    static const int64_t best = detect_isa();
    return std::min<int64_t>(std::max<int64_t>(isa, 0), best);
}

#if EMBER_OPS_X86
#define EMBER_OPS_DISPATCH(isa, ...)        \
    do {                                    \
        if ((isa) >= 2) {                   \
            avx512::__VA_ARGS__;                   \
        } else if ((isa) == 1) {            \
            avx2::__VA_ARGS__;                     \
        } else {                            \
            scalar::__VA_ARGS__;                   \
        }                                   \
    } while (0)
#else
#define EMBER_OPS_DISPATCH(isa, ...) scalar::__VA_ARGS__
#endif

// rows [0, n) in tasks of `grain`; inline (no thread-pool round trip) when one task does it all
template <class F>
static void for_rows(int64_t n, int64_t grain, const F& f) {
    if (n <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
        f(0, n);
        return;
    }
    at::parallel_for(0, n, grain, f);
}

static bool is_f32_or_bf16(const at::Tensor& t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

template <class TX, class TW, class TY>
static void rms_rows(int64_t isa, const TX* x, const TW* w, TY* y, int64_t rows, int64_t D, float eps) {
    for_rows(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) EMBER_OPS_DISPATCH(isa, rms_row<TX, TW, TY>(x + r * D, w, y + r * D, D, eps));
    });
}

template <class TX, class TW, class TY>
static void add_rms_rows(int64_t isa, const TX* x, const TX* d, TX* s, const TW* w, TY* y, int64_t rows, int64_t D,
                         float eps) {
    for_rows(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
            EMBER_OPS_DISPATCH(isa, add_rms_row<TX, TW, TY>(x + r * D, d + r * D, s + r * D, w, y + r * D, D, eps));
    });
}

static at::ScalarType norm_out_type(const at::Tensor& x, const at::Tensor& w) {
    return x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

static void check_norm(const char* op, const at::Tensor& x, const at::Tensor& w) {
    TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "ember.", op, ": CPU tensors only");
    TORCH_CHECK(is_f32_or_bf16(x) && is_f32_or_bf16(w), "ember.", op, ": x and weight must be float32 or bfloat16");
    TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0), "ember.", op, ": weight must be [x.shape[-1]]");
}

// the (x, weight, out) dtype combinations: f32/f32/f32, f32/bf16/f32, bf16/bf16/bf16, bf16/f32/f32
#define EMBER_NORM_TYPES(x, w, ...)                                                       \
    do {                                                                                   \
        const bool xb_ = (x).scalar_type() == at::kBFloat16, wb_ = (w).scalar_type() == at::kBFloat16; \
        if (!xb_ && !wb_) { using TX = float; using TW = float; using TY = float; __VA_ARGS__; }   \
        else if (!xb_) { using TX = float; using TW = uint16_t; using TY = float; __VA_ARGS__; }   \
        else if (wb_) { using TX = uint16_t; using TW = uint16_t; using TY = uint16_t; __VA_ARGS__; } \
        else { using TX = uint16_t; using TW = float; using TY = float; __VA_ARGS__; }            \
    } while (0)

at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps, int64_t isa) {
    check_norm("rms_norm", x_, w_);
    const at::Tensor x = x_.contiguous(), w = w_.contiguous();
    const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(norm_out_type(x, w)));
    if (rows == 0 || D == 0) return y;
    isa = clamp_isa(isa);
    EMBER_NORM_TYPES(x, w, rms_rows<TX, TW, TY>(isa, static_cast<const TX*>(x.data_ptr()), static_cast<const TW*>(w.data_ptr()),
                                                static_cast<TY*>(y.data_ptr()), rows, D, static_cast<float>(eps)));
    return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_, const at::Tensor& d_, const at::Tensor& w_, double eps,
                                                int64_t isa) {
    check_norm("add_rms_norm", x_, w_);
    TORCH_CHECK(d_.scalar_type() == x_.scalar_type() && d_.sizes() == x_.sizes() && d_.device().is_cpu(),
                "ember.add_rms_norm: delta must have x's shape and dtype");
    const at::Tensor x = x_.contiguous(), d = d_.contiguous(), w = w_.contiguous();
    const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
    at::Tensor s = at::empty(x.sizes(), x.options());
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(norm_out_type(x, w)));
    if (rows == 0 || D == 0) return {s, y};
    isa = clamp_isa(isa);
    EMBER_NORM_TYPES(x, w, add_rms_rows<TX, TW, TY>(isa, static_cast<const TX*>(x.data_ptr()), static_cast<const TX*>(d.data_ptr()),
                                                    static_cast<TX*>(s.data_ptr()), static_cast<const TW*>(w.data_ptr()),
                                                    static_cast<TY*>(y.data_ptr()), rows, D, static_cast<float>(eps)));
    return {s, y};
}

template <class T>
static void silu_rows(int64_t isa, const T* g, const T* u, int64_t ld, T* y, int64_t rows, int64_t F) {
    for_rows(rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) EMBER_OPS_DISPATCH(isa, silu_mul_row<T>(g + r * ld, u + r * ld, y + r * F, F));
    });
}

at::Tensor silu_mul(const at::Tensor& gu_, const c10::optional<at::Tensor>& up, int64_t isa) {
    TORCH_CHECK(gu_.device().is_cpu() && is_f32_or_bf16(gu_) && gu_.dim() >= 1, "ember.silu_mul: float32 or bfloat16 CPU tensors only");
    isa = clamp_isa(isa);
    const bool B16 = gu_.scalar_type() == at::kBFloat16;
    if (up.has_value()) {
        const at::Tensor g = gu_.contiguous(), u = up->contiguous();
        TORCH_CHECK(u.sizes() == g.sizes() && u.scalar_type() == g.scalar_type() && u.device().is_cpu(),
                    "ember.silu_mul: gate and up must have the same shape and dtype");
        const int64_t F = g.size(-1), rows = F ? g.numel() / F : 0;
        at::Tensor y = at::empty(g.sizes(), g.options());
        if (rows == 0 || F == 0) return y;
        if (B16) silu_rows<uint16_t>(isa, static_cast<const uint16_t*>(g.data_ptr()), static_cast<const uint16_t*>(u.data_ptr()), F,
                                     static_cast<uint16_t*>(y.data_ptr()), rows, F);
        else silu_rows<float>(isa, g.data_ptr<float>(), u.data_ptr<float>(), F, y.data_ptr<float>(), rows, F);
        return y;
    }
    const at::Tensor gu = gu_.contiguous();
    TORCH_CHECK(gu.size(-1) % 2 == 0, "ember.silu_mul: a fused gate/up needs an even last dim");
    const int64_t F = gu.size(-1) / 2, rows = F ? gu.numel() / (2 * F) : 0;
    std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
    shape.back() = F;
    at::Tensor y = at::empty(shape, gu.options());
    if (rows == 0 || F == 0) return y;
    if (B16) {
        const uint16_t* p = static_cast<const uint16_t*>(gu.data_ptr());
        silu_rows<uint16_t>(isa, p, p + F, 2 * F, static_cast<uint16_t*>(y.data_ptr()), rows, F);
    } else {
        const float* p = gu.data_ptr<float>();
        silu_rows<float>(isa, p, p + F, 2 * F, y.data_ptr<float>(), rows, F);
    }
    return y;
}

template <class T>
static void attend_group(int64_t isa, const float* qg, int64_t G, int64_t D, const T* k, const T* v, int64_t sk, int64_t sv,
                         int64_t j0, int64_t j1, const void* mask, int64_t smask, int mkind, float* m, float* l, float* acc) {
    std::vector<float> scores(G * (j1 - j0) + 16), kbuf(D + 16);
    EMBER_OPS_DISPATCH(isa, attend_part<T>(qg, G, D, k, v, sk, sv, j0, j1, mask, smask, mkind, scores.data(), kbuf.data(),
                                           m, l, acc));
}

// Attention of widened queries qf [B, H, D] (float32, scale folded in) over keys/values k, v
// [B, KV, >= S, D] (their first S columns), written to out [B, H, D] (contiguous, T).
template <class T>
static void attend_rows(int64_t isa, const float* qf, int64_t B, int64_t H, int64_t D, const at::Tensor& k,
                        const at::Tensor& v, int64_t S, const at::Tensor& mask, int mkind, T* op) {
    const int64_t KV = k.size(1), G = H / KV;
    // key parts: enough work per part (~64k multiply-adds) to pay for a thread, and no more parts
    // than keep every thread busy
    const int64_t groups = B * KV, threads = at::get_num_threads();
    int64_t parts = 1;
    if (threads > 1 && !at::in_parallel_region()) {
        const int64_t min_keys = std::max<int64_t>(32, 65536 / std::max<int64_t>(2 * G * D, 1));
        const int64_t want = (threads + groups - 1) / groups;
        parts = std::max<int64_t>(1, std::min<int64_t>(want, S / min_keys));
    }
    const int64_t chunk = (S + parts - 1) / parts;
    parts = std::max<int64_t>(1, (S + chunk - 1) / chunk);
    const int64_t ntask = groups * parts, state = G * (2 + D);
    std::vector<float> st(ntask * state);
    const T* kp = static_cast<const T*>(k.data_ptr());
    const T* vp = static_cast<const T*>(v.data_ptr());
    const char* mp = mkind ? static_cast<const char*>(mask.data_ptr()) : nullptr;
    const int64_t mesz = mkind ? mask.element_size() : 0;
    const int64_t smb = mkind ? mask.stride(0) : 0, sms = mkind ? mask.stride(3) : 0;
    auto task = [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t grp = t / parts, part = t % parts, b = grp / KV, kh = grp % KV;
            const int64_t j0 = part * chunk, j1 = std::min(S, j0 + chunk);
            float* s = st.data() + t * state;
            attend_group<T>(isa, qf + (b * H + kh * G) * D, G, D, kp + b * k.stride(0) + kh * k.stride(1),
                            vp + b * v.stride(0) + kh * v.stride(1), k.stride(2), v.stride(2), j0, j1,
                            mp ? mp + b * smb * mesz : nullptr, sms, mkind, s, s + G, s + 2 * G);
        }
    };
    const bool inline_run = ntask == 1 || threads == 1 || at::in_parallel_region() ||
                            B * H * S * D < 32768;  // too little work for a thread-pool round trip
    if (inline_run) task(0, ntask);
    else at::parallel_for(0, ntask, 1, task);
    // merge the parts of each (row, head): o = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M)
    std::vector<float> o(D);
    for (int64_t grp = 0; grp < groups; ++grp) {
        const int64_t b = grp / KV, kh = grp % KV;
        for (int64_t g = 0; g < G; ++g) {
            float M = -std::numeric_limits<float>::infinity();
            for (int64_t p = 0; p < parts; ++p) M = std::max(M, st[(grp * parts + p) * state + g]);
            std::fill(o.begin(), o.end(), 0.0f);
            float L = 0.0f;
            if (M != -std::numeric_limits<float>::infinity()) {
                for (int64_t p = 0; p < parts; ++p) {
                    const float* s = st.data() + (grp * parts + p) * state;
                    if (s[G + g] == 0.0f) continue;
                    const float f = parts == 1 ? 1.0f : std::exp(s[g] - M);
                    L += s[G + g] * f;
                    const float* a = s + 2 * G + g * D;
                    for (int64_t d = 0; d < D; ++d) o[d] += a[d] * f;
                }
            }
            const float inv = L > 0.0f ? 1.0f / L : 0.0f;  // a row with every key masked gives zeros
            T* dst = op + (b * H + kh * G + g) * D;
            for (int64_t d = 0; d < D; ++d) st_any(dst + d, o[d] * inv);
        }
    }
}

template <class T>
static void decode_attention_impl(int64_t isa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& mask, int mkind, float scale, at::Tensor& out) {
    const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
    // queries widened to float32 with the scale folded in: [B, H, D]
    std::vector<float> qf(B * H * D);
    const T* qp = static_cast<const T*>(q.data_ptr());
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
            for (int64_t d = 0; d < D; ++d) {
                const T* e = qp + b * q.stride(0) + h * q.stride(1) + d;
                qf[(b * H + h) * D + d] = ld_any(e) * scale;
            }
    attend_rows<T>(isa, qf.data(), B, H, D, k, v, k.size(2), mask, mkind, static_cast<T*>(out.data_ptr()));
}

// One head of rotary: the leading R dims of x rotated as transformers' rotate_half does
// (x * cos + rotate_half(x) * sin), the rest passed through; cos/sin [R] hold each frequency twice.
// With x and cos both bfloat16 every product and the sum are rounded to bfloat16, as torch's
// bfloat16 ops round them, so the result is the eager layer's bit for bit.
template <class T, class C>
static inline void rotate_head(const T* x, const C* cos, const C* sin, int64_t R, int64_t D, float* y) {
    const int64_t h = R / 2;
    const bool b16 = std::is_same<T, uint16_t>::value && std::is_same<C, uint16_t>::value;
    auto rnd = [b16](float v) { return b16 ? bf16_to_f32(f32_to_bf16(v)) : v; };
    for (int64_t i = 0; i < h; ++i) {
        const float a = ld_any(x + i), b = ld_any(x + i + h);
        y[i] = rnd(rnd(a * ld_any(cos + i)) + rnd(-b * ld_any(sin + i)));
        y[i + h] = rnd(rnd(b * ld_any(cos + i + h)) + rnd(a * ld_any(sin + i + h)));
    }
    for (int64_t i = R; i < D; ++i) y[i] = ld_any(x + i);
}

template <class T, class C>
static void rope_cache_attention_impl(int64_t isa, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                      at::Tensor& kc, at::Tensor& vc, int64_t pos, int64_t H, float scale, at::Tensor& out) {
    const int64_t KV = kc.size(1), D = kc.size(3), R = cos.size(-1);
    const T* x = static_cast<const T*>(qkv.data_ptr());
    const C* c = static_cast<const C*>(cos.data_ptr());
    const C* s = static_cast<const C*>(sin.data_ptr());
    std::vector<float> qf(H * D), row(D);
    for (int64_t h = 0; h < H; ++h) {
        rotate_head<T, C>(x + h * D, c, s, R, D, qf.data() + h * D);
        for (int64_t d = 0; d < D; ++d) qf[h * D + d] *= scale;
    }
    T* kp = static_cast<T*>(kc.data_ptr());
    T* vp = static_cast<T*>(vc.data_ptr());
    for (int64_t h = 0; h < KV; ++h) {
        rotate_head<T, C>(x + (H + h) * D, c, s, R, D, row.data());
        T* kd = kp + h * kc.stride(1) + pos * kc.stride(2);
        for (int64_t d = 0; d < D; ++d) st_any(kd + d, row[d]);
        std::memcpy(vp + h * vc.stride(1) + pos * vc.stride(2), x + (H + KV + h) * D, D * sizeof(T));
    }
    attend_rows<T>(isa, qf.data(), 1, H, D, kc, vc, pos + 1, at::Tensor(), 0, static_cast<T*>(out.data_ptr()));
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask_,
                            double scale, int64_t isa) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
                "ember.decode_attention: q [B, H, 1, D], k/v [B, KV, S, D]");
    TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "ember.decode_attention: CPU tensors only");
    TORCH_CHECK(is_f32_or_bf16(q) && k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "ember.decode_attention: q, k, v must all be float32 or all bfloat16");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), S = k.size(2);
    TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == KV && v.size(2) == S && k.size(3) == D && v.size(3) == D &&
                    KV > 0 && H % KV == 0,
                "ember.decode_attention: shapes q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes(), " do not match");
    const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
    const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
    const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
    at::Tensor mask;
    int mkind = 0;
    if (mask_.has_value() && mask_->defined()) {
        mask = *mask_;
        TORCH_CHECK(mask.dim() <= 4, "ember.decode_attention: mask has more than 4 dims");
        while (mask.dim() < 4) mask = mask.unsqueeze(0);
        TORCH_CHECK(mask.size(1) == 1 && mask.size(2) == 1, "ember.decode_attention: the mask must broadcast to [B, 1, 1, S]");
        mask = mask.expand({B, 1, 1, S});
        switch (mask.scalar_type()) {
            case at::kBool: mkind = 1; break;
            case at::kFloat: mkind = 2; break;
            case at::kBFloat16: mkind = 3; break;
            default: TORCH_CHECK(false, "ember.decode_attention: mask must be bool, float32 or bfloat16");
        }
    }
    at::Tensor out = at::empty({B, H, 1, D}, q.options());
    if (B == 0 || H == 0 || D == 0) return out;
    isa = clamp_isa(isa);
    const float sc = static_cast<float>(scale);
    if (q.scalar_type() == at::kFloat) decode_attention_impl<float>(isa, qc, kc, vc, mask, mkind, sc, out);
    else decode_attention_impl<uint16_t>(isa, qc, kc, vc, mask, mkind, sc, out);
    return out;
}

at::Tensor rope_cache_attention(const at::Tensor& qkv_, const at::Tensor& cos_, const at::Tensor& sin_, at::Tensor k_cache,
                                at::Tensor v_cache, int64_t pos, int64_t heads, double scale, int64_t isa) {
    TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.size(0) == 1 && v_cache.sizes() == k_cache.sizes(),
                "ember.rope_cache_attention: k_cache/v_cache [1, KV, S, D] of one shape");
    const int64_t KV = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
    TORCH_CHECK(heads > 0 && KV > 0 && heads % KV == 0, "ember.rope_cache_attention: heads ", heads, " for ", KV, " KV heads");
    TORCH_CHECK(qkv_.numel() == (heads + 2 * KV) * D, "ember.rope_cache_attention: qkv has ", qkv_.numel(),
                " values, one token of ", heads, " + 2 x ", KV, " heads of ", D, " needs ", (heads + 2 * KV) * D);
    TORCH_CHECK(pos >= 0 && pos < S, "ember.rope_cache_attention: position ", pos, " outside the cache's ", S, " columns");
    TORCH_CHECK(qkv_.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() && cos_.device().is_cpu(),
                "ember.rope_cache_attention: CPU tensors only");
    TORCH_CHECK(is_f32_or_bf16(qkv_) && k_cache.scalar_type() == qkv_.scalar_type() && v_cache.scalar_type() == qkv_.scalar_type(),
                "ember.rope_cache_attention: qkv and the caches must all be float32 or all bfloat16");
    TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "ember.rope_cache_attention: caches need a contiguous last dim");
    const at::Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
    const int64_t R = cos.size(-1);
    TORCH_CHECK(cos.numel() == R && sin.numel() == R && R % 2 == 0 && R <= D && is_f32_or_bf16(cos) &&
                    sin.scalar_type() == cos.scalar_type(),
                "ember.rope_cache_attention: cos/sin of one token, an even rotary dim <= ", D, ", float32 or bfloat16");
    const at::Tensor qkv = qkv_.contiguous();
    at::Tensor out = at::empty({1, 1, heads * D}, qkv.options());
    isa = clamp_isa(isa);
    const float sc = static_cast<float>(scale);
    const bool f32 = qkv.scalar_type() == at::kFloat, cf = cos.scalar_type() == at::kFloat;
    if (f32 && cf) rope_cache_attention_impl<float, float>(isa, qkv, cos, sin, k_cache, v_cache, pos, heads, sc, out);
    else if (f32) rope_cache_attention_impl<float, uint16_t>(isa, qkv, cos, sin, k_cache, v_cache, pos, heads, sc, out);
    else if (cf) rope_cache_attention_impl<uint16_t, float>(isa, qkv, cos, sin, k_cache, v_cache, pos, heads, sc, out);
    else rope_cache_attention_impl<uint16_t, uint16_t>(isa, qkv, cos, sin, k_cache, v_cache, pos, heads, sc, out);
    return out;
}

// ---- projections around the small ops, on GGUF-block weights (ember_kernels.cpp's ggml_mm) ----
// Each is the separate path's ops called in the same order on the same tensors (bit-identical):
// what it saves is the Python and dispatcher work between them, ~5 us a call, ~4 calls a layer.
at::Tensor quant_swiglu(const at::Tensor& x, const at::Tensor& w_gu, int64_t t_gu, int64_t n_gu, const at::Tensor& w_down,
                        int64_t t_down, int64_t n_down, int64_t mm_isa, int64_t isa) {
    const at::Tensor gu = ember_kernels::ggml_mm(x, w_gu, t_gu, n_gu, mm_isa);
    return ember_kernels::ggml_mm(silu_mul(gu, c10::nullopt, isa), w_down, t_down, n_down, mm_isa);
}

at::Tensor quant_rope_cache_attention(const at::Tensor& x, const at::Tensor& w_qkv, int64_t t_qkv, int64_t n_qkv,
                                      const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                                      int64_t pos, int64_t heads, double scale, const at::Tensor& w_o, int64_t t_o,
                                      int64_t n_o, int64_t mm_isa, int64_t isa) {
    const at::Tensor qkv = ember_kernels::ggml_mm(x, w_qkv, t_qkv, n_qkv, mm_isa);
    const at::Tensor o = rope_cache_attention(qkv, cos, sin, k_cache, v_cache, pos, heads, scale, isa);
    return ember_kernels::ggml_mm(o, w_o, t_o, n_o, mm_isa);
}

// A pre-norm Llama layer's decode token given its four projections as mm(i, x), i = 0 q/k/v, 1 o,
// 2 gate/up, 3 down: the separate ops in the same order on the same tensors.
template <class MM>
static std::tuple<at::Tensor, at::Tensor> decoder_layer_with(const MM& mm, const at::Tensor& x, const at::Tensor& pending,
                                                             const at::Tensor& w1, double eps1, const at::Tensor& cos,
                                                             const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                                                             int64_t pos, int64_t heads, double scale, const at::Tensor& w2,
                                                             double eps2, int64_t isa) {
    const auto a = add_rms_norm(x, pending, w1, eps1, isa);
    const at::Tensor o = rope_cache_attention(mm(0, std::get<1>(a)), cos, sin, k_cache, v_cache, pos, heads, scale, isa);
    const auto b = add_rms_norm(std::get<0>(a), mm(1, o), w2, eps2, isa);
    return {std::get<0>(b), mm(3, silu_mul(mm(2, std::get<1>(b)), c10::nullopt, isa))};
}

std::tuple<at::Tensor, at::Tensor> quant_decoder_layer(
        const at::Tensor& x, const at::Tensor& pending, const at::Tensor& w1, double eps1, const at::Tensor& w_qkv,
        int64_t t_qkv, int64_t n_qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
        int64_t pos, int64_t heads, double scale, const at::Tensor& w_o, int64_t t_o, int64_t n_o, const at::Tensor& w2,
        double eps2, const at::Tensor& w_gu, int64_t t_gu, int64_t n_gu, const at::Tensor& w_down, int64_t t_down,
        int64_t n_down, int64_t mm_isa, int64_t isa) {
    const at::Tensor* w[4] = {&w_qkv, &w_o, &w_gu, &w_down};
    const int64_t t[4] = {t_qkv, t_o, t_gu, t_down}, n[4] = {n_qkv, n_o, n_gu, n_down};
    auto mm = [&](int i, const at::Tensor& in) { return ember_kernels::ggml_mm(in, *w[i], t[i], n[i], mm_isa); };
    return decoder_layer_with(mm, x, pending, w1, eps1, cos, sin, k_cache, v_cache, pos, heads, scale, w2, eps2, isa);
}

// the same layer on bf16 weights [N, K] (ember_kernels.cpp's bf16_mm: the decode GEMV)
std::tuple<at::Tensor, at::Tensor> bf16_decoder_layer(
        const at::Tensor& x, const at::Tensor& pending, const at::Tensor& w1, double eps1, const at::Tensor& w_qkv,
        const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache, int64_t pos, int64_t heads,
        double scale, const at::Tensor& w_o, const at::Tensor& w2, double eps2, const at::Tensor& w_gu,
        const at::Tensor& w_down, int64_t isa) {
    TORCH_CHECK(w_qkv.size(0) == (heads + 2 * k_cache.size(1)) * k_cache.size(3) && w_gu.size(0) % 2 == 0 &&
                    w_down.size(1) == w_gu.size(0) / 2 && w_o.size(1) == heads * k_cache.size(3),
                "ember.bf16_decoder_layer: projection shapes ", w_qkv.sizes(), " ", w_o.sizes(), " ", w_gu.sizes(), " ",
                w_down.sizes(), " do not fit ", heads, " heads and a cache ", k_cache.sizes());
    const at::Tensor* w[4] = {&w_qkv, &w_o, &w_gu, &w_down};
    auto mm = [&](int i, const at::Tensor& in) { return ember_kernels::bf16_mm(in, *w[i], isa); };
    return decoder_layer_with(mm, x, pending, w1, eps1, cos, sin, k_cache, v_cache, pos, heads, scale, w2, eps2, isa);
}

}  // namespace ember_ops

TORCH_LIBRARY_FRAGMENT(ember, m) {
    m.def("quant_decoder_layer(Tensor x, Tensor pending, Tensor w1, float eps1, Tensor w_qkv, int t_qkv, int n_qkv, "
          "Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, int heads, float scale, Tensor w_o, "
          "int t_o, int n_o, Tensor w2, float eps2, Tensor w_gu, int t_gu, int n_gu, Tensor w_down, int t_down, "
          "int n_down, int mm_isa, int isa) -> (Tensor, Tensor)");
    m.def("bf16_decoder_layer(Tensor x, Tensor pending, Tensor w1, float eps1, Tensor w_qkv, Tensor cos, Tensor sin, "
          "Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, int heads, float scale, Tensor w_o, Tensor w2, float eps2, "
          "Tensor w_gu, Tensor w_down, int isa) -> (Tensor, Tensor)");
    m.def("quant_swiglu(Tensor x, Tensor w_gu, int t_gu, int n_gu, Tensor w_down, int t_down, int n_down, int mm_isa, "
          "int isa) -> Tensor");
    m.def("quant_rope_cache_attention(Tensor x, Tensor w_qkv, int t_qkv, int n_qkv, Tensor cos, Tensor sin, "
          "Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, int heads, float scale, Tensor w_o, int t_o, int n_o, "
          "int mm_isa, int isa) -> Tensor");
    m.def("rms_norm(Tensor x, Tensor weight, float eps, int isa) -> Tensor");
    m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps, int isa) -> (Tensor, Tensor)");
    m.def("silu_mul(Tensor gu, Tensor? up, int isa) -> Tensor");
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int isa) -> Tensor");
    m.def("rope_cache_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, "
          "int heads, float scale, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember, CPU, m) {
    m.impl("rms_norm", &ember_ops::rms_norm);
    m.impl("add_rms_norm", &ember_ops::add_rms_norm);
    m.impl("silu_mul", &ember_ops::silu_mul);
    m.impl("decode_attention", &ember_ops::decode_attention);
    m.impl("rope_cache_attention", &ember_ops::rope_cache_attention);
    m.impl("quant_swiglu", &ember_ops::quant_swiglu);
    m.impl("quant_rope_cache_attention", &ember_ops::quant_rope_cache_attention);
    m.impl("quant_decoder_layer", &ember_ops::quant_decoder_layer);
    m.impl("bf16_decoder_layer", &ember_ops::bf16_decoder_layer);
}
