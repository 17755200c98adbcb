// Device helpers shared by the kernel files (nvcc only).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.h"

namespace moeflux::cuda {

__device__ __forceinline__ float bf16_to_f32(uint16_t h) {
  return __uint_as_float(uint32_t(h) << 16);
}
__device__ __forceinline__ float f16_to_f32(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}
// As cpu_backend.cpp: 1 / (1 + exp(-x)) and x / (1 + exp(-x)).
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float siluf_(float x) { return x / (1.0f + expf(-x)); }

// Sum of one double per thread over the block in a fixed order: a xor-shuffle tree in each
// warp, then the warps' sums added in warp order (blockDim.x a multiple of 32, <= 1024);
// `red` is 32 doubles of shared memory. Every thread gets the sum.
__device__ __forceinline__ double block_sum_double(double v, double* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double s = red[0];
  for (int w = 1; w < int(blockDim.x >> 5); w++) s += red[w];
  __syncthreads();  // red is free again
  return s;
}

inline int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

}  // namespace moeflux::cuda
