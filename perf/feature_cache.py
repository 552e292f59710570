"""The frozen-encoder feature cache and the memory switches (PERFORMANCE.md, "Feature cache and memory").

Two measurements:

``step``: training-step time of ``coalign_blip2_vitg``'s architecture scaled down with its proportions kept
(ViT 13 layers : Q-Former 4 layers = 39 : 12, every width a quarter, the same 224 px images, 14 px patches, 32
query tokens and 32 text tokens), without and with ``CoAlign(feature_cache=DIR)``, side by side in one process:
two models with the same weights train on the same batches, one step of each in turn (interleaved, because the
machine's speed drifts). A step is what ``CoAlign.training_step`` computes (``_losses``) + backward + AdamW.
Epoch 0 fills the cache (its steps are reported as "filling"); the later epochs read it. Medians of wall time and
of the process's CPU time. Also: disk per image, and the largest loss difference between the two models.

``memory``: peak memory of one full-size ``coalign_blip2_vitg`` training step at batch 8 (224 px), for the memory
switches (autocast bf16, gradient checkpointing, feature cache), measured without a GPU: the model is built on
the meta device and materialised as fake tensors (``FakeTensorMode``: shapes and dtypes, no storage), and a
``TorchDispatchMode`` adds up the bytes of every tensor storage an operator creates and subtracts them when the
storage is freed (a weak reference on the storage), so the peak of live bytes is the step's tensor memory. The
step is forward + backward + a foreach AdamW step in steady state (its moments exist); the peak is weights +
AdamW moments + the tracked peak of everything else (activations, gradients, autocast's bf16 weight copies,
temporaries).

Usage::

    python perf/feature_cache.py step --threads 1 --batches 4 --epochs 3
    python perf/feature_cache.py memory
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import tempfile
import time
import weakref
from pathlib import Path

import torch

WORDS = "make it red blue longer shorter with sleeves without a collar same dress but darker add stripes".split()

#: coalign_blip2_vitg's Blip2 architecture with every depth and width divided so the proportions stay
SCALED_BLIP2 = {
    "vision_config": {
        "hidden_size": 352,  # 1408 / 4, head width 88 as in EVA ViT-g
        "intermediate_size": 1536,  # 6144 / 4
        "num_hidden_layers": 13,  # 39 / 3
        "num_attention_heads": 4,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
    },
    "qformer_config": {
        "vocab_size": 30523,
        "hidden_size": 192,  # 768 / 4, head width 64 as in BERT-base
        "num_hidden_layers": 4,  # 12 / 3
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "max_position_embeddings": 512,
        "cross_attention_frequency": 2,
        "encoder_hidden_size": 352,
        "use_qformer_text_input": True,
    },
    "num_query_tokens": 32,
    "image_text_hidden_size": 64,
}


def char_bert_tokenizer():
    """A BERT tokenizer over single characters, built in memory (offline); ids stay inside BERT's vocabulary."""
    from transformers import BertTokenizer  # heavy: only when a model is built

    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *string.punctuation, *("##" + c for c in chars)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})


def make_batches(n: int, batch_size: int, image_size: int, seed: int = 0) -> list[dict]:
    """Random batches in the DataModule format; every image has an id, references and targets are distinct."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    batches = []
    for b in range(n):
        images = torch.randn(2 * batch_size, 3, image_size, image_size, generator=g)
        batches.append(
            {
                "reference": images[:batch_size],
                "target": images[batch_size:],
                "text": [" ".join(rng.choices(WORDS, k=10)) for _ in range(batch_size)],
                "group": torch.arange(batch_size) // 2,
                "reference_id": [f"b{b}r{i}" for i in range(batch_size)],
                "target_id": [f"b{b}t{i}" for i in range(batch_size)],
            }
        )
    return batches


# -- step time ---------------------------------------------------------------------------------------------------
def run_step(args: argparse.Namespace) -> dict:
    from coalign import create_model  # after the thread settings of main()

    torch.manual_seed(0)
    tokenizer = char_bert_tokenizer()
    plain = create_model("coalign_blip2_vitg", model_name="scaled-blip2", config=SCALED_BLIP2)
    plain.backbone.set_tokenizer(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        cached = create_model(
            "coalign_blip2_vitg", model_name="scaled-blip2", config=SCALED_BLIP2, feature_cache=str(Path(tmp) / "c")
        )
        cached.load_state_dict(plain.state_dict())
        cached.backbone.set_tokenizer(tokenizer)
        models = {"uncached": plain.train(), "cached": cached.train()}
        optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]) for k, m in models.items()}
        batches = make_batches(args.batches, args.batch_size, 224)
        clocks = {"wall": time.perf_counter, "cpu": time.process_time}
        times: dict[str, list[dict[str, float]]] = {"uncached": [], "cached_filling": [], "cached_reading": []}
        losses: list[tuple[float, float]] = []
        for epoch in range(args.epochs):
            if epoch:
                cached.on_train_epoch_start()  # what Lightning calls: flush, read other ranks' shards
            for batch in batches:
                step_losses = {}
                for name, model in models.items():
                    torch.manual_seed(epoch * 1000 + len(losses))  # the same dropout masks on both sides
                    start = {c: clock() for c, clock in clocks.items()}
                    loss = model._losses(batch)["loss"]
                    loss.backward()
                    optimizers[name].step()
                    optimizers[name].zero_grad(set_to_none=True)
                    spent = {c: clock() - start[c] for c, clock in clocks.items()}
                    key = name if name == "uncached" else ("cached_filling" if epoch == 0 else "cached_reading")
                    times[key].append(spent)
                    step_losses[name] = loss.item()
                losses.append((step_losses["uncached"], step_losses["cached"]))
        cached.flush_feature_cache()
        cache = cached.stem_cache()
        shard_bytes = sum(p.stat().st_size for p in cache.shards)
        images = len(cache)
        stem_shape = list(cache.shape)

    warm = args.warmup
    uncached_reading = times["uncached"][len(batches) :]  # the uncached steps beside the reading ones
    result = {
        "model": "coalign_blip2_vitg architecture scaled down (ViT 13 x 352, Q-Former 4 x 192), random weights",
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [args.load_before, round(os.getloadavg()[0], 2)],
        "batch_size": args.batch_size,
        "image_size": 224,
        "batches_per_epoch": args.batches,
        "epochs": args.epochs,
        "disk_bytes_per_image": round(shard_bytes / images),
        "stem_shape": stem_shape,
        "full_size_disk_bytes_per_image": (1 + (224 // 14) ** 2) * 1408 * 2 + 16,
        "max_relative_loss_difference": max(abs(a - b) / abs(a) for a, b in losses),
    }
    for clock in clocks:
        first_epoch = [t[clock] for t in times["uncached"][: len(batches)]]
        later = [t[clock] for t in uncached_reading][warm:]
        reading = [t[clock] for t in times["cached_reading"]][warm:]
        filling = [t[clock] for t in times["cached_filling"]]
        ratios = [r / u for r, u in zip(reading, later, strict=True)]
        result[clock] = {
            "uncached_median_s": round(statistics.median(later), 4),
            "cached_median_s": round(statistics.median(reading), 4),
            "cached_over_uncached": round(statistics.median(reading) / statistics.median(later), 3),
            "ratio_of_pairs_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
            "filling_epoch_over_uncached": round(statistics.median(filling) / statistics.median(first_epoch), 3),
        }
    return result


# -- peak memory -----------------------------------------------------------------------------------------------
class PeakMemory:
    """Live bytes of the tensor storages created while active, and their peak (a ``TorchDispatchMode``)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._add(t)
                return out

        self.mode = _Mode()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, weakref.finalize] = {}
        self._before: dict[int, object] = {}

    def exclude(self, tensors) -> None:
        """Tensors that exist already (weights, optimizer state, inputs): views of them allocate nothing."""
        for tensor in tensors:
            storage = tensor.untyped_storage()
            self._before[id(storage)] = storage  # held, so that its id cannot be reused

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)  # a storage keeps its Python object while it lives, so the id is stable
        if key in self._alive or key in self._before:
            return
        size = storage.nbytes()
        self._alive[key] = weakref.finalize(storage, self._free, key, size)
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int, size: int) -> None:
        self._alive.pop(key, None)
        self.live -= size

    def __enter__(self) -> PeakMemory:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


class _AllHits:
    """Stands in for the feature cache in the memory measurement: every image's stem features are "read"."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def features(self, pixels, compute, ids=None, dtype=None):
        return torch.zeros(pixels.shape[0], *self.shape, dtype=dtype, device=pixels.device)


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[id(st)] = st.nbytes()
    return sum(seen.values())


def run_memory(args: argparse.Namespace) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode  # only for this measurement

    from coalign import create_model  # after the thread settings of main()

    tokenizer = char_bert_tokenizer()
    rows = []
    variants = [
        (autocast, checkpointing, cache)
        for autocast in (None, "bf16")
        for checkpointing in (False, True)
        for cache in (False, True)
    ]
    for autocast, checkpointing, cache in variants:
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with torch.device("meta"):
            model = create_model(
                "coalign_blip2_vitg",
                gradient_checkpointing=checkpointing,
                autocast=autocast,
                feature_cache="unused" if cache else None,
            )
        with fake:
            model.to_empty(device="cpu")
        model._device = torch.device("cpu")  # Lightning's record of the module's device (to_empty does not set it)
        model.train()
        model.backbone.set_tokenizer(tokenizer)
        if cache:
            model._stem_cache = _AllHits((1 + (224 // 14) ** 2, 1408))
            model.stem_cache = lambda model=model: model._stem_cache
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, foreach=True)
        with fake:
            # steady state: AdamW's moments exist already (a scalar step count stays a constant, readable)
            for p in trainable:
                optimizer.state[p] = {
                    "step": torch.tensor(10.0),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
            batch = {
                "reference": torch.empty(args.batch_size, 3, 224, 224),
                "target": torch.empty(args.batch_size, 3, 224, 224),
                "text": [" ".join(WORDS[:10])] * args.batch_size,
                "group": torch.arange(args.batch_size) // 2,
            }
        states = [optimizer.state[p][k] for p in trainable for k in ("exp_avg", "exp_avg_sq")]
        weights = _storage_bytes(list(model.parameters()) + list(model.buffers()))
        optimizer_state = _storage_bytes(states)
        start = time.perf_counter()
        tracker = PeakMemory()
        tracker.exclude([*model.parameters(), *model.buffers(), *states, batch["reference"], batch["target"]])
        with fake, tracker:
            loss = model._losses(batch)["loss"]
            forward_peak = tracker.peak
            loss.backward()
            del loss
            backward_peak = tracker.peak
            grads = tracker.live
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        persistent = weights + optimizer_state
        peak = persistent + tracker.peak
        rows.append(
            {
                "autocast": autocast,
                "gradient_checkpointing": checkpointing,
                "feature_cache": cache,
                "weights_gib": round(weights / 2**30, 2),
                "optimizer_state_gib": round(optimizer_state / 2**30, 2),
                "forward_peak_gib": round(forward_peak / 2**30, 2),
                "backward_peak_gib": round(backward_peak / 2**30, 2),
                "gradients_gib": round(grads / 2**30, 2),
                "step_peak_above_weights_and_state_gib": round(tracker.peak / 2**30, 2),
                "peak_gib": round(peak / 2**30, 2),
                "measured_in_s": round(time.perf_counter() - start, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model, states, batch, optimizer
    return {"model": "coalign_blip2_vitg (224 px, AdamW)", "batch_size": args.batch_size, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    step = sub.add_parser("step", help="step time with and without the cache (scaled-down BLIP-2, CPU)")
    step.add_argument("--batch-size", type=int, default=8)
    step.add_argument("--batches", type=int, default=4, help="batches per epoch")
    step.add_argument("--epochs", type=int, default=3, help="epoch 0 fills the cache, the others read it")
    step.add_argument("--warmup", type=int, default=1, help="reading pairs not counted")
    step.add_argument("--threads", type=int, default=None)
    memory = sub.add_parser("memory", help="peak memory of one full-size coalign_blip2_vitg step (fake tensors)")
    memory.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    args.load_before = round(os.getloadavg()[0], 2)
    result = run_step(args) if args.what == "step" else run_memory(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
