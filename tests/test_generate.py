"""Generation: token parity with transformers, and the povid_generate recipe end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import povid_generate
from povid.checkpoint import load_llava
from povid.generation import SamplingParams, generate, sample_next_token
from povid_data.tokenizer import LlavaTokenizer
from povid_data.transforms import LlavaImageTransform, LlavaMessageTransform, load_image

QUESTIONS = ["Describe this image in detail.", "What colour is the circle?", "Is there a dog?"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model = load_llava(tiny_checkpoint)
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    args = model.llava_args
    messages = LlavaMessageTransform(
        LlavaTokenizer.from_dir(tiny_checkpoint), args.image_token_id, args.num_image_tokens, 512
    )
    return model, hf, messages, LlavaImageTransform("pad", size=args.image_size)


def _inputs(tiny, image_files):
    _, _, messages, images = tiny
    prompts = [messages.generation_prompt(q) for q in QUESTIONS]
    pixels = torch.stack([images(load_image(p)) for p in image_files])
    return prompts, pixels


def test_saved_checkpoint_reproduces_logits_in_transformers(tiny, image_files):
    model, hf, _, _ = tiny
    prompts, pixels = _inputs(tiny, image_files)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        ours = model(ids, encoder_input={"image": {"images": pixels[:1]}})
        theirs = hf(input_ids=ids, pixel_values=pixels[:1]).logits
    assert (ours - theirs).abs().max() < 1e-5


def test_greedy_batched_generation_is_token_identical_to_transformers(tiny, image_files):
    model, hf, messages, _ = tiny
    prompts, pixels = _inputs(tiny, image_files)
    image_id = model.llava_args.image_token_id
    ours = generate(
        model, prompts, pixels, params=SamplingParams(max_new_tokens=16), eos_id=2,
        image_token_id=image_id,
    )  # fmt: skip
    for prompt, pixel, our_ids in zip(prompts, pixels, ours):
        out = hf.generate(
            input_ids=torch.tensor([prompt]), pixel_values=pixel[None], max_new_tokens=16,
            do_sample=False, eos_token_id=2, pad_token_id=0, suppress_tokens=[image_id],
        )  # fmt: skip
        theirs = out[0, len(prompt) :].tolist()
        assert our_ids == [t for t in theirs if t != 2][: len(our_ids)]
        assert len(our_ids) == len(theirs) - (theirs[-1] == 2)


def test_sampling_respects_top_k_and_top_p_and_seed():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = sample_next_token(logits, SamplingParams(temperature=1.0, top_k=2), gen)
    assert set(top2.tolist()) <= {0, 1} and len(set(top2.tolist())) == 2
    nucleus = sample_next_token(logits, SamplingParams(temperature=1.0, top_p=0.5), gen)
    assert set(nucleus.tolist()) == {0}  # token 0 alone holds > 50 % of the mass
    a = sample_next_token(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(3))
    b = sample_next_token(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def _write_records(path: Path, image_files, n=5):
    records = [
        {"id": f"r{i}", "image": image_files[i % len(image_files)].name, "prompt": QUESTIONS[i % 3]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _run(*overrides):
    return povid_generate.main(["--config", "llava_generate", *overrides])


def test_recipe_writes_every_record_and_resumes(tmp_path, tiny_checkpoint, image_files):
    data = tmp_path / "records.jsonl"
    records = _write_records(data, image_files)
    common = [
        f"checkpoint_dir={tiny_checkpoint}", f"data_file={data}", f"image_dir={image_files[0].parent}",
        f"output_dir={tmp_path}", "max_new_tokens=8", "batch_size=2",
    ]  # fmt: skip
    _run(*common)
    out = tmp_path / "generations.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert all(set(r) == {"id", "image", "prompt", "response"} for r in rows)

    # A crash mid-write: two complete lines and half a third. The rerun must finish exactly the
    # rest, and greedy answers must equal the uninterrupted run's.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    _run(*common)
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert resumed == rows


def test_single_image_prints_answer(tmp_path, tiny_checkpoint, image_files, capsys):
    _run(f"checkpoint_dir={tiny_checkpoint}", f"image={image_files[0]}", "max_new_tokens=6",
         f"output_dir={tmp_path}")  # fmt: skip
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed and printed[-1]


def test_int8_weight_only_quantization_runs(tmp_path, tiny_checkpoint, image_files, capsys):
    _run(f"checkpoint_dir={tiny_checkpoint}", f"image={image_files[0]}", "max_new_tokens=4",
         "quantization=int8", f"output_dir={tmp_path}")  # fmt: skip
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize(
    "problem, match",
    [
        ("missing_image", r"record id='r0': field 'image': Image file not found: .*nope\.png"),
        ("corrupt_image", r"record id='r0': field 'image': Cannot read image file .*bad\.png"),
        ("two_images", r"record id='r0'.*2 <image> marker"),
        ("too_long", r"record id=.r0.\] \d+ tokens .*exceed max_seq_len"),
        ("no_id", r"record id='\?': field 'id' is missing"),
    ],
)
def test_bad_records_fail_with_file_record_and_field(tmp_path, tiny_checkpoint, image_files, problem, match):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    record = {"id": "r0", "image": str(image_files[0]), "prompt": "Describe."}
    if problem == "missing_image":
        record["image"] = "nope.png"
    elif problem == "corrupt_image":
        record["image"] = "bad.png"
    elif problem == "two_images":
        record["prompt"] = "Compare with <image> please."
    elif problem == "too_long":
        record["prompt"] = "very long words " * 400
    elif problem == "no_id":
        del record["id"]
    data = tmp_path / "records.jsonl"
    data.write_text(json.dumps(record) + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        _run(f"checkpoint_dir={tiny_checkpoint}", f"data_file={data}", f"image_dir={tmp_path}",
             f"output_dir={tmp_path}", "max_new_tokens=4")  # fmt: skip


@pytest.mark.slow
def test_tune_run_from_another_directory(tmp_path, tiny_checkpoint, image_files):
    tune = Path(sys.executable).with_name("tune")
    result = subprocess.run(
        [str(tune), "run", "povid_generate", "--config", "llava_generate",
         f"checkpoint_dir={tiny_checkpoint}", f"image={image_files[1]}",
         "prompt=Describe this image in detail.", "max_new_tokens=5"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
