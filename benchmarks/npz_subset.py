"""The first N training and M test images of an npz dataset, as a smaller npz (for a machine that has not got the
dataset and takes at most a few tens of MB with it, e.g. gpu_check.sh --data on the lent GPU machine).

    python benchmarks/npz_subset.py ../shared/data/cifar10/cifar10.npz .gpu_data/c10.npz --train 10000 --test 2000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--test", type=int, default=2000)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"npz_subset: {out} exists; give a new file")
    with np.load(args.source, allow_pickle=False) as d:
        parts = {"x_train": d["x_train"][: args.train], "y_train": d["y_train"][: args.train],
                 "x_test": d["x_test"][: args.test], "y_test": d["y_test"][: args.test]}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part.npz")
    np.savez(tmp, **parts)
    tmp.replace(out)
    print(
        f"{out}: {len(parts['y_train'])} train, {len(parts['y_test'])} test images, {out.stat().st_size / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
