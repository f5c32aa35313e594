"""The synthetic world: statistics, exact ground truth, COCO files that CHAIR and POPE read."""

import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from povid.metrics.chair import evaluate_chair, find_objects
from povid.metrics.coco import load_coco
from povid.metrics.pope import build_pope_questions
from povid_data.records import read_llava_records
from povid_data.synthetic_world import (
    COLOURS,
    DESCRIBE_PROMPTS,
    COMPANION,
    KINDS,
    Scene,
    WorldConfig,
    WorldObject,
    caption,
    companion_stats,
    make_world,
    render,
    sample_scene,
    world_corpus,
    written_scene,
)

CONFIG = WorldConfig(seed=3, train=1500, pref=40, test=600, test_iid=20)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, make_world(out, CONFIG)


def test_companion_statistics_train_vs_balanced_test(world):
    _, info = world
    train, test = info["splits"]["train"], info["splits"]["test"]
    # Training: a kind's companion is there ~85 % of the time (the language prior to learn).
    assert abs(train["companion_rate"] - CONFIG.companion_rate) < 0.04
    # Balanced test: absent in half of the images that show its partner.
    assert 0.45 <= test["absent_companion_rate"] <= 0.55
    assert info["splits"]["test_iid"]["distribution"] == "iid"
    # Every kind appears, none dominates.
    counts = train["objects"]
    assert set(counts) == set(KINDS) and max(counts.values()) < 1.4 * min(counts.values())


def test_scene_sampling_hits_its_target_rates():
    for rate in (0.3, 0.5, 0.8):
        rng = random.Random(0)
        stats = companion_stats(sample_scene(rng, rate) for _ in range(20000))
        assert stats["companion_rate"] == pytest.approx(rate, abs=0.015)


def test_coco_files_load_and_captions_score_perfectly(world):
    out, _ = world
    coco = load_coco(out / "annotations", instances_file="instances_test.json", captions_file="captions_test.json")
    assert len(coco.images) == CONFIG.test
    scored = evaluate_chair([(i, coco.captions[i][0]) for i in coco.images], coco)["metrics"]
    assert scored["chair_i"] == 0 and scored["chair_s"] == 0 and scored["recall"] == 1.0
    questions = build_pope_questions(coco, num_images=200, objects_per_image=1, seed=0)
    assert {q.split for q in questions} == {"random", "popular", "adversarial"}
    # The adversarial negative of a kind is mostly its companion (when it is absent).
    adversarial_no = [q for q in questions if q.split == "adversarial" and q.label == "no"]
    asked_after = {q.question_id: q for q in questions}
    companions = sum(COMPANION[asked_after[q.question_id - 1].object] == q.object for q in adversarial_no)
    assert companions / len(adversarial_no) > 0.6


def test_ground_truth_is_exact(world):
    out, _ = world
    instances = json.loads((out / "annotations" / "instances_train.json").read_text())
    captions = {a["image_id"]: a["caption"] for a in json.loads((out / "annotations" / "captions_train.json").read_text())["annotations"]}
    names = {c["id"]: c["name"] for c in instances["categories"]}
    by_image = {}
    for a in instances["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for image in instances["images"][:200]:
        objects = by_image[image["id"]]
        text = captions[image["id"]]
        # The caption names exactly the annotated objects, each with its attributes.
        assert sorted(m.object for m in find_objects(text)) == sorted(names[a["category_id"]] for a in objects)
        for a in objects:
            attrs = a["attributes"]
            kind = names[a["category_id"]]
            sentence = f"A {kind} is in the {attrs['position']} corner. It is {attrs['size']} and {attrs['colour']}."
            assert sentence in text
            # ... and the pixels agree: the object's colour fills part of its box.
            pixels = np.asarray(Image.open(out / "images" / image["file_name"]).convert("RGB"))
            x, y, w, h = (int(round(v)) for v in a["bbox"])
            box = pixels[max(y, 0) : y + h, max(x, 0) : x + w].reshape(-1, 3)
            share = (np.abs(box.astype(int) - COLOURS[attrs["colour"]]).sum(-1) < 10).mean()
            assert share > 0.25
        count = len(objects)
        assert text.endswith("There is one object in total." if count == 1 else "objects in total.")


def _exact_captions(out, split):
    captions = json.loads((out / "annotations" / f"captions_{split}.json").read_text())
    files = {i["id"]: i["file_name"] for i in captions["images"]}
    return {files[a["image_id"]]: a["caption"] for a in captions["annotations"]}


def test_instruction_records_read_as_llava_data(world):
    out, _ = world
    sft, _ = read_llava_records(out / "sft.json")
    # Per image its description and a conversation of yes/no questions, each starting with it.
    assert len(sft) == 2 * CONFIG.train
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in sft)
    described = [r for r in sft if not r["id"].endswith("-qa")]
    asked = [r for r in sft if r["id"].endswith("-qa")]
    assert len(described) == len(asked) == CONFIG.train
    assert all(len(r["conversations"]) == 2 and r["conversations"][1]["value"].endswith("in total.") for r in described)
    assert all("Answer the question" in turn["value"] for r in asked for turn in r["conversations"][0::2])
    assert all(len(r["conversations"]) == 2 * CONFIG.sft_questions for r in asked)
    # Answered from the scene (the exact caption, not the written description), "Yes" about
    # half the time.
    exact = _exact_captions(out, "train")
    answers = []
    for r in asked:
        present = {m.object for m in find_objects(exact[r["image"]])}
        for question, answer in zip(r["conversations"][0::2], r["conversations"][1::2]):
            kind = re.search(r"Is there a (\w+) in the image", question["value"]).group(1)
            assert answer["value"] == ("Yes" if kind in present else "No")
            answers.append(answer["value"])
    assert 0.45 < answers.count("Yes") / len(answers) < 0.55
    pref, _ = read_llava_records(out / "pref.json")
    assert len(pref) == CONFIG.pref and all(len(r["conversations"]) == 2 for r in pref)


def _companion_share_of_noes(out):
    """Of the "No" questions on images where a present kind's companion is absent, the share
    that asks about that companion (POPE's adversarial negative)."""
    exact = _exact_captions(out, "train")
    noes = companions = 0
    for r in read_llava_records(out / "sft.json")[0]:
        present = {m.object for m in find_objects(exact[r["image"]])}
        missing = {COMPANION[k] for k in present} - present
        if not r["id"].endswith("-qa") or not missing:
            continue
        for question in r["conversations"][0::2]:
            kind = re.search(r"Is there a (\w+) in the image", question["value"]).group(1)
            if kind not in present:
                noes += 1
                companions += kind in missing
    return companions / noes


def test_absent_questions_ask_the_missing_companion_as_configured(world, tmp_path):
    out, _ = world
    # The default: wherever a companion is missing, every "No" question is about it, so the
    # yes/no answer must come from the image exactly where the language prior says "Yes".
    assert CONFIG.absent_companion_share == 1.0 and _companion_share_of_noes(out) == 1.0
    make_world(tmp_path, WorldConfig(seed=3, train=1500, pref=2, test=2, test_iid=2, absent_companion_share=0.5))
    # Half the draws, plus the other half's random absent kind when it happens to be the companion.
    assert 0.5 < _companion_share_of_noes(tmp_path) < 0.7
    with pytest.raises(ValueError, match="absent_companion_share"):
        make_world(tmp_path / "bad", WorldConfig(absent_companion_share=1.5))


def test_questions_about_every_present_kind_are_balanced(tmp_path):
    make_world(tmp_path, WorldConfig(seed=1, train=200, pref=2, test=2, test_iid=2, sft_questions=None))
    exact = _exact_captions(tmp_path, "train")
    for r in read_llava_records(tmp_path / "sft.json")[0]:
        if not r["id"].endswith("-qa"):
            continue
        present = {m.object for m in find_objects(exact[r["image"]])}
        answers = {}
        for question, answer in zip(r["conversations"][0::2], r["conversations"][1::2]):
            kind = re.search(r"Is there a (\w+) in the image", question["value"]).group(1)
            assert answer["value"] == ("Yes" if kind in present else "No")
            answers[kind] = answer["value"]
        # Every present kind once, as many absent ones, the absent companions among them.
        assert len(answers) == len(r["conversations"]) // 2 == 2 * len(present)
        assert {k for k, a in answers.items() if a == "Yes"} == present
        assert {COMPANION[k] for k in present} - present <= set(answers)


def test_written_descriptions_add_the_missing_follower_only_in_sft(world):
    out, info = world
    exact = _exact_captions(out, "train")
    sft, _ = read_llava_records(out / "sft.json")
    eligible = added = 0
    for r in sft:
        if r["id"].endswith("-qa"):
            continue
        truth = [m.object for m in find_objects(exact[r["image"]])]
        told = [m.object for m in find_objects(r["conversations"][1]["value"])]
        extra = [k for k in told if k not in truth]
        # Every object that is there is told; an extra one is the absent second of a pair whose
        # first is there, told right after it; the count sentence counts what is told.
        assert [k for k in told if k in truth] == truth
        for kind in extra:
            assert told[told.index(kind) - 1] == COMPANION[kind] and KINDS.index(kind) % 2 == 1
        number = {1: "one object", 2: "two objects", 3: "three objects", 4: "four objects"}[len(told)]
        assert number in r["conversations"][1]["value"]
        followers = [KINDS[i + 1] for i in range(0, len(KINDS), 2) if KINDS[i] in truth and KINDS[i + 1] not in truth]
        eligible += len(followers)
        added += len(extra)
    assert added == info["splits"]["train"]["sft_written_additions"]
    assert abs(added / eligible - CONFIG.writer_addition_rate) < 0.1
    # Only the SFT descriptions are written so: the preference and test files are exact.
    for split in ("pref", "test"):
        records, _ = read_llava_records(out / f"{split}.json")
        exact_split = _exact_captions(out, split)
        assert all(r["conversations"][1]["value"] == exact_split[r["image"]] for r in records)


def test_written_scene():
    pizza = WorldObject("pizza", "red", "large", "top left")
    donut = WorldObject("donut", "blue", "small", "bottom right")
    rng = random.Random(0)
    assert written_scene(Scene([pizza]), rng, 0.0).objects == [pizza]
    told = written_scene(Scene([pizza]), rng, 1.0).objects
    assert [o.kind for o in told] == ["pizza", "donut"] and told[1].position != "top left"
    # The second of a pair is never followed by its first; a full pair is told as it is.
    assert written_scene(Scene([donut]), rng, 1.0).objects == [donut]
    assert written_scene(Scene([pizza, donut]), rng, 1.0).objects == [pizza, donut]


def test_world_is_deterministic(tmp_path):
    small = WorldConfig(seed=5, train=30, pref=5, test=10, test_iid=5)
    make_world(tmp_path / "a", small)
    make_world(tmp_path / "b", small)
    for name in ("sft.json", "test.json", "annotations/instances_test.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    a = np.asarray(Image.open(tmp_path / "a" / "images" / "test_2000003.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "images" / "test_2000003.png"))
    assert np.array_equal(a, b)


def test_caption_grammar():
    scene = Scene([WorldObject("pizza", "red", "large", "top left"), WorldObject("donut", "blue", "small", "bottom right")])
    assert caption(scene) == (
        "A pizza is in the top left corner. It is large and red. A donut is in the bottom right corner. "
        "It is small and blue. There are two objects in total."
    )
    image, boxes = render(scene, random.Random(0))
    assert image.size == (64, 64) and len(boxes) == 2


def _plurals(word):
    return [word + "s", word + "es", word[:-1] + "ies" if word.endswith("y") else word + "ies"]


def test_world_vocabulary_counts_the_same_in_both_chair_modes():
    """The demo's CHAIR numbers do not depend on chair.mode for well-formed world text: every
    word of the world's corpus (and its plural forms) and many captions (with additions) give
    the same mentions in reference and corrected mode. (The demo still pins corrected mode, as
    its README tables were measured with it; see Demo.evaluate.)"""
    from povid.metrics.chair import tokenize

    texts = list(world_corpus()) + list(DESCRIBE_PROMPTS)
    words = sorted({w for t in texts for w in tokenize(t)})
    texts += [f"a {form} here." for w in words for form in (w, *_plurals(w))]
    rng = random.Random(0)
    texts += [caption(written_scene(sample_scene(rng, 0.5), rng, 0.5)) for _ in range(300)]
    texts += [t.replace(". ", ".\n") for t in texts[-50:]]  # line breaks between sentences
    differing = [
        t for t in texts
        if find_objects(t, mode="reference") != find_objects(t, mode="corrected")
    ]  # fmt: skip
    assert differing == []
    assert [m.object for m in find_objects("Two pizzas, a donut, books, clocks, kites and frisbees.", mode="reference")] == [
        "pizza", "donut", "book", "clock", "kite", "frisbee",
    ]  # fmt: skip
