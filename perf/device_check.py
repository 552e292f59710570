"""One prepared GPU check (issue 13, item 5): the figures a session with a lent GPU measures, as JSON.

Three parts, each written to the JSON file as soon as it is done (a timeout keeps the parts before it):

1. **train_step**: the bf16 training step of ``coalign_blip2_vitg`` (full size, random weights: the device has no
   network) with and without ``CoAlign(feature_cache=DIR)``, interleaved in one process: two models with the same
   weights, ``autocast="bf16"``, AdamW, batch ``--batch-size``. Epoch 0 fills the cache; the later epochs read it.
   Median step times, their ratio, and each side's peak GPU memory (``torch.cuda.max_memory_allocated``).
2. **evaluation**: a CIRCO-size evaluation: ``--gallery`` images (CIRCO's test gallery has 123,403) encoded with
   ``model.encode_targets`` from random pixels made on the device (no decoding: the model's own cost),
   ``--queries`` composed queries (CIRCO test: 800), and the exact top-50 over the gallery's 32 vectors per image
   with ``coalign.evaluation.topk.chunked_topk`` (what ``coalign evaluate`` ranks with).
3. **render**: one real-size render batch of the CIRHS config (``configs/synthesis/cirhs.yaml``): FLUX.1-dev's
   transformer and VAE geometry (random weights, bf16), ``--render-batch`` 2x2 composites of 1024 x 1024 (four
   512 px panels each), 28 flow-matching steps with distilled guidance (one transformer pass per step), then the
   VAE decode. The two text encoders are left out: they run once per batch (T5-XXL on 512 tokens is about 1% of
   the 28 transformer passes); the prompt embeddings are random tensors of their shapes.

``--device cpu --small`` runs everything with small models and sizes (a small BLIP-2 at 56 px, a 512-image
gallery, a tiny FLUX at 64 px), to test this script without a GPU.

Usage::

    python perf/device_check.py --device cuda --out $OUT/device_check.json     # about 5 minutes on an H200
    python perf/device_check.py --device cpu --small --out /tmp/device_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_cache import SCALED_BLIP2, char_bert_tokenizer, make_batches  # noqa: E402  (a sibling perf script)

#: --small: the scaled-down BLIP-2 of perf/feature_cache.py at 56 px with 3 ViT and 1 Q-Former layers
SMALL_BLIP2 = {
    **SCALED_BLIP2,
    "vision_config": {**SCALED_BLIP2["vision_config"], "image_size": 56, "num_hidden_layers": 3},
    "qformer_config": {**SCALED_BLIP2["qformer_config"], "num_hidden_layers": 1},
}
#: FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev transformer/config.json), and a tiny one for --small
FLUX_DEV = {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
            "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
            "axes_dims_rope": (16, 56, 56)}  # fmt: skip
FLUX_TINY = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
             "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
             "axes_dims_rope": (4, 6, 6)}  # fmt: skip
#: FLUX.1-dev's VAE (16 latent channels, no quant convs), and a tiny one for --small
FLUX_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 16,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "use_quant_conv": False, "use_post_quant_conv": False}  # fmt: skip
VAE_TINY = {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "latent_channels": 16,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "norm_num_groups": 4, "use_quant_conv": False, "use_post_quant_conv": False}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _blip2(args: argparse.Namespace, **overrides):
    from coalign import create_model

    if args.small:
        overrides = {"model_name": "small-blip2", "config": SMALL_BLIP2, **overrides}
    with torch.device(args.device):  # random weights made on the device: no host copy of 1B parameters
        model = create_model("coalign_blip2_vitg", autocast="bf16", **overrides)
    model.backbone.set_tokenizer(char_bert_tokenizer())
    return model


# -- 1. the training step --------------------------------------------------------------------------------------
def train_step(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    plain = _blip2(args)
    with tempfile.TemporaryDirectory() as tmp:
        cached = _blip2(args, feature_cache=str(Path(tmp) / "cache"))
        cached.load_state_dict(plain.state_dict())
        models = {"uncached": plain.train(), "cached": cached.train()}
        optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]) for k, m in models.items()}
        size = plain.backbone.image_config["size"]
        batches = make_batches(args.batches, args.batch_size, size)
        times: dict[str, list[float]] = {"uncached": [], "cached_filling": [], "cached_reading": []}
        peaks: dict[str, float | None] = {}
        start_fingerprint = time.perf_counter()
        cached.stem_cache()  # hashes the frozen ViT's weights once
        fingerprint_s = time.perf_counter() - start_fingerprint
        for epoch in range(args.epochs):
            if epoch:
                cached.on_train_epoch_start()
            for batch in batches:
                for name, model in models.items():
                    if epoch == args.epochs - 1:
                        _reset_peak(device)
                    _sync(device)
                    start = time.perf_counter()
                    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    loss = model._losses(on_device)["loss"]
                    loss.backward()
                    optimizers[name].step()
                    optimizers[name].zero_grad(set_to_none=True)
                    _sync(device)
                    spent = time.perf_counter() - start
                    key = name if name == "uncached" else ("cached_filling" if epoch == 0 else "cached_reading")
                    times[key].append(spent)
                    if epoch == args.epochs - 1:
                        peaks[name] = _peak_gib(device)
        cached.flush_feature_cache()
        cache = cached.stem_cache()
        disk = sum(p.stat().st_size for p in cache.shards) / max(len(cache), 1)
    n = len(batches)
    uncached_later = times["uncached"][n:][args.warmup :]
    reading = times["cached_reading"][args.warmup :]
    del plain, cached, models, optimizers
    _reset_peak(device)
    return {
        "model": "coalign_blip2_vitg" + (" scaled down" if args.small else "") + ", random weights, autocast bf16",
        "batch_size": args.batch_size,
        "image_size": size,
        "uncached_median_s": round(statistics.median(uncached_later), 4),
        "cached_median_s": round(statistics.median(reading), 4),
        "cached_over_uncached": round(statistics.median(reading) / statistics.median(uncached_later), 3),
        "filling_median_s": round(statistics.median(times["cached_filling"]), 4),
        "uncached_first_epoch_median_s": round(statistics.median(times["uncached"][:n]), 4),
        "peak_memory_gib": peaks,
        "fingerprint_s": round(fingerprint_s, 2),
        "disk_bytes_per_image": round(disk),
    }


# -- 2. CIRCO-size evaluation ----------------------------------------------------------------------------------
def evaluation(args: argparse.Namespace) -> dict:
    from coalign.evaluation.topk import chunked_topk, scoring_function

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = _blip2(args).eval()
    size = model.backbone.image_config["size"]
    g = torch.Generator(device).manual_seed(0)
    parts = []
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, args.gallery, args.eval_batch):
            n = min(args.eval_batch, args.gallery - first)
            pixels = torch.randn(n, 3, size, size, generator=g, device=device)
            parts.append(model.encode_targets(pixels).embedding.to(torch.bfloat16))
        gallery = torch.cat(parts)
        del parts
        _sync(device)
        gallery_s = time.perf_counter() - start
        start = time.perf_counter()
        queries = []
        texts = [" ".join(["a red dress with long sleeves and a collar"] * 2)] * args.eval_batch
        for first in range(0, args.queries, args.eval_batch):
            n = min(args.eval_batch, args.queries - first)
            pixels = torch.randn(n, 3, size, size, generator=g, device=device)
            queries.append(model.encode_queries(pixels, texts[:n]).embedding)
        query = torch.cat(queries).to(torch.bfloat16)
        _sync(device)
        query_s = time.perf_counter() - start
        start = time.perf_counter()
        top = chunked_topk(query, gallery, k=50, similarity=scoring_function(model), backend="torch")
        _sync(device)
        rank_s = time.perf_counter() - start
    result = {
        "gallery_images": args.gallery,
        "vectors_per_image": gallery.shape[1],
        "queries": args.queries,
        "batch_size": args.eval_batch,
        "gallery_encode_s": round(gallery_s, 2),
        "gallery_images_per_s": round(args.gallery / gallery_s, 1),
        "queries_encode_s": round(query_s, 3),
        "top50_s": round(rank_s, 3),
        "total_s": round(gallery_s + query_s + rank_s, 2),
        "peak_memory_gib": _peak_gib(device),
        "top_indices_shape": list(top.indices.shape),
    }
    del model, gallery, query
    _reset_peak(device)
    return result


# -- 3. one real-size render batch -----------------------------------------------------------------------------
def render(args: argparse.Namespace) -> dict:
    # diffusers: heavy optional dependency (the render stage), only for this part
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    device = torch.device(args.device)
    dtype = torch.bfloat16
    side = 64 if args.small else 1024  # a 2x2 composite of 512 px panels
    steps = 2 if args.small else 28
    batch = args.render_batch
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the weights are made in bf16 on the device: 12B parameters, no fp32 copy
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**(FLUX_TINY if args.small else FLUX_DEV)).eval()
            vae = AutoencoderKL(**(VAE_TINY if args.small else FLUX_VAE)).eval()
    finally:
        torch.set_default_dtype(default)
    config = transformer.config
    latent = side // 8  # the VAE's 8x downsampling; the transformer packs 2x2 latent patches into one token
    tokens, text_tokens = (latent // 2) ** 2, 512 if not args.small else 16
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    rows = torch.arange(latent // 2, device=device).repeat_interleave(latent // 2)
    cols = torch.arange(latent // 2, device=device).repeat(latent // 2)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)
    txt_ids = torch.zeros(text_tokens, 3, device=device, dtype=dtype)
    prompt = randn(batch, text_tokens, config.joint_attention_dim)
    pooled = randn(batch, config.pooled_projection_dim)
    guidance = torch.full((batch,), 3.5, device=device, dtype=dtype)
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        x = randn(batch, tokens, config.in_channels)
        sigmas = torch.linspace(1.0, 0.0, steps + 1, device=device)
        for i in range(steps):  # flow matching, Euler steps
            t = sigmas[i].expand(batch).to(dtype)
            velocity = transformer(
                hidden_states=x, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=t,
                img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False,
            )[0]  # fmt: skip
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity
        _sync(device)
        denoise_s = time.perf_counter() - start
        start = time.perf_counter()
        channels = config.in_channels // 4
        latents = x.view(batch, latent // 2, latent // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        images = vae.decode(latents.reshape(batch, channels, latent, latent)).sample
        _sync(device)
        decode_s = time.perf_counter() - start
    if tuple(images.shape) != (batch, 3, side, side):
        raise RuntimeError(f"the render gave images {list(images.shape)}, expected {[batch, 3, side, side]}")
    result = {
        "model": ("tiny FLUX" if args.small else "FLUX.1-dev transformer + VAE") + " geometry, random weights, bf16",
        "composites": batch,
        "composite_side_px": side,
        "steps": steps,
        "transformer_parameters_b": round(sum(p.numel() for p in transformer.parameters()) / 1e9, 2),
        "denoise_s": round(denoise_s, 2),
        "vae_decode_s": round(decode_s, 2),
        "batch_s": round(denoise_s + decode_s, 2),
        "panels_per_s": round(4 * batch / (denoise_s + decode_s), 3),
        "peak_memory_gib": _peak_gib(device),
        "image_shape": list(images.shape),
    }
    del transformer, vae, images
    _reset_peak(device)
    return result


PARTS = {"train_step": train_step, "evaluation": evaluation, "render": render}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small models and sizes (a CPU test of the script)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--out", default=None, help="JSON file written after every part")
    parser.add_argument("--batch-size", type=int, default=8, help="training triplets per step")
    parser.add_argument("--batches", type=int, default=4, help="training batches per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epoch 0 fills the cache, the others read it")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gallery", type=int, default=None, help="gallery images (default: CIRCO's 123,403)")
    parser.add_argument("--queries", type=int, default=None, help="queries (default: CIRCO test's 800)")
    parser.add_argument("--eval-batch", type=int, default=None, help="images per encode call")
    parser.add_argument("--render-batch", type=int, default=None, help="composites per render call (config: 4)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    small = args.small
    args.gallery = args.gallery or (512 if small else 123_403)
    args.queries = args.queries or (32 if small else 800)
    args.eval_batch = args.eval_batch or (64 if small else 512)
    args.render_batch = args.render_batch or (1 if small else 4)
    if small:
        args.batch_size = min(args.batch_size, 2)
        args.batches = min(args.batches, 2)
    device = torch.device(args.device)
    figures: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "small": small,
        "cpu_threads": torch.get_num_threads(),
        "load_average_start": round(os.getloadavg()[0], 2),
    }
    for name in args.parts.split(","):
        if name not in PARTS:
            raise SystemExit(f"unknown part {name!r}; parts are {', '.join(PARTS)}")
        start = time.perf_counter()
        figures[name] = PARTS[name](args)
        figures[name]["part_wall_s"] = round(time.perf_counter() - start, 1)
        figures["load_average_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps({name: figures[name]}), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
