// Layout handling shared by the CPU and CUDA wrappers.
//
// The kernels walk memory as one flat block in which sample b occupies [b * N, (b + 1) * N): true for
// contiguous and channels_last tensors (batch is the outermost stride) when all operands share strides.
// Anything else (slices, mixed layouts) is brought to the layout of the written tensor by a copy, and
// the written tensor is copied back when it had to be replaced. Correct for every input; fast for the
// layouts a training loop produces.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

namespace roli {

inline bool batch_major_dense(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  if (t.dim() == 0 || t.size(0) <= 1) return true;
  return t.stride(0) == t.numel() / t.size(0);
}

// `out` is the tensor written in place; `ins` are read. Returns the tensor to write into.
inline at::Tensor writable_operand(const at::Tensor& out) { return batch_major_dense(out) ? out : out.contiguous(); }

inline at::Tensor readable_like(const at::Tensor& t, const at::Tensor& work) {
  if (t.strides() == work.strides()) return t;
  return at::empty_like(work).copy_(t);
}

inline void finish_write(const at::Tensor& out, const at::Tensor& work) {
  if (!work.is_same(out)) out.copy_(work);
}

inline int64_t batch_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }

}  // namespace roli
