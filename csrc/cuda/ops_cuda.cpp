// CUDA registrations of the roli:: ops: tensors -> launcher arguments, on the current stream. Compiled
// only in CUDA builds (setup.py), by the host compiler; the kernels live in pgd_kernels.cu.
// The Linf path allocates nothing and never synchronises with the host, so a CUDA graph can capture it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../layout.h"
#include "pgd_kernels.h"

namespace roli {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "roli: the cuda kernels support float32, bfloat16 and float16; got ", t.scalar_type());
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "roli: ", what, " failed to launch: ", cudaGetErrorString(err));
}

template <bool L2>
void pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                   const std::optional<at::Tensor>& eps_t, double eps, const std::optional<at::Tensor>& step_t,
                   double step, double lo, double hi) {
  check_step_args(x_adv, grad, x_nat, eps_t, step_t);
  TORCH_CHECK(x_adv.is_cuda(), "roli: the cuda kernels run on CUDA tensors; got ", x_adv.device());
  if (x_adv.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  at::Tensor x = writable_operand(x_adv);
  const at::Tensor g = readable_like(grad, x), xn = readable_like(x_nat, x);
  const int64_t batch = batch_of(x);
  cuda::StepArgs a{x.data_ptr(),
                   g.data_ptr(),
                   xn.data_ptr(),
                   eps_t ? eps_t->data_ptr<float>() : nullptr,
                   step_t ? step_t->data_ptr<float>() : nullptr,
                   static_cast<float>(eps),
                   static_cast<float>(step),
                   static_cast<float>(lo),
                   static_cast<float>(hi),
                   batch,
                   x.numel() / batch};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  if constexpr (L2) {
    at::Tensor ws = at::empty({cuda::l2_workspace_floats(a)}, x.options().dtype(at::kFloat));
    check_cuda(cuda::launch_l2(dtype_of(x), a, ws.data_ptr<float>(), stream), "pgd_step_l2_");
  } else {
    check_cuda(cuda::launch_linf(dtype_of(x), a, stream), "pgd_step_linf_");
  }
  finish_write(x_adv, x);
}

void keep_best_cuda(const at::Tensor& best_x, const at::Tensor& best_score, const at::Tensor& x_adv,
                    const at::Tensor& score) {
  check_keep_best_args(best_x, best_score, x_adv, score);
  TORCH_CHECK(best_x.is_cuda(), "roli: the cuda kernels run on CUDA tensors; got ", best_x.device());
  const c10::cuda::CUDAGuard guard(best_x.device());
  const int64_t batch = best_x.size(0);
  if (batch == 0) return;
  // Scores are compared in best_score's precision: float64 stays float64 (as the CPU and Triton kernels keep
  // it), anything else in float32 (exact for bf16/fp16 scores).
  const auto st = best_score.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor sc = score.to(st).contiguous();
  at::Tensor bs = best_score.scalar_type() == st && best_score.is_contiguous() ? best_score
                                                                                : best_score.to(st).contiguous();
  at::Tensor bx = writable_operand(best_x);
  const at::Tensor xa = readable_like(x_adv, bx);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(bx.device().index()).stream();
  const int64_t bytes = bx.numel() / batch * bx.element_size();
  const cudaError_t err =
      st == at::kDouble
          ? cuda::launch_keep_best(bx.data_ptr(), bs.data_ptr<double>(), xa.data_ptr(), sc.data_ptr<double>(), batch,
                                   bytes, stream)
          : cuda::launch_keep_best(bx.data_ptr(), bs.data_ptr<float>(), xa.data_ptr(), sc.data_ptr<float>(), batch,
                                   bytes, stream);
  check_cuda(err, "keep_best_");
  finish_write(best_x, bx);
  finish_write(best_score, bs);
}

}  // namespace

TORCH_LIBRARY_IMPL(roli, CUDA, m) {
  m.impl("pgd_step_linf_", &pgd_step_cuda<false>);
  m.impl("pgd_step_l2_", &pgd_step_cuda<true>);
  m.impl("keep_best_", &keep_best_cuda);
}

}  // namespace roli
