// moe_experts when every expert of the layer is resident: the [T, k] ids stay on the device,
// so a decode step never waits for the host (and can be replayed as a graph). Kernels,
// compiled per weight type (a kernel that dispatches on the type at run time inlines every
// variant and runs out of registers):
//   gate_up: per (token, choice) slot, the gate and up rows of the slot's expert and
//            silu(gate)·up; the same kernel for the shared expert's rows (no ids);
//   the shared expert's down and its router logit: the plain mat-vec (matmul.cu);
//   down:    per token, each output row's down products of its k slots, weighted and added in
//            choice order, then the shared expert's gated row.
// Every dot product is matvec.cuh's, and the element-wise steps are those of the grouped path
// (cuda_backend.cpp: silu_mul, scatter, sum_slots, add_gated_rows) in the same order, so both
// paths give the same bits.
#include "cuda/matvec.cuh"

namespace moeflux::cuda {

namespace {

constexpr int kRows = kWarps;  // output rows per block (block_dot4_t)

struct GateUpJob {
  const ExpertMats* experts;  // routed: the table, with ids; null: the shared expert
  const int32_t* ids;
  int E, K;
  WMat sg, su;  // the shared expert's gate and up
  const float* xn;
  int H, rows;  // rows of gate/up (I or S)
  float* h;     // [jobs, rows]
};

// blockIdx.y: the job (a routed slot t*K + j, or a token for the shared expert); blockIdx.x:
// rows kRows*x..
template <int WT, int VEC, bool XV>
__global__ void __launch_bounds__(kWarps * 32) moe_gate_up_kernel(GateUpJob a) {
  __shared__ float part[kWarps][1];
  __shared__ float rg[kRows], ru[kRows];
  const int job = blockIdx.y, tid = threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  if (r0 >= a.rows) return;
  float* out = a.h + int64_t(job) * a.rows;
  WMat gate, up;  // copies in registers: fields read through global memory would be reloaded
  const float* x;
  if (a.experts) {
    const int e = a.ids[job];
    if (e < 0 || e >= a.E) {  // never from route(); poisons the row so the NaN check reports it
      if (tid < kRows && r0 + tid < a.rows) out[r0 + tid] = __int_as_float(0x7fc00000);
      return;
    }
    gate = a.experts[e].gate;
    up = a.experts[e].up;
    x = a.xn + int64_t(job / a.K) * a.H;
  } else {
    gate = a.sg;
    up = a.su;
    x = a.xn + int64_t(job) * a.H;
  }
  block_dot4_t<WT, VEC, XV>(gate, matvec_ks(gate), r0, x, rg, part);
  block_dot4_t<WT, VEC, XV>(up, matvec_ks(up), r0, x, ru, part);
  if (tid < kRows && r0 + tid < a.rows) out[r0 + tid] = siluf_(rg[tid]) * ru[tid];
}

// blockIdx.y: the token; blockIdx.x: output rows kRows*x..
template <int WT, int VEC, bool XV>
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
      const WMat down = a.experts[e].down;
      block_dot4_t<WT, VEC, XV>(down, matvec_ks(down), r0, a.h + int64_t(slot) * a.I, res, part);
      y = tid < kRows ? res[tid] : 0.0f;
      __syncthreads();  // res is read before the next product writes it
    }
    // As scatter_slot_rows (slot = y * w) then sum_slots (slot 0, + slot 1, ...).
    const float v = y * a.weights[slot];
    s = j == 0 ? v : s + v;
  }
  if (tid < kRows && r0 + tid < a.H) {
    if (a.S > 0) {
      // As add_gated_rows.
      const float ys = a.ysh[int64_t(t) * a.H + r0 + tid];
      const float v = a.has_router ? ys * sigmoidf_(a.r[t]) : ys;
      s += v;
    }
    a.out[int64_t(t) * a.H + r0 + tid] = s;
  }
}

#define MF_MOE_LAUNCH(KERNEL, WT, vec4, xv, grid, args)                                        \
  do {                                                                                        \
    if (vec4) {                                                                               \
      if (xv) KERNEL<WT, 4, true><<<grid, kWarps * 32, 0, s>>>(args);                         \
      else KERNEL<WT, 4, false><<<grid, kWarps * 32, 0, s>>>(args);                           \
    } else {                                                                                  \
      if (xv) KERNEL<WT, 1, true><<<grid, kWarps * 32, 0, s>>>(args);                         \
      else KERNEL<WT, 1, false><<<grid, kWarps * 32, 0, s>>>(args);                           \
    }                                                                                         \
  } while (0)

#define MF_MOE_TYPES(KERNEL, type, vec4, xv, grid, args)                     \
  switch (type) {                                                            \
    case kWF32: MF_MOE_LAUNCH(KERNEL, kWF32, vec4, xv, grid, args); break;   \
    case kWBF16: MF_MOE_LAUNCH(KERNEL, kWBF16, vec4, xv, grid, args); break; \
    case kWF16: MF_MOE_LAUNCH(KERNEL, kWF16, vec4, xv, grid, args); break;   \
    case kWQ8: MF_MOE_LAUNCH(KERNEL, kWQ8, vec4, xv, grid, args); break;     \
    case kWQ4: MF_MOE_LAUNCH(KERNEL, kWQ4, vec4, xv, grid, args); break;     \
    case kWQ2: MF_MOE_LAUNCH(KERNEL, kWQ2, vec4, xv, grid, args); break;     \
  }

bool rows_aligned(const float* p, int64_t cols) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && cols % 4 == 0;
}

void gate_up(cudaStream_t s, const GateUpJob& j, int jobs, int type, bool vec4) {
  const dim3 grid(unsigned(ceil_div(j.rows, kRows)), unsigned(jobs));
  const bool xv = rows_aligned(j.xn, j.H);
  MF_MOE_TYPES(moe_gate_up_kernel, type, vec4, xv, grid, j)
}

}  // namespace

bool moe_direct(cudaStream_t s, const MoeDirect& a) {
  if (a.T <= 0) return true;
  // The shared expert first (its down row and router logit are inputs of the down kernel).
  if (a.S > 0) {
    if (a.sh_gate.type != a.sh_up.type || matvec_vec4(a.sh_gate) != matvec_vec4(a.sh_up))
      return false;
    GateUpJob j{nullptr, nullptr, 0, 0, a.sh_gate, a.sh_up, a.xn, a.H, a.S, a.hs};
    gate_up(s, j, a.T, a.sh_gate.type, matvec_vec4(a.sh_gate));
    matmul(s, a.sh_down, a.hs, a.ysh, a.T, a.H);
    if (a.has_router) matmul(s, a.sh_router, a.xn, a.r, a.T, 1);
  }
  GateUpJob j{a.experts, a.ids, a.E, a.K, {}, {}, a.xn, a.H, a.I, a.h};
  gate_up(s, j, a.T * a.K, a.gate_up_type, a.gate_up_vec4);
  const dim3 grid(unsigned(ceil_div(a.H, kRows)), unsigned(a.T));
  const bool xv = rows_aligned(a.h, a.I);
  MF_MOE_TYPES(moe_down_kernel, a.down_type, a.down_vec4, xv, grid, a)
  return true;
}

}  // namespace moeflux::cuda
