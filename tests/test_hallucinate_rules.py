"""Stage 1, rules backend: every change is reported, injected objects are absent from the ground
truth, results are deterministic and resumable, and the recipe writes POVID's record format."""

import json
import random
import re
from collections import Counter

import pytest

import povid_hallucinate
from povid_data.hallucinate import check_rewrite, clean_rewrite, ValidationRules
from povid_data.hallucinate_rules import (
    KINDS,
    CooccurrenceTable,
    ObjectVocabulary,
    RulesHallucinator,
    apply_edits,
    pluralize,
)

ANSWERS = [
    "A man rides a red bus next to two cars on the left side of the street. The bus is likely "
    "heading downtown because it is morning.",
    "A dog sits on a couch next to a cat. There are three cups on the table.",
    "A brown dog and a white cat share a couch in a living room with a television.",
    "A woman holds an umbrella near a bench. A dog runs behind her.",
    "Two zebras and a giraffe graze in a field, near a car.",
    "A pizza with broccoli on a dining table, with a fork and a knife beside a wine glass.",
    "Several people stand above a small boat on the shore; 3 kites fly in the blue sky.",
    "A laptop, a keyboard and a computer mouse are on a wooden desk in front of a window.",
    "A giraffe stands below a tall tree while two zebras drink from a pond.",
    "A cat sleeps on a bed beside a teddy bear and a book.",
    "The kitchen has a refrigerator, an oven and a sink; a bowl of apples sits inside a cabinet.",
    "An orange train waits at the station while people walk toward it.",
    "The scene is quiet and empty.",
]
QUESTIONS = ["Describe this image in detail.", "What is happening here?"]


def _records():
    records = []
    for i, answer in enumerate(ANSWERS):
        records.append({
            "id": f"img{i:03d}", "image": f"coco/{i}.jpg",
            "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[i % 2]}"},
                              {"from": "gpt", "value": answer}],
        })  # fmt: skip
    # The question names a cat, the dog's most frequent companion: it must never be injected.
    records.append({
        "id": "catq", "image": "coco/c.jpg",
        "conversations": [{"from": "human", "value": "<image>\nIs there a cat near the dog?"},
                          {"from": "gpt", "value": "No, a dog sits alone by the door."}],
    })  # fmt: skip
    # Multi-turn: an earlier turn names a fridge; it must never be injected into the last answer.
    records.append({
        "id": 9999, "image": "coco/x.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the corner?"},
            {"from": "gpt", "value": "A fridge and a microwave."},
            {"from": "human", "value": "And on the counter?"},
            {"from": "gpt", "value": "A toaster sits on the counter next to two green bottles."},
        ],
    })  # fmt: skip
    return records


def _gt_text(record):
    return "\n".join(t["value"] for t in record["conversations"])


@pytest.fixture(scope="module")
def vocabulary():
    return ObjectVocabulary()


@pytest.fixture(scope="module")
def table(vocabulary):
    # As the recipe builds it: from the answers (gpt turns) of every record.
    answers = (" ".join(t["value"] for t in r["conversations"][1::2]) for r in _records())
    return CooccurrenceTable.from_texts(answers, vocabulary)


def _replay(text, edits):
    """Our own replay (not the module's apply_edits): the rewrite must be exactly the original
    with each reported span replaced, in order."""
    for e in edits:
        assert text[e["offset"] : e["offset"] + len(e["from"])] == e["from"], e
        text = text[: e["offset"]] + e["to"] + text[e["offset"] + len(e["from"]) :]
    return text


# ---- vocabulary and table ---------------------------------------------------------------------


def test_pluralize_and_mentions(vocabulary):
    assert [pluralize(w) for w in ["bus", "knife", "hot dog", "toothbrush", "sheep", "person", "cup"]] == [
        "buses", "knives", "hot dogs", "toothbrushes", "sheep", "people", "cups"]  # fmt: skip
    mentions = vocabulary.mentions("Hot dogs, a dog, two Televisions and a wine glass; a catch.")
    assert [(m.category, m.plural) for m in mentions] == [
        ("hot dog", True), ("dog", False), ("tv", True), ("wine glass", False)]  # fmt: skip


def test_cooccurrence_table_counts_pairs_per_record(table):
    # dog and cat are named together in two answers; zebra and giraffe in two.
    assert table.pairs["dog"]["cat"] == 2 and table.pairs["cat"]["dog"] == 2
    assert table.frequency["zebra"] == 2 and table.pairs["zebra"]["giraffe"] == 2
    top = table.companions({"zebra"}, exclude={"zebra"})
    assert top[0] == ("giraffe", 2)


# ---- the two must-shows -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rules_change_only_what_they_report(table, seed):
    hallucinator = RulesHallucinator(table, seed=seed)
    for record in _records():
        answer = record["conversations"][-1]["value"]
        rewrite = hallucinator.rewrite(str(record["id"]), answer, _gt_text(record))
        assert rewrite.edits, f"no edit for {record['id']}"
        assert _replay(answer, rewrite.edits) == rewrite.text
        assert all(e["from"] != e["to"] and e["kind"] in KINDS for e in rewrite.edits)
        assert rewrite.kinds == list(dict.fromkeys(e["kind"] for e in rewrite.edits))
        assert rewrite.text != answer and apply_edits(answer, rewrite.edits) == rewrite.text
    with pytest.raises(ValueError, match="does not match"):
        apply_edits("A red bus.", [{"kind": "attribute", "offset": 3, "from": "red", "to": "blue"}])


@pytest.mark.parametrize("seed", range(8))
def test_injected_objects_are_absent_from_ground_truth(table, vocabulary, seed):
    # Both object kinds on every record that allows them, so every record is checked.
    hallucinator = RulesHallucinator(table, seed=seed, kinds=["object_addition", "object_swap"], extra_edit_rate=1.0)
    injected = 0
    for record in _records():
        answer = record["conversations"][-1]["value"]
        ground_truth = _gt_text(record)
        present = vocabulary.categories(ground_truth)
        rewrite = hallucinator.rewrite(str(record["id"]), answer, ground_truth)
        for edit in rewrite.edits:
            if edit["kind"] not in ("object_addition", "object_swap"):
                continue
            injected += 1
            assert edit["object"] not in present, (record["id"], edit)
            # Independently of the detector: none of the object's nouns, singular or plural,
            # occurs as a word anywhere in the record's conversation.
            for noun in vocabulary.synonyms[edit["object"]]:
                for form in (noun, pluralize(noun)):
                    assert not re.search(rf"\b{re.escape(form)}\b", ground_truth, re.IGNORECASE), (
                        record["id"], edit, form)  # fmt: skip
            # ... and the injected object really is in the rewrite.
            assert edit["object"] in vocabulary.categories(rewrite.text)
    assert injected >= len(ANSWERS)


def test_question_and_earlier_turns_count_as_ground_truth(table, vocabulary):
    by_id = {r["id"]: r for r in _records()}
    assert table.companions({"dog"}, {"dog"})[0][0] == "cat"
    for record_id in ("catq", 9999):
        record = by_id[record_id]
        turns = record["conversations"]
        context = "\n".join(t["value"] for t in turns[:-1])
        banned = vocabulary.categories(context)
        assert banned & {"cat", "refrigerator"}
        for seed in range(20):
            rewrite = RulesHallucinator(table, seed=seed).rewrite(record_id, turns[-1]["value"], context)
            assert all(e.get("object") not in banned for e in rewrite.edits)


# ---- determinism ------------------------------------------------------------------------------


def test_same_seed_same_result_in_any_order_and_seed_matters(table):
    records = _records()
    first = {r["id"]: RulesHallucinator(table, seed=7).rewrite(str(r["id"]), r["conversations"][-1]["value"])
             for r in records}  # fmt: skip
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    hallucinator = RulesHallucinator(table, seed=7)
    for r in shuffled:
        again = hallucinator.rewrite(str(r["id"]), r["conversations"][-1]["value"])
        assert again.text == first[r["id"]].text and again.edits == first[r["id"]].edits
    other = RulesHallucinator(table, seed=8)
    assert any(other.rewrite(str(r["id"]), r["conversations"][-1]["value"]).text != first[r["id"]].text
               for r in records)  # fmt: skip


def test_max_edits_and_kinds_limit_the_edits(table):
    hallucinator = RulesHallucinator(table, seed=0, max_edits=2)
    for record in _records():
        rewrite = hallucinator.rewrite(record["id"], record["conversations"][-1]["value"])
        assert 1 <= len(rewrite.kinds) <= 2
    only_colour = RulesHallucinator(table, seed=0, kinds=["attribute"])
    rewrite = only_colour.rewrite("x", "A red bus and a white car.")
    assert rewrite.kinds == ["attribute"] and len(rewrite.edits) == 1
    assert only_colour.rewrite("x", "Nothing to see.").edits == []
    with pytest.raises(ValueError, match="unknown rules kinds"):
        RulesHallucinator(table, kinds=["colour"])


def test_edit_details(table):
    h = RulesHallucinator(table, seed=0, kinds=["object_swap"])
    rewrite = h.rewrite("a", "An umbrella is open. The umbrella is big.")
    # Every mention of the swapped noun changes, with the article fixed.
    assert len(rewrite.edits) == 2 and "umbrella" not in rewrite.text.lower()
    assert re.match(r"An? \w", rewrite.text)
    counts = RulesHallucinator(table, seed=0, kinds=["count"])
    assert counts.rewrite("b", "In 1999 at 3:30, 2.5 meters away.").edits == []  # no counts here
    relation = RulesHallucinator(table, seed=0, kinds=["relation"])
    assert relation.rewrite("c", "He left the room, all right.").edits == []  # left/right not sides
    assert relation.rewrite("c", "A cup to the left of a plate.").text == "A cup to the right of a plate."


def test_only_seen_injects_only_objects_and_colours_the_data_mentions(vocabulary):
    # A narrow domain: two food objects and two colours. COCO would offer a sandwich for a pizza
    # and brown for red; with only_seen a rewrite stays in the data's own words.
    answers = ["A red pizza and a blue donut.", "A red pizza.", "A blue donut.", "A red donut and a blue pizza."]
    table = CooccurrenceTable.from_texts(answers, vocabulary)
    assert set(table.colours) == {"red", "blue"}
    narrow = RulesHallucinator(table, seed=0, kinds=["object_swap", "object_addition", "attribute"],
                               only_seen=True, vocabulary=vocabulary)  # fmt: skip
    broad = RulesHallucinator(table, seed=0, kinds=["object_swap", "object_addition", "attribute"],
                              vocabulary=vocabulary)  # fmt: skip
    narrow_words, broad_words = set(), set()
    for i in range(40):
        for h, words in ((narrow, narrow_words), (broad, broad_words)):
            for edit in h.rewrite(f"r{i}", "A red pizza is on the table.").edits:
                words.update(re.findall(r"[a-z]+", edit["to"].lower()))
    # The pizza's only seen companion is a donut; red can only become blue.
    assert {"donut", "blue"} <= narrow_words
    assert not narrow_words & ({"sandwich", "cake", "hot", "dog"} | set(c for c in _all_colours() if c not in ("red", "blue")))
    assert broad_words - narrow_words  # without it, other COCO objects or colours appear


def _all_colours():
    from povid_data.hallucinate_rules import _COLOURS

    return _COLOURS


# ---- validation helpers -----------------------------------------------------------------------


def test_check_rewrite_reasons():
    rules = ValidationRules()
    original = "A red bus is parked next to two cars on a sunny street."
    assert check_rewrite(original, "A blue bus is parked next to three cars on a sunny street.", rules) is None
    assert check_rewrite(original, "  ", rules) == "empty"
    assert check_rewrite(original, "a red  bus is parked next to two cars on a SUNNY street.", rules) == "unchanged"
    assert check_rewrite(original, "I'm sorry, but I can't help with that request.", rules) == "refusal"
    assert check_rewrite(original, "I\u2019m unable to describe it.", rules) == "refusal"
    assert check_rewrite(original, "A bus.", rules) == "too_short"
    assert check_rewrite(original, original + " And more." * 20, rules) == "too_long"
    assert clean_rewrite('  "A blue bus."  ') == "A blue bus."
    assert clean_rewrite('"A" and "B"') == '"A" and "B"'


# ---- the recipe -------------------------------------------------------------------------------


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _run(*overrides):
    return povid_hallucinate.main(["--config", "povid_hallucinate_rules", *overrides])


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_recipe_writes_povid_records_and_resumes_identically(tmp_path, vocabulary):
    records = _records()
    data = tmp_path / "data.jsonl"
    _write(data, records)
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run(f"data_file={data}", f"output_dir={full}", "seed=3") == 0
    rows = _lines(full / "preferences.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert _lines(full / "rejects.jsonl") == []
    for record, row in zip(records, rows):
        # The input's fields unchanged, plus POVID's rejected conversation and our metadata.
        assert {k: row[k] for k in record} == record
        assert set(row) == set(record) | {"rejected_conversations", "povid_meta"}
        chosen, rejected = record["conversations"], row["rejected_conversations"]
        assert rejected[:-1] == chosen[:-1] and rejected[-1]["from"] == "gpt"
        meta = row["povid_meta"]["stage1"]
        assert meta["backend"] == "rules" and meta["seed"] == 3 and meta["model"].startswith("povid-rules")
        assert meta["kinds"] == list(dict.fromkeys(e["kind"] for e in meta["edits"]))
        assert _replay(chosen[-1]["value"], meta["edits"]) == rejected[-1]["value"]

    # A partial run (first 5), then a crash mid-line, then the rest: same file content as one go.
    assert _run(f"data_file={data}", f"output_dir={part}", "seed=3", "limit=5", "flush_every=2") == 0
    out = part / "preferences.jsonl"
    out.write_text(out.read_text() + '{"id": "img005", "conversa')
    assert _run(f"data_file={data}", f"output_dir={part}", "seed=3") == 0
    assert _lines(out) == rows


def test_records_with_nothing_to_change_go_to_rejects(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(_records()))  # a JSON list, as POVID publishes
    assert _run(f"data_file={data}", f"output_dir={tmp_path}", "rules.kinds=[count]") == 0
    written = {r["id"] for r in _lines(tmp_path / "preferences.jsonl")}
    rejects = _lines(tmp_path / "rejects.jsonl")
    # The answers with a count (two cars, three cups, Two zebras, 3 kites, two zebras, two bottles).
    assert written == {"img000", "img001", "img004", "img006", "img008", 9999}
    assert {r["reason"] for r in rejects} == {"no_applicable_edit"}
    assert written | {r["id"] for r in rejects} == {r["id"] for r in _records()}
    assert len(rejects) == len(_records()) - len(written)
    assert "rejected (no_applicable_edit:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "problem, match",
    [
        ("no_conversations", r"data\.jsonl: record id='img001': field 'conversations': expected a list"),
        ("last_turn_human", r"record id='img001': field 'conversations': turn 1 has from='human'"),
        ("no_id", r"data\.jsonl: record #1: field 'id' is missing"),
        ("duplicate_id", r"record id='img000' appears more than once"),
    ],
)
def test_bad_records_fail_before_touching_existing_output(tmp_path, problem, match):
    records = _records()[:3]
    if problem == "no_conversations":
        del records[1]["conversations"]
    elif problem == "last_turn_human":
        records[1]["conversations"][1]["from"] = "human"
    elif problem == "no_id":
        del records[1]["id"]
    elif problem == "duplicate_id":
        records[1]["id"] = records[0]["id"]
    data = tmp_path / "data.jsonl"
    _write(data, records)
    existing = '{"id": "img000", "kept": true}\n'
    (tmp_path / "preferences.jsonl").write_text(existing)
    with pytest.raises(ValueError, match=match):
        _run(f"data_file={data}", f"output_dir={tmp_path}")
    assert (tmp_path / "preferences.jsonl").read_text() == existing


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    _write(data, _records())
    assert _run(f"data_file={data}", f"output_dir={tmp_path / 'out'}", "dry_run=true", "dry_run_count=2") == 0
    out = capsys.readouterr().out
    assert '"edits"' in out and f"showed 2 of {len(_records())}" in out
    assert not (tmp_path / "out").exists()


# ---- rewrites a capable model would write: boundaries, counts, one or two changes ------------

# An object described over two sentences, then a closing summary and a total.
DESCRIBED = ("A dog sits on a couch. It is brown and fluffy. A cat sleeps on a bed. Overall, the room "
             "looks cozy. There are two objects in total.")  # fmt: skip
_NUMBER = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"])}


def _total(text):
    """The total a text states, read independently of the module's patterns."""
    match = re.search(r"There (is|are) (\w+) (object|objects) in total\.", text)
    assert match, text
    verb, number, noun = match.groups()
    n = _NUMBER[number]
    assert (verb, noun) == (("is", "object") if n == 1 else ("are", "objects")), text  # agreement
    return n


@pytest.mark.parametrize("seed", range(30))
def test_an_added_object_is_a_new_sentence_where_one_about_an_object_may_go(table, seed):
    h = RulesHallucinator(table, seed=seed, kinds=["object_addition"])
    rewrite = h.rewrite(f"r{seed}", DESCRIBED)
    added = next(e for e in rewrite.edits if e.get("role") != "total_count")
    at = added["offset"]
    # Not before the first sentence, not between "A dog sits on a couch." and "It is brown",
    # not after the closing summary or total: so after "fluffy." or after "bed."
    assert at in (DESCRIBED.index(" A cat"), DESCRIBED.index(" Overall")), rewrite.text
    assert added["to"].startswith(" ") and added["to"].rstrip()[-1] == "." and added["to"][1].isupper()
    # The stated total counts the new object.
    assert _total(rewrite.text) == _total(DESCRIBED) + 1
    assert _replay(DESCRIBED, rewrite.edits) == rewrite.text
    # A one-object total becomes a plural one.
    one = RulesHallucinator(table, seed=seed, kinds=["object_addition"]).rewrite("x", "A red bus is parked. There is one object in total.")
    assert _total(one.text) == 2 and one.text.index("There are two objects") > one.text.index("bus")


@pytest.mark.parametrize("seed", range(20))
def test_a_changed_count_changes_its_number_word_and_the_total(table, vocabulary, seed):
    text = "Two dogs sit on a couch next to three small cups. There are five objects in total."
    rewrite = RulesHallucinator(table, seed=seed, kinds=["count"]).rewrite(f"c{seed}", text)
    (count,) = [e for e in rewrite.edits if e.get("role") != "total_count"]
    old, new = _NUMBER[count["from"].lower()], _NUMBER[count["to"].lower()]
    assert new >= 2 and new != old and count["to"][0].isupper() == count["from"][0].isupper()
    # The noun it counts is still plural, and the total moved by the same amount.
    noun = next(m for m in vocabulary.mentions(rewrite.text) if m.start > count["offset"])
    assert noun.plural
    assert _total(rewrite.text) == 5 + new - old
    assert _replay(text, rewrite.edits) == rewrite.text
    # A number that counts no object ("two hours") is left alone.
    assert RulesHallucinator(table, seed=seed, kinds=["count"]).rewrite("d", "They waited two hours.").edits == []


def test_one_or_two_changes_never_three_with_addition_the_most_common(table):
    h = RulesHallucinator(table, seed=0)
    changes, kinds = Counter(), Counter()
    for seed in range(40):
        for record in _records():
            rewrite = RulesHallucinator(table, seed=seed).rewrite(record["id"], record["conversations"][-1]["value"])
            changes[len(rewrite.kinds)] += 1
            kinds.update(rewrite.kinds)
    assert set(changes) <= {1, 2} and changes[1] > changes[2] > 0
    assert kinds.most_common(1)[0][0] == "object_addition"
    assert all(len(RulesHallucinator(table, seed=s, max_edits=1).rewrite("a", ANSWERS[0]).kinds) == 1 for s in range(20))
    assert h.max_edits == 2


def test_rules_additions_on_world_captions_stay_world_captions(vocabulary):
    # With the world's sentences as templates (addition_templates()), an added object goes after
    # a whole object description and the count sentence follows: the rewrite still parses.
    from povid_data.synthetic_world import addition_templates, caption, max_caption_objects, parse_caption, sample_scene

    rng = random.Random(0)
    scenes = [sample_scene(rng, 0.8) for _ in range(200)]
    texts = [caption(s) for s in scenes]
    table = CooccurrenceTable.from_texts(texts, vocabulary)
    h = RulesHallucinator(table, seed=0, kinds=["object_addition"], only_seen=True,
                          addition_templates=addition_templates(), vocabulary=vocabulary)  # fmt: skip
    for i, (scene, text) in enumerate(zip(scenes, texts)):
        if len(scene.objects) == max_caption_objects():
            continue  # "four objects" is not world grammar: the rules backend does not know that
        rewrite = h.rewrite(i, text)
        parsed = parse_caption(rewrite.text)
        assert len(parsed.objects) == len(scene.objects) + 1
