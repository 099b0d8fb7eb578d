"""keep_best_: every backend against a direct per-sample loop."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS

from roli.ops import keep_best_


def expected(best_x, best_score, x_adv, score):
    bx, bs = best_x.clone(), best_score.clone()
    for b in range(bx.shape[0]):
        if score[b] > best_score[b]:
            bx[b] = x_adv[b]
            bs[b] = score[b]
    return bx, bs


def scores(batch, dtype, gen):
    best = torch.randn(batch, generator=gen)
    new = torch.randn(batch, generator=gen)
    if batch >= 4:
        new[1] = best[1]  # a tie never replaces
        new[2] = float("nan")  # a NaN score never wins
        best[3] = float("-inf")  # the usual initial value: always replaced
    return best.to(dtype), new.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 3, 33, 17), (64, 3, 32, 32)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_loop(backend, shape, dtype, score_dtype):
    gen = torch.Generator().manual_seed(shape[0] * 31 + shape[2])
    best_x = torch.rand(shape, generator=gen).to(dtype)
    x_adv = torch.rand(shape, generator=gen).to(dtype)
    best_score, score = scores(shape[0], score_dtype, gen)
    want_x, want_s = expected(best_x, best_score, x_adv, score)
    out = keep_best_(best_x, best_score, x_adv, score, impl=backend)
    assert out[0] is best_x and out[1] is best_score
    assert torch.equal(best_x, want_x)
    assert torch.equal(best_score.nan_to_num(7.0), want_s.nan_to_num(7.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_non_contiguous(backend, layout):
    gen = torch.Generator().manual_seed(4)
    base = torch.rand(9, 3, 12, 14, generator=gen)
    x_adv = torch.rand(9, 3, 12, 14, generator=gen)
    if layout == "channels_last":
        best_x = base.contiguous(memory_format=torch.channels_last)
    else:
        best_x, x_adv = base[:, :, 1:, ::3], x_adv[:, :, 1:, ::3]
    best_score_full, score = scores(18, torch.float32, gen)
    best_score = best_score_full[::2]  # strided score vector
    want_x, want_s = expected(best_x, best_score, x_adv, score[:9])
    keep_best_(best_x, best_score, x_adv, score[:9], impl=backend)
    assert torch.equal(best_x, want_x)
    assert torch.equal(best_score.nan_to_num(7.0), want_s.nan_to_num(7.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_restarts_keep_per_sample_worst_case(backend):
    # Across several "restarts", each sample ends with the candidate of its own highest score.
    gen = torch.Generator().manual_seed(12)
    cands = torch.rand(5, 6, 2, 3, 3, generator=gen)  # (restarts, B, ...)
    cand_scores = torch.rand(5, 6, generator=gen)
    best_x = torch.zeros(6, 2, 3, 3)
    best_s = torch.full((6,), -float("inf"))
    for r in range(5):
        keep_best_(best_x, best_s, cands[r], cand_scores[r], impl=backend)
    winner = cand_scores.argmax(0)
    assert torch.equal(best_s, cand_scores.max(0).values)
    assert torch.equal(best_x, cands[winner, torch.arange(6)])
