"""ImageTransform against transformers' CLIP and BLIP image processors, the processor-config reader, old configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from _tiny_hf import tiny_blip2_backbone, tiny_clip_backbone, write_tiny_clip_checkpoint
from PIL import Image
from transformers import BlipImageProcessor, BlipImageProcessorPil, CLIPImageProcessor, CLIPImageProcessorPil

from coalign import CoAlign
from coalign.backbones import TinyBackbone
from coalign.transforms import ImageTransform, image_config_from_processor, target_pad

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
# openai/clip-vit-base-patch32's preprocessor_config.json (the old int-size form)
CLIP_HUB = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": MEAN,
    "image_std": STD,
    "resample": 3,
    "size": 224,
}
# a Salesforce/blip2-* preprocessor_config.json
BLIP_HUB = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": MEAN,
    "image_processor_type": "BlipImageProcessor",
    "image_std": STD,
    "processor_class": "Blip2Processor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 224, "width": 224},
}
CROP_224 = {"height": 224, "width": 224}
# (width, height): wide, tall, very tall, upsampled, odd crop offsets, already square
SIZES = [(300, 200), (97, 640), (50, 80), (227, 224), (224, 231), (224, 224)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def hf(processor, image) -> torch.Tensor:
    return processor(image, return_tensors="pt")["pixel_values"][0]


def transform_of(processor_config: dict, **kwargs) -> ImageTransform:
    return ImageTransform(**image_config_from_processor(processor_config), **kwargs)


# --- parity with transformers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "pil_processor"),
    [
        (CLIP_HUB, CLIPImageProcessorPil),
        ({**CLIP_HUB, "size": {"shortest_edge": 224}, "crop_size": CROP_224}, CLIPImageProcessorPil),
        (BLIP_HUB, BlipImageProcessorPil),
        ({**BLIP_HUB, "size": {"height": 364, "width": 364}}, BlipImageProcessorPil),
    ],
    ids=["clip", "clip-dict-size", "blip2", "blip2-364"],
)
def test_pil_images_match_the_pil_processors(config, pil_processor):
    """Exact parity: both resize in PIL (as OpenAI CLIP and LAVIS did), crop offsets round down, then normalise."""
    transform, processor = transform_of(config), pil_processor(**config)
    for i, (w, h) in enumerate(SIZES):
        for mode in ("RGB", "RGBA", "L") if i == 0 else ("RGB",):
            image = random_image(w, h, seed=i, mode=mode)
            ours, theirs = transform(image), hf(processor, image)
            assert ours.shape == theirs.shape == (3, transform.size, transform.size), (w, h, mode)
            assert (ours - theirs).abs().max() < 1e-5, (w, h, mode)


@pytest.mark.parametrize(
    ("config", "processor_cls"), [(CLIP_HUB, CLIPImageProcessor), (BLIP_HUB, BlipImageProcessor)], ids=["clip", "blip2"]
)
def test_torchvision_processors_agree_within_a_few_grey_levels(config, processor_cls):
    """transformers' default (torchvision) processors resize uint8 tensors, not PIL images: same filter, another
    rounding of the kernel. On noise images the gap is at most 2 uint8 levels and 0.01 on average, except a 97x640
    image squashed to square by BLIP's resize: 10 levels at most, 0.31 on average (measured with transformers 5.24,
    torchvision's uint8 antialiased bicubic); uint8 tensors go through the same torchvision call and match
    exactly."""
    transform, processor = transform_of(config), processor_cls(**config)
    to_levels = torch.tensor(STD)[:, None, None] * 255  # normalised difference -> uint8 steps
    for i, (w, h) in enumerate(SIZES):
        image = random_image(w, h, seed=10 + i)
        gap = (transform(image) - hf(processor, image)).abs() * to_levels
        assert gap.max() < 12 and gap.mean() < 0.5, (w, h)
        pixels = TF.pil_to_tensor(image)
        assert (transform(pixels) - hf(processor, pixels)).abs().max() < 1e-5, (w, h)


def test_smooth_images_agree_across_pil_and_tensor_resizing():
    transform = transform_of(CLIP_HUB)
    y, x = np.mgrid[0:333, 0:500]
    smooth = np.stack([x * 255 / 499, y * 255 / 332, (x + y) * 255 / 831], -1).round().astype(np.uint8)
    image = Image.fromarray(smooth)
    assert (transform(image) - transform(TF.pil_to_tensor(image))).abs().max() <= 1 / 255 / min(STD) + 1e-6


def test_target_pad_still_applies_before_the_processor_steps():
    transform = transform_of(BLIP_HUB, target_pad_ratio=1.25)
    processor = BlipImageProcessorPil(**BLIP_HUB)
    wide = random_image(300, 100, seed=3)
    torch.testing.assert_close(transform(wide), hf(processor, target_pad(wide, 1.25)), atol=1e-5, rtol=0)
    assert not torch.allclose(transform(wide), hf(processor, wide))
    # a transparent image is made RGB (on white) before the pad, so the bands stay black, as for an RGB image
    rgba = random_image(300, 100, seed=4, mode="RGBA")
    padded = transform(rgba)
    black = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)])[:, None]
    torch.testing.assert_close(padded[:, 0, :], black.expand(3, 224))
    # a near-square image is left as it is
    square = random_image(120, 110, seed=5)
    torch.testing.assert_close(transform(square), hf(processor, square), atol=1e-5, rtol=0)


def test_bilinear_and_nearest_follow_pil():
    image = random_image(150, 90, seed=7)
    for code, name in ((2, "bilinear"), (0, "nearest")):
        config = {**CLIP_HUB, "size": 64, "crop_size": 64, "resample": code}
        transform = transform_of(config)
        assert transform.resample == name
        assert (transform(image) - hf(CLIPImageProcessorPil(**config), image)).abs().max() < 1e-5


# --- old configs -------------------------------------------------------------------------------------------------
def old_transform(image, size, mean, std, pad):
    """The transform as it was before ``resample`` existed (the reference for saved configs without it)."""
    if isinstance(image, Image.Image):
        if pad is not None:
            image = target_pad(image, pad)
        tensor = TF.to_dtype(TF.to_image(image.convert("RGB")), torch.float32, scale=True)
    else:
        tensor = image if image.is_floating_point() else image.float() / 255.0
    tensor = TF.center_crop(TF.resize(tensor, size, antialias=True), [size, size])
    return TF.normalize(tensor, mean, std)


def test_a_config_saved_without_resample_behaves_as_before():
    saved = {"size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25], "target_pad_ratio": 1.25}
    transform = ImageTransform(**saved)
    assert transform.resample is None and transform.resize_mode == "shortest_edge"
    assert transform.config() == {**saved, "resample": None, "resize_mode": "shortest_edge"}
    for i, (w, h) in enumerate([(90, 40), (33, 70), (32, 32)]):
        for image in (random_image(w, h, seed=20 + i), random_image(w, h, seed=30 + i, mode="RGBA")):
            assert torch.equal(transform(image), old_transform(image, 32, saved["mean"], saved["std"], 1.25))
        pixels = TF.pil_to_tensor(random_image(w, h, seed=40 + i))
        assert torch.equal(transform(pixels), old_transform(pixels, 32, saved["mean"], saved["std"], None))
    # the tiny backbone states no resample: its models keep the old transform
    model = CoAlign(TinyBackbone(image_size=16, channels=4, stages=2, embed_dim=16, token_dim=8, text_layers=1))
    assert model.preprocess.resample is None


def test_config_round_trip_and_bad_arguments():
    transform = ImageTransform(64, MEAN, STD, 1.25, resample="bicubic", resize_mode="square")
    assert ImageTransform(**json.loads(json.dumps(transform.config()))).config() == transform.config()
    with pytest.raises(ValueError, match="resample must be one of"):
        ImageTransform(8, resample="lanczos")
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        ImageTransform(8, resize_mode="crop")
    with pytest.raises(ValueError, match="3 numbers each"):
        ImageTransform(8, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="no pixels"):
        ImageTransform(8, resample="bicubic")(torch.zeros(3, 0, 4, dtype=torch.uint8))


# --- image_config_from_processor ---------------------------------------------------------------------------------
def test_processor_configs_read_as_hand_written():
    clip = {"size": 224, "mean": MEAN, "std": STD, "resample": "bicubic", "resize_mode": "shortest_edge"}
    assert image_config_from_processor(CLIP_HUB) == clip
    assert image_config_from_processor({**BLIP_HUB, "size": {"height": 364, "width": 364}}) == {
        **clip,
        "size": 364,
        "resize_mode": "square",
    }
    # an int size without a crop is the square side (BLIP's old form); no normalisation is mean 0, std 1
    assert image_config_from_processor({"size": 96, "resample": 2, "do_normalize": False}) == {
        "size": 96,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "resample": "bilinear",
        "resize_mode": "square",
    }
    # missing entries come from the default (the backbone's own config)
    default = {"size": 32, "mean": [0.1] * 3, "std": [0.2] * 3, "resample": "bicubic", "resize_mode": "square"}
    assert image_config_from_processor({"image_mean": 0.5}, default=default) == {**default, "mean": [0.5] * 3}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"do_resize": False}, "'do_resize' is false"),
        ({"do_rescale": False}, "'do_rescale' is false"),
        ({"rescale_factor": 1.0}, "'rescale_factor' must be 1/255"),
        ({"resample": 1}, "'lanczos' is not supported"),
        ({"resample": "area"}, "'area' is not supported"),
        ({"size": {"height": 224, "width": 300}, "do_center_crop": False}, "must be square"),
        ({"crop_size": 200}, "'crop_size' 200 differs from the resized size 224"),
        ({"size": {"shortest_edge": 224}, "do_center_crop": False}, "no centre crop"),
        ({"size": "big"}, "'size' must be a positive int"),
        ({"image_mean": [0.5, 0.5]}, "'image_mean' must be 3 numbers"),
        ({"image_std": [0.5, 0.0, 0.5]}, "'image_std' must be positive"),
    ],
)
def test_unusable_processor_configs_are_named_errors(change, message):
    with pytest.raises(ValueError, match=f"^/x/preprocessor_config.json: .*{message}"):
        image_config_from_processor({**CLIP_HUB, **change}, source="/x/preprocessor_config.json")


def test_processor_config_errors_for_missing_entries_and_sizes():
    with pytest.raises(ValueError, match="has no 'resample' and there is no default"):
        image_config_from_processor({"size": 32})
    with pytest.raises(ValueError, match="expected a JSON object"):
        image_config_from_processor([1, 2])
    with pytest.raises(ValueError, match="makes 224x224 images but the vision tower takes 32x32"):
        image_config_from_processor(CLIP_HUB, expected_size=32)


# --- backbones ---------------------------------------------------------------------------------------------------
def test_backbones_state_their_processors(tmp_path):
    clip, blip2 = tiny_clip_backbone(tmp_path).image_config, tiny_blip2_backbone(tmp_path).image_config
    assert clip == {"size": 32, "mean": MEAN, "std": STD, "resample": "bicubic", "resize_mode": "shortest_edge"}
    assert blip2 == {**clip, "resize_mode": "square"}


def test_pretrained_folder_processor_config_is_read_saved_and_reloaded(tmp_path):
    folder = tmp_path / "clip"
    write_tiny_clip_checkpoint(folder)
    processor = {**CLIP_HUB, "size": {"shortest_edge": 32}, "crop_size": 32, "resample": 2, "image_mean": [0.5] * 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    backbone = tiny_clip_backbone(tmp_path, model_name=str(folder), tokenizer=None)
    backbone.load_pretrained()
    expected = {"size": 32, "mean": [0.5] * 3, "std": STD, "resample": "bilinear", "resize_mode": "shortest_edge"}
    assert backbone.image_config == expected
    model = CoAlign(backbone).eval()
    image = random_image(70, 45, seed=9)
    reference = hf(CLIPImageProcessorPil(**processor), image)
    torch.testing.assert_close(model.preprocess(image), reference, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = CoAlign.from_pretrained(tmp_path / "ckpt")
    assert loaded.backbone.image_config == expected
    assert loaded.preprocess.config() == model.preprocess.config()


def test_a_processor_config_that_does_not_fit_the_tower_is_refused(tmp_path):
    folder = tmp_path / "clip"
    write_tiny_clip_checkpoint(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_HUB))  # 224, the tiny tower takes 32
    backbone = tiny_clip_backbone(tmp_path, model_name=str(folder), tokenizer=None)
    with pytest.raises(ValueError, match="preprocessor_config.json: the processor makes 224x224 images"):
        backbone.load_pretrained()
    assert backbone.image_config["resample"] == "bicubic"  # unchanged
