// llama.cpp (ggml) baseline for benchmarks/bench_kernels.py: one mul_mat of a quantised weight
// [N, K] (random valid blocks) by M float32 activation rows, with the weight in the CPU backend's
// extra buffer type (the repacked layout llama.cpp uses by default) or the plain CPU buffer.
//
// Build against a llama.cpp build tree (cmake -DGGML_NATIVE=OFF -DGGML_AVX2=ON ... for AVX2):
//   gcc -O2 benchmarks/ggml_baseline.c -I$LLAMA/ggml/include -L$BUILD/bin -lggml -lggml-base \
//       -lggml-cpu -Wl,-rpath,$BUILD/bin -o ggml_baseline
// Run: ./ggml_baseline TYPE N K M THREADS [COPIES=1] [EXTRA=1]
//   TYPE: ggml type id (12 Q4_K, 14 Q6_K, 3 Q4_1, 8 Q8_0); COPIES: distinct weights cycled
//   through (make COPIES x weight bytes exceed the last-level cache for a DRAM-bound M=1);
//   EXTRA: 0 plain CPU buffer, k >= 1 the k-th extra buffer type (CPU_REPACK, or AMX first where
//   built with AMX). Prints one JSON line: microseconds per matmul, GB/s of weight, GFLOP/s.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

int main(int argc, char** argv) {
    int type = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]), M = atoi(argv[4]), threads = atoi(argv[5]);
    int copies = argc > 6 ? atoi(argv[6]) : 1;
    int use_extra = argc > 7 ? atoi(argv[7]) : 1;
    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(be, threads);
    ggml_backend_dev_t dev = ggml_backend_get_device(be);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    ggml_backend_dev_get_extra_bufts_t fn = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    ggml_backend_buffer_type_t wbuft = ggml_backend_cpu_buffer_type();
    const char* bname = "CPU";
    if (use_extra && fn) {
        ggml_backend_buffer_type_t* ex = fn(dev);
        int k = 0; while (ex && ex[k] && k < use_extra - 1) ++k; if (ex && ex[k]) { wbuft = ex[k]; bname = ggml_backend_buft_name(wbuft); }
    }
    struct ggml_init_params ip = { 64 * 1024 * 1024, NULL, true };
    struct ggml_context* wctx = ggml_init(ip);
    struct ggml_context* actx = ggml_init(ip);
    struct ggml_tensor** ws = malloc(sizeof(void*) * copies);
    for (int c = 0; c < copies; ++c) ws[c] = ggml_new_tensor_2d(wctx, (enum ggml_type) type, K, N);
    struct ggml_tensor* x = ggml_new_tensor_2d(actx, GGML_TYPE_F32, K, M);
    ggml_backend_buffer_t wb = ggml_backend_alloc_ctx_tensors_from_buft(wctx, wbuft);
    ggml_backend_buffer_t ab = ggml_backend_alloc_ctx_tensors_from_buft(actx, ggml_backend_cpu_buffer_type());
    (void) ab;
    // random valid blocks: random bytes, fp16 scale fields set to small finite values
    size_t nbytes = ggml_nbytes(ws[0]);
    size_t bsz = ggml_type_size((enum ggml_type) type);
    unsigned char* buf = malloc(nbytes);
    srand(1);
    for (size_t i = 0; i < nbytes; ++i) buf[i] = rand() & 0xFF;
    int f16at[2] = {-1, -1};
    switch (type) { case 2: case 6: case 8: f16at[0] = 0; break; case 3: case 7: case 12: case 13: f16at[0] = 0; f16at[1] = 2; break; case 14: f16at[0] = 208; break; }
    for (size_t b = 0; b < nbytes / bsz; ++b)
        for (int f = 0; f < 2; ++f) if (f16at[f] >= 0) { ggml_fp16_t h = ggml_fp32_to_fp16(0.001f + 0.009f * (rand() / (float) RAND_MAX)); memcpy(buf + b * bsz + f16at[f], &h, 2); }
    for (int c = 0; c < copies; ++c) ggml_backend_tensor_set(ws[c], buf, 0, nbytes);
    float* xv = malloc(sizeof(float) * K * M);
    for (long i = 0; i < (long) K * M; ++i) xv[i] = rand() / (float) RAND_MAX - 0.5f;
    ggml_backend_tensor_set(x, xv, 0, sizeof(float) * K * M);
    // one graph per copy
    struct ggml_init_params gp = { ggml_tensor_overhead() * (copies * 2 + 16) + ggml_graph_overhead_custom(copies * 2 + 16, false) , NULL, true };
    struct ggml_context* gctx = ggml_init(gp);
    struct ggml_cgraph* gf = ggml_new_graph_custom(gctx, copies * 2 + 16, false);
    for (int c = 0; c < copies; ++c) ggml_build_forward_expand(gf, ggml_mul_mat(gctx, ws[c], x));
    ggml_gallocr_t ga = ggml_gallocr_new(ggml_backend_cpu_buffer_type());
    ggml_gallocr_alloc_graph(ga, gf);
    ggml_backend_graph_compute(be, gf);
    double best = 1e30;
    double t_end = now() + (M == 1 ? 2.0 : 1.0);
    do {
        double t = now();
        ggml_backend_graph_compute(be, gf);
        double dt = (now() - t) / copies;
        if (dt < best) best = dt;
    } while (now() < t_end);
    printf("{\"buft\": \"%s\", \"type\": %d, \"N\": %d, \"K\": %d, \"M\": %d, \"us\": %.1f, \"GBps\": %.2f, \"GFLOPs\": %.1f}\n", bname, type, N, K, M,
           best * 1e6, nbytes / best / 1e9, 2.0 * M * N * K / best / 1e9);
    return 0;
}
