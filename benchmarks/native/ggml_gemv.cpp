// y = W x through ggml's CPU mul_mat, for timing ggml's kernels against matpress's in one process
// (benchmarks/codebook_kernel.py). Weights are quantized by ggml_quantize_chunk into `copies` separate
// tensors (one graph each), so a caller can rotate through more weight bytes than the caches hold; one
// persistent thread pool, paused between passes so its spinning threads do not take the cores from the
// other contenders. With `repack`, the weights live in the CPU backend's CPU_REPACK buffer, as llama.cpp's
// model loader puts them by default (ggml rearranges Q4_0 and IQ4_NL into 8-row interleaved blocks on
// AVX2); without, in plain memory, where mul_mat takes its row-at-a-time dot products. Built against the
// ggml of the peers' llama.cpp build (make peers-env).
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

struct GemvBench {
    ggml_context* ctx = nullptr;
    ggml_context* weight_ctx = nullptr;  // the weights' tensors where they live in a backend buffer
    ggml_backend_buffer_t weight_buffer = nullptr;
    std::vector<ggml_cgraph*> graphs;
    std::vector<ggml_tensor*> inputs, outputs;
    ggml_threadpool* pool = nullptr;
    ggml_cplan plan{};
    std::vector<uint8_t> work;
};

// The CPU backend's repacking buffer type, or null where this ggml was built without it.
static ggml_backend_buffer_type_t repack_buffer_type() {
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    auto extra = (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!extra) return nullptr;
    for (ggml_backend_buffer_type_t* t = extra(ggml_backend_reg_dev_get(reg, 0)); *t; ++t)
        if (strcmp(ggml_backend_buft_name(*t), "CPU_REPACK") == 0) return *t;
    return nullptr;
}

extern "C" {

// type: a ggml_type; w (n, k) and x (m, k) fp32 row-major; repack: 1 to keep the weights in the
// CPU_REPACK buffer. Returns null on failure (no repacking buffer type included).
void* gemv_new(int type, int n, int k, int m, int copies, const float* w, const float* x, int threads, int repack) {
    const ggml_type t = (ggml_type)type;
    const size_t row = ggml_row_size(t, k);
    const size_t bytes = (size_t)copies * (row * n + (size_t)k * m * 4 + (size_t)n * m * 4 + 4 * ggml_tensor_overhead()) +
                         copies * ggml_graph_overhead() + (1 << 20);
    ggml_init_params params = {bytes, nullptr, false};
    GemvBench* b = new GemvBench;
    b->ctx = ggml_init(params);
    if (!b->ctx) { delete b; return nullptr; }
    std::vector<ggml_tensor*> weights;
    if (repack) {
        ggml_backend_buffer_type_t buft = repack_buffer_type();
        ggml_init_params weight_params = {(size_t)copies * ggml_tensor_overhead() + (1 << 16), nullptr, true};
        b->weight_ctx = buft ? ggml_init(weight_params) : nullptr;
        if (!b->weight_ctx) { ggml_free(b->ctx); delete b; return nullptr; }
        for (int c = 0; c < copies; ++c) weights.push_back(ggml_new_tensor_2d(b->weight_ctx, t, k, n));
        b->weight_buffer = ggml_backend_alloc_ctx_tensors_from_buft(b->weight_ctx, buft);
        if (!b->weight_buffer) { ggml_free(b->weight_ctx); ggml_free(b->ctx); delete b; return nullptr; }
        std::vector<uint8_t> plain(row * n);
        ggml_quantize_chunk(t, w, plain.data(), 0, n, k, nullptr);
        for (ggml_tensor* wt : weights) ggml_backend_tensor_set(wt, plain.data(), 0, plain.size());  // repacks
    }
    ggml_threadpool_params tp = ggml_threadpool_params_default(threads);
    b->pool = ggml_threadpool_new(&tp);
    size_t work = 0;
    for (int c = 0; c < copies; ++c) {
        ggml_tensor* wt = repack ? weights[c] : ggml_new_tensor_2d(b->ctx, t, k, n);
        if (!repack) ggml_quantize_chunk(t, w, wt->data, 0, n, k, nullptr);
        ggml_tensor* xt = ggml_new_tensor_2d(b->ctx, GGML_TYPE_F32, k, m);
        memcpy(xt->data, x, (size_t)k * m * 4);
        ggml_tensor* y = ggml_mul_mat(b->ctx, wt, xt);
        ggml_cgraph* g = ggml_new_graph(b->ctx);
        ggml_build_forward_expand(g, y);
        ggml_cplan p = ggml_graph_plan(g, threads, b->pool);
        if (p.work_size > work) work = p.work_size;
        b->graphs.push_back(g);
        b->inputs.push_back(xt);
        b->outputs.push_back(y);
    }
    b->work.resize(work + 64);
    b->plan = ggml_graph_plan(b->graphs[0], threads, b->pool);
    b->plan.work_size = work;
    b->plan.work_data = b->work.data();
    ggml_threadpool_pause(b->pool);
    return b;
}

// One call of copy c; returns 0 on success.
int gemv_run(void* handle, int c) {
    GemvBench* b = static_cast<GemvBench*>(handle);
    return ggml_graph_compute(b->graphs[c], &b->plan) == GGML_STATUS_SUCCESS ? 0 : 1;
}

void gemv_pause(void* handle, int paused) {
    GemvBench* b = static_cast<GemvBench*>(handle);
    if (paused) ggml_threadpool_pause(b->pool); else ggml_threadpool_resume(b->pool);
}

// The output of copy c, (m, n) fp32.
void gemv_output(void* handle, int c, float* out) {
    GemvBench* b = static_cast<GemvBench*>(handle);
    memcpy(out, b->outputs[c]->data, ggml_nbytes(b->outputs[c]));
}

size_t gemv_weight_bytes(int type, int n, int k) { return ggml_row_size((ggml_type)type, k) * n; }

void gemv_free(void* handle) {
    GemvBench* b = static_cast<GemvBench*>(handle);
    ggml_threadpool_free(b->pool);
    if (b->weight_buffer) ggml_backend_buffer_free(b->weight_buffer);
    if (b->weight_ctx) ggml_free(b->weight_ctx);
    ggml_free(b->ctx);
    delete b;
}

}  // extern "C"
