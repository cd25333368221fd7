// One-row products for decode steps of a single row (`CudaOptions::fused_row`): each folds the
// kernel that makes its input (and for q/k/v, the one that reads its output) into the product,
// so a layer of a one-row step is five launches instead of nine (fused_row.rs). Included by
// kernels.cu (it uses WARP, warp_sum, rms_inv, silu_times and rotate).
//
// gemv_row: y[o] (+)= sum_i W[o, i] in[i], W row-major [n, k] f16, for the one row of the step,
// with the input made by the block itself, in f16 as the unfused kernels write it for cuBLAS:
//   mode 0  in = h16[i] (attention's output, for the output product);
//   mode 1  in = f16(x[i] * inv * nw[i]), inv = 1 / sqrt(mean(x^2) + eps) (RMSNorm, as `rms_norm`
//           computes it: same block size, same sums, so the same values);
//   mode 2  in = f16(silu(gu[i]) * gu[k + i]) (as `silu_mul`).
// `accumulate`: y += (the residual stream), else y =. The input is staged in shared memory
// (k <= GEMV_MAX_K, k a multiple of 8, W 16-byte aligned: fused_row.rs checks); then each warp
// takes output rows o = blockIdx.x * GEMV_WARPS + warp, stepping by the grid, a lane 8 weights
// (16 bytes) at a time, summed over the warp. Grid: any; block: GEMV_WARPS warps.
#define GEMV_MAX_K 16384
#define GEMV_WARPS 8

// The block's input row in `xs` (k values, f16), made as `gemv_row`'s modes say. Ends with a
// barrier.
__device__ __forceinline__ void gemv_stage(__half* xs, int k, int mode, const __half* __restrict__ h16, const float* __restrict__ x, const float* __restrict__ nw, float eps,
                                           const float* __restrict__ gu) {
    if (mode == 1) {
        float inv = rms_inv(x, k, eps);
        for (int j = threadIdx.x; j < k; j += blockDim.x) xs[j] = __float2half(x[j] * inv * nw[j]);
    } else if (mode == 2) {
        for (int j = threadIdx.x; j < k; j += blockDim.x) xs[j] = __float2half(silu_times(gu[j], gu[k + j]));
    } else {
        for (int j = threadIdx.x; j < k; j += blockDim.x) xs[j] = h16[j];
    }
    __syncthreads();
}

// sum_i w[i] xs[i] over the warp (k8 = k / 8 runs of 8 values; each lane reads 16 bytes of `w` a
// run, up to 8 runs in flight: a 4864-wide row is 19 runs a lane); every lane gets the sum.
__device__ __forceinline__ float gemv_dot(const __half* __restrict__ w, const __half* xs, int k8, int lane) {
    const uint4* wr = (const uint4*)w;
    float acc = 0.0f;
#pragma unroll 8
    for (int c = lane; c < k8; c += WARP) {
        uint4 wv = wr[c];
        uint4 xv = *(const uint4*)(xs + 8 * c);
        const __half2* w2 = (const __half2*)&wv;
        const __half2* x2 = (const __half2*)&xv;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float2 wf = __half22float2(w2[e]), xf = __half22float2(x2[e]);
            acc += wf.x * xf.x;
            acc += wf.y * xf.y;
        }
    }
    return warp_sum(acc);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP) gemv_row(const __half* __restrict__ W, int n, int k, int mode, const __half* __restrict__ h16,
                                                                          const float* __restrict__ x, const float* __restrict__ nw, float eps,
                                                                          const float* __restrict__ gu, float* __restrict__ y, int accumulate) {
    __shared__ __align__(16) __half xs[GEMV_MAX_K];
    gemv_stage(xs, k, mode, h16, x, nw, eps, gu);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (int o = blockIdx.x * GEMV_WARPS + warp; o < n; o += gridDim.x * GEMV_WARPS) {
        float acc = gemv_dot(W + (size_t)o * k, xs, k / 8, lane);
        if (lane == 0) y[o] = accumulate ? y[o] + acc : acc;
    }
}

// The one-row q/k/v product with what `qkv_rope_store` does after it folded in: the input is
// RMSNorm of the residual stream `x` (gemv_row's mode 1), and a warp takes a pair of a head's
// outputs (a, b: (2i, 2i + 1) when interleaved, else (i, i + d/2)): it adds the bias, rotates a
// query or key pair by the row's position and writes it to `q` or the key cache, or writes a value
// pair to the value cache (f16 caches; the layout of qkv_rope_store). Jobs: (nh + 2 nkv) heads x
// d/2 pairs, warps stepping by the grid. Grid: any; block: GEMV_WARPS warps.
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP) gemv_qkv_rope(const __half* __restrict__ W, int k, const float* __restrict__ x, const float* __restrict__ nw, float eps,
                                                                               const float* __restrict__ bias, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                                                               const int* __restrict__ pos, const int* __restrict__ row_seq, const int* __restrict__ tables, int table_stride,
                                                                               float* __restrict__ q, __half* __restrict__ kc, __half* __restrict__ vc, int nh, int nkv, int d, int block_size,
                                                                               int interleaved) {
    __shared__ __align__(16) __half xs[GEMV_MAX_K];
    gemv_stage(xs, k, 1, nullptr, x, nw, eps, nullptr);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int half = d / 2, qd = nh * d, kvd = nkv * d;
    int p = pos[0];
    int block = tables[row_seq[0] * table_stride + p / block_size];
    size_t slot = ((size_t)block * block_size + p % block_size) * kvd;
    int jobs = (nh + 2 * nkv) * half;
    for (int job = blockIdx.x * GEMV_WARPS + warp; job < jobs; job += gridDim.x * GEMV_WARPS) {
        int hd = job / half, i = job % half;
        int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        int src = hd < nh ? hd * d : hd < nh + nkv ? qd + (hd - nh) * d : qd + kvd + (hd - nh - nkv) * d;
        float ya = gemv_dot(W + (size_t)(src + a) * k, xs, k / 8, lane);
        float yb = gemv_dot(W + (size_t)(src + b) * k, xs, k / 8, lane);
        if (lane != 0) continue;
        if (bias) {
            ya += bias[src + a];
            yb += bias[src + b];
        }
        if (hd >= nh + nkv) {
            size_t at = slot + (size_t)(hd - nh - nkv) * d;
            vc[at + a] = __float2half(ya);
            vc[at + b] = __float2half(yb);
            continue;
        }
        float cs = cos_t[(size_t)p * half + i], sn = sin_t[(size_t)p * half + i];
        float2 rot = rotate(ya, yb, cs, sn);
        float ra = rot.x, rb = rot.y;
        if (hd < nh) {
            q[(size_t)hd * d + a] = ra;
            q[(size_t)hd * d + b] = rb;
        } else {
            size_t at = slot + (size_t)(hd - nh) * d;
            kc[at + a] = __float2half(ra);
            kc[at + b] = __float2half(rb);
        }
    }
}
