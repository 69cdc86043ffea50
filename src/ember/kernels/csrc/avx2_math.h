// Shared AVX2 math, included inside a `#pragma GCC target("avx2,fma")` region by ops.cpp (softmax,
// SiLU) and int16_gemm.cpp (GELU's erf).
#pragma once
#include <immintrin.h>

#include <limits>

// exp of 8 floats: Cephes' polynomial on x - n ln2, times 2^n; below -87 (where exp underflows
// float's normal range) exactly 0, so that masked (-inf) scores give 0; above float's range +inf.
static inline __m256 exp256(__m256 a) {
    const __m256 x = _mm256_min_ps(_mm256_max_ps(a, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.3762626647949f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    y = _mm256_andnot_ps(_mm256_cmp_ps(a, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), y);
    // past float's range: +inf, as std::exp (so that silu(-100) is -0, not a tiny negative)
    return _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                            _mm256_cmp_ps(a, _mm256_set1_ps(88.7228394f), _CMP_GT_OQ));
}
