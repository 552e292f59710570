"""The frozen-encoder feature cache: same losses as without it, reads instead of computes, never mixes weights,
survives a kill mid-write, is shared by ranks, and refuses what it cannot cache."""

import hashlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from coalign import CoAlign
from coalign.backbones import TinyBackbone
from coalign.feature_cache import FeatureCache, pixel_keys, weights_fingerprint
from coalign.heads import ContextualAlignmentHead, TokenReasoningHead
from tests._tiny_hf import tiny_blip2_backbone, tiny_clip_backbone

REPO = Path(__file__).resolve().parents[1]


def _backbone(tmp_path, name, **kwargs):
    if name == "Blip2Backbone":
        return tiny_blip2_backbone(tmp_path, **kwargs)
    return tiny_clip_backbone(tmp_path, freeze_image_encoder=True, **kwargs)


def _pair(tmp_path, name):
    """A model without the cache and the same model (same weights) with one."""
    torch.manual_seed(0)
    backbone = _backbone(tmp_path, name)
    plain = CoAlign(backbone, ContextualAlignmentHead(beta=0.2), TokenReasoningHead(token_dim=backbone.token_dim))
    cached = CoAlign(**plain.config(), feature_cache=str(tmp_path / "cache"))
    cached.load_state_dict(plain.state_dict())
    cached.backbone.set_tokenizer(plain.backbone.get_tokenizer())
    return plain, cached


def _batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n + 1, 3, 32, 32, generator=g)
    names = [f"img{seed}_{i}" for i in range(n + 1)]
    return {
        "reference": images[:n],
        "target": images[1:],  # targets 0..n-2 are references 1..n-1: shared images are computed once
        "text": ["make it red", "add a dog", "remove the hat", "darker"][:n],
        "group": torch.arange(n) // 2,
        "reference_id": names[:n],
        "target_id": names[1:],
    }


def _count_stem_calls(model):
    calls = []
    original = model.backbone.encode_image_stem

    def counted(pixels):
        calls.append(pixels.shape[0])
        return original(pixels)

    model.backbone.encode_image_stem = counted
    return calls


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks on both sides
    loss = model._losses(batch)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("name", ["Blip2Backbone", "CLIPBackbone"])
def test_loss_with_the_cache_equals_loss_without(tmp_path, name):
    plain, cached = _pair(tmp_path, name)
    plain.train(), cached.train()
    batch = _batch()
    reference, reference_grads = _loss_and_grads(plain, batch)
    first, first_grads = _loss_and_grads(cached, batch)  # computes and stores
    second, second_grads = _loss_and_grads(cached, batch)  # reads
    assert cached.stem_cache().misses == 5 and cached.stem_cache().hits == 5
    # the stem is stored in float16: equal up to its rounding (relative 2**-11 per value)
    torch.testing.assert_close(first, reference, rtol=2e-3, atol=1e-4)
    # computed and read features are rounded alike: the first and later epochs give identical steps
    assert torch.equal(first, second)
    assert set(first_grads) == set(reference_grads)
    assert not any("vision_model" in n for n in first_grads)  # the frozen stem gets no gradient either way
    for key, grad in reference_grads.items():
        # per tensor, not per element: a ReLU or top-k boundary may flip for an element or two under the rounding
        assert (first_grads[key] - grad).norm() <= 1e-2 * grad.norm() + 1e-6, key
        assert torch.equal(first_grads[key], second_grads[key])


def test_the_cache_under_bf16_autocast(tmp_path):
    plain, cached = _pair(tmp_path, "Blip2Backbone")
    fast = CoAlign(**{**cached.config(), "autocast": "bf16"}, feature_cache=str(tmp_path / "cache"))
    fast.load_state_dict(plain.state_dict())
    fast.backbone.set_tokenizer(plain.backbone.get_tokenizer())
    fast.eval(), plain.eval()
    batch = _batch()
    first, second = fast._losses(batch)["loss"], fast._losses(batch)["loss"]
    assert fast.stem_cache().hits == 5 and torch.equal(first, second)
    torch.testing.assert_close(first, plain._losses(batch)["loss"], rtol=3e-2, atol=1e-3)  # bfloat16 matmuls
    assert fast.stem_cache().fingerprint != cached.stem_cache().fingerprint  # autocast changes the stem's numbers


def test_backbone_stem_split_is_exact(tmp_path):
    for name in ("Blip2Backbone", "CLIPBackbone"):
        backbone = _backbone(tmp_path, name).eval()
        images = _batch()["reference"]
        tokens = backbone.tokenize(["make it red", "a", "b c", "d"])
        stem = backbone.encode_image_stem(images)
        whole = backbone.encode_query(images, tokens["input_ids"], tokens["attention_mask"])
        split = backbone.encode_query_from_stem(stem, tokens["input_ids"], tokens["attention_mask"])
        assert torch.equal(whole.embedding, split.embedding) and torch.equal(whole.tokens, split.tokens)
        assert torch.equal(backbone.encode_target(images).embedding, backbone.encode_target_from_stem(stem).embedding)


def test_a_second_run_reads_instead_of_computing(tmp_path):
    plain, cached = _pair(tmp_path, "Blip2Backbone")
    calls = _count_stem_calls(cached)
    batch = _batch()
    cached._losses(batch)
    assert calls == [5]  # 4 references + 4 targets share 3 images: 5 distinct images, one stem call
    cached._losses(batch)
    assert calls == [5]
    cached.flush_feature_cache()
    # a new process (a resumed run): same weights, same folder
    again = CoAlign(**plain.config(), feature_cache=str(tmp_path / "cache"))
    again.load_state_dict(plain.state_dict())
    again.backbone.set_tokenizer(plain.backbone.get_tokenizer())
    again_calls = _count_stem_calls(again)
    again.eval(), cached.eval()  # no dropout: the two models' losses compare
    loss = again._losses(batch)["loss"]
    assert again_calls == [] and again.stem_cache().hits == 5
    other = _batch(seed=1)
    again._losses(other)
    assert again_calls == [5]
    torch.testing.assert_close(loss, cached._losses(batch)["loss"])


def test_a_cache_of_other_weights_or_transform_is_not_used(tmp_path):
    plain, cached = _pair(tmp_path, "Blip2Backbone")
    cached._losses(_batch())
    cached.flush_feature_cache()
    changed = CoAlign(**plain.config(), feature_cache=str(tmp_path / "cache"))
    changed.load_state_dict(plain.state_dict())
    changed.backbone.set_tokenizer(plain.backbone.get_tokenizer())
    with torch.no_grad():
        changed.backbone.vision_model.embeddings.patch_embedding.weight[0, 0, 0, 0] += 1e-3
    calls = _count_stem_calls(changed)
    changed._losses(_batch())
    assert calls == [5]
    padded = CoAlign(**{**plain.config(), "target_pad_ratio": 1.25}, feature_cache=str(tmp_path / "cache"))
    padded.load_state_dict(plain.state_dict())
    folders = {cached.stem_cache().folder, changed.stem_cache().folder, padded.stem_cache().folder}
    assert len(folders) == 3 and all(f.parent == tmp_path / "cache" for f in folders)


def test_keys_and_fingerprints_by_hand():
    pixels = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    expected = hashlib.blake2b(b"torch.float32|(3, 2, 2)|" + pixels[1].numpy().tobytes(), digest_size=16).digest()
    keys = pixel_keys(pixels)
    assert keys[1] == expected and keys[0] != keys[1]
    assert pixel_keys(pixels.to(torch.bfloat16))[1] != expected  # what the stem sees, dtype included
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint({"m": a}, {"t": 1}) == weights_fingerprint({"m": b}, {"t": 1})
    assert weights_fingerprint({"m": a}, {"t": 1}) != weights_fingerprint({"m": a}, {"t": 2})
    with torch.no_grad():
        b.bias[0] += 1
    assert weights_fingerprint({"m": a}, {"t": 1}) != weights_fingerprint({"m": b}, {"t": 1})


def _rows(n, seed=0):
    return torch.randn(n, 3, 4, generator=torch.Generator().manual_seed(seed))


def test_ranks_share_one_folder(tmp_path):
    zero = FeatureCache(tmp_path, "f" * 32, rank=0)
    one = FeatureCache(tmp_path, "f" * 32, rank=1)
    keys = [bytes([i]) * 16 for i in range(6)]
    features = _rows(6)
    zero.put(keys[:3], features[:3])
    one.put(keys[3:], features[3:])
    zero.flush(), one.flush()
    names = sorted(p.name for p in (tmp_path / ("f" * 32)).glob("*.safetensors"))
    assert [n[:4] for n in names] == ["r000", "r001"]
    assert zero.refresh() == 1 and one.refresh() == 1
    for cache in (zero, one):
        got = cache.get(keys)
        assert sorted(got) == list(range(6))
        torch.testing.assert_close(torch.stack([got[i] for i in range(6)]).float(), features.half().float())


_KILLED_WRITER = """
import os, signal, sys, torch
import coalign.feature_cache as fc
cache = fc.FeatureCache(sys.argv[1], "k" * 32)
rows = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(0))
cache.put([bytes([i]) * 16 for i in range(2)], rows[:2])
cache.flush()
real = fc.save_file
def dying(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:  # half the shard is on disk when the process dies
        f.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
fc.save_file = dying
cache.put([bytes([i]) * 16 for i in range(2, 4)], rows[2:])
cache.flush()
"""


def test_a_kill_mid_write_leaves_a_usable_cache(tmp_path):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(tmp_path)], cwd=REPO)
    assert result.returncode == -9
    folder = tmp_path / ("k" * 32)
    assert len(list(folder.glob(".tmp-*"))) == 1  # the half-written shard never got its name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip: the temporary file is not a shard
        cache = FeatureCache(tmp_path, "k" * 32)
    keys = [bytes([i]) * 16 for i in range(4)]
    assert sorted(cache.get(keys)) == [0, 1]
    rows = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cache.get(keys)[1].float(), rows[1].half().float())
    cache.put(keys[2:], rows[2:])  # resumed: the lost rows are computed again and stored
    cache.flush()
    assert sorted(FeatureCache(tmp_path, "k" * 32).get(keys)) == [0, 1, 2, 3]


def test_a_damaged_shard_is_skipped_with_a_warning(tmp_path):
    cache = FeatureCache(tmp_path, "d" * 32)
    cache.put([b"a" * 16], _rows(1))
    path = cache.flush()
    path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(UserWarning, match="skipping unreadable shard .*r000"):
        reopened = FeatureCache(tmp_path, "d" * 32)
    assert reopened.get([b"a" * 16]) == {}


def test_refuses_an_image_encoder_that_trains(tmp_path):
    trainable = tiny_clip_backbone(tmp_path)  # freeze_image_encoder=False
    with pytest.raises(ValueError, match="needs a frozen image encoder.*CLIPBackbone"):
        CoAlign(trainable, feature_cache=str(tmp_path / "c"))
    tiny = TinyBackbone(image_size=16, channels=4, stages=2, embed_dim=16, token_dim=8, text_layers=1)
    with pytest.raises(ValueError, match="needs a frozen image encoder.*TinyBackbone"):
        CoAlign(tiny, feature_cache=str(tmp_path / "c"))
    _, cached = _pair(tmp_path, "Blip2Backbone")
    cached.backbone.vision_model.requires_grad_(True)
    with pytest.raises(ValueError, match="no longer frozen"):
        cached._losses(_batch())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        FeatureCache(tmp_path / "file", "x" * 32)


def test_refuses_randomly_augmented_images(tmp_path):
    _, cached = _pair(tmp_path, "Blip2Backbone")
    batch = _batch()
    cached._losses(batch)
    jittered = {**batch, "reference": batch["reference"] + 0.01}
    with pytest.raises(ValueError, match="img0_0.*different pixels.*random"):
        cached._losses(jittered)
    # without ids: a later epoch that finds none of the images the earlier one stored
    cache = FeatureCache(tmp_path / "noids", "n" * 32)

    def stem(pixels):
        return pixels.mean(dim=1)

    for _ in range(3):
        cache.features(torch.randn(2, 3, 4, 4), stem)
    cache.new_epoch()
    for _ in range(3):
        cache.features(torch.randn(2, 3, 4, 4), stem)
    with pytest.raises(ValueError, match="4 batches of this epoch found none"):
        cache.features(torch.randn(2, 3, 4, 4), stem)


def test_fit_fills_the_cache_in_the_first_epoch_and_reads_it_after(tmp_path):
    _, cached = _pair(tmp_path, "Blip2Backbone")
    calls = _count_stem_calls(cached)
    batches = [_batch(seed=0), _batch(seed=1)]
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(cached, train_dataloaders=loader)
    assert calls == [5, 5]  # the first epoch only
    cache = cached.stem_cache()
    assert cache.hits == 20 and cache.misses == 10
    assert len(cache.shards) == 1 and os.path.getsize(cache.shards[0]) > 10 * 17 * 32 * 2  # [1 + 16, 32] fp16


def test_the_perf_scripts_peak_memory_accounting_by_hand():
    """perf/feature_cache.py's tracker (behind the memory figures in PERFORMANCE.md) on a case counted by hand."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sys.path.insert(0, str(REPO / "perf"))
    try:
        from feature_cache import PeakMemory
    finally:
        sys.path.remove(str(REPO / "perf"))
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    mb = 1000 * 1000 * 4  # one [1000, 1000] float32 tensor
    with fake:
        layers = torch.nn.Sequential(*[torch.nn.Linear(1000, 1000, bias=False) for _ in range(10)])
        x = torch.empty(1000, 1000)
    layers.requires_grad_(False)
    tracker = PeakMemory()
    tracker.exclude([*layers.parameters(), x])  # the weights' transposed views allocate nothing
    with fake, tracker:
        y = layers(x)
    assert (tracker.peak, tracker.live) == (2 * mb, mb)  # frozen: one layer's input and output at a time
    layers.requires_grad_(True)
    tracker = PeakMemory()
    tracker.exclude([*layers.parameters(), x])
    with fake, tracker:
        y = layers(x)
        assert tracker.live == 10 * mb  # 9 hidden outputs saved for backward + the output
        y.sum().backward()
        del y
    assert tracker.live == 10 * mb  # the 10 weight gradients
