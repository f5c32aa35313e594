"""POPE (Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language Models").

Yes/no questions "Is there a X in the image?": for each image, some objects that are there
(label ``yes``) and as many that are not (label ``no``), chosen three ways, one split each:

- ``random``: any object of the question set that the image lacks;
- ``popular``: the most frequent objects (over the sampled images) that the image lacks;
- ``adversarial``: for each object asked about, the object that co-occurs with it most often
  (over the sampled images) and that the image lacks.

Files use the JSONL layout of LLaVA's POPE evaluation: questions ``{"question_id", "image",
"text", "label", "category"}`` (``category`` is the split; without it the split is taken from
the file name, as in POPE's ``coco_pope_random.json``), answers ``{"question_id", "text"}``.

Answers are read the way the reference evaluation (POPE's ``evaluate.py``, LLaVA's
``eval_pope.py``) reads them: keep the text before the first ``"."``, drop commas, split into
words; the answer is *no* if a word is exactly ``"No"``, ``"no"`` or ``"not"``, otherwise *yes*.
So an answer that is neither ("I cannot tell", "", "Not sure") counts as yes; such answers are
counted in ``num_unclear`` so that a model that stops answering shows up. One deviation: words
are split on any whitespace, not only on spaces (``"No\\nthe dog..."`` is *no* here).

The question builder follows POPE's ``main.py`` / ``utils.py``: images with at least
``objects_per_image`` annotated objects are sampled, each gets that many positive questions, each
followed by one negative question of the split's kind; when no popular / co-occurring candidate
is left, a random one is used. Differences: objects come from the instance annotations of a
COCO-format file, the positives are a seeded sample of the image's objects (POPE takes the first
ones of its file), ties in frequency are broken by name, and every question id is unique across
the three splits (LLaVA's merged test file does the same).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from povid.metrics.coco import CocoAnnotations
from povid_data.jsonl import read_records

__all__ = [
    "POPE_SPLITS",
    "DEFAULT_QUESTION_TEMPLATE",
    "PopeQuestion",
    "parse_yes_no",
    "is_unclear",
    "pope_metrics",
    "evaluate_pope",
    "build_pope_questions",
    "read_pope_questions",
    "read_pope_answers",
    "match_answers",
    "format_pope_prompt",
]

POPE_SPLITS = ("random", "popular", "adversarial")
DEFAULT_QUESTION_TEMPLATE = "Is there {article} {object} in the image?"
_NO_WORDS = {"No", "no", "not"}  # exactly the reference's words, case included


@dataclass
class PopeQuestion:
    """One POPE question. ``split`` is written as ``category`` (LLaVA's field name)."""

    question_id: int | str
    image: str
    text: str
    label: str
    split: str
    object: Optional[str] = None
    image_id: Optional[int] = None

    def to_record(self) -> Dict[str, Any]:
        """The JSONL record (``category`` = split; ``object``/``image_id`` when known)."""
        record = {
            "question_id": self.question_id,
            "image": self.image,
            "text": self.text,
            "label": self.label,
            "category": self.split,
            "object": self.object,
            "image_id": self.image_id,
        }
        return {k: v for k, v in record.items() if v is not None}


# ----------------------------------------------------------------------------- answers


def _first_sentence_words(text: str) -> List[str]:
    return text.split(".")[0].replace(",", "").split()


def parse_yes_no(text: str) -> str:
    """``"no"`` if the first sentence has the word ``No``, ``no`` or ``not``, else ``"yes"``.

    Example:
        >>> parse_yes_no("No, there is no dog."), parse_yes_no("Yes. Not a cat."), parse_yes_no("")
        ('no', 'yes', 'yes')
    """
    return "no" if _NO_WORDS.intersection(_first_sentence_words(text)) else "yes"


def is_unclear(text: str) -> bool:
    """True for an answer read as yes only by default: no ``yes`` word in its first sentence
    (any case) and no negation word the reference recognises."""
    if parse_yes_no(text) == "no":
        return False
    return not any(word.lower() == "yes" for word in _first_sentence_words(text))


def pope_metrics(labels: Sequence[str], answers: Sequence[str]) -> Dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of answer texts against yes/no labels.

    ``yes`` is the positive class. Precision, recall and F1 are 0 when undefined (the
    reference divides by zero). Returns fractions plus the counts ``tp``, ``fp``, ``tn``,
    ``fn``, ``num_questions`` and ``num_unclear``.
    """
    if len(labels) != len(answers):
        raise ValueError(f"{len(labels)} labels but {len(answers)} answers")
    predictions = [parse_yes_no(a) for a in answers]
    pairs = list(zip(predictions, labels))
    tp = pairs.count(("yes", "yes"))
    fp = pairs.count(("yes", "no"))
    tn = pairs.count(("no", "no"))
    fn = pairs.count(("no", "yes"))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": predictions.count("yes") / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "num_questions": n,
        "num_unclear": sum(is_unclear(a) for a in answers),
    }


def evaluate_pope(
    questions: Sequence[PopeQuestion], answers: Sequence[str]
) -> Dict[str, Dict[str, float]]:
    """:func:`pope_metrics` per split, splits in POPE's order (others after, by name)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    by_split: Dict[str, Tuple[List[str], List[str]]] = defaultdict(lambda: ([], []))
    for question, answer in zip(questions, answers):
        by_split[question.split][0].append(question.label)
        by_split[question.split][1].append(answer)
    order = sorted(by_split, key=lambda s: (POPE_SPLITS.index(s) if s in POPE_SPLITS else 99, s))
    return {split: pope_metrics(*by_split[split]) for split in order}


# ----------------------------------------------------------------------------- files


def _split_from_file_name(path: Path) -> str:
    """``coco_pope_adversarial.json`` -> ``adversarial``; else the file stem."""
    stem = path.stem.lower()
    for split in POPE_SPLITS:
        if split in stem:
            return split
    return path.stem


def read_pope_questions(paths: str | Path | Sequence[str | Path]) -> List[PopeQuestion]:
    """Questions from one or more JSONL / JSON-list files.

    Each record needs ``question_id`` (int or str), ``image``, ``text`` and ``label``
    (``yes``/``no``, any case); the split is ``category`` or comes from the file name.

    Raises:
        FileNotFoundError / ValueError: a missing file, invalid JSON, a missing or bad field, or
            a question id repeated within a split (message names the file and id).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    questions: List[PopeQuestion] = []
    seen: set = set()
    for path in map(Path, paths):
        default_split = _split_from_file_name(path)
        for i, record in enumerate(read_records(path), 1):
            qid = record.get("question_id")
            if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
                raise ValueError(f"{path}: record {i}: field 'question_id' is missing or not an int/string")
            where = f"{path}: question_id {qid!r}"
            for field in ("image", "text", "label"):
                if not isinstance(record.get(field), str) or not record[field].strip():
                    raise ValueError(f"{where}: field {field!r} is missing or empty")
            label = record["label"].strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{where}: field 'label' must be 'yes' or 'no', got {record['label']!r}")
            split = str(record.get("category") or default_split)
            if (split, qid) in seen:
                raise ValueError(f"{where}: appears twice in split {split!r}")
            seen.add((split, qid))
            questions.append(
                PopeQuestion(qid, record["image"], record["text"], label, split,
                             record.get("object"), record.get("image_id"))
            )  # fmt: skip
    return questions


def read_pope_answers(path: str | Path) -> Dict[Tuple[Optional[str], Any], str]:
    """Answers ``{"question_id", "text"[, "category"]}`` keyed by ``(category or None, id)``.

    Raises:
        FileNotFoundError / ValueError: missing file, invalid JSON, a missing field, or an id
            answered twice (names file and id).
    """
    answers: Dict[Tuple[Optional[str], Any], str] = {}
    for i, record in enumerate(read_records(path), 1):
        qid = record.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
            raise ValueError(f"{path}: record {i}: field 'question_id' is missing or not an int/string")
        text = record.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{path}: question_id {qid!r}: field 'text' is missing or not a string")
        key = (record.get("category"), qid)
        if key in answers:
            raise ValueError(f"{path}: question_id {qid!r} is answered twice")
        answers[key] = text
    return answers


def match_answers(
    questions: Sequence[PopeQuestion],
    answers: Mapping[Tuple[Optional[str], Any], str],
    answers_path: str | Path = "answers",
) -> List[str]:
    """The answer text of each question, matched by question id (and split when answers have
    a ``category``). Ids may be ints in one file and strings in the other.

    Raises:
        ValueError: a question without an answer, an answer to no question, or an id shared by
            several splits while the answers carry no ``category`` (names the file and id).
    """
    norm = {(split, str(qid)): text for (split, qid), text in answers.items()}
    splits_of_id: Dict[str, List[str]] = defaultdict(list)
    for q in questions:
        splits_of_id[str(q.question_id)].append(q.split)
    texts, used = [], set()
    for q in questions:
        qid = str(q.question_id)
        if (q.split, qid) in norm:
            key = (q.split, qid)
        elif (None, qid) in norm:
            if len(splits_of_id[qid]) > 1:
                raise ValueError(
                    f"{answers_path}: question_id {q.question_id!r} is in splits "
                    f"{sorted(splits_of_id[qid])}; the answers need a 'category' field to tell them apart"
                )
            key = (None, qid)
        else:
            raise ValueError(
                f"{answers_path}: no answer for question_id {q.question_id!r} (split {q.split!r})"
            )
        texts.append(norm[key])
        used.add(key)
    extra = [qid for (split, qid) in answers if (split, str(qid)) not in used]
    if extra:
        raise ValueError(
            f"{answers_path}: {len(extra)} answer(s) match no question, e.g. question_id {extra[0]!r}"
        )
    return texts


def format_pope_prompt(template: str, question: str) -> str:
    """``template`` with ``{question}`` filled in, unless the question already carries the
    template's text around it (LLaVA's ``llava_pope_test.jsonl`` includes the answer-format
    instruction), so the instruction is never doubled."""
    if "{question}" not in template:
        raise ValueError(f"POPE prompt template must contain '{{question}}', got {template!r}")
    before, after = template.split("{question}", 1)
    if question.startswith(before) and question.endswith(after) and (before or after):
        return question
    return before + question + after


# ----------------------------------------------------------------------------- builder


def _question_text(template: str, obj: str) -> str:
    article = "an" if obj[:1].lower() in "aeiou" else "a"
    return template.format(article=article, object=obj)


def _ranked(counts: Mapping[str, int]) -> List[str]:
    """Names by count, most frequent first; ties by name so the order is reproducible."""
    return sorted(counts, key=lambda name: (-counts[name], name))


def build_pope_questions(
    coco: CocoAnnotations,
    *,
    num_images: Optional[int] = 500,
    objects_per_image: int = 3,
    seed: int = 0,
    splits: Iterable[str] = POPE_SPLITS,
    template: str = DEFAULT_QUESTION_TEMPLATE,
) -> List[PopeQuestion]:
    """Build POPE questions from COCO instance annotations (see the module docstring).

    Args:
        coco: annotations (captions not needed).
        num_images: images to sample among those with at least ``objects_per_image`` objects
            (None: all of them).
        objects_per_image: positive questions per image, each followed by one negative.
        seed: seeds image sampling, positives and the random negatives.
        splits: any of ``random``, ``popular``, ``adversarial``.
        template: question text with ``{object}`` and ``{article}`` (``a`` / ``an``).

    Returns:
        Questions grouped by split, then image; ids 1..N unique across splits.

    Raises:
        ValueError: an unknown split, or fewer eligible images than ``num_images``.
    """
    splits = list(splits)
    unknown = [s for s in splits if s not in POPE_SPLITS]
    if unknown:
        raise ValueError(f"unknown POPE split(s) {unknown}; choose from {list(POPE_SPLITS)}")
    if objects_per_image < 1:
        raise ValueError(f"objects_per_image must be >= 1, got {objects_per_image}")
    rng = random.Random(seed)
    eligible = sorted(i for i, objs in coco.objects.items() if len(objs) >= objects_per_image)
    if num_images is not None:
        if len(eligible) < num_images:
            raise ValueError(
                f"{coco.instances_path}: only {len(eligible)} images have >= {objects_per_image} "
                f"annotated objects, fewer than num_images={num_images}"
            )
        eligible = sorted(rng.sample(eligible, num_images))
    positives = {i: sorted(rng.sample(coco.objects[i], objects_per_image)) for i in eligible}

    frequency: Counter = Counter()
    co_occurrence: Dict[str, Counter] = defaultdict(Counter)
    for image_id in eligible:
        objects = coco.objects[image_id]
        frequency.update(objects)
        for a in objects:
            co_occurrence[a].update(b for b in objects if b != a)
    vocabulary = sorted(frequency)
    popular = _ranked(frequency)
    co_ranked = {obj: _ranked(counts) for obj, counts in co_occurrence.items()}

    questions: List[PopeQuestion] = []
    for split in splits:
        # One generator per split, so a split's questions do not depend on which others are built.
        split_rng = random.Random(f"{seed}:{split}")
        for image_id in eligible:
            present = set(coco.objects[image_id])
            asked: List[str] = []
            for positive in positives[image_id]:
                asked.append(positive)
                taken = present.union(asked)
                if split == "popular":
                    ranked = popular
                elif split == "adversarial":
                    ranked = co_ranked.get(positive, [])
                else:
                    ranked = []
                negative = next((o for o in ranked if o not in taken), None)
                if negative is None:
                    candidates = [o for o in vocabulary if o not in taken]
                    if not candidates:
                        raise ValueError(
                            f"{coco.instances_path}: image id {image_id}: no object left to ask "
                            f"about as a negative (the sampled images name only {len(vocabulary)} objects)"
                        )
                    negative = split_rng.choice(candidates)
                asked.append(negative)
                for obj, label in ((positive, "yes"), (negative, "no")):
                    questions.append(
                        PopeQuestion(
                            question_id=len(questions) + 1,
                            image=coco.images[image_id],
                            text=_question_text(template, obj),
                            label=label,
                            split=split,
                            object=obj,
                            image_id=image_id,
                        )
                    )
    return questions
