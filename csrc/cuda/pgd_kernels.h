// Launchers of the CUDA kernels. Plain pointers and a stream, no torch types: the .cu stays lean (it
// includes no ATen header and compiles in seconds); ops_cuda.cpp turns tensors into these arguments.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace roli {
namespace cuda {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

struct StepArgs {
  void* x;             // (B, N) in place
  const void* g;       // (B, N)
  const void* xn;      // (B, N)
  const float* eps_t;  // (B,) or nullptr -> eps
  const float* step_t; // (B,) or nullptr -> step
  float eps, step, lo, hi;
  int64_t batch, per_sample;
};

// Linf: one kernel, no host synchronisation (capturable in a CUDA graph).
cudaError_t launch_linf(DType dtype, const StepArgs& a, cudaStream_t stream);

// L2: two per-sample reductions into `workspace` (l2_workspace_floats(a) floats: the 2 * batch sums, then one
// partial per sample and block, added in a fixed order: deterministic) and one update.
int64_t l2_workspace_floats(const StepArgs& a);
cudaError_t launch_l2(DType dtype, const StepArgs& a, float* workspace, cudaStream_t stream);

// keep_best: copy the samples whose score beats best_score (reads scores only), then update the scores; float
// scores, or double ones compared and kept in float64.
// Scores are float32 here; ops_cuda.cpp converts others.
cudaError_t launch_keep_best(void* best_x, float* best_score, const void* x, const float* score, int64_t batch,
                             int64_t bytes_per_sample, cudaStream_t stream);
cudaError_t launch_keep_best(void* best_x, double* best_score, const void* x, const double* score, int64_t batch,
                             int64_t bytes_per_sample, cudaStream_t stream);

}  // namespace cuda
}  // namespace roli
