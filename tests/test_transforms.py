"""Image transform and vicuna_v1 prompt: parity with original LLaVA-1.5 / llava-hf.

Image reference: transformers' PIL-based CLIP processor. In transformers 5.x
``CLIPImageProcessor`` is the torchvision ("fast") backend and the PIL path is
``CLIPImageProcessorPil``; in 4.x the PIL path is ``CLIPImageProcessor`` itself. LLaVA-1.5 and
POVID were trained with the PIL path. Our transform matches it bit for bit (``torch.equal``);
the torchvision backend differs by about one uint8 level after normalization (~0.015, more on
a few pixels), so it is not a valid reference.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from povid_data.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VICUNA_V1_SYSTEM,
    LlavaImageTransform,
    build_vicuna_prompt,
    load_image,
)

SIZES = [  # (width, height): COCO-like, wide, tall, odd, tiny, square, almost square
    (640, 480),
    (480, 640),
    (999, 333),
    (333, 999),
    (337, 335),
    (7, 3),
    (3, 7),
    (1, 1),
    (336, 336),
]


def clip_pil_processor(size: int):
    """transformers' PIL-path CLIP processor configured like openai/clip-vit-large-patch14-336."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def expand2square(image: PIL.Image.Image, background: tuple[int, ...]) -> PIL.Image.Image:
    """LLaVA's definition: paste the image centred on a square of the background colour."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        square = PIL.Image.new(image.mode, (width, width), background)
        square.paste(image, (0, (width - height) // 2))
    else:
        square = PIL.Image.new(image.mode, (height, height), background)
        square.paste(image, ((height - width) // 2, 0))
    return square


def random_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed + 1000 * width + height)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference(image: PIL.Image.Image, mode: str, size: int) -> torch.Tensor:
    if mode == "pad":
        image = expand2square(image, tuple(int(m * 255) for m in OPENAI_CLIP_MEAN))
    return clip_pil_processor(size)(image, return_tensors="pt")["pixel_values"][0]


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("width,height", SIZES)
def test_image_matches_clip_processor_exactly(mode, width, height):
    image = random_image(width, height)
    ours = LlavaImageTransform(mode=mode, size=336)(image)
    ref = reference(image, mode, 336)
    assert ours.dtype == torch.float32 and ours.shape == (3, 336, 336)
    assert torch.equal(ours, ref), f"max abs diff {(ours - ref).abs().max().item():.3g}"


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_image_other_size(mode):
    """Rounding of the resized long edge and of the crop offset at another resolution."""
    for width, height in [(333, 999), (640, 427), (101, 50)]:
        image = random_image(width, height, seed=1)
        assert torch.equal(LlavaImageTransform(mode, size=224)(image), reference(image, mode, 224))


def test_pad_colour_and_centering():
    """A white wide image: the bands above and below are the CLIP mean colour (122, 116, 104)."""
    transform = LlavaImageTransform("pad", size=30)
    assert transform.fill == (122, 116, 104)
    out = transform(PIL.Image.new("RGB", (30, 10), (255, 255, 255)))
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1)
    fill = (torch.tensor([122, 116, 104]).view(3, 1) / 255 - mean) / std
    white = (1 - mean) / std
    assert torch.allclose(out[:, 0, :], fill.expand(3, 30), atol=1e-6)
    assert torch.allclose(out[:, -1, :], fill.expand(3, 30), atol=1e-6)
    assert torch.allclose(out[:, 15, :], white.expand(3, 30), atol=1e-6)
    # crop mode keeps only the centre of the white image
    cropped = LlavaImageTransform("crop", size=30)(PIL.Image.new("RGB", (30, 10), "white"))
    assert torch.allclose(cropped, white.view(3, 1, 1).expand(3, 30, 30), atol=1e-6)


def test_non_rgb_input_is_converted():
    grey = PIL.Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8), mode="L")
    out = LlavaImageTransform("pad", size=16)(grey)
    assert out.shape == (3, 16, 16)
    assert torch.equal(out, LlavaImageTransform("pad", size=16)(grey.convert("RGB")))


def test_bad_mode_and_input():
    with pytest.raises(ValueError, match="mode"):
        LlavaImageTransform(mode="resize")
    with pytest.raises(TypeError, match="PIL"):
        LlavaImageTransform()(torch.zeros(3, 8, 8))


def test_load_image_ok(tmp_path):
    path = tmp_path / "rgba.png"
    PIL.Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 4)
    assert image.getpixel((0, 0)) == (10, 20, 30)  # alpha dropped, as LLaVA's convert("RGB")


def test_load_image_missing_names_path(tmp_path):
    path = tmp_path / "coco" / "missing.jpg"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(path)


def test_load_image_corrupt_names_path(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ValueError, match="garbage.jpg"):
        load_image(garbage)

    truncated = tmp_path / "truncated.jpg"
    random_image(64, 48).save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated.jpg"):
        load_image(truncated)


# ----------------------------------------------------------------------------- prompt


def test_vicuna_prompt_single_turn():
    messages = [
        {"from": "human", "value": "<image>\nDescribe this image."},
        {"from": "gpt", "value": "A cat."},
    ]
    assert build_vicuna_prompt(messages) == (
        f"{VICUNA_V1_SYSTEM} USER: <image>\nDescribe this image. ASSISTANT: A cat.</s>"
    )
    assert build_vicuna_prompt(messages[:1], add_generation_prompt=True) == (
        f"{VICUNA_V1_SYSTEM} USER: <image>\nDescribe this image. ASSISTANT:"
    )


def test_vicuna_prompt_multi_turn_and_roles():
    messages = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "Color?"},
    ]
    assert build_vicuna_prompt(messages, add_generation_prompt=True) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
        "What is it? ASSISTANT: A dog.</s>USER: Color? ASSISTANT:"
    )
