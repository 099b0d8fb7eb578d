// CUDA kernels of the PGD inner loop. Memory-bound element-wise work: each thread handles kUnroll
// elements of one sample (grid.y = sample chunk, grid.x = chunk within the sample) so the per-sample
// eps/step are read once per thread and no integer division is needed per element. The arithmetic is
// the same header the CPU kernels use (../pgd_math.h), in fp32 with one rounding on store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../pgd_math.h"
#include "pgd_kernels.h"

namespace roli {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct io;
template <>
struct io<float> {
  __device__ static float ld(float v) { return v; }
  __device__ static float st(float v) { return v; }
};
template <>
struct io<__half> {
  __device__ static float ld(__half v) { return __half2float(v); }
  __device__ static __half st(float v) { return __float2half_rn(v); }
};
template <>
struct io<__nv_bfloat16> {
  __device__ static float ld(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 st(float v) { return __float2bfloat16_rn(v); }
};

dim3 grid_for(int64_t per_sample, int64_t batch, int64_t per_block) {
  const int64_t gx = (per_sample + per_block - 1) / per_block;
  const int64_t gy = batch < kMaxGridY ? batch : kMaxGridY;
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

__device__ __forceinline__ float pick(const float* t, float v, int64_t b) { return t ? t[b] : v; }

// This thread's elements: kUnroll of them per sample, for every sample of a grid-stride loop over
// grid.y (so any batch size fits the grid limits). make_op(b) builds the per-sample functor.
template <typename T, typename MakeOp>
__device__ __forceinline__ void update_elements(const StepArgs& a, const MakeOp& make_op) {
  T* x = static_cast<T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const T* xn = static_cast<const T*>(a.xn);
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const auto op = make_op(b);
    const int64_t base = b * a.per_sample;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = chunk + u * kThreads;
      if (i < a.per_sample) x[base + i] = io<T>::st(op(io<T>::ld(x[base + i]), io<T>::ld(g[base + i]), io<T>::ld(xn[base + i])));
    }
  }
}

template <typename T>
__global__ void linf_kernel(StepArgs a) {
  update_elements<T>(a, [&](int64_t b) { return LinfOp{pick(a.eps_t, a.eps, b), pick(a.step_t, a.step, b), a.lo, a.hi}; });
}

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  __syncthreads();
  return v;
}

// PASS 0: sum of g^2 per sample into sums[b]. PASS 1: sum of (x + gscale*g - xn)^2 into sums[B + b].
template <typename T, int PASS>
__global__ void l2_reduce_kernel(StepArgs a, const float* sums, float* partials) {
  const T* x = static_cast<const T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const T* xn = static_cast<const T*>(a.xn);
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const int64_t base = b * a.per_sample;
    const DeltaOf delta{PASS == 1 ? l2_grad_scale(sums[b], pick(a.step_t, a.step, b)) : 0.f};
    float acc = 0.f;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = chunk + u * kThreads;
      if (i < a.per_sample) {
        const float xv = io<T>::ld(x[base + i]), gv = io<T>::ld(g[base + i]), nv = io<T>::ld(xn[base + i]);
        const float v = PASS == 0 ? GradOf{}(xv, gv, nv) : delta(xv, gv, nv);
        acc += v * v;
      }
    }
    acc = block_sum(acc);
    // One partial per (sample, block), no atomics: the finalize kernel adds them in a fixed order, so seeded
    // L2 attacks are bit-reproducible.
    if (threadIdx.x == 0) partials[(PASS * a.batch + b) * gridDim.x + blockIdx.x] = acc;
  }
}

// sums[r] = the partials of row r (r = PASS * batch + b) added in block order.
__global__ void l2_finalize_kernel(float* sums, const float* partials, int64_t rows, int64_t row0, int64_t blocks) {
  const int64_t r = row0 + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= row0 + rows) return;
  float s = 0.f;
  for (int64_t k = 0; k < blocks; ++k) s += partials[r * blocks + k];
  sums[r] = s;
}

template <typename T>
__global__ void l2_update_kernel(StepArgs a, const float* sums) {
  update_elements<T>(a, [&](int64_t b) {
    return L2Op{l2_grad_scale(sums[b], pick(a.step_t, a.step, b)),
                l2_proj_scale(sums[a.batch + b], pick(a.eps_t, a.eps, b)), a.lo, a.hi};
  });
}

// W is the copy word (uint4, unsigned or unsigned char), chosen by the launcher from the alignment.
// S is the score type (float, or double where best_score is float64: compared without rounding).
template <typename W, typename S>
__global__ void keep_best_copy_kernel(W* best_x, const S* best_score, const W* x, const S* score,
                                      int64_t batch, int64_t words_per_sample) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    if (i < words_per_sample && score[b] > best_score[b]) best_x[b * words_per_sample + i] = x[b * words_per_sample + i];
  }
}

template <typename W, typename S>
void keep_best_copy(void* best_x, const S* best_score, const void* x, const S* score, int64_t batch,
                    int64_t bytes_per_sample, cudaStream_t s) {
  const int64_t words = bytes_per_sample / static_cast<int64_t>(sizeof(W));
  keep_best_copy_kernel<W, S><<<grid_for(words, batch, kThreads), kThreads, 0, s>>>(
      static_cast<W*>(best_x), best_score, static_cast<const W*>(x), score, batch, words);
}

template <typename S>
__global__ void keep_best_score_kernel(S* best_score, const S* score, int64_t batch) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b < batch && score[b] > best_score[b]) best_score[b] = score[b];
}

template <template <typename> class Launch, typename... Args>
cudaError_t by_dtype(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat: return Launch<float>::run(args...);
    case DType::kHalf: return Launch<__half>::run(args...);
    case DType::kBFloat16: return Launch<__nv_bfloat16>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct LinfLaunch {
  static cudaError_t run(const StepArgs& a, cudaStream_t s) {
    linf_kernel<T><<<grid_for(a.per_sample, a.batch, kThreads * kUnroll), kThreads, 0, s>>>(a);
    return cudaGetLastError();
  }
};

template <typename T>
struct L2Launch {
  static cudaError_t run(const StepArgs& a, float* ws, cudaStream_t s) {
    const dim3 grid = grid_for(a.per_sample, a.batch, kThreads * kUnroll);
    float* partials = ws + 2 * a.batch;  // (2, batch, grid.x), every entry written by the reduce passes
    const unsigned fin = static_cast<unsigned>((a.batch + kThreads - 1) / kThreads);
    l2_reduce_kernel<T, 0><<<grid, kThreads, 0, s>>>(a, ws, partials);
    l2_finalize_kernel<<<fin, kThreads, 0, s>>>(ws, partials, a.batch, 0, grid.x);
    l2_reduce_kernel<T, 1><<<grid, kThreads, 0, s>>>(a, ws, partials);
    l2_finalize_kernel<<<fin, kThreads, 0, s>>>(ws, partials, a.batch, a.batch, grid.x);
    l2_update_kernel<T><<<grid, kThreads, 0, s>>>(a, ws);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t launch_linf(DType dtype, const StepArgs& a, cudaStream_t stream) {
  if (a.batch == 0 || a.per_sample == 0) return cudaSuccess;
  return by_dtype<LinfLaunch>(dtype, a, stream);
}

int64_t l2_workspace_floats(const StepArgs& a) {
  return 2 * a.batch * (1 + static_cast<int64_t>(grid_for(a.per_sample, a.batch, kThreads * kUnroll).x));
}

cudaError_t launch_l2(DType dtype, const StepArgs& a, float* workspace, cudaStream_t stream) {
  if (a.batch == 0 || a.per_sample == 0) return cudaSuccess;
  return by_dtype<L2Launch>(dtype, a, workspace, stream);
}

template <typename S>
cudaError_t keep_best_all(void* best_x, S* best_score, const void* x, const S* score, int64_t batch,
                          int64_t bytes_per_sample, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (bytes_per_sample > 0) {
    const auto aligned = [&](int64_t w) {
      return bytes_per_sample % w == 0 && reinterpret_cast<uintptr_t>(best_x) % w == 0 &&
             reinterpret_cast<uintptr_t>(x) % w == 0;
    };
    if (aligned(16)) {
      keep_best_copy<uint4, S>(best_x, best_score, x, score, batch, bytes_per_sample, stream);
    } else if (aligned(4)) {
      keep_best_copy<unsigned, S>(best_x, best_score, x, score, batch, bytes_per_sample, stream);
    } else {
      keep_best_copy<unsigned char, S>(best_x, best_score, x, score, batch, bytes_per_sample, stream);
    }
  }
  keep_best_score_kernel<S><<<static_cast<unsigned>((batch + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      best_score, score, batch);
  return cudaGetLastError();
}

cudaError_t launch_keep_best(void* best_x, float* best_score, const void* x, const float* score, int64_t batch,
                             int64_t bytes_per_sample, cudaStream_t stream) {
  return keep_best_all<float>(best_x, best_score, x, score, batch, bytes_per_sample, stream);
}

cudaError_t launch_keep_best(void* best_x, double* best_score, const void* x, const double* score, int64_t batch,
                             int64_t bytes_per_sample, cudaStream_t stream) {
  return keep_best_all<double>(best_x, best_score, x, score, batch, bytes_per_sample, stream);
}

}  // namespace cuda
}  // namespace roli
