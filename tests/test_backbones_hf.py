"""CLIPBackbone and Blip2Backbone on tiny random models: shapes, parity with transformers, freezing, specs, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _tiny_hf import (
    TINY_MAX_LENGTH,
    tiny_blip2_backbone,
    tiny_clip_backbone,
    tiny_images,
    write_tiny_blip2_checkpoint,
    write_tiny_clip_checkpoint,
)

from coalign import build_component
from coalign.backbones import Backbone, Blip2Backbone, CLIPBackbone
from coalign.backbones.blip2 import BLIP2_ARCHITECTURES
from coalign.backbones.clip import CLIP_ARCHITECTURES

TEXTS = ["make it red", "same dress but sleeveless and much longer than the tiny max length allows"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(params=["clip", "blip2"])
def backbone(request, tmp_path) -> Backbone:
    torch.manual_seed(0)
    build = tiny_clip_backbone if request.param == "clip" else tiny_blip2_backbone
    return build(tmp_path).eval()


def _encode(backbone: Backbone, seed: int = 0):
    images = tiny_images(2, seed=seed)
    query = backbone.encode_query(images, **backbone.tokenize(TEXTS))
    return query, backbone.encode_target(tiny_images(2, seed=seed + 1))


def test_shapes_and_normalisation(backbone):
    tokens = backbone.tokenize(TEXTS)
    assert tokens["input_ids"].shape == tokens["attention_mask"].shape == (2, TINY_MAX_LENGTH)
    query, target = _encode(backbone)
    e = backbone.embed_dim
    assert query.embedding.shape == (2, e) and target.embedding.shape[0::2] == (2, e)
    assert query.tokens.shape[0::2] == (2, backbone.token_dim) and target.tokens.shape[0::2] == (2, backbone.token_dim)
    torch.testing.assert_close(query.embedding.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(target.embedding.norm(dim=-1), torch.ones(target.embedding.shape[:2]))
    if isinstance(backbone, CLIPBackbone):
        assert target.embedding.shape[1] == 1 and target.tokens.shape[1] == 16  # (32 / 8)^2 patches
        assert query.tokens.shape[1] == 16 + TINY_MAX_LENGTH
        assert query.token_mask.dtype == torch.bool and not query.token_mask[0, -1] and query.token_mask[1].all()
    else:
        assert target.embedding.shape[1] == target.tokens.shape[1] == query.tokens.shape[1] == 4
        torch.testing.assert_close(target.tokens, target.embedding)
    config = backbone.image_config
    assert config["size"] == 32 and len(config["mean"]) == len(config["std"]) == 3


def test_eval_mode_is_deterministic(backbone):
    first, second = _encode(backbone), _encode(backbone)
    torch.testing.assert_close(first[0].embedding, second[0].embedding, rtol=0, atol=0)
    torch.testing.assert_close(first[1].tokens, second[1].tokens, rtol=0, atol=0)


def test_spec_round_trip(backbone, tmp_path):
    spec = json.loads(json.dumps(backbone.spec()))
    rebuilt = build_component(spec, base=Backbone).eval()
    assert type(rebuilt) is type(backbone)
    rebuilt.load_state_dict(backbone.state_dict(), strict=True)
    expected, got = _encode(backbone), _encode(rebuilt)
    torch.testing.assert_close(got[0].embedding, expected[0].embedding)
    torch.testing.assert_close(got[0].tokens, expected[0].tokens)
    torch.testing.assert_close(got[1].embedding, expected[1].embedding)


def test_tokenizer_assets_round_trip(backbone, tmp_path):
    expected = backbone.tokenize(TEXTS)
    backbone.save_assets(tmp_path / "model")
    # A name that cannot resolve offline: only the saved folder can provide the tokenizer.
    spec = backbone.spec()
    blank = build_component({**spec, "init_args": {**spec["init_args"], "tokenizer": "no/such-tokenizer"}})
    with pytest.raises(RuntimeError, match="tokenizer="):
        blank.tokenize(TEXTS)
    blank.load_assets(tmp_path / "model")
    got = blank.tokenize(TEXTS)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])


def test_clear_input_errors(backbone):
    tokens = backbone.tokenize(TEXTS)
    good = tiny_images(2)
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        backbone.encode_target(tiny_images(2, size=24))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        backbone.encode_target(good[0])
    with pytest.raises(TypeError, match="float"):
        backbone.encode_target((good * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="3 reference images but 2 texts"):
        backbone.encode_query(tiny_images(3), **tokens)
    with pytest.raises(ValueError, match="attention_mask"):
        backbone.encode_query(good, tokens["input_ids"], tokens["attention_mask"][:, :4])
    with pytest.raises(ValueError, match="empty"):
        backbone.tokenize([])
    with pytest.raises(ValueError, match="list of strings"):
        backbone.tokenize("a single string")


def test_frozen_image_encoder_gets_no_gradient(backbone):
    spec = backbone.spec()  # BLIP-2 freezes its ViT by default, as BLIP-2 and SPRC do; CLIP trains both towers
    backbone = build_component({**spec, "init_args": {**spec["init_args"], "freeze_image_encoder": True}})
    if isinstance(backbone, CLIPBackbone):
        frozen, trainable = ("vision_model.", "visual_projection."), ("text_model.", "composer.")
    else:
        frozen, trainable = ("vision_model.",), ("qformer.", "query_tokens", "text_proj.", "vision_proj.")
    backbone.train()
    assert backbone.training and not backbone.vision_model.training  # frozen parts stay in eval mode
    query, target = _encode(backbone)
    (query.embedding.sum() + target.embedding.sum() + query.tokens.sum()).backward()
    params = dict(backbone.named_parameters())
    assert all(params[n].grad is None for n in params if n.startswith(frozen))
    assert all(not params[n].requires_grad for n in params if n.startswith(frozen))
    assert any(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in params if n.startswith(trainable))
    assert set(backbone.frozen_parameter_names()) == {n for n in params if n.startswith(frozen)}


def test_clip_load_pretrained_matches_transformers(tmp_path):
    folder = tmp_path / "clip"
    reference = write_tiny_clip_checkpoint(folder)
    backbone = tiny_clip_backbone(tmp_path, model_name=str(folder), tokenizer=None).eval()
    backbone.load_pretrained()
    images, tokens = tiny_images(3), backbone.tokenize(TEXTS + ["x"])  # tokenizer read from the checkpoint folder
    with torch.no_grad():
        image_ref = F.normalize(reference.get_image_features(pixel_values=images).pooler_output, dim=-1)
        text_ref = F.normalize(reference.get_text_features(**tokens).pooler_output, dim=-1)
        torch.testing.assert_close(backbone.encode_target(images).embedding[:, 0], image_ref)
        torch.testing.assert_close(backbone.encode_text(**tokens), text_ref)


def test_blip2_load_pretrained_matches_transformers(tmp_path):
    folder = tmp_path / "blip2"
    reference = write_tiny_blip2_checkpoint(folder)
    backbone = tiny_blip2_backbone(tmp_path, model_name=str(folder), tokenizer=None).eval()
    backbone.load_pretrained()
    images, tokens = tiny_images(2), backbone.tokenize(TEXTS)
    with torch.no_grad():
        itc = reference(pixel_values=images, **tokens, use_image_text_matching_head=False)
        target = backbone.encode_target(images)
        torch.testing.assert_close(target.embedding, itc.image_embeds)  # [B, 4, 16], normalised per query token
        torch.testing.assert_close(backbone.encode_text(**tokens), itc.text_embeds)
        # The multimodal pass is the one transformers runs before its ITM head: query tokens + text, over the image.
        itm = reference(pixel_values=images, **tokens, use_image_text_matching_head=True)
        hidden = itm.text_model_output.last_hidden_state
        query = backbone.encode_query(images, **tokens)
        torch.testing.assert_close(query.embedding, F.normalize(reference.text_projection(hidden[:, 4]), dim=-1))
        torch.testing.assert_close(query.tokens, F.normalize(reference.vision_projection(hidden[:, :4]), dim=-1))


def test_load_pretrained_with_a_wrong_architecture_says_so(tmp_path):
    folder = tmp_path / "clip"
    write_tiny_clip_checkpoint(folder)
    config = json.loads(json.dumps(tiny_clip_backbone(tmp_path).spec()["init_args"]["config"]))
    config["projection_dim"] = 24
    backbone = tiny_clip_backbone(tmp_path, model_name=str(folder), config=config, composer=None)
    with pytest.raises(RuntimeError, match="architecture of that checkpoint"):
        backbone.load_pretrained()
    offline = tiny_clip_backbone(tmp_path, model_name="openai/not-cached-here")
    with pytest.raises(RuntimeError, match="local folder written by save_pretrained"):
        offline.load_pretrained()


def test_unknown_name_without_config_is_a_clear_error():
    with pytest.raises(ValueError, match="known ones are .*clip-vit-base-patch32.*config="):
        CLIPBackbone("openai/clip-vit-huge")
    with pytest.raises(ValueError, match="known ones are .*blip2-itm-vit-g"):
        Blip2Backbone("Salesforce/blip2-opt-2.7b")
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        Blip2Backbone("x", config={"qformer_config": {"use_qformer_text_input": False}})


@pytest.mark.parametrize("name", sorted(CLIP_ARCHITECTURES))
def test_known_clip_checkpoints_build_offline(name):
    with torch.device("meta"):  # the real sizes, without allocating or initialising their weights
        backbone = CLIPBackbone(name)
    expected = {"base": (512, 224), "large": (768, 336 if name.endswith("336") else 224)}[name.split("-")[2]]
    assert (backbone.embed_dim, backbone.image_config["size"]) == expected


def test_blip2_itm_vit_g_builds_offline():
    with torch.device("meta"):
        backbone = Blip2Backbone()
    assert backbone.embed_dim == 256 and backbone.num_query_tokens == 32 and backbone.image_config["size"] == 224
    vit = sum(p.numel() for p in backbone.vision_model.parameters())
    assert 0.98e9 < vit < 1.0e9  # EVA ViT-g/14 without its last block
    assert len(backbone.qformer.encoder.layer) == 12 and backbone.qformer.encoder.layer[0].has_cross_attention
    assert backbone.embeddings.word_embeddings.num_embeddings == 30523
    assert {n.split(".")[0] for n in backbone.frozen_parameter_names()} == {"vision_model"}
    assert set(BLIP2_ARCHITECTURES) >= {"Salesforce/blip2-itm-vit-g"}
