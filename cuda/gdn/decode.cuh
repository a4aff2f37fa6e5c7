// gdn/decode.cuh: GDN decode (SPEC.md section 7, step 2 and the commit of step 4).
//
// One CTA per (sequence, value head, BV-column slice of the state). Thread
// (rg, cg) holds rows rg + RG*i of 4 consecutive columns in f32 registers, so
// one token costs one pass over the state: with S' = alpha S,
//   u = beta (v - alpha S^T k),  o = scale (alpha S^T q + u (k.q)),  S <- S' + k u^T
// (both column reductions share one cross-thread reduction). Memory-bound: the
// state is read and written once per step, with 16-byte accesses.
#pragma once
#include "common/dtype.cuh"
#include "gdn/common.cuh"

namespace natsl {
namespace gdn {

constexpr int DECODE_MAX_TOKENS = 8;

template <typename T, int DK, int DV, int BV, int NW>
__device__ void decode(const NatslGdnDecodeParams& p) {
    constexpr int NT = NW * 32;
    constexpr int CG = BV / 4;    // column groups of 4
    constexpr int RG = NT / CG;   // row groups
    constexpr int RPT = DK / RG;  // rows per thread
    constexpr int RGW = 32 / CG;  // row groups per warp
    static_assert(BV % 4 == 0 && 32 % CG == 0 && DK % RG == 0 && DV % BV == 0, "bad decode tile");

    __shared__ float sq[DECODE_MAX_TOKENS][DK];
    __shared__ float sk[DECODE_MAX_TOKENS][DK];
    __shared__ float skq[DECODE_MAX_TOKENS];
    __shared__ float red[2][NW][BV][2];
    __shared__ int meta_pos;
    __shared__ float meta_gsum;

    const int vt = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int cg = tid % CG, rg = tid / CG;
    const int Hv = p.num_v_heads, J = p.tokens_per_seq;
    const int hq = h / (Hv / p.num_qk_heads);
    const int col = vt * BV + cg * 4;

    // A padded slot (index -1) or a bad index (a fault): the sequence is skipped whole, its
    // rows of o written as zeros, and nothing of its pools, pos or gsum touched. Uniform
    // over the sequence's CTAs, so none of them arrives on its counter either.
    unsigned int* faults = (vt == 0 && h == 0 && tid == 0) ? p.faults : nullptr;  // report once
    const int ridx = checked_row(p.running_index[n], p.running_pool_rows, faults);
    const int cidx = p.committed_pool ? checked_row(p.committed_index[n], p.committed_pool_rows, faults) : 0;
    if (ridx < 0 || cidx < 0) {
        for (int j = tid; j < J * (BV / 4); j += NT) {
            const i64 row = (i64)n * J + j / (BV / 4);
            T* op = reinterpret_cast<T*>(p.o) + row * p.o_stride_t + (i64)h * p.o_stride_h + vt * BV + (j % (BV / 4)) * 4;
            *reinterpret_cast<uint2*>(op) = make_uint2(0u, 0u);
        }
        return;
    }

    // The state slice first: its loads are in flight while q and k are prepared
    // (at B = 1 the step is a chain of dependent loads; this takes one link off it).
    float4 S[RPT];
    const i64 hoff = (i64)h * DK * DV;
    float* run = p.running_pool + (i64)ridx * Hv * DK * DV + hoff;
#pragma unroll
    for (int i = 0; i < RPT; ++i) S[i] = *reinterpret_cast<const float4*>(run + (i64)(rg + RG * i) * DV + col);
    if (tid == 0) {
        meta_pos = p.pos ? p.pos[n] : 0;
        meta_gsum = p.gsum ? p.gsum[(i64)n * Hv + h] : 0.f;
    }
    // q, k of every token of this step: f32, optionally L2-normalised; k.q per token.
    for (int j = warp; j < J; j += NW) {
        const i64 row = (i64)n * J + j;
        const T* q = reinterpret_cast<const T*>(p.q) + row * p.q_stride_t + (i64)hq * p.q_stride_h;
        const T* k = reinterpret_cast<const T*>(p.k) + row * p.k_stride_t + (i64)hq * p.k_stride_h;
        float ssq = 0.f, ssk = 0.f;
        for (int a = lane; a < DK; a += 32) {
            const float x = to_f32(q[a]), y = to_f32(k[a]);
            sq[j][a] = x;
            sk[j][a] = y;
            ssq += x * x;
            ssk += y * y;
        }
        ssq = warp_sum(ssq);
        ssk = warp_sum(ssk);
        const float iq = p.l2norm ? rsqrtf(ssq + 1e-6f) : 1.f, ik = p.l2norm ? rsqrtf(ssk + 1e-6f) : 1.f;
        float kq = 0.f;
        for (int a = lane; a < DK; a += 32) {
            const float x = sq[j][a] * iq, y = sk[j][a] * ik;
            sq[j][a] = x;
            sk[j][a] = y;
            kq += x * y;
        }
        kq = warp_sum(kq);
        if (lane == 0) skq[j] = kq;
    }

    __syncthreads();
    int pos = meta_pos;
    float gs = meta_gsum;

    {
        for (int j = 0; j < J; ++j) {
            const i64 row = (i64)n * J + j;
            const float g = p.g[row * p.g_stride_t + h];
            const float beta = load_beta<T>(p.beta, p.beta_f32, row * p.beta_stride_t + h);
            const float alpha = __expf(g);
            float pk[4] = {0.f, 0.f, 0.f, 0.f}, pq[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int i = 0; i < RPT; ++i) {
                const float kv = sk[j][rg + RG * i], qv = sq[j][rg + RG * i];
                pk[0] += S[i].x * kv; pk[1] += S[i].y * kv; pk[2] += S[i].z * kv; pk[3] += S[i].w * kv;
                pq[0] += S[i].x * qv; pq[1] += S[i].y * qv; pq[2] += S[i].z * qv; pq[3] += S[i].w * qv;
            }
#pragma unroll
            for (int o = CG; o < 32; o <<= 1)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    pk[e] += __shfl_xor_sync(0xffffffffu, pk[e], o);
                    pq[e] += __shfl_xor_sync(0xffffffffu, pq[e], o);
                }
            if (lane < CG) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    red[j & 1][warp][cg * 4 + e][0] = pk[e];
                    red[j & 1][warp][cg * 4 + e][1] = pq[e];
                }
            }
            __syncthreads();
            float sk_[4] = {0.f, 0.f, 0.f, 0.f}, sq_[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int w = 0; w < NW; ++w)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    sk_[e] += red[j & 1][w][cg * 4 + e][0];
                    sq_[e] += red[j & 1][w][cg * 4 + e][1];
                }
            const T* vp = reinterpret_cast<const T*>(p.v) + row * p.v_stride_t + (i64)h * p.v_stride_h + col;
            const uint2 vv = *reinterpret_cast<const uint2*>(vp);
            const float v4[4] = {lo_f32<T>(vv.x), hi_f32<T>(vv.x), lo_f32<T>(vv.y), hi_f32<T>(vv.y)};
            const float kq = skq[j];
            float u[4], o[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                u[e] = beta * (v4[e] - alpha * sk_[e]);
                o[e] = p.scale * (alpha * sq_[e] + u[e] * kq);
            }
#pragma unroll
            for (int i = 0; i < RPT; ++i) {
                const float kv = sk[j][rg + RG * i];
                S[i].x = S[i].x * alpha + kv * u[0];
                S[i].y = S[i].y * alpha + kv * u[1];
                S[i].z = S[i].z * alpha + kv * u[2];
                S[i].w = S[i].w * alpha + kv * u[3];
            }
            if (rg == 0) {
                T* op = reinterpret_cast<T*>(p.o) + row * p.o_stride_t + (i64)h * p.o_stride_h + col;
                *reinterpret_cast<uint2*>(op) = make_uint2(pack2<T>(o[0], o[1]), pack2<T>(o[2], o[3]));
            }
            gs += g;
            ++pos;
            if (p.pos && pos % NATSL_CHUNK == 0) {
                // The token completed its chunk: commit it.
                if (p.committed_pool) {
                    float* com = p.committed_pool + (i64)cidx * Hv * DK * DV + hoff;
                    int label = NATSL_LABEL_GDN;
                    if (p.labels) label = read_label(p.labels, (i64)n * p.num_r_heads + h / (Hv / p.num_r_heads), p.faults);
                    if (label == NATSL_LABEL_ATTN) {
                        const float d = __expf(gs);
#pragma unroll
                        for (int i = 0; i < RPT; ++i) {
                            float4 c = *reinterpret_cast<const float4*>(com + (i64)(rg + RG * i) * DV + col);
                            c.x *= d; c.y *= d; c.z *= d; c.w *= d;
                            S[i] = c;
                        }
                    }
#pragma unroll
                    for (int i = 0; i < RPT; ++i) *reinterpret_cast<float4*>(com + (i64)(rg + RG * i) * DV + col) = S[i];
                }
                gs = 0.f;
            }
        }
#pragma unroll
        for (int i = 0; i < RPT; ++i) *reinterpret_cast<float4*>(run + (i64)(rg + RG * i) * DV + col) = S[i];
    }

    // pos and gsum are shared by every CTA of the sequence: the last CTA to arrive
    // (all others have read them by then) advances them.
    if (p.pos || p.gsum) {
        __syncthreads();
        if (tid == 0) {
            __threadfence();
            const unsigned total = gridDim.x * gridDim.y;
            const unsigned prev = atomicAdd(p.counter + n, 1u);
            if (prev == total - 1) {
                __threadfence();
                const int pos0 = meta_pos;
                if (p.gsum) {
                    for (int hh = 0; hh < Hv; ++hh) {
                        float s = p.gsum[(i64)n * Hv + hh];
                        for (int j = 0; j < J; ++j) {
                            s += p.g[((i64)n * J + j) * p.g_stride_t + hh];
                            if (p.pos && (pos0 + j + 1) % NATSL_CHUNK == 0) s = 0.f;
                        }
                        p.gsum[(i64)n * Hv + hh] = s;
                    }
                }
                if (p.pos) p.pos[n] = pos0 + J;
                p.counter[n] = 0u;
            }
        }
    }
}

} // namespace gdn
} // namespace natsl
