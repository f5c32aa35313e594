"""povid_eval end to end on a tiny random LLaVA: generate, score, table, resume, compare."""

import json

import numpy as np
import pytest
from PIL import Image

import povid_eval
from _coco import file_name, write_coco
from povid.cli import main as povid_main
from povid.metrics.chair import evaluate_chair, find_objects
from povid.metrics.coco import AnnotationError, load_coco
from povid.metrics.pope import evaluate_pope, parse_yes_no, read_pope_questions

IMAGES = {
    11: (["person", "dog", "chair"], ["A man sits on a chair with his dog."]),
    12: (["cat", "couch", "tv"], ["A cat sleeps on a sofa in front of a television."]),
    13: (["car", "person"], ["A woman next to a car."]),
    14: (["bird"], ["A bird on a branch."]),
}


@pytest.fixture(scope="module")
def coco_dirs(tmp_path_factory):
    """A COCO layout: annotations/ (instances + captions) and val2014/ with Pillow images."""
    root = tmp_path_factory.mktemp("coco")
    write_coco(root / "annotations", IMAGES)
    (root / "val2014").mkdir()
    rng = np.random.default_rng(0)
    for image_id in IMAGES:
        pixels = rng.integers(0, 256, (24 + image_id % 3 * 8, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val2014" / file_name(image_id), format="JPEG")
    return root / "annotations", root / "val2014"


def _eval(config, *overrides):
    povid_eval.main(["--config", config, *overrides])


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def count_generated(monkeypatch):
    """Count the records the answering loop (povid.answering) generates for (to prove resumption)."""
    import povid.answering

    seen = []
    original = povid.answering.answer_requests

    def answer(answerer, batch, source):
        seen.extend(r["id"] for r in batch)
        return original(answerer, batch, source)

    monkeypatch.setattr(povid.answering, "answer_requests", answer)
    return seen


def test_chair_generates_scores_writes_table_and_resumes(tmp_path, tiny_checkpoint, coco_dirs, count_generated, capsys):
    annotations, images = coco_dirs
    out = tmp_path / "chair"
    args = [f"checkpoint_dir={tiny_checkpoint}", f"annotations_dir={annotations}", f"image_dir={images}",
            f"output_dir={out}", "num_images=3", "max_new_tokens=12", "batch_size=2"]  # fmt: skip
    _eval("eval_chair_coco", *args)
    assert "| CHAIR_S (%) |" in capsys.readouterr().out

    result = json.loads((out / "results.json").read_text())
    generations = _lines(out / "generations.jsonl")
    captions = _lines(out / "captions.jsonl")
    assert len(generations) == len(captions) == 3 and len(count_generated) == 3
    assert {c["image_id"] for c in captions} <= set(IMAGES)
    assert all(g["prompt"] == "Please describe this image in detail." for g in generations)
    assert result["benchmark"] == "chair" and result["name"] == tiny_checkpoint.name
    protocol = result["protocol"]
    assert protocol["max_new_tokens"] == 12 and protocol["decoding"] == "greedy"
    assert protocol["num_images"] == 3 and protocol["seed"] == 0 and protocol["generated"] is True
    assert "CHAIR_S (%)" in (out / "results.md").read_text()

    # The captions are noise; check the scores against an independent recomputation.
    coco = load_coco(annotations)
    rescored = evaluate_chair([(c["image_id"], c["caption"]) for c in captions], coco)["metrics"]
    assert rescored == result["metrics"]
    per_caption = result["details"]
    mentions = [find_objects(c["caption"]) for c in captions]
    assert [len(m) for m in mentions] == [len(d["mentions"]) for d in per_caption]
    hallucinated = sum(len(d["hallucinated"]) for d in per_caption)
    assert result["metrics"]["chair_i"] == pytest.approx(hallucinated / max(1, sum(map(len, mentions))))
    assert result["metrics"]["chair_s"] == pytest.approx(sum(bool(d["hallucinated"]) for d in per_caption) / 3)

    # Crash after one caption and half a line: the rerun generates exactly the other two.
    lines = (out / "generations.jsonl").read_text().splitlines(keepends=True)
    (out / "generations.jsonl").write_text(lines[0] + lines[1][:10])
    (out / "results.json").unlink()
    count_generated.clear()
    _eval("eval_chair_coco", *args)
    assert len(count_generated) == 2
    assert _lines(out / "generations.jsonl") == generations  # greedy: same captions
    assert json.loads((out / "results.json").read_text())["metrics"] == result["metrics"]

    # Nothing left to do: no model is even loaded.
    count_generated.clear()
    _eval("eval_chair_coco", *args)
    assert count_generated == []

    # Resuming with another decoding setting would mix protocols: refused.
    with pytest.raises(ValueError, match=r"generated with other settings \(max_new_tokens: 12 -> 20\)"):
        _eval("eval_chair_coco", *args, "max_new_tokens=20")


def test_pope_generates_scores_and_rescores_from_files(tmp_path, tiny_checkpoint, coco_dirs, count_generated):
    annotations, images = coco_dirs
    out = tmp_path / "pope"
    _eval("eval_pope_coco", f"checkpoint_dir={tiny_checkpoint}", f"annotations_dir={annotations}",
          f"image_dir={images}", f"output_dir={out}", "num_images=2", "objects_per_image=1",
          "max_new_tokens=4", "batch_size=4", "run_name=tiny")  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    questions = read_pope_questions(out / "pope_questions.jsonl")
    answers = _lines(out / "answers.jsonl")
    assert len(questions) == len(answers) == 3 * 2 * 2  # splits x images x (1 yes + 1 no)
    # Each distinct (image, question) is generated once, although positives repeat per split.
    assert len(count_generated) == len({(q.image, q.text) for q in questions}) < len(questions)
    assert all("\nAnswer the question using a single word or phrase." in g["prompt"]
               for g in _lines(out / "generations.jsonl"))  # fmt: skip

    assert list(result["metrics"]) == ["random", "popular", "adversarial"]
    recomputed = evaluate_pope(questions, [a["text"] for a in answers])
    assert recomputed == result["metrics"]
    for split, m in result["metrics"].items():
        split_answers = [a["text"] for a in answers if a["category"] == split]
        assert m["yes_ratio"] == pytest.approx(sum(parse_yes_no(a) == "yes" for a in split_answers) / 4)
    md = (out / "results.md").read_text()
    assert "| split |" in md and "| adversarial |" in md

    # Scoring the written files alone (no checkpoint) gives the same numbers.
    _eval("eval_pope_coco", f"questions_file={out / 'pope_questions.jsonl'}",
          f"answers_file={out / 'answers.jsonl'}", f"output_dir={tmp_path / 'rescored'}")  # fmt: skip
    rescored = json.loads((tmp_path / "rescored" / "results.json").read_text())
    assert rescored["metrics"] == result["metrics"] and rescored["protocol"]["generated"] is False


def test_score_existing_captions_and_compare_runs(tmp_path, coco_dirs, capsys):
    annotations, _ = coco_dirs
    base = tmp_path / "base.jsonl"
    base.write_text(
        json.dumps({"image_id": 11, "caption": "A man and a dog on a chair next to a cat."}) + "\n"
        + json.dumps({"image_id": 12, "caption": "A cat on a couch."}) + "\n"
    )  # fmt: skip
    tuned = tmp_path / "tuned.jsonl"
    tuned.write_text(
        json.dumps({"image_id": 11, "caption": "A man and a dog on a chair."}) + "\n"
        + json.dumps({"image_id": 12, "caption": "A cat on a couch watching tv."}) + "\n"
    )  # fmt: skip
    for name, captions in (("base", base), ("povid", tuned)):
        _eval("eval_chair_coco", f"annotations_dir={annotations}", f"captions_file={captions}",
              f"output_dir={tmp_path / name}", f"run_name={name}")  # fmt: skip
    base_result = json.loads((tmp_path / "base" / "results.json").read_text())
    # base: caption 1 hallucinates the cat (1 of 4 mentions), caption 2 is clean (2 mentions).
    assert base_result["metrics"]["chair_s"] == pytest.approx(1 / 2)
    assert base_result["metrics"]["chair_i"] == pytest.approx(1 / 6)
    capsys.readouterr()

    table_file = tmp_path / "compare.md"
    assert povid_main(["compare", str(tmp_path / "base" / "results.json"),
                       str(tmp_path / "povid" / "results.json"), "-o", str(table_file)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert printed == table_file.read_text()
    lines = printed.splitlines()
    assert lines[0] == "| metric | base | povid | Δ povid |"
    assert "| CHAIR_S (%) | 50.0 | 0.0 | -50.0 |" in lines
    assert "| CHAIR_I (%) | 16.7 | 0.0 | -16.7 |" in lines
    # Recall: ground truth {person, dog, chair} and {cat, couch, tv}; base names 3 + 2 of them,
    # tuned all 6.
    assert "| Recall (%) | 83.3 | 100.0 | +16.7 |" in lines
    assert "Protocol settings differ" not in printed


def test_chair_mode_is_configured_recorded_and_compared(tmp_path, coco_dirs, capsys):
    annotations, _ = coco_dirs
    captions = tmp_path / "caps.jsonl"
    # Image 13 shows a car and a woman. Pattern turns "bus" into "bu": reference mode counts
    # only the plural (1 mention), corrected mode both (2 mentions, both hallucinated).
    captions.write_text(json.dumps({"image_id": 13, "caption": "A woman, a car, a bus and two buses."}) + "\n")
    for mode in ("reference", "corrected"):
        overrides = [] if mode == "reference" else ["chair.mode=corrected"]  # reference is the default
        _eval("eval_chair_coco", f"annotations_dir={annotations}", f"captions_file={captions}",
              f"output_dir={tmp_path / mode}", f"run_name={mode}", *overrides)  # fmt: skip
    results = {m: json.loads((tmp_path / m / "results.json").read_text()) for m in ("reference", "corrected")}
    assert results["reference"]["protocol"]["chair_mode"] == "reference"
    assert results["corrected"]["protocol"]["chair_mode"] == "corrected"
    assert results["reference"]["protocol"]["protocol_name"] == "pinned-500"
    assert (results["reference"]["metrics"]["num_mentions"], results["reference"]["metrics"]["num_hallucinated_mentions"]) == (3, 1)
    assert (results["corrected"]["metrics"]["num_mentions"], results["corrected"]["metrics"]["num_hallucinated_mentions"]) == (4, 2)
    capsys.readouterr()
    assert povid_main(["compare", str(tmp_path / "reference" / "results.json"),
                       str(tmp_path / "corrected" / "results.json")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert '- `chair_mode`: reference: "reference", corrected: "corrected"' in printed
    assert "count CHAIR mentions differently" in printed

    with pytest.raises(ValueError, match=r"chair\.mode must be one of 'reference', 'corrected', got 'original'"):
        _eval("eval_chair_coco", f"annotations_dir={annotations}", f"captions_file={captions}",
              f"output_dir={tmp_path / 'bad'}", "chair.mode=original")  # fmt: skip
    assert not (tmp_path / "bad").exists()  # refused before scoring anything

    # The OPERA preset scores the same captions the same way and names its protocol.
    _eval("eval_chair_opera", f"annotations_dir={annotations}", f"captions_file={captions}",
          f"output_dir={tmp_path / 'opera'}")  # fmt: skip
    opera = json.loads((tmp_path / "opera" / "results.json").read_text())
    assert (opera["protocol"]["protocol_name"], opera["protocol"]["chair_mode"]) == ("opera-500", "reference")
    assert opera["metrics"] == results["reference"]["metrics"]


def test_compare_flags_results_scored_before_chair_modes(tmp_path, capsys):
    from povid.metrics.report import compare_markdown, make_result

    old = make_result("chair", "old", {"prompt": "p"}, {"chair_i": 0.1})  # no chair_mode: corrected
    new = make_result("chair", "new", {"prompt": "p", "chair_mode": "reference"}, {"chair_i": 0.1})
    table = compare_markdown([old, new])
    assert '- `chair_mode`: old: null, new: "reference"' in table
    assert "scored before modes existed, i.e. with corrected counting" in table
    same = make_result("chair", "same", {"prompt": "p", "chair_mode": "reference"}, {"chair_i": 0.2})
    assert "chair_mode" not in compare_markdown([new, same])


def test_compare_flags_protocol_differences_and_bad_files(tmp_path, capsys):
    from povid.metrics.report import make_result

    for name, tokens in (("a", 512), ("b", 64)):
        result = make_result("pope", name, {"max_new_tokens": tokens, "checkpoint_dir": name},
                             {"random": {"accuracy": 0.5 if name == "a" else 0.75, "f1": 0.5}})  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    assert povid_main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    printed = capsys.readouterr().out
    assert "| random accuracy (%) | 50.0 | 75.0 | +25.0 |" in printed
    assert "- `max_new_tokens`: a: 512, b: 64" in printed
    assert "checkpoint_dir" not in printed  # run-specific, expected to differ

    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        povid_main(["compare", str(tmp_path / "a.json"), str(tmp_path / "bad.json")])
    assert exc.value.code == 1 and "bad.json: not a povid_eval results file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        povid_main(["compare", str(tmp_path / "a.json")])
    assert exc.value.code == 2


def test_recipe_errors_name_file_and_id(tmp_path, coco_dirs):
    annotations, images = coco_dirs
    captions = tmp_path / "caps.jsonl"
    captions.write_text(json.dumps({"image_id": 999, "caption": "A dog."}) + "\n")
    with pytest.raises(AnnotationError, match=r"instances_val2014\.json: no image with id 999 \(requested by .*caps\.jsonl\)"):
        _eval("eval_chair_coco", f"annotations_dir={annotations}", f"captions_file={captions}",
              f"output_dir={tmp_path / 'o'}")  # fmt: skip
    with pytest.raises(ValueError, match=r"generating needs checkpoint_dir="):
        _eval("eval_chair_coco", f"annotations_dir={annotations}", f"image_dir={images}",
              f"output_dir={tmp_path / 'o'}")  # fmt: skip
    with pytest.raises(ValueError, match=r"answers_file= needs questions_file="):
        _eval("eval_pope_coco", f"answers_file={captions}", f"output_dir={tmp_path / 'o'}")


def test_missing_image_file_names_the_image_id(tmp_path, tiny_checkpoint, coco_dirs):
    annotations, _ = coco_dirs
    empty = tmp_path / "no_images"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"record id=1\d: field 'image': Image file not found"):
        _eval("eval_chair_coco", f"checkpoint_dir={tiny_checkpoint}", f"annotations_dir={annotations}",
              f"image_dir={empty}", f"output_dir={tmp_path / 'o'}", "num_images=1", "max_new_tokens=4")  # fmt: skip
