"""LLaVA instruction records and POVID preference records, read exactly as published.

A LLaVA-Instruct record::

    {"id": "000000033471", "image": "coco/train2014/COCO_train2014_000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus in the image is white and red."}]}

A POVID preference record adds ``rejected_conversations`` (same shape; the last ``gpt`` turn is
the hallucinated answer). The toolkit adds, without touching the published fields:

- ``noise_conversations``: same shape; the last ``gpt`` turn is the answer the model gave on the
  diffusion-noised image (stage 2);
- ``povid_meta``: how the dispreferred answers were made (backend, model, seed, kinds, ...).

Records stay plain dicts so that every field a file carries survives a read/write cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from povid_data.jsonl import read_records
from povid_data.transforms import count_images

__all__ = [
    "CHOSEN",
    "REJECTED",
    "NOISE",
    "read_llava_records",
    "validate_conversation",
    "question_and_answer",
    "with_answer",
    "resolve_image",
    "default_image_dir",
    "check_image_markers",
]

CHOSEN = "conversations"
REJECTED = "rejected_conversations"
NOISE = "noise_conversations"

_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


def _role(turn: Dict[str, Any]) -> str:
    return str(turn.get("from", turn.get("role", "")))


def _text(turn: Dict[str, Any]) -> Any:
    return turn.get("value", turn.get("content"))


def validate_conversation(record: Dict[str, Any], field: str, source: str) -> None:
    """Check that ``record[field]`` alternates human/gpt turns with text, ending with gpt.

    Raises:
        ValueError: naming the source, the record id and the field.
    """
    where = f"{source}: record id={record.get('id', '?')!r}: field {field!r}"
    turns = record.get(field)
    if not isinstance(turns, list) or len(turns) < 2:
        raise ValueError(f"{where}: expected a list of at least 2 turns (human, gpt)")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: turn {i} is not an object")
        expected = _HUMAN if i % 2 == 0 else _GPT
        if _role(turn) not in expected:
            raise ValueError(f"{where}: turn {i} has from={_role(turn)!r}, expected {expected[0]!r}")
        text = _text(turn)
        if not isinstance(text, str) or (i % 2 == 1 and not text.strip()):
            raise ValueError(f"{where}: turn {i} has no text")
    if len(turns) % 2:
        raise ValueError(f"{where}: the last turn must be the assistant's (gpt)")


def read_llava_records(
    source: Any, *, require: Sequence[str] = (CHOSEN,), split: str = "train"
) -> Tuple[List[Dict[str, Any]], str]:
    """Read LLaVA/POVID records from a JSON list, a JSONL file, a ``datasets`` dataset saved
    with ``save_to_disk``, or an in-memory ``datasets.Dataset``.

    Every record must have an ``id`` (unique) and valid conversations in each field of
    ``require``; optional conversation fields present are validated too.

    Returns:
        ``(records, source_name)``; ``source_name`` is what error messages call the input.
    """
    records, name = _load(source, split)
    seen = set()
    for index, record in enumerate(records):
        if record.get("id") is None:
            raise ValueError(f"{name}: record #{index}: field 'id' is missing")
        rid = str(record["id"])
        if rid in seen:
            raise ValueError(f"{name}: record id={rid!r} appears more than once")
        seen.add(rid)
        for field in require:
            validate_conversation(record, field, name)
        for field in (CHOSEN, REJECTED, NOISE):
            if field not in require and record.get(field) is not None:
                validate_conversation(record, field, name)
    return records, name


def _load(source: Any, split: str) -> Tuple[List[Dict[str, Any]], str]:
    if hasattr(source, "to_list"):  # datasets.Dataset / DatasetDict
        dataset = source[split] if hasattr(source, "keys") else source
        return dataset.to_list(), "<datasets.Dataset>"
    path = Path(str(source))
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise FileNotFoundError(f"{path}: a directory, but not a dataset saved with save_to_disk")
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        dataset = dataset[split] if hasattr(dataset, "keys") else dataset
        return dataset.to_list(), str(path)
    return read_records(path), str(path)


def question_and_answer(record: Dict[str, Any], field: str = CHOSEN) -> Tuple[str, str]:
    """The first human question (``<image>`` marker removed) and the last gpt answer."""
    turns = record[field]
    question = _text(turns[0]).replace("<image>", "").strip()
    return question, _text(turns[-1])


def with_answer(record: Dict[str, Any], answer: str) -> List[Dict[str, Any]]:
    """A copy of the record's chosen conversation with the last gpt answer replaced."""
    turns = [dict(turn) for turn in record[CHOSEN]]
    key = "value" if "value" in turns[-1] else "content"
    turns[-1][key] = answer
    return turns


def resolve_image(record: Dict[str, Any], image_dir: Optional[str | Path], source: str) -> Optional[Path]:
    """The record's image path, resolved against ``image_dir`` (None for text-only records).

    Raises:
        FileNotFoundError: naming the source, record id and path, if the file does not exist.
    """
    image = record.get("image")
    if not image:
        return None
    path = Path(image_dir) / image if image_dir else Path(image)
    if not path.is_file():
        raise FileNotFoundError(
            f"{source}: record id={record.get('id')!r}: field 'image': file not found: {path}"
        )
    return path


def default_image_dir(source: Any, image_dir: Optional[str | Path]) -> Optional[str | Path]:
    """``image_dir`` if given, else the folder of a data file (None for a ``datasets`` source)."""
    if image_dir is None and isinstance(source, (str, Path)) and Path(str(source)).is_file():
        return Path(str(source)).parent
    return image_dir


def check_image_markers(record: Dict[str, Any], fields: Sequence[str], source: str) -> None:
    """Every present conversation field holds one ``<image>`` marker if the record has an image,
    none if it has not.

    Raises:
        ValueError: naming the source, record id and field.
    """
    expected = 1 if record.get("image") else 0
    for field in fields:
        if record.get(field) is None:
            continue
        found = count_images(record[field])
        if found != expected:
            raise ValueError(
                f"{source}: record id={record['id']!r}: field {field!r} has {found} <image> "
                f"marker(s), but the record has {expected} image(s)"
            )
