// CPU kernels of the PGD inner loop: Linf/L2 step with projection, and per-sample keep-best.
//
// Trade-off: plain loops over raw pointers that the compiler vectorises (fp32 maths, bf16 converted on
// the bits) instead of at::vec::Vectorized, which silently falls back to scalar code in an extension
// built without the ATen capability macros. Work is split over threads by flat element ranges, so a
// batch of 1 large image uses every core as well as a batch of many small ones.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "layout.h"
#include "pgd_math.h"

namespace roli {
namespace {

// One binary that runs everywhere and still uses AVX-512/AVX2 where the CPU has them: the hot loops are
// cloned per ISA level and picked at load time (GCC/Clang function multi-versioning on x86-64).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(ROLI_NO_CPU_CLONES)
#define ROLI_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ROLI_CPU_CLONES
#endif

constexpr int64_t kGrain = 1 << 15;  // elements per task: ~128 KiB of fp32 per operand

template <typename T>
struct io;
template <>
struct io<float> {
  using raw = float;
  static float ld(float v) { return v; }
  static float st(float v) { return v; }
};
template <>
struct io<c10::BFloat16> {
  using raw = uint16_t;
  static float ld(uint16_t v) { return bf16_bits_to_float(v); }
  static uint16_t st(float v) { return float_to_bf16_bits(v); }
};
template <>
struct io<c10::Half> {
  using raw = c10::Half;
  static float ld(c10::Half v) { return static_cast<float>(v); }
  static c10::Half st(float v) { return c10::Half(v); }
};

template <typename T>
using raw_t = typename io<T>::raw;

// Calls fn(begin, end, b) for each piece of [begin, end) that lies inside one sample b of size n.
template <typename F>
void for_each_sample_piece(int64_t begin, int64_t end, int64_t n, const F& fn) {
  while (begin < end) {
    const int64_t b = begin / n;
    const int64_t stop = std::min(end, (b + 1) * n);
    fn(begin, stop, b);
    begin = stop;
  }
}

// x[i] = op(x[i], g[i], xn[i]) over one piece of one sample.
template <typename T, typename Op>
ROLI_CPU_CLONES void update_piece(raw_t<T>* __restrict x, const raw_t<T>* __restrict g,
                                  const raw_t<T>* __restrict xn, int64_t n, Op op) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = io<T>::st(op(io<T>::ld(x[i]), io<T>::ld(g[i]), io<T>::ld(xn[i])));
}

// sum_i op(x[i], g[i], xn[i])^2 over one piece of one sample, accumulated in double.
template <typename T, typename Op>
ROLI_CPU_CLONES double sumsq_piece(const raw_t<T>* __restrict x, const raw_t<T>* __restrict g,
                                   const raw_t<T>* __restrict xn, int64_t n, Op op) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const float v = op(io<T>::ld(x[i]), io<T>::ld(g[i]), io<T>::ld(xn[i]));
    acc += static_cast<double>(v * v);
  }
  return acc;
}

// Per-sample sums over a flat (B, N) block. Tasks are (sample, chunk) pairs with chunks of kGrain
// elements, summed in chunk order, so the result does not depend on the number of threads and small
// samples are batched into one task by the grain size of parallel_for.
template <typename F>
std::vector<double> per_sample_sums(int64_t batch, int64_t n, const F& piece_sum) {
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<double> partial(static_cast<size_t>(batch * chunks), 0.0);
  const int64_t task_grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, std::min(n, kGrain)));
  at::parallel_for(0, batch * chunks, task_grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, begin = (t % chunks) * kGrain, end = std::min(n, begin + kGrain);
      partial[t] = piece_sum(b * n + begin, b * n + end, b);
    }
  });
  std::vector<double> sums(static_cast<size_t>(batch), 0.0);
  for (int64_t t = 0; t < batch * chunks; ++t) sums[t / chunks] += partial[t];
  return sums;
}

struct Budget {
  const float* eps_t;
  float eps;
  const float* step_t;
  float step;
  float eps_of(int64_t b) const { return eps_t ? eps_t[b] : eps; }
  float step_of(int64_t b) const { return step_t ? step_t[b] : step; }
};

Budget make_budget(const std::optional<at::Tensor>& eps_t, double eps, const std::optional<at::Tensor>& step_t,
                   double step) {
  return {eps_t ? eps_t->data_ptr<float>() : nullptr, static_cast<float>(eps),
          step_t ? step_t->data_ptr<float>() : nullptr, static_cast<float>(step)};
}

template <typename T>
void linf_kernel(const at::Tensor& x, const at::Tensor& g, const at::Tensor& xn, Budget bud, float lo, float hi) {
  auto* X = reinterpret_cast<raw_t<T>*>(x.data_ptr());
  const auto* G = reinterpret_cast<const raw_t<T>*>(g.data_ptr());
  const auto* XN = reinterpret_cast<const raw_t<T>*>(xn.data_ptr());
  const int64_t total = x.numel(), n = total / batch_of(x);
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, n, [&](int64_t s, int64_t e, int64_t b) {
      update_piece<T>(X + s, G + s, XN + s, e - s, LinfOp{bud.eps_of(b), bud.step_of(b), lo, hi});
    });
  });
}

template <typename T>
void l2_kernel(const at::Tensor& x, const at::Tensor& g, const at::Tensor& xn, Budget bud, float lo, float hi) {
  auto* X = reinterpret_cast<raw_t<T>*>(x.data_ptr());
  const auto* G = reinterpret_cast<const raw_t<T>*>(g.data_ptr());
  const auto* XN = reinterpret_cast<const raw_t<T>*>(xn.data_ptr());
  const int64_t batch = batch_of(x), total = x.numel(), n = total / batch;
  const auto gsum = per_sample_sums(batch, n, [&](int64_t s, int64_t e, int64_t) {
    return sumsq_piece<T>(X + s, G + s, XN + s, e - s, GradOf{});
  });
  std::vector<float> gscale(batch), dscale(batch);
  for (int64_t b = 0; b < batch; ++b) gscale[b] = l2_grad_scale(static_cast<float>(gsum[b]), bud.step_of(b));
  const auto dsum = per_sample_sums(batch, n, [&](int64_t s, int64_t e, int64_t b) {
    return sumsq_piece<T>(X + s, G + s, XN + s, e - s, DeltaOf{gscale[b]});
  });
  for (int64_t b = 0; b < batch; ++b) dscale[b] = l2_proj_scale(static_cast<float>(dsum[b]), bud.eps_of(b));
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, n, [&](int64_t s, int64_t e, int64_t b) {
      update_piece<T>(X + s, G + s, XN + s, e - s, L2Op{gscale[b], dscale[b], lo, hi});
    });
  });
}

template <template <typename> class K>
void dispatch_step(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                   const std::optional<at::Tensor>& eps_t, double eps, const std::optional<at::Tensor>& step_t,
                   double step, double lo, double hi) {
  check_step_args(x_adv, grad, x_nat, eps_t, step_t);
  TORCH_CHECK(x_adv.device().is_cpu(), "roli: the cpp kernels run on CPU tensors; got ", x_adv.device());
  if (x_adv.numel() == 0) return;
  at::Tensor x = writable_operand(x_adv);
  at::Tensor g = readable_like(grad, x), xn = readable_like(x_nat, x);
  const Budget bud = make_budget(eps_t, eps, step_t, step);
  switch (x.scalar_type()) {
    case at::kFloat: K<float>::run(x, g, xn, bud, lo, hi); break;
    case at::kBFloat16: K<c10::BFloat16>::run(x, g, xn, bud, lo, hi); break;
    case at::kHalf: K<c10::Half>::run(x, g, xn, bud, lo, hi); break;
    default: TORCH_CHECK(false, "roli: the cpp kernels support float32, bfloat16 and float16; got ", x.scalar_type());
  }
  finish_write(x_adv, x);
}

template <typename T>
struct LinfK {
  static void run(const at::Tensor& x, const at::Tensor& g, const at::Tensor& xn, Budget b, double lo, double hi) {
    linf_kernel<T>(x, g, xn, b, static_cast<float>(lo), static_cast<float>(hi));
  }
};
template <typename T>
struct L2K {
  static void run(const at::Tensor& x, const at::Tensor& g, const at::Tensor& xn, Budget b, double lo, double hi) {
    l2_kernel<T>(x, g, xn, b, static_cast<float>(lo), static_cast<float>(hi));
  }
};

void pgd_step_linf_cpu(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                       const std::optional<at::Tensor>& eps_t, double eps, const std::optional<at::Tensor>& step_t,
                       double step, double lo, double hi) {
  dispatch_step<LinfK>(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi);
}

void pgd_step_l2_cpu(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                     const std::optional<at::Tensor>& eps_t, double eps, const std::optional<at::Tensor>& step_t,
                     double step, double lo, double hi) {
  dispatch_step<L2K>(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi);
}

void keep_best_cpu(const at::Tensor& best_x, const at::Tensor& best_score, const at::Tensor& x_adv,
                   const at::Tensor& score) {
  check_keep_best_args(best_x, best_score, x_adv, score);
  TORCH_CHECK(best_x.device().is_cpu(), "roli: the cpp kernels run on CPU tensors; got ", best_x.device());
  const int64_t batch = best_x.size(0);
  if (batch == 0) return;
  std::vector<uint8_t> better(static_cast<size_t>(batch));
  const at::Tensor sc = score.contiguous();
  at::Tensor bs = best_score.is_contiguous() ? best_score : best_score.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "roli_keep_best_score", [&] {
    const auto* s = sc.data_ptr<scalar_t>();
    auto* best = bs.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      better[b] = static_cast<double>(s[b]) > static_cast<double>(best[b]);
      if (better[b]) best[b] = s[b];
    }
  });
  finish_write(best_score, bs);
  if (best_x.numel() == 0) return;
  at::Tensor bx = writable_operand(best_x);
  const at::Tensor xa = readable_like(x_adv, bx);
  const int64_t elem = bx.element_size(), n = bx.numel() / batch;
  auto* dst = static_cast<char*>(bx.data_ptr());
  const auto* src = static_cast<const char*>(xa.data_ptr());
  at::parallel_for(0, bx.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, n, [&](int64_t s, int64_t e, int64_t b) {
      if (better[b]) std::memcpy(dst + s * elem, src + s * elem, static_cast<size_t>((e - s) * elem));
    });
  });
  finish_write(best_x, bx);
}

}  // namespace

TORCH_LIBRARY_IMPL(roli, CPU, m) {
  m.impl("pgd_step_linf_", &pgd_step_linf_cpu);
  m.impl("pgd_step_l2_", &pgd_step_l2_cpu);
  m.impl("keep_best_", &keep_best_cpu);
}

}  // namespace roli
