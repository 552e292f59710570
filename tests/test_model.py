"""CoAlign: contract tests over every registered backbone and head, the inference API, Hub round trips."""

import json

import pytest
import torch
from PIL import Image

import coalign
from coalign import CoAlign, create_model
from coalign.backbones import Backbone, TinyBackbone
from coalign.heads import ContextualAlignmentHead, GlobalHead, LocalHead, TokenReasoningHead
from coalign.registry import Component, list_components
from tests._tiny_hf import tiny_blip2_backbone, tiny_clip_backbone
from tests.test_backbone_timm import tiny_timm_backbone

TINY = {"image_size": 16, "channels": 4, "stages": 2, "embed_dim": 16, "token_dim": 8, "text_layers": 1}


def tiny_backbone(tmp_path, name):
    if name == "TinyBackbone":
        return TinyBackbone(**TINY)
    if name == "CLIPBackbone":
        return tiny_clip_backbone(tmp_path)
    if name == "TimmBackbone":
        return tiny_timm_backbone(tmp_path)
    return tiny_blip2_backbone(tmp_path)


BACKBONES = ["TinyBackbone", "CLIPBackbone", "Blip2Backbone", "TimmBackbone"]


def test_every_registered_backbone_and_head_is_covered():
    names = {p.rsplit(".", 1)[-1] for p in list_components(Backbone)}
    assert names == set(BACKBONES), "register a tiny builder for the new backbone in this test"
    heads = {p.rsplit(".", 1)[-1] for p in list_components(GlobalHead) + list_components(LocalHead)}
    assert heads == {"ContextualAlignmentHead", "TokenReasoningHead"}


def _model(tmp_path, name, **kwargs):
    backbone = tiny_backbone(tmp_path, name)
    local = TokenReasoningHead(token_dim=backbone.token_dim, top_k=2)
    return CoAlign(backbone, ContextualAlignmentHead(beta=0.2), local, **kwargs).eval()


def _inputs(model, n=3):
    size = model.backbone.image_config["size"]
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), ["make it red", "add a dog", "remove the hat"][:n]


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_contract(tmp_path, name):
    model = _model(tmp_path, name)
    images, texts = _inputs(model)
    q, t = model.encode_queries(images, texts), model.encode_targets(images)
    e = model.backbone.embed_dim
    assert q.embedding.shape == (3, e) and t.embedding.shape[0] == 3 and t.embedding.shape[2] == e
    assert torch.allclose(q.embedding.norm(dim=-1), torch.ones(3), atol=1e-4)
    assert torch.allclose(t.embedding.norm(dim=-1), torch.ones(t.embedding.shape[:2]), atol=1e-4)
    assert q.tokens.shape[0] == 3 and q.tokens.shape[-1] == model.backbone.token_dim
    assert model.similarity(q, t).shape == (3, 3)
    # deterministic in eval mode, and a query's tokens do not depend on the other texts of the batch
    assert torch.allclose(model.encode_queries(images, texts).embedding, q.embedding, atol=1e-6)
    assert torch.allclose(model.encode_queries(images[:1], texts[:1]).embedding, q.embedding[:1], atol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_spec_and_state_dict_round_trip(tmp_path, name):
    model = _model(tmp_path, name)
    images, texts = _inputs(model)
    rebuilt = CoAlign(**json.loads(json.dumps(model.config()))).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert torch.allclose(
        rebuilt.encode_queries(images, texts).embedding, model.encode_queries(images, texts).embedding
    )
    assert torch.allclose(rebuilt.encode_targets(images).embedding, model.encode_targets(images).embedding)


@pytest.mark.parametrize("name", BACKBONES)
def test_training_step_gives_gradients_only_to_trainable_parts(tmp_path, name):
    model = _model(tmp_path, name).train()
    images, texts = _inputs(model)
    batch = {
        "reference": images,
        "text": texts,
        "target": images.flip(0),
        "group": torch.tensor([0, 0, 1]),
        "target_id": ["a", "b", "c"],
    }
    loss = model._losses(batch)["loss"]
    loss.backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
    if name == "Blip2Backbone":  # the paper freezes the image encoder
        assert frozen and all("vision" in n for n in frozen)


def test_save_pretrained_round_trip_is_identical(tmp_path):
    model = create_model("coalign_tiny").eval()
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    texts = ["make it blue", "add a red circle"]
    before = model.similarity(model.encode_queries(images, texts), model.encode_targets(images))
    model.card_info["metrics"] = {"shapes/R@1": 91.5}
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    assert "shapes/R@1" in (tmp_path / "ckpt" / "README.md").read_text()
    loaded = CoAlign.from_pretrained(tmp_path / "ckpt")
    after = loaded.similarity(loaded.encode_queries(images, texts), loaded.encode_targets(images))
    assert torch.equal(before, after)


def test_hf_backbone_round_trip_keeps_tokenizer(tmp_path):
    model = _model(tmp_path, "CLIPBackbone")
    images, texts = _inputs(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = CoAlign.from_pretrained(tmp_path / "ckpt")
    assert torch.allclose(loaded.encode_queries(images, texts).embedding, model.encode_queries(images, texts).embedding)


def test_loading_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    create_model("coalign_tiny").save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(weights)
    state.pop(next(iter(state)))
    state["extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(RuntimeError, match="missing keys"):
        CoAlign.from_pretrained(tmp_path / "ckpt")


def test_loading_bad_folders_says_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CoAlign.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CoAlign.from_pretrained(tmp_path / "empty")
    create_model("coalign_tiny").save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model"]["backbone"]["class_path"] = "os.system"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a registered coalign component"):
        CoAlign.from_pretrained(tmp_path / "ckpt")


def test_incompatible_checkpoint_is_rejected(tmp_path):
    create_model("coalign_tiny", embed_dim=64).save_pretrained(tmp_path / "small")
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    config["model"]["backbone"]["init_args"]["embed_dim"] = 32
    (tmp_path / "small" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="do not fit"):
        CoAlign.from_pretrained(tmp_path / "small")


def test_bad_inputs_get_clear_errors():
    model = create_model("coalign_tiny").eval()
    good = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="2 reference images but 1 texts"):
        model.encode_queries(good, ["only one"])
    with pytest.raises(ValueError, match="empty"):
        model.encode_queries(good, ["fine", "  "])
    with pytest.raises(ValueError, match="float tensor"):
        model.encode_targets(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        model.encode_targets(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="no images"):
        model.encode_targets([])


def test_registry_rejects_unregistered_and_unknown_arguments():
    with pytest.raises(ValueError, match="not a registered"):
        coalign.build_component({"class_path": "torch.nn.Linear", "init_args": {}})
    with pytest.raises(ValueError, match="unknown init_args"):
        coalign.build_component({"class_path": "ContextualAlignmentHead", "init_args": {"betta": 0.1}})
    assert isinstance(coalign.build_component({"class_path": "ContextualAlignmentHead"}), Component)


def test_create_model_lists_and_routes_overrides():
    assert {"coalign_tiny", "coalign_blip2_vitg", "coalign_clip_vitb32", "coalign_clip_vitl14"} <= set(
        coalign.list_models()
    )
    model = create_model("coalign_tiny", rerank_top_k=5, embed_dim=32)
    assert model.rerank_top_k == 5 and model.backbone.embed_dim == 32
    with pytest.raises(ValueError, match="unknown model"):
        create_model("coalign_nope")
    with pytest.raises(NotImplementedError, match="no published base weights"):
        create_model("coalign_tiny", pretrained=True)


def test_rerank_reorders_top_k_with_local_scores():
    model = create_model("coalign_tiny", rerank_top_k=3, rerank_weight=10.0).eval()
    images = torch.randn(5, 3, 32, 32)
    q = model.encode_queries(images[:2], ["a", "b"])
    g = model.encode_targets(images)
    scores = model.similarity(q, g)
    top = scores.topk(5, dim=1)
    index, new_scores = model.rerank(q, g, top.indices, top.values)
    local = model.local_head.score(q, g)
    for row in range(2):
        head = top.indices[row, :3]
        expected = head[(top.values[row, :3] + 10 * local[row, head]).argsort(descending=True)]
        assert torch.equal(index[row, :3], expected)
        assert torch.equal(index[row, 3:], top.indices[row, 3:])


@pytest.mark.parametrize("composer", ["ImageOnlyComposer", "TextOnlyComposer"])
def test_ablation_composers_ignore_one_input(composer):
    from coalign import build_component

    comp = build_component({"class_path": composer, "init_args": {"dim": 16}})
    backbone = TinyBackbone(**TINY, composer=comp)
    model = CoAlign(backbone).eval()
    images = torch.randn(2, 3, 16, 16)
    q = model.encode_queries(images, ["add a red circle", "remove it"]).embedding
    if composer == "ImageOnlyComposer":
        other = model.encode_queries(images, ["something else", "entirely"]).embedding
    else:
        other = model.encode_queries(torch.randn(2, 3, 16, 16), ["add a red circle", "remove it"]).embedding
    assert torch.allclose(q, other, atol=1e-6)


def test_combiner_by_hand():
    from coalign.backbones import Combiner

    comb = Combiner(dim=4, projection_dim=3, hidden_dim=5, dropout=0.0).eval()
    i, t = torch.randn(2, 4), torch.randn(2, 4)
    tp, ip = torch.relu(comb.text_projection(t)), torch.relu(comb.image_projection(i))
    c = torch.cat([tp, ip], -1)
    lam = comb.dynamic_scalar(c)
    expected = comb.output(torch.relu(comb.combiner(c))) + lam * t + (1 - lam) * i
    assert torch.allclose(comb(i, t), expected)


def test_load_model_accepts_names_folders_and_checkpoints(tmp_path):
    import lightning as L

    from coalign import load_model

    model = create_model("coalign_tiny", embed_dim=32, channels=8).eval()
    model.save_pretrained(tmp_path / "folder")
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    images, texts = torch.randn(2, 3, 32, 32), ["add a red circle", "remove it"]
    expected = model.encode_queries(images, texts).embedding
    for source in (tmp_path / "folder", tmp_path / "m.ckpt"):
        loaded = load_model(str(source)).eval()
        assert torch.allclose(loaded.encode_queries(images, texts).embedding, expected)
    seeded, again = load_model("coalign_tiny", random_init=True).eval(), load_model("coalign_tiny", True).eval()
    # a fixed seed: `coalign index` and `coalign search` build the same model
    assert torch.equal(seeded.encode_queries(images, texts).embedding, again.encode_queries(images, texts).embedding)
    with pytest.raises(ValueError, match="no published weights"):
        load_model("coalign_tiny")
    with pytest.warns(UserWarning, match="seeded random initialisation"):
        assert isinstance(load_model("coalign_tiny", random_init=None), CoAlign)
    with pytest.raises(ValueError, match="not a folder"):
        load_model(str(tmp_path / "missing" / "deep" / "path"))


@pytest.mark.parametrize("name", ["CLIPBackbone", "Blip2Backbone"])
def test_gradient_checkpointing_keeps_loss_and_gradients(tmp_path, name):
    build = tiny_clip_backbone if name == "CLIPBackbone" else tiny_blip2_backbone
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = build(tmp_path, gradient_checkpointing=checkpointing)
        model = CoAlign(backbone, ContextualAlignmentHead(beta=0.2), TokenReasoningHead(backbone.token_dim)).train()
        images, texts = _inputs(model)
        torch.manual_seed(1)  # the recomputed forward replays the same dropout masks
        loss = model._losses({"reference": images, "text": texts, "target": images.flip(0)})["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss)
    assert set(grads_ckpt) == set(grads)
    for key, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[key], grad, rtol=1e-4, atol=1e-6)
    assert model.backbone.spec()["init_args"]["gradient_checkpointing"] is True
    towers = [model.backbone.qformer] if name == "Blip2Backbone" else [model.backbone.vision_model]
    for tower in towers:
        assert any(getattr(m, "gradient_checkpointing", False) is True for m in tower.modules())


def test_bf16_autocast_switch(tmp_path):
    model = _model(tmp_path, "Blip2Backbone")
    fast = CoAlign(**{**model.config(), "autocast": "bf16"}).eval()
    fast.load_state_dict(model.state_dict())
    fast.backbone.set_tokenizer(model.backbone.get_tokenizer())
    images, texts = _inputs(model)
    q, q_fast = model.encode_queries(images, texts), fast.encode_queries(images, texts)
    t_fast = fast.encode_targets(images)
    assert q_fast.embedding.dtype == torch.float32 and t_fast.embedding.dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: unit vectors agree to a few 1e-3, but not to float32 precision
    assert 0 < (q_fast.embedding - q.embedding).abs().max() < 5e-2
    seen = []
    hook = fast.backbone.vision_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fast._losses({"reference": images, "text": texts, "target": images.flip(0)})["loss"].backward()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert CoAlign.from_pretrained(_saved(fast, tmp_path)).autocast == "bf16"
    with pytest.raises(ValueError, match="autocast must be one of"):
        CoAlign(TinyBackbone(**TINY), autocast="fp8")


def _saved(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def test_reference_negatives_are_the_distinct_references_not_already_targets(tmp_path):
    """``reference_negatives`` gives the same loss as passing the distinct references, minus those that are some
    query's target, as explicit hard negatives; the option is saved with the model."""
    from coalign.model import with_reference_negatives

    images, texts = _inputs(_model(tmp_path, "TinyBackbone"), n=3)
    # queries 0 and 1 share reference "s"; query 2's reference "e1" is query 0's target (an in-batch column)
    batch = {
        "reference": torch.stack([images[0], images[0], images[1]]),
        "reference_id": ["s", "s", "e1"],
        "text": texts,
        "target": torch.stack([images[1], images[2], images[0]]),
        "target_id": ["e1", "e2", "s2"],
        "group": torch.tensor([0, 0, 0]),
    }
    grown = with_reference_negatives(batch)
    assert grown["negative_id"] == ["s", "e1"] and torch.equal(grown["negative"], images[:2])
    assert "negative" not in batch  # the input batch is left alone
    torch.manual_seed(0)
    plain = _model(tmp_path, "TinyBackbone")
    with_option = CoAlign(plain.backbone, plain.global_head, plain.local_head, reference_negatives=True).eval()
    explicit = dict(batch, negative=images[:1], negative_id=["s"])  # "e1" is a target: dropped either way
    assert with_option._losses(batch)["loss"].item() == pytest.approx(plain._losses(explicit)["loss"].item())
    assert plain._losses(batch)["loss"].item() < with_option._losses(batch)["loss"].item()
    # existing negatives are kept, the references come after them
    both = with_reference_negatives(dict(batch, negative=images[2:], negative_id=["x"]))
    assert both["negative_id"] == ["x", "s", "e1"]
    with_option.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["reference_negatives"] is True
    assert coalign.load_model(str(tmp_path / "m")).reference_negatives is True


def test_caption_loss_is_symmetric_infonce_of_captions_and_targets(tmp_path):
    """``caption_loss_weight`` adds BLIP-2-style image-text contrast: captions vs target embeddings, both ways,
    a repeated target image counting as one positive; a backbone without ``encode_caption`` is refused."""
    torch.manual_seed(0)
    backbone = TinyBackbone(**TINY)
    model = CoAlign(backbone, ContextualAlignmentHead(), caption_loss_weight=0.5)
    images, _ = _inputs(model, n=3)
    targets = torch.stack([images[0], images[1], images[0]])
    captions = ["a red square", "two blue circles", "a red square"]
    batch = {"reference": images, "text": ["x", "y", "z"], "target": targets, "target_id": ["a", "b", "a"]}
    losses = model._losses({**batch, "target_caption": captions})
    tokens = backbone.tokenize(captions)
    text = torch.nn.functional.normalize(backbone._encode_text(tokens["input_ids"], tokens["attention_mask"]), dim=-1)
    logits = text @ model.encode_targets(targets).embedding[:, 0].T / model.global_head.temperature
    y = torch.tensor([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]])
    by_hand = 0.5 * (-(y * logits.log_softmax(1)).sum(1).mean() - (y * logits.T.log_softmax(1)).sum(1).mean())
    assert losses["caption_loss"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(losses["global_loss"].item() + 0.5 * by_hand.item(), rel=1e-5)
    assert "caption_loss" not in model._losses(batch)  # no captions in the batch: no term
    with pytest.raises(ValueError, match="caption_loss_weight"):
        CoAlign(TinyBackbone(**TINY), caption_loss_weight=-1)
    clip = CoAlign(tiny_clip_backbone(tmp_path), caption_loss_weight=0.5)
    clip_images, _ = _inputs(clip, n=3)
    with pytest.raises(NotImplementedError, match="does not encode captions"):
        clip._losses({**batch, "reference": clip_images, "target": clip_images, "target_caption": captions})


def test_colour_negatives_are_channel_permuted_targets_in_pixel_space():
    """Each target's copy with its RGB channels reordered (in pixel space, normalised again) joins the negatives; a
    grey target, which no order changes, gets none; the option changes the loss and is saved."""
    from coalign.model import with_colour_negatives

    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]  # CLIP-like: permuting normalised channels would be wrong
    pixels = torch.rand(3, 3, 4, 4)
    pixels[2] = 0.5  # grey
    targets = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    batch = {"target": targets, "target_id": ["a", "b", "g"], "negative": targets[:1], "negative_id": ["x"]}
    torch.manual_seed(3)
    out = with_colour_negatives(batch, mean, std)
    assert out["negative_id"][0] == "x" and [n.split("#")[0] for n in out["negative_id"][1:]] == ["a", "b"]
    for i, name in enumerate(out["negative_id"][1:]):
        order = ["rgb".index(c) for c in name.split("#")[1]]
        assert sorted(order) == [0, 1, 2] and order != [0, 1, 2]
        back = out["negative"][1 + i] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        assert torch.allclose(back, pixels[i, order], atol=1e-5)
    assert len(batch["negative"]) == 1  # the input batch is left alone

    torch.manual_seed(0)
    plain = CoAlign(TinyBackbone(**TINY), ContextualAlignmentHead())
    option = CoAlign(plain.backbone, plain.global_head, colour_negatives=True)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    step = {"reference": images, "text": ["a", "b", "c"], "target": images.flip(0), "target_id": ["1", "2", "3"]}
    assert option._losses(step)["loss"].item() > plain._losses(step)["loss"].item()
    assert option.config()["colour_negatives"] is True
