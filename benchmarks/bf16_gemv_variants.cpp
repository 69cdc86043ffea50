// The bf16 decode GEMV's AVX2 variants against the kernel in src/ember/kernels/csrc/bf16_gemv.h, over
// SmolLM2-135M's projection shapes (269 MB: 30 layers' q/k/v, o, gate/up, down, and the tied head),
// interleaved rounds, best of; weights in 4 KiB pages (anon, MADV_NOHUGEPAGE), transparent huge pages
// (huge) or a private file mapping (file, as a checkpoint's mmap). The study behind BENCHMARKS.md's
// "bf16 decode weights on transparent huge pages": no variant beat the present kernel; the pages did.
//
//   g++ -O3 -fopenmp -mavx2 -mfma benchmarks/bf16_gemv_variants.cpp -o /tmp/gv && /tmp/gv huge 20 2
//   (args: anon|huge|file, rounds, threads; `file` writes /tmp/gv_w.bin, 269 MB)
//
// v0: the present kernel (R rows a tile, 16 bf16 a step, the next tile prefetched at the same offset);
// v1: 32 bf16 (a cache line) per row a step, prefetch a fixed byte distance ahead (-1: none);
// v2: the present AVX-512 kernel, for reference.
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <vector>
#include <chrono>
#include <algorithm>
#include <string>
#include <fcntl.h>
#include <unistd.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
// v0: the present AVX2 kernel
template <int R>
__attribute__((target("avx2,fma"))) static void v0(const uint16_t* w, int64_t K, const float* xe, const float* xo, float* res, int pf) {
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k + 16 <= K; k += 16) {
        const __m256 ev = _mm256_loadu_ps(xe + k / 2), ov = _mm256_loadu_ps(xo + k / 2);
        for (int r = 0; r < R; ++r) {
            if ((k & 31) == 0) _mm_prefetch((const char*)(w + (R + r) * K + k), _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256((const __m256i*)(w + r * K + k));
            a0[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), ev, a0[r]);
            a1[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), ov, a1[r]);
        }
    }
    for (int r = 0; r < R; ++r) res[r] = hsum(_mm256_add_ps(a0[r], a1[r]));
}
// v1: 32 a step (full line per row), prefetch at byte distance pf ahead of each row's position (pf<0: none)
template <int R, int HINT>
__attribute__((target("avx2,fma"))) static void v1(const uint16_t* w, int64_t K, const float* xe, const float* xo, float* res, int pf) {
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    const int64_t pfe = pf / 2;
    for (int64_t k = 0; k + 32 <= K; k += 32) {
        const __m256 ev = _mm256_loadu_ps(xe + k / 2), ov = _mm256_loadu_ps(xo + k / 2);
        const __m256 ev2 = _mm256_loadu_ps(xe + k / 2 + 8), ov2 = _mm256_loadu_ps(xo + k / 2 + 8);
        for (int r = 0; r < R; ++r) {
            if (pf >= 0) _mm_prefetch((const char*)(w + r * K + k + pfe), (_mm_hint)HINT);
            const __m256i v = _mm256_loadu_si256((const __m256i*)(w + r * K + k));
            const __m256i u = _mm256_loadu_si256((const __m256i*)(w + r * K + k + 16));
            a0[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), ev, a0[r]);
            a1[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), ov, a1[r]);
            a0[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), ev2, a0[r]);
            a1[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(u, hi)), ov2, a1[r]);
        }
    }
    for (int r = 0; r < R; ++r) res[r] = hsum(_mm256_add_ps(a0[r], a1[r]));
}
// v2: the present AVX-512 kernel
template <int R>
__attribute__((target("avx2,fma,avx512f,avx512bw"))) static void v2(const uint16_t* w, int64_t K, const float* xe, const float* xo, float* res, int pf) {
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const __m512 ev = _mm512_loadu_ps(xe + k / 2), ov = _mm512_loadu_ps(xo + k / 2);
        for (int r = 0; r < R; ++r) {
            _mm_prefetch((const char*)(w + (R + r) * K + k), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(w + r * K + k);
            a0[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), ev, a0[r]);
            a1[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), ov, a1[r]);
        }
    }
    for (int r = 0; r < R; ++r) res[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
}
typedef void (*Fn)(const uint16_t*, int64_t, const float*, const float*, float*, int);
struct Var { std::string name; Fn f; int R; int pf; };

int main(int argc, char** argv) {
    const char* mode = argc > 1 ? argv[1] : "anon";  // anon | huge | file
    int rounds = argc > 2 ? atoi(argv[2]) : 8;
    int64_t shapes[5][2] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}, {49152, 576}};
    size_t tot = 0;
    for (int i = 0; i < 4; ++i) tot += 30 * shapes[i][0] * shapes[i][1] * 2;
    tot += shapes[4][0] * shapes[4][1] * 2;
    uint8_t* base;
    if (!strcmp(mode, "file")) {
        int fd = open("/tmp/gv_w.bin", O_RDWR | O_CREAT, 0644);
        if (ftruncate(fd, tot + 4096)) return 1;
        base = (uint8_t*)mmap(0, tot + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    } else {
        base = (uint8_t*)mmap(0, tot + (4 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        base = (uint8_t*)(((uintptr_t)base + (2 << 20) - 1) & ~((uintptr_t)(2 << 20) - 1));
        if (!strcmp(mode, "huge")) madvise(base, tot, MADV_HUGEPAGE); else madvise(base, tot, MADV_NOHUGEPAGE);
    }
    uint16_t* w = (uint16_t*)base;
    for (size_t i = 0; i < tot / 2; ++i) w[i] = 0x3f80 + (i * 7 % 64);
    std::vector<std::pair<const uint16_t*, int>> mats;
    size_t off = 0;
    for (int l = 0; l < 30; ++l) for (int i = 0; i < 4; ++i) { mats.push_back({w + off, i}); off += shapes[i][0] * shapes[i][1]; }
    mats.push_back({w + off, 4});
    std::vector<float> xe(1536, 0.01f), xo(1536, 0.02f), y(49152);
    std::vector<Var> vars;
    vars.push_back({"v0 cur R4", v0<4>, 4, 0});
    vars.push_back({"v0 cur R2", v0<2>, 2, 0});
    vars.push_back({"v0 cur R8", v0<8>, 8, 0});
    for (int pf : {-1, 1024, 2048, 4096, 8192})
        vars.push_back({"v1 R4 pf" + std::to_string(pf), v1<4, _MM_HINT_T0>, 4, pf});
    for (int pf : {-1, 2048})
        vars.push_back({"v1 R2 pf" + std::to_string(pf), v1<2, _MM_HINT_T0>, 2, pf});
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        vars.push_back({"v2 avx512 cur", v2<4>, 4, 0});
    std::vector<double> best(vars.size(), 1e9);
    omp_set_num_threads(argc > 3 ? atoi(argv[3]) : 2);
    for (int rd = 0; rd < rounds; ++rd) {
        for (size_t v = 0; v < vars.size(); ++v) {
            const Var& V = vars[v];
            auto t0 = std::chrono::steady_clock::now();
            for (auto& m : mats) {
                const int64_t N = shapes[m.second][0], K = shapes[m.second][1];
                const int64_t tiles = N / V.R;
#pragma omp parallel
                {
                    int t = omp_get_thread_num(), nt = omp_get_num_threads();
                    int64_t c = (tiles + nt - 1) / nt, a = t * c, b = std::min(tiles, a + c);
                    for (int64_t i = a; i < b; ++i) V.f(m.first + i * V.R * K, K, xe.data(), xo.data(), y.data() + i * V.R, V.pf);
                }
            }
            double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            best[v] = std::min(best[v], s);
        }
    }
    for (size_t v = 0; v < vars.size(); ++v)
        printf("%-22s %6.2f ms %5.1f GB/s\n", vars[v].name.c_str(), best[v] * 1e3, tot / best[v] / 1e9);
    return 0;
}
