"""The training attacks: PGD-k, and the single-step FGSM-RS and N-FGSM, all on the same fused PGD step.

- PGD-k (Madry et al. 2018): k steps of `step_size` from a random start in the eps-box, projected.
- FGSM-RS (Wong, Rice & Kolter, "Fast is better than free", ICLR 2020): a uniform start in the eps-box,
  one signed-gradient step of 1.25 eps, projected back onto the eps-box and the pixel range.
- N-FGSM (de Jorge et al., "Make Some Noise", NeurIPS 2022): a uniform start in a box of 2 eps (noise
  twice the budget), one signed-gradient step of eps, no projection onto the eps-box: the perturbation
  lies in the 3 eps box (noise + step) and the pixel range.

Each is a roli.attacks.PGD with keep="last" (no extra forward pass): one forward with a graph and one
input-only backward per step. A training step with PGD-k costs k + 1 forward and backward passes per image
(the attack's k and the update's one); FGSM-RS and N-FGSM cost 2. Single-step training can collapse
("catastrophic overfitting"): roli.training.guard watches for it.
"""

from __future__ import annotations

from roli.attacks.pgd import PGD

ATTACKS = ("pgd", "fgsm-rs", "n-fgsm")
SINGLE_STEP = ("fgsm-rs", "n-fgsm")  # the ones that can collapse (catastrophic overfitting)
FGSM_RS_STEP = 1.25  # x eps (Wong et al. 2020)
NFGSM_NOISE = 2.0  # x eps: the random start's half-width (de Jorge et al. 2022)
NFGSM_STEP = 1.0  # x eps


def check_attack(kind: str, norm: str = "linf") -> None:
    """A ValueError naming the choices for an unknown kind; the single-step attacks are Linf attacks."""
    if kind not in ATTACKS:
        raise ValueError(f"attack {kind!r} is not one of {', '.join(ATTACKS)}")
    if kind != "pgd" and norm != "linf":
        raise ValueError(f"{kind} is a Linf attack (its step is the gradient's sign); use pgd for the {norm} norm")


def label(kind: str, steps: int) -> str:
    """The attack's name in logs and tables: PGD-7, FGSM-RS, N-FGSM."""
    return f"PGD-{steps}" if kind == "pgd" else {"fgsm-rs": "FGSM-RS", "n-fgsm": "N-FGSM"}[kind]


def radius(kind: str, eps: float) -> float:
    """The Linf radius every adversarial example of the attack lies in (N-FGSM: noise + step)."""
    return eps * (NFGSM_NOISE + NFGSM_STEP) if kind == "n-fgsm" else eps


def training_attack(
    kind: str, model, eps: float, step_size: float = 2 / 255, steps: int = 7, norm: str = "linf", **options
) -> PGD:
    """The training attack `kind` on `model` (step_size and steps are PGD's; the single-step attacks take
    their published steps). `options` go to PGD (precision, seed, memory_format, fold_bn, cuda_graph, ...);
    random_start=False is honoured by PGD only (the single-step attacks are defined by their noise)."""
    check_attack(kind, norm)
    options.setdefault("keep", "last")
    if kind == "pgd":
        return PGD(model, eps=eps, step_size=step_size, steps=steps, norm=norm, **options)
    options.pop("random_start", None)
    if kind == "fgsm-rs":
        return PGD(model, eps=eps, step_size=FGSM_RS_STEP * eps, steps=1, norm="linf", random_start=True, **options)
    return PGD(
        model,
        eps=radius(kind, eps),
        step_size=NFGSM_STEP * eps,
        steps=1,
        norm="linf",
        random_start=True,
        init_eps=NFGSM_NOISE * eps,
        **options,
    )
