// Element-wise math of the PGD step, shared by the CPU kernels (pgd_cpu.cpp) and the CUDA kernels
// (cuda/pgd_kernels.cu), so that the CPU tests also check the arithmetic the GPU runs.
//
// Design: every kernel loads its operands, converts them to fp32 at once, does all arithmetic in fp32
// and rounds once on the store. That makes bf16/fp16 results equal to "fp32 reference, then rounded",
// and the comparisons are written as selects (not fminf/fmaxf) so the compiler vectorises them.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ROLI_HD __host__ __device__ __forceinline__
#else
#define ROLI_HD inline
#endif

namespace roli {

ROLI_HD float sign_of(float g) { return (g > 0.f ? 1.f : 0.f) - (g < 0.f ? 1.f : 0.f); }  // sign(0) = 0, NaN -> 0

ROLI_HD float clamp_to(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// Linf: clamp(clamp(x + step * sign(g), xn - eps, xn + eps), lo, hi)
ROLI_HD float linf_update(float x, float g, float xn, float eps, float step, float lo, float hi) {
  float v = x + step * sign_of(g);
  v = clamp_to(v, xn - eps, xn + eps);
  return clamp_to(v, lo, hi);
}

// L2, after the per-sample reductions: gscale = step / ||g|| (0 for a zero gradient) and
// dscale = min(1, eps / ||x + gscale * g - xn||).
ROLI_HD float l2_delta(float x, float g, float xn, float gscale) { return (x + gscale * g) - xn; }

ROLI_HD float l2_update(float x, float g, float xn, float gscale, float dscale, float lo, float hi) {
  return clamp_to(xn + l2_delta(x, g, xn, gscale) * dscale, lo, hi);
}

ROLI_HD float l2_grad_scale(float sumsq_g, float step) { return sumsq_g > 0.f ? step / sqrtf(sumsq_g) : 0.f; }

ROLI_HD float l2_proj_scale(float sumsq_d, float eps) {
  float n = sqrtf(sumsq_d);
  return n > eps ? eps / n : 1.f;
}

// The element-wise ops as functors, so one loop (CPU) or one element walker (CUDA) serves all of them.
struct LinfOp {
  float eps, step, lo, hi;
  ROLI_HD float operator()(float x, float g, float xn) const { return linf_update(x, g, xn, eps, step, lo, hi); }
};
struct L2Op {
  float gscale, dscale, lo, hi;
  ROLI_HD float operator()(float x, float g, float xn) const { return l2_update(x, g, xn, gscale, dscale, lo, hi); }
};
struct GradOf {  // the value whose square the first L2 reduction sums
  ROLI_HD float operator()(float, float g, float) const { return g; }
};
struct DeltaOf {  // ... and the second
  float gscale;
  ROLI_HD float operator()(float x, float g, float xn) const { return l2_delta(x, g, xn, gscale); }
};

// bf16 <-> fp32 with round-to-nearest-even (NaN kept quiet), written on the bits so that it vectorises.
inline float bf16_bits_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

}  // namespace roli
