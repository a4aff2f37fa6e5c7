// dtype.cuh: bf16 / f16 storage types and conversions, with no CUDA headers,
// so that NVRTC compiles every kernel without a toolkit on the machine.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

namespace natsl {

struct bf16 { u16 bits; };
struct f16 { u16 bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float(((u32)x.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    u16 b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(x));
    return bf16{b};
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) {
    u16 b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(x));
    return f16{b};
}

// Round an f32 through the storage type and back (the model rounds some intermediates).
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f32(from_f32<T>(x)); }

// Two f32 -> one packed pair (low half = a), as the mma operands want it.
template <typename T> __device__ __forceinline__ u32 pack2(float a, float b);
template <> __device__ __forceinline__ u32 pack2<bf16>(float a, float b) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
}
template <> __device__ __forceinline__ u32 pack2<f16>(float a, float b) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
}
template <typename T> __device__ __forceinline__ float lo_f32(u32 p) { return to_f32(T{(u16)(p & 0xffff)}); }
template <typename T> __device__ __forceinline__ float hi_f32(u32 p) { return to_f32(T{(u16)(p >> 16)}); }

// 16-byte vector of 8 storage elements.
struct alignas(16) vec8 { u32 w[4]; };

template <typename T> __device__ __forceinline__ void unpack8(const vec8& v, float* out) {
#pragma unroll
    for (int i = 0; i < 4; ++i) { out[2 * i] = lo_f32<T>(v.w[i]); out[2 * i + 1] = hi_f32<T>(v.w[i]); }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

} // namespace natsl
