"""TimmBackbone on tiny random timm models (a ViT and a ResNet) with a tiny random BERT text tower, all offline."""

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from coalign import CoAlign
from coalign.backbones import SumComposer, TimmBackbone
from coalign.backbones.composers import Combiner
from coalign.heads import ContextualAlignmentHead, TokenReasoningHead
from tests._tiny_hf import tiny_bert_tokenizer, write_tokenizer

MAX_LENGTH = 12
EMBED = 16
VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}  # 16 patches + CLS
RESNET_KWARGS = {"layers": [1, 1, 1, 1]}  # resnet18 widths, one block per stage; 64 px -> a 2 x 2 map


def tiny_text_config() -> dict[str, Any]:
    return {
        "model_type": "bert",
        "vocab_size": len(tiny_bert_tokenizer()),
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
    }


def tiny_timm_backbone(tmp_path: Path, image: str = "vit", **overrides: Any) -> TimmBackbone:
    """A tiny random TimmBackbone (ViT: 32 px, 16 tokens; ResNet: 64 px, 4 tokens), E = 16, 12-token texts."""
    folder = Path(tmp_path) / "tiny_bert_tokenizer"
    if not folder.is_dir():
        write_tokenizer(tiny_bert_tokenizer(), folder)
    kwargs: dict[str, Any] = {
        "image_model": "vit_tiny_patch16_224",
        "image_model_kwargs": VIT_KWARGS,
        "text_model": "tiny-random-bert",
        "text_config": tiny_text_config(),
        "embed_dim": EMBED,
        "composer": Combiner(dim=EMBED, projection_dim=32, hidden_dim=32, dropout=0.1),
        "tokenizer": str(folder),
        "max_length": MAX_LENGTH,
    }
    if image == "resnet":
        kwargs.update(image_model="resnet18", image_model_kwargs=RESNET_KWARGS, image_size=64)
    kwargs.update(overrides)
    return TimmBackbone(**kwargs)


def _batch(backbone, n=2):
    size = backbone.image_config["size"]
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = ["make it red", "add two dogs and a cat"][:n]
    return images, backbone.tokenize(texts)


@pytest.mark.parametrize(("image", "size", "tokens", "mean"), [("vit", 32, 16, 0.5), ("resnet", 64, 4, 0.485)])
def test_shapes_and_image_config(tmp_path, image, size, tokens, mean):
    backbone = tiny_timm_backbone(tmp_path, image).eval()
    config = backbone.image_config
    assert config["size"] == size and config["mean"][0] == pytest.approx(mean) and config["resample"] == "bicubic"
    assert config["resize_mode"] == "shortest_edge"
    images, text = _batch(backbone)
    q = backbone.encode_query(images, text["input_ids"], text["attention_mask"])
    t = backbone.encode_target(images)
    assert q.embedding.shape == (2, EMBED) and q.tokens.shape == (2, tokens + MAX_LENGTH, EMBED)
    assert t.embedding.shape == (2, 1, EMBED) and t.tokens.shape == (2, tokens, EMBED)
    assert q.token_mask[:, :tokens].all() and torch.equal(q.token_mask[:, tokens:], text["attention_mask"].bool())
    assert torch.allclose(t.tokens.norm(dim=-1), torch.ones(2, tokens), atol=1e-5)


def test_vit_features_match_the_timm_model_by_hand(tmp_path):
    backbone = tiny_timm_backbone(tmp_path, composer=SumComposer()).eval()
    images, text = _batch(backbone)
    with torch.no_grad():
        x = backbone.image_model.forward_features(images)  # [B, 1 + 16, 32]; global pool 'token' takes the CLS
        image = F.normalize(backbone.image_projection(x[:, 0]), dim=-1)
        patches = F.normalize(backbone.token_projection(x[:, 1:]), dim=-1)
        hidden = backbone.text_model(**text).last_hidden_state
        m = text["attention_mask"].unsqueeze(-1).float()
        words = F.normalize(backbone.text_projection((hidden * m).sum(1) / m.sum(1)), dim=-1)
        t = backbone.encode_target(images)
        q = backbone.encode_query(images, text["input_ids"], text["attention_mask"])
    torch.testing.assert_close(t.embedding[:, 0], image)
    torch.testing.assert_close(t.tokens, patches)
    torch.testing.assert_close(q.embedding, F.normalize(image + words, dim=-1))
    assert text["attention_mask"][0].sum() < text["attention_mask"][1].sum()  # the mean really skips padding


def test_resnet_features_are_the_pooled_and_flattened_feature_map(tmp_path):
    backbone = tiny_timm_backbone(tmp_path, "resnet").eval()
    images, _ = _batch(backbone)
    with torch.no_grad():
        x = backbone.image_model.forward_features(images)  # [B, 512, 2, 2]
        t = backbone.encode_target(images)
    assert x.shape == (2, 512, 2, 2)
    torch.testing.assert_close(t.embedding[:, 0], F.normalize(backbone.image_projection(x.mean((2, 3))), dim=-1))
    cell = F.normalize(backbone.token_projection(x[:, :, 1, 0]), dim=-1)  # row 1, column 0 -> token 2
    torch.testing.assert_close(t.tokens[:, 2], cell)


def test_cls_pooling_takes_the_first_text_state(tmp_path):
    backbone = tiny_timm_backbone(tmp_path, text_pooling="cls").eval()
    _, text = _batch(backbone)
    with torch.no_grad():
        pooled, _ = backbone._encode_text(text["input_ids"], text["attention_mask"])
        first = backbone.text_projection(backbone.text_model(**text).last_hidden_state[:, 0])
    torch.testing.assert_close(pooled, first)


def test_stem_split_is_exact(tmp_path):
    backbone = tiny_timm_backbone(tmp_path, freeze_image=True).eval()
    assert backbone.image_stem_frozen()
    images, text = _batch(backbone)
    with torch.no_grad():
        stem = backbone.encode_image_stem(images)
        direct = backbone.encode_query(images, text["input_ids"], text["attention_mask"])
        split = backbone.encode_query_from_stem(stem, text["input_ids"], text["attention_mask"])
    assert torch.equal(direct.embedding, split.embedding) and torch.equal(direct.tokens, split.tokens)
    assert torch.equal(backbone.encode_target(images).embedding, backbone.encode_target_from_stem(stem).embedding)


@pytest.mark.parametrize("image", ["vit", "resnet"])
def test_one_training_step_with_a_frozen_image_tower(tmp_path, image):
    torch.manual_seed(0)
    backbone = tiny_timm_backbone(tmp_path, image, freeze_image=True)
    model = CoAlign(backbone, ContextualAlignmentHead(beta=0.2), TokenReasoningHead(backbone.token_dim, top_k=2))
    model.train()
    assert not backbone.image_model.training and backbone.text_model.training  # frozen tower stays in eval
    size = backbone.image_config["size"]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    batch = {"reference": images, "text": ["red", "a dog", "no hat"], "target": images.flip(0)}
    loss = model._losses(batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.image_model.parameters())
    for name in ("image_projection", "token_projection", "text_projection", "text_model", "composer"):
        params = list(backbone.get_submodule(name).parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    assert backbone.frozen_parameter_names() and all(
        n.startswith("image_model.") for n in backbone.frozen_parameter_names()
    )


def test_save_pretrained_round_trip_is_identical(tmp_path):
    backbone = tiny_timm_backbone(tmp_path)
    model = CoAlign(backbone, ContextualAlignmentHead(beta=0.2), TokenReasoningHead(backbone.token_dim)).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(2)]  # via preprocess
    texts = ["make it red", "add two dogs and a cat"]
    before = model.similarity(model.encode_queries(images, texts), model.encode_targets(images))
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "assets" / "tokenizer").is_dir()
    shutil.rmtree(tmp_path / "tiny_bert_tokenizer")  # the folder's own tokenizer is the one used
    loaded = CoAlign.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded.backbone, TimmBackbone)
    after = loaded.similarity(loaded.encode_queries(images, texts), loaded.encode_targets(images))
    assert torch.equal(before, after)


def test_load_pretrained_reads_local_files_only(tmp_path):
    """timm weights from a local safetensors file (its classifier dropped), text weights and config from a folder."""
    import timm
    from safetensors.torch import save_file
    from transformers import AutoConfig, BertModel

    torch.manual_seed(3)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=5, **VIT_KWARGS)
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    config = dict(tiny_text_config())
    text_source = BertModel(AutoConfig.for_model(config.pop("model_type"), **config))
    text_source.save_pretrained(str(tmp_path / "bert"))
    write_tokenizer(tiny_bert_tokenizer(), tmp_path / "bert")

    backbone = tiny_timm_backbone(tmp_path, image_weights=str(weights), text_model=str(tmp_path / "bert"))
    backbone = TimmBackbone(**{**backbone.spec()["init_args"], "text_config": None, "composer": SumComposer()})
    assert backbone.tokenizer_source == str(tmp_path / "tiny_bert_tokenizer")
    backbone.load_pretrained()
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert expected.keys() == backbone.image_model.state_dict().keys()
    assert all(torch.equal(v, backbone.image_model.state_dict()[k]) for k, v in expected.items())
    text_state = backbone.text_model.state_dict()
    assert all(torch.equal(v, text_state[k]) for k, v in text_source.state_dict().items() if k in text_state)
    assert torch.equal(text_state["embeddings.word_embeddings.weight"], text_source.embeddings.word_embeddings.weight)


def test_bad_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        tiny_timm_backbone(tmp_path, image_model="no_such_net")
    with pytest.raises(ValueError, match="text_pooling"):
        tiny_timm_backbone(tmp_path, text_pooling="max")
    with pytest.raises(ValueError, match=r"may not set \['pretrained'\]"):
        tiny_timm_backbone(tmp_path, image_model_kwargs={**VIT_KWARGS, "pretrained": True})
    with pytest.raises(ValueError, match="max_length must be in"):
        tiny_timm_backbone(tmp_path, max_length=64)
    with pytest.raises(ValueError, match="only square images"):
        tiny_timm_backbone(tmp_path, image_model_kwargs={**VIT_KWARGS, "img_size": (32, 48)})
    with pytest.raises(RuntimeError, match="could not read the text tower's config"):
        tiny_timm_backbone(tmp_path, text_model=str(tmp_path / "missing"), text_config=None)
    backbone = tiny_timm_backbone(tmp_path, "resnet")
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        backbone.encode_target(torch.zeros(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="could not load timm weights"):
        tiny_timm_backbone(tmp_path, image_weights=str(tmp_path / "missing.safetensors")).load_pretrained()
