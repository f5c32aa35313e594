"""Stage 2: the diffusion-noise distortion (closed form, reproducibility, overflow) and the
povid_distort recipe end to end on the tiny checkpoint."""

import json
import math
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.functional as TF

import povid_distort
from povid.answering import LlavaAnswerer
from povid.generation import SamplingParams
from povid_data.distort import (
    add_noise,
    distort_image,
    distort_pixels,
    noise_coefficients,
    noise_schedule,
    noise_seed,
    pil_to_unit,
    to_uint8,
)
from povid_data.records import CHOSEN, NOISE, read_llava_records
from povid_data.transforms import load_image


def _image(w=23, h=17, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- the distortion ---------------------------------------------------------------------------


def test_coefficients_equal_the_closed_form():
    sqrt_abar, sqrt_one_minus = noise_coefficients(500)
    assert (round(sqrt_abar, 4), round(sqrt_one_minus, 4)) == (0.8630, 0.5052)
    # Recomputed without torch, straight from the formula in the design notes.
    ramp = np.linspace(-6, 6, 1000)
    betas = 1 / (1 + np.exp(-ramp)) * (5e-3 - 1e-5) + 1e-5
    abar = np.cumprod(1 - betas)[500]
    assert sqrt_abar == pytest.approx(math.sqrt(abar), abs=1e-12)
    assert sqrt_one_minus == pytest.approx(math.sqrt(1 - abar), abs=1e-12)
    assert sqrt_abar**2 + sqrt_one_minus**2 == pytest.approx(1.0)
    betas_t = noise_schedule()
    assert betas_t.shape == (1000,) and bool((betas_t.diff() > 0).all())
    assert noise_coefficients(0)[0] > noise_coefficients(999)[0]


def test_distortion_is_the_closed_form_with_the_documented_noise():
    image, rid, seed = _image(), "000000033471", 7
    x = np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 255
    # The documented noise: randn((3, H, W)) in float32 from a CPU generator seeded per record.
    eps = torch.randn((3, 17, 23), generator=torch.Generator().manual_seed(noise_seed(rid, seed)))
    expected = 0.8630171064602814 * x + 0.5051746964733322 * eps.double().numpy()

    raw = add_noise(pil_to_unit(image), 500, eps)
    assert np.abs(raw.double().numpy() - expected).max() < 1e-6

    out = np.asarray(distort_image(image, 500, seed=noise_seed(rid, seed))).transpose(2, 0, 1)
    scaled = np.clip(expected, 0, 1) * 255
    want = np.trunc(scaled).astype(np.uint8)
    # float32 vs float64 may only disagree for a value within rounding of an integer boundary.
    on_boundary = np.abs(scaled - np.round(scaled)) < 1e-3
    assert np.array_equal(out[~on_boundary], want[~on_boundary])
    assert (expected < 0).any() and (expected > 1).any()  # step 500 does leave [0, 1]


def test_same_id_and_seed_give_the_same_image_other_ids_or_seeds_do_not():
    image = _image()
    a = np.asarray(distort_image(image, seed=noise_seed("r1", 0)))
    assert np.array_equal(a, np.asarray(distort_image(image, seed=noise_seed("r1", 0))))
    assert not np.array_equal(a, np.asarray(distort_image(image, seed=noise_seed("r2", 0))))
    assert not np.array_equal(a, np.asarray(distort_image(image, seed=noise_seed("r1", 1))))
    assert noise_seed(123, 0) == noise_seed("123", 0)  # ids are keyed as text, like the output
    # hashlib, not hash(): the value is the same in every process and on every machine.
    assert noise_seed("000000033471", 0) == 0x678EE97E1F96B5D9  # SHA-256 of "0:000000033471"


def test_clamp_and_wrap_on_out_of_range_values():
    x = torch.tensor([-0.3, -0.001, 0.0, 0.5, 1.0, 1.002, 1.4])
    assert to_uint8(x, "clamp").tolist() == [0, 0, 0, 127, 255, 255, 255]
    assert to_uint8(x, "wrap").tolist() == [180, 0, 0, 127, 255, 255, 101]
    # wrap reproduces the reference's mul(255).byte() / torchvision ToPILImage on this platform.
    assert torch.equal(to_uint8(x, "wrap"), x.mul(255).byte())
    noisy = add_noise(pil_to_unit(_image()), 500, torch.randn((3, 17, 23), generator=torch.Generator().manual_seed(3)))
    pil = np.asarray(TF.to_pil_image(noisy)).transpose(2, 0, 1)
    assert np.array_equal(to_uint8(noisy, "wrap").numpy(), pil)
    # The two modes agree inside [0, 1] and differ exactly where the truncated byte leaves 0..255.
    scaled = noisy.mul(255).trunc()
    inside = (scaled >= 0) & (scaled <= 255)
    assert bool(inside[(noisy >= 0) & (noisy <= 1)].all())
    same = to_uint8(noisy, "clamp") == to_uint8(noisy, "wrap")
    assert torch.equal(same, inside) and not bool(inside.all())
    with pytest.raises(ValueError, match="overflow must be one of clamp, wrap"):
        to_uint8(x, "mirror")


def test_distort_pixels_for_online_use():
    x = pil_to_unit(_image()).unsqueeze(0).repeat(2, 1, 1, 1)  # any shape, e.g. a batch
    gen = torch.Generator().manual_seed(0)
    first, second = distort_pixels(x, 500, generator=gen), distort_pixels(x, 500, generator=gen)
    assert first.dtype == torch.uint8 and first.shape == x.shape
    assert not torch.equal(first, second)  # a running generator gives fresh noise every step
    again = distort_pixels(x, 500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match=r"noise step must be in \[0, 999\]"):
        distort_pixels(x, 1000)
    with pytest.raises(TypeError, match="float pixels"):
        distort_pixels(torch.zeros(3, 2, 2, dtype=torch.uint8))


# ---- the recipe -------------------------------------------------------------------------------


def _conv(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _write_data(tmp_path, image_files):
    """A POVID-format JSON list: ids, images in their own folder, stage-1 fields and extras."""
    images = tmp_path / "images"
    images.mkdir()
    for path in image_files:
        shutil.copy(path, images / path.name)
    names = [p.name for p in image_files]
    records = [
        {"id": "r0", "image": names[0], "conversations": _conv("<image>\nDescribe this image in detail.", "A red circle."),
         "rejected_conversations": _conv("<image>\nDescribe this image in detail.", "A red circle and a dog."),
         "povid_meta": {"stage1": {"backend": "offline"}}, "source": "coco"},
        {"id": "coco/1", "image": names[1], "conversations": _conv("What is on the left?\n<image>", "A tree.")},
        {"id": 7, "image": names[2], "conversations": _conv("<image>\nIs there a dog?", "No.") + _conv("Why?", "It is empty.")},
        {"id": "r3", "image": names[0], "conversations": _conv("<image>\nWhat colour is the car?", "Blue.")},
        {"id": "r4", "image": names[1], "conversations": _conv("<image>\nDescribe the scene.", "A cat on a chair.")},
    ]  # fmt: skip
    data = tmp_path / "stage1.json"
    data.write_text(json.dumps(records))
    return data, images, records


def _run(*overrides):
    return povid_distort.main(["--config", "povid_distort", *overrides])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_recipe_adds_noise_answers_keeps_fields_resumes_and_saves_images(tmp_path, tiny_checkpoint, image_files):
    data, images, records = _write_data(tmp_path, image_files)
    out_dir = tmp_path / "out"
    common = [
        f"checkpoint_dir={tiny_checkpoint}", f"data_file={data}", f"image_dir={images}",
        f"output_dir={out_dir}", "max_new_tokens=6", "batch_size=2", "save_images=true",
    ]  # fmt: skip
    _run(*common)
    out = out_dir / "preferences.jsonl"
    rows = _rows(out)
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for record, row in zip(records, rows):
        # Every input field survives unchanged; only noise_conversations and povid_meta.stage2 are new.
        assert {k: v for k, v in row.items() if k not in (NOISE, "povid_meta")} == {
            k: v for k, v in record.items() if k != "povid_meta"
        }
        assert row["povid_meta"]["stage2"] == {
            "checkpoint": str(tiny_checkpoint), "step": 500, "seed": 0, "overflow": "clamp",
            "image_mode": "pad", "max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "top_k": None,
        }  # fmt: skip
        noise = row[NOISE]
        assert noise[:-1] == record[CHOSEN][:-1] and noise[-1]["from"] == "gpt" and noise[-1]["value"]
    assert rows[0]["povid_meta"]["stage1"] == {"backend": "offline"}
    read_llava_records(out, require=(CHOSEN, NOISE))  # the output is a valid preference file

    # save_images: one PNG per id, exactly the documented per-id distortion of the clean image.
    for record in records:
        name = povid_distort.image_file_name(record["id"])
        saved = np.asarray(PIL.Image.open(out_dir / "distorted" / name))
        expected = distort_image(load_image(images / record["image"]), 500, seed=noise_seed(record["id"], 0))
        assert np.array_equal(saved, np.asarray(expected))
    assert povid_distort.image_file_name("coco/1").startswith("coco_1-")

    # The answers are the checkpoint's on the distorted images (same batch => same padding).
    answerer = LlavaAnswerer.from_checkpoint(tiny_checkpoint, params=SamplingParams(max_new_tokens=6))
    first = records[:2]
    distorted = [distort_image(load_image(images / r["image"]), 500, seed=noise_seed(r["id"], 0)) for r in first]
    turns = [povid_distort.prompt_turns(r) for r in first]
    assert turns[1][0]["value"] == "<image>\nWhat is on the left?"  # marker moved to the front
    assert answerer.answer(turns, distorted, ["t", "t"]) == [r[NOISE][-1]["value"] for r in rows[:2]]

    # A crash mid-write: two complete lines and half a third. The rerun finishes exactly the rest.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    _run(*common)
    assert _rows(out) == rows


def test_recipe_wrap_option_and_empty_answers(tmp_path, tiny_checkpoint, image_files, monkeypatch):
    data, images, records = _write_data(tmp_path, image_files)
    _run(f"checkpoint_dir={tiny_checkpoint}", f"data_file={data}", f"image_dir={images}",
         f"output_dir={tmp_path / 'out'}", "max_new_tokens=3", "batch_size=5", "overflow=wrap",
         "noise_step=999", "seed=5", "save_images=true")  # fmt: skip
    rows = _rows(tmp_path / "out" / "preferences.jsonl")
    assert {(r["povid_meta"]["stage2"]["overflow"], r["povid_meta"]["stage2"]["step"]) for r in rows} == {("wrap", 999)}
    saved = np.asarray(PIL.Image.open(tmp_path / "out" / "distorted" / "r0.png"))
    want = distort_image(load_image(images / records[0]["image"]), 999, seed=noise_seed("r0", 5), overflow="wrap")
    assert np.array_equal(saved, np.asarray(want))

    # An empty answer (EOS first) leaves the record without a noise branch, and says so.
    monkeypatch.setattr(LlavaAnswerer, "answer", lambda self, turns, imgs, where: [""] * len(turns))
    _run(f"checkpoint_dir={tiny_checkpoint}", f"data_file={tmp_path / 'out' / 'preferences.jsonl'}",
         f"image_dir={images}", f"output_dir={tmp_path / 'again'}", "max_new_tokens=3")  # fmt: skip
    again = _rows(tmp_path / "again" / "preferences.jsonl")
    assert all(NOISE not in r and r["povid_meta"]["stage2"]["skipped"] == "empty answer" for r in again)


@pytest.mark.parametrize(
    "problem, match",
    [
        ("missing_image", r"stage1\.json: record id='r1': field 'image': file not found: .*nope\.png"),
        ("no_image", r"stage1\.json: record id='r1': field 'image' is missing"),
        ("corrupt_image", r"stage1\.json: record id='r1': field 'image': Cannot read image file .*bad\.png"),
        ("no_answer", r"stage1\.json: record id='r1': field 'conversations'"),
        ("bad_step", r"noise step must be in \[0, 999\], got 1000"),
        ("bad_overflow", r"overflow must be one of clamp, wrap; got 'mirror'"),
    ],
)
def test_bad_input_names_file_record_and_field(tmp_path, tiny_checkpoint, image_files, problem, match):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    shutil.copy(image_files[0], tmp_path / "ok.png")
    bad = {"id": "r1", "image": "ok.png", "conversations": _conv("<image>\nDescribe.", "A circle.")}
    extra = []
    if problem == "missing_image":
        bad["image"] = "nope.png"
    elif problem == "no_image":
        del bad["image"]
    elif problem == "corrupt_image":
        bad["image"] = "bad.png"
    elif problem == "no_answer":
        bad["conversations"] = bad["conversations"][:1]
    elif problem == "bad_step":
        extra = ["noise_step=1000"]
    elif problem == "bad_overflow":
        extra = ["overflow=mirror"]
    records = [{"id": "r0", "image": "ok.png", "conversations": _conv("<image>\nDescribe.", "A circle.")}, bad]
    data = tmp_path / "stage1.json"
    data.write_text(json.dumps(records))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        _run(f"checkpoint_dir={tiny_checkpoint}", f"data_file={data}", f"output_dir={tmp_path / 'out'}",
             "max_new_tokens=3", *extra)  # fmt: skip


def test_noise_settings_derive_every_branch_once():
    from povid_data.distort import NoiseSettings, RecordNoise

    base = dict(step=500, overflow="wrap", argmax="shared", stage2_seed=7)
    online = NoiseSettings.from_config({**base, "source": "online", "condition": "clean"}, objective_uses_noise=True)
    assert online.online and not online.dataset_answers and online.reference_shares_argmax
    fresh = online.image_noise(seed=3)
    assert isinstance(fresh, RecordNoise) and fresh.per_epoch and fresh.seed == 3
    # The dpo objective has no noise term: nothing is computed online, though images are noised.
    dpo = NoiseSettings.from_config({**base, "source": "online", "condition": "clean"}, objective_uses_noise=False)
    assert not dpo.online
    noisy = NoiseSettings.from_config({**base, "source": "dataset", "condition": "noisy"}, objective_uses_noise=True)
    assert noisy.noisy_dataset_rows and noisy.dataset_answers and not noisy.online
    replay = noisy.image_noise(seed=3)
    assert not replay.per_epoch and replay.seed == 7  # povid_distort's own image, not the run's seed
    clean = NoiseSettings.from_config({**base, "source": "dataset", "condition": "clean"}, objective_uses_noise=True)
    assert clean.image_noise(seed=3) is None and not clean.noisy_dataset_rows
