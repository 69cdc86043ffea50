// Row kernels of the small fused ops (ops.cpp): RMSNorm, residual add + RMSNorm, SiLU * up, and
// single-query attention. Included once per ISA by ops.cpp, inside `namespace <isa> { ... }` after
// that namespace defined the vector type `V` (W float lanes) and its helpers:
//   V vzero(); V vset(float); V vld(const float*); V vld(const uint16_t* bf16); void vst(float*, V);
//   void vst(uint16_t* bf16, V) (round to nearest even); V vadd/vsub/vmul/vmax/vfma(a, b, c) (a*b+c);
//   V vdiv(a, b); V vexp(V); float vsum(V); float vmax_all(V); V vround_bf16(V) (to bf16 and back)
// Scalar tails use the same formulas one float at a time (W = 1 makes the whole kernel scalar).

static inline float ld1(const float* p) { return *p; }
static inline float ld1(const uint16_t* p) { return bf16_to_f32(*p); }
static inline void st1(float* p, float v) { *p = v; }
static inline void st1(uint16_t* p, float v) { *p = f32_to_bf16(v); }

// sum of squares of x[0..D) in float32 (W lanes, then 4 independent accumulators)
template <class T>
static inline float sumsq(const T* x, int64_t D) {
    V a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int64_t i = 0;
    for (; i + 4 * W <= D; i += 4 * W) {
        V x0 = vld(x + i), x1 = vld(x + i + W), x2 = vld(x + i + 2 * W), x3 = vld(x + i + 3 * W);
        a0 = vfma(x0, x0, a0);
        a1 = vfma(x1, x1, a1);
        a2 = vfma(x2, x2, a2);
        a3 = vfma(x3, x3, a3);
    }
    for (; i + W <= D; i += W) {
        V x0 = vld(x + i);
        a0 = vfma(x0, x0, a0);
    }
    float s = vsum(vadd(vadd(a0, a1), vadd(a2, a3)));
    for (; i < D; ++i) {
        const float v = ld1(x + i);
        s += v * v;
    }
    return s;
}

// y = rmsnorm(x) * w. XB: x (and the normalised value) bf16: h = bf16(x * inv), y = h * w rounded
// to y's type (the product of two bf16 values is exact in float32, so this is torch's bf16 multiply).
// Float32 x: y = (x * inv) * w in float32.
template <class TX, class TW, class TY>
static void rms_row(const TX* x, const TW* w, TY* y, int64_t D, float eps) {
    const float inv = 1.0f / std::sqrt(sumsq(x, D) / static_cast<float>(D) + eps);
    constexpr bool XB = std::is_same<TX, uint16_t>::value;
    const V vi = vset(inv);
    int64_t i = 0;
    for (; i + W <= D; i += W) {
        V h = vmul(vld(x + i), vi);
        if (XB) h = vround_bf16(h);
        vst(y + i, vmul(h, vld(w + i)));
    }
    for (; i < D; ++i) {
        float h = ld1(x + i) * inv;
        if (XB) h = bf16_to_f32(f32_to_bf16(h));
        st1(y + i, h * ld1(w + i));
    }
}

// s = x + d (rounded to s's type), then y = rmsnorm(s) * w
template <class TX, class TW, class TY>
static void add_rms_row(const TX* x, const TX* d, TX* s, const TW* w, TY* y, int64_t D, float eps) {
    int64_t i = 0;
    for (; i + W <= D; i += W) vst(s + i, vadd(vld(x + i), vld(d + i)));
    for (; i < D; ++i) st1(s + i, ld1(x + i) + ld1(d + i));
    rms_row<TX, TW, TY>(s, w, y, D, eps);
}

// y = silu(g) * u, silu(g) = g / (1 + exp(-g)); bf16: silu rounded to bf16 before the product
template <class T>
static void silu_mul_row(const T* g, const T* u, T* y, int64_t F) {
    constexpr bool B16 = std::is_same<T, uint16_t>::value;
    const V one = vset(1.0f), zero = vzero();
    int64_t i = 0;
    for (; i + W <= F; i += W) {
        const V gv = vld(g + i);
        V s = vdiv(gv, vadd(one, vexp(vsub(zero, gv))));
        if (B16) s = vround_bf16(s);
        vst(y + i, vmul(s, vld(u + i)));
    }
    for (; i < F; ++i) {
        const float gv = ld1(g + i);
        float s = gv / (1.0f + std::exp(-gv));
        if (B16) s = bf16_to_f32(f32_to_bf16(s));
        st1(y + i, s * ld1(u + i));
    }
}

static inline float dot_f(const float* a, const float* b, int64_t D) {
    V acc0 = vzero(), acc1 = vzero();
    int64_t i = 0;
    for (; i + 2 * W <= D; i += 2 * W) {
        acc0 = vfma(vld(a + i), vld(b + i), acc0);
        acc1 = vfma(vld(a + i + W), vld(b + i + W), acc1);
    }
    for (; i + W <= D; i += W) acc0 = vfma(vld(a + i), vld(b + i), acc0);
    float s = vsum(vadd(acc0, acc1));
    for (; i < D; ++i) s += a[i] * b[i];
    return s;
}

// acc[0..D) += p * x[0..D)
template <class T>
static inline void axpy(float* acc, float p, const T* x, int64_t D) {
    const V pv = vset(p);
    int64_t i = 0;
    for (; i + W <= D; i += W) vst(acc + i, vfma(pv, vld(x + i), vld(acc + i)));
    for (; i < D; ++i) acc[i] += p * ld1(x + i);
}

template <class T>
static inline void widen(const T* x, float* y, int64_t D) {
    int64_t i = 0;
    for (; i + W <= D; i += W) vst(y + i, vld(x + i));
    for (; i < D; ++i) y[i] = ld1(x + i);
}

// One query group (G query heads sharing one KV head) over keys [j0, j1): the partial softmax state
// per head: m (max score), l (sum of exp(score - m)), acc[D] (sum of exp(score - m) * v).
// q: G rows of D floats (already widened, scale folded in); k/v rows at k + j * sk.
// mask: per key, kind 0 none, 1 bool (0 = masked), 2 additive float, 3 additive bf16.
template <class T>
static void attend_part(const float* q, int64_t G, int64_t D, const T* k, const T* v, int64_t sk, int64_t sv,
                        int64_t j0, int64_t j1, const void* mask, int64_t smask, int mkind, float* scores,
                        float* kbuf, float* m_out, float* l_out, float* acc) {
    const int64_t n = j1 - j0;
    constexpr float NEG = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
        const int64_t jj = j0 + j;
        float add = 0.0f;
        if (mkind == 1) {
            if (!static_cast<const bool*>(mask)[jj * smask]) {
                for (int64_t g = 0; g < G; ++g) scores[g * n + j] = NEG;
                continue;
            }
        } else if (mkind == 2) {
            add = static_cast<const float*>(mask)[jj * smask];
        } else if (mkind == 3) {
            add = bf16_to_f32(static_cast<const uint16_t*>(mask)[jj * smask]);
        }
        const float* kr;
        if (std::is_same<T, float>::value) {
            kr = reinterpret_cast<const float*>(k + jj * sk);
        } else {
            widen(k + jj * sk, kbuf, D);
            kr = kbuf;
        }
        for (int64_t g = 0; g < G; ++g) scores[g * n + j] = dot_f(q + g * D, kr, D) + add;
    }
    for (int64_t g = 0; g < G; ++g) {
        float* s = scores + g * n;
        float m = NEG;
        for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
        m_out[g] = m;
        float* a = acc + g * D;
        std::fill(a, a + D, 0.0f);
        if (m == NEG) {  // every key of this part masked
            l_out[g] = 0.0f;
            for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
            continue;
        }
        const V mv = vset(m);
        float l = 0.0f;
        int64_t j = 0;
        V lv = vzero();
        for (; j + W <= n; j += W) {
            const V e = vexp(vsub(vld(s + j), mv));
            vst(s + j, e);
            lv = vadd(lv, e);
        }
        l = vsum(lv);
        for (; j < n; ++j) {
            s[j] = std::exp(s[j] - m);
            l += s[j];
        }
        l_out[g] = l;
    }
    // acc[g] += p[g][j] * v_j, each value row read once for the whole group
    for (int64_t j = 0; j < n; ++j) {
        const float* vr;
        if (std::is_same<T, float>::value) {
            vr = reinterpret_cast<const float*>(v + (j0 + j) * sv);
        } else {
            widen(v + (j0 + j) * sv, kbuf, D);
            vr = kbuf;
        }
        for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * n + j];
            if (p != 0.0f) axpy(acc + g * D, p, vr, D);
        }
    }
}
