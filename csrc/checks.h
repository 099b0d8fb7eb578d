// Argument checks of the roli:: ops, shared by the CPU and CUDA registrations. The Python wrappers in
// roli/ops check the same things first with friendlier messages; these guard direct torch.ops calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

namespace roli {

inline void check_step_args(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                            const std::optional<at::Tensor>& eps_t, const std::optional<at::Tensor>& step_t) {
  TORCH_CHECK(grad.sizes() == x_adv.sizes(), "roli: grad has shape ", grad.sizes(), " but x_adv has shape ",
              x_adv.sizes(), "; they must match");
  TORCH_CHECK(x_nat.sizes() == x_adv.sizes(), "roli: x_nat has shape ", x_nat.sizes(), " but x_adv has shape ",
              x_adv.sizes(), "; they must match");
  TORCH_CHECK(grad.scalar_type() == x_adv.scalar_type() && x_nat.scalar_type() == x_adv.scalar_type(),
              "roli: x_adv, grad and x_nat must share one dtype; got ", x_adv.scalar_type(), ", ",
              grad.scalar_type(), ", ", x_nat.scalar_type());
  TORCH_CHECK(grad.device() == x_adv.device() && x_nat.device() == x_adv.device(),
              "roli: x_adv, grad and x_nat must be on one device");
  const int64_t batch = x_adv.dim() == 0 ? 1 : x_adv.size(0);
  for (const auto* opt : {&eps_t, &step_t}) {
    if (!opt->has_value()) continue;
    const at::Tensor& t = opt->value();
    TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "roli: a per-sample eps/step_size must have shape (", batch,
                ",); got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(),
                "roli: per-sample eps/step_size must be contiguous float32 (the Python wrapper converts it)");
    TORCH_CHECK(t.device() == x_adv.device(), "roli: per-sample eps/step_size must be on the images' device");
  }
}

inline void check_keep_best_args(const at::Tensor& best_x, const at::Tensor& best_score, const at::Tensor& x_adv,
                                 const at::Tensor& score) {
  TORCH_CHECK(x_adv.sizes() == best_x.sizes(), "roli: x_adv has shape ", x_adv.sizes(), " but best_x has shape ",
              best_x.sizes(), "; they must match");
  TORCH_CHECK(x_adv.scalar_type() == best_x.scalar_type(), "roli: best_x and x_adv must share one dtype");
  TORCH_CHECK(best_x.dim() >= 1, "roli: best_x must have a batch dimension");
  const int64_t batch = best_x.size(0);
  TORCH_CHECK(score.dim() == 1 && score.size(0) == batch && best_score.dim() == 1 && best_score.size(0) == batch,
              "roli: score and best_score must have shape (", batch, ",); got ", score.sizes(), " and ",
              best_score.sizes());
  TORCH_CHECK(score.scalar_type() == best_score.scalar_type(), "roli: score and best_score must share one dtype");
  TORCH_CHECK(best_x.device() == x_adv.device() && score.device() == best_x.device() &&
                  best_score.device() == best_x.device(),
              "roli: best_x, best_score, x_adv and score must be on one device");
}

}  // namespace roli
