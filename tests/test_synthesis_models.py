"""Real checkpoints load by name through ``from_pretrained``: exercised with tiny models saved to local folders."""

from __future__ import annotations

import pytest
import torch

from coalign.synthesis import ModelSpec, _tiny, models

CPU = torch.device("cpu")


def test_model_spec_needs_a_name_or_tiny():
    with pytest.raises(ValueError, match="needs a `name`"):
        ModelSpec()
    assert ModelSpec(tiny=True).describe() == "tiny random model (test)"


def test_causal_lm_loads_from_a_saved_folder(tmp_path):
    model, tok = _tiny.tiny_causal_lm()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = models.load_causal_lm(ModelSpec(name=str(tmp_path)), CPU)
    assert type(loaded) is type(model) and tok2.chat_template == tok.chat_template
    for p, q in zip(model.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(p, q)


def test_clip_loads_from_a_saved_folder(tmp_path):
    model, processor = _tiny.tiny_clip()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc2 = models.load_clip(ModelSpec(name=str(tmp_path)), CPU)
    assert torch.equal(loaded.text_projection.weight, model.text_projection.weight)
    assert proc2(text=["a red car"])["input_ids"] == processor(text=["a red car"])["input_ids"]


def test_judge_loads_from_a_saved_folder_as_image_text_to_text(tmp_path):
    from transformers import AutoModelForImageTextToText

    model, processor = _tiny.tiny_judge()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc2 = models.load_judge(ModelSpec(name=str(tmp_path)), CPU)
    assert isinstance(loaded, type(model)) and proc2.chat_template
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is type(model)


def test_diffusion_pipeline_loads_from_a_saved_folder(tmp_path):
    pytest.importorskip("diffusers")
    pipe = _tiny.tiny_diffusion_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = models.load_diffusion_pipeline(ModelSpec(name=str(tmp_path)), CPU)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_auto_dtype_is_bf16_on_gpus_and_fp32_on_cpus():
    spec = ModelSpec(tiny=True)
    assert models.resolve_dtype(spec, CPU) == torch.float32
    assert models.resolve_dtype(spec, torch.device("cuda")) == torch.bfloat16
    assert models.resolve_dtype(ModelSpec(tiny=True, dtype="float16"), CPU) == torch.float16
