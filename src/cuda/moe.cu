// moe_experts when every expert of the layer is resident: the [T, k] ids stay on the device
// and two kernels do the whole layer, so a decode step never waits for the host (and can be
// replayed as a graph). Kernel 1: for every (token, choice) slot, gate and up rows of the
// slot's expert and silu(gate)·up (plus the shared expert's, plus its router logit); kernel 2:
// for every token, each output row's down products of its k slots, weighted and added in
// choice order, then the shared expert's gated row. Every dot product is matvec.cuh's, and the
// element-wise steps are those of the grouped path (cuda_backend.cpp: silu_mul, scatter,
// sum_slots, add_gated_rows) in the same order, so both paths give the same bits.
#include "cuda/matvec.cuh"

namespace moeflux::cuda {

namespace {

constexpr int kRows = kWarps;  // output rows per block (block_dot4)

// Jobs (blockIdx.y): T*K routed slots, then T shared-expert rows (S > 0), then T router logits
// of the shared expert (when it has a router). blockIdx.x: rows kRows*x.. of the job.
__global__ void __launch_bounds__(kWarps * 32) moe_gate_up_kernel(MoeDirect a) {
  __shared__ float part[kWarps][1];
  __shared__ float rg[kRows], ru[kRows];
  const int job = blockIdx.y, TK = a.T * a.K, tid = threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  if (job < TK) {
    if (r0 >= a.I) return;
    float* out = a.h + int64_t(job) * a.I;
    const int e = a.ids[job];
    if (e < 0 || e >= a.E) {  // never from route(); poisons the row so the NaN check reports it
      if (tid < kRows && r0 + tid < a.I) out[r0 + tid] = __int_as_float(0x7fc00000);
      return;
    }
    // Copies in registers: fields read through a reference to global memory would be loaded
    // again at every use in the row loops.
    const WMat gate = a.experts[e].gate, up = a.experts[e].up;
    const float* x = a.xn + int64_t(job / a.K) * a.H;
    block_dot4(gate, r0, x, rg, part);
    block_dot4(up, r0, x, ru, part);
    if (tid < kRows && r0 + tid < a.I) out[r0 + tid] = siluf_(rg[tid]) * ru[tid];
  } else if (job < TK + a.T) {
    if (r0 >= a.S) return;
    const int t = job - TK;
    const float* x = a.xn + int64_t(t) * a.H;
    block_dot4(a.sh_gate, r0, x, rg, part);
    block_dot4(a.sh_up, r0, x, ru, part);
    if (tid < kRows && r0 + tid < a.S) a.hs[int64_t(t) * a.S + r0 + tid] = siluf_(rg[tid]) * ru[tid];
  } else {
    if (r0 > 0) return;
    const int t = job - TK - a.T;
    block_dot4(a.sh_router, 0, a.xn + int64_t(t) * a.H, rg, part);
    if (tid == 0) a.r[t] = rg[0];
  }
}

// blockIdx.y: the token; blockIdx.x: output rows kRows*x..
__global__ void __launch_bounds__(kWarps * 32) moe_down_kernel(MoeDirect a) {
  __shared__ float part[kWarps][1];
  __shared__ float res[kRows];
  const int t = blockIdx.y, tid = threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  float s = 0.0f;  // threads < kRows: row r0 + tid
  for (int j = 0; j < a.K; j++) {
    const int slot = t * a.K + j;
    const int e = a.ids[slot];
    float y;
    if (e < 0 || e >= a.E) {
      y = __int_as_float(0x7fc00000);
    } else {
      const WMat down = a.experts[e].down;  // registers, as in the gate/up kernel
      block_dot4(down, r0, a.h + int64_t(slot) * a.I, res, part);
      y = tid < kRows ? res[tid] : 0.0f;
      __syncthreads();  // res is read before the next product writes it
    }
    // As scatter_slot_rows (slot = y * w) then sum_slots (slot 0, + slot 1, ...).
    const float v = y * a.weights[slot];
    s = j == 0 ? v : s + v;
  }
  if (a.S > 0) {
    block_dot4(a.sh_down, r0, a.hs + int64_t(t) * a.S, res, part);
    if (tid < kRows) {
      // As add_gated_rows.
      const float v = a.has_router ? res[tid] * sigmoidf_(a.r[t]) : res[tid];
      s += v;
    }
  }
  if (tid < kRows && r0 + tid < a.H) a.out[int64_t(t) * a.H + r0 + tid] = s;
}

}  // namespace

void moe_direct(cudaStream_t s, const MoeDirect& a) {
  if (a.T <= 0) return;
  const int jobs = a.T * a.K + (a.S > 0 ? a.T : 0) + (a.S > 0 && a.has_router ? a.T : 0);
  const int rows = a.I > a.S ? a.I : a.S;
  moe_gate_up_kernel<<<dim3(unsigned(ceil_div(rows, kRows)), unsigned(jobs)), kWarps * 32, 0,
                       s>>>(a);
  moe_down_kernel<<<dim3(unsigned(ceil_div(a.H, kRows)), unsigned(a.T)), kWarps * 32, 0, s>>>(a);
}

}  // namespace moeflux::cuda
