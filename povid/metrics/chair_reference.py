"""CHAIR's ``reference`` mode: the original script's counting, quirks included.

The original (Rohrbach et al., 2018; ``LisaAnne/Hallucination``, ``utils/chair.py``, and the
standalone copies papers vendor) turns a caption into object mentions with

1. ``nltk.word_tokenize(caption.lower())``: Punkt sentence splitting, then NLTK's improved
   Treebank word tokenizer on each sentence;
2. ``pattern.en.singularize`` (Pattern 3.6) on every token;
3. its two-word table, scanned left to right;
4. dropping ``"seat"`` when the caption also has ``"toilet"``;
5. its synonym table (``data/synonyms.txt``), read with ``line.strip().split(", ")``.

This module re-implements each step from those libraries' documented rules, with no
downloaded data and no dependency on ``nltk`` or ``pattern`` (``pattern`` does not install
on current Pythons; ``word_tokenize`` needs the ``punkt`` download). What is reproduced
exactly and what is not is listed in ``povid/metrics/CHAIR.md``; in short, Punkt is run
without its trained English parameters, which can only change tokens that are English
abbreviations (``"st."``, ``"dr."``), never a COCO object word.
"""

from __future__ import annotations

import functools
import re
import string
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "REFERENCE_SYNONYM_LINES",
    "REFERENCE_SYNONYMS",
    "REFERENCE_DOUBLE_WORDS",
    "punkt_sentences",
    "treebank_tokenize",
    "reference_tokenize",
    "pattern_singularize",
    "reference_words",
    "reference_mentions",
]

# ----------------------------------------------------------------------------- tables

# The original's synonym file, one category per line, first entry = category name. Kept
# verbatim, double spaces included: the original splits on ", ", so "cake,  cheesecake"
# yields the entry " cheesecake" (leading space) that no token can ever equal. Same for
# " motor bike". "iPhone" never matches either, since captions are lower-cased first.
REFERENCE_SYNONYM_LINES: Tuple[str, ...] = (
    "person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager",
    "bicycle, bike, bicycle, bike, unicycle, minibike, trike",
    "car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi",
    "motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped",
    "airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane",
    "bus, minibus, trolley",
    "train, locomotive, tramway, caboose",
    "truck, pickup, lorry, hauler, firetruck",
    "boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship",
    "traffic light, street light, traffic signal, stop light, streetlight, stoplight",
    "fire hydrant, hydrant",
    "stop sign",
    "parking meter",
    "bench, pew",
    "bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird",
    "cat, kitten, feline, tabby",
    "dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky",
    "horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco",
    "sheep, lamb, ram, lamb, goat, ewe",
    "cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison ",
    "elephant",
    "bear, panda",
    "zebra",
    "giraffe",
    "backpack, knapsack",
    "umbrella",
    "handbag, wallet, purse, briefcase",
    "tie, bow, bow tie",
    "suitcase, suit case, luggage",
    "frisbee",
    "skis, ski",
    "snowboard",
    "sports ball, ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard, longboard, skimboard, shortboard, wakeboard",
    "tennis racket, racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife, pocketknife, knive",
    "spoon",
    "bowl, container",
    "banana",
    "apple",
    "sandwich, burger, sub, cheeseburger, hamburger",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut, doughnut, bagel",
    "cake,  cheesecake, cupcake, shortcake, coffeecake, pancake",
    "chair, seat, stool",
    "couch, sofa, recliner, futon, loveseat, settee, chesterfield ",
    "potted plant, houseplant",
    "bed",
    "dining table, table, desk",
    "toilet, urinal, commode, toilet, lavatory, potty",
    "tv, monitor, televison, television",
    "laptop, computer, notebook, netbook, lenovo, macbook, laptop computer",
    "mouse",
    "remote",
    "keyboard",
    "cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone",
    "microwave",
    "oven, stovetop, stove, stove top oven",
    "toaster",
    "sink",
    "refrigerator, fridge, fridge, freezer",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear, teddybear",
    "hair drier, hairdryer",
    "toothbrush",
)  # fmt: skip


def _read_synonyms(lines: Sequence[str]) -> Dict[str, str]:
    """Entry -> category, parsed the way the original parses its file (later lines win)."""
    table: Dict[str, str] = {}
    for line in lines:
        entries = line.strip().split(", ")
        for entry in entries:
            table[entry] = entries[0]
    return table


# entry (as the original stores it, odd spaces included) -> COCO category
REFERENCE_SYNONYMS: Dict[str, str] = _read_synonyms(REFERENCE_SYNONYM_LINES)

_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                 "giraffe", "animal", "cub")  # fmt: skip
_VEHICLE_WORDS = ("jet", "train")

# "word word" (after singularizing) -> what the pair stands for. The original's list: note
# "wine glas" (Pattern turns "glass" into "glas"), and no "hair dryer" / "blow dryer".
# "stove top oven" is in its list but can never match: only pairs of tokens are joined.
REFERENCE_DOUBLE_WORDS: Dict[str, str] = {
    **{
        name: name
        for name in (
            "motor bike", "motor cycle", "air plane", "traffic light", "street light",
            "traffic signal", "stop light", "fire hydrant", "stop sign", "parking meter",
            "suit case", "sports ball", "baseball bat", "baseball glove", "tennis racket",
            "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
            "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate",
            "train track",
        )
    },
    **{f"baby {a}": a for a in _ANIMAL_WORDS},
    **{f"adult {a}": a for a in _ANIMAL_WORDS},
    **{f"passenger {v}": v for v in _VEHICLE_WORDS},
    "bow tie": "tie",
    "toilet seat": "toilet",
    "wine glas": "wine glass",
}  # fmt: skip

# ----------------------------------------------------------------------------- Punkt

# Punkt (Kiss & Strunk 2006, as in NLTK 3.10) only matters here for one thing: whether a
# period ends a sentence. The word tokenizer splits a period off only at the end of a
# sentence, so "dog." inside a sentence stays one token that names nothing.
_SENT_END = ".?!"
_NON_WORD = ")\";}]*:@'({[\u2018\u2019\u201c\u201d\xab\xbb?!"  # cannot appear inside a Punkt word
_NOT_WORD_START = "(\"`{[:;&#*@)}]-,"
_PUNKT_PUNCTUATION = tuple(";:,.!?")

_NW = re.escape(_NON_WORD)
_MULTI_CHAR = r"(?:\-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_PUNKT_WORD_RE = re.compile(
    rf"""({_MULTI_CHAR}
        |(?=[^{re.escape(_NOT_WORD_START)}])\S+?
         (?=\s|$|[{_NW}]|{_MULTI_CHAR}|,(?=$|\s|[{_NW}]|{_MULTI_CHAR}))
        |\S)""",
    re.VERBOSE,
)
_PERIOD_CONTEXT_RE = re.compile(rf"[{re.escape(_SENT_END)}](?=(?P<after_tok>[{_NW}]|\s+(?P<next_tok>\S+)))")
_NUMBER_RE = re.compile(r"^-?[\.,]?\d[\d,\.-]*\.?$")
_INITIAL_RE = re.compile(r"[^\W\d]\.$")
_ELLIPSIS_RE = re.compile(r"\.\.+$")
_REALIGN_RE = re.compile(r"[\"')\]}\u2018\u2019\u201c\u201d\xab\xbb]+?(?:\s+|(?=--)|$)", re.MULTILINE)


def _punkt_words(text: str) -> List[str]:
    """Punkt's own word split (used only to decide sentence breaks), line by line."""
    return [tok for line in text.split("\n") if line.strip() for tok in _PUNKT_WORD_RE.findall(line)]


def _is_number(token: str) -> bool:
    return bool(_NUMBER_RE.match(token.lower()))


def _ends_sentence(token: str, next_token: Optional[str]) -> bool:
    """Punkt's decision for one token, without trained parameters (no abbreviation list).

    A lone ``.``/``?``/``!`` or a word ending in one period ends a sentence, except that an
    initial (``"j."``) or a number (``"2."``) does not when the next token starts with a
    lower-case letter or is ``;:,.!?`` (the orthographic heuristic: every token is
    lower-case here). An ellipsis never ends a sentence before a lower-case word.
    """
    if token in _SENT_END:
        return True
    if _ELLIPSIS_RE.match(token) or not token.endswith(".") or token.endswith(".."):
        return False
    if next_token is not None and (_INITIAL_RE.match(token) or _is_number(token)):
        next_is_lower = next_token[0].islower()
        if next_token in _PUNKT_PUNCTUATION or next_is_lower:
            return False
    return True


def _context_has_break(context: str) -> bool:
    """True if a token other than the last one of ``context`` ends a sentence."""
    tokens = _punkt_words(context)
    for i, token in enumerate(tokens[:-1]):
        if _ends_sentence(token, tokens[i + 1]):
            return True
    return False


def _candidate_breaks(text: str):
    """(match, context) for each possible sentence end, overlapping runs (``"!!!"``) merged.

    The context is the word before the mark, the mark, and what follows it (one
    punctuation character, or whitespace and the next word), as Punkt builds it.
    """
    previous: Optional[Tuple[re.Match, int, int]] = None
    for match in _PERIOD_CONTEXT_RE.finditer(text):
        stop = previous[2] if previous else 0
        before = text[stop : match.start()]
        last_space = max((i for i, ch in enumerate(before) if ch in string.whitespace), default=None)
        start = stop + last_space + 1 if last_space else (previous[1] if previous else 0)
        if previous and previous[2] <= start:
            yield previous[0], text[previous[1] : previous[2]] + previous[0].group() + previous[0].group("after_tok")
        previous = (match, start, match.start())
    if previous:
        yield previous[0], text[previous[1] : previous[2]] + previous[0].group() + previous[0].group("after_tok")


def punkt_sentences(text: str) -> List[str]:
    """Sentences of ``text`` as Punkt splits them (untrained parameters, see module doc)."""
    slices = []
    last_break = 0
    for match, context in _candidate_breaks(text):
        if _context_has_break(context):
            slices.append([last_break, match.end()])
            last_break = match.start("next_tok") if match.group("next_tok") else match.end()
    slices.append([last_break, len(text.rstrip())])
    # A closing quote or bracket right after a sentence end belongs to that sentence.
    sentences = []
    shift = 0
    for i, (start, stop) in enumerate(slices):
        start += shift
        shift = 0
        if i + 1 < len(slices):
            nxt = slices[i + 1]
            m = _REALIGN_RE.match(text[nxt[0] : nxt[1]])
            if m:
                stop = nxt[0] + len(m.group(0).rstrip())
                shift = m.end()
        if text[start:stop]:
            sentences.append(text[start:stop])
    return sentences


# ----------------------------------------------------------------------------- Treebank

# NLTK's improved Treebank word tokenizer (NLTKWordTokenizer, NLTK 3.10), rule by rule. Older
# NLTK versions lack some rules (dashes, curly quotes, '*'); see CHAIR.md.
_CLOSERS = "\\]\\)}>\"'\xbb\u201d\u2019"
_STARTING_QUOTES = (
    (re.compile("([\xab\u201c\u2018\u201e]|[`]+)"), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
)
_PUNCTUATION = (
    (re.compile(rf"([^\.])(\.)([{_CLOSERS} ]*)\s*$"), r"\1 \2 \3 "),  # sentence-final period
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile("[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r"([^\.])(\.)([\]\)}>\"\']*)\s*$"), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
)
_BRACKETS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DOUBLE_DASH = (re.compile(r"--"), r" -- ")
_ENDING_QUOTES = (
    (re.compile("([\xbb\u201d\u2019])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
)
_CONTRACTIONS = tuple(
    re.compile(p)
    for p in (
        r"(?i)\b(can)(?#X)(not)\b", r"(?i)\b(d)(?#X)('ye)\b", r"(?i)\b(gim)(?#X)(me)\b",
        r"(?i)\b(gon)(?#X)(na)\b", r"(?i)\b(got)(?#X)(ta)\b", r"(?i)\b(lem)(?#X)(me)\b",
        r"(?i)\b(more)(?#X)('n)\b", r"(?i)\b(wan)(?#X)(na)(?=\s)",
        r"(?i) ('t)(?#X)(is)\b", r"(?i) ('t)(?#X)(was)\b",
    )
)  # fmt: skip


def treebank_tokenize(sentence: str) -> List[str]:
    """Tokens of one sentence: punctuation split off, a period only at the sentence's end."""
    text = sentence
    for rule, repl in _STARTING_QUOTES + _PUNCTUATION + (_BRACKETS, _DOUBLE_DASH):
        text = rule.sub(repl, text)
    text = " " + text + " "
    for rule, repl in _ENDING_QUOTES:
        text = rule.sub(repl, text)
    for rule in _CONTRACTIONS:
        text = rule.sub(r" \1 \2 ", text)
    return text.split()


def reference_tokenize(caption: str) -> List[str]:
    """``nltk.word_tokenize(caption.lower())`` as the original calls it."""
    return [tok for sentence in punkt_sentences(caption.lower()) for tok in treebank_tokenize(sentence)]


# ----------------------------------------------------------------------------- Pattern

# Pattern 3.6's singularize (pattern/text/en/inflect.py), rules in its order. Its quirks are
# the point: "bus" -> "bu", "ties" -> "ty", "glass" -> "glas", "canoes" -> "cano",
# "cookies" stays "cookies", and "s$" strips any other final s.
_UNINFLECTED = frozenset((
    "bison", "debris", "headquarters", "pincers", "trout", "bream", "diabetes", "herpes",
    "pliers", "tuna", "breeches", "djinn", "high-jinks", "proceedings", "whiting", "britches",
    "eland", "homework", "rabies", "wildebeest", "carp", "elk", "innings", "salmon", "chassis",
    "flounder", "jackanapes", "scissors", "christmas", "gallows", "mackerel", "series",
    "clippers", "georgia", "measles", "shears", "cod", "graffiti", "mews", "species",
    "contretemps", "mumps", "swine", "corps", "news", "swiss",
))  # fmt: skip
_UNCOUNTABLE = frozenset((
    "advice", "equipment", "happiness", "luggage", "news", "software", "bread", "fruit",
    "information", "mathematics", "progress", "understanding", "butter", "furniture",
    "ketchup", "mayonnaise", "research", "water", "cheese", "garbage", "knowledge", "meat",
    "rice", "electricity", "gravel", "love", "mustard", "sand",
))  # fmt: skip
# Pattern tests ``word.endswith(entry + "s")``; "^pie" and "^tie" therefore never match.
_IE_WORDS = frozenset((
    "alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie",
    "nightie", "sortie", "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie",
    "birdie", "freebie", "junkie", "^pie", "sweetie", "zombie", "bogie", "goonie", "laddie",
    "pixie", "techie", "bombie", "groupie", "laramie", "quickie", "^tie", "collie", "hankie",
    "lingerie", "reverie", "toughie", "cookie", "hippie", "meanie", "rookie", "valkyrie",
))  # fmt: skip
_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef",
    "brethren": "brother", "children": "child", "corpora": "corpus", "corpuses": "corpus",
    "ephemerides": "ephemeris", "feet": "foot", "ganglia": "ganglion", "geese": "goose",
    "genera": "genus", "genii": "genie", "graffiti": "graffito", "helves": "helve",
    "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen",
    "occipita": "occiput", "octopodes": "octopus", "opera": "opus", "opuses": "opus",
    "our": "my", "oxen": "ox", "penes": "penis", "penises": "penis", "people": "person",
    "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth", "testes": "testis",
    "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}  # fmt: skip
_PLURAL_PREPOSITIONS = frozenset((
    "about", "before", "during", "of", "till", "above", "behind", "except", "off", "to",
    "across", "below", "for", "on", "under", "after", "beneath", "from", "onto", "until",
    "among", "beside", "in", "out", "unto", "around", "besides", "into", "over", "upon", "at",
    "between", "near", "since", "with", "athwart", "betwixt", "beyond", "but", "by",
))  # fmt: skip
# (pattern, replacement); the first rule that matches anywhere in the word is applied.
_SUFFIX_RULES = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"(?i)(.)ae$", r"\1a"), (r"(?i)(.)itis$", r"\1itis"), (r"(?i)(.)eaux$", r"\1eau"),
        (r"(?i)(quiz)zes$", r"\1"), (r"(?i)(matr)ices$", r"\1ix"),
        (r"(?i)(ap|vert|ind)ices$", r"\1ex"), (r"(?i)^(ox)en", r"\1"),
        (r"(?i)(alias|status)es$", r"\1"),
        (r"(?i)([octop|vir])i$", r"\1us"),  # a character class in Pattern: "safari" -> "safarus"
        (r"(?i)(cris|ax|test)es$", r"\1is"), (r"(?i)(shoe)s$", r"\1"), (r"(?i)(o)es$", r"\1"),
        (r"(?i)(bus)es$", r"\1"), (r"(?i)([m|l])ice$", r"\1ouse"),
        (r"(?i)(x|ch|ss|sh)es$", r"\1"), (r"(?i)(m)ovies$", r"\1ovie"),
        (r"(?i)(.)ombies$", r"\1ombie"), (r"(?i)(s)eries$", r"\1eries"),
        (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
        (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"),
        (r"erves$", "erve"), (r"([nlw]i)ves$", r"\1fe"), (r"(?i)([lr])ves$", r"\1f"),
        (r"([aeo])ves$", r"\1ve"), (r"(?i)(sive)s$", r"\1"), (r"(?i)(tive)s$", r"\1"),
        (r"(?i)(hive)s$", r"\1"), (r"(?i)([^f])ves$", r"\1fe"),
        (r"(?i)(^analy)ses$", r"\1sis"),
        (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
        (r"(?i)(.)opses$", r"\1opsis"), (r"(?i)(.)yses$", r"\1ysis"),
        (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
        (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
        (r"(?i)(.)oses$", r"\1osis"), (r"(?i)([ti])a$", r"\1um"), (r"(?i)(n)ews$", r"\1ews"),
        (r"(?i)s$", ""),
    )
)  # fmt: skip


_KEPT_ENDINGS = _UNINFLECTED | _UNCOUNTABLE


@functools.lru_cache(maxsize=1 << 16)  # captions repeat words; the rule scan is the slow part
def pattern_singularize(word: str) -> str:
    """``pattern.en.singularize(word)`` (Pattern 3.6), its quirks included.

    Example:
        >>> [pattern_singularize(w) for w in ("buses", "bus", "ties", "glasses", "people")]
        ['bus', 'bu', 'ty', 'glass', 'person']
    """
    if "-" in word:
        head, *rest = word.split("-")
        if rest and rest[0] in _PLURAL_PREPOSITIONS:  # "mothers-in-law"
            return pattern_singularize(head) + "-" + "-".join(rest)
    if word.endswith("'"):
        return pattern_singularize(word[:-1]) + "'s"
    lower = word.lower()
    # Pattern keeps a word when it is the *ending* of an uninflected word ("ice" of "advice").
    if any(entry.endswith(lower) for entry in _KEPT_ENDINGS):
        return word
    if any(lower.endswith(entry + "s") for entry in _IE_WORDS):
        return lower
    for plural, singular in _IRREGULAR.items():
        if lower.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for rule, replacement in _SUFFIX_RULES:
        if rule.search(word):
            return rule.sub(replacement, word)
    return word


# ----------------------------------------------------------------------------- mentions


def reference_words(caption: str) -> List[str]:
    """The caption's tokens after singularizing and joining two-word names (OPERA's ``Len``
    counts these), before the toilet-seat rule and the synonym lookup."""
    words = [pattern_singularize(tok) for tok in reference_tokenize(caption)]
    joined: List[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in REFERENCE_DOUBLE_WORDS:
            joined.append(REFERENCE_DOUBLE_WORDS[pair])
            i += 2
        else:
            joined.append(words[i])
            i += 1
    return joined


def reference_mentions(caption: str) -> List[Tuple[str, str]]:
    """``(word, category)`` for every COCO object mention, as the original counts them."""
    words = reference_words(caption)
    if "toilet" in words and "seat" in words:
        words = [w for w in words if w != "seat"]
    return [(w, REFERENCE_SYNONYMS[w]) for w in words if w in REFERENCE_SYNONYMS]
