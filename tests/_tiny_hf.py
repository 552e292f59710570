"""Tiny random CLIP and BLIP-2 models and tiny tokenizers, built offline, for tests of anything using these backbones.

The tokenizers are built from in-memory vocabularies (transformers 5 ignores ``vocab_file``/``merges_file`` given to
``CLIPTokenizer``), saved to a folder and passed to the backbones by path, so the backbones' specs stay JSON.

Usage::

    backbone = tiny_clip_backbone(tmp_path)            # CLIPBackbone, E = 32, 32 px images, 16-token texts
    backbone = tiny_blip2_backbone(tmp_path)           # Blip2Backbone, E = 16, 4 query tokens
    folder = write_tiny_clip_checkpoint(tmp_path / "clip")   # a CLIPModel.save_pretrained folder + tokenizer
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from coalign.backbones.blip2 import Blip2Backbone
from coalign.backbones.clip import CLIPBackbone
from coalign.backbones.composers import Combiner

__all__ = [
    "TINY_BLIP2_CONFIG",
    "TINY_CLIP_CONFIG",
    "TINY_MAX_LENGTH",
    "tiny_bert_tokenizer",
    "tiny_blip2_backbone",
    "tiny_clip_backbone",
    "tiny_clip_tokenizer",
    "tiny_images",
    "write_tiny_blip2_checkpoint",
    "write_tiny_clip_checkpoint",
    "write_tokenizer",
]

TINY_MAX_LENGTH = 16
TINY_IMAGE_SIZE = 32

# Byte-level BPE without merges: every byte is a token, plain and as a word end ("</w>"): 512 tokens, then
# <|startoftext|> = 512 and <|endoftext|> = 513. EOS has the highest id, as in OpenAI's vocabulary.
_CLIP_VOCAB_SIZE = 514
_CLIP_BOS, _CLIP_EOS = 512, 513

_BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BERT_CHARS = string.ascii_lowercase + string.digits
_BERT_VOCAB = _BERT_SPECIAL + list(_BERT_CHARS + string.punctuation) + ["##" + c for c in _BERT_CHARS]

TINY_CLIP_CONFIG: dict[str, Any] = {
    "projection_dim": 32,
    "text_config": {
        "vocab_size": _CLIP_VOCAB_SIZE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": TINY_MAX_LENGTH,
        "bos_token_id": _CLIP_BOS,
        "eos_token_id": _CLIP_EOS,
        "pad_token_id": _CLIP_EOS,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 8,
    },
}

TINY_BLIP2_CONFIG: dict[str, Any] = {
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 8,
    },
    "qformer_config": {
        "vocab_size": len(_BERT_VOCAB),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
        "cross_attention_frequency": 2,
        "encoder_hidden_size": 32,
        "use_qformer_text_input": True,
    },
    "num_query_tokens": 4,
    "image_text_hidden_size": 16,
}


def tiny_clip_tokenizer():
    """A CLIPTokenizer over the 256 byte symbols (no merges), built in memory."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": _CLIP_BOS, "<|endoftext|>": _CLIP_EOS})
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_bert_tokenizer():
    """A BertTokenizer over single characters (lowercase letters, digits, punctuation), built in memory."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={token: i for i, token in enumerate(_BERT_VOCAB)})


def write_tokenizer(tokenizer, folder: Path) -> str:
    """Save ``tokenizer`` to ``folder`` and return the path as a string (a JSON-able ``tokenizer=`` argument)."""
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def tiny_images(batch: int = 2, seed: int = 0, size: int = TINY_IMAGE_SIZE) -> torch.Tensor:
    """Normalised-looking random images ``[batch, 3, size, size]``."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_clip_backbone(tmp_path: Path, **overrides: Any) -> CLIPBackbone:
    """A tiny random :class:`CLIPBackbone` whose tokenizer is saved under ``tmp_path/tiny_clip_tokenizer``.

    The composer is a small Combiner (dropout 0.1); ``overrides`` replace any constructor argument.
    """
    folder = Path(tmp_path) / "tiny_clip_tokenizer"
    if not folder.is_dir():
        write_tokenizer(tiny_clip_tokenizer(), folder)
    kwargs: dict[str, Any] = {
        "model_name": "tiny-random-clip",
        "config": TINY_CLIP_CONFIG,
        "composer": Combiner(dim=32, projection_dim=64, hidden_dim=64, dropout=0.1),
        "tokenizer": str(folder),
        "max_length": TINY_MAX_LENGTH,
    }
    kwargs.update(overrides)
    return CLIPBackbone(**kwargs)


def tiny_blip2_backbone(tmp_path: Path, **overrides: Any) -> Blip2Backbone:
    """A tiny random :class:`Blip2Backbone` whose tokenizer is saved under ``tmp_path/tiny_bert_tokenizer``."""
    folder = Path(tmp_path) / "tiny_bert_tokenizer"
    if not folder.is_dir():
        write_tokenizer(tiny_bert_tokenizer(), folder)
    kwargs: dict[str, Any] = {
        "model_name": "tiny-random-blip2",
        "config": TINY_BLIP2_CONFIG,
        "tokenizer": str(folder),
        "max_length": TINY_MAX_LENGTH,
    }
    kwargs.update(overrides)
    return Blip2Backbone(**kwargs)


def write_tiny_clip_checkpoint(folder: Path, seed: int = 0):
    """Write a random tiny ``CLIPModel`` and its tokenizer to ``folder`` (as ``save_pretrained``); return the model."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**TINY_CLIP_CONFIG)).eval()
    model.save_pretrained(str(folder))
    write_tokenizer(tiny_clip_tokenizer(), folder)
    return model


def write_tiny_blip2_checkpoint(folder: Path, seed: int = 0):
    """Write a random tiny ``Blip2ForImageTextRetrieval`` and its tokenizer to ``folder``; return the model.

    transformers initialises the query tokens to zeros (real checkpoints overwrite them); here they are random so
    that a parity test sees 4 different query outputs.
    """
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(Blip2Config(**TINY_BLIP2_CONFIG)).eval()
    with torch.no_grad():
        model.query_tokens.normal_(std=0.5)
    model.save_pretrained(str(folder))
    write_tokenizer(tiny_bert_tokenizer(), folder)
    return model
