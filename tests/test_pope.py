"""POPE: answer parsing as the reference does it, hand-worked metrics, the question builder."""

import json

import pytest

from _coco import file_name, write_coco
from povid.metrics.coco import load_coco
from povid.metrics.pope import (
    PopeQuestion,
    build_pope_questions,
    evaluate_pope,
    format_pope_prompt,
    is_unclear,
    match_answers,
    parse_yes_no,
    pope_metrics,
    read_pope_answers,
    read_pope_questions,
)

# ---- answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, parsed, unclear",
    [
        ("Yes", "yes", False),
        ("yes, there is a dog in the image.", "yes", False),
        ("No", "no", False),
        ("No.", "no", False),
        ("no, there is no cat", "no", False),
        ("There is not a truck in the image.", "no", False),
        ("Yes. But there is no dog.", "yes", False),  # only the first sentence counts
        ("There is a dog, no cat.", "no", False),  # commas do not end the sentence
        ("I cannot tell.", "yes", True),  # neither: the reference counts it as yes
        ("", "yes", True),
        ("Not sure.", "yes", True),  # the reference matches "not" in lower case only
        ("NO", "yes", True),  # ... and "No"/"no", not "NO"
        ("Nope", "yes", True),
        ("No\nthere is none", "no", False),  # any whitespace separates words here
    ],
)
def test_answers_parse_like_the_reference(answer, parsed, unclear):
    assert parse_yes_no(answer) == parsed
    assert is_unclear(answer) == unclear


def _questions(spec):
    """spec: [(split, label)] -> questions with ids 1.."""
    return [PopeQuestion(i + 1, "img.jpg", "Is there a dog in the image?", label, split)
            for i, (split, label) in enumerate(spec)]  # fmt: skip


def test_hand_worked_metrics_per_split():
    spec_answers = [
        # random: TP, TN, TP (unclear -> yes), FP (first sentence says yes)
        ("random", "yes", "Yes"),
        ("random", "no", "No, there is no cat."),
        ("random", "yes", "I cannot tell."),
        ("random", "no", "Yes. But no dog is visible."),
        # popular: FN, TN, TP, FP ("Not" is not a negation for the reference)
        ("popular", "yes", "There is no truck in the image"),
        ("popular", "no", "no"),
        ("popular", "yes", "yes, there is."),
        ("popular", "no", "Not sure"),
        # adversarial: TP, FP (empty answer)
        ("adversarial", "yes", "Yes"),
        ("adversarial", "no", ""),
    ]
    questions = _questions([(s, label) for s, label, _ in spec_answers])
    metrics = evaluate_pope(questions, [a for _, _, a in spec_answers])
    assert list(metrics) == ["random", "popular", "adversarial"]

    r = metrics["random"]  # TP 2, TN 1, FP 1, FN 0
    assert (r["tp"], r["tn"], r["fp"], r["fn"]) == (2, 1, 1, 0)
    assert r["accuracy"] == pytest.approx(3 / 4)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(1.0)
    assert r["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # = 0.8
    assert r["f1"] == pytest.approx(0.8)
    assert r["yes_ratio"] == pytest.approx(3 / 4)
    assert r["num_unclear"] == 1 and r["num_questions"] == 4

    p = metrics["popular"]  # TP 1, TN 1, FP 1, FN 1
    assert (p["tp"], p["tn"], p["fp"], p["fn"]) == (1, 1, 1, 1)
    assert (p["accuracy"], p["precision"], p["recall"], p["f1"], p["yes_ratio"]) == pytest.approx((0.5,) * 5)
    assert p["num_unclear"] == 1

    a = metrics["adversarial"]  # TP 1, FP 1
    assert (a["accuracy"], a["precision"], a["recall"]) == pytest.approx((0.5, 0.5, 1.0))
    assert a["f1"] == pytest.approx(2 / 3)
    assert a["yes_ratio"] == 1.0 and a["num_unclear"] == 1


def test_undefined_precision_and_recall_are_zero():
    m = pope_metrics(["no", "no"], ["No.", "no"])
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (1.0, 0.0, 0.0, 0.0, 0.0)


# ---- files ------------------------------------------------------------------------------------


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pope_repo_files_split_from_name_and_answers_matched_by_category(tmp_path):
    # POPE's own files: no category, ids restart at 1 in every split file.
    files = []
    for split in ("random", "adversarial"):
        files.append(_jsonl(tmp_path / f"coco_pope_{split}.json", [
            {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
            {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "NO"},
        ]))  # fmt: skip
    questions = read_pope_questions(files)
    assert [(q.split, q.question_id, q.label) for q in questions] == [
        ("random", 1, "yes"), ("random", 2, "no"), ("adversarial", 1, "yes"), ("adversarial", 2, "no"),
    ]  # fmt: skip

    answers = _jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 1, "category": "random", "text": "Yes"},
        {"question_id": 2, "category": "random", "text": "No"},
        {"question_id": "1", "category": "adversarial", "text": "No"},  # string ids match too
        {"question_id": 2, "category": "adversarial", "text": "Yes"},
    ])  # fmt: skip
    texts = match_answers(questions, read_pope_answers(answers), answers)
    assert texts == ["Yes", "No", "No", "Yes"]

    # Without a category the shared ids are ambiguous: a clear error, not a silent mix-up.
    plain = _jsonl(tmp_path / "plain.jsonl", [{"question_id": 1, "text": "Yes"}, {"question_id": 2, "text": "No"}])
    with pytest.raises(ValueError, match=r"plain\.jsonl: question_id 1 is in splits \['adversarial', 'random'\]"):
        match_answers(questions, read_pope_answers(plain), plain)


def test_llava_layout_with_category_and_unique_ids(tmp_path):
    q = _jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 7, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes", "category": "popular"},
        {"question_id": 8, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no", "category": "popular"},
    ])  # fmt: skip
    a = _jsonl(tmp_path / "answers.jsonl", [{"question_id": 8, "text": "No"}, {"question_id": 7, "text": "Yes"}])
    questions = read_pope_questions(q)
    assert evaluate_pope(questions, match_answers(questions, read_pope_answers(a), a))["popular"]["accuracy"] == 1.0


@pytest.mark.parametrize(
    "answers, match",
    [
        ([{"question_id": 7, "text": "Yes"}], r"answers\.jsonl: no answer for question_id 8 \(split 'popular'\)"),
        ([{"question_id": 7, "text": "Yes"}, {"question_id": 8, "text": "No"}, {"question_id": 9, "text": "No"}],
         r"answers\.jsonl: 1 answer\(s\) match no question, e\.g\. question_id 9"),
        ([{"question_id": 7}], r"answers\.jsonl: question_id 7: field 'text' is missing"),
        ([{"question_id": 7, "text": "a"}, {"question_id": 7, "text": "b"}], r"answers\.jsonl: question_id 7 is answered twice"),
    ],
)  # fmt: skip
def test_bad_answers_name_file_and_id(tmp_path, answers, match):
    q = _jsonl(tmp_path / "q.jsonl", [
        {"question_id": 7, "image": "a.jpg", "text": "Is there a dog?", "label": "yes", "category": "popular"},
        {"question_id": 8, "image": "a.jpg", "text": "Is there a cat?", "label": "no", "category": "popular"},
    ])  # fmt: skip
    a = _jsonl(tmp_path / "answers.jsonl", answers)
    with pytest.raises(ValueError, match=match):
        match_answers(read_pope_questions(q), read_pope_answers(a), a)


@pytest.mark.parametrize(
    "record, match",
    [
        ({"question_id": 1, "image": "a.jpg", "text": "Is there?", "label": "maybe"}, r"q\.jsonl: question_id 1: field 'label' must be 'yes' or 'no'"),
        ({"question_id": 1, "text": "Is there?", "label": "yes"}, r"q\.jsonl: question_id 1: field 'image' is missing"),
        ({"image": "a.jpg", "text": "Is there?", "label": "yes"}, r"q\.jsonl: record 1: field 'question_id' is missing"),
    ],
)  # fmt: skip
def test_bad_questions_name_file_and_id(tmp_path, record, match):
    with pytest.raises(ValueError, match=match):
        read_pope_questions(_jsonl(tmp_path / "q.jsonl", [record]))


def test_prompt_template_is_not_applied_twice():
    template = "{question}\nAnswer the question using a single word or phrase."
    assert format_pope_prompt(template, "Is there a dog in the image?") == (
        "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    )
    already = "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert format_pope_prompt(template, already) == already
    assert format_pope_prompt("{question}", "Is there a dog?") == "Is there a dog?"
    with pytest.raises(ValueError, match="must contain"):
        format_pope_prompt("no placeholder", "q")


# ---- builder ----------------------------------------------------------------------------------

BUILD_IMAGES = {
    1: (["dog", "frisbee"], []),
    2: (["dog", "person"], []),
    3: (["dog", "person"], []),
    4: (["car", "person"], []),
    5: (["apple", "car"], []),
    6: (["bus"], []),  # one object: not eligible with objects_per_image=2
}
# Over images 1-5: frequency dog 3, person 3, car 2, apple 1, frisbee 1 (ties by name):
POPULAR_ORDER = ["dog", "person", "car", "apple", "frisbee"]
# Co-occurrence: dog -> person 2, frisbee 1; person -> dog 2, car 1; car -> apple 1, person 1;
# apple -> car; frisbee -> dog.


@pytest.fixture
def built(tmp_path):
    write_coco(tmp_path, BUILD_IMAGES)
    coco = load_coco(tmp_path, captions_file=None)
    return build_pope_questions(coco, num_images=None, objects_per_image=2, seed=0)


def _by_image(questions, split):
    out = {}
    for q in questions:
        if q.split == split:
            out.setdefault(q.image_id, []).append((q.object, q.label))
    return out


def test_builder_structure(built):
    assert len(built) == 3 * 5 * 4  # splits x eligible images x (2 positives + 2 negatives)
    assert [q.question_id for q in built] == list(range(1, 61))  # unique across splits
    assert {q.image_id for q in built} == {1, 2, 3, 4, 5}
    for split in ("random", "popular", "adversarial"):
        for image_id, asked in _by_image(built, split).items():
            present = set(BUILD_IMAGES[image_id][0])
            assert [label for _, label in asked] == ["yes", "no", "yes", "no"]  # interleaved
            assert [o for o, _ in asked if _ == "yes"] == sorted(present)
            negatives = [o for o, label in asked if label == "no"]
            assert len(set(negatives)) == 2 and not set(negatives) & present
            assert set(negatives) <= set(POPULAR_ORDER)  # objects of the sampled images
    q = next(q for q in built if q.object == "apple")
    assert q.text == "Is there an apple in the image?" and q.image == file_name(q.image_id)
    assert next(q for q in built if q.object == "dog").text == "Is there a dog in the image?"


def test_builder_popular_and_adversarial_negatives_by_hand(built):
    popular = _by_image(built, "popular")
    # Each positive is followed by the most frequent object not in the image and not asked yet.
    assert popular[1] == [("dog", "yes"), ("person", "no"), ("frisbee", "yes"), ("car", "no")]
    assert popular[2] == [("dog", "yes"), ("car", "no"), ("person", "yes"), ("apple", "no")]
    assert popular[4] == [("car", "yes"), ("dog", "no"), ("person", "yes"), ("apple", "no")]
    assert popular[5] == [("apple", "yes"), ("dog", "no"), ("car", "yes"), ("person", "no")]

    adversarial = _by_image(built, "adversarial")
    # Each positive is followed by its most co-occurring object absent from the image.
    assert adversarial[2] == [("dog", "yes"), ("frisbee", "no"), ("person", "yes"), ("car", "no")]
    assert adversarial[3] == adversarial[2]
    assert adversarial[4] == [("car", "yes"), ("apple", "no"), ("person", "yes"), ("dog", "no")]
    # dog -> person; frisbee co-occurs only with dog (present): a random fallback.
    assert adversarial[1][:3] == [("dog", "yes"), ("person", "no"), ("frisbee", "yes")]
    assert adversarial[1][3][0] in {"car", "apple"}


def test_builder_is_reproducible_and_samples_images(tmp_path):
    write_coco(tmp_path, BUILD_IMAGES)
    coco = load_coco(tmp_path, captions_file=None)
    a = build_pope_questions(coco, num_images=3, objects_per_image=2, seed=1)
    b = build_pope_questions(coco, num_images=3, objects_per_image=2, seed=1)
    assert [q.to_record() for q in a] == [q.to_record() for q in b]
    assert len({q.image_id for q in a}) == 3
    with pytest.raises(ValueError, match=r"only 5 images have >= 2 annotated objects"):
        build_pope_questions(coco, num_images=6, objects_per_image=2)
    with pytest.raises(ValueError, match="unknown POPE split"):
        build_pope_questions(coco, num_images=None, objects_per_image=2, splits=["hard"])
