"""Every YAML in configs/ parses; model YAMLs mirror the factory; each experiment trains a step on fake data."""

import contextlib
import io
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from coalign import CoAlign, create_model
from coalign.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
EXPERIMENTS = sorted(p.name for p in (REPO / "configs" / "experiments").glob("*.yaml"))

# the paper-scale parts of an experiment swapped for a tiny model on a CPU
TINY_MODEL = [
    "--model.backbone", "coalign.backbones.TinyBackbone", "--model.backbone.init_args.channels", "8",
    "--model.backbone.init_args.embed_dim", "32", "--model.backbone.init_args.token_dim", "16",
    "--model.backbone.init_args.text_layers", "1",
    "--model.init_from", "null",
]  # fmt: skip
CPU_TRAINER = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "1",
               "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
               "--trainer.num_sanity_val_steps", "0", "--trainer.max_time", "null",
               "--trainer.enable_progress_bar", "false"]  # fmt: skip


def _cli(args: list[str]) -> tuple[int, str]:
    """Run the coalign command in-process; LightningCLI ends --print_config with SystemExit(0)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(args)
    except SystemExit as exit_:
        code = exit_.code or 0
    return code, out.getvalue()


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_parses(path):
    if path.startswith("configs/synthesis/"):
        from coalign.synthesis import load_config

        load_config(REPO / path, [])
        return
    raw = yaml.safe_load((REPO / path).read_text())
    # data YAMLs written as a bare class_path (the benchmarks' own) are given with --data; the rest with --config
    flag = "--data" if "class_path" in raw else "--config"
    code, printed = _cli(["fit", flag, str(REPO / path), "--print_config"])
    assert code == 0, printed
    assert "trainer:" in printed and "data:" in printed


def _config(name: str) -> str:
    return str(REPO / "configs" / name)


def test_configs_compose_with_repeated_config_flags():
    code, printed = _cli(["fit", "--config", _config("experiments/finetune_custom.yaml"),
                          "--config", _config("model/coalign_clip_vitb32.yaml"), "--print_config"])  # fmt: skip
    assert code == 0
    model = yaml.safe_load(printed)["model"]
    assert model["backbone"]["class_path"] == "coalign.backbones.CLIPBackbone"
    assert model["init_from"] == "coalign_clip_vitb32"
    parts = ["model/coalign_tiny.yaml", "data/shapes.yaml", "trainer/cpu.yaml"]
    code, printed = _cli(["fit", *(arg for part in parts for arg in ("--config", _config(part))), "--print_config"])
    assert code == 0 and yaml.safe_load(printed)["trainer"]["accelerator"] == "cpu"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_mirror_the_registered_models(path):
    spec = yaml.safe_load(path.read_text())["model"]
    name = path.stem
    init_from = spec.pop("init_from")
    assert init_from == (None if name == "coalign_tiny" else name)  # the published base weights, when there are
    spec.pop("optimizer", None)
    with torch.device("meta"):  # configs only: no memory for BLIP-2's weights
        from_yaml, registered = CoAlign(**spec).config(), create_model(name).config()
    keys = ("backbone", "global_head", "local_head", "local_loss_weight", "rerank_top_k", "target_pad_ratio")
    for key in (*keys, "autocast"):
        assert from_yaml[key] == registered[key], key
    # the memory switches are spelled out in every model YAML (the backbone's where it has one)
    assert "autocast" in yaml.safe_load(path.read_text())["model"]
    if spec["backbone"]["class_path"] != "coalign.backbones.TinyBackbone":
        assert "gradient_checkpointing" in spec["backbone"]["init_args"]


def _tiny_cirhs(root: Path) -> Path:
    """A CIRHS folder as `coalign synthesize` writes it: triplets.jsonl + images/, groups of two triplets."""
    rng = random.Random(0)
    lines = []
    for g in range(10):
        names = [f"images/{g:03d}/{side}.png" for side in ("a", "b")]
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3))).save(root / name)
        split = "val" if g >= 8 else "train"
        for ref, tgt, text in ((names[0], names[1], "make it brighter"), (names[1], names[0], "make it darker")):
            lines.append({"reference": ref, "target": tgt, "text": text, "group": g, "split": split})
    (root / "triplets.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests" / "data"))
    from make_fake_benchmarks import make_all

    out = tmp_path_factory.mktemp("fake")
    roots = make_all(out)
    roots["cirhs"] = _tiny_cirhs(out / "cirhs")
    triplets = out / "triplets"
    rng = random.Random(1)
    rows = ["reference,text,target"]
    for i in range(12):
        Image.new("RGB", (20, 20), tuple(rng.randrange(256) for _ in range(3))).save(out / f"triplets_{i}.png")
    rows += [f"triplets_{i}.png,make it look like number {i + 1},triplets_{(i + 1) % 12}.png" for i in range(12)]
    triplets.with_suffix(".csv").write_text("\n".join(rows) + "\n")
    roots["triplets"] = triplets.with_suffix(".csv")
    return roots


DATA_ARGS = {
    "zeroshot_cirhs.yaml": lambda d: ["--data.init_args.root", str(d["cirhs"]), "--data.init_args.batch_size", "8"],
    "shapes_zeroshot.yaml": lambda d: [
        "--data.init_args.train.init_args.root",
        str(d["cirhs"]),
        "--data.init_args.train.init_args.batch_size",
        "8",
        "--data.init_args.test.init_args.num_eval_sources",
        "4",
    ],  # fmt: skip
    "supervised_cirr.yaml": lambda d: ["--data.init_args.root", str(d["cirr"]), "--data.init_args.batch_size", "8"],
    "supervised_fashioniq.yaml": lambda d: [
        "--data.init_args.root",
        str(d["fashioniq"]),
        "--data.init_args.batch_size",
        "4",
    ],  # fmt: skip
    "finetune_custom.yaml": lambda d: [
        "--data.init_args.path",
        str(d["triplets"]),
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.val_fraction",
        "0.25",
    ],  # fmt: skip
}


def test_every_experiment_has_fake_data():
    assert sorted(DATA_ARGS) == EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_trains_one_step_on_fake_data(name, fake_data, tmp_path):
    root = tmp_path / "run"
    args = ["fit", "--config", _config(f"experiments/{name}"), *TINY_MODEL, *CPU_TRAINER,
            "--trainer.default_root_dir", str(root), "--data.init_args.num_workers", "0",
            *DATA_ARGS[name](fake_data)]  # fmt: skip
    code, printed = _cli(args)
    assert code == 0, printed
    model = CoAlign.from_pretrained(root / "model")  # ExportPretrained wrote the trained model
    assert model.config()["target_pad_ratio"] == 1.25
    if name == "zeroshot_cirhs.yaml":  # the second half of the recipe: evaluate on a benchmark it never saw
        out = tmp_path / "eval"
        code, printed = _cli(["evaluate", "--model", str(root / "model"), "--data", "CIRRDataModule",
                              "--data.root", str(fake_data["cirr"]), "--output_dir", str(out),
                              "--progress", "false"])  # fmt: skip
        assert code == 0, printed
        assert "cirr/R@1" in json.loads((out / "metrics.json").read_text())
