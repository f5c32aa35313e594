"""CHAIR in ``corrected`` mode: words, synonyms, the original's special cases, hand-worked scores,
annotation errors. Reference mode (the default) and the differences: test_chair_reference.py."""

import json
import pytest

from _coco import write_coco
from povid.metrics.chair import (
    COCO_SYNONYMS,
    evaluate_chair,
    find_objects,
    ground_truth_objects,
    read_captions,
    singularize,
    tokenize,
)
from povid.metrics.coco import AnnotationError, load_coco

# ---- words ------------------------------------------------------------------------------------


def test_tokenize_splits_punctuation_and_apostrophes_but_keeps_hyphenated_words():
    assert tokenize("The Dog's bowl, a hot-dog & two cats.\n") == [
        "the", "dog", "s", "bowl", "a", "hot-dog", "two", "cats",
    ]  # fmt: skip
    assert tokenize("") == [] and tokenize(" ... !") == []


@pytest.mark.parametrize(
    "plural, singular",
    [
        ("people", "person"), ("men", "man"), ("women", "woman"), ("children", "child"),
        ("grandchildren", "grandchild"), ("policemen", "policeman"), ("gentlemen", "gentleman"),
        ("mice", "mouse"), ("knives", "knife"), ("pocketknives", "pocketknife"), ("geese", "goose"),
        ("oxen", "ox"), ("calves", "calf"), ("skis", "ski"), ("taxis", "taxi"), ("buses", "bus"),
        ("minibuses", "minibus"), ("ponies", "pony"), ("puppies", "puppy"), ("babies", "baby"),
        ("ladies", "lady"), ("lorries", "lorry"), ("doggies", "doggie"), ("collies", "collie"),
        ("magpies", "magpie"), ("ties", "tie"), ("glasses", "glass"), ("benches", "bench"),
        ("sandwiches", "sandwich"), ("toothbrushes", "toothbrush"), ("boxes", "box"),
        ("horses", "horse"), ("vases", "vase"), ("suitcases", "suitcase"), ("canoes", "canoe"),
        ("flamingoes", "flamingo"), ("stoves", "stove"), ("microwaves", "microwave"),
        ("ewes", "ewe"), ("trolleys", "trolley"), ("turkeys", "turkey"), ("tvs", "tv"),
        ("suvs", "suv"), ("zebus", "zebu"), ("houses", "house"),
        # singular already, or the same in both numbers
        ("bus", "bus"), ("sheep", "sheep"), ("cattle", "cattle"), ("bison", "bison"),
        ("scissors", "scissors"), ("tennis", "tennis"), ("glass", "glass"), ("this", "this"),
        ("is", "is"), ("was", "was"), ("gas", "gas"), ("analysis", "analysis"), ("omen", "omen"),
    ],
)  # fmt: skip
def test_singularize(plural, singular):
    assert singularize(plural) == singular


def test_every_synonym_and_its_plural_finds_its_category():
    irregular = {"person": "people", "man": "men", "woman": "women", "child": "children",
                 "mouse": "mice", "knife": "knives", "goose": "geese", "ox": "oxen",
                 "calf": "calves", "ski": "skis", "sheep": "sheep", "cattle": "cattle",
                 "bison": "bison", "scissors": "scissors", "bus": "buses", "minibus": "minibuses"}  # fmt: skip
    for category, words in COCO_SYNONYMS.items():
        for word in words:
            assert [m.object for m in find_objects(f"a {word} here", mode="corrected")] == [category], word
            last = word.split()[-1]
            if last in irregular:
                plural_last = irregular[last]
            elif last.endswith(("ch", "sh", "x", "ss", "us")):
                plural_last = last + "es"
            elif last.endswith("y") and last[-2] not in "aeiou":
                plural_last = last[:-1] + "ies"
            else:
                plural_last = last + "s"
            plural = " ".join(word.split()[:-1] + [plural_last])
            assert [m.object for m in find_objects(f"two {plural} here", mode="corrected")] == [category], plural


# ---- the original metric's special cases ------------------------------------------------------


@pytest.mark.parametrize(
    "caption, objects",
    [
        ("A hot dog on a plate.", ["hot dog"]),
        ("Two hot dogs and a dog.", ["hot dog", "dog"]),  # a hot dog is no dog
        ("A baby bird in a nest.", ["bird"]),  # a bird, not a person ...
        ("A baby in a crib.", ["person"]),  # ... but a baby alone is one
        ("An adult giraffe and two baby elephants.", ["giraffe", "elephant"]),
        ("A passenger train at the station.", ["train"]),
        ("Passengers board a passenger jet.", ["person", "airplane"]),
        ("A teddy bear.", ["teddy bear"]),  # not a bear
        ("Two teddy bears and a real bear.", ["teddy bear", "bear"]),
        ("A toilet seat.", ["toilet"]),  # not a chair
        ("The seat of the toilet is up.", ["toilet"]),  # seat near a toilet is the toilet's
        ("A seat by the window.", ["chair"]),
        ("Train tracks at home plate.", []),  # rails and baseball, not a train or plate
        ("A hair dryer and a motor bike.", ["hair drier", "motorcycle"]),
        ("Wine glasses, a sports ball and cell phones.", ["wine glass", "sports ball", "cell phone"]),
        ("A dining table and a table.", ["dining table", "dining table"]),
        ("A hot-dog stand.", []),  # one hyphenated word, as NLTK tokenizes it
        ("People, men, women and children.", ["person"] * 4),
        ("Mice, knives and skis.", ["mouse", "knife", "skis"]),
        ("A sofa, a puppy, a kitten, a pickup.", ["couch", "dog", "cat", "truck"]),
        ("The dog, the dog and the dog.", ["dog"] * 3),  # every mention counts
        ("", []),
    ],
)
def test_find_objects_special_cases(caption, objects):
    assert [m.object for m in find_objects(caption, mode="corrected")] == objects


# ---- hand-worked scores -----------------------------------------------------------------------

IMAGES = {
    # image id: (instance categories, ground-truth captions)
    1: (["person", "dog", "dog", "dining table"], ["A man and his dog sit at a table."]),
    2: (["bird", "toilet"], ["A small bird perched on a toilet."]),
    3: (["cat"], ["A cat on a bed."]),  # "bed" is ground truth through the caption only
    4: (["teddy bear", "cell phone", "knife", "mouse"], ["A teddy bear."]),
    5: (["skis", "person"], ["Skiers on a slope."]),
    6: ([], ["An empty room."]),
}
CAPTIONS = [
    # 5 mentions: person (women), dog, hot dog (hallucinated), dog, person (people); 16 words
    (1, "Two women walk their dogs past a hot dog stand. A dog barks at the people."),
    # 5 mentions: bird (baby bird), toilet (toilet seat), chair x3 (hallucinated 3x); 17 words
    (2, "A baby bird sits on the toilet seat next to a chair. Another chair and a chair."),
    # empty caption: no mention, not hallucinated, 0 words
    (3, ""),
    # 4 mentions, all correct: knife, mouse, teddy bear, cell phone; 10 words
    (4, "Knives, mice and a teddy bear next to cell phones."),
    # 3 mentions: person (children), skis, couch (sofa, hallucinated); 6 words
    (5, "Children holding skis beside a sofa."),
]


@pytest.fixture
def coco(tmp_path):
    write_coco(tmp_path, IMAGES)
    return load_coco(tmp_path)


def test_ground_truth_is_instances_plus_objects_named_in_captions(coco):
    assert ground_truth_objects(coco, 1, "corrected") == {"person", "dog", "dining table"}
    assert ground_truth_objects(coco, 3, "corrected") == {"cat", "bed"}
    assert ground_truth_objects(coco, 5, "corrected") == {"skis", "person"}
    assert ground_truth_objects(coco, 6, "corrected") == set()


def test_hand_worked_chair_scores(coco):
    result = evaluate_chair(CAPTIONS, coco, mode="corrected")
    m = result["metrics"]
    # CHAIR_S: captions 1, 2 and 5 hallucinate -> 3 / 5.
    assert m["chair_s"] == pytest.approx(3 / 5)
    # CHAIR_I: hallucinated mentions 1 + 3 + 0 + 0 + 1 = 5 of 5 + 5 + 0 + 4 + 3 = 17 mentions.
    assert (m["num_hallucinated_mentions"], m["num_mentions"]) == (5, 17)
    assert m["chair_i"] == pytest.approx(5 / 17)
    # Recall: distinct correct objects 2 + 2 + 0 + 4 + 2 over ground truth 3 + 2 + 2 + 4 + 2.
    assert (m["num_correct_objects"], m["num_ground_truth_objects"]) == (10, 13)
    assert m["recall"] == pytest.approx(10 / 13)
    # Words: 16 + 17 + 0 + 10 + 6 = 49 over 5 captions.
    assert m["mean_length"] == pytest.approx(49 / 5)
    assert m["num_captions"] == 5 and m["num_hallucinated_captions"] == 3

    per = {c["image_id"]: c for c in result["captions"]}
    assert per[1]["hallucinated"] == [["hot dog", "hot dog"]]
    assert per[1]["correct"] == [["woman", "person"], ["dog", "dog"], ["dog", "dog"], ["person", "person"]]
    assert per[2]["hallucinated"] == [["chair", "chair"]] * 3
    assert per[2]["correct"] == [["bird", "bird"], ["toilet", "toilet"]]
    assert per[2]["chair_i"] == pytest.approx(3 / 5)
    assert per[3]["mentions"] == [] and per[3]["chair_s"] == 0 and per[3]["chair_i"] == 0.0
    assert per[3]["num_words"] == 0 and per[3]["recall"] == 0.0
    assert per[4]["hallucinated"] == [] and per[4]["recall"] == 1.0
    assert per[5]["hallucinated"] == [["sofa", "couch"]]
    assert per[5]["ground_truth"] == ["person", "skis"]
    # Corpus CHAIR_I pools mentions (5/17); the mean of per-caption values would differ.
    mean_of_captions = sum(c["chair_i"] for c in result["captions"]) / 5
    assert mean_of_captions == pytest.approx((1 / 5 + 3 / 5 + 0 + 0 + 1 / 3) / 5)
    assert m["chair_i"] != pytest.approx(mean_of_captions)


def test_no_mentions_at_all_gives_zero_not_an_error(coco):
    m = evaluate_chair([(3, "Nothing to see."), (6, "")], coco)["metrics"]
    assert (m["chair_s"], m["chair_i"], m["num_mentions"]) == (0.0, 0.0, 0)


# ---- files and errors -------------------------------------------------------------------------


def test_read_captions_accepts_empty_captions_and_string_ids(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image_id": 3, "caption": ""}\n{"image_id": "5", "caption": "A sofa."}\n')
    assert read_captions(path) == [(3, ""), (5, "A sofa.")]


@pytest.mark.parametrize(
    "lines, match",
    [
        ('{"image_id": 3}\n', r"caps\.jsonl: record 1 \(image_id 3\): field 'caption'"),
        ('{"caption": "x"}\n', r"caps\.jsonl: record 1: field 'image_id' is missing"),
        ('{"image_id": 3, "caption": "a"}\n{"image_id": 3, "caption": "b"}\n', r"caps\.jsonl: image_id 3 is captioned twice"),
        ('{"image_id": 3, "caption": "a"\n', r"caps\.jsonl:1: invalid JSON"),
    ],
)
def test_bad_captions_file_names_file_and_record(tmp_path, lines, match):
    path = tmp_path / "caps.jsonl"
    path.write_text(lines)
    with pytest.raises(ValueError, match=match):
        read_captions(path)


def test_caption_for_unknown_image_names_annotation_file_and_id(coco, tmp_path):
    with pytest.raises(AnnotationError, match=r"instances_val2014\.json: no image with id 99 \(requested by caps\.jsonl\)"):
        evaluate_chair([(1, "A dog."), (99, "A cat.")], coco, source="caps.jsonl")


def test_image_missing_from_captions_annotations_names_that_file(tmp_path):
    _, cap_path = write_coco(tmp_path, IMAGES)
    data = json.loads(cap_path.read_text())
    data["images"] = [im for im in data["images"] if im["id"] != 4]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 4]
    cap_path.write_text(json.dumps(data))
    coco = load_coco(tmp_path)
    with pytest.raises(AnnotationError, match=r"captions_val2014\.json: no image with id 4"):
        evaluate_chair([(4, "A teddy bear.")], coco)


def _corrupt(tmp_path, which, change):
    inst_path, cap_path = write_coco(tmp_path, IMAGES)
    path = inst_path if which == "instances" else cap_path
    if change is None:
        path.write_text("{not json")
    else:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "which, change, match",
    [
        ("instances", None, r"instances_val2014\.json: invalid JSON"),
        ("captions", None, r"captions_val2014\.json: invalid JSON"),
        ("instances", lambda d: d.pop("categories"), r"instances_val2014\.json: top-level field 'categories' is missing"),
        ("instances", lambda d: d["annotations"][0].pop("category_id"),
         r"instances_val2014\.json: annotation #0 \(id 1\): field 'category_id' is missing"),
        ("instances", lambda d: d["annotations"][0].update(image_id=42),
         r"instances_val2014\.json: annotation #0 refers to image id 42, which is not in 'images'"),
        ("instances", lambda d: d["annotations"][1].update(category_id=1000),
         r"instances_val2014\.json: annotation #1 \(image id 1\) refers to category id 1000"),
        ("instances", lambda d: d["images"][0].pop("file_name"),
         r"instances_val2014\.json: image id 1: field 'file_name' is missing"),
        ("captions", lambda d: d["annotations"][2].update(image_id=77),
         r"captions_val2014\.json: annotation #2 refers to image id 77"),
        ("captions", lambda d: d["annotations"][0].pop("caption"),
         r"captions_val2014\.json: annotation #0 \(image id 1\): field 'caption' is missing"),
    ],
)  # fmt: skip
def test_malformed_annotations_name_file_and_id(tmp_path, which, change, match):
    _corrupt(tmp_path, which, change)
    with pytest.raises(AnnotationError, match=match):
        load_coco(tmp_path)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(AnnotationError, match=r"nowhere/instances_val2014\.json: instances file not found"):
        load_coco(tmp_path / "nowhere")


def test_non_coco_category_is_named(tmp_path):
    inst_path, _ = write_coco(tmp_path, IMAGES)
    data = json.loads(inst_path.read_text())
    data["categories"][0]["name"] = "spaceship"  # category of image 1's person
    inst_path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"instances_val2014\.json: category 'spaceship' \(on image id 1\)"):
        evaluate_chair([(1, "A dog.")], load_coco(tmp_path))
