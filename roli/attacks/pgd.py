"""PGD (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018).

The inner loop of everything roli does. Per step: one forward with a graph and one input-only backward
(parameters are frozen while the attack runs, so no weight-gradient work and no .grad is written), then
the fused step + projection + clip of roli.ops. Restarts keep the per-sample worst case, and the best
iterate is chosen per example (the RoLI reference code picks it per batch by the mean loss).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from roli._amp import attack_loss_scale, autocast_for
from roli.attacks import _checks as C
from roli.attacks._graph import GraphedSteps
from roli.attacks._mode import attack_mode, registrations
from roli.attacks.losses import attack_loss
from roli.models.fold import BatchNormFolding
from roli.models.fp8 import FP8Linears, fp8_supported
from roli.ops import check_clip, keep_best_kernel, pgd_init, step_kernel

INF = float("inf")


@dataclass
class PGDResult:
    """x_adv: (B, ...) adversarial images. success: (B,) bool, the attack's goal reached (misclassified,
    or the target class predicted) at some evaluated iterate, or None where plain PGD did not evaluate
    its final iterate (restarts=1, keep="last", early_stop=False). clean_success: (B,) bool, the goal
    already reached by the clean image (untargeted: clean mistakes), where the attack evaluated it
    (keep="best" or early_stop), else None: an evaluation needs no second clean forward.
    reference_success: (B,) bool, with reference_chunk set: the goal reached on the iterate the RoLI reference
    code would keep (see reference_pick), else None."""

    x_adv: torch.Tensor
    success: torch.Tensor | None
    clean_success: torch.Tensor | None = None
    reference_success: torch.Tensor | None = None

    def __repr__(self) -> str:  # shapes and rates, not the tensors
        def rate(t):
            return "-" if t is None else f"{100 * float(t.float().mean()) if t.numel() else 0.0:.2f}%"

        return (f"PGDResult(x_adv {tuple(self.x_adv.shape)}, success {rate(self.success)}, clean_success "
                f"{rate(self.clean_success)}, reference_success {rate(self.reference_success)})")  # fmt: skip


def reference_pick(losses: torch.Tensor, success: torch.Tensor, chunk: int) -> torch.Tensor:
    """The RoLI reference's scoring of one PGD run (src/adv_func.py, adv_generator with use_best): per batch of
    `chunk` consecutive examples, the iterate (the random start x_0, ..., the final x_k) with the highest
    batch-mean loss, the first of equals (it replaces only on a strictly higher loss); each example's outcome
    is then read on that iterate. losses, success: (k + 1, B), iterate by iterate. Returns (B,) bool."""
    steps, batch = losses.shape
    group = torch.arange(batch, device=losses.device) // chunk  # (B,) the example's reference batch
    groups = (batch + chunk - 1) // chunk
    sums = losses.new_zeros(steps, groups).index_add_(1, group, losses)
    sizes = torch.bincount(group, minlength=groups).to(losses.dtype)
    pick = torch.argmax(sums / sizes, dim=0)  # (groups,) first maximum
    return success[pick[group], torch.arange(batch, device=losses.device)]


@dataclass(frozen=True)
class Plan:
    """What one attack call runs with, resolved and validated once: the fused kernels for the images'
    device and dtype, the pixel bounds, and the budgets in the kernels' form ((B,) float32 tensor or
    None, float). Passed down the loop (and into the CUDA-graph recording), never stored on the attack."""

    step: Callable
    keep_best: Callable
    lo: float
    hi: float
    eps: tuple[torch.Tensor | None, float]
    step_size: tuple[torch.Tensor | None, float]
    init_eps: tuple[torch.Tensor | None, float]  # radius of the random start


def _take(t, index: torch.Tensor | None):
    """Rows `index` of a per-sample tensor (None: all); floats and None pass through."""
    return t.index_select(0, index) if isinstance(t, torch.Tensor) and index is not None else t


@dataclass(frozen=True, eq=False)
class PGDConfig:
    """PGD's settings, validated once when built (the fields are those of PGD's arguments, documented
    there). Frozen: an attack's settings never change under it; dataclasses.replace makes a variant."""

    eps: float | torch.Tensor = 8 / 255
    step_size: float | torch.Tensor = 2 / 255
    steps: int = 10
    norm: str = "linf"
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    targeted: bool = False
    keep: str = "best"
    early_stop: bool = False
    precision: str = "fp32"
    impl: str | None = None
    seed: int | None = None
    clip: tuple[float, float] | None = (0.0, 1.0)
    memory_format: str = "auto"
    fold_bn: bool = True
    cuda_graph: bool = False
    init_eps: float | torch.Tensor | None = None
    deferred: bool = False
    reference_chunk: int | None = None

    def __post_init__(self):
        C.check_config(self)
        if self.init_eps is not None:
            C.check_budget_value("init_eps", self.init_eps)
        for name in ("random_start", "targeted", "early_stop", "fold_bn", "cuda_graph", "deferred"):
            object.__setattr__(self, name, bool(getattr(self, name)))

    @property
    def scored(self) -> bool:
        """Whether iterates are scored (per-sample bookkeeping), or plain PGD returns its last iterate."""
        return self.keep == "best" or self.restarts > 1 or self.early_stop

    def graph_key(self) -> tuple:
        """The settings a CUDA-graph recording of the loop depends on (with the call's shapes and budgets)."""
        return self.steps, self.norm, self.loss, self.targeted, self.precision


class PGD:
    """Projected gradient descent, Linf or L2, on images in [0, 1].

    Args:
        model: images (B, C, H, W) in [0, 1] -> logits (B, K). Normalisation lives inside the model
            (roli.models.NormalizedModel). A DDP model is attacked through its inner module.
        eps: budget, a float or a (B,) tensor (per-sample budgets).
        step_size: step length (> 0), a float or a (B,) tensor.
        steps: number of gradient steps (>= 0).
        norm: "linf" or "l2".
        random_start: start uniformly in the budget ball (Linf box / L2 ball) instead of at x.
        init_eps: radius of that random start (default: eps). N-FGSM starts in a box twice the budget's
            size and projects onto eps + step (roli.attacks.fast).
        restarts: independent runs; a sample counts as broken if any run breaks it, otherwise the
            highest-loss iterate is kept. Later restarts attack only the samples still unbroken.
        loss: "ce" (cross-entropy) or "dlr" (Difference of Logits Ratio).
        targeted: push towards `target` labels passed to the call instead of away from `y`.
        keep: "best" (per-sample highest-loss / first successful iterate, including the clean image) or
            "last" (the final iterate, as in adversarial training: no extra forward pass).
        early_stop: stop attacking samples whose goal is reached (evaluation: same accuracy, less work).
        precision: "fp32", "bf16" or "fp16" (forward and backward under autocast; CPU and GPU; fp16 scales the
            loss by roli._amp.FP16_ATTACK_SCALE before the input-gradient backward, so no gradient flushes to 0),
            or "fp8": bf16 autocast with the model's linear layers (in and out features multiples of 16) run
            through float8 GEMMs, dynamically scaled, e4m3 forward and e5m2 gradients, their weights cast once
            per call (roli.models.fp8). Needs a GPU of compute capability 8.9+ (L40S, H100, H200) or the CPU
            (the same numbers emulated in a float32 GEMM, no speed-up); elsewhere a ValueError says why.
        impl: backend of the fused step (roli.ops), default $ROLI_IMPL or "auto".
        seed: seeds the random starts (identical runs); None uses the global generator.
        clip: the pixel range.
        memory_format: layout of the attack's image tensors: "auto" (channels_last for 4-D images under
            bf16, where oneDNN convolutions run 1.2-1.5x faster on it on a 2-core Xeon), "channels_last"
            or "contiguous". The result is returned in the caller's layout either way.
        fold_bn: while the attack runs, fold every Conv -> BatchNorm pair of the (eval-mode) model into one
            conv (roli.models.BatchNormFolding): the same function up to float rounding, without the
            BatchNorm work in any step; the model is restored afterwards (a torch.compile'd model
            compiles the folded structure once more).
        cuda_graph: on CUDA tensors, record the k steps in a CUDA graph once per batch shape and budget and
            replay it (roli.attacks._graph). Needs the static loop: keep="last", restarts=1, no early_stop.
            Elsewhere the same loop runs uncaptured.
        deferred: the checks of values (pixel range, labels < K, finite logits) add to a device flag that
            pop_invalid() returns, instead of synchronising with the host in every call (training attacks,
            read at the training loop's synchronisation points).
        reference_chunk: also score the first restart as the RoLI reference code does (per batch of this many
            consecutive examples, the iterate with the highest batch-mean loss: reference_pick), from the same
            iterates: PGDResult.reference_success. Needs keep="best" and no early stop (every example is
            attacked at every step, as the batch means need).

    Shapes: x (B, ...) float in [0, 1]; y (B,) int64. Returns x_adv with x's shape and dtype.

    Example:
        >>> attack = PGD(model, eps=8 / 255, step_size=2 / 255, steps=10)
        >>> x_adv = attack(x, y)
    """

    __slots__ = ("model", "config", "seed", "_gen", "_folding", "_invalid", "_graphed", "_fp8")

    def __init__(self, model: nn.Module, config: PGDConfig | float | torch.Tensor | None = None, **settings):
        """PGD(model, eps=..., steps=...), PGD(model, 8 / 255, alpha=2 / 255, steps=10) as torchattacks writes it
        (eps positional, `alpha` for step_size), or PGD(model, config) (a PGDConfig; `settings` then override its
        fields, as dataclasses.replace would). The settings are validated once, here, and never change:
        the attack's attributes cannot be set afterwards (build another attack, or pass another config)."""
        if "alpha" in settings:
            if "step_size" in settings:
                raise TypeError("PGD: give alpha or step_size, not both (alpha is torchattacks' name for it)")
            settings["step_size"] = settings.pop("alpha")
        if isinstance(config, (int, float, torch.Tensor)) and not isinstance(config, bool):
            if "eps" in settings:
                raise TypeError("PGD: eps given twice (positionally and by name)")
            config, settings = None, {"eps": config, **settings}
        if config is not None and not isinstance(config, PGDConfig):
            raise TypeError(f"PGD(model, eps or config, **settings): got {type(config).__name__} for eps/config")
        if config is None:
            config = PGDConfig(**settings)
        elif settings:
            config = replace(config, **settings)
        self.model, self.config = model, config
        self.seed = config.seed  # the random starts' seed now: reseed() changes it, per batch
        self._invalid: torch.Tensor | None = None
        self._graphed = GraphedSteps(self._plain_loop, config.graph_key()) if config.cuda_graph else None
        self._gen = self._folding = self._fp8 = None  # built on first use

    def __getattr__(self, name: str):
        """The settings read as attributes (attack.eps, attack.steps, ...), from the frozen config; setting
        one is an AttributeError (__slots__), never a silent change of a running attack."""
        if name in PGDConfig.__dataclass_fields__:
            return getattr(self.config, name)
        raise AttributeError(f"'PGD' object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in PGDConfig.__dataclass_fields__ and name != "seed":
            raise AttributeError(
                f"PGD.{name} is fixed when the attack is built: PGD(model, attack.config, "
                f"{name}=...) builds one with another {name}"
            )
        object.__setattr__(self, name, value)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.perturb(x, y, target).x_adv

    # -- helpers ------------------------------------------------------------------------------------

    def _forward(self, model, x_adv, y, target, with_grad: bool, check: bool):
        with torch.set_grad_enabled(with_grad), autocast_for(x_adv.device, self.config.precision):
            logits = model(x_adv)
        if check and self.config.deferred:
            C.check_logits_shape(logits, x_adv)
            self._flag(C.invalid_values(y, logits.detach(), target))
        elif check:
            C.check_logits(logits, x_adv, y, target)
        loss = attack_loss(self.config.loss, logits, y, target)
        if not self.config.scored:  # plain PGD never reads it: no argmax/compare kernels in the training attack
            return loss, None
        pred = logits.argmax(1)
        success = pred == target if target is not None else pred != y
        return loss, success

    @staticmethod
    def _record(plan: Plan, best_x, best_score, idx, x_cur, score):
        if idx is None:
            plan.keep_best(best_x, best_score, x_cur, score)
            return
        bx, bs = best_x.index_select(0, idx), best_score.index_select(0, idx)
        plan.keep_best(bx, bs, x_cur, score)
        best_x.index_copy_(0, idx, bx)
        best_score.index_copy_(0, idx, bs)

    # -- the attack -----------------------------------------------------------------------------------

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> PGDResult:
        """Attack a batch. See the class docstring."""
        C.check_images(x, self.config.clip, values=not self.config.deferred)
        C.check_labels("y", y, x, values=not self.config.deferred)
        if self.config.targeted and target is None:
            raise ValueError("targeted PGD needs target labels: attack(x, y, target)")
        if target is not None:
            C.check_labels("target", target, x, values=not self.config.deferred)
        target = target if self.config.targeted else None
        if self.config.deferred and (bad := C.invalid_range(x, self.config.clip)) is not None:  # read later
            self._flag(bad)
        x_nat = self._layout(x.detach())
        result = self._perturb(x_nat, y, target)
        layout = (
            torch.channels_last
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format
        )
        return replace(result, x_adv=result.x_adv.contiguous(memory_format=layout))

    def _generator(self, device: torch.device) -> torch.Generator | None:
        # One seeded generator per attack object, kept across calls: every batch gets fresh random
        # starts, and a new attack object with the same seed replays the same sequence.
        if self.seed is None:
            return None
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
        return self._gen

    def _flag(self, bad: torch.Tensor) -> None:
        self._invalid = bad if self._invalid is None else self._invalid | bad

    def pop_invalid(self) -> torch.Tensor | None:
        """deferred=True: a bool device tensor, True if any call since the last pop had invalid values (images
        outside the pixel range, labels out of range, non-finite logits); None if nothing was checked."""
        bad, self._invalid = self._invalid, None
        return bad

    def reseed(self, seed: int | None) -> None:
        """Start the random-start generator afresh from `seed` (per-batch seeds: a batch's noise does not depend
        on which batches this attack object saw before, e.g. on another torchrun rank)."""
        self.seed, self._gen = seed, None

    def rng_state(self) -> dict | None:
        """The random-start generator's state, on its own device (None: seed=None, the global generator is
        used). Reading it never creates or replaces the generator."""
        if self.seed is None:
            return None
        if self._gen is None:
            return {"device": None, "state": None}  # no start drawn yet: the next one comes from the seed
        return {"device": str(self._gen.device), "state": self._gen.get_state()}

    def set_rng_state(self, state: dict | torch.Tensor | None) -> None:
        """Restore what rng_state() returned (a bare tensor is a CPU generator's state, as older runs saved)."""
        if state is None or self.seed is None:
            return
        if isinstance(state, torch.Tensor):
            state = {"device": "cpu", "state": state}
        if state["state"] is None:
            self._gen = None
            return
        device = torch.device(state["device"])
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
        self._gen.set_state(state["state"])

    def _folded(self, model: nn.Module):
        """A context in which `model` runs with its Conv -> BatchNorm pairs folded (fold_bn), else a no-op."""
        if not self.config.fold_bn:
            return contextlib.nullcontext()
        inner = getattr(model, "_orig_mod", model)  # torch.compile'd: fold the module it compiled
        folding = self._folding
        if folding is None or folding.model is not inner:
            self._folding = folding = BatchNormFolding(inner)
        # Under bf16 autocast the folded weights are kept in bf16: the same values autocast would make,
        # cast once per attack instead of at every step.
        return folding.applied(torch.bfloat16 if self.config.precision in ("bf16", "fp8") else None)

    def _float8(self, model: nn.Module, device: torch.device):
        """A context in which `model`'s eligible linears run in float8 (precision "fp8"), else a no-op. The
        linears are looked for again whenever a module or parameter was registered anywhere since."""
        if self.config.precision != "fp8":
            return contextlib.nullcontext()
        ok, why = fp8_supported(device)
        if not ok:
            raise ValueError(f"PGD precision='fp8': {why}; use precision='bf16'")
        inner = getattr(model, "_orig_mod", model)
        if self._fp8 is None or self._fp8[1].model is not inner or self._fp8[0] != registrations():
            linears = FP8Linears(inner)
            self._fp8 = (registrations(), linears)  # after building: its own FP8Linear modules registered too
        return self._fp8[1].applied()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        want = self.config.memory_format
        if want == "auto":
            want = "channels_last" if (x.dim() == 4 and self.config.precision in ("bf16", "fp8")) else "keep"
        if want == "channels_last" and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if want == "contiguous":
            return x.contiguous()
        return x

    def _perturb(self, x_nat: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> PGDResult:
        device, batch = x_nat.device, x_nat.shape[0]
        gen = self._generator(device)
        c = self.config
        lo, hi = check_clip(c.clip)
        plan = Plan(
            step=step_kernel(c.norm, device, x_nat.dtype, c.impl),
            keep_best=keep_best_kernel(device, x_nat.dtype, c.impl),
            lo=lo,
            hi=hi,
            eps=C.budget(c.eps, x_nat),
            step_size=C.budget(c.step_size, x_nat),
            init_eps=C.budget(c.eps if c.init_eps is None else c.init_eps, x_nat),
        )
        if batch == 0:
            return PGDResult(x_nat.clone(), torch.zeros(0, dtype=torch.bool, device=device))
        # Plain PGD (keep="last", one restart, no early stop) returns its last iterate: no best-iterate copy of
        # the batch and no scores to allocate (a training attack's every call).
        best_x = x_nat.clone(memory_format=torch.preserve_format) if self.config.scored else None
        best_score = torch.full((batch,), -INF, device=device) if self.config.scored else None
        clean_success = None
        with attack_mode(self.model) as model, self._folded(model), self._float8(model, device), torch.no_grad():
            if self._graphed is not None:  # the static loop, from its recording; the start is drawn eagerly
                start = self._start(plan, x_nat, gen)
                x_last = self._graphed.run(plan, model, x_nat, y, target, x_nat if start is None else start)
                return PGDResult(x_last, None)
            idx = None  # None: all samples active (no gather/scatter needed)
            check = True
            if self.config.keep == "best" or self.config.early_stop:  # the clean image is an iterate too
                loss, clean_success = self._forward(model, x_nat, y, target, with_grad=False, check=True)
                check = False
                self._record(plan, best_x, best_score, None, x_nat, torch.where(clean_success, INF, loss))
            reference = None
            for restart in range(self.config.restarts):
                if restart > 0 or self.config.early_stop:
                    idx = torch.nonzero(best_score != INF)[:, 0]
                    if idx.numel() == 0:
                        break
                    if idx.numel() == batch:
                        idx = None
                start = self._start(plan, x_nat, gen)
                trace = [] if restart == 0 and self.config.reference_chunk else None  # every iterate's scores
                x_last = self._run(plan, model, x_nat, y, target, start, idx, best_x, best_score, check, trace)
                check = False
                if trace is not None:
                    losses, successes = (torch.stack(t) for t in zip(*trace, strict=True))
                    reference = reference_pick(losses, successes, self.config.reference_chunk)
            if not self.config.scored:
                return PGDResult(x_last, None)
        return PGDResult(best_x, best_score == INF, clean_success, reference)

    def _start(self, plan: Plan, x_nat: torch.Tensor, gen) -> torch.Tensor | None:
        """The random start of a restart, for the whole batch (None: start at x_nat)."""
        if not self.config.random_start:
            return None
        eps_t, eps_f = plan.init_eps
        init = eps_t if eps_t is not None else eps_f
        return pgd_init(x_nat, init, self.config.norm, generator=gen, clip=self.config.clip)

    def _plain_loop(self, plan: Plan, model, x_nat, y, target, x: torch.Tensor, check: bool) -> None:
        """The static loop a CUDA graph records: plain PGD's steps on all samples, in place on x."""
        self._run(plan, model, x_nat, y, target, x, None, None, None, check)

    def _run(self, plan: Plan, model, x_nat, y, target, start, idx, best_x, best_score, check, trace=None):
        """One restart on the samples `idx` (None: all) from `start` (None: x_nat), which the steps update
        in place when idx is None (what the CUDA-graph recording relies on). Returns the final iterate
        (plain PGD). trace: a list that receives every iterate's (loss, success), all samples (reference_chunk)."""
        (eps_t, eps_f), (step_t, step_f) = plan.eps, plan.step_size
        # The random start is drawn for the whole batch and then subset, so which samples are still
        # active never changes the random numbers of the others (early_stop keeps the same accuracy).
        xn, yy, tt, e, s = (_take(t, idx) for t in (x_nat, y, target, eps_t, step_t))
        x_adv = _take(start, idx) if start is not None else xn.clone(memory_format=torch.preserve_format)
        scale = attack_loss_scale(self.config.precision)  # fp16: no input gradient flushes to zero
        for it in range(self.config.steps + 1):
            last = it == self.config.steps
            if last and not self.config.scored:
                return x_adv
            x_adv.requires_grad_(not last)
            with torch.enable_grad():
                loss, success = self._forward(model, x_adv, yy, tt, with_grad=not last, check=check)
                check = False
                if not last:
                    grad = torch.autograd.grad(loss.sum() if scale == 1.0 else loss.sum() * scale, x_adv)[0]
            x_adv = x_adv.detach()
            if trace is not None:
                trace.append((loss.detach().float(), success))
            if self.config.keep == "best" or last or self.config.early_stop:
                score = (
                    torch.where(success, INF, loss.detach())
                    if (self.config.keep == "best" or last)
                    else torch.where(success, INF, -INF)
                )
                self._record(plan, best_x, best_score, idx, x_adv, score)
            if last:
                return x_adv
            if self.config.early_stop:  # one host sync per step (nonzero's size), only where samples were broken
                keep = torch.nonzero(~success)[:, 0]
                if keep.numel() == 0:
                    return x_adv
                if keep.numel() < len(success):
                    idx = keep if idx is None else idx.index_select(0, keep)
                    x_adv, grad, xn, yy, tt, e, s = (_take(t, keep) for t in (x_adv, grad, xn, yy, tt, e, s))
            plan.step(x_adv, grad, xn, e, eps_f, s, step_f, plan.lo, plan.hi)
        return x_adv


def _signature() -> inspect.Signature:
    """PGD's call as help() and IDEs show it: PGD(model, eps=8/255, *, step_size=2/255, steps=10, ...), every
    setting with its default (PGDConfig's), plus torchattacks' `alpha` for step_size; PGD(model, config) too."""
    P = inspect.Parameter
    params = [P("model", P.POSITIONAL_OR_KEYWORD)]
    for f in fields(PGDConfig):
        kind = P.POSITIONAL_OR_KEYWORD if f.name == "eps" else P.KEYWORD_ONLY
        params.append(P(f.name, kind, default=f.default))
    params.append(P("alpha", P.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


PGD.__signature__ = _signature()
