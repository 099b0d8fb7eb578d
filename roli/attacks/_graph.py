"""PGD's k steps recorded once in a CUDA graph and replayed (PGD(cuda_graph=True)).

The loop is static when PGD returns its last iterate (keep="last", one restart, no early stop): k times
a forward, an input-only backward and the fused step, on tensors of fixed shape. It is recorded per
(shapes, dtypes, budgets, steps, norm, loss, kernel, model storage) after two warm-up runs on a side
stream (the first one also runs the attack's checks, which read values on the host and so cannot be
recorded), then replayed: one graph launch per attack instead of the few hundred kernel launches of k
forward and backward passes.
The random start is drawn eagerly before the replay, so it follows the attack's torch.Generator.

What a replay reads is the storage recorded: the model's parameters and buffers (and the folded
BatchNorm weights, which are refreshed in place) by address. Updating them in place (optimizer steps,
load_state_dict) is seen by the next replay; replacing a tensor (e.g. .to()) changes the key and records
again. The loop is the attack's own, passed in as a callable that updates its start in place. On tensors
that are not on CUDA the same static tensors and loop are used, run instead of replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

MAX_GRAPHS = 4  # e.g. the full batch and the last, shorter one of an epoch, per budget


@dataclass
class _Recorded:
    replay: Callable[[], object]  # runs the k steps on the static tensors
    x: torch.Tensor  # the iterate: the start is copied in, the result read out
    inputs: tuple  # static (x_nat, y, target, eps_t, step_t); None where absent


def _storage_key(model: torch.nn.Module) -> tuple:
    return tuple((t.data_ptr(), t.dtype) for t in (*model.parameters(), *model.buffers()))


def _static(t):
    return None if t is None else t.clone(memory_format=torch.preserve_format)


class GraphedSteps:
    """Recordings of `loop(plan, model, x_nat, y, target, x, check)`, the attack's k plain steps in place
    on x, keyed by the call's shapes and budgets and by `settings` (the attack's fixed settings that the
    loop depends on: steps, norm, loss, ...)."""

    def __init__(self, loop: Callable[..., None], settings: tuple):
        self.loop, self.settings = loop, settings
        self.recorded: dict[tuple, _Recorded] = {}

    def run(self, plan, model, x_nat, y, target, start: torch.Tensor) -> torch.Tensor:
        """The k steps from `start` through the recording for these shapes, budgets, attack settings and
        model storage (`plan`: the attack call's roli.attacks.pgd.Plan)."""
        inputs = (x_nat, y, target, plan.eps[0], plan.step_size[0])
        key = (
            tuple((t.shape, t.stride(), t.dtype, t.device) if t is not None else None for t in inputs),
            start.stride(),
            plan.eps[1],
            plan.step_size[1],
            plan.step,
            plan.lo,
            plan.hi,
            self.settings,
            id(model),
            _storage_key(model),
        )
        rec = self.recorded.get(key)
        if rec is None:
            if len(self.recorded) >= MAX_GRAPHS:
                self.recorded.clear()
            rec = self.recorded[key] = self._record(plan, model, inputs, start)
        for static, value in zip(rec.inputs, inputs, strict=True):
            if static is not None:
                static.copy_(value)
        rec.x.copy_(start)
        rec.replay()
        return rec.x.clone(memory_format=torch.preserve_format)

    def _record(self, plan, model, inputs, start) -> _Recorded:
        static = tuple(_static(t) for t in inputs)
        x_nat, y, target, eps_t, step_t = static
        x = _static(start)
        # The recording reads the static budgets: the same plan with their storage.
        plan = replace(plan, eps=(eps_t, plan.eps[1]), step_size=(step_t, plan.step_size[1]))

        def steps(check: bool) -> None:
            # The attack's own loop (plain PGD: no scoring), in place on x's storage; x.detach() keeps the
            # static tensor itself out of autograd.
            self.loop(plan, model, x_nat, y, target, x.detach(), check)

        if not x.is_cuda:  # the same static tensors and loop, run instead of replayed
            return _Recorded(lambda: steps(check=True), x, static)
        device = x.device
        # Everything on the images' GPU, whatever the current device is (capture uses the current device's
        # streams): tensors on cuda:1 while device 0 is current would otherwise be captured on the wrong GPU.
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for i in range(2):  # warm-up: lazy initialisation, autotuning, and the checks (first run)
                    x.copy_(start)
                    steps(check=i == 0)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a DataLoader's pin-memory thread may call the CUDA runtime meanwhile; in the
            # default "global" mode that would invalidate the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                steps(check=False)

        def replay() -> None:
            with torch.cuda.device(device):
                graph.replay()

        return _Recorded(replay, x, static)
