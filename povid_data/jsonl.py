"""JSON/JSONL records in and out, with errors that name the file and line, and resumable output.

Every long job of the toolkit (generation, hallucination injection, distortion, evaluation)
appends its results to a JSONL file keyed by record id. A rerun reads that file, skips the ids
already done and drops a last line cut short by a crash, so no finished work is lost or
duplicated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set

__all__ = ["read_records", "require_field", "ResumableJsonlWriter"]


def read_records(path: str | Path) -> List[Dict[str, Any]]:
    """Read a JSON list or a JSONL file of objects.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, or an entry that is not an object (names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        where = [f"{path}: entry {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            where.append(f"{path}:{line_no}")
    for record, location in zip(records, where):
        if not isinstance(record, dict):
            raise ValueError(f"{location}: expected a JSON object, got {type(record).__name__}")
    return records


def require_field(
    record: Dict[str, Any], field: str, source: str, kind: type | tuple = str
) -> Any:
    """``record[field]``, or a ValueError naming the source, the record id and the field."""
    value = record.get(field)
    if value is None or (kind is str and not str(value).strip()):
        rid = record.get("id", "?")
        raise ValueError(f"{source}: record id={rid!r}: field {field!r} is missing or empty")
    if not isinstance(value, kind):
        rid = record.get("id", "?")
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(
            f"{source}: record id={rid!r}: field {field!r} must be {expected}, "
            f"got {type(value).__name__}"
        )
    return value


class ResumableJsonlWriter:
    """Append-only JSONL output keyed by ``key``; knows which keys are already written.

    On open, a last line without its newline (a crash mid-write) is cut off, so the file only
    ever holds complete records. Each :meth:`write` flushes and fsyncs: what it returned from is
    on disk.
    """

    def __init__(self, path: str | Path, key: str = "id") -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: Set[str] = set()
        if self.path.exists():
            self._drop_partial_last_line()
            for line_no, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        self.done.add(str(json.loads(line)[key]))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(
                            f"{self.path}:{line_no}: existing output line has no {key!r}; "
                            f"move the file away to start over"
                        ) from None
        self._file = self.path.open("a", encoding="utf-8")

    def _drop_partial_last_line(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(keep)

    def pending(self, records: Iterable[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        """The records whose key is not written yet."""
        return (r for r in records if str(r[self.key]) not in self.done)

    def write(self, records: Iterable[Dict[str, Any]]) -> None:
        """Append records and make them durable."""
        lines = []
        for record in records:
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            self.done.add(str(record[self.key]))
        if lines:
            self._file.write("".join(lines))
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> "ResumableJsonlWriter":
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        self.close()
