"""summary.png: drawn from the recipes' own output files, with the images whose captions differ."""

import json

from PIL import Image

from povid.metrics.report import RESULTS_FORMAT
from povid_demo.figure import caption_words, draw_summary


def _chair(path, captions):
    details = [
        {"image_id": i, "caption": text, "hallucinated": [[w, w] for w in bad], "ground_truth": ["pizza"]}
        for i, (text, bad) in enumerate(captions)
    ]
    path.write_text(json.dumps({"format": RESULTS_FORMAT, "benchmark": "chair", "metrics": {}, "details": details}))
    return path


def test_summary_figure_shows_curves_numbers_and_differing_images(tmp_path):
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    (tmp_path / "ann.json").write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.png"} for i in range(3)]}))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"loss": 3.0 / (s + 1)}) + "\n" for s in range(50)) + '{"loss": ')
    base = _chair(tmp_path / "base.json", [("A pizza and a donut.", ["donut"]), ("A pizza.", []), ("A pizza.", [])])
    tuned = _chair(tmp_path / "povid.json", [("A pizza.", []), ("A pizza.", []), ("Two pizzas.", [])])
    row = {"name": "base", "chair_s": 10.0, "chair_i": 5.0, "recall": 90.0, "companion": 3.0, "pope_f1": 88.0}
    out = draw_summary(
        tmp_path / "fig" / "summary.png", sft_metrics=tmp_path / "sft.jsonl", dpo_metrics=tmp_path / "missing.jsonl",
        base_chair=base, povid_chair=tuned, image_dir=tmp_path, annotations_file=tmp_path / "ann.json",
        rows=[row, {**row, "name": "povid"}],
    )  # fmt: skip
    figure = Image.open(out)
    # Two differing images (0 and 2) each get a row; a figure with none is shorter.
    assert figure.width == 1400 and figure.height == int(100 * (4.2 + 1.45 * 2))
    same = _chair(tmp_path / "same.json", [("A pizza and a donut.", ["donut"]), ("A pizza.", []), ("A pizza.", [])])
    short = draw_summary(
        tmp_path / "short.png", sft_metrics=tmp_path / "sft.jsonl", dpo_metrics=tmp_path / "missing.jsonl",
        base_chair=base, povid_chair=same, image_dir=tmp_path, annotations_file=tmp_path / "ann.json", rows=[row],
    )  # fmt: skip
    assert Image.open(short).height < figure.height


def test_hallucinated_object_words_are_red():
    words = caption_words("A pizza and two donuts.", {"donut"})
    assert [c for _, c in words] == ["black", "black", "black", "black", "#d62728"]
