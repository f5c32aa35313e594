"""Stage 1 for the synthetic world: captions read back into scenes exactly, and the scene-level
injector's rewrites are world captions of another scene, replayable from their edits, count
consistent, never adding what is there, with the configured kind mix; the recipe's ``world``
backend writes POVID records and resumes."""

import json
import random
import re
from collections import Counter

import pytest
from omegaconf import OmegaConf

import povid_hallucinate
from povid.config import resolve_config
from povid_demo.chain import world_stage1_overrides
from povid_data.hallucinate_scene import DEFAULT_WEIGHTS, SCENE_KINDS, SceneInjector, in_caption_order, replay
from povid_data.synthetic_world import (
    COLOURS,
    COMPANION,
    KINDS,
    POSITIONS,
    SIZES,
    CaptionParseError,
    Scene,
    WorldConfig,
    WorldObject,
    caption,
    make_world,
    max_caption_objects,
    parse_caption,
    sample_scene,
    scene_problems,
)


def _scenes(n, seed=0, rate=0.8):
    rng = random.Random(seed)
    return [sample_scene(rng, rate) for _ in range(n)]


# Written out here, independently of the module: how a world caption states its count.
_COUNT_SENTENCE = re.compile(r"There (?:is|are) (one|two|three|four) objects? in total\.$")
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4}


def _stated_count(text):
    match = _COUNT_SENTENCE.search(text)
    assert match, text
    return _WORDS[match.group(1)]


# ---- parse_caption ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed, rate", [(0, 0.8), (1, 0.5), (2, 0.0), (3, 6 / 7)])
def test_parse_inverts_caption_on_sampled_scenes(seed, rate):
    for scene in _scenes(1500, seed, rate):
        assert parse_caption(caption(scene)) == scene
        assert scene_problems(scene) == []


def test_parse_inverts_caption_for_every_object_and_any_order():
    for kind in KINDS:
        for colour in COLOURS:
            for size in SIZES:
                for position in POSITIONS:
                    scene = Scene([WorldObject(kind, colour, size, position)])
                    assert parse_caption(caption(scene)) == scene
    # Out of caption order or sharing a quadrant: still grammatical, read back as written, and
    # scene_problems says why the world would not draw it.
    odd = Scene([WorldObject("kite", "red", "small", "top left"), WorldObject("pizza", "blue", "large", "top left")])
    assert parse_caption(caption(odd)) == odd
    assert set(scene_problems(odd)) == {"two objects share a quadrant", "objects are not in caption order"}


@pytest.mark.parametrize(
    "text, match",
    [
        ("A red bus on the street.", "after 0 object"),
        ("A pizza is in the top left corner. It is large and red. There are two objects in total.", "count is wrong"),
        # The old rules output: an object sentence between an object's two sentences.
        ("A pizza is in the top left corner. There is also a donut in the background. It is large and red. "
         "There is one object in total.", "after 0 object"),
        ("A pizza is in the top left corner. It is large and red. There is one object in total. "
         "A donut is in the top right corner. It is small and blue.", "not a caption"),
        ("A pizza is in the top left corner. It is huge and red. There is one object in total.", "not a caption"),
    ],
)  # fmt: skip
def test_text_that_is_not_a_caption_raises_a_clear_error(text, match):
    with pytest.raises(CaptionParseError, match=match):
        parse_caption(text)


def test_max_caption_objects_is_what_caption_can_say():
    assert max_caption_objects() == 4  # the caption names counts up to "four", one per quadrant
    assert all(len(s.objects) <= max_caption_objects() for s in _scenes(500))


# ---- the injector ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rewrites_replay_parse_differ_and_keep_counts(seed):
    injector = SceneInjector(seed=seed)
    for i, truth in enumerate(_scenes(800, seed=10 + seed)):
        rewrite = injector.rewrite(f"r{i}", truth)
        assert 1 <= len(rewrite.edits) <= 2
        # Replayed from its edits, the ground truth gives the rewrite exactly.
        assert replay(truth, rewrite.edits) == rewrite.scene
        assert caption(replay(truth, rewrite.edits)) == rewrite.text
        # A world caption of a scene the world could draw, not the ground truth's.
        parsed = parse_caption(rewrite.text)
        assert parsed == rewrite.scene and scene_problems(parsed) == []
        assert rewrite.text != caption(truth) and parsed != truth
        # The count sentence says how many objects are described.
        assert _stated_count(rewrite.text) == len(parsed.objects) == rewrite.text.count(" corner. It is ")
        for edit in rewrite.edits:
            assert edit["kind"] in SCENE_KINDS and edit["before"] != edit["after"]
            if edit["kind"] in ("object_addition", "object_swap"):
                # Never an object of the ground truth named as added or swapped in.
                assert edit["after"]["kind"] not in truth.kinds
            if edit["kind"] == "object_addition":
                assert edit["before"] is None and len(parsed.objects) > len(truth.objects)


def test_additions_bring_the_absent_companion_first():
    injector = SceneInjector(seed=0, weights={"object_addition": 1.0})
    sources = Counter()
    for i, truth in enumerate(_scenes(600, seed=5, rate=0.5)):
        absent = {COMPANION[k] for k in truth.kinds} - set(truth.kinds)
        rewrite = injector.rewrite(i, truth)
        for edit in rewrite.edits:
            sources[edit["source"]] += 1
            if absent and len(truth.objects) < max_caption_objects():
                assert edit["source"] == "companion" and edit["after"]["kind"] in absent
                assert COMPANION[edit["after"]["kind"]] == edit["companion_of"] in truth.kinds
    assert sources["companion"] and sources["other_kind"]
    strict = SceneInjector(seed=0, weights={"object_addition": 1.0}, addition_fallback=False)
    full_pair = Scene([WorldObject("pizza", "red", "small", "top left"), WorldObject("donut", "blue", "large", "top right")])
    assert strict.rewrite("x", full_pair).edits == []


def test_edit_kinds_change_what_they_say():
    one = Scene([WorldObject("book", "red", "small", "top left")])
    for kind in SCENE_KINDS:
        injector = SceneInjector(seed=0, weights={kind: 1.0}, extra_edit_rate=0.0)
        for i in range(30):
            (edit,) = injector.rewrite(i, one).edits
            before, after = edit["before"], edit["after"]
            if kind == "object_swap":  # the companion replaces it, in the same place and look
                assert after == {**before, "kind": "clock"}
            elif kind == "attribute":
                changed = {k for k in before if before[k] != after[k]}
                assert changed == {edit["attribute"]}
            elif kind == "relation":
                assert {k for k in before if before[k] != after[k]} == {"position"}
            else:
                assert after["kind"] == "clock" and after["position"] != "top left"


def test_kind_mix_is_as_configured():
    # On one-object scenes every kind can apply, so the first edit's kind follows the weights.
    weights = {"object_addition": 0.5, "object_swap": 0.2, "attribute": 0.2, "relation": 0.1}
    injector = SceneInjector(seed=0, weights=weights, extra_edit_rate=0.0)
    rng = random.Random(0)
    n = 4000
    kinds = Counter()
    for i in range(n):
        truth = Scene([WorldObject(rng.choice(KINDS), rng.choice(tuple(COLOURS)), rng.choice(tuple(SIZES)), rng.choice(POSITIONS))])
        kinds.update(injector.rewrite(i, truth).kinds)
    for kind, weight in weights.items():
        assert abs(kinds[kind] / n - weight) < 0.03, (kind, kinds)
    # Defaults, on the world's own preference distribution: additions in most pairs, every kind
    # present, the second edit about as often as configured.
    defaults = SceneInjector(seed=0)
    rewrites = [defaults.rewrite(i, s) for i, s in enumerate(_scenes(3000, seed=7))]
    with_addition = sum("object_addition" in r.kinds for r in rewrites) / len(rewrites)
    assert with_addition > 0.5
    assert {k for r in rewrites for k in r.kinds} == set(SCENE_KINDS)
    two = sum(len(r.edits) == 2 for r in rewrites) / len(rewrites)
    assert 0.15 < two < 0.3  # extra_edit_rate 0.25, where a second edit is possible
    assert DEFAULT_WEIGHTS["object_addition"] == max(DEFAULT_WEIGHTS.values())


def test_deterministic_by_seed_and_record_id_in_any_order():
    scenes = _scenes(200, seed=3)
    first = {i: SceneInjector(seed=4).rewrite(f"id{i}", s) for i, s in enumerate(scenes)}
    order = list(range(len(scenes)))
    random.Random(1).shuffle(order)
    again = SceneInjector(seed=4)
    for i in order:
        assert again.rewrite(f"id{i}", scenes[i]) == first[i]
    other = SceneInjector(seed=5)
    assert any(other.rewrite(f"id{i}", s).text != first[i].text for i, s in enumerate(scenes))


def test_context_kinds_are_never_injected_and_bad_settings_fail():
    truth = Scene([WorldObject("pizza", "red", "small", "top left")])
    injector = SceneInjector(seed=0, weights={"object_addition": 1.0, "object_swap": 1.0})
    for i in range(50):
        rewrite = injector.rewrite(i, truth, context_kinds={"donut"})
        assert all(e["after"]["kind"] != "donut" for e in rewrite.edits)
    with pytest.raises(ValueError, match="does not apply"):
        replay(truth, [{"kind": "attribute", "before": {"kind": "kite", "colour": "red", "size": "small",
                                                         "position": "top left"}, "after": None}])  # fmt: skip
    with pytest.raises(ValueError, match="unknown scene edit kinds"):
        SceneInjector(weights={"colour": 1.0})
    with pytest.raises(ValueError, match="max_edits"):
        SceneInjector(max_edits=0)
    assert in_caption_order(list(reversed(_scenes(1)[0].objects))) == _scenes(1)[0]


# ---- the recipe, backend world ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(out, WorldConfig(seed=1, train=4, pref=60, test=2, test_iid=2))
    return out


def _run(config, *overrides):
    return povid_hallucinate.main(["--config", config, *overrides])


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_world_backend_writes_povid_records_and_resumes(tiny_world, tmp_path):
    data = tiny_world / "pref.json"
    records = json.loads(data.read_text())
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run("povid_hallucinate_world", f"data_file={data}", f"output_dir={full}", "seed=2") == 0
    rows = _lines(full / "preferences.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in records] and _lines(full / "rejects.jsonl") == []
    for record, row in zip(records, rows):
        assert {k: row[k] for k in record} == record
        assert set(row) == set(record) | {"rejected_conversations", "povid_meta"}
        chosen, rejected = record["conversations"], row["rejected_conversations"]
        assert rejected[:-1] == chosen[:-1] and rejected[-1]["from"] == "gpt"
        meta = row["povid_meta"]["stage1"]
        assert meta["backend"] == "world" and meta["model"].startswith("povid-world") and meta["seed"] == 2
        assert meta["kinds"] == list(dict.fromkeys(e["kind"] for e in meta["edits"]))
        truth = parse_caption(chosen[-1]["value"])
        assert caption(replay(truth, meta["edits"])) == rejected[-1]["value"]
    # Part of the records, a crash mid-line, then the rest: the same file as one run.
    assert _run("povid_hallucinate_world", f"data_file={data}", f"output_dir={part}", "seed=2", "limit=7", "flush_every=3") == 0
    out = part / "preferences.jsonl"
    out.write_text(out.read_text() + '{"id": "pref-10000')
    assert _run("povid_hallucinate_world", f"data_file={data}", f"output_dir={part}", "seed=2") == 0
    assert _lines(out) == rows


def test_demo_selects_the_world_backend_with_the_world_configs_values(tiny_world, tmp_path):
    # The demo passes its overrides to povid_hallucinate_rules; the injector's code defaults
    # are the world config's values, so both give the same pairs.
    assert "backend=world" in world_stage1_overrides()
    data = tiny_world / "pref.json"
    assert _run("povid_hallucinate_world", f"data_file={data}", f"output_dir={tmp_path / 'a'}") == 0
    assert _run("povid_hallucinate_rules", f"data_file={data}", f"output_dir={tmp_path / 'b'}", *world_stage1_overrides()) == 0
    assert _lines(tmp_path / "a" / "preferences.jsonl") == _lines(tmp_path / "b" / "preferences.jsonl")
    world = OmegaConf.load(resolve_config("povid_hallucinate_world")).world
    injector = SceneInjector()
    assert dict(world.weights) == DEFAULT_WEIGHTS
    assert (world.max_edits, world.extra_edit_rate, world.addition_fallback) == (
        injector.max_edits, injector.extra_edit_rate, injector.addition_fallback)  # fmt: skip


def test_a_record_that_is_not_a_world_caption_stops_the_run_naming_it(tiny_world, tmp_path):
    records = json.loads((tiny_world / "pref.json").read_text())[:3]
    records[1]["conversations"][-1]["value"] = "A red bus on the street."
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=rf"record id='{records[1]['id']}': the answer is not a caption"):
        _run("povid_hallucinate_world", f"data_file={data}", f"output_dir={tmp_path / 'out'}")
    assert not (tmp_path / "out" / "preferences.jsonl").exists()


@pytest.fixture
def fresh_grammar():
    from povid_data import synthetic_world

    synthetic_world._caption_grammar.cache_clear()
    yield synthetic_world
    synthetic_world._caption_grammar.cache_clear()  # after monkeypatch has put caption() back


def test_parser_follows_a_change_of_the_caption_wording(fresh_grammar, monkeypatch):
    # Another wording and a fourth number word: parse_caption reads the grammar off caption(),
    # so it needs no change, and the injector's limit follows too.
    numbers = {1: "one", 2: "two", 3: "three", 4: "four"}

    def reworded(scene):
        parts = [f"There is a {o.size} {o.colour} {o.kind} at the {o.position}." for o in scene.objects]
        n = len(scene.objects)
        return " ".join(parts) + f" In all, {numbers[n]} thing{'s' if n > 1 else ''}."

    monkeypatch.setattr(fresh_grammar, "caption", reworded)
    assert max_caption_objects() == 4 and SceneInjector().max_objects == 4
    for scene in _scenes(300, seed=9):
        assert parse_caption(reworded(scene)) == scene
    with pytest.raises(CaptionParseError):
        parse_caption(caption(_scenes(1)[0]))  # the old wording is no longer a caption
