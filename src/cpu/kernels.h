// CPU inner loops of attention and DeltaNet (weight matrices go through cpu/matmul.h). Each has
// one fixed summation order (16 partial sums, then a fixed tree), so a result does not depend on
// which caller or thread computes it.
#pragma once

#include <cstdint>

// Functions compiled once per x86 target and picked at load time by an ifunc resolver
// (AVX-512, AVX2+FMA, baseline). Not under ThreadSanitizer: it instruments the resolvers, which
// run during relocation before its runtime is up, and the process dies before main (the TSan
// build only runs the concurrency tests; the baseline clone is as correct as the others).
#if defined(__SANITIZE_THREAD__)
#define MF_CLONES
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MF_CLONES
#endif
#endif
#ifndef MF_CLONES
#define MF_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#endif

namespace moeflux {

float dot_f32(const float* a, const float* b, int64_t n);
// y += a * x
void axpy(float a, const float* x, float* y, int64_t n);
// out = x * rsqrt(sum(x^2) + 1e-6), as HF's l2norm (the FLA convention)
void l2norm(const float* x, float* out, int64_t n);

}  // namespace moeflux
