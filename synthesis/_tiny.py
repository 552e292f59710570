"""Tiny random models built offline from in-code configs, for tests, CI and benchmarks (``tiny: true``).

Each builder returns exactly what the matching loader in :mod:`.models` returns for a real checkpoint, so the
stages run the same code on both. Weights are initialised under a fixed seed, so every rank of a distributed run
and every rerun builds identical models. Tokenizers are built from in-code vocabularies (no files, no hub):
a word-level tokenizer for the chat models, and a character-level ``CLIPTokenizer`` for the CLIP text towers.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "TINY_WORDS",
    "word_tokenizer",
    "clip_tokenizer",
    "tiny_causal_lm",
    "tiny_clip",
    "tiny_judge",
    "tiny_diffusion_pipeline",
]

# Enough words that random captions look like captions and near-duplicates are rare.
TINY_WORDS = """a an the one two three red blue green yellow black white brown pink orange purple gray silver gold
wooden metal glass striped dotted small large tall short old new shiny dark bright dog cat bird horse cow sheep car
bus bike truck boat plane chair table sofa lamp bed shelf cup bowl plate bottle vase apple banana bread cake pizza
dress shirt jacket hat shoe bag scarf skirt coat watch phone laptop camera guitar piano drum ball kite tree flower
grass rock river lake sea beach mountain road street house tower bridge window door wall floor sky cloud sun moon
man woman child girl boy person on in under near beside behind with and of at sitting standing running holding
wearing left right top bottom front back snowy rainy sunny night morning evening make change add remove turn
replace move put it them into instead more fewer same scene photo image yes no Yes No""".split()

_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    " </s> {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


def _seeded(build: Callable[[], Any]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def word_tokenizer(extra_tokens: tuple[str, ...] = ()):
    """A whitespace word-level tokenizer over :data:`TINY_WORDS` with a simple chat template.

    ``extra_tokens`` become single tokens (the JSON pieces of a group, ``<image>``), so that decoding
    reproduces them exactly.
    """
    # tokenizers / transformers: heavy, imported only when a tiny model is built
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast  # heavy, as above

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", ":"])}
    for word in TINY_WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=2048,
    )
    tok.add_tokens(list(extra_tokens))
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def clip_tokenizer(max_length: int = 77):
    """A character-level ``CLIPTokenizer`` (BPE without merges) built from an in-code vocabulary."""
    # transformers: heavy, imported only when a tiny model is built
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,'!?-:;()":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_causal_lm(extra_tokens: tuple[str, ...] = ()):
    """A 2-layer Qwen2 causal LM and its word tokenizer: ``(model, tokenizer)``."""
    # transformers: heavy, imported only when a tiny model is built
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = word_tokenizer(extra_tokens)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    return _seeded(lambda: Qwen2ForCausalLM(config).eval()), tok


def _tiny_clip_text_config(tok) -> dict:
    return {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": tok.model_max_length,
        "projection_dim": 32,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


def tiny_clip():
    """A tiny ``CLIPModel`` (32 px images) and its ``CLIPProcessor``: ``(model, processor)``."""
    # transformers: heavy, imported only when a tiny model is built
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = clip_tokenizer(max_length=128)
    config = CLIPConfig(
        text_config=_tiny_clip_text_config(tok),
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
        },
        projection_dim=32,
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _seeded(lambda: CLIPModel(config).eval()), CLIPProcessor(image_processor=images, tokenizer=tok)


def tiny_judge():
    """A tiny LLaVA (CLIP vision tower + Llama) and its ``LlavaProcessor``: ``(model, processor)``.

    Loaded back from a folder it is an ``AutoModelForImageTextToText`` like any real judge.
    """
    # transformers: heavy, imported only when a tiny model is built
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=4,
        chat_template=_CHAT_TEMPLATE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            image_size=16,
            patch_size=4,
        ),
        text_config=LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=2,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return _seeded(lambda: LlavaForConditionalGeneration(config).eval()), processor


def tiny_diffusion_pipeline():
    """A tiny ``StableDiffusionPipeline`` (UNet + VAE + CLIP text encoder + character tokenizer + DDIM)."""
    # diffusers: heavy optional dependency (the render stage), imported only when the tiny pipeline is built
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel  # heavy, as above

    tok = clip_tokenizer(max_length=256)  # character-level: a grid prompt is a few hundred characters

    def build():
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=4,
            attention_head_dim=4,
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 16),
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4,
        )
        text = CLIPTextModel(CLIPTextConfig(**_tiny_clip_text_config(tok))).eval()
        return unet, vae, text

    unet, vae, text = _seeded(build)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
