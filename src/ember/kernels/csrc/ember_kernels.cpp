// ember native CPU kernels: GEMV/GEMM with weights kept as raw ggml blocks.
//
// One translation unit. The x86 kernels (x86_impl.h) are compiled three times under different
// `#pragma GCC target` regions (avx2 / avx512 / avx512+vnni) and picked at run time; a portable
// scalar path (dequantise a weight row to float, then float dots) serves every other CPU.
//
// Ops (namespace `ember`):
//   ggml_mm(Tensor x, Tensor w, int ggml_type, int out_features, int isa) -> Tensor
//       x: [..., K] float32 or bfloat16 (the leading dims are the M rows); w: uint8 [N, row_bytes],
//       the raw blocks of each output row; returns [..., N] in x's dtype. isa: 0 generic, 1 avx2, 2 avx512,
//       3 avx512_vnni (clamped to what this CPU supports).
//   bf16_mm(Tensor x, Tensor w, int isa) -> Tensor
//       x: [..., K] float32 or bfloat16; w: bfloat16 [N, K]; [..., N] in x's dtype (float32 sums; isa 3
//       on a CPU with AVX512-BF16 and a bf16 x: vdpbf16ps). A GEMV: meant for a few rows (decode).
//   cpu_isa() -> int      the best isa id this CPU (and OS) supports.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define EMBER_X86 1
#include <immintrin.h>
#else
#define EMBER_X86 0
#endif

namespace ember_kernels {

struct Ctx {
    const uint8_t* w;     // weight blocks, row n at w + n * row_bytes
    int64_t row_bytes, N, K, M;
    const void* x;        // activations [M, ldx] (float or bf16)
    int64_t ldx;
    bool x_bf16, kquant;
    int8_t* aq;           // quantised activations [M, K]
    float* ad;            // per-block activation scales [M, nd]
    float* ads;           // unused (32-blocks keep d * sum(q) interleaved in ad: [M, nd, 2])
    int16_t* abs;         // 256-blocks: sums of 16 [M, K/16]
    int64_t nd;
    float* out;           // [M, N] float32
};
using RowsFn = void (*)(const Ctx&, int64_t, int64_t);
using QuantFn = void (*)(const Ctx&, int64_t, int64_t);

// ---------------------------------------------------------------------------------------------
// Portable path: dequantise one weight row to float (the ggml reference formulas).
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; --exp; }
            man &= 0x3FF;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
static inline float rd16(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return f16_to_f32(h);
}
static inline void k_scale_min(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static void dequant_row(int64_t type, const uint8_t* b, int64_t K, float* y) {
    switch (type) {
        case 2:  // Q4_0
            for (int64_t i = 0; i < K / 32; ++i, b += 18, y += 32) {
                const float d = rd16(b);
                for (int j = 0; j < 16; ++j) {
                    y[j] = ((b[2 + j] & 0xF) - 8) * d;
                    y[j + 16] = ((b[2 + j] >> 4) - 8) * d;
                }
            }
            break;
        case 3:  // Q4_1
            for (int64_t i = 0; i < K / 32; ++i, b += 20, y += 32) {
                const float d = rd16(b), m = rd16(b + 2);
                for (int j = 0; j < 16; ++j) {
                    y[j] = (b[4 + j] & 0xF) * d + m;
                    y[j + 16] = (b[4 + j] >> 4) * d + m;
                }
            }
            break;
        case 6:  // Q5_0
        case 7:  // Q5_1
            for (int64_t i = 0; i < K / 32; ++i, y += 32) {
                const bool one = type == 7;
                const float d = rd16(b), m = one ? rd16(b + 2) : 0.0f;
                const uint8_t* qhp = b + (one ? 4 : 2);
                const uint8_t* qs = qhp + 4;
                uint32_t qh;
                std::memcpy(&qh, qhp, 4);
                for (int j = 0; j < 16; ++j) {
                    const int x0 = (qs[j] & 0xF) | (((qh >> j) & 1) << 4);
                    const int x1 = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
                    y[j] = one ? x0 * d + m : (x0 - 16) * d;
                    y[j + 16] = one ? x1 * d + m : (x1 - 16) * d;
                }
                b += one ? 24 : 22;
            }
            break;
        case 8:  // Q8_0
            for (int64_t i = 0; i < K / 32; ++i, b += 34, y += 32) {
                const float d = rd16(b);
                for (int j = 0; j < 32; ++j) y[j] = static_cast<int8_t>(b[2 + j]) * d;
            }
            break;
        case 12:  // Q4_K
        case 13:  // Q5_K
            for (int64_t i = 0; i < K / 256; ++i) {
                const bool five = type == 13;
                const float d = rd16(b), dmin = rd16(b + 2);
                const uint8_t* sc = b + 4;
                const uint8_t* qh = b + 16;
                const uint8_t* qs = b + (five ? 48 : 16);
                for (int s = 0; s < 8; ++s) {
                    uint8_t scv, mv;
                    k_scale_min(s, sc, &scv, &mv);
                    const float d1 = d * scv, m1 = dmin * mv;
                    for (int l = 0; l < 32; ++l) {
                        int q = (s & 1) ? (qs[32 * (s / 2) + l] >> 4) : (qs[32 * (s / 2) + l] & 0xF);
                        if (five) q |= ((qh[l] >> s) & 1) << 4;
                        y[32 * s + l] = d1 * q - m1;
                    }
                }
                b += five ? 176 : 144;
                y += 256;
            }
            break;
        case 14:  // Q6_K
            for (int64_t i = 0; i < K / 256; ++i, b += 210) {
                const float d = rd16(b + 208);
                const uint8_t* ql = b;
                const uint8_t* qh = b + 128;
                const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
                for (int n = 0; n < 2; ++n) {
                    for (int l = 0; l < 32; ++l) {
                        const int is = l / 16;
                        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                        y[l] = d * sc[is + 0] * q1;
                        y[l + 32] = d * sc[is + 2] * q2;
                        y[l + 64] = d * sc[is + 4] * q3;
                        y[l + 96] = d * sc[is + 6] * q4;
                    }
                    y += 128;
                    ql += 64;
                    qh += 32;
                    sc += 8;
                }
            }
            break;
        default:
            TORCH_CHECK(false, "ember: no kernel for ggml type ", type);
    }
}

static void generic_rows(const Ctx& c, int64_t type, int64_t n0, int64_t n1) {
    std::vector<float> wrow(c.K), xrow(c.K);
    for (int64_t n = n0; n < n1; ++n) {
        dequant_row(type, c.w + n * c.row_bytes, c.K, wrow.data());
        for (int64_t m = 0; m < c.M; ++m) {
            const float* xf;
            if (c.x_bf16) {
                const uint16_t* xs = static_cast<const uint16_t*>(c.x) + m * c.ldx;
                for (int64_t k = 0; k < c.K; ++k) {
                    const uint32_t bits = static_cast<uint32_t>(xs[k]) << 16;
                    std::memcpy(&xrow[k], &bits, 4);
                }
                xf = xrow.data();
            } else {
                xf = static_cast<const float*>(c.x) + m * c.ldx;
            }
            // 8 partial sums: vectorisable, and closer to a float32 GEMM's summation order
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t k = 0;
            for (; k + 8 <= c.K; k += 8)
                for (int j = 0; j < 8; ++j) acc[j] += wrow[k + j] * xf[k + j];
            float s = 0;
            for (; k < c.K; ++k) s += wrow[k] * xf[k];
            c.out[m * c.N + n] = s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
#if EMBER_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
namespace avx2 {
#define EMBER_VNNI 0
#define EMBER_MR 4
#include "x86_impl.h"
#undef EMBER_MR
#undef EMBER_VNNI
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq")
namespace avx512 {
#define EMBER_VNNI 0
#define EMBER_MR 8
#include "x86_impl.h"
#undef EMBER_MR
#undef EMBER_VNNI
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
namespace vnni {
#define EMBER_VNNI 1
#define EMBER_MR 8
#include "x86_impl.h"
#undef EMBER_MR
#undef EMBER_VNNI
}  // namespace vnni
#pragma GCC pop_options
#endif

static int64_t detect_isa() {
#if EMBER_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
        return 1;
    if (!__builtin_cpu_supports("avx512vnni")) return 2;
    return 3;
#else
    return 0;
#endif
}

static int64_t cpu_isa() {
    static const int64_t isa = detect_isa();
    return isa;
}

#include "bf16_gemv.h"

static int64_t block_elems(int64_t type) {
    switch (type) {
        case 2: case 3: case 6: case 7: case 8: return 32;
        case 12: case 13: case 14: return 256;
        default: return 0;
    }
}
static int64_t block_bytes(int64_t type) {
    switch (type) {
        case 2: return 18;
        case 3: return 20;
        case 6: return 22;
        case 7: return 24;
        case 8: return 34;
        case 12: return 144;
        case 13: return 176;
        case 14: return 210;
        default: return 0;
    }
}

// activations of up to this many values (M * K) are quantised into a per-thread scratch
static constexpr int64_t kScratchValues = 1 << 16;

template <class T>
static T* grow(std::vector<T>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
}

// from this many activation rows on, the K-quants take the VNNI GEMM (below it, the GEMV tiles)
static constexpr int64_t kTiledMinRows = 16;

at::Tensor ggml_mm(const at::Tensor& x_in, const at::Tensor& w, int64_t type, int64_t out_features, int64_t isa) {
    TORCH_CHECK(x_in.dim() >= 1 && x_in.device().is_cpu(), "ember.ggml_mm: x must be a CPU tensor of at least 1 dimension");
    TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "ember.ggml_mm: x must be float32 or bfloat16");
    TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu(), "ember.ggml_mm: w must be contiguous uint8 on CPU");
    const int64_t be = block_elems(type), bb = block_bytes(type);
    TORCH_CHECK(be > 0, "ember.ggml_mm: unsupported ggml type ", type);
    // x [..., K] -> out [..., N]: the leading dims are rows (a decode step's [1, 1, K] needs no reshape)
    const at::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
    const int64_t K = x.size(-1), N = out_features;
    c10::SmallVector<int64_t, 6> out_sizes(x.sizes().begin(), x.sizes().end());
    out_sizes.back() = N;
    int64_t M = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
    TORCH_CHECK(K % be == 0, "ember.ggml_mm: K=", K, " is not a multiple of the block size ", be);
    const int64_t row_bytes = K / be * bb;
    TORCH_CHECK(w.numel() == N * row_bytes, "ember.ggml_mm: w has ", w.numel(), " bytes, expected ", N, "x", row_bytes);
    at::Tensor out = at::empty(out_sizes, x.options().dtype(at::kFloat));
    if (M == 0 || N == 0) return out.to(x.scalar_type());
    if (K == 0) return out.zero_().to(x.scalar_type());

    Ctx c{};
    c.w = w.data_ptr<uint8_t>();
    c.row_bytes = row_bytes;
    c.N = N;
    c.K = K;
    c.M = M;
    c.x = x.data_ptr();
    c.ldx = K;
    c.x_bf16 = x.scalar_type() == at::kBFloat16;
    c.kquant = be == 256;
    c.out = out.data_ptr<float>();
    isa = std::min(isa, cpu_isa());

    if (isa <= 0) {
        at::Tensor xf;
        if (c.x_bf16) {  // convert once, not per weight row
            xf = x.to(at::kFloat);
            c.x = xf.data_ptr();
            c.x_bf16 = false;
        }
        // a task per ~64 rows for GEMV; fewer rows per task when each row is dotted many times
        const int64_t grain = std::max<int64_t>(1, 64 / std::max<int64_t>(1, M));
        at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { generic_rows(c, type, n0, n1); });
        return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
    }
#if EMBER_X86
    RowsFn rows = nullptr;
    QuantFn quant = nullptr;
    if (isa == 1) { rows = avx2::rows_fn(type); quant = avx2::quantize_rows; }
    else if (isa == 2) { rows = avx512::rows_fn(type); quant = avx512::quantize_rows; }
    else { rows = vnni::rows_fn(type); quant = vnni::quantize_rows; }
    c.nd = K / be;
    // the activations' int8 form: decode rows use this thread's scratch (kept between calls: ~120
    // calls a token, each would otherwise malloc and zero it), larger inputs their own buffers
    const bool small = M * K <= kScratchValues;
    static thread_local std::vector<int8_t> tl_aq;
    static thread_local std::vector<float> tl_ad;
    static thread_local std::vector<int16_t> tl_abs;
    std::vector<int8_t> own_aq;
    std::vector<float> own_ad;
    std::vector<int16_t> own_abs;
    c.aq = grow(small ? tl_aq : own_aq, M * K);
    c.ad = grow(small ? tl_ad : own_ad, M * c.nd * (c.kquant ? 1 : 2));  // 32-blocks: (d, d * sum) pairs
    c.ads = nullptr;
    c.abs = c.kquant ? grow(small ? tl_abs : own_abs, M * (K / 16)) : nullptr;
    if (M == 1) quant(c, 0, 1);
    else at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) { quant(c, m0, m1); });
    if (isa >= 3 && c.kquant && M >= kTiledMinRows) {
        // prefill: VNNI GEMM on transposed activations (see x86_impl.h, gemm_kquant_rows)
        const int64_t MG = (M + 15) / 16;
        std::vector<int8_t> vq(MG * 16 * K);
        std::vector<int32_t> vbs(MG * 16 * (K / 16));
        std::vector<float> vd(MG * 16 * (K / 256));
        at::parallel_for(0, MG, 1, [&](int64_t g0, int64_t g1) { vnni::build_actv(c, g0, g1, vq.data(), vbs.data(), vd.data()); });
        const vnni::ActV A{K, MG, vq.data(), vbs.data(), vd.data()};
        at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t t0, int64_t t1) {
            vnni::gemm_kquant_rows(c, A, type, 32 * t0, std::min(N, 32 * t1));
        });
        return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
    }
    if (isa <= 2 && c.kquant && M >= kTiledMinRows) {
        // prefill without VNNI: K-quant weight tiles unpacked once (x86_impl.h, gemm_kquant_rows_a)
        at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t t0, int64_t t1) {
            if (isa == 1) avx2::gemm_kquant_rows_a(c, type, 16 * t0, std::min(N, 16 * t1));
            else avx512::gemm_kquant_rows_a(c, type, 16 * t0, std::min(N, 16 * t1));
        });
        return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
    }
    if (isa >= 3 && !c.kquant && M >= kTiledMinRows) {
        const int64_t MG = (M + 15) / 16;
        std::vector<int8_t> vq(MG * 16 * K);
        std::vector<float> vd(MG * 16 * (K / 32)), vds(MG * 16 * (K / 32));
        at::parallel_for(0, MG, 1, [&](int64_t g0, int64_t g1) { vnni::build_actv32(c, g0, g1, vq.data(), vd.data(), vds.data()); });
        const vnni::ActV32 A{K, MG, vq.data(), vd.data(), vds.data()};
        at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t t0, int64_t t1) {
            vnni::gemm_q32_rows(c, A, type, 32 * t0, std::min(N, 32 * t1));
        });
        return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
    }
    // GEMV: ~32 KiB of weights a task at least; GEMM: split N only (each task runs all M rows)
    const int64_t grain = M == 1 ? std::max<int64_t>(1, 32768 / row_bytes) : 16;
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows(c, n0, n1); });
#endif
    return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// y = x @ w^T with w bf16 [N, K]: float32 accumulation, x float32 or bf16 [..., K]; for small M
// (decode), where it streams w at memory bandwidth (bf16_gemv.h).
at::Tensor bf16_mm(const at::Tensor& x_in, const at::Tensor& w, int64_t isa) {
    TORCH_CHECK(x_in.dim() >= 1 && x_in.device().is_cpu(), "ember.bf16_mm: x must be a CPU tensor of at least 1 dimension");
    TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "ember.bf16_mm: x must be float32 or bfloat16");
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.device().is_cpu(),
                "ember.bf16_mm: w must be a contiguous 2-D bfloat16 CPU tensor");
    const at::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
    const int64_t K = x.size(-1), N = w.size(0);
    TORCH_CHECK(w.size(1) == K, "ember.bf16_mm: x has K=", K, " but w has ", w.size(1));
    c10::SmallVector<int64_t, 6> out_sizes(x.sizes().begin(), x.sizes().end());
    out_sizes.back() = N;
    at::Tensor out = at::empty(out_sizes, x.options());
    const int64_t M = K ? x.numel() / K : 0;
    if (N == 0 || (M == 0 && K != 0)) return out;
    if (K == 0) return out.zero_();
    const bool xb = x.scalar_type() == at::kBFloat16;
    bf16_gemv(static_cast<const uint16_t*>(w.data_ptr()), N, K, x.data_ptr(), xb, M, out.data_ptr(), xb,
              std::min(isa, cpu_isa()));
    return out;
}

int64_t cpu_isa_op() { return cpu_isa(); }

}  // namespace ember_kernels

// a fragment, so other code may define ops in the `ember` namespace too
TORCH_LIBRARY_FRAGMENT(ember, m) {
    m.def("ggml_mm(Tensor x, Tensor w, int ggml_type, int out_features, int isa) -> Tensor");
    m.def("bf16_mm(Tensor x, Tensor w, int isa) -> Tensor");
    m.def("cpu_isa() -> int", &ember_kernels::cpu_isa_op);
}

TORCH_LIBRARY_IMPL(ember, CPU, m) {
    m.impl("ggml_mm", &ember_kernels::ggml_mm);
    m.impl("bf16_mm", &ember_kernels::bf16_mm);
}
