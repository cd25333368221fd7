// A small CUDA emulator, enough to run src/backend/cuda/kernels.cu on the CPU
// (scripts/kernel_emu.sh, CI): a launch runs its blocks one after another on blockDim's OS
// threads; __syncthreads is a block barrier, the warp intrinsics an exchange of 32 lanes'
// values between two warp barriers, `__shared__` a static, `__half` F16C's conversions (round to
// nearest even, as CUDA's). It checks what a kernel computes (index arithmetic, reductions,
// layouts), not its speed, and not the Rust side's launch arguments.
#pragma once
#include <immintrin.h>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

struct __half {
    uint16_t x;
};
struct __half2 {
    __half x, y;
};
struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
struct uint2 {
    uint32_t x, y;
};
struct uint4 {
    uint32_t x, y, z, w;
};
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline __half __float2half(float f) { return __half{(uint16_t)_cvtss_sh(f, 0)}; }
inline float __half2float(__half h) { return _cvtsh_ss(h.x); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
using std::isfinite;
using std::isnan;
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
template <typename T>
inline T atomicAdd(T* p, T v) {
    static std::mutex m;
    std::lock_guard<std::mutex> g(m);
    T old = *p;
    *p = old + v;
    return old;
}

struct EmuWarp {
    std::barrier<> bar{32};
    uint64_t scratch[32];
};
inline thread_local EmuWarp* emu_warp;
inline thread_local int emu_lane;
inline thread_local std::barrier<>* emu_block_bar;

inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp->bar.arrive_and_wait(); }

template <typename T>
inline uint64_t emu_bits(T v) {
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T>
inline T emu_from(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}
// Every lane publishes v, then reads lane src(lane)'s.
template <typename T, typename F>
inline T emu_exchange(T v, F src) {
    emu_warp->scratch[emu_lane] = emu_bits(v);
    emu_warp->bar.arrive_and_wait();
    int s = src(emu_lane);
    T r = s < 0 ? v : emu_from<T>(emu_warp->scratch[s]);
    emu_warp->bar.arrive_and_wait();
    return r;
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_exchange(v, [&](int l) { return l ^ o; }); }
template <typename T>
inline T __shfl_sync(unsigned, T v, int src) { return emu_exchange(v, [&](int) { return src; }); }
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned d) { return emu_exchange(v, [&](int l) { return l >= (int)d ? l - (int)d : -1; }); }
template <typename T>
inline unsigned __match_any_sync(unsigned, T v) {
    emu_warp->scratch[emu_lane] = emu_bits(v);
    emu_warp->bar.arrive_and_wait();
    unsigned m = 0;
    for (int l = 0; l < 32; l++)
        if (emu_warp->scratch[l] == emu_bits(v)) m |= 1u << l;
    emu_warp->bar.arrive_and_wait();
    return m;
}

// Runs `kernel(args...)` over the grid, one block at a time, on blockDim's threads (made once a
// launch): each block has barriers of its own (a thread that returns drops out of its block's),
// and every thread waits for the whole block to end before the next, since `__shared__`
// variables are statics that the next block reuses.
template <typename K, typename... A>
void emu_launch(K kernel, dim3 grid, dim3 block, A... args) {
    gridDim = grid;
    blockDim = block;
    int n = block.x * block.y * block.z, nw = (n + 31) / 32;
    size_t blocks = (size_t)grid.x * grid.y * grid.z;
    struct Block {
        std::unique_ptr<std::barrier<>> bar;
        std::vector<std::unique_ptr<EmuWarp>> warps;
    };
    std::vector<Block> bs(blocks);
    for (auto& b : bs) {
        b.bar = std::make_unique<std::barrier<>>(n);
        for (int w = 0; w < nw; w++) b.warps.push_back(std::make_unique<EmuWarp>());
    }
    std::barrier<> between(n);
    std::vector<std::thread> ts;
    for (int t = 0; t < n; t++)
        ts.emplace_back([&, t] {
            threadIdx = dim3{(unsigned)t % block.x, (unsigned)t / block.x % block.y, (unsigned)t / (block.x * block.y)};
            emu_lane = t % 32;
            for (size_t i = 0; i < blocks; i++) {
                blockIdx = dim3{(unsigned)(i % grid.x), (unsigned)(i / grid.x % grid.y), (unsigned)(i / ((size_t)grid.x * grid.y))};
                emu_block_bar = bs[i].bar.get();
                emu_warp = bs[i].warps[t / 32].get();
                kernel(args...);
                emu_block_bar->arrive_and_drop();
                emu_warp->bar.arrive_and_drop();
                between.arrive_and_wait();
            }
        });
    for (auto& t : ts) t.join();
}
