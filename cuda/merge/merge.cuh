// merge.cuh: the output epilogue of SPEC.md section 6, one (token, head) row per
// group of LANES threads. Memory-bound (3 row reads + 1 row write per row): each
// thread moves whole 16-byte vectors, and a CTA covers ROWS tokens of one head.
#pragma once
#include "common/dtype.cuh"

namespace natsl {

// Threads per row: the largest power of two <= 32 that divides the row's vectors
// (dvs 64 -> 8, 128 -> 16, 256 -> 32, 384 -> 16 with 3 vectors each).
constexpr int merge_lanes(int nv) { return (nv % 32 == 0) ? 32 : (nv % 16 == 0) ? 16 : (nv % 8 == 0) ? 8 : (nv % 4 == 0) ? 4 : (nv % 2 == 0) ? 2 : 1; }

// Read-once rows: evict-first in L2 (the router's load, cuda/router/router.cuh).
__device__ __forceinline__ vec8 merge_ld_stream(const void* p) {
    vec8 v;
    asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "l"(p));
    return v;
}
// Gammas are read by every row: the read-only path keeps them in L1.
__device__ __forceinline__ vec8 merge_ld_keep(const void* p) {
    vec8 v;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "l"(p));
    return v;
}
// The output is read next by o_proj: a plain store leaves it in L2.
__device__ __forceinline__ void merge_st(void* p, const vec8& v) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3]) : "memory");
}

template <typename T>
__device__ __forceinline__ float merge_ld_logit(const NatslMergeParams& p, long long off) {
    return p.w_f32 ? ((const float*)p.w)[off] : to_f32(((const T*)p.w)[off]);
}

template <typename T, int DV, int THREADS>
__device__ __forceinline__ void merge_rows(const NatslMergeParams& p) {
    static_assert(DV % 8 == 0, "rows are whole 16-byte vectors");
    constexpr int NV = DV / 8;
    constexpr int LANES = merge_lanes(NV);
    constexpr int VECS = NV / LANES;
    constexpr int ROWS = THREADS / LANES;
    static_assert(THREADS % 32 == 0 && 32 % LANES == 0, "row groups tile a warp");

    const int lane = threadIdx.x % LANES;
    const long long t = (long long)blockIdx.x * ROWS + threadIdx.x / LANES;
    const long long h = blockIdx.y;
    // A row group is LANES aligned lanes of one warp; its reductions shuffle inside it
    // only, so groups past T may leave.
    if (t >= p.num_tokens) return;
    const u32 group = (LANES == 32) ? 0xffffffffu : (((1u << LANES) - 1u) << ((threadIdx.x % 32) & ~(LANES - 1)));

    // Issue every load of the row before any math.
    const char* g_row = (const char*)p.o_gdn + (t * p.o_gdn_stride_t + h * p.o_gdn_stride_h) * 2;
    const char* a_row = (const char*)p.o_att + (t * p.o_att_stride_t + h * p.o_att_stride_h) * 2;
    const char* z_row = (const char*)p.z + (t * p.z_stride_t + h * p.z_stride_h) * 2;
    vec8 vg[VECS], va[VECS], vz[VECS];
#pragma unroll
    for (int k = 0; k < VECS; ++k) {
        const int c = (lane + k * LANES) * 16;
        vg[k] = merge_ld_stream(g_row + c);
        va[k] = merge_ld_stream(a_row + c);
        vz[k] = merge_ld_stream(z_row + c);
    }
    const long long w_off = t * p.w_stride_t + h * p.w_stride_h;
    const float w0 = merge_ld_logit<T>(p, w_off), w1 = merge_ld_logit<T>(p, w_off + 1);

    float ss_g = 0.f, ss_a = 0.f;
#pragma unroll
    for (int k = 0; k < VECS; ++k) {
        float x[8], y[8];
        unpack8<T>(vg[k], x);
        unpack8<T>(va[k], y);
#pragma unroll
        for (int i = 0; i < 8; ++i) { ss_g += x[i] * x[i]; ss_a += y[i] * y[i]; }
    }
#pragma unroll
    for (int o = LANES / 2; o > 0; o >>= 1) {
        ss_g += __shfl_xor_sync(group, ss_g, o);
        ss_a += __shfl_xor_sync(group, ss_a, o);
    }
    // (a, b) = softmax(w0, w1): a = sigmoid(w0 - w1), finite for any finite logits.
    const float a = 1.f / (1.f + __expf(w1 - w0));
    const float sg = a * rsqrtf(ss_g / (float)DV + p.eps);
    const float sa = (1.f - a) * rsqrtf(ss_a / (float)DV + p.eps);

    char* o_row = (char*)p.out + (t * p.out_stride_t + h * p.out_stride_h) * 2;
#pragma unroll
    for (int k = 0; k < VECS; ++k) {
        const int c = (lane + k * LANES) * 16;
        float x[8], y[8], z[8], gg[8], ga[8], r[8];
        unpack8<T>(vg[k], x);
        unpack8<T>(va[k], y);
        unpack8<T>(vz[k], z);
        unpack8<T>(merge_ld_keep((const char*)p.gamma_gdn + c), gg);
        unpack8<T>(merge_ld_keep((const char*)p.gamma_att + c), ga);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float m = sg * gg[i] * x[i] + sa * ga[i] * y[i];
            // z * sigmoid(z); __fdividef gives 0 for z << 0, the limit.
            r[i] = m * __fdividef(z[i], 1.f + __expf(-z[i]));
        }
        vec8 ov;
#pragma unroll
        for (int i = 0; i < 4; ++i) ov.w[i] = pack2<T>(r[2 * i], r[2 * i + 1]);
        merge_st(o_row + c, ov);
    }
}

} // namespace natsl
