"""Training-step throughput of CoAlign under Lightning vs. a plain PyTorch loop (PERFORMANCE.md, "Training step").

Both sides train the same modules of ``coalign_clip_vitb32`` (CLIP ViT-B/32 towers + Combiner + GCA head + token
reasoning head, random weights) on the same in-memory batches: tokenise, encode queries and targets, the GCA loss
plus the weighted local loss, backward, AdamW step. The plain side is what one would write by hand; the Lightning
side is ``Trainer.fit`` calling ``CoAlign.training_step``, so its time includes everything the library adds per
step (loss bookkeeping, the in-batch recall it logs, logging, the fit loop, moving the batch to the device).

The two are interleaved step by step in one process, because this machine is shared and its speed drifts: inside
one ``Trainer.fit``, a callback runs one plain step after every Lightning step. A Lightning step is timed from one
``on_train_batch_start`` to the next, minus the plain step run in between, so the fit loop's own work between
batches is counted. The first ``--warmup`` pairs are dropped; medians are reported, on two clocks: wall time, and
the process's CPU time (``time.process_time``), which other users of a shared machine do not inflate; with
``--threads 1`` on the CPU the two agree on an idle machine.

Usage::

    python perf/train_step.py --threads 1 --steps 8 --warmup 1  # CPU, fp32, batch 8, 224 px
    python perf/train_step.py --device cuda --precision bf16 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

WORDS = "make it red blue longer shorter with sleeves without a collar same dress but darker add stripes".split()


def byte_level_clip_tokenizer(folder: Path) -> str:
    """A CLIP tokenizer over the 256 byte symbols, built from a dict (offline), saved to ``folder``.

    Token ids stay inside CLIP's 49,408-token vocabulary and <|startoftext|>/<|endoftext|> keep their real ids,
    so the text tower does exactly the work it does with the real tokenizer at the same padded length.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(str(folder))
    return str(folder)


def make_batches(n: int, batch_size: int, image_size: int, seed: int = 0) -> list[dict]:
    """Random CPU batches in the DataModule format, with two triplets per group (soft positives are used)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    return [
        {
            "reference": torch.randn(batch_size, 3, image_size, image_size, generator=g),
            "target": torch.randn(batch_size, 3, image_size, image_size, generator=g),
            "text": [" ".join(rng.choices(WORDS, k=10)) for _ in range(batch_size)],  # CIRHS averages 10.2 words
            "group": torch.arange(batch_size) // 2,
        }
        for _ in range(n)
    ]


class PlainStep:
    """The same training step written by hand: no Lightning, no logging, no in-batch recall."""

    def __init__(self, model, device: torch.device, autocast_dtype: torch.dtype | None):
        self.model = model
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def __call__(self, batch: dict) -> None:
        model, device = self.model, self.device
        self.optimizer.zero_grad(set_to_none=True)
        reference = batch["reference"].to(device)
        target_images = batch["target"].to(device)
        groups = batch["group"].to(device)
        tokens = {k: v.to(device) for k, v in model.backbone.tokenize(batch["text"]).items()}
        with torch.autocast(device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
            query = model.backbone.encode_query(reference, tokens["input_ids"], tokens["attention_mask"])
            target = model.backbone.encode_target(target_images)
            loss = model.global_head(query, target, groups)
            if model.local_head is not None and model.local_loss_weight > 0:
                loss = loss + model.local_loss_weight * model.local_head(query, target, groups)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    import lightning as L

    import coalign

    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = coalign.create_model(
            "coalign_clip_vitb32", tokenizer=byte_level_clip_tokenizer(Path(tmp) / "tokenizer")
        )
        model.backbone.tokenize(["warm the tokenizer up"])  # loaded from the folder before it goes away
    image_size = model.backbone.image_config["size"]
    batches = make_batches(args.steps, args.batch_size, image_size)
    plain = PlainStep(model, device, torch.bfloat16 if args.precision == "bf16" else None)
    # Two clocks: wall time, and this process's CPU time, which other users of a shared machine do not inflate
    # (meaningless on a GPU, where the host mostly waits).
    clocks = {"wall": time.perf_counter}
    if device.type == "cpu":
        clocks["cpu"] = time.process_time
    marks: dict[str, list[float]] = {f"{c}_{m}": [] for c in clocks for m in ("start", "plain")}

    class Interleave(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(device)
            for name, clock in clocks.items():
                marks[f"{name}_start"].append(clock())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            begin = {name: clock() for name, clock in clocks.items()}
            plain(batches[batch_idx])  # the CPU copy: the plain loop moves its batch to the device itself
            _sync(device)
            for name, clock in clocks.items():
                marks[f"{name}_plain"].append(clock() - begin[name])

    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Interleave()],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(model, train_dataloaders=loader)

    result = {
        "model": "coalign_clip_vitb32 (random weights)",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "load_average_after": os.getloadavg()[0],
        "precision": args.precision,
        "batch_size": args.batch_size,
        "image_size": image_size,
        "measured_steps": args.steps - 1 - args.warmup,
    }
    for name in clocks:
        result[name] = _summarise(marks[f"{name}_start"], marks[f"{name}_plain"], args.warmup, args.batch_size)
    return result


def _summarise(starts: list[float], plain_s: list[float], warmup: int, batch_size: int) -> dict:
    """Medians, samples/s and overhead of Lightning over plain, from one clock's marks."""
    # Step i of Lightning = time between its start and the next start, minus the plain step run in between.
    lightning_s = [starts[i + 1] - starts[i] - plain_s[i] for i in range(len(starts) - 1)]
    pairs = list(zip(lightning_s, plain_s))[warmup:]
    if not pairs:
        raise SystemExit(f"no measured step is left after {warmup} warm-up steps; raise --steps")
    lightning_med = statistics.median(p[0] for p in pairs)
    plain_med = statistics.median(p[1] for p in pairs)
    ratios = [a / b for a, b in pairs]
    return {
        "lightning_median_s": round(lightning_med, 4),
        "plain_median_s": round(plain_med, 4),
        "lightning_samples_per_s": round(batch_size / lightning_med, 3),
        "plain_samples_per_s": round(batch_size / plain_med, 3),
        "overhead_pct": round(100 * (lightning_med / plain_med - 1), 2),
        "overhead_pct_median_of_pairs": round(100 * (statistics.median(ratios) - 1), 2),
        # The spread of the per-pair ratios shows how much of the difference is the machine's noise.
        "overhead_pct_pairs_min_max": [round(100 * (min(ratios) - 1), 2), round(100 * (max(ratios) - 1), 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast/bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="interleaved pairs of steps in total")
    parser.add_argument("--warmup", type=int, default=2, help="first pairs not measured")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach for the Hub
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
