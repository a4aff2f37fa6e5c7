// gdn/common.cuh: tile movement and warp-level GEMM pieces shared by the GDN kernels.
#pragma once
#include "common/dtype.cuh"
#include "common/mma_sm80.cuh"
#include "common/faults.cuh"

namespace natsl {
namespace gdn {

constexpr int C = NATSL_CHUNK;  // tokens per chunk
constexpr int PAD = 8;          // 16 bytes of padding per smem row: ldmatrix rows hit distinct banks

// Async copy of ROWS x COLS storage elements (COLS % 8 == 0) from global rows
// `src + r * stride` into smem rows of `ld` elements. Rows >= valid are zero-filled.
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_rows_async(T* smem, int ld, const T* src, i64 stride, int valid) {
    constexpr int VPR = COLS / 8;  // 16-byte vectors per row
#pragma unroll 4
    for (int i = threadIdx.x; i < ROWS * VPR; i += THREADS) {
        const int r = i / VPR, c = (i % VPR) * 8;
        const bool ok = r < valid;
        // A zero-filled copy still needs a valid address: use the tile's base.
        const T* g = ok ? src + (i64)r * stride + c : src;
        cp_async16(smem + r * ld + c, g, ok ? 16 : 0);
    }
}

// Plain 16-byte stores of ROWS x COLS smem elements to global rows (rows < valid only).
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void store_rows(T* dst, i64 stride, const T* smem, int ld, int valid) {
    constexpr int VPR = COLS / 8;
#pragma unroll 4
    for (int i = threadIdx.x; i < ROWS * VPR; i += THREADS) {
        const int r = i / VPR, c = (i % VPR) * 8;
        if (r < valid) *reinterpret_cast<vec8*>(dst + (i64)r * stride + c) = *reinterpret_cast<const vec8*>(smem + r * ld + c);
    }
}

// Multiply each smem row r (COLS elements) by f(r), optionally after L2-normalising it.
// One warp per row at a time; f32 math, rounded back to storage.
template <typename T, int ROWS, int COLS, int WARPS, typename F>
__device__ __forceinline__ void scale_rows(T* smem, int ld, bool l2norm, F f) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = warp; r < ROWS; r += WARPS) {
        T* row = smem + r * ld;
        float inv = 1.f;
        if (l2norm) {
            float ss = 0.f;
            for (int c = lane * 2; c < COLS; c += 64) {
                const u32 w = *reinterpret_cast<const u32*>(row + c);
                const float a = lo_f32<T>(w), b = hi_f32<T>(w);
                ss += a * a + b * b;
            }
            ss = warp_sum(ss);
            inv = rsqrtf(ss + 1e-6f);
        }
        const float s = inv * f(r);
        for (int c = lane * 2; c < COLS; c += 64) {
            u32* p = reinterpret_cast<u32*>(row + c);
            const u32 w = *p;
            *p = pack2<T>(lo_f32<T>(w) * s, hi_f32<T>(w) * s);
        }
    }
}

// A fragment (16x16, row-major A) at smem rows m0.., cols k0.. of a row-major tile.
__device__ __forceinline__ void frag_a(u32* a, const void* base, int ld_bytes, int m0, int k0_bytes) {
    const int l = threadIdx.x % 32;
    const char* p = (const char*)base + (m0 + (l % 16)) * ld_bytes + k0_bytes + (l / 16) * 16;
    ldmatrix_x4(a, p);
}
// A fragment for A = St^T where St is stored row-major [k][m]: rows k0.., cols m0...
__device__ __forceinline__ void frag_a_trans(u32* a, const void* base, int ld_bytes, int k0, int m0_bytes) {
    const int l = threadIdx.x % 32;
    const char* p = (const char*)base + (k0 + (l & 7) + ((l >> 4) << 3)) * ld_bytes + m0_bytes + ((l >> 3) & 1) * 16;
    ldmatrix_x4_trans(a, p);
}
// B fragments of two n-tiles (n0.., n0+8..) for B stored row-major [k][n] (k0.. rows).
// b[0..1]: n-tile 0, b[2..3]: n-tile 1.
__device__ __forceinline__ void frag_b2_kn(u32* b, const void* base, int ld_bytes, int k0, int n0_bytes) {
    const int l = threadIdx.x % 32;
    const char* p = (const char*)base + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld_bytes + n0_bytes + (l >> 4) * 16;
    ldmatrix_x4_trans(b, p);
}
// B fragments of two n-tiles for B stored as Bt row-major [n][k] (B = Bt^T).
__device__ __forceinline__ void frag_b2_nk(u32* b, const void* base, int ld_bytes, int n0, int k0_bytes) {
    const int l = threadIdx.x % 32;
    const char* p = (const char*)base + (n0 + (l & 7) + (l >> 4) * 8) * ld_bytes + k0_bytes + ((l >> 3) & 1) * 16;
    ldmatrix_x4(b, p);
}

template <typename T> __device__ __forceinline__ float load_beta(const void* beta, int f32, i64 idx) {
    return f32 ? reinterpret_cast<const float*>(beta)[idx] : to_f32(reinterpret_cast<const T*>(beta)[idx]);
}

} // namespace gdn
} // namespace natsl
