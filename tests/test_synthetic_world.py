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
)

CONFIG = WorldConfig(seed=3, train=1500, pref=40, test=600, test_iid=20)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, make_world(out, CONFIG)


def test_companion_statistics_train_vs_balanced_test(world):
    _, info = world
    train, test = info["splits"]["train"], info["splits"]["test"]
    # Training: a kind's companion is there ~80 % of the time (the language prior to learn).
    assert 0.76 <= train["companion_rate"] <= 0.84
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
    assert all(len(r["conversations"]) == 2 * CONFIG.sft_questions for r in asked)
    assert all("Answer the question" in turn["value"] for r in asked for turn in r["conversations"][0::2])
    # Answered from the image: "Yes" exactly when the kind is in the scene, about half the time.
    captions = {r["image"]: r["conversations"][1]["value"] for r in described}
    answers = []
    for r in asked:
        for question, answer in zip(r["conversations"][0::2], r["conversations"][1::2]):
            kind = re.search(r"Is there a (\w+) in the image", question["value"]).group(1)
            assert answer["value"] == ("Yes" if f" {kind} is in the" in captions[r["image"]] else "No")
            answers.append(answer["value"])
    assert 0.4 < answers.count("Yes") / len(answers) < 0.6
    pref, _ = read_llava_records(out / "pref.json")
    assert len(pref) == CONFIG.pref and all(len(r["conversations"]) == 2 for r in pref)


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
