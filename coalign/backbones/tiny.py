"""A small backbone trained from scratch: a CNN image encoder, a transformer text encoder, a composer.

It needs no download and trains on two CPU cores in minutes, which makes it the model of the quickstart, the
tests and quick experiments. Texts are tokenised by feature hashing of lower-cased words (:class:`HashingTokenizer`),
so there is no vocabulary file and any text is accepted.
"""

from __future__ import annotations

import re
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._features import QueryFeatures, TargetFeatures
from ..registry import register_component
from .base import Backbone
from .composers import Combiner, Composer

__all__ = ["TinyBackbone", "HashingTokenizer"]

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class HashingTokenizer:
    """Words to ids by CRC32 hashing into ``num_buckets - 2`` buckets (0 = padding, 1 = [CLS]).

    Deterministic across processes and machines (unlike Python's ``hash``). Texts are lower-cased, split into
    words and punctuation, truncated to ``max_length - 1`` words and padded to ``max_length``.
    """

    def __init__(self, num_buckets: int = 4096, max_length: int = 24):
        if num_buckets < 3:
            raise ValueError(f"num_buckets must be >= 3, got {num_buckets}")
        self.num_buckets = num_buckets
        self.max_length = max_length

    def word_id(self, word: str) -> int:
        return 2 + zlib.crc32(word.encode("utf-8")) % (self.num_buckets - 2)

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got a single string")
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {row} is a {type(text).__name__}, expected str")
            words = [self.word_id(w) for w in _WORD.findall(text.lower())][: self.max_length - 1]
            ids[row, : len(words) + 1] = torch.tensor([1, *words])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


@register_component
class TinyBackbone(Backbone):
    """CNN + transformer two-tower backbone with a composer, for from-scratch training.

    Image: ``stages`` conv blocks, each halving the resolution, give a ``g x g`` grid of tokens
    (``g = image_size / 2**stages``). The global image feature is a linear map of the *flattened* grid rather
    than an average, because where an object sits is part of what a modification text talks about.
    Text: hashed word embeddings + learned positions through a small transformer encoder; the global text
    feature is the [CLS] output. Query = ``normalize(composer(image, text))``; target = ``normalize(image)``.
    Local tokens: target tokens are the projected grid tokens; query tokens are the reference's grid tokens
    shifted by a projection of the composed feature (so they carry the text).

    Args:
        image_size: input side in pixels (a multiple of ``2**stages``).
        channels: width of the first conv stage (doubled per stage, capped at 4x).
        stages: number of conv stages.
        embed_dim: width E of the global embeddings.
        token_dim: width D of the local tokens.
        text_layers: transformer layers of the text encoder.
        text_heads: attention heads of the text encoder.
        num_buckets: hashing vocabulary size.
        max_length: tokens per text, including [CLS].
        composer: fuses image and text features; None builds a ``Combiner(embed_dim, 2*E, 4*E, dropout=0.1)``.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 32,
        stages: int = 3,
        embed_dim: int = 128,
        token_dim: int = 64,
        text_layers: int = 2,
        text_heads: int = 4,
        num_buckets: int = 4096,
        max_length: int = 24,
        composer: Composer | None = None,
    ):
        super().__init__()
        if image_size % (2**stages):
            raise ValueError(f"image_size {image_size} must be a multiple of 2**stages = {2**stages}")
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.token_dim = token_dim
        self.tokenizer = HashingTokenizer(num_buckets, max_length)
        widths = [min(channels * 2**i, channels * 4) for i in range(stages)]
        blocks, cin = [], 3
        for w in widths:
            blocks += [_conv_block(cin, w), nn.MaxPool2d(2)]
            cin = w
        self.cnn = nn.Sequential(*blocks)
        grid = image_size // 2**stages
        self.image_global = nn.Sequential(nn.Flatten(), nn.Linear(cin * grid * grid, embed_dim))
        self.image_tokens = nn.Linear(cin, token_dim)
        self.word_embed = nn.Embedding(num_buckets, embed_dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(1, max_length, embed_dim))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(embed_dim, text_heads, 2 * embed_dim, dropout=0.0, batch_first=True)
        self.text_encoder = nn.TransformerEncoder(layer, text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(embed_dim)
        self.composer = composer if composer is not None else Combiner(embed_dim, 2 * embed_dim, 4 * embed_dim, 0.1)
        self.query_shift = nn.Linear(embed_dim, token_dim)

    @property
    def image_config(self) -> dict:
        return {"size": self.image_size, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        return self.tokenizer(texts)

    def _check_images(self, pixel_values: Tensor) -> None:
        if not isinstance(pixel_values, Tensor) or not pixel_values.is_floating_point() or pixel_values.dim() != 4:
            got = (
                f"{tuple(pixel_values.shape)} {pixel_values.dtype}"
                if isinstance(pixel_values, Tensor)
                else type(pixel_values)
            )
            raise ValueError(f"expected float images [B, 3, {self.image_size}, {self.image_size}], got {got}")
        if tuple(pixel_values.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected images [B, 3, {self.image_size}, {self.image_size}], got {tuple(pixel_values.shape)}; "
                "use model.preprocess to resize them"
            )

    def _encode_image(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        self._check_images(pixel_values)
        fmap = self.cnn(pixel_values)  # [B, C, g, g]
        tokens = self.image_tokens(fmap.flatten(2).transpose(1, 2))  # [B, g*g, D]
        return self.image_global(fmap), tokens

    def _encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.word_embed(input_ids) + self.position[:, : input_ids.shape[1]]
        x = self.text_encoder(x, src_key_padding_mask=attention_mask == 0)
        return self.text_norm(x[:, 0])

    def encode_caption(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The text tower's [CLS] feature, normalised: a caption lives in the same space as ``encode_target``."""
        return F.normalize(self._encode_text(input_ids, attention_mask), dim=-1)

    def encode_query(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> QueryFeatures:
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"got {pixel_values.shape[0]} reference images but {input_ids.shape[0]} texts")
        image, tokens = self._encode_image(pixel_values)
        composed = self.composer(image, self._encode_text(input_ids, attention_mask))
        tokens = tokens + self.query_shift(composed).unsqueeze(1)
        return QueryFeatures(F.normalize(composed, dim=-1), tokens, None)

    def encode_target(self, pixel_values: Tensor) -> TargetFeatures:
        image, tokens = self._encode_image(pixel_values)
        return TargetFeatures(F.normalize(image, dim=-1).unsqueeze(1), tokens)
