"""CHAIR (Rohrbach et al., 2018, "Object Hallucination in Image Captioning") on COCO.

A caption *mentions* a COCO object each time one of that object's words appears in it
(``"puppy"`` mentions ``dog``). The ground truth of an image is the set of categories annotated
in its instances plus every object mentioned in its ground-truth COCO captions, as in the
original metric. A mention of an object outside that set is a hallucination.

- ``CHAIR_S``: fraction of captions with at least one hallucinated mention;
- ``CHAIR_I``: hallucinated mentions / all object mentions (a word repeated three times is
  three mentions);
- ``recall``: distinct correctly mentioned objects / ground-truth objects, summed over images;
- ``mean_length``: mean number of words per caption.

Two counting modes (``chair.mode`` in ``eval_chair_coco``; :data:`DEFAULT_CHAIR_MODE`):

- ``"reference"`` (default): the original script's counting (Rohrbach et al.,
  ``LisaAnne/Hallucination``, ``utils/chair.py``) reproduced mention for mention, quirks
  included: NLTK's tokenizer, Pattern's singularizer (``"bus"`` -> ``"bu"``, never counted),
  its synonym and two-word tables (:mod:`povid.metrics.chair_reference`). Use it for numbers
  put next to published ones.
- ``"corrected"``: the same rules with the quirks fixed (the counting before modes existed;
  the offline demo's tables use it).

``povid/metrics/CHAIR.md`` lists every difference with an example sentence. How a caption
becomes mentions in ``corrected`` mode:

1. lower-case and split into words (:func:`tokenize`);
2. reduce each word to its singular (:func:`singularize`);
3. scan left to right and join a word with the next one when the pair is a known two-word
   name: ``"hot dog"`` is the COCO object hot dog, never a dog; ``"teddy bear"`` never a bear;
   ``"baby bird"`` / ``"adult cow"`` are the animal, not a person (``"baby"`` / ``"adult"``
   alone name a person); ``"passenger train"`` / ``"passenger jet"`` are vehicles, not
   passengers; ``"toilet seat"`` is a toilet; ``"train track"`` and ``"home plate"`` are not
   objects at all;
4. if the caption mentions a toilet, a ``"seat"`` in it is the toilet's, not a chair;
5. look every remaining word up in the synonym table (:data:`COCO_SYNONYMS`).

Both modes: ``CHAIR_I`` is 0 (not a division error) when no caption mentions any object;
``recall`` is summed over images as in the later extensions of the script that report it
(e.g. OPERA, "Less is More"); ``mean_length`` counts words (runs of letters and digits, as
:func:`tokenize` splits them), not NLTK tokens, in both modes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from povid.metrics.chair_reference import reference_mentions
from povid.metrics.coco import AnnotationError, CocoAnnotations
from povid_data.jsonl import read_records

__all__ = [
    "CHAIR_MODES",
    "DEFAULT_CHAIR_MODE",
    "check_chair_mode",
    "COCO_SYNONYMS",
    "Mention",
    "tokenize",
    "singularize",
    "find_objects",
    "ground_truth_objects",
    "score_caption",
    "chair_metrics",
    "evaluate_chair",
    "read_captions",
]

# ----------------------------------------------------------------------------- modes

CHAIR_MODES: Tuple[str, ...] = ("reference", "corrected")
# The original's counting by default: CHAIR numbers are almost always put next to published
# ones, which come from the original script or copies of it.
DEFAULT_CHAIR_MODE = "reference"


def check_chair_mode(mode: Any) -> str:
    """``mode`` if it is one of :data:`CHAIR_MODES`.

    Raises:
        ValueError: any other value (names the valid ones and where they are documented).
    """
    if mode not in CHAIR_MODES:
        raise ValueError(
            f"chair.mode must be one of {', '.join(repr(m) for m in CHAIR_MODES)}, got {mode!r} "
            f"(reference: the original CHAIR script's counts, comparable to published numbers; "
            f"corrected: its quirks fixed; see povid/metrics/CHAIR.md)"
        )
    return mode


# ----------------------------------------------------------------------------- vocabulary (corrected mode)

# COCO category name -> the (singular, lower-case) words and two-word names that mention it.
# The facts are the public CHAIR synonym lists; each category's own name counts too. Entries
# that are typos in the source lists ("televison", "solider", "phon") are kept on purpose:
# captions contain such typos and the published numbers count them.
COCO_SYNONYMS: Dict[str, Tuple[str, ...]] = {
    "person": (
        "person", "girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "adult",
        "rider", "baby", "worker", "passenger", "sister", "biker", "policeman", "cop", "officer",
        "lady", "cowboy", "bride", "groom", "male", "female", "guy", "traveler", "mother",
        "father", "gentleman", "pitcher", "player", "skier", "snowboarder", "skater",
        "skateboarder", "foreigner", "caller", "offender", "coworker", "trespasser", "patient",
        "politician", "soldier", "solider", "grandchild", "serviceman", "walker", "drinker",
        "doctor", "bicyclist", "thief", "buyer", "teenager", "student", "camper", "driver",
        "hunter", "shopper", "villager",
    ),
    "bicycle": ("bicycle", "bike", "unicycle", "minibike", "trike"),
    "car": (
        "car", "automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep",
        "coupe", "taxicab", "limo", "taxi",
    ),
    "motorcycle": ("motorcycle", "scooter", "motor bike", "motor cycle", "motorbike", "moped"),
    "airplane": (
        "airplane", "jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus",
        "biplane", "seaplane",
    ),
    "bus": ("bus", "minibus", "trolley"),
    "train": ("train", "locomotive", "tramway", "caboose"),
    "truck": ("truck", "pickup", "lorry", "hauler", "firetruck"),
    "boat": (
        "boat", "ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat",
        "canoe", "skiff", "yacht", "kayak", "catamaran", "pontoon", "houseboat", "vessel",
        "rowboat", "trawler", "ferryboat", "watercraft", "tugboat", "schooner", "barge", "ferry",
        "sailboard", "paddleboat", "lifeboat", "freighter", "steamboat", "riverboat",
        "battleship", "steamship",
    ),
    "traffic light": (
        "traffic light", "street light", "traffic signal", "stop light", "streetlight",
        "stoplight",
    ),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),
    "bench": ("bench", "pew"),
    "bird": (
        "bird", "ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin",
        "pelican", "waterfowl", "heron", "hummingbird", "mallard", "finch", "pigeon", "sparrow",
        "seabird", "osprey", "blackbird", "fowl", "shorebird", "woodpecker", "egret",
        "chickadee", "quail", "bluebird", "kingfisher", "buzzard", "willet", "gull", "swan",
        "bluejay", "flamingo", "cormorant", "parrot", "loon", "gosling", "waterbird",
        "pheasant", "rooster", "sandpiper", "crow", "raven", "turkey", "oriole", "cowbird",
        "warbler", "magpie", "peacock", "cockatiel", "lorikeet", "puffin", "vulture", "condor",
        "macaw", "peafowl", "cockatoo", "songbird",
    ),
    "cat": ("cat", "kitten", "feline", "tabby"),
    "dog": (
        "dog", "puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler",
        "canine", "pitbull", "collie", "pug", "terrier", "poodle", "labrador", "doggie",
        "doberman", "mutt", "doggy", "spaniel", "bulldog", "sheepdog", "weimaraner", "corgi",
        "cocker", "greyhound", "retriever", "brindle", "hound", "whippet", "husky",
    ),
    "horse": (
        "horse", "colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "palomino",
        "mustang", "clydesdale", "bronc", "bronco",
    ),
    "sheep": ("sheep", "lamb", "ram", "goat", "ewe"),
    "cow": (
        "cow", "cattle", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu", "bison",
    ),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "knapsack"),
    "umbrella": ("umbrella",),
    "handbag": ("handbag", "wallet", "purse", "briefcase"),
    "tie": ("tie", "bow", "bow tie"),
    "suitcase": ("suitcase", "suit case", "luggage"),
    "frisbee": ("frisbee",),
    "skis": ("ski",),
    "snowboard": ("snowboard",),
    "sports ball": ("sports ball", "ball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat",),
    "baseball glove": ("baseball glove",),
    "skateboard": ("skateboard",),
    "surfboard": ("surfboard", "longboard", "skimboard", "shortboard", "wakeboard"),
    "tennis racket": ("tennis racket", "racket"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass",),
    "cup": ("cup",),
    "fork": ("fork",),
    "knife": ("knife", "pocketknife"),
    "spoon": ("spoon",),
    "bowl": ("bowl", "container"),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "sub", "cheeseburger", "hamburger"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog",),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut", "bagel"),
    "cake": ("cake", "cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"),
    "chair": ("chair", "seat", "stool"),
    "couch": ("couch", "sofa", "recliner", "futon", "loveseat", "settee", "chesterfield"),
    "potted plant": ("potted plant", "houseplant"),
    "bed": ("bed",),
    "dining table": ("dining table", "table", "desk"),
    "toilet": ("toilet", "urinal", "commode", "lavatory", "potty"),
    "tv": ("tv", "monitor", "televison", "television"),
    "laptop": ("laptop", "computer", "notebook", "netbook", "lenovo", "macbook", "laptop computer"),
    "mouse": ("mouse",),
    "remote": ("remote",),
    "keyboard": ("keyboard",),
    "cell phone": (
        "cell phone", "mobile phone", "phone", "cellphone", "telephone", "phon", "smartphone",
        "iphone",
    ),
    "microwave": ("microwave",),
    "oven": ("oven", "stovetop", "stove"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book", "novel", "minibook"),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddybear"),
    "hair drier": (
        "hair drier", "hairdryer", "hair dryer", "blow dryer", "blowdryer", "blow dry",
        "blow drier",
    ),
    "toothbrush": ("toothbrush",),
}  # fmt: skip

# word or two-word name -> COCO category
_WORD_TO_OBJECT: Dict[str, str] = {
    word: category for category, words in COCO_SYNONYMS.items() for word in words
}

# ----------------------------------------------------------------------------- words

_WORD_RE = re.compile(r"[^\W_]+(?:-[^\W_]+)*")


def tokenize(text: str) -> List[str]:
    """Lower-cased words of ``text`` (corrected mode's tokenizer; ``mean_length`` counts these in
    both modes): letters/digits, hyphenated words kept whole.

    Punctuation and apostrophes separate words (``"dog's"`` -> ``["dog", "s"]``).
    """
    return _WORD_RE.findall(text.lower())


# Plural -> singular where no suffix rule gives the right answer.
_IRREGULAR_PLURALS: Dict[str, str] = {
    "people": "person", "persons": "person", "mice": "mouse", "geese": "goose",
    "teeth": "tooth", "feet": "foot", "oxen": "ox", "dice": "die", "lice": "louse",
    "cacti": "cactus", "fungi": "fungus", "octopi": "octopus", "tvs": "tv",
    # -ves whose singular ends in -f / -fe (the default keeps -ve: olives, gloves, stoves)
    "leaves": "leaf", "loaves": "loaf", "halves": "half", "calves": "calf", "wolves": "wolf",
    "shelves": "shelf", "scarves": "scarf", "thieves": "thief", "elves": "elf",
    "hooves": "hoof", "selves": "self", "sheaves": "sheaf", "wharves": "wharf",
    "lives": "life",
    # -ses / -zes whose singular ends in -s / -z (the default drops only the -s: horses, vases)
    "buses": "bus", "busses": "bus", "gases": "gas", "lenses": "lens", "canvases": "canvas",
    "atlases": "atlas", "biases": "bias", "aliases": "alias", "quizzes": "quiz",
    # -ches whose singular ends in -che (the default drops -es: benches, sandwiches)
    "headaches": "headache", "mustaches": "mustache", "moustaches": "moustache",
    "avalanches": "avalanche", "caches": "cache", "niches": "niche", "cliches": "cliche",
    "quiches": "quiche", "creches": "creche",
    # plurals in -us (the default keeps -us words: bus, cactus, octopus)
    "menus": "menu", "emus": "emu", "gnus": "gnu", "zebus": "zebu", "gurus": "guru",
    "tutus": "tutu", "haikus": "haiku", "bayous": "bayou", "caribous": "caribou",
    "tofus": "tofu", "tiramisus": "tiramisu",
}  # fmt: skip

# Compound plurals handled by their ending: policemen, grandchildren, pocketknives, housewives.
_IRREGULAR_ENDINGS: Tuple[Tuple[str, str], ...] = (
    ("children", "child"),
    ("knives", "knife"),
    ("wives", "wife"),
    ("women", "woman"),
    ("men", "man"),
)

# Singular words that end like plurals and must stay as they are.
_UNCHANGED: Set[str] = {
    "sheep", "deer", "fish", "moose", "bison", "cattle", "swine", "salmon", "trout", "aircraft",
    "scissors", "series", "species", "news", "chassis", "means", "physics", "mathematics",
    "athletics", "gymnastics", "politics", "economics", "electronics", "diabetes", "rabies",
    "herpes", "measles", "was", "has", "gas", "canvas", "atlas", "christmas", "texas", "bias",
    "alias", "whereas", "always", "perhaps", "sometimes", "towards", "besides", "afterwards",
    "upwards", "downwards", "backwards", "forwards", "lens", "chaos", "cosmos", "kudos",
    "thermos", "ethos", "pathos", "asbestos", "rhinoceros", "yes", "its", "pants", "jeans",
    "shorts", "trousers", "clothes", "goggles", "binoculars",
    "pliers", "tongs", "overalls", "is", "this", "his", "tennis", "iris", "pelvis", "axis",
    "penis", "trellis", "mantis", "debris", "dais", "cannabis", "metropolis", "paris",
}  # fmt: skip

# Singular words ending in -ie, whose plurals end in -ies (not -y: "ponies" -> "pony").
_IE_NOUNS: Set[str] = {
    "cookie", "movie", "brownie", "veggie", "selfie", "hoodie", "zombie", "goalie", "rookie",
    "birdie", "beanie", "collie", "doggie", "magpie", "calorie", "pixie", "prairie",
    "smoothie", "sweetie", "auntie", "bookie", "budgie", "lassie", "potpie", "necktie",
    "bowtie", "genie", "hippie", "yuppie", "groupie", "cutie", "junkie", "newbie", "techie",
}  # fmt: skip

# -oes plurals whose singular ends in -o (the default keeps -oe: shoes, canoes, toes).
_OES_TO_O: Set[str] = {
    "tomatoes", "potatoes", "heroes", "mangoes", "volcanoes", "mosquitoes", "tornadoes",
    "torpedoes", "echoes", "buffaloes", "dominoes", "avocadoes", "zeroes", "cargoes",
    "vetoes", "mottoes", "haloes", "flamingoes", "goes", "noes",
}  # fmt: skip

# Words ending in -men that are not plurals of -man.
_NOT_MEN_PLURALS: Set[str] = {
    "amen", "omen", "semen", "stamen", "specimen", "abdomen", "hymen", "regimen", "lumen",
    "yemen", "ramen", "acumen", "albumen", "bitumen", "dolmen", "cyclamen", "carmen",
}  # fmt: skip


def singularize(word: str) -> str:
    """The singular of a lower-case English word; words that are not plurals come back as is
    (corrected mode; reference mode uses :func:`povid.metrics.chair_reference.pattern_singularize`).

    Rule-based with irregular tables, deterministic, no downloaded data. Exact for the COCO
    object vocabulary and its plurals (the tests check every word of :data:`COCO_SYNONYMS`);
    best effort for other words.
    """
    if len(word) <= 2 or word in _UNCHANGED or not word.isalpha():
        return _IRREGULAR_PLURALS.get(word, word)
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    for ending, singular in _IRREGULAR_ENDINGS:
        if word.endswith(ending) and word not in _NOT_MEN_PLURALS:
            return word[: -len(ending)] + singular
    # -ss, -us, -sis are singular (glass, bus, analysis); other -is words are plurals of -i
    # (skis, taxis) unless listed in _UNCHANGED (tennis, iris).
    if word.endswith(("ss", "us", "sis")) or not word.endswith("s") or len(word) <= 3:
        return word
    if word.endswith("ies"):
        if len(word) <= 4:  # ties, pies, lies
            return word[:-1]
        return word[:-1] if word[:-1] in _IE_NOUNS else word[:-3] + "y"
    if word.endswith("oes"):
        return word[:-2] if word in _OES_TO_O else word[:-1]
    if word.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return word[:-2]
    if word.endswith("uses") and not word.endswith(("ouses", "auses", "cuses", "fuses", "muses")):
        return word[:-2]  # buses, campuses, cactuses, walruses (but houses, causes, excuses)
    return word[:-1]


# ----------------------------------------------------------------------------- pairs

# Qualifiers that would otherwise fire "person" (a "baby" is a person, a "baby bird" a bird).
_ANIMAL_WORDS = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "animal", "cub",
)  # fmt: skip
_PASSENGER_VEHICLES = ("jet", "train")

# (word, next word) -> the single word the pair stands for. A result that is not in the
# synonym table ("animal", "train track") just removes both words from the object count.
# Keys are singularized like caption words ("sports ball" is matched as "sport ball").
_PAIRS: Dict[Tuple[str, str], str] = {
    tuple(singularize(w) for w in name.split()): name  # type: ignore[misc]
    for name in _WORD_TO_OBJECT
    if " " in name
}

_PAIRS.update({("baby", a): a for a in _ANIMAL_WORDS})
_PAIRS.update({("adult", a): a for a in _ANIMAL_WORDS})
_PAIRS.update({("passenger", v): v for v in _PASSENGER_VEHICLES})
_PAIRS.update(
    {
        ("bow", "tie"): "tie",
        ("toilet", "seat"): "toilet",
        ("train", "track"): "train track",  # the rails, not a train
        ("home", "plate"): "home plate",  # baseball, not a plate (keeps the original's rule)
    }
)

# ----------------------------------------------------------------------------- mentions


@dataclass(frozen=True)
class Mention:
    """One mention of a COCO object: the caption's word (singular) and the category."""

    word: str
    object: str


def _join_pairs(words: Sequence[str]) -> List[str]:
    """Replace each known two-word name by one word, scanning left to right without overlap."""
    joined: List[str] = []
    i = 0
    while i < len(words):
        pair = (words[i], words[i + 1]) if i + 1 < len(words) else None
        if pair in _PAIRS:
            joined.append(_PAIRS[pair])
            i += 2
        else:
            joined.append(words[i])
            i += 1
    return joined


def find_objects(caption: str, mode: str = DEFAULT_CHAIR_MODE) -> List[Mention]:
    """Every COCO object mention in ``caption``, in order, repeats included.

    Args:
        caption: any text.
        mode: ``"reference"`` (the original script's counting) or ``"corrected"``.

    Example:
        >>> [m.object for m in find_objects("Two hot dogs and a puppy on a toilet seat.")]
        ['hot dog', 'dog', 'toilet']
        >>> [m.object for m in find_objects("A bus and two buses.", mode="corrected")]
        ['bus', 'bus']
        >>> [m.object for m in find_objects("A bus and two buses.")]  # Pattern: "bus" -> "bu"
        ['bus']
    """
    if check_chair_mode(mode) == "reference":
        return [Mention(word, obj) for word, obj in reference_mentions(caption)]
    words = _join_pairs([singularize(w) for w in tokenize(caption)])
    if "toilet" in words:
        # "the seat of the toilet" would otherwise fire "chair".
        words = [w for w in words if w != "seat"]
    return [Mention(w, _WORD_TO_OBJECT[w]) for w in words if w in _WORD_TO_OBJECT]


def ground_truth_objects(coco: CocoAnnotations, image_id: int, mode: str = DEFAULT_CHAIR_MODE) -> Set[str]:
    """The objects of an image: its instance categories plus objects named in its captions
    (read with the counting of ``mode``, as the original reads them with its own).

    Raises:
        AnnotationError: the image is not in the annotations, or an instance category is not
            one of the 80 COCO categories (the synonym table has no entry for it).
    """
    coco.require_images([image_id])
    objects: Set[str] = set()
    for name in coco.objects[image_id]:
        if name not in COCO_SYNONYMS:
            raise AnnotationError(
                f"{coco.instances_path}: category {name!r} (on image id {image_id}) is not a "
                f"COCO object category; CHAIR's synonym table covers the 80 COCO categories"
            )
        objects.add(name)
    for caption in coco.captions.get(image_id, []):
        objects.update(m.object for m in find_objects(caption, mode))
    return objects


# ----------------------------------------------------------------------------- scores


def score_caption(
    image_id: int, caption: str, ground_truth: Set[str], mode: str = DEFAULT_CHAIR_MODE
) -> Dict[str, Any]:
    """Per-caption CHAIR details, mentions counted with ``mode``.

    Returns:
        ``image_id``, ``caption``, ``num_words``, ``mentions`` (``[word, object]`` pairs in
        order), ``hallucinated`` and ``correct`` (the mentions outside / inside the ground
        truth, repeats kept), ``ground_truth`` (sorted), ``chair_s`` (0 or 1), ``chair_i``
        (hallucinated / mentions, 0 without mentions), ``recall`` (distinct correct objects /
        ground-truth objects, 0 without ground truth).
    """
    mentions = find_objects(caption, mode)
    hallucinated = [m for m in mentions if m.object not in ground_truth]
    correct = [m for m in mentions if m.object in ground_truth]
    distinct_correct = {m.object for m in correct}
    return {
        "image_id": image_id,
        "caption": caption,
        "num_words": len(tokenize(caption)),
        "mentions": [[m.word, m.object] for m in mentions],
        "hallucinated": [[m.word, m.object] for m in hallucinated],
        "correct": [[m.word, m.object] for m in correct],
        "ground_truth": sorted(ground_truth),
        "chair_s": int(bool(hallucinated)),
        "chair_i": len(hallucinated) / len(mentions) if mentions else 0.0,
        "recall": len(distinct_correct) / len(ground_truth) if ground_truth else 0.0,
    }


def chair_metrics(per_caption: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
    """Corpus-level CHAIR from :func:`score_caption` outputs (fractions, not percentages).

    Returns:
        ``chair_s``, ``chair_i``, ``recall``, ``mean_length`` and the counts behind them
        (``num_captions``, ``num_hallucinated_captions``, ``num_mentions``,
        ``num_hallucinated_mentions``, ``num_correct_objects``, ``num_ground_truth_objects``).
    """
    n = len(per_caption)
    mentions = sum(len(c["mentions"]) for c in per_caption)
    hallucinated = sum(len(c["hallucinated"]) for c in per_caption)
    correct_objects = sum(len({obj for _, obj in c["correct"]}) for c in per_caption)
    gt_objects = sum(len(c["ground_truth"]) for c in per_caption)
    bad_captions = sum(c["chair_s"] for c in per_caption)
    return {
        "chair_s": bad_captions / n if n else 0.0,
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "recall": correct_objects / gt_objects if gt_objects else 0.0,
        "mean_length": sum(c["num_words"] for c in per_caption) / n if n else 0.0,
        "num_captions": n,
        "num_hallucinated_captions": bad_captions,
        "num_mentions": mentions,
        "num_hallucinated_mentions": hallucinated,
        "num_correct_objects": correct_objects,
        "num_ground_truth_objects": gt_objects,
    }


def evaluate_chair(
    captions: Iterable[Tuple[int, str]],
    coco: CocoAnnotations,
    source: str = "",
    mode: str = DEFAULT_CHAIR_MODE,
) -> Dict[str, Any]:
    """CHAIR of ``(image_id, caption)`` pairs against COCO annotations.

    Args:
        captions: generated captions; each image id must be in the annotations.
        coco: annotations loaded with captions (:func:`povid.metrics.coco.load_coco`).
        source: where the captions come from (named in errors).
        mode: ``"reference"`` (default, the original script's counting) or ``"corrected"``;
            used for the generated and the ground-truth captions alike.

    Returns:
        ``{"metrics": chair_metrics(...), "captions": [score_caption(...), ...]}``.

    Raises:
        AnnotationError: an image id is missing from the instances or captions file.
    """
    check_chair_mode(mode)
    captions = list(captions)
    coco.require_images((image_id for image_id, _ in captions), requested_by=source)
    per_caption = [
        score_caption(image_id, text, ground_truth_objects(coco, image_id, mode), mode)
        for image_id, text in captions
    ]
    return {"metrics": chair_metrics(per_caption), "captions": per_caption}


def _image_id(value: Any) -> Optional[int]:
    """A COCO image id from an int or a string of digits; None if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def read_captions(path: str | Path) -> List[Tuple[int, str]]:
    """Generated captions from a JSONL file or JSON list of ``{"image_id", "caption"}``.

    An empty caption is valid (it mentions nothing). Ids may be ints or digit strings.

    Raises:
        FileNotFoundError / ValueError: missing file, invalid JSON, a record without a valid
            ``image_id`` or ``caption``, or an image id captioned twice (names file and id).
    """
    captions: List[Tuple[int, str]] = []
    seen: Set[int] = set()
    for i, record in enumerate(read_records(path), 1):
        image_id = _image_id(record.get("image_id"))
        if image_id is None:
            raise ValueError(
                f"{path}: record {i}: field 'image_id' is missing or not an integer "
                f"(got {record.get('image_id')!r})"
            )
        caption = record.get("caption")
        if not isinstance(caption, str):
            raise ValueError(f"{path}: record {i} (image_id {image_id}): field 'caption' is missing or not a string")
        if image_id in seen:
            raise ValueError(f"{path}: image_id {image_id} is captioned twice")
        seen.add(image_id)
        captions.append((image_id, caption))
    return captions
