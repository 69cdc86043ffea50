// bf16-weight GEMV for decode rows: y[m, n] = sum_k x[m, k] * w[n, k], w bf16 [N, K] row-major (as
// a checkpoint stores it), float32 sums. Included once by ember_kernels.cpp inside namespace
// ember_kernels; each ISA's code sits in its own `#pragma GCC target` region:
//   avx2        16 bf16 a step: a 32-bit lane of w (two bf16) widens with one shift (even k) and one
//               mask (odd k), against x de-interleaved into float even/odd halves (xe, xo): no shuffles.
//   avx512      the same on 512-bit vectors (32 bf16 a step).
//   avx512_bf16 vdpbf16ps on w and x as bf16 (x already bf16: a bf16 model's activations), 32 a step.
// Tiles of 4 weight rows share each x load; the next tile's rows are prefetched at the same offset
// (a thread streams its rows [n0, n1) front to back). The K tail (K % 16 or 32) is zero-padded.
// Results: res[r] for the tile's rows, written by the caller (float32 or rounded to bf16).

static constexpr int kGemvRows = 4;  // weight rows per tile

#if EMBER_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace gemv_avx2 {
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// R rows at w (row stride K) . one x row given as padded even/odd float halves -> res[R]
template <int R>
static inline void dot_rows(const uint16_t* w, int64_t K, const float* xe, const float* xo, float* res) {
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256 ev = _mm256_loadu_ps(xe + k / 2), ov = _mm256_loadu_ps(xo + k / 2);
        for (int r = 0; r < R; ++r) {
            if ((k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * K + k), _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
            a0[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), ev, a0[r]);
            a1[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), ov, a1[r]);
        }
    }
    if (k < K) {  // tail: the row's last K - k values, zero-padded (xe/xo are padded with zeros too)
        alignas(32) uint16_t buf[16];
        const __m256 ev = _mm256_loadu_ps(xe + k / 2), ov = _mm256_loadu_ps(xo + k / 2);
        for (int r = 0; r < R; ++r) {
            std::memset(buf, 0, sizeof(buf));
            std::memcpy(buf, w + r * K + k, (K - k) * sizeof(uint16_t));
            const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
            a0[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), ev, a0[r]);
            a1[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), ov, a1[r]);
        }
    }
    for (int r = 0; r < R; ++r) res[r] = hsum(_mm256_add_ps(a0[r], a1[r]));
}
}  // namespace gemv_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
namespace gemv_avx512 {
template <int R>
static inline void dot_rows(const uint16_t* w, int64_t K, const float* xe, const float* xo, float* res) {
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (K - k)) - 1);
        const __m512 ev = _mm512_loadu_ps(xe + k / 2), ov = _mm512_loadu_ps(xo + k / 2);
        for (int r = 0; r < R; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * K + k), _MM_HINT_T0);
            const __m512i v = _mm512_maskz_loadu_epi16(m, w + r * K + k);
            a0[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), ev, a0[r]);
            a1[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), ov, a1[r]);
        }
    }
    for (int r = 0; r < R; ++r) res[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
}
}  // namespace gemv_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
namespace gemv_avx512bf16 {
// R rows at w . one bf16 x row (x padded with zeros to a multiple of 32) -> res[R]
template <int R>
static inline void dot_rows(const uint16_t* w, int64_t K, const uint16_t* x, float* res) {
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (K - k)) - 1);
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
        for (int r = 0; r < R; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * K + k), _MM_HINT_T0);
            a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * K + k), xv);
        }
    }
    for (int r = 0; r < R; ++r) res[r] = _mm512_reduce_add_ps(a[r]);
}
}  // namespace gemv_avx512bf16
#pragma GCC pop_options
#endif

static bool cpu_has_avx512bf16() {
#if EMBER_X86
    static const bool yes = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512bf16") != 0;
    }();
    return yes;
#else
    return false;
#endif
}

// R rows at w . one x row, portable: float x (xf, unpadded)
template <int R>
static inline void dot_rows_scalar(const uint16_t* w, int64_t K, const float* xf, float* res) {
    for (int r = 0; r < R; ++r) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t k = 0;
        for (; k + 8 <= K; k += 8)
            for (int j = 0; j < 8; ++j) {
                const uint32_t bits = static_cast<uint32_t>(w[r * K + k + j]) << 16;
                float wf;
                std::memcpy(&wf, &bits, 4);
                acc[j] += wf * xf[k + j];
            }
        float s = 0;
        for (; k < K; ++k) {
            const uint32_t bits = static_cast<uint32_t>(w[r * K + k]) << 16;
            float wf;
            std::memcpy(&wf, &bits, 4);
            s += wf * xf[k];
        }
        res[r] = s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
}

static inline uint16_t gemv_f32_to_bf16(float f) {  // round to nearest even, as c10::BFloat16
    if (f != f) return 0x7FC0;
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>((u + (((u >> 16) & 1) + 0x7FFF)) >> 16);
}

// The kernel paths by isa id (0 generic, 1 avx2, 2 avx512, >= 3 with AVX512-BF16 where the CPU has
// it: vdpbf16ps on bf16 x).
enum class GemvPath { scalar, avx2, avx512, avx512bf16 };

static GemvPath gemv_path(int64_t isa, bool x_bf16) {
#if EMBER_X86
    if (isa >= 3 && x_bf16 && cpu_has_avx512bf16()) return GemvPath::avx512bf16;
    if (isa >= 2) return GemvPath::avx512;
    if (isa >= 1) return GemvPath::avx2;
#endif
    return GemvPath::scalar;
}

// y [M, N] (float32 or bf16, ldy = N) = x [M, K] (float32 or bf16, contiguous) . w^T, threads splitting N
static void bf16_gemv(const uint16_t* w, int64_t N, int64_t K, const void* x, bool x_bf16, int64_t M, void* y, bool y_bf16,
                      int64_t isa) {
    const GemvPath path = gemv_path(isa, x_bf16);
    // the activations in the form the path reads: padded even/odd float halves, padded bf16, or float
    const int64_t kp = (K + 31) / 32 * 32;
    std::vector<float> xe, xo, xf;
    std::vector<uint16_t> xb;
    auto xval = [&](int64_t m, int64_t k) {
        if (!x_bf16) return static_cast<const float*>(x)[m * K + k];
        const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(x)[m * K + k]) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    };
    if (path == GemvPath::avx2 || path == GemvPath::avx512) {
        xe.assign(M * kp / 2, 0.0f);
        xo.assign(M * kp / 2, 0.0f);
        for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < K; ++k) ((k & 1) ? xo : xe)[m * kp / 2 + k / 2] = xval(m, k);
    } else if (path == GemvPath::avx512bf16) {
        xb.assign(M * kp, 0);
        for (int64_t m = 0; m < M; ++m)
            std::memcpy(xb.data() + m * kp, static_cast<const uint16_t*>(x) + m * K, K * sizeof(uint16_t));
    } else {
        xf.resize(M * K);
        for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < K; ++k) xf[m * K + k] = xval(m, k);
    }
    auto put = [&](int64_t m, int64_t n, float v) {
        if (y_bf16) static_cast<uint16_t*>(y)[m * N + n] = gemv_f32_to_bf16(v);
        else static_cast<float*>(y)[m * N + n] = v;
    };
    auto tile = [&](int64_t n, int rows) {
        float res[kGemvRows];
        const uint16_t* wr = w + n * K;
        for (int64_t m = 0; m < M; ++m) {
            switch (path) {
#if EMBER_X86
                case GemvPath::avx2:
                    if (rows == kGemvRows) gemv_avx2::dot_rows<kGemvRows>(wr, K, xe.data() + m * kp / 2, xo.data() + m * kp / 2, res);
                    else for (int r = 0; r < rows; ++r) gemv_avx2::dot_rows<1>(wr + r * K, K, xe.data() + m * kp / 2, xo.data() + m * kp / 2, res + r);
                    break;
                case GemvPath::avx512:
                    if (rows == kGemvRows) gemv_avx512::dot_rows<kGemvRows>(wr, K, xe.data() + m * kp / 2, xo.data() + m * kp / 2, res);
                    else for (int r = 0; r < rows; ++r) gemv_avx512::dot_rows<1>(wr + r * K, K, xe.data() + m * kp / 2, xo.data() + m * kp / 2, res + r);
                    break;
                case GemvPath::avx512bf16:
                    if (rows == kGemvRows) gemv_avx512bf16::dot_rows<kGemvRows>(wr, K, xb.data() + m * kp, res);
                    else for (int r = 0; r < rows; ++r) gemv_avx512bf16::dot_rows<1>(wr + r * K, K, xb.data() + m * kp, res + r);
                    break;
#endif
                default:
                    for (int r = 0; r < rows; ++r) dot_rows_scalar<1>(wr + r * K, K, xf.data() + m * K, res + r);
                    break;
            }
            for (int r = 0; r < rows; ++r) put(m, n + r, res[r]);
        }
    };
    // tasks of whole tiles, ~32 KiB of weights each at least; one thread takes a contiguous run of rows
    const int64_t tiles = (N + kGemvRows - 1) / kGemvRows;
    const int64_t grain = std::max<int64_t>(1, 32768 / (2 * K * kGemvRows));
    auto run = [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t n = t * kGemvRows;
            tile(n, static_cast<int>(std::min<int64_t>(kGemvRows, N - n)));
        }
    };
    if (tiles <= grain || at::in_parallel_region()) run(0, tiles);
    else at::parallel_for(0, tiles, grain, run);
}
