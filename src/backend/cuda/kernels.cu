// inferd's CUDA kernels for the transformer step (src/backend/cuda). Compiled by build.rs with
// nvcc into one fatbin (cubins for the common data-centre GPUs plus PTX for newer ones) that the
// backend loads at run time. Layouts:
//   activations  row-major [rows, width], f32 (the residual stream, projection outputs) or f16
//                (inputs of the cuBLAS products);
//   KV cache     per layer, [blocks, block_size, kv_heads * head_dim], f16 (or f32 when `kv32`, the
//                exact f32 mode); a sequence's position
//                p lives in block tables[seq * table_stride + p / block_size], slot p % block_size;
//   step meta    per row: token id, position and the row's sequence (index into the tables).
#include <cuda_fp16.h>

#define WARP 32

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Reduces over the block with `op` (`identity` its neutral value; blockDim.x a multiple of 32,
// at most 1024); every thread gets the result.
template <typename Op>
__device__ float block_reduce(float v, float identity, Op op) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (int o = WARP / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x / WARP) ? part[lane] : identity;
        for (int o = WARP / 2; o > 0; o >>= 1) s = op(s, __shfl_xor_sync(0xffffffffu, s, o));
        if (lane == 0) total = s;
    }
    __syncthreads();
    float t = total;
    __syncthreads();
    return t;
}

__device__ float block_sum(float v) {
    return block_reduce(v, 0.0f, [](float a, float b) { return a + b; });
}

__device__ float block_max(float v) {
    return block_reduce(v, -INFINITY, [](float a, float b) { return fmaxf(a, b); });
}

// 1 / sqrt(mean(x^2) + eps) of a row of n values, every thread of the block taking the same
// share (the RMSNorm scale; `rms_norm` and the fused one-row products both take it from here, so
// their inputs are the same values).
__device__ __forceinline__ float rms_inv(const float* __restrict__ x, int n, float eps) {
    float ss = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) ss += x[j] * x[j];
    ss = block_sum(ss);
    return rsqrtf(ss / n + eps);
}

// SiLU of the gate times the up value (`silu_mul`, and the fused down product's input).
__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// A RoPE pair (x, y) rotated by (cos, sin) (`qkv_rope_store`, `gemv_qkv_rope`).
__device__ __forceinline__ float2 rotate(float x, float y, float c, float s) { return make_float2(x * c - y * s, x * s + y * c); }

// Row r's LoRA update of a product (rows of `width` in `z`, from lora_update) when row r uses an
// adapter (`row_slot[r]` >= 0), else null: the kernels that read a product's output add it there.
__device__ __forceinline__ const float* lora_row(const float* z, const int* row_slot, int r, int width) {
    return z && row_slot[r] >= 0 ? z + (size_t)r * width : nullptr;
}

// LoRA rows through stacked weights (lora_stack.rs), the other way to apply adapters: `t`
// ([rows, t_stride], a cuBLAS product on the side stream) holds every row's `A x` for every stack
// slot's adapter, `count` modules of `rank` values a slot; `bt` ([slots, rank, width]) each slot's
// scaled B transposed, each module's columns where its output sits in the product's row. A row
// of slot `row_stack[r]` (-1: none) adds `sum_k t[k] bt[k, c]` to column c of module j. Null `t`:
// the step applies no stacked adapters. Passed by value (lora_stack::StackArg).
struct LoraStack {
    const float* t;
    const int* row_stack;
    const float* bt;
    int t_stride;
    int width;
    int rank;
    int count;
};

__device__ __forceinline__ float lora_stack_at(const LoraStack& L, int r, int c, int j) {
    int s = L.t ? L.row_stack[r] : -1;
    if (s < 0) return 0.0f;
    const float* t = L.t + (size_t)r * L.t_stride + (size_t)(s * L.count + j) * L.rank;
    const float* b = L.bt + (size_t)s * L.rank * L.width + c;
    float acc = 0.0f;
    for (int k = 0; k < L.rank; k++) acc += t[k] * b[(size_t)k * L.width];
    return acc;
}

// x[r, :] = table[ids[r], :] (the embedding lookup). Grid: rows; block: any.
extern "C" __global__ void embed_f16(const __half* __restrict__ table, const int* __restrict__ ids, float* __restrict__ x, int hidden) {
    int r = blockIdx.x;
    const __half* src = table + (size_t)ids[r] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(size_t)r * hidden + i] = __half2float(src[i]);
}

extern "C" __global__ void embed_f32(const float* __restrict__ table, const int* __restrict__ ids, float* __restrict__ x, int hidden) {
    int r = blockIdx.x;
    const float* src = table + (size_t)ids[r] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(size_t)r * hidden + i] = src[i];
}

// out[i, :] = x[row, :] / sqrt(mean(x[row, :]^2) + eps) * w, row = rows ? rows[i] : i.
// Grid: output rows; block: 256. `out` is f16 (`out16`) or f32 (`out32`), whichever is not null.
// With `z` (LoRA rows' updates of the residual stream, rows of `hidden`), an adapter row first
// adds its update to x (in place: the residual stream goes on with it); with the stacks' `ls`
// (module 0 of the product that wrote x), likewise.
extern "C" __global__ void rms_norm(float* __restrict__ x, const float* __restrict__ w, const int* __restrict__ rows, __half* __restrict__ out16, float* __restrict__ out32, int hidden, float eps,
                                    const float* __restrict__ z, const int* __restrict__ row_slot, LoraStack ls) {
    int i = blockIdx.x;
    int row = rows ? rows[i] : i;
    float* xr = x + (size_t)row * hidden;
    const float* zr = lora_row(z, row_slot, row, hidden);
    if (zr)
        for (int j = threadIdx.x; j < hidden; j += blockDim.x) xr[j] += zr[j];
    if (ls.t && ls.row_stack[row] >= 0) {
        for (int j = threadIdx.x; j < hidden; j += blockDim.x) xr[j] += lora_stack_at(ls, row, j, 0);
    }
    float inv = rms_inv(xr, hidden, eps);
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        float v = xr[j] * inv * w[j];
        if (out16) out16[(size_t)i * hidden + j] = __float2half(v);
        else out32[(size_t)i * hidden + j] = v;
    }
}

// For each row and head: adds the q/k/v bias (if any), rotates q and k by the row's position
// (tables cos/sin [positions, head_dim / 2]; pairs (2i, 2i + 1) when interleaved, else
// (i, i + half)), writes q to `q` [rows, nh * d] and k, v into the paged cache. Grid: (rows,
// nh + nkv): blocks y < nh take a query head, the others a key head and its value head; a thread
// takes a pair (and the same pair of the value head). With `z`, adapter rows add their LoRA
// update (rows of the product's width) to the product first; with the stacks' `ls`, likewise.
extern "C" __global__ void qkv_rope_store(const float* __restrict__ qkv, const float* __restrict__ bias, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                          const int* __restrict__ pos, const int* __restrict__ row_seq, const int* __restrict__ tables, int table_stride,
                                          float* __restrict__ q, void* __restrict__ kc, void* __restrict__ vc,
                                          int nh, int nkv, int d, int block_size, int interleaved, int kv32,
                                          const float* __restrict__ z, const int* __restrict__ row_slot, LoraStack ls) {
    int r = blockIdx.x, h = blockIdx.y;
    int qd = nh * d, kvd = nkv * d, width = qd + 2 * kvd;
    const float* row = qkv + (size_t)r * width;
    const float* zr = lora_row(z, row_slot, r, width);
    bool stacked = ls.t && ls.row_stack[r] >= 0;
#define QKV_AT(c) ((zr ? row[c] + zr[c] : row[c]) + (bias ? bias[c] : 0.0f) + (stacked ? lora_stack_at(ls, r, c, (c) < qd ? 0 : (c) < qd + kvd ? 1 : 2) : 0.0f))
    int p = pos[r], half = d / 2;
    const float* cs = cos_t + (size_t)p * half;
    const float* sn = sin_t + (size_t)p * half;
    bool is_q = h < nh;
    int src = is_q ? h * d : qd + (h - nh) * d;
    size_t slot = 0;
    if (!is_q) {
        int block = tables[row_seq[r] * table_stride + p / block_size];
        slot = ((size_t)block * block_size + p % block_size) * kvd + (size_t)(h - nh) * d;
    }
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        float x = QKV_AT(src + a);
        float y = QKV_AT(src + b);
        float2 rot = rotate(x, y, cs[i], sn[i]);
        float ra = rot.x, rb = rot.y;
        if (is_q) {
            q[(size_t)r * qd + h * d + a] = ra;
            q[(size_t)r * qd + h * d + b] = rb;
            continue;
        }
        int vs = src + kvd;
        float va = QKV_AT(vs + a);
        float vb = QKV_AT(vs + b);
        if (kv32) {
            ((float*)kc)[slot + a] = ra;
            ((float*)kc)[slot + b] = rb;
            ((float*)vc)[slot + a] = va;
            ((float*)vc)[slot + b] = vb;
        } else {
            ((__half*)kc)[slot + a] = __float2half(ra);
            ((__half*)kc)[slot + b] = __float2half(rb);
            ((__half*)vc)[slot + a] = __float2half(va);
            ((__half*)vc)[slot + b] = __float2half(vb);
        }
    }
#undef QKV_AT
}

// Causal attention of one query row and head over its sequence's cached positions 0..=pos:
// softmax(q . k / sqrt(d)) v, online over tiles of 32 positions. Grid: (heads, rows); block:
// up to ATT_WARPS warps (8 for steps of many rows; 32 for a fused one-row step, so that a long
// context is one pass of tiles, not several one after another); warp w takes tiles
// w, w + warps, ... In a tile each lane scores one
// position (its own key row, read in 16-byte pieces against q in shared memory), then the warp
// folds the tile's values in with lanes over head-dimension pairs (dims 2 lane + 64 e, +1;
// d <= 128). The warps' partial results are merged at the end. A decode row of a short context
// is one or two tiles per warp: the positions are read in parallel, not one after another.
// Output [rows, nh * d], f16 (`out16`) or f32 (`out32`), whichever is not null.
#define ATT_WARPS 32
#define MAX_PAIRS 2

// D: the head size when known at compile time (64, 128: the loops unroll, so a lane's loads of
// its key row are all in flight at once), 0 for any other (`d`). The sums run in the same order
// either way.
template <int D>
__device__ __forceinline__ float dot_row(const __half* k, const float* q, int d) {
    float s = 0.0f;
    if (D) d = D;
    if ((d & 7) == 0) {
#pragma unroll
        for (int j = 0; j < d; j += 8) {
            uint4 raw = *(const uint4*)(k + j);
            const __half2* h = (const __half2*)&raw;
#pragma unroll
            for (int t = 0; t < 4; t++) {
                float2 f = __half22float2(h[t]);
                s += f.x * q[j + 2 * t] + f.y * q[j + 2 * t + 1];
            }
        }
    } else {
        for (int j = 0; j < d; j += 2) {
            float2 f = __half22float2(*(const __half2*)(k + j));
            s += f.x * q[j] + f.y * q[j + 1];
        }
    }
    return s;
}

template <int D>
__device__ __forceinline__ float dot_row(const float* k, const float* q, int d) {
    float s = 0.0f;
    if (D) d = D;
#pragma unroll
    for (int j = 0; j < d; j += 2) {
        float2 f = *(const float2*)(k + j);
        s += f.x * q[j] + f.y * q[j + 1];
    }
    return s;
}

__device__ __forceinline__ float2 pair_at(const __half* v, int j) { return __half22float2(*(const __half2*)(v + j)); }
__device__ __forceinline__ float2 pair_at(const float* v, int j) { return *(const float2*)(v + j); }

// The block's shared memory, declared once in `attend` (statics of each template instance would
// each take their own).
struct AttendShared {
    float qs[MAX_PAIRS * 2 * WARP];
    float sm[ATT_WARPS], sl[ATT_WARPS];
    float sacc[ATT_WARPS][MAX_PAIRS * 2 * WARP];
};

template <typename T, int D>
__device__ void attend_impl(AttendShared& sh, const float* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                            const int* __restrict__ pos, const int* __restrict__ row_seq, const int* __restrict__ tables, int table_stride,
                            __half* __restrict__ out16, float* __restrict__ out32, int nh, int nkv, int d, int block_size, float scale) {
    float* qs = sh.qs;
    float* sm = sh.sm;
    float* sl = sh.sl;
    auto& sacc = sh.sacc;
    int head = blockIdx.x, r = blockIdx.y;
    int kvh = head / (nh / nkv), kvd = nkv * d;
    // Warps in this launch (at most ATT_WARPS): the tile stride and the merge follow it.
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    const float* qr = q + (size_t)r * nh * d + head * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) qs[j] = qr[j] * scale;
    __syncthreads();
    float acc[MAX_PAIRS][2];
#pragma unroll
    for (int e = 0; e < MAX_PAIRS; e++) acc[e][0] = acc[e][1] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    int last = pos[r];
    const int* table = tables + row_seq[r] * table_stride;
    for (int t0 = warp * WARP; t0 <= last; t0 += warps * WARP) {
        int p = t0 + lane;
        bool valid = p <= last;
        size_t base = valid ? ((size_t)table[p / block_size] * block_size + p % block_size) * kvd + kvh * d : 0;
        float s = valid ? dot_row<D>(kc + base, qs, d) : -INFINITY;
        float m2 = fmaxf(m, warp_max(s));
        float c = expf(m - m2);
        float w = valid ? expf(s - m2) : 0.0f;
        l = l * c + warp_sum(w);
#pragma unroll
        for (int e = 0; e < MAX_PAIRS; e++) {
            acc[e][0] *= c;
            acc[e][1] *= c;
        }
        int n = min(WARP, last - t0 + 1);
#pragma unroll 8
        for (int i = 0; i < n; i++) {
            float wi = __shfl_sync(0xffffffffu, w, i);
            size_t bi = __shfl_sync(0xffffffffu, base, i);
#pragma unroll
            for (int e = 0; e < MAX_PAIRS; e++) {
                int j = 2 * lane + 2 * WARP * e;
                if (j < d) {
                    float2 v = pair_at(vc + bi, j);
                    acc[e][0] += wi * v.x;
                    acc[e][1] += wi * v.y;
                }
            }
        }
        m = m2;
    }
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < MAX_PAIRS; e++) {
        sacc[warp][2 * lane + 2 * WARP * e] = acc[e][0];
        sacc[warp][2 * lane + 2 * WARP * e + 1] = acc[e][1];
    }
    __syncthreads();
    // Merge: thread j of the block finishes output dim j.
    float mm = -INFINITY;
    for (int w = 0; w < warps; w++) mm = fmaxf(mm, sm[w]);
    size_t dst = (size_t)r * nh * d + head * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float ll = 0.0f, o = 0.0f;
        for (int w = 0; w < warps; w++) {
            if (sm[w] == -INFINITY) continue;
            float c = expf(sm[w] - mm);
            ll += sl[w] * c;
            o += sacc[w][j] * c;
        }
        if (out16) out16[dst + j] = __float2half(o / ll);
        else out32[dst + j] = o / ll;
    }
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * WARP) attend(const float* __restrict__ q, const void* __restrict__ kc, const void* __restrict__ vc,
                                  const int* __restrict__ pos, const int* __restrict__ row_seq, const int* __restrict__ tables, int table_stride,
                                  __half* __restrict__ out16, float* __restrict__ out32, int nh, int nkv, int d, int block_size, float scale, int kv32) {
    __shared__ AttendShared sh;
#define ATTEND(T, D) attend_impl<T, D>(sh, q, (const T*)kc, (const T*)vc, pos, row_seq, tables, table_stride, out16, out32, nh, nkv, d, block_size, scale)
    if (kv32) {
        if (d == 64) ATTEND(float, 64);
        else if (d == 128) ATTEND(float, 128);
        else ATTEND(float, 0);
    } else {
        if (d == 64) ATTEND(__half, 64);
        else if (d == 128) ATTEND(__half, 128);
        else ATTEND(__half, 0);
    }
#undef ATTEND
}

// out[r, j] = silu(gu[r, j]) * gu[r, inter + j], f16 (`out16`) or f32 (`out32`), adapter rows'
// LoRA updates `z` (or the stacks' `ls`) added to gu first. Grid: (rows, ceil(inter / block));
// one value a thread.
extern "C" __global__ void silu_mul(const float* __restrict__ gu, __half* __restrict__ out16, float* __restrict__ out32, int inter,
                                    const float* __restrict__ z, const int* __restrict__ row_slot, LoraStack ls) {
    int r = blockIdx.x;
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= inter) return;
    const float* g = gu + (size_t)r * 2 * inter;
    const float* zr = lora_row(z, row_slot, r, 2 * inter);
    float x = zr ? g[j] + zr[j] : g[j];
    float u = zr ? g[inter + j] + zr[inter + j] : g[inter + j];
    if (ls.t && ls.row_stack[r] >= 0) {
        x += lora_stack_at(ls, r, j, 0);
        u += lora_stack_at(ls, r, inter + j, 1);
    }
    float v = silu_times(x, u);
    if (out16) out16[(size_t)r * inter + j] = __float2half(v);
    else out32[(size_t)r * inter + j] = v;
}

// Logits written in f16 by another runtime (ONNX Runtime's CUDA provider) widened to f32 for the
// greedy pick and `sample_rows` (exact: every f16 is an f32). Grid-stride over n elements.
extern "C" __global__ void f16_to_f32(const __half* __restrict__ in, float* __restrict__ out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) out[i] = __half2float(in[i]);
}

// The greedy pick in two launches, so that one row's 150k logits spread over many blocks:
// argmax_part writes each slice's (largest value, lowest index holding it) to part[r, slice]
// (grid: (rows, ARGMAX_SLICES); block: 256), argmax_rows takes the winner of a row's slices
// (grid: rows; block: 32). ids[r] = the lowest index of the largest logit of row r; NaN never
// wins; a row of -inf and NaN only gives 0.
#define ARGMAX_SLICES 64

__device__ __forceinline__ void better(float& bv, int& bi, float v, int i) {
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

extern "C" __global__ void argmax_part(const float* __restrict__ logits, int vocab, float* __restrict__ part_v, int* __restrict__ part_i) {
    int r = blockIdx.x, slice = blockIdx.y;
    int per = (vocab + ARGMAX_SLICES - 1) / ARGMAX_SLICES;
    int lo = slice * per, hi = min(vocab, lo + per);
    const float* l = logits + (size_t)r * vocab;
    float best = -INFINITY;
    int arg = 0x7fffffff;
#pragma unroll 4
    for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        float v = l[j];
        if (v > best) { best = v; arg = j; }
    }
    for (int o = WARP / 2; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, arg, o);
        better(best, arg, ov, oi);
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) { sv[warp] = best; si[warp] = arg; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / WARP); w++) better(best, arg, sv[w], si[w]);
        part_v[r * ARGMAX_SLICES + slice] = best;
        part_i[r * ARGMAX_SLICES + slice] = arg;
    }
}

extern "C" __global__ void argmax_rows(const float* __restrict__ part_v, const int* __restrict__ part_i, int* __restrict__ ids) {
    int r = blockIdx.x;
    float best = -INFINITY;
    int arg = 0x7fffffff;
    for (int k = threadIdx.x; k < ARGMAX_SLICES; k += blockDim.x) better(best, arg, part_v[r * ARGMAX_SLICES + k], part_i[r * ARGMAX_SLICES + k]);
    for (int o = WARP / 2; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, arg, o);
        better(best, arg, ov, oi);
    }
    if (threadIdx.x == 0) ids[r] = arg == 0x7fffffff ? 0 : arg;
}

// ---- Sampling on the device (rows at temperature > 0 without penalties, bias, grammar or
// logprobs; the rest are greedy here or sampled on the host). Same distribution as the host's
// sampler (src/engine/sampler.rs): weights w = exp((l - max) / T), the most likely token weight 1;
// top-k, then top-p over the top-k survivors' mass, then min-p (w >= min_p); a draw with the
// sequence's own uniform u. Thresholds are exact: the k-th largest weight and the top-p cut are
// found by radix descent over the weights' bits (w >= 0, so their bit patterns order like the
// values), four passes of 8 bits; masses are summed in 2^-40 fixed point, so every sum is exact
// and the same in any order (a seed gives the same token whatever the batch). Kept tokens are
// drawn in id order (the host draws truncated sets in probability order: the same distribution,
// another order). Ties at a threshold are all kept.
struct SampleParams {
    float inv_t;
    int top_k;
    float top_p;
    float min_p;
    double u;
    int on;
    int pad;
};

#define SAMPLE_THREADS 1024
#define FIXED_ONE 1099511627776.0  // 2^40

__device__ __forceinline__ unsigned long long fixed_w(float w) { return (unsigned long long)((double)w * FIXED_ONE); }

__device__ unsigned long long block_sum_u64(unsigned long long v) {
    __shared__ unsigned long long part[32];
    __shared__ unsigned long long total;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long s = 0;
        for (int w = 0; w < (int)(blockDim.x / WARP); w++) s += part[w];
        total = s;
    }
    __syncthreads();
    unsigned long long t = total;
    __syncthreads();
    return t;
}

// Exclusive prefix sum over the block's threads (in thread order); *total gets the sum of all.
__device__ unsigned long long block_exclusive_scan_u64(unsigned long long v, unsigned long long* total) {
    __shared__ unsigned long long warp_tot[32];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    unsigned long long inc = v;
    for (int o = 1; o < WARP; o <<= 1) {
        unsigned long long n = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += n;
    }
    if (lane == WARP - 1) warp_tot[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        unsigned long long t = lane < warps ? warp_tot[lane] : 0;
        for (int o = 1; o < WARP; o <<= 1) {
            unsigned long long n = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += n;
        }
        if (lane < warps) warp_tot[lane] = t;  // inclusive over warps
    }
    __syncthreads();
    unsigned long long base = warp > 0 ? warp_tot[warp - 1] : 0;
    *total = warp_tot[warps - 1];
    __syncthreads();
    return base + inc - v;
}

// The largest weight value t (as bits) such that the elements >= t (among those >= floor) hold at
// least `need` of count (by_mass = 0) or of fixed-point mass (by_mass = 1).
__device__ unsigned radix_cut(const float* w, int vocab, unsigned floor_bits, unsigned long long need, int by_mass) {
    __shared__ unsigned long long hist[256];
    __shared__ unsigned long long stash[SAMPLE_THREADS / WARP][WARP];
    __shared__ unsigned s_prefix;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    __shared__ unsigned long long s_above;
    unsigned prefix = 0, mask = 0;
    unsigned long long above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        // Lanes of a warp that fall in one bin add to it once (the leader sums their values in lane
        // order): weights bunch into a few bins, and one atomic per element there serialises.
        for (int j0 = 0; j0 < vocab; j0 += blockDim.x) {
            int j = j0 + threadIdx.x;
            unsigned key = 256;
            unsigned long long val = 0;
            if (j < vocab) {
                unsigned bits = __float_as_uint(w[j]);
                if (bits >= floor_bits && (bits & mask) == prefix) {
                    key = (bits >> shift) & 0xff;
                    val = by_mass ? fixed_w(w[j]) : 1ull;
                }
            }
            stash[warp][lane] = val;
            __syncwarp();
            unsigned peers = __match_any_sync(0xffffffffu, key);
            if (key < 256 && lane == __ffs(peers) - 1) {
                unsigned long long sum = 0;
                for (unsigned m = peers; m; m &= m - 1) sum += stash[warp][__ffs(m) - 1];
                atomicAdd(&hist[key], sum);
            }
            __syncwarp();
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int b = 255;
            for (; b > 0; b--) {
                if (above + hist[b] >= need) break;
                above += hist[b];
            }
            s_prefix = prefix | ((unsigned)b << shift);
            s_above = above;
        }
        __syncthreads();
        prefix = s_prefix;
        above = s_above;
        mask |= 0xffu << shift;
        __syncthreads();
    }
    return prefix;
}

// One block per logit row; rows whose params are off keep the greedy pick of argmax_rows.
// Overwrites an on row's logits with its weights.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(float* __restrict__ logits, int vocab, const SampleParams* __restrict__ params, int* __restrict__ ids) {
    int r = blockIdx.x;
    SampleParams p = params[r];
    if (!p.on) return;
    float* w = logits + (size_t)r * vocab;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, w[j]);
    mx = block_max(mx);
    if (!isfinite(mx)) return;  // nothing finite to weigh: the greedy pick stands, as on the host
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float e = expf((w[j] - mx) * p.inv_t);
        w[j] = isnan(e) ? 0.0f : e;
    }
    __syncthreads();
    unsigned cut = 0;
    if (p.top_k > 0 && p.top_k < vocab) cut = radix_cut(w, vocab, 0, (unsigned long long)p.top_k, 0);
    if (p.top_p < 1.0f) {
        unsigned long long mass = 0;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            if (__float_as_uint(w[j]) >= cut) mass += fixed_w(w[j]);
        }
        mass = block_sum_u64(mass);
        unsigned long long need = (unsigned long long)((double)p.top_p * (double)mass);
        if (need == 0) need = 1;
        cut = radix_cut(w, vocab, cut, need, 1);
    }
    if (p.min_p > 0.0f) cut = max(cut, __float_as_uint(fminf(p.min_p, 1.0f)));
    // The draw: thread t owns ids [t * chunk, (t + 1) * chunk); an exclusive scan of the chunks'
    // kept mass, then the thread whose range holds u * total walks its chunk.
    int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    int lo = min(vocab, (int)threadIdx.x * chunk), hi = min(vocab, lo + chunk);
    unsigned long long own = 0;
    for (int j = lo; j < hi; j++) {
        if (__float_as_uint(w[j]) >= cut) own += fixed_w(w[j]);
    }
    unsigned long long total;
    unsigned long long before = block_exclusive_scan_u64(own, &total);
    unsigned long long target = (unsigned long long)(p.u * (double)total);
    if (target >= total) target = total - 1;
    if (total > 0 && before <= target && target < before + own) {
        unsigned long long cum = before;
        for (int j = lo; j < hi; j++) {
            if (__float_as_uint(w[j]) < cut) continue;
            cum += fixed_w(w[j]);
            if (target < cum) {
                ids[r] = j;
                break;
            }
        }
    }
}

// dst[pairs[2i]] = pairs[2i + 1] for i < n (block-table entries of newly taken KV blocks).
extern "C" __global__ void scatter_i32(int* __restrict__ dst, const int* __restrict__ pairs, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[pairs[2 * i]] = pairs[2 * i + 1];
}

// Async scheduling: a row that feeds the token the step before picked for its sequence takes it
// from that step's picks, which the host has not read yet. pairs[2i] is the row, pairs[2i+1] the
// sequence's logit row in `picks`.
extern "C" __global__ void gather_ids(int* __restrict__ ids, const int* __restrict__ picks, const int* __restrict__ pairs, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) ids[pairs[2 * i]] = picks[pairs[2 * i + 1]];
}

// LoRA rows (Punica / S-LoRA): each row of a step may use its own adapter (or none), and a
// projection group's low-rank updates for all rows are one launch, whatever the mix. `table` holds
// one entry per (adapter slot, layer, module) (lora.rs writes it); `row_slot[r]` is row r's
// adapter slot, -1 for a base-model row. A group is the modules that share one product's input
// (q/k/v, gate/up) or one module alone; `m0` is its first module (grid.y counts its modules).
//
// The updates go to `z`, a buffer of the product's output width, not into the product: forward.rs
// runs them on a second stream while cuBLAS runs the product, and the kernel that reads the
// product (qkv_rope_store, silu_mul, or rms_norm for the residual stream) adds an adapter row's
// update (`lora_row`). So every adapter row's update is written every step, zeros for the
// modules its adapter does not target.
struct LoraEntry {
    const float* a;   // [rank, in_dim]
    const float* bt;  // B transposed: [rank, out_dim]
    int rank;         // 0: this adapter does not target the module
    float scale;
    int out_dim;
    int col;          // first column of the module's output in the product's output row
};
#define LORA_MODULES 7
#define LORA_MAX_RANK 256

__device__ __forceinline__ const LoraEntry* lora_entry(const LoraEntry* table, int slot, int layer, int layers, int m) {
    return table + ((size_t)slot * layers + layer) * LORA_MODULES + m;
}

// The rows are gathered by adapter into tiles of up to LORA_TILE rows (Punica's SGMV: one small
// product per adapter over its rows), so that a block reads an adapter's weights once for all
// the rows of its tile. `tiles` (forward.rs writes it each step): tiles[0] the number of tiles,
// then per tile its adapter slot and LORA_TILE row indices, -1 past its last row. Blocks take
// tiles blockIdx.x, blockIdx.x + gridDim.x, ... (the grid is fixed per graph, the number of
// tiles is not). A row's sums run in the same order whichever tile and position it has, so a
// row gives what it gives alone, bit for bit.
#define LORA_TILE 4
#define LORA_TILE_INTS (1 + LORA_TILE)
#define LORA_KG 2
#define LORA_THREADS 256
#define LORA_WARPS (LORA_THREADS / WARP)

// x[i .. i + 4) of an f16 or f32 row (i a multiple of 4, the row's start 8-byte aligned for f16 and
// 16-byte aligned for f32).
__device__ __forceinline__ float4 load4(const __half* x16, const float* x32, size_t i) {
    if (!x32) {
        uint2 u = *(const uint2*)(x16 + i);
        float2 lo = __half22float2(*(const __half2*)&u.x), hi = __half22float2(*(const __half2*)&u.y);
        return make_float4(lo.x, lo.y, hi.x, hi.y);
    }
    return *(const float4*)(x32 + i);
}

// Sums each of a lane's 32 values over the warp's 32 lanes; lane l gets the sum of values l (a
// transposing butterfly: 31 exchanges for 32 sums instead of 5 each). Every sum pairs lanes by
// xor 16, 8, 4, 2, 1 as warp_sum does, so each is what warp_sum gives for its value, whatever
// its index.
// lora_update: z[r, col_j + o] = sum_k Bt_j[k, o] t[k], t = scale * A_j x_r, for the rows r of a
// tile (zeros where the adapter does not target module j); x the product's input (f16 `x16` or
// f32 `x32`, rows of `in_dim`), `z` rows of `z_stride`. One launch for a group: each block first
// computes its tile's t for module j (warp w takes rank indices w * LORA_KG.., stepping by
// LORA_WARPS * LORA_KG; a lane takes every 32nd run of 4 inputs, then warp sums, so a row's t
// does not depend on the tile), then a thread per output column sums B's column against t, each
// of B's values read once for the tile. Every column block of a tile computes t again: cheaper
// than a second launch. Grid: (tile blocks, modules * col_blocks); block: LORA_THREADS.
extern "C" __global__ void __launch_bounds__(LORA_THREADS, 2) lora_update(const LoraEntry* __restrict__ table, int layer, int layers, int m0, const int* __restrict__ tiles,
                                       const __half* __restrict__ x16, const float* __restrict__ x32, int in_dim, float* __restrict__ z, int z_stride, int col_blocks) {
    __shared__ float ts[LORA_TILE][LORA_MAX_RANK];
    int j = blockIdx.y / col_blocks;
    int o = (blockIdx.y % col_blocks) * LORA_THREADS + threadIdx.x;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int n4 = in_dim % 4 == 0 ? in_dim / 4 : 0;
    int n = tiles[0];
    for (int tile = blockIdx.x; tile < n; tile += gridDim.x) {
        const int* tr = tiles + 1 + (size_t)tile * LORA_TILE_INTS;
        int rows[LORA_TILE];
#pragma unroll
        for (int q = 0; q < LORA_TILE; q++) rows[q] = tr[1 + q];
        const LoraEntry e = *lora_entry(table, tr[0], layer, layers, m0 + j);
        // A column block past this module's width (a narrow module beside a wide one: k and v
        // beside q) has nothing to write: the whole block skips the tile (every entry of a module
        // holds its width, so this is the same for every thread).
        if (o - (int)threadIdx.x >= e.out_dim) continue;
        for (int k0 = warp * LORA_KG; k0 < e.rank; k0 += LORA_WARPS * LORA_KG) {
            int nk = min(LORA_KG, e.rank - k0);
            float acc[LORA_TILE][LORA_KG];
#pragma unroll
            for (int q = 0; q < LORA_TILE; q++)
#pragma unroll
                for (int kk = 0; kk < LORA_KG; kk++) acc[q][kk] = 0.0f;
#pragma unroll 2
            for (int i4 = lane; i4 < n4; i4 += WARP) {
                float4 a[LORA_KG];
#pragma unroll
                for (int kk = 0; kk < LORA_KG; kk++) a[kk] = kk < nk ? *(const float4*)(e.a + (size_t)(k0 + kk) * in_dim + 4 * i4) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
                for (int q = 0; q < LORA_TILE; q++) {
                    if (rows[q] < 0) continue;
                    float4 xv = load4(x16, x32, (size_t)rows[q] * in_dim + 4 * i4);
#pragma unroll
                    for (int kk = 0; kk < LORA_KG; kk++) {
                        acc[q][kk] += a[kk].x * xv.x;
                        acc[q][kk] += a[kk].y * xv.y;
                        acc[q][kk] += a[kk].z * xv.z;
                        acc[q][kk] += a[kk].w * xv.w;
                    }
                }
            }
            for (int i = 4 * n4 + lane; i < in_dim; i += WARP) {
                float a[LORA_KG];
#pragma unroll
                for (int kk = 0; kk < LORA_KG; kk++) a[kk] = kk < nk ? e.a[(size_t)(k0 + kk) * in_dim + i] : 0.0f;
#pragma unroll
                for (int q = 0; q < LORA_TILE; q++) {
                    if (rows[q] < 0) continue;
                    size_t xi = (size_t)rows[q] * in_dim + i;
                    float xv = x32 ? x32[xi] : __half2float(x16[xi]);
#pragma unroll
                    for (int kk = 0; kk < LORA_KG; kk++) acc[q][kk] += a[kk] * xv;
                }
            }
#pragma unroll
            for (int q = 0; q < LORA_TILE; q++)
#pragma unroll
                for (int kk = 0; kk < LORA_KG; kk++) {
                    float v = warp_sum(acc[q][kk]);
                    if (lane == 0 && kk < nk) ts[q][k0 + kk] = v * e.scale;
                }
        }
        __syncthreads();
        if (o < e.out_dim) {
            const float* bt = e.bt + o;
            float acc[LORA_TILE];
#pragma unroll
            for (int q = 0; q < LORA_TILE; q++) acc[q] = 0.0f;
#pragma unroll 8
            for (int k = 0; k < e.rank; k++) {
                float b = bt[(size_t)k * e.out_dim];
#pragma unroll
                for (int q = 0; q < LORA_TILE; q++) acc[q] += b * ts[q][k];
            }
#pragma unroll
            for (int q = 0; q < LORA_TILE; q++)
                if (rows[q] >= 0) z[(size_t)rows[q] * z_stride + e.col + o] = acc[q];
        }
        __syncthreads();  // `ts` is written again for the next tile
    }
}

#include "gemv_row.cuh"
