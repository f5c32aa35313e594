"""povid_audit: per-pair log-probs against an independent forward, the null images, the summary
math, resume, bad input, agreement with povid_dpo's scoring, and `tune run`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import povid_audit
import povid_dpo
from povid.audit import (
    CLIP_MEAN_RGB,
    edit_kinds,
    headline,
    image_derangement,
    image_share,
    markdown,
    summarize,
)
from povid.checkpoint import load_llava
from povid_data.tokenizer import LlavaTokenizer
from povid_data.transforms import LlavaImageTransform, LlavaMessageTransform, load_image

ANSWER_FIELDS = {"chosen": "conversations", "rejected": "rejected_conversations", "noise": "noise_conversations"}


def _audit(ckpt, data, out, *overrides):
    povid_audit.main(
        ["--config", "povid_audit", f"checkpoint_dir={ckpt}", f"data_file={data}", f"output_dir={out}",
         "max_seq_len=512", *overrides]
    )  # fmt: skip
    rows = [json.loads(line) for line in (Path(out) / "audit.jsonl").read_text().splitlines()]
    return rows, json.loads((Path(out) / "audit.json").read_text())


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def kinds_data(tmp_path_factory, preference_data):
    """The shared preference file with stage-1 kinds in povid_meta, as povid_hallucinate writes."""
    records = _records(preference_data)
    cycle = [["object_addition"], ["attribute", "count"], None]
    for i, record in enumerate(records):
        if cycle[i % 3] is not None:
            record["povid_meta"] = {"stage1": {"backend": "rules", "kinds": cycle[i % 3]}}
    path = preference_data.parent / "preferences_kinds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _independent_logp(model, messages, transform, conversation, image):
    """Summed log-prob of the last answer and </s>: one full forward, log_softmax over all
    logits, gather the next tokens where the label is not masked."""
    tokens, labels = messages.tokenize(conversation)
    tokens, labels = torch.tensor([tokens]), torch.tensor(labels)
    with torch.no_grad():
        logits = model(tokens, encoder_input={"image": {"images": transform(image)[None]}})[0]
    logp = logits.float().log_softmax(-1)[:-1].gather(-1, labels[1:, None].clamp(min=0)).squeeze(-1)
    return float(logp[labels[1:] != -100].sum())


@pytest.mark.parametrize("null_image", ["blank", "other"])
def test_rows_equal_an_independent_forward_with_the_true_and_the_null_image(
    tmp_path, tiny_checkpoint, preference_data, null_image
):
    rows, summary = _audit(tiny_checkpoint, preference_data, tmp_path, "batch_size=3", f"null_image={null_image}")
    records = _records(preference_data)
    assert [r["id"] for r in rows] == [r["id"] for r in records]

    model = load_llava(tiny_checkpoint)
    tokenizer = LlavaTokenizer.from_dir(tiny_checkpoint)
    args = model.llava_args
    messages = LlavaMessageTransform(tokenizer, args.image_token_id, args.num_image_tokens, max_seq_len=512)
    transform = LlavaImageTransform("pad", size=args.image_size)
    partner = image_derangement([r["image"] for r in records], seed=0)
    moved = 0
    for record, row in zip(records, rows):
        image = load_image(preference_data.parent / record["image"])
        if null_image == "blank":
            null = Image.new("RGB", image.size, (122, 116, 104))
        else:
            assert partner[record["image"]] != record["image"]
            null = load_image(preference_data.parent / partner[record["image"]])
        for kind, field in ANSWER_FIELDS.items():
            if field not in record:
                assert f"{kind}_image" not in row
                continue
            expected_image = _independent_logp(model, messages, transform, record[field], image)
            expected_null = _independent_logp(model, messages, transform, record[field], null)
            # float32 sums of ~20 terms near -80, batched and padded vs one row: 1e-5 + 1e-6 rel.
            assert row[f"{kind}_image"] == pytest.approx(expected_image, abs=1e-5, rel=1e-6)
            assert row[f"{kind}_null"] == pytest.approx(expected_null, abs=1e-5, rel=1e-6)
            # The null image is really what was fed: the model's numbers move with it (the
            # fixture's images repeat every 8 files, so another file may hold the same pixels).
            if null.tobytes() != image.tobytes():
                moved += 1
                assert abs(row[f"{kind}_null"] - row[f"{kind}_image"]) > 1e-4
    assert moved >= 24
    assert summary["pairs"] == 16 and summary["null_image"] == null_image
    assert summary["answers"]["rejected"]["all"]["pairs"] == 16
    assert summary["answers"]["noise"]["all"]["pairs"] == 8  # noise answers on every other record
    assert (tmp_path / "audit.md").read_text().startswith("Pair audit: 16 pairs")


def test_blank_image_is_the_clip_mean_colour():
    assert CLIP_MEAN_RGB == (122, 116, 104)


def test_derangement_is_a_deterministic_cycle_without_fixed_points():
    images = [f"{i}.png" for i in range(7)] + ["0.png"]  # a shared image keeps one partner
    mapping = image_derangement(images, seed=3)
    assert mapping == image_derangement(images, seed=3)
    assert sorted(mapping) == sorted(mapping.values()) == sorted(set(images))
    assert all(k != v for k, v in mapping.items())
    seen, current = set(), "0.png"
    while current not in seen:  # one cycle through all seven images
        seen.add(current)
        current = mapping[current]
    assert len(seen) == 7
    with pytest.raises(ValueError, match="two distinct images"):
        image_derangement(["a.png", "a.png"], seed=0)


def _row(rid, kinds, chosen, rejected, noise=None):
    row = {"id": rid, "kinds": kinds, "chosen_image": chosen[0], "chosen_null": chosen[1],
           "rejected_image": rejected[0], "rejected_null": rejected[1]}  # fmt: skip
    if noise is not None:
        row.update(noise_image=noise[0], noise_null=noise[1])
    return row


def test_summary_math_by_hand():
    rows = [
        # margins (image, null) against rejected: (8, 2), (4, -2), (-3, -1), (6, 6)
        _row("a", ["object_addition"], (-10, -12), (-18, -14), noise=(-11, -13)),
        _row("b", ["object_addition", "attribute"], (-5, -9), (-9, -7)),
        _row("c", ["attribute"], (-7, -8), (-4, -7), noise=(-9, -9)),
        _row("d", [], (-2, -3), (-8, -9)),
    ]
    summary = summarize(rows, null_image="blank")
    rejected = summary["answers"]["rejected"]
    everything = rejected["all"]
    assert everything["pairs"] == 4
    assert everything["accuracy_image"] == pytest.approx(3 / 4)  # 8, 4, 6 > 0
    assert everything["accuracy_null"] == pytest.approx(2 / 4)  # 2, 6 > 0
    assert everything["margin_image"] == pytest.approx(15 / 4)
    assert everything["margin_null"] == pytest.approx(5 / 4)
    assert everything["margin_from_image"] == pytest.approx(2.5)
    assert everything["image_share"] == pytest.approx(1 - 5 / 15)
    assert everything["logp"]["chosen"] == pytest.approx({"image": -6.0, "null": -8.0})
    assert everything["logp"]["rejected"] == pytest.approx({"image": -39 / 4, "null": -37 / 4})
    # Grouping by edit kind: b counts for both of its kinds; d (no kinds) only in "all".
    assert set(rejected) == {"all", "attribute", "object_addition"}
    addition = rejected["object_addition"]  # a, b: margins (8, 2), (4, -2)
    assert addition["pairs"] == 2
    assert addition["accuracy_image"] == 1.0 and addition["accuracy_null"] == 0.5
    assert addition["image_share"] == pytest.approx(1 - 0 / 6)
    attribute = rejected["attribute"]  # b, c: margins (4, -2), (-3, -1): mean (0.5, -1.5)
    assert attribute["image_share"] == pytest.approx(4.0)
    assert "above 1" in attribute["image_share_note"]
    # Noise only where a row has it: a (1, 1), c (2, 1).
    noise = summary["answers"]["noise"]
    assert noise["all"]["pairs"] == 2
    assert noise["all"]["margin_image"] == pytest.approx(1.5) and noise["all"]["margin_null"] == pytest.approx(1.0)
    assert noise["all"]["image_share"] == pytest.approx(1 / 3)
    table = markdown(summary)
    assert "| rejected | all | 4 | 75.0 % | 50.0 % | 3.75 | 1.25 | 66.7 % |" in table
    assert "above 1" in table
    assert "75.0 % of 4 pairs" in headline(summary)


def test_image_share_sign_and_zero_cases():
    assert image_share(10.0, 10.0) == (0.0, "")
    assert image_share(10.0, 0.0) == (1.0, "")
    share, note = image_share(10.0, 15.0)
    assert share == pytest.approx(-0.5) and "below 0" in note
    for margin_image in (0.0, -2.0):
        share, note = image_share(margin_image, 1.0)
        assert share is None and "not preferred" in note
    assert image_share(float("nan"), 1.0)[0] is None


def test_edit_kinds_from_stage1_meta():
    assert edit_kinds({"povid_meta": {"stage1": {"kinds": ["count", "attribute", "count"]}}}) == ["count", "attribute"]
    assert edit_kinds({"povid_meta": {"stage1": {"kinds": None}}}) == []
    assert edit_kinds({}) == []


def test_resume_after_max_records_gives_the_fresh_summary(tmp_path, tiny_checkpoint, kinds_data):
    _, fresh = _audit(tiny_checkpoint, kinds_data, tmp_path / "fresh", "batch_size=4")
    part_rows, part = _audit(tiny_checkpoint, kinds_data, tmp_path / "resumed", "batch_size=4", "max_records=5")
    assert len(part_rows) == 5 and part["pairs"] == 5
    rows, resumed = _audit(tiny_checkpoint, kinds_data, tmp_path / "resumed", "batch_size=4")
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 16
    assert json.dumps(resumed, sort_keys=True) == json.dumps(fresh, sort_keys=True)
    assert set(fresh["answers"]["rejected"]) == {"all", "object_addition", "attribute", "count"}
    assert fresh["answers"]["rejected"]["object_addition"]["pairs"] == 6  # records 0, 3, ..., 15


def test_resume_after_a_crash_and_refusal_of_other_settings(tmp_path, tiny_checkpoint, preference_data, monkeypatch):
    original = povid_audit.AuditRecipe.score
    calls = {"n": 0}

    def crash_on_third_batch(self, *batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *batch)

    monkeypatch.setattr(povid_audit.AuditRecipe, "score", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _audit(tiny_checkpoint, preference_data, tmp_path, "batch_size=4")
    monkeypatch.setattr(povid_audit.AuditRecipe, "score", original)
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 8
    rows, summary = _audit(tiny_checkpoint, preference_data, tmp_path, "batch_size=4")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(16)] and summary["pairs"] == 16
    with pytest.raises(ValueError, match="other settings.*null_image"):
        _audit(tiny_checkpoint, preference_data, tmp_path, "null_image=other")


def test_bad_records_name_file_record_and_field(tmp_path, tiny_checkpoint, preference_data):
    records = _records(preference_data)
    records[2].pop("image")  # its <image> markers are now one too many
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"bad\.jsonl: record id='r2': field 'conversations' has 1 <image>"):
        _audit(tiny_checkpoint, data, tmp_path / "out", f"image_dir={preference_data.parent}")
    for field in ANSWER_FIELDS.values():  # a consistent text-only record: no image to compare
        for turn in records[2].get(field) or []:
            turn["value"] = turn["value"].replace("<image>\n", "")
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"bad\.jsonl: record id='r2': field 'image' is missing"):
        _audit(tiny_checkpoint, data, tmp_path / "out", f"image_dir={preference_data.parent}")
    records = _records(preference_data)
    records[5]["image"] = "missing.png"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(FileNotFoundError, match=r"bad\.jsonl: record id='r5': field 'image'.*missing\.png"):
        _audit(tiny_checkpoint, data, tmp_path / "out", f"image_dir={preference_data.parent}")
    records = _records(preference_data)
    del records[7]["rejected_conversations"]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"bad\.jsonl: record id='r7': field 'rejected_conversations'"):
        _audit(tiny_checkpoint, data, tmp_path / "out", f"image_dir={preference_data.parent}")
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        _audit(tiny_checkpoint, tmp_path / "nothing.jsonl", tmp_path / "out")
    with pytest.raises(ValueError, match="null_image must be"):
        _audit(tiny_checkpoint, preference_data, tmp_path / "out", "null_image=black")
    with pytest.raises(ValueError, match="noise.overflow must be"):
        _audit(tiny_checkpoint, preference_data, tmp_path / "out", "noise.source=online", "noise.overflow=bend")


@pytest.mark.parametrize("noise_source", ["dataset", "online"])
def test_image_values_are_what_povid_dpo_scores_at_its_first_step(
    tmp_path, tiny_checkpoint, preference_data, noise_source
):
    """povid_dpo's first-step metrics average the policy's log-probs before any update: with
    the whole file in one batch they are the means of the audit's true-image values (online
    noise: epoch 0's noise, same seed)."""
    rows, _ = _audit(tiny_checkpoint, preference_data, tmp_path / "audit", f"noise.source={noise_source}", "seed=3")
    povid_dpo.main(
        ["--config", "povid_tiny_full", f"checkpoint_dir={tiny_checkpoint}", f"data_file={preference_data}",
         f"output_dir={tmp_path / 'dpo'}", "batch_size=16", "max_steps=1", "seed=3", "save_merged=false",
         f"noise.source={noise_source}"]
    )  # fmt: skip
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    for kind in ("chosen", "rejected", "noise"):
        values = [r[f"{kind}_image"] for r in rows if f"{kind}_image" in r]
        assert len(values) == (8 if kind == "noise" and noise_source == "dataset" else 16)
        assert first[f"logps/{kind}"] == pytest.approx(sum(values) / len(values), abs=1e-4)
    if noise_source == "online":
        assert all(isinstance(r["noise_answer"], str) for r in rows)


@pytest.mark.slow
def test_tune_run_prints_the_table(tmp_path, tiny_checkpoint, kinds_data):
    tune = Path(sys.executable).with_name("tune")
    result = subprocess.run(
        [str(tune), "run", "povid_audit", "--config", "povid_audit", f"checkpoint_dir={tiny_checkpoint}",
         f"data_file={kinds_data}", f"output_dir={tmp_path / 'out'}", "max_records=6", "batch_size=4",
         "max_seq_len=512"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Pair audit: 6 pairs; null image: blank" in result.stdout
    assert "| rejected | object_addition | 2 |" in result.stdout
    assert result.stdout.strip() == (tmp_path / "out" / "audit.md").read_text().strip()


def test_config_has_the_documented_overrides():
    from omegaconf import OmegaConf

    from povid.config import RECIPES, resolve_config

    assert RECIPES["povid_audit"] == ["povid_audit"]
    cfg = OmegaConf.load(resolve_config("povid_audit"))
    keys = {"checkpoint_dir", "clip_dir", "data_file", "image_dir", "output_dir", "batch_size", "device", "dtype",
            "image_mode", "max_seq_len", "null_image", "noise", "seed", "max_records"}  # fmt: skip
    assert keys <= set(cfg), keys - set(cfg)
    assert cfg.null_image == "blank" and cfg.noise.source == "dataset"
