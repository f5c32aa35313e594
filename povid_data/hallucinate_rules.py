"""Offline hallucination injection by rules (backend ``rules`` of ``povid_hallucinate``).

No network, no model: a ground-truth answer is edited in place so that it states things the
image does not show, the three kinds POVID asks an AI model for. A rewrite makes one change, or
two (``max_edits``, ``extra_edit_rate``; kinds drawn by ``weights`` among those the answer
allows), and reads as a true description of some other scene:

- object co-occurrence: an object that often appears with the answer's objects (counted over
  the input data, :class:`CooccurrenceTable`) is added in a new sentence (``object_addition``)
  or replaces a mentioned object (``object_swap``); injected objects are always absent from the
  record's ground truth. The new sentence goes where a sentence about an object may go: at a
  sentence boundary after an object is named, never between an object's sentence and one that
  continues it ("It is red."), and before a closing summary or total-count sentence, whose count
  is raised by one;
- attributes: a colour or size word is changed (``attribute``); the number word of a counted
  object is changed (``count``: "two cars" -> "three cars", the noun stays plural), and a
  sentence that states a total count follows it;
- logical relationships: a position/relation phrase is flipped (``relation``: left/right,
  above/below, in front of/behind ...), and for reasoning answers a connective or hedge is
  inverted (``reasoning``: because -> even though, likely -> unlikely ...).

Every change is reported as an edit ``{"kind", "offset", "from", "to", ...}``; replaying the edits
in order on the original (``text[offset:offset+len(from)] == from`` each time) gives the rewrite
exactly (:func:`apply_edits`), so nothing changes that is not reported.

Choices are deterministic: a record's random stream is seeded from ``(seed, record id)``
(:func:`record_rng`), independent of record order, so a resumed run gives identical results.

The object vocabulary is COCO's 80 categories with common synonyms, singular and plural.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

__all__ = [
    "KINDS",
    "DEFAULT_ADDITION_TEMPLATES",
    "COCO_SYNONYMS",
    "SUPERCATEGORY",
    "pluralize",
    "ObjectVocabulary",
    "Mention",
    "CooccurrenceTable",
    "RulesHallucinator",
    "Rewrite",
    "record_rng",
    "apply_edits",
    "DEFAULT_WEIGHTS",
    "total_count_edits",
]

KINDS = ("object_addition", "object_swap", "attribute", "count", "relation", "reasoning")

# How often each kind is drawn for a rewrite (among those the answer allows): the co-occurring
# object is the hallucination POVID targets, so it is the most common change.
DEFAULT_WEIGHTS: Dict[str, float] = {
    "object_addition": 0.4, "object_swap": 0.2, "attribute": 0.1, "count": 0.1, "relation": 0.1, "reasoning": 0.1,
}  # fmt: skip

# Sentences that add an object. {object}/{Object}: the object with its article ("a cup");
# {anchor}: an object the answer mentions ("bus"). Templates needing an anchor are skipped when
# the answer mentions none.
DEFAULT_ADDITION_TEMPLATES = [
    "There is also {object} in the background.",
    "{Object} can be seen close to the {anchor}.",
    "Next to the {anchor}, there is {object}.",
    "{Object} is visible nearby as well.",
]

# COCO category -> surface nouns (singular). The first is what an injection writes.
COCO_SYNONYMS: Dict[str, List[str]] = {
    "person": ["person", "man", "woman", "boy", "girl", "child", "kid", "guy", "lady",
               "player", "skier", "surfer", "skateboarder", "pedestrian", "rider", "people"],
    "bicycle": ["bicycle", "bike", "cyclist"],
    "car": ["car", "sedan", "taxi", "suv"],
    "motorcycle": ["motorcycle", "motorbike", "scooter"],
    "airplane": ["airplane", "plane", "jet", "aircraft", "airliner"],
    "bus": ["bus"],
    "train": ["train", "locomotive"],
    "truck": ["truck", "pickup truck", "lorry"],
    "boat": ["boat", "ship", "sailboat", "canoe", "kayak", "yacht"],
    "traffic light": ["traffic light", "stoplight", "traffic signal"],
    "fire hydrant": ["fire hydrant", "hydrant"],
    "stop sign": ["stop sign"],
    "parking meter": ["parking meter"],
    "bench": ["bench"],
    "bird": ["bird", "pigeon", "seagull", "duck", "parrot"],
    "cat": ["cat", "kitten"],
    "dog": ["dog", "puppy"],
    "horse": ["horse", "pony"],
    "sheep": ["sheep", "lamb"],
    "cow": ["cow", "cattle", "calf", "bull"],
    "elephant": ["elephant"],
    "bear": ["bear"],
    "zebra": ["zebra"],
    "giraffe": ["giraffe"],
    "backpack": ["backpack", "rucksack"],
    "umbrella": ["umbrella", "parasol"],
    "handbag": ["handbag", "purse"],
    "tie": ["tie", "necktie"],
    "suitcase": ["suitcase", "luggage"],
    "frisbee": ["frisbee"],
    "skis": ["skis", "ski"],
    "snowboard": ["snowboard"],
    "sports ball": ["ball", "soccer ball", "football", "basketball", "tennis ball", "baseball"],
    "kite": ["kite"],
    "baseball bat": ["baseball bat", "bat"],
    "baseball glove": ["baseball glove", "mitt", "glove"],
    "skateboard": ["skateboard"],
    "surfboard": ["surfboard"],
    "tennis racket": ["tennis racket", "racket", "racquet"],
    "bottle": ["bottle"],
    "wine glass": ["wine glass", "glass"],
    "cup": ["cup", "mug"],
    "fork": ["fork"],
    "knife": ["knife"],
    "spoon": ["spoon"],
    "bowl": ["bowl"],
    "banana": ["banana"],
    "apple": ["apple"],
    "sandwich": ["sandwich", "burger", "hamburger"],
    "orange": ["orange"],
    "broccoli": ["broccoli"],
    "carrot": ["carrot"],
    "hot dog": ["hot dog"],
    "pizza": ["pizza"],
    "donut": ["donut", "doughnut"],
    "cake": ["cake", "cupcake"],
    "chair": ["chair", "stool"],
    "couch": ["couch", "sofa"],
    "potted plant": ["potted plant", "houseplant", "plant"],
    "bed": ["bed"],
    "dining table": ["table", "dining table", "desk"],
    "toilet": ["toilet"],
    "tv": ["television", "tv"],
    "laptop": ["laptop", "notebook computer"],
    "mouse": ["computer mouse", "mouse"],
    "remote": ["remote control", "remote"],
    "keyboard": ["keyboard"],
    "cell phone": ["cell phone", "phone", "smartphone", "cellphone"],
    "microwave": ["microwave"],
    "oven": ["oven", "stove"],
    "toaster": ["toaster"],
    "sink": ["sink"],
    "refrigerator": ["refrigerator", "fridge"],
    "book": ["book"],
    "clock": ["clock"],
    "vase": ["vase"],
    "scissors": ["scissors"],
    "teddy bear": ["teddy bear", "stuffed animal"],
    "hair drier": ["hair dryer", "hair drier", "blow dryer"],
    "toothbrush": ["toothbrush"],
}

# COCO's supercategories: a swap stays within one (a dog becomes a cat, not a bus), which is
# the confusion a model makes; "person" has no partner, so people are never swapped.
_SUPERCATEGORY_MEMBERS = {
    "vehicle": ["bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"],
    "outdoor": ["traffic light", "fire hydrant", "stop sign", "parking meter", "bench"],
    "animal": ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"],
    "accessory": ["backpack", "umbrella", "handbag", "tie", "suitcase"],
    "sports": ["frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
               "baseball glove", "skateboard", "surfboard", "tennis racket"],
    "kitchen": ["bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl"],
    "food": ["banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
             "donut", "cake"],
    "furniture": ["chair", "couch", "potted plant", "bed", "dining table", "toilet"],
    "electronic": ["tv", "laptop", "mouse", "remote", "keyboard", "cell phone"],
    "appliance": ["microwave", "oven", "toaster", "sink", "refrigerator"],
    "indoor": ["book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"],
}
SUPERCATEGORY = {c: group for group, members in _SUPERCATEGORY_MEMBERS.items() for c in members}
SUPERCATEGORY["person"] = "person"

# Surface forms that are often not the object (a verb, a material, a colour, an adjective):
# they count as mentions for "is this object absent?" (erring towards absent = not absent),
# but are never the target of a swap, where a wrong reading would garble the sentence.
_AMBIGUOUS = {"tie", "bear", "glass", "orange", "remote", "mouse", "bat", "glove", "plant",
              "people", "ski", "cattle", "luggage", "broccoli", "sheep", "scissors", "skis"}

_IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
    "knife": "knives", "sheep": "sheep", "calf": "calves", "people": "people", "cattle": "cattle",
    "skis": "skis", "scissors": "scissors", "broccoli": "broccoli", "luggage": "luggage",
    "shelf": "shelves", "leaf": "leaves",
}
# Nouns that are plural (or uncountable) as written: "some skis", never "a skis".
_NO_SINGULAR = {"people", "cattle", "skis", "scissors", "broccoli", "luggage"}


def pluralize(noun: str) -> str:
    """English plural of a (possibly multi-word) noun: the last word is inflected."""
    head, _, last = noun.rpartition(" ")
    lower = last.lower()
    if lower in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[lower]
    elif re.search(r"(s|x|z|ch|sh)$", lower):
        plural = lower + "es"
    elif re.search(r"[^aeiou]y$", lower):
        plural = lower[:-1] + "ies"
    else:
        plural = lower + "s"
    return f"{head} {plural}" if head else plural


def _with_article(noun: str) -> str:
    """``noun`` with an indefinite article: "a cup", "an umbrella", "some scissors"."""
    if noun.split()[-1] in _NO_SINGULAR:
        return f"some {noun}"
    return f"{'an' if noun[0].lower() in 'aeiou' else 'a'} {noun}"


def _match_case(template: str, word: str) -> str:
    """``word`` with its first letter capitalised if ``template``'s is (a sentence start; an
    acronym such as "TV" says nothing about the position)."""
    if template[:1].isupper() and not (len(template) > 1 and template.isupper()):
        return word[:1].upper() + word[1:]
    return word


@dataclass(frozen=True)
class Mention:
    """An object noun found in a text."""

    category: str
    start: int
    end: int
    surface: str
    plural: bool
    base: str  # the singular noun of the synonym list this surface form inflects


class ObjectVocabulary:
    """Finds object mentions (singular or plural, longest surface first) and names objects."""

    def __init__(self, synonyms: Dict[str, List[str]] = COCO_SYNONYMS) -> None:
        self.synonyms = synonyms
        self._surfaces: Dict[str, Tuple[str, bool, str]] = {}
        for category, nouns in synonyms.items():
            for noun in nouns:
                self._surfaces.setdefault(noun, (category, noun in _NO_SINGULAR, noun))
                self._surfaces.setdefault(pluralize(noun), (category, True, noun))
        # Longest first, so "hot dog" wins over "dog" and "wine glass" over "glass".
        alternatives = sorted(self._surfaces, key=len, reverse=True)
        self._pattern = re.compile(
            r"\b(" + "|".join(re.escape(s).replace(r"\ ", r"\s+") for s in alternatives) + r")\b",
            re.IGNORECASE,
        )

    def mentions(self, text: str) -> List[Mention]:
        """All object mentions in ``text``, left to right."""
        found = []
        for m in self._pattern.finditer(text):
            surface = " ".join(m.group(1).lower().split())
            category, plural, base = self._surfaces[surface]
            found.append(Mention(category, m.start(1), m.end(1), m.group(1), plural, base))
        return found

    def categories(self, text: str) -> Set[str]:
        """The object categories ``text`` mentions."""
        return {m.category for m in self.mentions(text)}

    def noun(self, category: str, plural: bool = False) -> str:
        """How an injection names ``category``."""
        noun = self.synonyms[category][0]
        return pluralize(noun) if plural else noun

    def swappable(self, mention: Mention) -> bool:
        """Whether replacing this mention is unlikely to garble the sentence."""
        return mention.base not in _AMBIGUOUS and " ".join(mention.surface.lower().split()) not in _AMBIGUOUS


@dataclass
class CooccurrenceTable:
    """How often object categories are mentioned together in the same record."""

    pairs: Dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    frequency: Counter = field(default_factory=Counter)
    colours: Counter = field(default_factory=Counter)  # colour words, per record that uses them

    @classmethod
    def from_texts(cls, texts: Iterable[str], vocabulary: ObjectVocabulary) -> "CooccurrenceTable":
        """Count, over ``texts`` (one per record: its ground-truth answers), which categories
        appear together, and which colour words the data uses."""
        table = cls()
        for text in texts:
            present = sorted(vocabulary.categories(text))
            table.frequency.update(present)
            table.colours.update({m.group(1).lower() for m in _COLOUR_RE.finditer(text)})
            for a in present:
                for b in present:
                    if a != b:
                        table.pairs[a][b] += 1
        return table

    def companions(self, present: Set[str], exclude: Set[str]) -> List[Tuple[str, int]]:
        """Categories that co-occur with ``present``, not in ``exclude``, most frequent first
        (ties by name, so the order never depends on hashing)."""
        scores: Counter = Counter()
        for category in present:
            for other, count in self.pairs.get(category, {}).items():
                if other not in exclude:
                    scores[other] += count
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))

    def as_dict(self, top: int = 10) -> Dict[str, List[Tuple[str, int]]]:
        """The ``top`` companions of each category (for inspection or a report)."""
        return {c: self.companions({c}, {c})[:top] for c in sorted(self.pairs)}


def record_rng(seed: int, record_id: Any) -> random.Random:
    """A random stream that depends only on ``seed`` and the record id (not on run order)."""
    digest = hashlib.sha256(f"{seed}\x00{record_id}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def apply_edits(text: str, edits: Sequence[Dict[str, Any]]) -> str:
    """Replay ``edits`` in order on ``text``.

    Raises:
        ValueError: an edit's ``from`` is not at its ``offset`` (the edits do not describe a
            change of this text).
    """
    for edit in edits:
        start, old = edit["offset"], edit["from"]
        if text[start : start + len(old)] != old:
            raise ValueError(f"edit {edit} does not match the text at offset {start}")
        text = text[:start] + edit["to"] + text[start + len(old) :]
    return text


_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink", "purple",
            "gray", "grey", "silver"]
# Where the text says "grey", writing "gray" is no change.
_COLOUR_TARGETS = [c for c in _COLOURS if c != "grey"]
_SIZE_SWAPS = {"small": "large", "large": "small", "big": "tiny", "tiny": "big",
               "tall": "short", "wooden": "metal", "metal": "wooden"}
_NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve"]
_RELATIONS = {
    "in front of": "behind", "behind": "in front of", "on top of": "underneath",
    "underneath": "on top of", "beneath": "above", "above": "below", "below": "above",
    "inside": "outside", "outside": "inside", "next to": "far from", "beside": "far from",
    "near": "far from", "left": "right", "right": "left",
}
_REASONING = {
    "because": "even though", "therefore": "nevertheless", "thus": "nevertheless",
    "likely": "unlikely", "probably": "hardly", "suggests": "does not suggest",
    "indicates": "does not indicate", "implies": "does not imply",
}


def _word_pattern(words: Iterable[str]) -> re.Pattern:
    alternatives = sorted(words, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in alternatives) + r")\b", re.IGNORECASE)


_COLOUR_RE = _word_pattern(_COLOURS)
_SIZE_RE = _word_pattern(_SIZE_SWAPS)
# A count that is followed by a word (so not a year, a time, a decimal or a score).
_COUNT_RE = re.compile(
    r"(?<![\w.,:/-])(" + "|".join(_NUMBER_WORDS) + r"|[2-9]|[1-9]\d)(?=\s+[a-zA-Z])",
    re.IGNORECASE,
)
_RELATION_RE = re.compile(
    # left/right only as a side ("to the left", "left side"), not "left the room" / "all right".
    r"\b(in front of|on top of|next to|underneath|beneath|behind|above|below|inside|outside|"
    r"beside|near)\b|(?<=\bthe )(left|right)\b(?! to\b)|\b(left|right)(?=(?:-hand)? (?:side|corner|edge)\b)",
    re.IGNORECASE,
)
_REASONING_RE = _word_pattern(_REASONING)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")

_TOTAL_NUMBERS = ["one", *_NUMBER_WORDS]  # a total may be one ("There is one object in total")
# A total count: "(There are) two objects/items/things ... in total/altogether/in all", or "a
# total of five objects". Only generic nouns: a total of "people" is not raised by an added cup.
_TOTAL_RE = re.compile(
    r"(?:\b(there (?:is|are)) )?\b(" + "|".join(_TOTAL_NUMBERS) + r"|\d+) (objects?|items?|things?)\b"
    r"(?=[^.!?]*\b(?:in total|altogether|in all)\b)"
    r"|\ba total of (" + "|".join(_TOTAL_NUMBERS) + r"|\d+) (objects?|items?|things?)\b",
    re.IGNORECASE,
)
# Sentences that close a description: a new object goes before them.
_SUMMARY_START = re.compile(
    r"^(?:overall|in summary|in total|all in all|altogether|in conclusion|to sum up|in short|"
    r"the (?:overall|whole) (?:scene|image|picture|setting|atmosphere))\b",
    re.IGNORECASE,
)
# Sentences that continue the previous one's subject ("It is large and red."): never separated
# from it.
_CONTINUES = re.compile(
    r"^(?:it|its|it's|they|their|theirs|them|he|his|him|she|her|this|these|that|those|both|each|"
    r"either|neither|another|also|the latter|the former|one of them)\b",
    re.IGNORECASE,
)


def _sentences(text: str) -> List[Tuple[int, int]]:
    """(start, end) of each sentence, the end after its punctuation (or at the text's end)."""
    spans, start = [], 0
    stripped_end = len(text.rstrip())
    for m in _SENTENCE_END.finditer(text):
        if m.end() > stripped_end:
            break
        spans.append((start, m.end()))
        start = m.end()
    if text[start:stripped_end].strip():
        spans.append((start, stripped_end))
    # Starts without the whitespace before them.
    return [(s + len(text[s:e]) - len(text[s:e].lstrip()), e) for s, e in spans]


def _is_summary(sentence: str) -> bool:
    return bool(_SUMMARY_START.match(sentence) or _TOTAL_RE.search(sentence))


def _number_value(word: str) -> int:
    return int(word) if word.isdigit() else _TOTAL_NUMBERS.index(word.lower()) + 1


def _number_word(n: int, like: str) -> str:
    """``n`` written as ``like`` is: digits, or a word (digits past twelve), in its case."""
    if like.isdigit() or n > len(_TOTAL_NUMBERS):
        return str(n)
    return _match_case(like, _TOTAL_NUMBERS[n - 1])


def total_count_edits(text: str, delta: int, kind: str) -> List[Dict[str, Any]]:
    """Edits that change every total-count statement of ``text`` by ``delta`` objects ("There
    are two objects in total." -> "There are three objects in total."), verb and plural
    following the number; reported as ``kind`` with ``role: "total_count"``."""
    edits: List[Dict[str, Any]] = []
    shift = 0
    for m in list(_TOTAL_RE.finditer(text)):
        verb, number, noun = (m.group(1), m.group(2), m.group(3)) if m.group(2) else (None, m.group(4), m.group(5))
        new_n = _number_value(number) + delta
        if new_n < 1:
            continue
        singular = noun.lower().rstrip("s")
        new = _number_word(new_n, number) + " " + (singular if new_n == 1 else singular + "s")
        if verb:
            new = _match_case(verb, f"there {'is' if new_n == 1 else 'are'}") + " " + new
        old = m.group(0)
        edits.append({"kind": kind, "role": "total_count", "offset": m.start() + shift, "from": old, "to": new})
        shift += len(new) - len(old)
    return edits


@dataclass
class Rewrite:
    """A rules rewrite: the new text, the edits that produce it, and the kinds they are."""

    text: str
    edits: List[Dict[str, Any]]

    @property
    def kinds(self) -> List[str]:
        """The kinds of the edits, in the order first applied."""
        return list(dict.fromkeys(edit["kind"] for edit in self.edits))


class RulesHallucinator:
    """Edits ground-truth answers into hallucinated ones, deterministically per record.

    Args:
        table: object co-occurrence counts from the input data.
        seed: with the record id, seeds every random choice.
        kinds: which edit kinds to try (see :data:`KINDS`); each is applied at most once per
            record, where the answer gives it something to change.
        max_edits: at most this many changes (kinds) per record, each a seeded draw by
            ``weights`` among the kinds the answer allows; None = every kind that applies (the
            behaviour before ``povid-rules-2``).
        extra_edit_rate: probability of each change after the first, up to ``max_edits``.
        weights: relative weight of each kind of ``kinds`` (:data:`DEFAULT_WEIGHTS`).
        top_companions: objects to add or swap in are drawn among this many most frequent
            companions, weighted by co-occurrence count.
        addition_templates: sentences for ``object_addition``.
        vocabulary: the object nouns; COCO's by default.
        only_seen: inject only objects and colours that the input data mentions somewhere, so
            a rewrite never uses a word the data (and a model trained on it) never says; for
            narrow domains. Off: any COCO object or common colour.
    """

    # Edits are applied in this order; the added sentence comes last so that no other edit
    # rewrites the text it just inserted.
    APPLY_ORDER = ("object_swap", "attribute", "count", "relation", "reasoning", "object_addition")

    def __init__(
        self,
        table: CooccurrenceTable,
        *,
        seed: int = 0,
        kinds: Sequence[str] = KINDS,
        max_edits: Optional[int] = 2,
        extra_edit_rate: float = 0.3,
        weights: Optional[Dict[str, float]] = None,
        top_companions: int = 5,
        addition_templates: Sequence[str] = tuple(DEFAULT_ADDITION_TEMPLATES),
        vocabulary: Optional[ObjectVocabulary] = None,
        only_seen: bool = False,
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown rules kinds {sorted(unknown)}; known: {list(KINDS)}")
        if not addition_templates and "object_addition" in kinds:
            raise ValueError("object_addition needs at least one addition template")
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        missing = [k for k in kinds if k not in weights]
        if missing or any(w < 0 for w in weights.values()):
            raise ValueError(f"rules weights: every kind needs a weight >= 0; missing {missing}, got {weights}")
        if max_edits is not None and max_edits < 1:
            raise ValueError(f"max_edits must be at least 1 (or None), got {max_edits}")
        self.weights = weights
        self.extra_edit_rate = extra_edit_rate
        self.table = table
        self.seed = seed
        self.kinds = list(kinds)
        self.max_edits = max_edits
        self.top_companions = top_companions
        self.addition_templates = list(addition_templates)
        self.vocabulary = vocabulary or ObjectVocabulary()
        self.only_seen = only_seen

    def rewrite(self, record_id: Any, answer: str, context: str = "") -> Rewrite:
        """Hallucinate into ``answer``.

        Args:
            record_id: seeds the record's choices.
            answer: the ground-truth answer to edit.
            context: the rest of the record's text (question, earlier turns): injected objects
                must be absent from it too.
        """
        rng = record_rng(self.seed, record_id)
        # Objects anywhere in the ground truth are never injected.
        ground_truth = self.vocabulary.categories(answer + "\n" + context)
        chosen = [k for k in self.APPLY_ORDER if k in self.kinds]
        if self.max_edits is not None:
            # Draw among the kinds that have something to change, so no draw is wasted.
            probe = random.Random(0)
            applicable = [k for k in chosen if self.weights[k] > 0 and self._edits(k, answer, probe, ground_truth)]
            keep = self._draw_kinds(applicable, rng)
            chosen = [k for k in chosen if k in keep]
        text, edits = answer, []
        for kind in chosen:
            for edit in self._edits(kind, text, rng, ground_truth):
                text = apply_edits(text, [edit])
                edits.append(edit)
        return Rewrite(text, edits)

    def _draw_kinds(self, applicable: List[str], rng: random.Random) -> Set[str]:
        """One kind, then another with probability ``extra_edit_rate`` (up to ``max_edits``),
        each drawn by weight among the applicable kinds not drawn yet."""
        drawn: List[str] = []
        left = [k for k in KINDS if k in applicable]  # a fixed order: draws never depend on hashing
        while left and len(drawn) < self.max_edits:
            if drawn and rng.random() >= self.extra_edit_rate:
                break
            kind = rng.choices(left, weights=[self.weights[k] for k in left])[0]
            drawn.append(kind)
            left.remove(kind)
        return set(drawn)

    def _edits(self, kind: str, text: str, rng: random.Random, ground_truth: Set[str]) -> List[Dict[str, Any]]:
        """The edits of one kind for ``text`` (each offset relative to the text after the
        previous edit of the list)."""
        if kind in ("object_addition", "object_swap"):
            return getattr(self, f"_{kind}")(text, rng, ground_truth)
        return getattr(self, f"_{kind}")(text, rng)

    # ---- object co-occurrence ---------------------------------------------------------------

    def _pick_object(
        self,
        anchors: Sequence[Set[str]],
        exclude: Set[str],
        rng: random.Random,
        group: Optional[str] = None,
    ) -> Optional[Tuple[str, str]]:
        """An object to inject, not in ``exclude`` (and of supercategory ``group`` if given), and
        where the choice came from.

        Tries the companions of each set of ``anchors`` in turn, then the most frequent objects
        of the data (too little data for co-occurrence), then the whole vocabulary.
        """

        def allowed(category: str) -> bool:
            return (
                category not in exclude
                and (group is None or SUPERCATEGORY.get(category) == group)
                and (not self.only_seen or category in self.table.frequency)
            )

        candidates: List[Tuple[str, int]] = []
        source = "cooccurrence"
        for present in anchors:
            companions = self.table.companions(present, exclude)
            candidates = [(c, n) for c, n in companions if allowed(c)][: self.top_companions]
            if candidates:
                break
        if not candidates:
            frequent = sorted(self.table.frequency.items(), key=lambda kv: (-kv[1], kv[0]))
            candidates = [(c, n) for c, n in frequent if allowed(c)][: self.top_companions]
            source = "frequency"
        if not candidates:
            candidates = [(c, 1) for c in sorted(self.vocabulary.synonyms) if allowed(c)]
            source = "vocabulary"
        if not candidates:
            return None
        names, weights = zip(*candidates)
        return rng.choices(names, weights=weights)[0], source

    def _object_addition(self, text: str, rng: random.Random, ground_truth: Set[str]) -> List[Dict[str, Any]]:
        mentions = self.vocabulary.mentions(text)
        present = {m.category for m in mentions}
        picked = self._pick_object([present], ground_truth | present, rng)
        if picked is None:
            return []
        category, source = picked
        at = rng.choice(self._insertion_points(text, mentions))
        # An anchor ("next to the bus") is an object already named before the new sentence.
        anchors = [m for m in mentions if self.vocabulary.swappable(m) and not m.plural and m.end <= at]
        templates = [t for t in self.addition_templates if "{anchor}" not in t or anchors]
        if not templates:
            return []
        template = rng.choice(templates)
        obj = _with_article(self.vocabulary.noun(category))
        anchor = " ".join(rng.choice(anchors).surface.lower().split()) if anchors else ""
        sentence = template.format(object=obj, Object=obj[0].upper() + obj[1:], anchor=anchor)
        if at == 0:
            insertion = sentence + " "
        elif text[at - 1] in ".!?":
            insertion = " " + sentence
        else:  # the answer ends without punctuation: close its sentence first
            insertion = ". " + sentence
        edits = [{"kind": "object_addition", "offset": at, "from": "", "to": insertion,
                  "object": category, "source": source}]  # fmt: skip
        # One more object: a stated total follows.
        return edits + total_count_edits(apply_edits(text, edits), +1, "object_addition")

    @staticmethod
    def _insertion_points(text: str, mentions: Sequence[Mention]) -> List[int]:
        """Where a new sentence about an object may go: after a sentence, not before one that
        continues it ("It is red."), not after a closing summary or total-count sentence; after
        an object has been named where the answer allows (an added "also" object needs one)."""
        spans = _sentences(text)
        if not spans:
            return [0]
        summary_start = len(spans)
        while summary_start > 1 and _is_summary(text[slice(*spans[summary_start - 1])]):
            summary_start -= 1  # the closing run of summary sentences (never the whole answer)
        points = []
        for i in range(summary_start):
            following = text[slice(*spans[i + 1])] if i + 1 < len(spans) else ""
            if i + 1 < summary_start and _CONTINUES.match(following):
                continue
            points.append(spans[i][1])
        # The boundary just before the closing run always qualifies, so ``points`` is never empty.
        named = [p for p in points if any(m.end <= p for m in mentions)]
        return named or points

    def _object_swap(self, text: str, rng: random.Random, ground_truth: Set[str]) -> List[Dict[str, Any]]:
        mentions = [
            m for m in self.vocabulary.mentions(text)
            if self.vocabulary.swappable(m) and SUPERCATEGORY.get(m.category, "person") != "person"
        ]  # fmt: skip
        if not mentions:
            return []
        present = self.vocabulary.categories(text)
        victim = rng.choice(mentions)
        # Swap in an object of the same kind that goes with the one replaced (what a model would
        # confuse it with), else one of that kind that goes with the rest of the scene.
        picked = self._pick_object(
            [{victim.category}, present], ground_truth | present, rng, group=SUPERCATEGORY.get(victim.category)
        )
        if picked is None:
            return []
        category, source = picked
        # Every mention of the same noun ("dog", "dogs") changes, so the answer stays coherent.
        same_noun = [m for m in mentions if m.base == victim.base]
        edits: List[Dict[str, Any]] = []
        current, shift = text, 0  # later offsets move as earlier replacements change the length
        for m in same_noun:
            start, end = m.start + shift, m.end + shift
            new = self.vocabulary.noun(category, plural=m.plural)
            # "a dog" -> "an elephant": the article goes with the noun.
            article = re.search(r"\b(an?)\s+$", current[max(0, start - 4) : start], re.IGNORECASE)
            if article and not m.plural:
                start -= len(article.group(0))
                new = _match_case(article.group(1), _with_article(new))
            else:
                new = _match_case(m.surface, new)
            edit = {"kind": "object_swap", "offset": start, "from": current[start:end], "to": new,
                    "object": category, "replaces": victim.category, "source": source}
            current = apply_edits(current, [edit])
            shift += len(new) - (end - start)
            edits.append(edit)
        return edits

    # ---- attributes -------------------------------------------------------------------------

    def _attribute(self, text: str, rng: random.Random) -> List[Dict[str, Any]]:
        matches = list(_COLOUR_RE.finditer(text)) + list(_SIZE_RE.finditer(text))
        if not matches:
            return []
        match = rng.choice(matches)
        word = match.group(1).lower()
        if word in _COLOURS:
            same = {"gray", "grey"} if word in ("gray", "grey") else {word}
            targets = [c for c in _COLOUR_TARGETS if c not in same]
            if self.only_seen:
                targets = [c for c in targets if c in self.table.colours]
            if not targets:
                return []
            new = rng.choice(targets)
        else:
            new = _SIZE_SWAPS[word]
        return [{"kind": "attribute", "offset": match.start(1), "from": match.group(1),
                 "to": _match_case(match.group(1), new)}]

    def _count(self, text: str, rng: random.Random) -> List[Dict[str, Any]]:
        # Only the count of an object ("two cars", "3 green bottles"): the number is followed,
        # within two words, by a plural object noun, which then stays true of the new number.
        plural_starts = {m.start for m in self.vocabulary.mentions(text) if m.plural}
        matches = [
            m for m in _COUNT_RE.finditer(text)
            if any(re.fullmatch(r"\s+(?:[A-Za-z-]+\s+){0,2}", text[m.end(1) : s]) for s in plural_starts if s > m.end(1))
        ]  # fmt: skip
        if not matches:
            return []
        match = rng.choice(matches)
        old = match.group(1)
        n = _number_value(old)
        # Stay at two or more so the noun's plural still agrees.
        new_n = rng.choice([k for k in (n - 1, n + 1, n + 2) if k >= 2])
        edits = [{"kind": "count", "offset": match.start(1), "from": old, "to": _number_word(new_n, old)}]
        return edits + total_count_edits(apply_edits(text, edits), new_n - n, "count")

    # ---- logical relationships --------------------------------------------------------------

    def _relation(self, text: str, rng: random.Random) -> List[Dict[str, Any]]:
        matches = list(_RELATION_RE.finditer(text))
        if not matches:
            return []
        match = rng.choice(matches)
        group = next(g for g in (1, 2, 3) if match.group(g))
        old = match.group(group)
        new = _RELATIONS[" ".join(old.lower().split())]
        return [{"kind": "relation", "offset": match.start(group), "from": old,
                 "to": _match_case(old, new)}]

    def _reasoning(self, text: str, rng: random.Random) -> List[Dict[str, Any]]:
        matches = list(_REASONING_RE.finditer(text))
        if not matches:
            return []
        match = rng.choice(matches)
        old = match.group(1)
        return [{"kind": "reasoning", "offset": match.start(1), "from": old,
                 "to": _match_case(old, _REASONING[old.lower()])}]
