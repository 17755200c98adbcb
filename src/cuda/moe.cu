// moe_experts when every expert of the layer is resident: the [T, k] ids stay on the device,
// so a step never waits for the host (and a decode step can be replayed as a graph).
//
// Few slots (decode), per-slot kernels:
//   gate_up: per (token, choice) slot, the gate and up rows of the slot's expert and
//            silu(gate)·up; the same kernel for the shared expert's rows (no ids);
//   the shared expert's down and its router logit: the plain mat-vec (matmul.cu);
//   down:    per token, each output row's down products of its k slots, weighted and added in
//            choice order, then the shared expert's gated row.
// Many slots (prefill), grouped on the device:
//   group:   the slots of each expert (a counting sort; the order inside an expert's list is
//            free: every slot's sums are its own);
//   gate_up, down: per (expert, rows), that expert's slots 4 at a time, each weight read once
//            per 4 slots; down writes each slot's row times its weight;
//   then sum_slots and the shared expert through the plain ops.
// Every dot product is matvec.cuh's, and the element-wise steps are those of the host-grouped
// path (cuda_backend.cpp: silu_mul, scatter, sum_slots, add_gated_rows) in the same order, so
// all three paths give the same bits.
#include "cuda/matvec.cuh"

namespace moeflux::cuda {

namespace {

constexpr int kPairRows = 2;                     // gate/up row pairs per warp
constexpr int kGateUpRows = kWarps * kPairRows;  // gate/up rows per block
constexpr int kDownSlots = 5;                    // slots a warp's down row runs side by side
constexpr int kTile = 4;                         // slots per weight read (grouped)
constexpr int kDownRows = 4;                     // down rows per warp (grouped)

// silu(gate x)·(up x) for the block's kGateUpRows rows r0.. and TT token rows (ks = 1: warp w
// takes kPairRows rows; ks = 4: kPairRows rows per pass, kWarps passes); out(r, tt, v) in the
// thread that holds row r's sums. gate and up share shape, type and group (the caller checks).
template <int WT, int VEC, int TT, bool XV, typename Out>
__device__ inline void gate_up_block(const WMat& gate, const WMat& up, int64_t r0,
                                     const float* const (&xt)[1][TT], float* part, Out out) {
  constexpr int RR = 2 * kPairRows;
  const int ks = matvec_ks(gate);
  const int warp = threadIdx.x >> 5;
  const int gshift = group_shift(gate);
  const int passes = ks == 1 ? 1 : kWarps;
  for (int p = 0; p < passes; p++) {
    const int64_t rb = r0 + int64_t(ks == 1 ? warp : p) * kPairRows;
    RowRef rows[RR];
#pragma unroll
    for (int i = 0; i < kPairRows; i++) {
      const int64_t r = min(rb + i, gate.rows - 1);
      rows[i] = row_ref(gate, r, gshift);
      rows[kPairRows + i] = row_ref(up, r, gshift);
    }
    float acc[RR][TT];
    if (rows_sums<WT, VEC, TT, RR, true, XV>(gate.cols, gshift, ks, rows, rb < gate.rows, xt, acc,
                                             part))
#pragma unroll
      for (int i = 0; i < kPairRows; i++)
        if (rb + i < gate.rows)
#pragma unroll
          for (int tt = 0; tt < TT; tt++)
            out(rb + i, tt, siluf_(acc[i][tt]) * acc[kPairRows + i][tt]);
  }
}

struct GateUpJob {
  const ExpertMats* experts;  // the routed experts' table
  const int32_t* ids;
  int E, K;
  int routed;     // jobs < routed: routed slots (t*K + j); the others: tokens of the shared expert
  WMat sg, su;    // the shared expert's gate and up
  WMat router;    // its router row (f32), when has_router: the shared jobs' first blocks
  bool has_router;
  float* r;       // [tokens] its router logits
  const float* xn;
  int H, rows;    // rows of gate/up (I, or S when every job is shared)
  float* h;       // [routed, rows]
  float* hs;      // [jobs - routed, rows]
};

// blockIdx.y: the job; blockIdx.x: rows kGateUpRows*x..
template <int WT, int VEC, bool XV>
__global__ void __launch_bounds__(kWarps * 32) moe_gate_up_kernel(GateUpJob a) {
  __shared__ float part[kWarps * 2 * kPairRows];
  const int job = blockIdx.y, tid = threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.x) * kGateUpRows;
  if (r0 >= a.rows) return;
  WMat gate, up;  // copies in registers: fields read through global memory would be reloaded
  const float* x;
  float* out;
  const bool shared = job >= a.routed;
  const int tok = job - a.routed;
  if (!shared) {
    out = a.h + int64_t(job) * a.rows;
    const int e = a.ids[job];
    if (e < 0 || e >= a.E) {  // never from route(); poisons the rows so the NaN check reports it
      if (tid < kGateUpRows && r0 + tid < a.rows) out[r0 + tid] = __int_as_float(0x7fc00000);
      return;
    }
    gate = a.experts[e].gate;
    up = a.experts[e].up;
    x = a.xn + int64_t(job / a.K) * a.H;
  } else {
    out = a.hs + int64_t(tok) * a.rows;
    gate = a.sg;
    up = a.su;
    x = a.xn + int64_t(tok) * a.H;
  }
  const float* const xt[1][1] = {{x}};
  gate_up_block<WT, VEC, 1, XV>(gate, up, r0, xt, part,
                                [&](int64_t r, int, float v) { out[r] = v; });
  if (shared && a.has_router && blockIdx.x == 0) {
    // The router logit in the plain mat-vec's order (the whole block takes part).
    __shared__ float res[kWarps];
    __syncthreads();  // part is free
    block_rows_x<kWF32, 1>(a.router, matvec_ks(a.router), 0, x, res, part);
    if (tid == 0) a.r[tok] = res[0];
  }
}

// blockIdx.y: the token; blockIdx.x: output rows kWarps*x.. (ks = 1: a row per warp; ks = 4:
// a row per pass). A row's k slots run kDownSlots at a time (each its own expert and input),
// and with fuse_shared the shared expert's down row as a (k+1)-th.
template <int WT, int VEC, bool XV>
__global__ void __launch_bounds__(kWarps * 32) moe_down_kernel(MoeDirect a) {
  __shared__ float part[kWarps * kDownSlots];
  const int t = blockIdx.y, warp = threadIdx.x >> 5;
  const WMat d0 = a.experts[0].down;  // every down has this shape, type and group
  const int ks = matvec_ks(d0), gshift = group_shift(d0);
  const int passes = ks == 1 ? 1 : kWarps;
  const int items = a.K + (a.fuse_shared ? 1 : 0);
  for (int p = 0; p < passes; p++) {
    const int64_t r = int64_t(blockIdx.x) * kWarps + (ks == 1 ? warp : p);
    const bool active = r < a.H;
    const int64_t rr = min(r, int64_t(a.H) - 1);
    float s = 0.0f, ys = 0.0f;
    bool holder = false;
    for (int j0 = 0; j0 < items; j0 += kDownSlots) {
      RowRef rows[kDownSlots];
      const float* xt[kDownSlots][1];
      bool bad[kDownSlots];
#pragma unroll
      for (int i = 0; i < kDownSlots; i++) {
        const int j = min(j0 + i, items - 1);
        bad[i] = false;
        if (j < a.K) {
          const int slot = t * a.K + j;
          const int e = a.ids[slot];
          bad[i] = e < 0 || e >= a.E;
          rows[i] = row_ref(a.experts[bad[i] ? 0 : e].down, rr, gshift);
          xt[i][0] = a.h + int64_t(slot) * a.I;
        } else {
          rows[i] = row_ref(a.sh_down, rr, gshift);
          xt[i][0] = a.hs + int64_t(t) * a.S;
        }
      }
      float acc[kDownSlots][1];
      holder = rows_sums<WT, VEC, 1, kDownSlots, false, XV>(a.I, gshift, ks, rows, active, xt,
                                                            acc, part);
      if (holder)
#pragma unroll
        for (int i = 0; i < kDownSlots; i++) {
          const int j = j0 + i;
          if (j < a.K) {
            // As scatter_slot_rows (slot = y * w) then sum_slots (slot 0, + slot 1, ...); an id
            // outside [0, E) (never from route) makes the row NaN.
            const float y = bad[i] ? __int_as_float(0x7fc00000) : acc[i][0];
            const float v = y * a.weights[t * a.K + j];
            s = j == 0 ? v : s + v;
          } else if (j == a.K) {
            ys = acc[i][0];
          }
        }
    }
    if (holder) {
      if (a.S > 0) {
        // As add_gated_rows.
        if (!a.fuse_shared) ys = a.ysh[int64_t(t) * a.H + r];
        const float v = a.has_router ? ys * sigmoidf_(a.r[t]) : ys;
        s += v;
      }
      a.out[int64_t(t) * a.H + r] = s;
    }
  }
}

// ---- grouped on the device ---------------------------------------------------------------------
// One block: offsets[e] = first entry of expert e in `list`, offsets[E] = the valid slots; the
// slots with an id outside [0, E) (never from route) get NaN rows in `slots`.
__global__ void moe_group_kernel(const int32_t* __restrict__ ids, int n, int E, int H,
                                 int32_t* __restrict__ offsets, int32_t* __restrict__ list,
                                 float* __restrict__ slots) {
  extern __shared__ int cnt[];  // [E]
  const int tid = threadIdx.x;
  for (int e = tid; e < E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int s = tid; s < n; s += blockDim.x) {
    const int e = ids[s];
    if (e >= 0 && e < E) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  if (tid == 0) {
    int run = 0;
    for (int e = 0; e < E; e++) {
      const int c = cnt[e];
      cnt[e] = offsets[e] = run;
      run += c;
    }
    offsets[E] = run;
  }
  __syncthreads();
  for (int s = tid; s < n; s += blockDim.x) {
    const int e = ids[s];
    if (e >= 0 && e < E) {
      list[atomicAdd(&cnt[e], 1)] = s;
    } else {
      for (int c = 0; c < H; c++) slots[int64_t(s) * H + c] = __int_as_float(0x7fc00000);
    }
  }
}

// The tile's slots and their input rows (the tail repeats the last slot; its sums are dropped).
template <int TT>
__device__ __forceinline__ void tile_rows(const int32_t* list, int begin, int n, int t0,
                                          const float* base, int64_t stride, int div,
                                          int (&slot)[TT], const float* (&xt)[1][TT]) {
#pragma unroll
  for (int tt = 0; tt < TT; tt++) {
    slot[tt] = list[begin + min(t0 + tt, n - 1)];
    xt[0][tt] = base + int64_t(slot[tt] / div) * stride;
  }
}

// blockIdx.y: the expert; blockIdx.x: gate/up rows kGateUpRows*x..; h[slot] as gate_up's.
template <int WT, int VEC, bool XV>
__global__ void __launch_bounds__(kWarps * 32) moe_gate_up_grouped_kernel(MoeDirect a) {
  __shared__ float part[kWarps * 2 * kPairRows * kTile];
  const int e = blockIdx.y;
  const int begin = a.offsets[e], n = a.offsets[e + 1] - begin;
  const int64_t r0 = int64_t(blockIdx.x) * kGateUpRows;
  if (n == 0 || r0 >= a.I) return;
  const WMat gate = a.experts[e].gate, up = a.experts[e].up;
  for (int t0 = 0; t0 < n; t0 += kTile) {
    int slot[kTile];
    const float* xt[1][kTile];
    tile_rows<kTile>(a.list, begin, n, t0, a.xn, a.H, a.K, slot, xt);
    gate_up_block<WT, VEC, kTile, XV>(gate, up, r0, xt, part, [&](int64_t r, int tt, float v) {
      if (t0 + tt < n) a.h[int64_t(slot[tt]) * a.I + r] = v;
    });
  }
}

// blockIdx.y: the expert; blockIdx.x: down rows kWarps*kDownRows*x..; slots[slot] = y * w.
template <int WT, int VEC, bool XV>
__global__ void __launch_bounds__(kWarps * 32) moe_down_grouped_kernel(MoeDirect a) {
  __shared__ float part[kWarps * kDownRows * kTile];
  const int e = blockIdx.y, warp = threadIdx.x >> 5;
  const int begin = a.offsets[e], n = a.offsets[e + 1] - begin;
  const int64_t r0 = int64_t(blockIdx.x) * kWarps * kDownRows;
  if (n == 0 || r0 >= a.H) return;
  const WMat down = a.experts[e].down;
  const int ks = matvec_ks(down), gshift = group_shift(down);
  const int passes = ks == 1 ? 1 : kWarps;
  for (int t0 = 0; t0 < n; t0 += kTile) {
    int slot[kTile];
    const float* xt[1][kTile];
    tile_rows<kTile>(a.list, begin, n, t0, a.h, a.I, 1, slot, xt);
    for (int p = 0; p < passes; p++) {
      const int64_t rb = r0 + int64_t(ks == 1 ? warp : p) * kDownRows;
      RowRef rows[kDownRows];
#pragma unroll
      for (int i = 0; i < kDownRows; i++) rows[i] = row_ref(down, min(rb + i, int64_t(a.H) - 1), gshift);
      float acc[kDownRows][kTile];
      if (rows_sums<WT, VEC, kTile, kDownRows, true, XV>(a.I, gshift, ks, rows, rb < a.H, xt, acc,
                                                         part))
#pragma unroll
        for (int i = 0; i < kDownRows; i++)
#pragma unroll
          for (int tt = 0; tt < kTile; tt++)
            if (rb + i < a.H && t0 + tt < n)  // as scatter_slot_rows
              a.slots[int64_t(slot[tt]) * a.H + rb + i] = acc[i][tt] * a.weights[slot[tt]];
    }
  }
}

#define MF_MOE_LAUNCH(KERNEL, WT, vec4, xv, grid, smem, args)                                  \
  do {                                                                                        \
    if (vec4) {                                                                               \
      if (xv) KERNEL<WT, 4, true><<<grid, kWarps * 32, smem, s>>>(args);                      \
      else KERNEL<WT, 4, false><<<grid, kWarps * 32, smem, s>>>(args);                        \
    } else {                                                                                  \
      if (xv) KERNEL<WT, 1, true><<<grid, kWarps * 32, smem, s>>>(args);                      \
      else KERNEL<WT, 1, false><<<grid, kWarps * 32, smem, s>>>(args);                        \
    }                                                                                         \
  } while (0)

#define MF_MOE_TYPES(KERNEL, type, vec4, xv, grid, args)                        \
  switch (type) {                                                               \
    case kWF32: MF_MOE_LAUNCH(KERNEL, kWF32, vec4, xv, grid, 0, args); break;   \
    case kWBF16: MF_MOE_LAUNCH(KERNEL, kWBF16, vec4, xv, grid, 0, args); break; \
    case kWF16: MF_MOE_LAUNCH(KERNEL, kWF16, vec4, xv, grid, 0, args); break;   \
    case kWQ8: MF_MOE_LAUNCH(KERNEL, kWQ8, vec4, xv, grid, 0, args); break;     \
    case kWQ4: MF_MOE_LAUNCH(KERNEL, kWQ4, vec4, xv, grid, 0, args); break;     \
    case kWQ2: MF_MOE_LAUNCH(KERNEL, kWQ2, vec4, xv, grid, 0, args); break;     \
  }

bool rows_aligned(const float* p, int64_t cols) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && cols % 4 == 0;
}

void gate_up(cudaStream_t s, const GateUpJob& j, int jobs, int type, bool vec4) {
  const dim3 grid(unsigned(ceil_div(j.rows, kGateUpRows)), unsigned(jobs));
  const bool xv = rows_aligned(j.xn, j.H);
  MF_MOE_TYPES(moe_gate_up_kernel, type, vec4, xv, grid, j)
}

bool shared_ok(const MoeDirect& a) {
  return a.sh_gate.type == a.sh_up.type && a.sh_gate.group == a.sh_up.group &&
         matvec_vec4(a.sh_gate) == matvec_vec4(a.sh_up);
}
// Same shape, type, group and load width: the kernels read both alike.
bool same_form(const WMat& x, const WMat& y) {
  return x.type == y.type && x.rows == y.rows && x.cols == y.cols && x.group == y.group &&
         matvec_vec4(x) == matvec_vec4(y);
}

}  // namespace

bool moe_direct(cudaStream_t s, const MoeDirect& a0) {
  MoeDirect a = a0;
  if (a.T <= 0) return true;
  if (a.S > 0 && !shared_ok(a)) return false;
  // The shared expert as one more job of the routed kernels when it has the routed experts'
  // form (and its router row is f32); else its own launches first (its down row and router
  // logit are inputs of the down kernel).
  a.fuse_shared = a.S > 0 && same_form(a.sh_gate, a.first.gate) &&
                  same_form(a.sh_up, a.first.up) && same_form(a.sh_down, a.first.down) &&
                  (!a.has_router || (a.sh_router.type == kWF32 && a.sh_router.cols == a.H));
  GateUpJob j{a.experts, a.ids, a.E, a.K, a.T * a.K, a.sh_gate, a.sh_up, a.sh_router,
              a.has_router, a.r, a.xn, a.H, a.I, a.h, a.hs};
  if (a.S > 0 && !a.fuse_shared) {
    GateUpJob js = j;
    js.routed = 0, js.rows = a.S, js.has_router = false;
    gate_up(s, js, a.T, a.sh_gate.type, matvec_vec4(a.sh_gate));
    matmul(s, a.sh_down, a.hs, a.ysh, a.T, a.H);
    if (a.has_router) matmul(s, a.sh_router, a.xn, a.r, a.T, 1);
  }
  if (!a.fuse_shared) j.has_router = false;
  gate_up(s, j, a.T * a.K + (a.fuse_shared ? a.T : 0), a.gate_up_type, a.gate_up_vec4);
  const dim3 grid(unsigned(ceil_div(a.H, kWarps)), unsigned(a.T));
  const bool xv = rows_aligned(a.h, a.I) && (!a.fuse_shared || rows_aligned(a.hs, a.S));
  MF_MOE_TYPES(moe_down_kernel, a.down_type, a.down_vec4, xv, grid, a)
  return true;
}

bool moe_grouped(cudaStream_t s, const MoeDirect& a) {
  if (a.T <= 0) return true;
  if (a.S > 0 && !shared_ok(a)) return false;
  const int n = a.T * a.K;
  moe_group_kernel<<<1, 1024, size_t(a.E) * sizeof(int), s>>>(a.ids, n, a.E, a.H, a.offsets,
                                                              a.list, a.slots);
  {
    const dim3 grid(unsigned(ceil_div(a.I, kGateUpRows)), unsigned(a.E));
    const bool xv = rows_aligned(a.xn, a.H);
    MF_MOE_TYPES(moe_gate_up_grouped_kernel, a.gate_up_type, a.gate_up_vec4, xv, grid, a)
  }
  {
    const dim3 grid(unsigned(ceil_div(a.H, kWarps * kDownRows)), unsigned(a.E));
    const bool xv = rows_aligned(a.h, a.I);
    MF_MOE_TYPES(moe_down_grouped_kernel, a.down_type, a.down_vec4, xv, grid, a)
  }
  sum_slots(s, a.slots, a.T, a.K, a.H, a.out);
  if (a.S > 0) {  // as the host-grouped path
    matmul(s, a.sh_gate, a.xn, a.hs, a.T, a.S);
    matmul(s, a.sh_up, a.xn, a.hs_up, a.T, a.S);
    silu_mul(s, a.hs, a.hs_up, size_t(a.T) * a.S);
    matmul(s, a.sh_down, a.hs, a.ysh, a.T, a.H);
    if (a.has_router) matmul(s, a.sh_router, a.xn, a.r, a.T, 1);
    add_gated_rows(s, a.out, a.ysh, a.has_router ? a.r : nullptr, a.T, a.H);
  }
  return true;
}

}  // namespace moeflux::cuda
