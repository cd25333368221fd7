// One-row products for decode steps of a single row (`CudaOptions::fused_row`): each folds the
// kernel that makes its input into the product, so a layer of a one-row step is six launches
// instead of nine (forward.rs). Included by kernels.cu (it uses WARP, warp_sum and block_sum).
//
// gemv_row: y[o] (+)= sum_i W[o, i] in[i], W row-major [n, k] f16, for the one row of the step,
// with the input made by the block itself, in f16 as the unfused kernels write it for cuBLAS:
//   mode 0  in = h16[i] (attention's output, for the output product);
//   mode 1  in = f16(x[i] * inv * nw[i]), inv = 1 / sqrt(mean(x^2) + eps) (RMSNorm, as `rms_norm`
//           computes it: same block size, same sums, so the same values);
//   mode 2  in = f16(silu(gu[i]) * gu[k + i]) (as `silu_mul`).
// `accumulate`: y += (the residual stream), else y =. The input is staged in shared memory
// (k <= GEMV_MAX_K, k a multiple of 8, W 16-byte aligned: forward.rs checks); then each warp takes
// output rows o = blockIdx.x * GEMV_WARPS + warp, stepping by the grid, a lane 8 weights (16
// bytes) at a time, summed over the warp. Grid: any; block: GEMV_WARPS warps.
#define GEMV_MAX_K 16384
#define GEMV_WARPS 8

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP) gemv_row(const __half* __restrict__ W, int n, int k, int mode, const __half* __restrict__ h16,
                                                                          const float* __restrict__ x, const float* __restrict__ nw, float eps,
                                                                          const float* __restrict__ gu, float* __restrict__ y, int accumulate) {
    __shared__ __align__(16) __half xs[GEMV_MAX_K];
    if (mode == 1) {
        float ss = 0.0f;
        for (int j = threadIdx.x; j < k; j += blockDim.x) ss += x[j] * x[j];
        ss = block_sum(ss);
        float inv = rsqrtf(ss / k + eps);
        for (int j = threadIdx.x; j < k; j += blockDim.x) xs[j] = __float2half(x[j] * inv * nw[j]);
    } else if (mode == 2) {
        for (int j = threadIdx.x; j < k; j += blockDim.x) {
            float g = gu[j], u = gu[k + j];
            xs[j] = __float2half(g / (1.0f + expf(-g)) * u);
        }
    } else {
        for (int j = threadIdx.x; j < k; j += blockDim.x) xs[j] = h16[j];
    }
    __syncthreads();
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int k8 = k / 8;
    for (int o = blockIdx.x * GEMV_WARPS + warp; o < n; o += gridDim.x * GEMV_WARPS) {
        const uint4* wr = (const uint4*)(W + (size_t)o * k);
        float acc = 0.0f;
#pragma unroll 4
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
        acc = warp_sum(acc);
        if (lane == 0) y[o] = accumulate ? y[o] + acc : acc;
    }
}
