"""The registry of published robust backbones: every entry builds its architecture with the publisher's
preprocessing, and a checkpoint written in the publisher's exact layout (key names, nesting, prefixes,
extra entries; reduced width/depth so it builds here) loads strictly and gives the same features as the
same weights loaded natively. Also: the original Swin layout, the RoLI reference code's saved ViT and
Swin models, EMA weights in a timm CheckpointSaver file, refusals, and the head rules through the CLI."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from roli._compat import import_timm
from roli.models import IMAGENET_MEAN, REGISTRY, create_classifier, load_pretrained
from roli.models.convstem import ConvStem
from roli.models.registry import lookup, resolve_checkpoint

timm = import_timm()

# Reduced sizes per architecture family (the layouts are what is tested, not the widths).
REDUCED = {
    "swin": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
    "vit": dict(embed_dim=48, depth=2, num_heads=2),
    "convnext": dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
    "convstem": dict(depths=(1, 1, 1, 1)),
    "resnet": dict(layers=[1, 1, 1, 1]),
}


def family(arch: str) -> str:
    return next(f for f in ("convstem", "swin", "vit", "convnext", "resnet") if f in arch)


def native(entry, num_classes: int = 1000):
    """The publisher's architecture with its own classifier, built the way the publisher builds it."""
    kwargs = REDUCED[family(entry.arch)]
    if ":" in entry.arch:
        from roli.models import convstem

        return getattr(convstem, entry.arch.split(":")[1])(num_classes=num_classes, **kwargs)
    return timm.create_model(entry.arch, pretrained=False, num_classes=num_classes, **kwargs)


def images(entry, n=2):
    torch.manual_seed(0)
    size = 224 if family(entry.arch) in ("swin", "vit") else 64
    return torch.rand(n, 3, size, size)


def original_swin_layout(sd: dict, model) -> dict:
    """timm's Swin state -> the original Swin layout (patch merging at the end of a stage, the classifier
    as head.*, the relative-position indices and attention masks stored)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    for name, buf in model.named_buffers():
        if name.endswith(("relative_position_index", "attn_mask")):
            out[name] = buf.clone()
    return out


def publisher_file(entry, sd: dict, model, path):
    """Write `sd` as the publisher ships it."""
    if entry.layout == "timm":  # ARES: timm's CheckpointSaver file (args Namespace, EMA copy, optimizer)
        if family(entry.arch) == "swin":
            sd = original_swin_layout(sd, model)  # the layout the RoLI reference loads ARES Swin-B into
        ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
        torch.save({"epoch": 99, "arch": entry.arch, "state_dict": sd, "state_dict_ema": ema,
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "version": 2, "metric": 57.3,
                    "args": argparse.Namespace(model=entry.arch, attack_eps=4 / 255)}, path)  # fmt: skip
    elif entry.layout == "robustbench":  # nn.Sequential(normalize, model), saved from DataParallel
        if ":" in entry.arch:  # the ConvStem models are stored without the normalize wrapper
            torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
            return
        state = {f"module.model.{k}": v for k, v in sd.items()}
        state |= {"module.normalize.mean": torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                  "module.normalize.std": torch.ones(1, 3, 1, 1)}  # fmt: skip
        torch.save(state, path)
    elif entry.layout == "madrylab":
        state = {f"module.model.{k}": v for k, v in sd.items()}
        state |= {f"module.attacker.model.{k}": v.clone() for k, v in sd.items()}
        state |= {"module.normalizer.new_mean": torch.rand(3, 1, 1), "module.normalizer.new_std": torch.rand(3, 1, 1),
                  "module.attacker.normalize.new_mean": torch.rand(3, 1, 1),
                  "module.attacker.normalize.new_std": torch.rand(3, 1, 1)}  # fmt: skip
        torch.save({"model": state, "optimizer": {"state": {}}, "schedule": None, "epoch": 90}, path)
    else:  # pragma: no cover
        raise AssertionError(entry.layout)


def test_registry_holds_the_papers_backbones_and_the_publishers():
    assert len(REGISTRY) >= 10
    for name in ("ares_swin_b", "ares_vit_b"):
        assert name in REGISTRY
    assert REGISTRY["ares_swin_b"].filename == "ARES_Swin_base_patch4_window7_224_AT.pth"
    assert REGISTRY["ares_vit_b"].filename == "ARES_ViT_base_patch16_224_AT.pth"
    publishers = {e.publisher.split()[0] for e in REGISTRY.values()}
    assert {"ARES", "RobustBench", "MadryLab"} <= publishers
    assert lookup("Liu2023Comprehensive_Swin-B") is REGISTRY["liu2023_swin_b"]  # RobustBench's own name works
    assert {e.threat for e in REGISTRY.values()} == {"Linf", "L2"}
    for e in REGISTRY.values():
        assert e.url and e.filename and e.layout in ("timm", "robustbench", "madrylab")


def test_registry_preprocessing_not_timms_defaults():
    model = create_classifier("ares_vit_b", 10, **REDUCED["vit"], img_size=224)
    assert timm.create_model("vit_base_patch16_224").pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # timm's
    torch.testing.assert_close(model.pre.mean.flatten(), torch.tensor(IMAGENET_MEAN))  # the publisher's
    assert model.published is REGISTRY["ares_vit_b"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_publisher_layout_loads_strictly_with_the_same_features(name, tmp_path):
    entry = REGISTRY[name]
    torch.manual_seed(1)
    src = native(entry).eval()
    path = tmp_path / entry.filename
    publisher_file(entry, src.state_dict(), src, path)
    kwargs = REDUCED[family(entry.arch)] | ({"img_size": 224} if family(entry.arch) in ("swin", "vit") else {})
    target = create_classifier(name, 10, **kwargs)
    assert target.published is entry
    report = load_pretrained(target, path)  # strict
    assert not report.head_loaded  # a 1000-class ImageNet classifier is never a 10-class head
    x = images(entry)
    target.eval()
    with torch.no_grad():
        want = src.forward_head(src.forward_features(target.pre(x)), pre_logits=True)
        torch.testing.assert_close(target.features(x), want, rtol=1e-5, atol=1e-5)
    if entry.layout == "timm":  # a CheckpointSaver file: --ema takes the EMA copy
        ema_model = create_classifier(name, 10, **kwargs)
        ema_report = load_pretrained(ema_model, path, ema=True)
        assert any("EMA" in n for n in ema_report.notes)
        assert "--ema loads them" in " ".join(report.notes)
        some = next(k for k, v in ema_model.backbone.state_dict().items() if v.is_floating_point())
        torch.testing.assert_close(ema_model.backbone.state_dict()[some], target.backbone.state_dict()[some] + 0.01)


def test_original_swin_layout_is_converted(tmp_path):
    entry = REGISTRY["ares_swin_b"]
    src = native(entry).eval()
    orig = original_swin_layout(src.state_dict(), src)
    assert "layers.0.downsample.reduction.weight" in orig and "layers.3.downsample.reduction.weight" not in orig
    torch.save(orig, tmp_path / "swin.pth")
    target = create_classifier("swin_base_patch4_window7_224", 1000, **REDUCED["swin"])
    report = load_pretrained(target, tmp_path / "swin.pth", keep_head=True)
    assert report.head_loaded and any("checkpoint filter" in n for n in report.notes)
    x = images(entry)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), src(target.pre(x)), rtol=1e-5, atol=1e-5)


def reference_vit_state(src) -> dict:
    """A ViT as the RoLI reference code saves it: fvcore's {"model": state} of nn.Sequential(normalize, ViT)
    with its own module names (transformer.embeddings..., attn.query/key/value) and head.last_layer."""
    sd, dim = src.state_dict(), src.embed_dim
    out = {"0.mean": torch.tensor(IMAGENET_MEAN), "0.std": torch.tensor((0.229, 0.224, 0.225))}
    fixed = {"patch_embed.proj.weight": "transformer.embeddings.patch_embeddings.weight",
             "patch_embed.proj.bias": "transformer.embeddings.patch_embeddings.bias",
             "cls_token": "transformer.embeddings.cls_token", "pos_embed": "transformer.embeddings.position_embeddings",
             "norm.weight": "transformer.encoder.encoder_norm.weight",
             "norm.bias": "transformer.encoder.encoder_norm.bias"}  # fmt: skip
    for k, v in sd.items():
        if k in fixed:
            out["1.enc." + fixed[k]] = v
        elif k.startswith("head."):
            out["1.head.last_layer." + k[5:]] = v
        elif k.startswith("blocks."):
            _, n, rest = k.split(".", 2)
            if rest.startswith("attn.qkv."):
                for name, part in zip(("query", "key", "value"), v.split(dim), strict=True):
                    out[f"1.enc.transformer.encoder.layer.{n}.attn.{name}.{rest.split('.')[-1]}"] = part
                continue
            rest = rest.replace("norm1.", "attention_norm.").replace("norm2.", "ffn_norm.").replace("mlp.", "ffn.")
            out[f"1.enc.transformer.encoder.layer.{n}.{rest.replace('attn.proj.', 'attn.out.')}"] = v
    return out


def test_roli_reference_vit_checkpoint_is_evaluated_as_it_was_trained(tmp_path):
    src = timm.create_model("vit_base_patch16_224", num_classes=7, **REDUCED["vit"]).eval()
    state = reference_vit_state(src)
    state["1.enc.transformer.encoder.layer.0.attn.query.lora_A"] = torch.zeros(4, 48)  # its zero LoRA
    torch.save({"model": state, "checkpointer": {}}, tmp_path / "best_model.pth")
    target = create_classifier("ares_vit_b", 7, **REDUCED["vit"], img_size=224)
    report = load_pretrained(target, tmp_path / "best_model.pth", keep_head=True)
    assert report.head_loaded and any("reference ViT" in n for n in report.notes)
    assert any("all-zero LoRA" in n for n in report.notes) and len(report.ignored) == 2  # the normaliser
    x = images(REGISTRY["ares_vit_b"])
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), src(target.pre(x)), rtol=1e-5, atol=1e-5)
    state["1.enc.transformer.encoder.layer.0.attn.query.lora_A"] = torch.ones(4, 48)  # a trained LoRA: refused
    torch.save({"model": state}, tmp_path / "lora.pth")
    with pytest.raises(ValueError, match="PEFT parameters roli cannot convert"):
        load_pretrained(create_classifier("ares_vit_b", 7, **REDUCED["vit"], img_size=224), tmp_path / "lora.pth")
    del state["1.enc.transformer.encoder.layer.0.attn.query.lora_A"]
    extra = {"1.enc.transformer.extra_norm.weight": torch.rand(48), **state}  # first: a name the conversion keeps
    torch.save({"model": extra}, tmp_path / "extra.pth")
    fresh = create_classifier("ares_vit_b", 7, **REDUCED["vit"], img_size=224)
    with pytest.raises(ValueError, match=r"1 unexpected keys \(transformer\.extra_norm\.weight\)\. To load it anyway"):
        load_pretrained(fresh, tmp_path / "extra.pth")
    report = load_pretrained(fresh, tmp_path / "extra.pth", strict=False, keep_head=True)
    assert report.unexpected == ["transformer.extra_norm.weight"] and report.missing == []
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), src(fresh.pre(x)), rtol=1e-5, atol=1e-5)  # every block loaded
    for extra, said in (
        ({"1.head.mlp.0.weight": torch.rand(4, 48)}, "the RoLI reference model has an MLP head (1.head.mlp.0.weight, "
         "...): roli's head is linear"),
        ({"1.enc.transformer.encoder.layer.0.adapter.down.weight": torch.rand(8, 48)}, "PEFT parameters roli cannot "
         "convert (transformer.encoder.layer.0.adapter.down.weight, 1 in all); merge them into the backbone first"),
        ({"1.enc.transformer.prompt_embeddings": torch.rand(1, 10, 48)}, "PEFT parameters roli cannot convert "
         "(transformer.prompt_embeddings, 1 in all)"),
    ):  # fmt: skip
        torch.save({"model": {**state, **extra}}, tmp_path / "peft.pth")
        with pytest.raises(ValueError) as e:
            load_pretrained(fresh, tmp_path / "peft.pth")
        assert said in str(e.value)
    del state["1.enc.transformer.encoder.layer.1.attn.key.bias"]
    torch.save({"model": state}, tmp_path / "no_key.pth")
    with pytest.raises(ValueError, match=r"^the RoLI reference ViT block 1 lacks some of attn\.query/key/value\.bias$"):
        load_pretrained(fresh, tmp_path / "no_key.pth")


def test_roli_reference_swin_checkpoint(tmp_path):
    src = timm.create_model("swin_base_patch4_window7_224", num_classes=5, **REDUCED["swin"]).eval()
    orig = original_swin_layout(src.state_dict(), src)
    state = {f"2.enc.{k}": v for k, v in orig.items() if not k.startswith("head.")}  # Sequential(resize, norm, Swin)
    state |= {"2.head.last_layer.weight": orig["head.weight"], "2.head.last_layer.bias": orig["head.bias"],
              "1.mean": torch.rand(3), "1.std": torch.rand(3) + 0.5}  # fmt: skip
    torch.save({"model": state}, tmp_path / "best_model.pth")
    target = create_classifier("ares_swin_b", 5, **REDUCED["swin"])
    assert load_pretrained(target, tmp_path / "best_model.pth", keep_head=True).head_loaded
    x = images(REGISTRY["ares_swin_b"])
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), src(target.pre(x)), rtol=1e-5, atol=1e-5)


def test_convstem_module_names_match_the_published_files():
    stem = ConvStem(3, (48, 96), (2, 2))
    assert [k for k in stem.state_dict()] == [f"stem.{i}.{p}" for i in (0, 1, 3, 4) for p in ("weight", "bias")]
    assert stem(torch.rand(1, 3, 32, 32)).shape == (1, 96, 8, 8)


def test_wrong_architecture_and_truncated_file_are_refused(tmp_path):
    src = native(REGISTRY["ares_convnext_b"])
    torch.save(src.state_dict(), tmp_path / "convnext.pth")
    with pytest.raises(ValueError, match="no tensor matches|other shapes"):
        load_pretrained(create_classifier("ares_vit_b", 10, **REDUCED["vit"], img_size=224), tmp_path / "convnext.pth")
    data = (tmp_path / "convnext.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read .* as a weights-only checkpoint"):
        load_pretrained(create_classifier("ares_convnext_b", 10, **REDUCED["convnext"]), tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_pretrained(create_classifier("ares_convnext_b", 10, **REDUCED["convnext"]), tmp_path / "empty.pth")


def test_registry_name_without_its_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"ARES_Swin_base_patch4_window7_224_AT.pth .*put it at .*weights"):
        resolve_checkpoint("ares_swin_b", None)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "ARES_Swin_base_patch4_window7_224_AT.pth").write_bytes(b"x")
    assert resolve_checkpoint("ares_swin_b", None).endswith("ARES_Swin_base_patch4_window7_224_AT.pth")
    assert resolve_checkpoint("resnet18", None) is None  # a plain timm name needs no file


def test_cli_one_line_errors_for_registry_and_preprocessing(tmp_path):
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "roli.train", *args, "--run-dir", str(tmp_path / "run")],
                           capture_output=True, text=True, timeout=120, env={"ROLI_CACHE_DIR": str(tmp_path),
                                                                             "PATH": "/usr/bin:/bin"})  # fmt: skip
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr
        return lines[0]

    assert "ARES_ViT_base_patch16_224_AT.pth" in run("--model", "ares_vit_b", "--dataset", "digits")
    assert "use --mean instead" in run("--model-arg", "mean=0.5,0.5,0.5")
    assert "std: must be > 0" in run("--mean", "0.5", "--std", "0")
    assert not (tmp_path / "run").exists()


def test_python_m_roli_zoo_lists_every_entry():
    r = subprocess.run([sys.executable, "-m", "roli.zoo"], capture_output=True, text=True, timeout=60)
    names = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert r.returncode == 0 and set(REGISTRY) <= names
    one = subprocess.run([sys.executable, "-m", "roli.zoo", "ares_swin_b"], capture_output=True, text=True, timeout=60)
    assert "ARES_Swin_base_patch4_window7_224_AT.pth" in one.stdout and "Linf, eps 4/255" in one.stdout


def test_head_rules_through_the_trainer(tmp_path):
    """A source whose classifier has the task's class count (5) never becomes the starting head unless asked:
    clean LP, ALP and RanLI start from a fresh random head, the log says which."""
    from roli.config import TrainConfig
    from roli.models.small import small_cnn
    from roli.train import main

    torch.manual_seed(5)
    source = small_cnn(num_classes=5)
    torch.save(source.state_dict(), tmp_path / "src.pt")
    common = ["--dataset", "digits", "--classes", "5-9", "--checkpoint", str(tmp_path / "src.pt"), "--eps", "0.1",
              "--step-size", "0.05", "--steps", "1", "--val-steps", "1", "--epochs", "1", "--warmup", "0"]  # fmt: skip
    cfg = TrainConfig(checkpoint=str(tmp_path / "src.pt"), dataset="digits", classes="5-9")
    fresh = cfg.model_spec.build(5, 1, "cpu", cfg.checkpoint)
    assert not torch.equal(fresh.head.weight, source.fc.weight)
    torch.testing.assert_close(fresh.backbone.features[0].weight, source.features[0].weight)  # the backbone is
    kept = TrainConfig(**{**cfg.to_dict(), "keep_source_head": True}).model_spec.build(5, 1, "cpu", cfg.checkpoint)
    assert torch.equal(kept.head.weight, source.fc.weight)

    assert main([*common, "--method", "ft", "--init", "random", "--run-dir", str(tmp_path / "ft")]) == 0
    log = (tmp_path / "ft" / "train.log").read_text()
    assert "starting from a fresh random head" in log and "is not used: a fresh random head" in log
    assert main([*common, "--method", "roli", "--compare-ranli", "--run-dir", str(tmp_path / "roli")]) == 0
    log = (tmp_path / "roli" / "train.log").read_text()
    assert log.count("starting from a fresh random head") == 1 and "keep-source-head" in log
    assert main([*common, "--method", "alp", "--keep-source-head", "--run-dir", str(tmp_path / "kept")]) == 0
    assert "starting from the checkpoint's classifier" in (tmp_path / "kept" / "train.log").read_text()


def test_download_checks_the_sha256_and_lands_atomically(tmp_path, monkeypatch):
    import dataclasses
    import hashlib

    from roli.models import registry as zoo

    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path / "cache"))
    payload = tmp_path / "published.pth"
    payload.write_bytes(b"weights of a published model")
    good = dataclasses.replace(REGISTRY["ares_vit_b"], url=payload.as_uri(),
                               sha256=hashlib.sha256(payload.read_bytes()).hexdigest())  # fmt: skip
    monkeypatch.setitem(zoo.REGISTRY, "ares_vit_b", good)
    path = resolve_checkpoint("ares_vit_b", None, download=True)
    assert Path(path).read_bytes() == payload.read_bytes() and path.endswith(good.filename)
    Path(path).unlink()
    monkeypatch.setitem(zoo.REGISTRY, "ares_vit_b", dataclasses.replace(good, sha256="0" * 64))
    with pytest.raises(ValueError, match="sha256"):
        resolve_checkpoint("ares_vit_b", None, download=True)
    assert not Path(path).exists()  # nothing half-checked lands in the cache
    with pytest.raises(ValueError, match="Google Drive"):
        zoo.fetch(REGISTRY["liu2023_swin_b"])


def test_a_download_waits_for_another_and_clears_what_a_killed_one_left(tmp_path, monkeypatch, capsys):
    import dataclasses
    import os
    import threading
    import time
    import urllib.request

    from roli._io import lock_file
    from roli.models import registry as zoo

    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path / "cache"))
    payload = tmp_path / "published.pth"
    payload.write_bytes(os.urandom(64))
    entry = dataclasses.replace(REGISTRY["ares_vit_b"], url=payload.as_uri())
    dest = zoo.cached_path(entry)
    dest.parent.mkdir(parents=True)
    name = entry.filename
    killed, users = dest.parent / f".{name}.k1ll_d0w.tmp", dest.parent / f".{name}.notes.tmp"
    other, link = dest.parent / ".other.pth.k1ll_d0w.tmp", dest.parent / f".{name}.l1nk_abc.tmp"
    for p in (killed, users, other, tmp_path / "target"):
        p.write_bytes(b"x")
    link.symlink_to(tmp_path / "target")
    assert zoo.fetch(entry) == dest and dest.read_bytes() == payload.read_bytes()
    assert not killed.exists() and users.exists() and other.exists() and link.is_symlink()
    assert (tmp_path / "target").read_bytes() == b"x"
    dest.unlink()
    fd = lock_file(dest.parent / f".{name}.lock")  # another process is downloading it
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded twice"))
    got = []
    waiting = threading.Thread(target=lambda: got.append(zoo.fetch(entry)))
    waiting.start()
    try:
        time.sleep(1.0)
        assert got == []
        dest.write_bytes(payload.read_bytes())  # the other process's download lands
    finally:
        os.close(fd)
    waiting.join(60)
    assert got == [dest] and dest.read_bytes() == payload.read_bytes()
    assert f"ares_vit_b: another process is downloading {dest}: waiting for it ..." in capsys.readouterr().err


# RobustBench's own preprocessing per ImageNet Linf entry (robustbench/model_zoo/imagenet.py and utils.py, read
# 2026-12-04): normalize_model(ImageNet mean/std) or none, and the named test transform (data.py PREPROCESSINGS:
# Res256Crop224 = bilinear Resize(256) + CenterCrop(224); BicubicRes256Crop224; Res224 = bilinear Resize(224)).
RB_FACTS = {
    "Liu2023Comprehensive_Swin-B": (True, "bicubic", 256), "Liu2023Comprehensive_Swin-L": (True, "bicubic", 256),
    "Liu2023Comprehensive_ConvNeXt-B": (True, "bicubic", 256),
    "Liu2023Comprehensive_ConvNeXt-L": (True, "bicubic", 256),
    "Salman2020Do_R50": (True, "bilinear", 256), "Salman2020Do_R18": (True, "bilinear", 256),
    "Salman2020Do_50_2": (True, "bilinear", 256), "Engstrom2019Robustness": (True, "bilinear", 256),
    "Mo2022When_Swin-B": (True, "bilinear", 224), "Mo2022When_ViT-B": (True, "bilinear", 224),
    "Singh2023Revisiting_ConvNeXt-T-ConvStem": (False, "bicubic", 256),
    "Singh2023Revisiting_ConvNeXt-S-ConvStem": (False, "bicubic", 256),
    "Singh2023Revisiting_ConvNeXt-B-ConvStem": (False, "bicubic", 256),
    "Singh2023Revisiting_ConvNeXt-L-ConvStem": (False, "bicubic", 256),
}  # fmt: skip


def test_robustbench_entries_preprocess_as_robustbench_does():
    from roli.models.registry import REGISTRY, lookup

    rb = [e for e in REGISTRY.values() if e.layout == "robustbench"]
    assert {e.aliases[0] for e in rb} == set(RB_FACTS)
    for e in rb:
        normalized, interpolation, resize = RB_FACTS[e.aliases[0]]
        assert (e.mean is not None, e.interpolation, e.resize_size, e.input_size) == (normalized, interpolation,
                                                                                      resize, 224), e.name  # fmt: skip
        if normalized:
            assert (tuple(e.mean), tuple(e.std)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # a Singh2023 ConvNeXt's preprocessing inside the model is the identity at 224
    entry = lookup("Singh2023Revisiting_ConvNeXt-T-ConvStem")
    net = create_classifier(entry.name, 5, **REDUCED["convstem"])
    x = torch.rand(2, 3, 224, 224)
    assert net.pre.mean is None and torch.equal(net.pre(x), x)
    assert "no normalization" in entry.preprocessing()
