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

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x / WARP) ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float t = total;
    __syncthreads();
    return t;
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
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, const int* __restrict__ rows, __half* __restrict__ out16, float* __restrict__ out32, int hidden, float eps) {
    int i = blockIdx.x;
    int row = rows ? rows[i] : i;
    const float* xr = x + (size_t)row * hidden;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss);
    float inv = rsqrtf(ss / hidden + eps);
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        float v = xr[j] * inv * w[j];
        if (out16) out16[(size_t)i * hidden + j] = __float2half(v);
        else out32[(size_t)i * hidden + j] = v;
    }
}

// Rotates one head in place: pairs (2i, 2i + 1) when interleaved, else (i, i + half).
__device__ __forceinline__ void rotate(float* h, const float* cs, const float* sn, int half, int interleaved) {
    for (int i = threadIdx.x % WARP; i < half; i += WARP) {
        int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        float x = h[a], y = h[b];
        h[a] = x * cs[i] - y * sn[i];
        h[b] = x * sn[i] + y * cs[i];
    }
}

// For each row: adds the q/k/v bias (if any), rotates q and k by the row's position (tables
// cos/sin [positions, head_dim / 2]), writes q to `q` [rows, nh * d] and k, v into the paged cache.
// Grid: rows; block: 128 (one warp per head at a time).
extern "C" __global__ void qkv_rope_store(float* __restrict__ qkv, const float* __restrict__ bias, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                          const int* __restrict__ pos, const int* __restrict__ row_seq, const int* __restrict__ tables, int table_stride,
                                          float* __restrict__ q, void* __restrict__ kc, void* __restrict__ vc,
                                          int nh, int nkv, int d, int block_size, int interleaved, int kv32) {
    int r = blockIdx.x;
    int qd = nh * d, kvd = nkv * d, width = qd + 2 * kvd;
    float* row = qkv + (size_t)r * width;
    if (bias) {
        for (int j = threadIdx.x; j < width; j += blockDim.x) row[j] += bias[j];
        __syncthreads();
    }
    int p = pos[r], half = d / 2;
    const float* cs = cos_t + (size_t)p * half;
    const float* sn = sin_t + (size_t)p * half;
    int warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    for (int h = warp; h < nh + nkv; h += warps) rotate(row + h * d, cs, sn, half, interleaved);
    __syncthreads();
    for (int j = threadIdx.x; j < qd; j += blockDim.x) q[(size_t)r * qd + j] = row[j];
    int block = tables[row_seq[r] * table_stride + p / block_size];
    size_t slot = ((size_t)block * block_size + p % block_size) * kvd;
    for (int j = threadIdx.x; j < kvd; j += blockDim.x) {
        if (kv32) {
            ((float*)kc)[slot + j] = row[qd + j];
            ((float*)vc)[slot + j] = row[qd + kvd + j];
        } else {
            ((__half*)kc)[slot + j] = __float2half(row[qd + j]);
            ((__half*)vc)[slot + j] = __float2half(row[qd + kvd + j]);
        }
    }
}

// Causal attention of one query row and head over its sequence's cached positions 0..=pos:
// softmax(q . k / sqrt(d)) v, online over the positions. Grid: (heads, rows); block: 4 warps,
// warp w takes positions w, w + 4, ...; a lane holds head dims lane, lane + 32, ... (d <= 128).
// The warps' partial results are merged at the end. Output [rows, nh * d], f16 (`out16`) or f32
// (`out32`), whichever is not null.
#define ATT_WARPS 4
#define MAX_PER_LANE 4
__device__ __forceinline__ float kv_at(const void* c, size_t i, int kv32) {
    return kv32 ? ((const float*)c)[i] : __half2float(((const __half*)c)[i]);
}

extern "C" __global__ void attend(const float* __restrict__ q, const void* __restrict__ kc, const void* __restrict__ vc,
                                  const int* __restrict__ pos, const int* __restrict__ row_seq, const int* __restrict__ tables, int table_stride,
                                  __half* __restrict__ out16, float* __restrict__ out32, int nh, int nkv, int d, int block_size, float scale, int kv32) {
    int head = blockIdx.x, r = blockIdx.y;
    int kvh = head / (nh / nkv), kvd = nkv * d;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int per = (d + WARP - 1) / WARP;
    float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
    const float* qr = q + (size_t)r * nh * d + head * d;
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++) {
        int j = lane + e * WARP;
        qv[e] = (e < per && j < d) ? qr[j] : 0.0f;
        acc[e] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    int last = pos[r];
    const int* table = tables + row_seq[r] * table_stride;
    for (int p = warp; p <= last; p += ATT_WARPS) {
        size_t base = ((size_t)table[p / block_size] * block_size + p % block_size) * kvd + kvh * d;
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++) {
            int j = lane + e * WARP;
            if (e < per && j < d) s += qv[e] * kv_at(kc, base + j, kv32);
        }
        s = warp_sum(s) * scale;
        float m2 = fmaxf(m, s);
        float c = expf(m - m2), w = expf(s - m2);
        l = l * c + w;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++) {
            int j = lane + e * WARP;
            float v = (e < per && j < d) ? kv_at(vc, base + j, kv32) : 0.0f;
            acc[e] = acc[e] * c + w * v;
        }
        m = m2;
    }
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][MAX_PER_LANE * WARP];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++) sacc[warp][lane + e * WARP] = acc[e];
    __syncthreads();
    if (warp == 0) {
        float mm = -INFINITY;
        for (int w = 0; w < ATT_WARPS; w++) mm = fmaxf(mm, sm[w]);
        float ll = 0.0f;
        float o[MAX_PER_LANE] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int w = 0; w < ATT_WARPS; w++) {
            if (sm[w] == -INFINITY) continue;
            float c = expf(sm[w] - mm);
            ll += sl[w] * c;
#pragma unroll
            for (int e = 0; e < MAX_PER_LANE; e++) o[e] += sacc[w][lane + e * WARP] * c;
        }
        size_t dst = (size_t)r * nh * d + head * d;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++) {
            int j = lane + e * WARP;
            if (e < per && j < d) {
                if (out16) out16[dst + j] = __float2half(o[e] / ll);
                else out32[dst + j] = o[e] / ll;
            }
        }
    }
}

// out[r, j] = silu(gu[r, j]) * gu[r, inter + j], f16 (`out16`) or f32 (`out32`). Grid: rows;
// block: 256.
extern "C" __global__ void silu_mul(const float* __restrict__ gu, __half* __restrict__ out16, float* __restrict__ out32, int inter) {
    int r = blockIdx.x;
    const float* g = gu + (size_t)r * 2 * inter;
    for (int j = threadIdx.x; j < inter; j += blockDim.x) {
        float x = g[j];
        float v = x / (1.0f + expf(-x)) * g[inter + j];
        if (out16) out16[(size_t)r * inter + j] = __float2half(v);
        else out32[(size_t)r * inter + j] = v;
    }
}

// ids[r] = the lowest index of the largest logit of row r (NaN never wins). Grid: rows; block: 256.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab, int* __restrict__ ids) {
    int r = blockIdx.x;
    const float* l = logits + (size_t)r * vocab;
    float best = -INFINITY;
    int arg = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = l[j];
        if (v > best) { best = v; arg = j; }
    }
    __shared__ float sv[256];
    __shared__ int si[256];
    sv[threadIdx.x] = best;
    si[threadIdx.x] = arg;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float ov = sv[threadIdx.x + s];
            int oi = si[threadIdx.x + s];
            if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) {
                sv[threadIdx.x] = ov;
                si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) ids[r] = si[0] == 0x7fffffff ? 0 : si[0];
}

// dst[pairs[2i]] = pairs[2i + 1] for i < n (block-table entries of newly taken KV blocks).
extern "C" __global__ void scatter_i32(int* __restrict__ dst, const int* __restrict__ pairs, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[pairs[2 * i]] = pairs[2 * i + 1];
}
