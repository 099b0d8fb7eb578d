"""The registry of published robust backbones: what each publisher released, in which layout, for which
threat model, with which preprocessing (`python -m roli.zoo` lists it).

A registry name works wherever a model name does (`--model ares_swin_b`,
`create_classifier("ares_vit_b", 10)`): it builds the architecture the weights were trained in, with the
publisher's mean/std and input size (not timm's defaults: timm gives vit_base_patch16_224 a mean/std of
0.5, ARES trained it with the ImageNet statistics). The file itself is loaded with
`load_pretrained(model, path)` / `--checkpoint PATH`, which converts the publisher's layout (see
`layout`); roli never downloads without being asked (`--download`, where a hub is reachable).

Facts (file names, URLs, budgets, preprocessing, reported accuracies) are read from the publishers'
repositories: thu-ml/ares (robust_training/README.md and its training script), RobustBench/robustbench
(robustbench/model_zoo/imagenet.py), MadryLab/robustness (README) and DongXzz/RoLI (its model zoo names).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from roli import _env
from roli._io import TMP_SUFFIX, atomic_write, lock_file
from roli.models.wrapper import IMAGENET_MEAN, IMAGENET_STD

LINF_4 = ("Linf", 4 / 255, "4/255")
HUB_PREFIXES = ("hf-hub:", "hf_hub:")  # timm's names of models on the Hugging Face hub: names (data), not code


@dataclass(frozen=True)
class Published:
    """One published robust backbone."""

    name: str
    arch: str  # timm model name, or "package.module:function"
    threat: str  # "Linf" | "L2"
    eps: float  # the training budget on images in [0, 1]
    eps_text: str
    publisher: str
    filename: str  # the file name the publisher gives it
    url: str | None  # where the publisher puts it (text; roli downloads only with --download)
    layout: str  # the key conversion it needs (LAYOUTS)
    reported: str  # the publisher's own figures, for orientation
    arch_args: dict = field(default_factory=dict)
    mean: tuple | None = IMAGENET_MEAN  # None: no normalization (the publisher's network takes [0, 1] pixels)
    std: tuple | None = IMAGENET_STD
    input_size: int = 224
    interpolation: str = "bicubic"  # the publisher's evaluation resize
    crop_pct: float = 0.875  # resize to input_size / crop_pct, then centre-crop input_size
    sha256: str | None = None  # none of these publishers states one
    aliases: tuple = ()

    @property
    def resize_size(self) -> int:
        return int(round(self.input_size / self.crop_pct))

    def preprocessing(self) -> str:
        norm = (
            "no normalization"
            if self.mean is None
            else f"mean {tuple(round(m, 4) for m in self.mean)}, std {tuple(round(s, 4) for s in self.std)}"
        )
        return f"{norm}; {self.interpolation} resize {self.resize_size}, crop {self.input_size}"


LAYOUTS = {
    "timm": "timm key names; a plain state dict or a timm CheckpointSaver file (state_dict / state_dict_ema, "
    "argparse args), 'module.' stripped; timm's own checkpoint filter of the architecture (Swin: the original "
    "layout with patch merging at the end of a stage; relative-position tables and patch/position embeddings "
    "resized to the model's input size)",
    "robustbench": "RobustBench: nn.Sequential(normalize, model) ('model.' prefix, 'normalize.mean/std' dropped) or "
    "the bare model, under 'state_dict' or not, 'module.' stripped; then timm's checkpoint filter (Swin layouts)",
    "madrylab": "MadryLab robustness: {'model': {'module.model.*', 'module.attacker.model.*', 'module.normalizer.*'}, "
    "'optimizer', 'schedule', 'epoch'}: the 'module.model.' copy is loaded, the rest dropped",
    "torchvision": "torchvision ResNet names (conv1, bn1, layer1..4, fc), which timm's ResNet shares",
}

_ARES_URL = "https://ml.cs.tsinghua.edu.cn/~xiaoyang/aresbench/ckpt-imagenet/"
_ARES = "ARES 2.0 (thu-ml/ares, robust_training)"


def _ares(name: str, arch: str, file: str, clean: float, aa: float, **kw) -> Published:
    return Published(
        name,
        arch,
        *LINF_4,
        _ARES,
        file,
        _ARES_URL + file,
        "timm",
        f"ImageNet clean {clean}, AutoAttack {aa} (Linf 4/255, 1000 val images)",
        **kw,
    )


_RB = "RobustBench (ImageNet Linf leaderboard)"


def _gdrive(file_id: str) -> str:
    return f"https://drive.google.com/uc?id={file_id}"


def _rb(
    name: str, rb_name: str, arch: str, file_id: str, reported: str, layout: str = "robustbench", **kw
) -> Published:
    return Published(
        name, arch, *LINF_4, _RB, f"{rb_name}.pt", _gdrive(file_id), layout, reported, aliases=(rb_name,), **kw
    )


_MADRY = "MadryLab robustness (ImageNet ResNet-50)"
_LEADERBOARD = "see the RobustBench leaderboard"
_ROBUSTNESS = "see the robustness README's ImageNet table"
_RES256 = dict(interpolation="bilinear", crop_pct=224 / 256)  # Resize(256) + CenterCrop(224)
_NO_NORM = dict(mean=None, std=None)  # the network takes pixels in [0, 1] as they are

REGISTRY: dict[str, Published] = {}
for _entry in [
    # The paper's backbones (the RoLI reference loads these two files).
    _ares("ares_swin_b", "swin_base_patch4_window7_224", "ARES_Swin_base_patch4_window7_224_AT.pth", 76.6, 57.3),
    _ares("ares_vit_b", "vit_base_patch16_224", "ARES_ViT_base_patch16_224_AT.pth", 74.7, 49.7),
    _ares("ares_swin_s", "swin_small_patch4_window7_224", "ARES_Swin_small_patch4_window7_224_AT.pth", 76.6, 55.6),
    _ares("ares_swin_l", "swin_large_patch4_window7_224", "ARES_Swin_large_patch4_window7_224_AT.pth", 79.7, 62.3),
    _ares("ares_vit_s", "vit_small_patch16_224", "ARES_ViT_small_patch16_224_AT.pth", 70.7, 43.7),
    _ares("ares_convnext_s", "convnext_small", "ARES_ConvNext_Small_AT.pth", 77.3, 54.3),
    _ares("ares_convnext_b", "convnext_base", "ARES_ConvNext_Base_AT.pth", 77.2, 56.8),
    _ares("ares_convnext_l", "convnext_large", "ARES_ConvNext_Large_AT.pth", 78.8, 60.1),
    _ares("ares_resnet50", "resnet50", "ARES_ResNet50_AT.pth", 67.0, 34.1),
    _ares("ares_resnet101", "resnet101", "ARES_ResNet101_AT.pth", 71.0, 42.2),
    _ares("ares_resnet152", "resnet152", "ARES_ResNet152_AT.pth", 72.4, 46.7),
    _ares("ares_wide_resnet50_2", "wide_resnet50_2", "ARES_Wide_ResNet50_2_AT.pth", 70.5, 39.3),
    # RobustBench ImageNet Linf entries whose architecture timm builds (Liu2023Comprehensive is ARES's
    # paper, repackaged by RobustBench).
    _rb("liu2023_swin_b", "Liu2023Comprehensive_Swin-B", "swin_base_patch4_window7_224",
        "1-4mtxQCkThJUVdS3wvQ6NnmMZuySqR3c", "RobustBench AutoAttack 56.16 (as the ARES README cites it)"),
    _rb("liu2023_swin_l", "Liu2023Comprehensive_Swin-L", "swin_large_patch4_window7_224",
        "1-57sQfcrsDsslfDR18nRD7FnpQmsSBk7", "RobustBench AutoAttack 59.56 (as the ARES README cites it)"),
    _rb("liu2023_convnext_b", "Liu2023Comprehensive_ConvNeXt-B", "convnext_base",
        "10-nSm-qUftvfKXHeOAakBQl8rxm-jCbk", "RobustBench AutoAttack 55.82 (as the ARES README cites it)"),
    _rb("liu2023_convnext_l", "Liu2023Comprehensive_ConvNeXt-L", "convnext_large",
        "1dIPLNfdQtAnqZrKPyuy3_zDI-FVgJ2FH", "RobustBench AutoAttack 58.48 (as the ARES README cites it)"),
    _rb("salman2020_resnet50", "Salman2020Do_R50", "resnet50", "1TmT5oGa1UvVjM3d-XeSj_XmKqBNRUg8r",
        _LEADERBOARD, **_RES256),
    _rb("salman2020_resnet18", "Salman2020Do_R18", "resnet18", "1OThCOQCOxY6lAgxZxgiK3YuZDD7PPfPx",
        _LEADERBOARD, **_RES256),
    _rb("salman2020_wide_resnet50_2", "Salman2020Do_50_2", "wide_resnet50_2", "1OT7xaQYljrTr3vGbM37xK9SPoPJvbSKB",
        _LEADERBOARD, **_RES256),
    _rb("engstrom2019_resnet50", "Engstrom2019Robustness", "resnet50", "1T2Fvi1eCJTeAOEzrH_4TAIwO8HTOYVyn",
        _LEADERBOARD, **_RES256),
    _rb("mo2022_swin_b", "Mo2022When_Swin-B", "swin_base_patch4_window7_224", "1-SXi4Z2X6Zo_j8EO4slJcBMXNej8fKUd",
        _LEADERBOARD, interpolation="bilinear", crop_pct=1.0),
    _rb("mo2022_vit_b", "Mo2022When_ViT-B", "vit_base_patch16_224", "1-dUFdvDBflqMsMLjZv3wlPJTm-Jm7net",
        _LEADERBOARD, interpolation="bilinear", crop_pct=1.0),
    # Singh2023Revisiting: timm ConvNeXt with a convolutional stem in place of the patchify stem (built by
    # roli.models.convstem on top of timm). RobustBench builds them without its normalize wrapper and loads
    # them so (utils.py load_model lists them among the models without input normalization): they take pixels
    # in [0, 1] as they are. Only its ViT-S-ConvStem carries ImageNet normalization (convstem_models.py).
    _rb("singh2023_convnext_t_convstem", "Singh2023Revisiting_ConvNeXt-T-ConvStem",
        "roli.models.convstem:convnext_tiny_convstem", "1-FjtOF6LJ3-bf4VezsmWwncCxYSx-USP",
        _LEADERBOARD, **_NO_NORM),
    _rb("singh2023_convnext_s_convstem", "Singh2023Revisiting_ConvNeXt-S-ConvStem",
        "roli.models.convstem:convnext_small_convstem", "1-ZrMYajCCnrtV4oT0wa3qJJoQy1nUSnL",
        _LEADERBOARD, **_NO_NORM),
    _rb("singh2023_convnext_b_convstem", "Singh2023Revisiting_ConvNeXt-B-ConvStem",
        "roli.models.convstem:convnext_base_convstem", "1-lE-waaVvfL7lgBrydmZIM9UJimmHnVe",
        _LEADERBOARD, **_NO_NORM),
    _rb("singh2023_convnext_l_convstem", "Singh2023Revisiting_ConvNeXt-L-ConvStem",
        "roli.models.convstem:convnext_large_convstem", "10-YOVdM2EQjHemSi9x2H44qKRSOXVQmh",
        _LEADERBOARD, **_NO_NORM),
    # MadryLab robustness library (Engstrom et al.): ResNet-50s, Linf and L2.
    Published("madry_resnet50_linf_4", "resnet50", *LINF_4, _MADRY, "imagenet_linf_4.pt",
              "https://www.dropbox.com/s/axfuary2w1cnyrg/imagenet_linf_4.pt?dl=0", "madrylab",
              _ROBUSTNESS, **_RES256),
    Published("madry_resnet50_linf_8", "resnet50", "Linf", 8 / 255, "8/255", _MADRY, "imagenet_linf_8.pt",
              "https://www.dropbox.com/s/yxn15a9zklz3s8q/imagenet_linf_8.pt?dl=0", "madrylab",
              _ROBUSTNESS, **_RES256),
    Published("madry_resnet50_l2_3", "resnet50", "L2", 3.0, "3.0", _MADRY, "imagenet_l2_3_0.pt",
              "https://www.dropbox.com/s/knf4uimlqsi1yz8/imagenet_l2_3_0.pt?dl=0", "madrylab",
              _ROBUSTNESS, **_RES256),
]:  # fmt: skip
    REGISTRY[_entry.name] = _entry

_ALIASES = {a.lower(): e.name for e in REGISTRY.values() for a in e.aliases}


def lookup(name: str) -> Published | None:
    """The registry entry of a name or alias (case-insensitive), else None."""
    if not isinstance(name, str):
        return None
    key = name.lower()
    return REGISTRY.get(key) or REGISTRY.get(_ALIASES.get(key, ""))


def table() -> str:
    """The registry as a Markdown table."""
    rows = ["| name | architecture | threat model | preprocessing | source | file |", "|---|---|---|---|---|---|"]
    for e in REGISTRY.values():
        rows.append(
            f"| `{e.name}` | {e.arch} | {e.threat} {e.eps_text} | {e.preprocessing()} | {e.publisher} "
            f"({e.layout} layout) | [{e.filename}]({e.url}) |"
        )
    return "\n".join(rows)


def cached_path(entry: Published) -> Path:
    """Where roli looks for (and --download puts) an entry's file: $ROLI_CACHE_DIR/weights/<file name>."""
    return _env.cache_root() / "weights" / entry.filename


def _direct_url(url: str) -> str | None:
    """A URL that a plain HTTP GET downloads, or None (Google Drive serves a confirmation page instead)."""
    if "drive.google.com" in url:
        return None
    if "dropbox.com" in url:
        return url.replace("?dl=0", "?dl=1")
    return url


def fetch(entry: Published, timeout: float = 60.0) -> Path:
    """Download an entry's file into the cache (atomically), checking its sha256 where the publisher gives
    one. Raises ValueError with what to do instead when the host cannot be reached. One process downloads a file at
    a time (a lock beside it): a second one waits, then finds it there; what a killed download left is removed."""
    dest = cached_path(entry)
    url = _direct_url(entry.url or "")
    if url is None:
        raise ValueError(
            f"{entry.name}: {entry.url} cannot be fetched by a plain download (Google Drive); fetch "
            f"it in a browser or with gdown and put it at {dest}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = lock_file(
        dest.parent / f".{entry.filename}.lock",
        waiting=f"{entry.name}: another process is downloading {dest}: waiting for it ...",
    )
    try:
        if dest.is_file():
            return dest  # downloaded meanwhile
        killed = re.compile(rf"\.{re.escape(entry.filename)}\.[a-z0-9_]{{8}}{re.escape(TMP_SUFFIX)}")
        for p in dest.parent.iterdir():  # atomic_write's temporaries of an earlier download of this file, killed
            if killed.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
        data = _download(entry, url, dest, timeout)
        atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))
    finally:
        os.close(fd)
    return dest


def _download(entry: Published, url: str, dest: Path, timeout: float) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a URL of the registry
            data = response.read()
    except OSError as e:
        raise ValueError(
            f"{entry.name}: cannot download {entry.url} ({e}); fetch it yourself and put it at {dest}"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if entry.sha256 is not None and digest != entry.sha256:
        raise ValueError(f"{entry.name}: the download's sha256 is {digest}, the publisher's {entry.sha256}")
    return data


def resolve_checkpoint(model: str, checkpoint: str | None, download: bool = False) -> str | None:
    """The weights file of a run: `checkpoint` when given; for a registry name without one, its file in the
    cache (fetched first with download=True). A registry name is never run with random weights: without
    the file, the error names it and where to put it."""
    entry = lookup(model)
    if checkpoint or entry is None:
        return checkpoint
    path = cached_path(entry)
    if path.is_file():
        return str(path)
    if download:
        return str(fetch(entry))
    raise ValueError(
        f"{entry.name} needs its weights file {entry.filename} (from {entry.url}): download it "
        f"and pass --checkpoint PATH, or put it at {path}, or add --download where the host is "
        "reachable"
    )
