"""CHAIR's reference mode (the original script's counting) against corrected mode.

Every expected list below was worked out by hand from the original's rules (NLTK's
tokenizer, Pattern 3.6's singularize, the original synonym and two-word tables; see
povid/metrics/CHAIR.md). tests/data/chair_reference_parity.jsonl holds captions written for
this test with the mention lists the original script gives them (run once, outside the
repository, with NLTK 3.10.4's tokenizers and Pattern 3.6's singularize rules).
"""

import json
from pathlib import Path

import pytest

from _coco import write_coco
from povid.metrics.chair import (
    CHAIR_MODES,
    DEFAULT_CHAIR_MODE,
    check_chair_mode,
    evaluate_chair,
    find_objects,
    ground_truth_objects,
)
from povid.metrics.chair_reference import (
    REFERENCE_SYNONYMS,
    pattern_singularize,
    punkt_sentences,
    reference_tokenize,
)
from povid.metrics.coco import load_coco

PARITY_FILE = Path(__file__).parent / "data" / "chair_reference_parity.jsonl"


def _objects(caption, mode):
    return [m.object for m in find_objects(caption, mode=mode)]


def test_reference_is_the_default_and_modes_are_checked():
    assert DEFAULT_CHAIR_MODE == "reference" and CHAIR_MODES == ("reference", "corrected")
    assert _objects("A bus.", DEFAULT_CHAIR_MODE) == _objects("A bus.", "reference") == []
    with pytest.raises(ValueError, match=r"chair\.mode must be one of 'reference', 'corrected', got 'Reference'"):
        check_chair_mode("Reference")
    with pytest.raises(ValueError, match=r"got 'exact'"):
        find_objects("A dog.", mode="exact")


# ---- Pattern's singularizer -------------------------------------------------------------------


@pytest.mark.parametrize(
    "word, singular",
    [
        ("bus", "bu"),  # rule "s$": the singular loses its s ...
        ("buses", "bus"),  # ... the plural has its own rule "(bus)es$"
        ("minibus", "minibu"), ("airbus", "airbu"),
        ("ties", "ty"),  # "([^aeiouy]|qu)ies$" -> y; the "^tie" exception never matches
        ("tie", "tie"),
        ("glass", "glas"),  # hence the original's extra two-word entry "wine glas"
        ("glasses", "glass"),  # "(x|ch|ss|sh)es$"
        ("people", "person"), ("children", "child"), ("women", "woman"), ("policemen", "policeman"),
        ("canoes", "cano"),  # "(o)es$"
        ("shoes", "shoe"), ("cookies", "cookies"), ("doggies", "doggies"),  # "-ie" words kept as is
        ("magpies", "magpy"), ("knives", "knife"), ("calves", "calf"), ("stoves", "stove"),
        ("mice", "mouse"), ("police", "polouse"), ("skis", "ski"), ("taxis", "taxi"),
        ("tennis", "tenni"), ("series", "series"), ("scissors", "scissors"), ("sheep", "sheep"),
        ("ice", "ice"),  # the end of an uncountable word ("rice") is kept
        ("safari", "safarus"),  # "([octop|vir])i$" is a character class
        ("your", "ymy"),  # irregular "our" -> "my" matches word endings
        ("dogs'", "dog's"), ("mothers-in-law", "mother-in-law"), ("hot-dogs", "hot-dog"),
    ],
)  # fmt: skip
def test_pattern_singularize_reproduces_its_rules_and_quirks(word, singular):
    assert pattern_singularize(word) == singular


# ---- NLTK's tokenizer -------------------------------------------------------------------------


def test_tokenizer_splits_a_period_only_at_sentence_ends():
    # Punkt ends a sentence after "dog." (a space follows); without the space, "dog.a" is one
    # token. A number or an initial before a lower-case word does not end a sentence.
    assert punkt_sentences("a dog. a cat.a bird") == ["a dog.", "a cat.a bird"]
    assert reference_tokenize("A dog. A cat.A bird") == ["a", "dog", ".", "a", "cat.a", "bird"]
    assert reference_tokenize("Step 2. the dog") == ["step", "2.", "the", "dog"]
    assert reference_tokenize('He said "hot dog." (A dog.) Isn\'t it?') == [
        "he", "said", "``", "hot", "dog", ".", "''", "(", "a", "dog", ".", ")", "is", "n't", "it", "?",
    ]  # fmt: skip
    assert reference_tokenize("A hot\ndog, a cat; a dog's bone... done") == [
        "a", "hot", "dog", ",", "a", "cat", ";", "a", "dog", "'s", "bone", "...", "done",
    ]  # fmt: skip


# ---- each quirk, counted by hand in both modes -------------------------------------------------

QUIRKS = [
    # (caption, reference objects, corrected objects)
    # bus: Pattern turns the singular into "bu" (no object), the plural into "bus".
    ("A bus parked next to two buses.", ["bus"], ["bus", "bus"]),
    ("A minibus.", [], ["bus"]),
    # ties: "ties" -> "ty" (no object); "tie" stays; "bow tie" is a two-word tie.
    ("A man in a tie holds two ties and a bow tie.", ["person", "tie", "tie"], ["person", "tie", "tie", "tie"]),
    # glasses: "glasses" -> "glass" (no object alone); "wine glasses" -> "wine glass" and
    # "wine glass" -> "wine glas" -> wine glass: the same in both modes.
    ("A man wearing glasses holds two wine glasses and a wine glass.", ["person", "wine glass", "wine glass"],
     ["person", "wine glass", "wine glass"]),
    # people: "people" and "persons" are a person in both modes, every mention counted.
    ("People watch the people and two persons.", ["person"] * 3, ["person"] * 3),
    # a two-word object split by a line break is still one object (the tokens are adjacent) ...
    ("A hot\ndog and a teddy\nbear.", ["hot dog", "teddy bear"], ["hot dog", "teddy bear"]),
    # ... but not across a sentence end: NLTK keeps the period as a token between the words,
    # corrected mode drops punctuation and joins "hot" + "dog".
    ("The stove is hot. Dog food is on the floor.", ["oven", "dog"], ["oven", "hot dog"]),
    # "motor bike": the original's synonym entry is " motor bike" (split on ", " after a double
    # space), so the joined pair names nothing, and "bike" is used up by the pair.
    ("A motor\nbike.", [], ["motorcycle"]),
    # punctuation: without a space after a period, "dog.a" is one token and names nothing.
    ("A dog.A cat on a chair!", ["cat", "chair"], ["dog", "cat", "chair"]),
    ("A cat, a dog; a chair: (a bed) and a \"couch\".", ["cat", "dog", "chair", "bed", "couch"],
     ["cat", "dog", "chair", "bed", "couch"]),
    # repeated mentions: each one counts, in both modes.
    ("A dog, a dog and a dog chase two dogs.", ["dog"] * 4, ["dog"] * 4),
    # synonym tables: " cheesecake" (leading space) never matches; "panda" is a bear only in
    # the original, "grizzly" only in corrected mode; "iPhone" never matches after lower-casing.
    ("A cheesecake, a panda, a grizzly and an iPhone.", ["bear"], ["cake", "bear", "cell phone"]),
    ("A hair dryer, a blow dryer and a meter.", [], ["hair drier", "hair drier", "parking meter"]),
    # Pattern's other word-dropping rules: "canoes" -> "cano", "doggies" / "collies" kept as
    # they are, "magpies" -> "magpy"; the singulars still count.
    ("Two canoes, three doggies, two collies, magpies and a canoe.", ["boat"], ["boat", "dog", "dog", "bird", "boat"]),
    # special cases shared by both modes: the toilet's seat, baby animals, passenger vehicles.
    ("A toilet seat, and the seat of a toilet.", ["toilet", "toilet"], ["toilet", "toilet"]),
    ("A baby bird, a baby and a passenger train.", ["bird", "person", "train"], ["bird", "person", "train"]),
    ("Train tracks near home plate.", [], []),
    ("", [], []),
]  # fmt: skip


@pytest.mark.parametrize("caption, reference, corrected", QUIRKS)
def test_each_quirk_counted_by_hand(caption, reference, corrected):
    assert _objects(caption, "reference") == reference
    assert _objects(caption, "corrected") == corrected


def test_reference_words_are_the_originals():
    mentions = find_objects("Two hot dogs and the seat of a toilet. Puppies!", mode="reference")
    assert [(m.word, m.object) for m in mentions] == [("hot dog", "hot dog"), ("toilet", "toilet"), ("puppy", "dog")]


# ---- scores -----------------------------------------------------------------------------------

IMAGES = {
    1: (["bus", "person"], ["A bus on a street."]),  # ground truth from the instances
    2: (["person"], ["A man with a tie and a bus."]),  # reference: no tie or bus from "ties"/"bus"
    3: (["cake"], ["A cheesecake on a plate."]),
}
CAPTIONS = [
    # reference: person (man), bus (buses) = 2 mentions, none hallucinated
    # corrected: person, bus, bus = 3 mentions, none hallucinated
    (1, "A man waits for a bus while two buses pass."),
    # ground truth: reference {person, tie} ("bus" names nothing); corrected {person, tie, bus}
    # reference: person, tie (bow tie), ... "ties" -> "ty" nothing: 2 mentions, 0 hallucinated
    # corrected: person, tie, tie, bus: 4 mentions, 0 hallucinated
    (2, "A man in a bow tie, two ties and a bus."),
    # reference: cake (cupcake), dog: the dog is hallucinated -> 1 of 2
    # corrected: cake (cheesecake), cake (cupcake), dog -> 1 of 3
    (3, "A cheesecake, a cupcake and a dog."),
]


@pytest.fixture
def coco(tmp_path):
    write_coco(tmp_path, IMAGES)
    return load_coco(tmp_path)


def test_ground_truth_captions_are_read_with_the_same_mode(coco):
    assert ground_truth_objects(coco, 2, "reference") == {"person", "tie"}
    assert ground_truth_objects(coco, 2, "corrected") == {"person", "tie", "bus"}


def test_hand_worked_scores_in_both_modes(coco):
    ref = evaluate_chair(CAPTIONS, coco, mode="reference")["metrics"]
    assert (ref["num_mentions"], ref["num_hallucinated_mentions"], ref["num_hallucinated_captions"]) == (6, 1, 1)
    assert ref["chair_i"] == pytest.approx(1 / 6) and ref["chair_s"] == pytest.approx(1 / 3)
    # recall: {person, bus} 2 of 2, {person, tie} 2 of 2, {cake} 1 of 1
    assert (ref["num_correct_objects"], ref["num_ground_truth_objects"]) == (5, 5)
    cor = evaluate_chair(CAPTIONS, coco, mode="corrected")["metrics"]
    assert (cor["num_mentions"], cor["num_hallucinated_mentions"], cor["num_hallucinated_captions"]) == (10, 1, 1)
    assert cor["chair_i"] == pytest.approx(1 / 10)
    # recall: {person, bus} 2/2, {person, tie, bus} 3/3, {cake} 1/1
    assert (cor["num_correct_objects"], cor["num_ground_truth_objects"]) == (6, 6)
    assert ref["mean_length"] == cor["mean_length"]  # words, counted alike in both modes


# ---- parity with the original script ----------------------------------------------------------


def test_mentions_match_the_original_script_on_written_captions():
    records = [json.loads(line) for line in PARITY_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(records) > 400
    differing = [
        r["caption"]
        for r in records
        if [[m.word, m.object] for m in find_objects(r["caption"], mode="reference")] != r["mentions"]
    ]
    assert differing == []


def test_reference_table_parses_like_the_original():
    # The original splits each line on ", ": double spaces leave entries with a leading space.
    assert REFERENCE_SYNONYMS[" cheesecake"] == "cake" and "cheesecake" not in REFERENCE_SYNONYMS
    assert REFERENCE_SYNONYMS["bison"] == "cow"  # trailing space removed by strip()
    assert len(set(REFERENCE_SYNONYMS.values())) == 80


def _doc_objects(cell):
    """'person, tie ×3' -> ['person', 'tie', 'tie', 'tie']; 'none' -> []."""
    if cell.strip() == "none":
        return []
    out = []
    for item in cell.split(","):
        name, _, times = item.strip().partition(" ×")
        out += [name] * (int(times) if times else 1)
    return out


def test_every_example_in_chair_md_counts_as_documented():
    doc = Path(__file__).parent.parent / "povid" / "metrics" / "CHAIR.md"
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in doc.read_text(encoding="utf-8").splitlines()
        if line.startswith("|") and line.count('"') >= 2
    ]
    examples = [(r[1].strip('"'), r[2], r[3]) for r in rows if len(r) == 4 and r[1].startswith('"')]
    assert len(examples) == 18  # every row of the four difference tables
    for sentence, ref, cor in examples:
        assert _objects(sentence, "reference") == _doc_objects(ref), sentence
        assert _objects(sentence, "corrected") == _doc_objects(cor), sentence
