"""Every random stream of a run derives its seed here from the run's seed, by purpose, torchrun rank and batch:
one table instead of offsets scattered through the code. The values are those roli has always used, so runs
written before still resume (the RNG states in last.pt continue the same streams) and evaluate exactly."""

from __future__ import annotations

# purpose -> offset from the run's seed. Distinct streams: the guard's checks and its single-step copy never draw
# from the training attack's stream, nor does the PGD that replaces a single-step attack after the guard fires.
STREAMS = {
    "training attack": 0,
    "guard check": 5,
    "guard single-step": 7,
    "fallback attack": 2_000_003,  # PGD-k after the catastrophic-overfitting guard fired
    "evaluation": 0,  # PGD/AutoAttack of validation, test and roli evaluate (per batch: `index`)
}
RANK_STRIDE = 1_000_003  # each torchrun rank draws its own random starts for its shard of a training batch
BATCH_STRIDE = 7919  # an evaluation batch's attack seed depends on the batch, never on the process attacking it


def derive_seed(base: int, purpose: str, rank: int = 0, index: int = 0) -> int:
    """The seed of stream `purpose` (a key of STREAMS) of a run seeded `base`, for torchrun rank `rank` and
    evaluation batch `index`."""
    if purpose not in STREAMS:
        raise ValueError(f"unknown seed purpose {purpose!r}; one of {', '.join(STREAMS)}")
    return base + STREAMS[purpose] + RANK_STRIDE * rank + BATCH_STRIDE * index
