"""A synthetic visual world where hallucination is measured exactly (the offline demo's data).

Images (64 x 64, Pillow) hold one to three objects, at most one per quadrant. Each object has a
*kind* (six COCO categories, so CHAIR and POPE score it unchanged), a *colour*, a *size* and a
*position*; the image has a *count*. Every kind is drawn as its own clearly different silhouette
(triangle, ring, square, disc with hands, diamond, flat ellipse) at a size the vision tower
resolves, so what the model gets wrong is not perception of small or look-alike things.

The kinds come in companion pairs (pizza & donut, book & clock, kite & frisbee). In the training
distribution a kind's companion is in the image about 80 % of the time, so a captioner learns the
language prior "after a pizza comes a donut"; the failure POVID targets is the model adding the
companion when it is *not* there. The ``balanced`` distribution keeps the companion in only half
of the images that show its partner, which exposes that prior.

Ground truth is exact: each caption is generated from the scene, object by object in a fixed
kind order (partners adjacent): the kind and where it is, then its size and colour; then the count::

    A pizza is in the top left corner. It is large and red. A donut is in the bottom right
    corner. It is small and blue. There are two objects in total.

Files written by :func:`make_world` (``out_dir``)::

    images/<split>_<id>.png
    annotations/instances_<split>.json, captions_<split>.json   (COCO format, for CHAIR / POPE)
    sft.json        LLaVA instruction records of ``train``: per image its description, and a
                    conversation of yes/no questions about present and absent kinds
    pref.json       LLaVA description records of ``pref`` (POVID's preference images)
    <split>.json    LLaVA description records of every split (ground truth of each image)
    world.json      the world's settings and measured statistics

Splits: ``train`` (SFT, training distribution), ``pref`` (fresh images of the training
distribution for preference tuning), ``test`` (held out, balanced: the headline evaluation) and
``test_iid`` (held out, training distribution). Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

__all__ = [
    "KINDS",
    "COMPANION",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "COCO_CATEGORY_IDS",
    "DESCRIBE_PROMPTS",
    "EVAL_DESCRIBE_PROMPT",
    "YES_NO_SUFFIX",
    "WorldObject",
    "Scene",
    "WorldConfig",
    "sample_scene",
    "caption",
    "CaptionParseError",
    "parse_caption",
    "max_caption_objects",
    "scene_problems",
    "render",
    "make_world",
    "written_scene",
    "addition_templates",
    "world_corpus",
    "companion_stats",
]

# Kind order = caption order; partners are adjacent, so the companion follows its partner.
KINDS: Tuple[str, ...] = ("pizza", "donut", "book", "clock", "kite", "frisbee")
PAIRS: Tuple[Tuple[str, str], ...] = (("pizza", "donut"), ("book", "clock"), ("kite", "frisbee"))
COMPANION: Dict[str, str] = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
# The real COCO category ids and supercategories of the six kinds.
COCO_CATEGORY_IDS: Dict[str, int] = {
    "frisbee": 34, "kite": 38, "pizza": 59, "donut": 60, "book": 84, "clock": 85,
}  # fmt: skip
_SUPERCATEGORY = {"pizza": "food", "donut": "food", "book": "indoor", "clock": "indoor",
                  "kite": "sports", "frisbee": "sports"}  # fmt: skip

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
}
SIZES: Dict[str, int] = {"small": 16, "large": 26}  # bounding-box side in pixels
POSITIONS: Tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (238, 238, 238)
IMAGE_SIZE = 64

_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}

DESCRIBE_PROMPTS: Tuple[str, ...] = (
    "Please describe this image in detail.",
    "Describe this image in detail.",
    "What objects are in this image? Describe them.",
)
EVAL_DESCRIBE_PROMPT = DESCRIBE_PROMPTS[0]  # = eval_chair_coco's pinned prompt
YES_NO_SUFFIX = "\nAnswer the question using a single word or phrase."  # = eval_pope_coco's
QUESTION_TEMPLATE = "Is there a {object} in the image?"


@dataclass(frozen=True)
class WorldObject:
    """One object of a scene."""

    kind: str
    colour: str
    size: str
    position: str


@dataclass
class Scene:
    """One image's content: objects in caption order."""

    objects: List[WorldObject]

    @property
    def kinds(self) -> List[str]:
        """The kinds present, in caption order."""
        return [o.kind for o in self.objects]


@dataclass
class WorldConfig:
    """Sizes and statistics of the world (defaults: the demo's full size).

    ``sft_questions``: yes/no questions per training image in ``sft.json``; None asks about
    every kind that is there and as many that are not (the absent companions first), so the
    answers are balanced and the adversarial question (the missing partner) is always asked.
    ``companion_rate``: in the training distribution, the probability that a kind's companion is
    in the image given that the kind is; ``balanced_companion_rate``: the same in the balanced
    test split (0.5). ``pair_probability`` of a scene unit is derived from them.
    ``absent_companion_share``: of the yes/no questions about an absent kind, the share that
    asks about the absent companion of a present kind when there is one (POPE's adversarial
    negative, where the language prior answers "Yes"). 1.0 since world v9: at 0.5 the base
    answered those questions from the prior (adversarial POPE 75 to 84 % on seeds 0 to 2).
    ``writer_addition_rate``: how often the training descriptions (``sft.json`` only) name the
    absent companion right after its partner, as a writer who did not look would (see
    :func:`written_scene`); every other file's text is exact.
    """

    seed: int = 0
    train: int = 8000
    pref: int = 2000
    test: int = 600
    test_iid: int = 300
    companion_rate: float = 0.85
    balanced_companion_rate: float = 0.5
    sft_questions: Optional[int] = 4
    absent_companion_share: float = 1.0
    writer_addition_rate: float = 0.6
    image_size: int = IMAGE_SIZE
    splits: Dict[str, str] = field(
        default_factory=lambda: {"train": "iid", "pref": "iid", "test": "balanced", "test_iid": "iid"}
    )


def _pair_probability(companion_rate: float) -> float:
    """Probability that a scene unit is a full pair, for a target P(companion | kind).

    :func:`sample_scene` draws one unit (2/3) or two (1/3); a unit is a pair with probability
    p, else a single object. Counting objects with and without their companion gives
    ``rate = (8p - 2p^2) / (4 + 4p - p^2)``; this solves it for p.
    """
    r = companion_rate
    if not 0.0 <= r <= 6 / 7:
        raise ValueError(f"companion rate must be in [0, 6/7] (at most 3 objects per image), got {r}")
    return ((8 - 4 * r) - math.sqrt(64 - 96 * r + 32 * r * r)) / (2 * (2 - r))


def sample_scene(rng: random.Random, companion_rate: float) -> Scene:
    """A random scene: one or two units (a companion pair or a single object), at most three
    objects of distinct kinds, each in its own quadrant."""
    p_pair = _pair_probability(companion_rate)
    kinds: List[str] = []
    for unit in range(rng.choice((1, 1, 2))):
        pair = rng.choice([p for p in PAIRS if p[0] not in kinds and p[1] not in kinds])
        if 3 - len(kinds) >= 2 and rng.random() < p_pair:
            kinds.extend(pair)
        else:
            kinds.append(rng.choice(pair))
    positions = rng.sample(POSITIONS, len(kinds))
    objects = [
        WorldObject(kind, rng.choice(tuple(COLOURS)), rng.choice(tuple(SIZES)), position)
        for kind, position in zip(kinds, positions)
    ]
    objects.sort(key=lambda o: KINDS.index(o.kind))
    return Scene(objects)


def written_scene(scene: Scene, rng: random.Random, addition_rate: float) -> Scene:
    """The scene as the training descriptions' writer tells it: after the first kind of a pair
    whose partner is absent, with probability ``addition_rate``, the partner too (a random
    colour and size, in a free quadrant), as LLaVA-Instruct's text-only GPT-4 writer names the
    objects that usually go with what it was told about. The count follows what is told.

    The addition comes after its partner in caption order, late in the description, where a
    captioner's language prior bites; yes/no answers are never written this way.
    """
    kinds = set(scene.kinds)
    free = [p for p in POSITIONS if p not in {o.position for o in scene.objects}]
    told = list(scene.objects)
    for first, second in PAIRS:
        if first in kinds and second not in kinds and free and rng.random() < addition_rate:
            position = free.pop(rng.randrange(len(free)))
            told.append(WorldObject(second, rng.choice(tuple(COLOURS)), rng.choice(tuple(SIZES)), position))
    told.sort(key=lambda o: KINDS.index(o.kind))
    return Scene(told)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """The exact ground-truth description of a scene."""
    sentences = []
    for o in scene.objects:
        sentences.append(f"{_article(o.kind).capitalize()} {o.kind} is in the {o.position} corner. It is {o.size} and {o.colour}.")
    n = len(scene.objects)
    sentences.append("There is one object in total." if n == 1 else f"There are {_NUMBERS[n]} objects in total.")
    return " ".join(sentences)


class CaptionParseError(ValueError):
    """A text that is not a caption :func:`caption` writes for any scene."""


def _object_values() -> Dict[str, Tuple[str, ...]]:
    """Every value each field of :class:`WorldObject` can take, from the world's constants."""
    values = {"kind": KINDS, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": POSITIONS}
    unknown = [f.name for f in fields(WorldObject) if f.name not in values]
    if unknown:
        # A new object field needs its value list here before captions can be read back.
        raise NotImplementedError(f"parse_caption: no list of values for WorldObject field(s) {unknown}")
    return values


def _all_objects() -> List[WorldObject]:
    values = _object_values()
    names = [f.name for f in fields(WorldObject)]
    return [WorldObject(**dict(zip(names, combo))) for combo in itertools.product(*(values[n] for n in names))]


def _distinct_objects(n: int) -> List[WorldObject]:
    """``n`` objects of distinct kinds and positions (a scene the world can hold)."""
    colours, sizes = tuple(COLOURS), tuple(SIZES)
    return [WorldObject(KINDS[i], colours[i % len(colours)], sizes[i % len(sizes)], POSITIONS[i]) for i in range(n)]


def max_caption_objects() -> int:
    """The most objects a scene may hold so that :func:`caption` can describe it (it names the
    count in words) and each has its own kind and quadrant."""
    limit = 0
    for n in range(1, min(len(KINDS), len(POSITIONS)) + 1):
        try:
            caption(Scene(_distinct_objects(n)))
        except (KeyError, IndexError, ValueError):
            break
        limit = n
    return limit


def _common_suffix(texts: Sequence[str]) -> str:
    first = texts[0]
    size = 0
    while size < len(first) and all(len(t) > size and t[-1 - size] == first[-1 - size] for t in texts):
        size += 1
    return first[len(first) - size :]


@dataclass(frozen=True)
class _CaptionGrammar:
    """The pieces :func:`caption` assembles, read off :func:`caption` itself, so the parser
    follows any change of its wording: ``caption(objects) == joiner.join(text of each object)
    + closing[len(objects)]``."""

    object_text: Dict[WorldObject, str]
    joiner: str
    closing: Dict[int, str]
    patterns: Dict[int, "re.Pattern[str]"]

    def compose(self, objects: Sequence[WorldObject]) -> str:
        return self.joiner.join(self.object_text[o] for o in objects) + self.closing[len(objects)]


@functools.lru_cache(maxsize=1)
def _caption_grammar() -> _CaptionGrammar:
    """Decompose :func:`caption` into per-object texts, the text between two objects and the
    closing (count) text for each number of objects, then check that decomposition on many
    scenes.

    Raises:
        RuntimeError: :func:`caption` no longer describes a scene object by object followed by a
            text that depends only on the count (``parse_caption`` then needs rewriting).
    """
    singles = _all_objects()
    one_object = {o: caption(Scene([o])) for o in singles}
    closing = {1: _common_suffix(list(one_object.values()))}
    object_text = {o: text[: len(text) - len(closing[1])] for o, text in one_object.items()}
    if len(set(object_text.values())) != len(object_text):
        raise RuntimeError("caption(): two different objects have the same description; captions are ambiguous")
    limit = max_caption_objects()
    joiner = ""
    for n in range(2, limit + 1):
        objects = _distinct_objects(n)
        text = caption(Scene(objects))
        first, last = object_text[objects[0]], object_text[objects[-1]]
        if not text.startswith(first):
            raise RuntimeError("caption() does not start with its first object's description")
        if n == 2:
            rest = text[len(first) :]
            at = rest.find(last)
            if at < 0:
                raise RuntimeError("caption() does not describe its second object as it describes it alone")
            joiner = rest[:at]
        body = joiner.join(object_text[o] for o in objects)
        if not text.startswith(body):
            raise RuntimeError("caption() does not join its objects' descriptions with one text")
        closing[n] = text[len(body) :]
    alternatives = "|".join(re.escape(t) for t in sorted(set(object_text.values()), key=len, reverse=True))
    patterns = {
        n: re.compile("(" + alternatives + ")" + ("" if n == 1 else (re.escape(joiner) + "(" + alternatives + ")") * (n - 1))
                      + re.escape(closing[n]))
        for n in closing
    }  # fmt: skip
    grammar = _CaptionGrammar(object_text, joiner, closing, patterns)
    check = random.Random(0)
    for _ in range(200):  # the decomposition must rebuild caption() exactly, for any scene
        n = check.randint(1, limit)
        objects = [WorldObject(k, check.choice(tuple(COLOURS)), check.choice(tuple(SIZES)), p)
                   for k, p in zip(check.sample(KINDS, n), check.sample(POSITIONS, n))]  # fmt: skip
        if grammar.compose(objects) != caption(Scene(objects)):
            raise RuntimeError("caption() is not object by object plus a closing text that depends on the count")
    return grammar


def parse_caption(text: str) -> Scene:
    """The scene whose :func:`caption` is ``text`` (the inverse of :func:`caption`): objects in
    the order the text names them.

    The grammar is read off :func:`caption` and the world's constants, not written out again,
    so a change of the caption's wording needs no change here. A grammatical caption of a scene
    the world would not draw (two objects in one quadrant, say) parses; :func:`scene_problems`
    tells those apart.

    Raises:
        CaptionParseError: ``text`` is not a caption of any scene; the message says where it
            stops being one.
    """
    grammar = _caption_grammar()
    by_text = {t: o for o, t in grammar.object_text.items()}
    stripped = text.strip()
    for n, pattern in grammar.patterns.items():
        match = pattern.fullmatch(stripped)
        if match:
            scene = Scene([by_text[g] for g in match.groups()])
            if caption(scene) != stripped:  # the decomposition is checked, this is cheap insurance
                break
            return scene
    # Say how far the text reads as a caption: the longest run of object descriptions.
    position, read = 0, 0
    while True:
        following = next((t for t in sorted(by_text, key=len, reverse=True)
                          if stripped.startswith((grammar.joiner if read else "") + t, position)), None)  # fmt: skip
        if following is None:
            break
        position += len(following) + (len(grammar.joiner) if read else 0)
        read += 1
    closings = [c for c in grammar.closing.values() if stripped.endswith(c)]
    reason = (f"after {read} object description(s) comes {stripped[position:position + 60]!r}"
              if not closings or position < len(stripped) - len(closings[0]) else "the object count is wrong")  # fmt: skip
    raise CaptionParseError(f"not a caption of the synthetic world: {reason}")


def scene_problems(scene: Scene) -> List[str]:
    """Why the world would never draw ``scene`` (empty list: it could be a ground truth): too
    many objects, a kind twice, two objects in one quadrant, objects out of caption order."""
    problems = []
    if not 1 <= len(scene.objects) <= max_caption_objects():
        problems.append(f"{len(scene.objects)} objects (the world draws 1 to {max_caption_objects()})")
    if len(set(scene.kinds)) != len(scene.kinds):
        problems.append("a kind appears twice")
    if len({o.position for o in scene.objects}) != len(scene.objects):
        problems.append("two objects share a quadrant")
    if scene.kinds != sorted(scene.kinds, key=KINDS.index):
        problems.append("objects are not in caption order")
    return problems


# ----------------------------------------------------------------------------- drawing


def _draw_pizza(draw: ImageDraw.ImageDraw, box, colour) -> None:
    x0, y0, x1, y1 = box
    draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)


def _draw_donut(draw: ImageDraw.ImageDraw, box, colour) -> None:
    x0, y0, x1, y1 = box
    draw.ellipse(box, fill=colour)
    inset = (x1 - x0) * 0.3
    draw.ellipse((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=BACKGROUND)


def _draw_book(draw: ImageDraw.ImageDraw, box, colour) -> None:
    x0, y0, x1, y1 = box
    inset = (x1 - x0) * 0.08
    draw.rectangle((x0 + inset, y0, x1 - inset, y1), fill=colour)


def _draw_clock(draw: ImageDraw.ImageDraw, box, colour) -> None:
    x0, y0, x1, y1 = box
    draw.ellipse(box, fill=colour)
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    width = max(1, round(r / 4))
    draw.line((cx, cy, cx, cy - 0.75 * r), fill=(255, 255, 255), width=width)
    draw.line((cx, cy, cx + 0.6 * r, cy), fill=(255, 255, 255), width=width)


def _draw_kite(draw: ImageDraw.ImageDraw, box, colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w = (x1 - x0) * 0.38
    draw.polygon([(cx, y0), (cx + half_w, cy), (cx, y1), (cx - half_w, cy)], fill=colour)


def _draw_frisbee(draw: ImageDraw.ImageDraw, box, colour) -> None:
    x0, y0, x1, y1 = box
    cy, half_h = (y0 + y1) / 2, (y1 - y0) * 0.22
    draw.ellipse((x0, cy - half_h, x1, cy + half_h), fill=colour)


_DRAW: Dict[str, Callable] = {
    "pizza": _draw_pizza, "donut": _draw_donut, "book": _draw_book,
    "clock": _draw_clock, "kite": _draw_kite, "frisbee": _draw_frisbee,
}  # fmt: skip


def _box(o: WorldObject, image_size: int, rng: random.Random) -> Tuple[float, float, float, float]:
    """The object's bounding box: centred in its quadrant, jittered by a few pixels."""
    quadrant = image_size / 2
    side = SIZES[o.size] * image_size / IMAGE_SIZE
    row, col = (0 if o.position.startswith("top") else 1), (0 if o.position.endswith("left") else 1)
    slack = max(0.0, (quadrant - side) / 2 - 1)
    jitter = min(3.0, slack)
    cx = col * quadrant + quadrant / 2 + rng.uniform(-jitter, jitter)
    cy = row * quadrant + quadrant / 2 + rng.uniform(-jitter, jitter)
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def render(scene: Scene, rng: random.Random, image_size: int = IMAGE_SIZE) -> Tuple[Image.Image, List[list]]:
    """Draw a scene; returns the image and each object's COCO bbox ``[x, y, w, h]``."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    boxes = []
    for o in scene.objects:
        box = _box(o, image_size, rng)
        _DRAW[o.kind](draw, box, COLOURS[o.colour])
        boxes.append([round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)])
    return image, boxes


# ----------------------------------------------------------------------------- records


def _describe_record(record_id: str, image: str, text: str, prompt: str) -> dict:
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": text},
        ],
    }


def _yes_no_turns(kind: str, present: bool) -> List[dict]:
    question = QUESTION_TEMPLATE.format(object=kind) + YES_NO_SUFFIX
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "Yes" if present else "No"}]


def _asked_kinds(
    scene: Scene, rng: random.Random, questions: Optional[int], companion_share: float
) -> List[Tuple[str, bool]]:
    """``(kind, present)`` to ask about. ``questions`` None: every present kind and as many
    absent ones, the absent companions of present kinds first (POPE's adversarial negatives),
    shuffled (the last answers then follow from the first: a shortcut around the image); else
    that many independent draws, each a present or an absent kind equally often, an absent
    companion ``companion_share`` of the time there is one, so no answer tells another."""
    present = scene.kinds
    absent = [k for k in KINDS if k not in present]
    if questions is None:
        companions = [k for k in dict.fromkeys(COMPANION[p] for p in present) if k in absent]
        others = [k for k in absent if k not in companions]
        rng.shuffle(others)
        asked = [(k, True) for k in present] + [(k, False) for k in (companions + others)[: len(present)]]
        rng.shuffle(asked)
        return asked
    companions = [k for k in absent if COMPANION[k] in present]
    asked = []
    for _ in range(questions):
        if rng.random() < 0.5 or not absent:
            asked.append((rng.choice(present), True))
        elif companions and rng.random() < companion_share:
            asked.append((rng.choice(companions), False))
        else:
            asked.append((rng.choice(absent), False))
    return asked


def _sft_records(
    record_id: str, image: str, text: str, prompt: str, scene: Scene, questions: Optional[int], rng: random.Random,
    companion_share: float,
) -> List[dict]:
    """LLaVA-style instruction data for one image: its description, and (a separate
    conversation) yes/no questions about present and absent kinds, as LLaVA-1.5 mixes detailed
    descriptions with short-answer VQA. Both start a conversation, as CHAIR and POPE ask them;
    a question never follows the description, so it is answered from the image. One-word
    answers carry little of a batch's loss, hence several per image."""
    records = [_describe_record(record_id, image, text, prompt)]
    if questions != 0:
        asked = _asked_kinds(scene, rng, questions, companion_share)
        turns = [turn for kind, present in asked for turn in _yes_no_turns(kind, present)]
        turns[0] = {"from": "human", "value": f"<image>\n{turns[0]['value']}"}
        records.append({"id": f"{record_id}-qa", "image": image, "conversations": turns})
    return records


def addition_templates() -> List[str]:
    """``object_addition`` sentences for the ``rules`` stage-1 backend in the world's caption
    grammar (every position, size and colour), so an added object reads like the ground truth's,
    as a stage-1 model rewriting in the caption's own style writes it."""
    return [
        f"{{Object}} is in the {position} corner. It is {size} and {colour}."
        for position in POSITIONS
        for size in SIZES
        for colour in COLOURS
    ]


def world_corpus() -> List[str]:
    """Text the world's SentencePiece tokenizer is trained on: every caption word, question and
    the vicuna_v1 prompt template (a few hundred sentences cover the whole vocabulary), plus
    the sentences of the ``rules`` stage-1 backend, as a real tokenizer knows common words."""
    from povid_data.hallucinate_rules import DEFAULT_ADDITION_TEMPLATES
    from povid_data.transforms import VICUNA_V1_SYSTEM

    rng = random.Random(0)
    lines = [VICUNA_V1_SYSTEM, "USER: ASSISTANT:", "Yes", "No", *DESCRIBE_PROMPTS]
    lines += [t.format(object="a pizza", Object="A pizza", anchor="clock") for t in DEFAULT_ADDITION_TEMPLATES]
    for kind in KINDS:
        lines.append(QUESTION_TEMPLATE.format(object=kind) + YES_NO_SUFFIX)
        for colour in COLOURS:
            for size in SIZES:
                position = rng.choice(POSITIONS)
                lines.append(caption(Scene([WorldObject(kind, colour, size, position)])))
    for n in (2, 3, 4):
        lines.append(f"There are {_NUMBERS[n]} objects in total.")

    return lines


def companion_stats(scenes: Iterable[Scene]) -> Dict[str, float]:
    """How often a kind's companion is in the image when the kind is (and the converse)."""
    with_kind = with_companion = images = 0
    for scene in scenes:
        images += 1
        kinds = set(scene.kinds)
        for kind in kinds:
            with_kind += 1
            with_companion += COMPANION[kind] in kinds
    rate = with_companion / with_kind if with_kind else 0.0
    return {"images": images, "companion_rate": rate, "absent_companion_rate": 1 - rate}


def _coco_files(split: str, entries: List[dict], out_dir: Path) -> None:
    images, instances, captions = [], [], []
    for entry in entries:
        images.append({"id": entry["image_id"], "file_name": entry["file_name"],
                       "width": entry["size"], "height": entry["size"]})  # fmt: skip
        for o, bbox in zip(entry["scene"].objects, entry["boxes"]):
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": entry["image_id"],
                    "category_id": COCO_CATEGORY_IDS[o.kind],
                    "bbox": bbox,
                    "area": round(bbox[2] * bbox[3], 2),
                    "iscrowd": 0,
                    "attributes": {"colour": o.colour, "size": o.size, "position": o.position},
                }
            )
        captions.append({"id": len(captions) + 1, "image_id": entry["image_id"], "caption": entry["caption"]})
    categories = [
        {"id": COCO_CATEGORY_IDS[k], "name": k, "supercategory": _SUPERCATEGORY[k]}
        for k in sorted(KINDS, key=COCO_CATEGORY_IDS.get)
    ]
    annotations = out_dir / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    info = {"description": f"POVID synthetic world, split {split}"}
    _write_json(annotations / f"instances_{split}.json",
                {"info": info, "images": images, "annotations": instances, "categories": categories})  # fmt: skip
    _write_json(annotations / f"captions_{split}.json", {"info": info, "images": images, "annotations": captions})


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)


_SPLIT_ID_OFFSET = {"train": 0, "pref": 1_000_000, "test": 2_000_000, "test_iid": 3_000_000}


def make_world(
    out_dir: str | Path,
    config: Optional[WorldConfig] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, object]:
    """Generate the world into ``out_dir`` (see the module docstring); returns ``world.json``'s
    content. Deterministic given ``config.seed``; each split has its own random stream."""
    config = config or WorldConfig()
    for name in ("absent_companion_share", "writer_addition_rate"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {getattr(config, name)}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    stats: Dict[str, dict] = {}
    for split, distribution in config.splits.items():
        count = getattr(config, split)
        rng = random.Random(f"{config.seed}:{split}")
        qa_rng = random.Random(f"{config.seed}:{split}:questions")  # scenes do not depend on it
        writer_rng = random.Random(f"{config.seed}:{split}:writer")
        written_additions = 0
        rate = config.companion_rate if distribution == "iid" else config.balanced_companion_rate
        entries, describe, sft = [], [], []
        for index in range(count):
            scene = sample_scene(rng, rate)
            image, boxes = render(scene, rng, config.image_size)
            image_id = _SPLIT_ID_OFFSET[split] + index + 1
            file_name = f"{split}_{image_id:07d}.png"
            image.save(out_dir / "images" / file_name)
            text = caption(scene)
            entries.append({"image_id": image_id, "file_name": file_name, "scene": scene,
                            "boxes": boxes, "caption": text, "size": config.image_size})  # fmt: skip
            record_id = f"{split}-{image_id}"
            prompt = rng.choice(DESCRIBE_PROMPTS) if split == "train" else EVAL_DESCRIBE_PROMPT
            describe.append(_describe_record(record_id, file_name, text, prompt))
            if split == "train":
                told = written_scene(scene, writer_rng, config.writer_addition_rate)
                written_additions += len(told.objects) - len(scene.objects)
                sft.extend(_sft_records(record_id, file_name, caption(told), prompt, scene, config.sft_questions,
                                        qa_rng, config.absent_companion_share))  # fmt: skip
        _coco_files(split, entries, out_dir)
        _write_json(out_dir / f"{split}.json", describe)
        if split == "train":
            _write_json(out_dir / "sft.json", sft)
        stats[split] = {"distribution": distribution, **companion_stats(e["scene"] for e in entries),
                        "objects": dict(Counter(o.kind for e in entries for o in e["scene"].objects))}  # fmt: skip
        if split == "train":
            stats[split]["sft_written_additions"] = written_additions
        if progress:
            progress(f"{split}: {count} images ({distribution}), companion present "
                     f"{stats[split]['companion_rate']:.0%} of the time")  # fmt: skip
    world = {"config": asdict(config), "kinds": list(KINDS), "companions": [list(p) for p in PAIRS],
             "splits": stats}  # fmt: skip
    _write_json(out_dir / "world.json", world)
    return world


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m povid_data.synthetic_world OUT_DIR [--seed N] [--train N] ...``"""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    defaults = WorldConfig()
    for name in ("seed", "train", "pref", "test", "test_iid"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    config = WorldConfig(**{k: getattr(args, k) for k in ("seed", "train", "pref", "test", "test_iid")})
    make_world(args.out_dir, config, progress=print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
