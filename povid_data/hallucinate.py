"""Stage 1 of POVID, shared parts: checking a hallucinated rewrite and writing the records.

The backends of recipe ``povid_hallucinate`` (``openai``: an AI model rewrites the answer;
``rules``: offline edits, :mod:`povid_data.hallucinate_rules`; ``world``: the synthetic world's
scene-level injector, :mod:`povid_data.hallucinate_scene`) hand back a :class:`Outcome`.
This module decides whether a rewrite is usable (:func:`check_rewrite`) and turns an outcome
into an output line: the input record unchanged plus ``rejected_conversations`` and
``povid_meta.stage1`` (:func:`preference_record`), or a line of the rejects file
(:func:`reject_record`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from povid_data.records import REJECTED, with_answer

__all__ = [
    "META",
    "STAGE",
    "DEFAULT_REFUSAL_PATTERNS",
    "Usage",
    "Outcome",
    "ValidationRules",
    "clean_rewrite",
    "check_rewrite",
    "preference_record",
    "reject_record",
]

META = "povid_meta"
STAGE = "stage1"

# First-person phrases a model uses when it declines; a hallucinated *description* has no
# reason to contain them, so matching anywhere in the text is safe. Lower-case regexes.
DEFAULT_REFUSAL_PATTERNS: List[str] = [
    r"\bi(?:'m| am) (?:sorry|unable|not able)\b",
    r"\bi (?:can(?:'|no)t|cannot|won't|will not) (?:help|assist|comply|do that|provide|create|fulfil)",
    r"\bas an ai\b",
    r"\bi must (?:decline|refuse)\b",
    r"\bi apologi[sz]e\b",
]


@dataclass
class Usage:
    """Tokens and requests spent (all attempts of a record, or a whole run)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    def add(self, other: "Usage") -> None:
        """Add another tally to this one."""
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.requests += other.requests

    def cost(self, input_per_1m: float, output_per_1m: float) -> float:
        """Estimated cost in the currency of the prices (per million tokens)."""
        return (self.prompt_tokens * input_per_1m + self.completion_tokens * output_per_1m) / 1e6

    def as_dict(self) -> Dict[str, int]:
        """JSON-friendly form."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "requests": self.requests,
        }


@dataclass
class Outcome:
    """What a backend made of one record.

    ``status`` is ``"ok"`` (``text`` is the rewrite), ``"rejected"`` (``reason`` says why; the
    record goes to the rejects file and is not retried by a rerun) or ``"stopped"`` (the run is
    ending, e.g. the request budget is spent; the record stays pending for a rerun).
    """

    status: str
    text: Optional[str] = None
    reason: Optional[str] = None
    detail: str = ""
    attempts: int = 0
    usage: Usage = field(default_factory=Usage)
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationRules:
    """Bounds a rewrite must meet.

    The length must lie in ``[min_length_ratio * n, max_length_ratio * n + length_slack_chars]``
    for an original of ``n`` characters: the slack lets a one-sentence answer gain a
    hallucinated sentence.
    """

    min_length_ratio: float = 0.5
    max_length_ratio: float = 2.0
    length_slack_chars: int = 40
    refusal_patterns: Sequence[str] = tuple(DEFAULT_REFUSAL_PATTERNS)

    def __post_init__(self) -> None:
        self._refusals = [re.compile(p, re.IGNORECASE) for p in self.refusal_patterns]

    def is_refusal(self, text: str) -> bool:
        """Whether ``text`` reads like the model declining the task."""
        # Curly apostrophes are common in model output; the patterns use straight ones.
        plain = text.replace("\u2019", "'")
        return any(p.search(plain) for p in self._refusals)


_WRAPPERS = [('"', '"'), ("\u201c", "\u201d"), ("'", "'"), ("```", "```")]


def clean_rewrite(text: Optional[str]) -> str:
    """The model's text without surrounding whitespace, quotes or a code fence."""
    text = (text or "").strip()
    for left, right in _WRAPPERS:
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            inner = text[len(left) : -len(right)]
            # Only unwrap a single quoted block, not text that merely starts and ends with quotes.
            if left not in inner:
                text = inner.strip()
    return text


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def check_rewrite(original: str, rewrite: Optional[str], rules: ValidationRules) -> Optional[str]:
    """Why ``rewrite`` is not a usable dispreferred answer for ``original``, or None if it is.

    Reasons: ``empty``, ``unchanged`` (same words, ignoring case and spacing), ``refusal``,
    ``too_short``, ``too_long``.
    """
    if rewrite is None or not rewrite.strip():
        return "empty"
    if _normalized(rewrite) == _normalized(original):
        return "unchanged"
    if rules.is_refusal(rewrite) and not rules.is_refusal(original):
        return "refusal"
    n = len(original.strip())
    if len(rewrite.strip()) < rules.min_length_ratio * n:
        return "too_short"
    if len(rewrite.strip()) > rules.max_length_ratio * n + rules.length_slack_chars:
        return "too_long"
    return None


def preference_record(record: Dict[str, Any], rewrite: str, stage_meta: Dict[str, Any]) -> Dict[str, Any]:
    """The input record, its fields unchanged, plus the rejected conversation and our metadata.

    ``rejected_conversations`` is the chosen conversation with its last answer replaced by
    ``rewrite`` (POVID's format); ``povid_meta`` keeps any stages already recorded there.
    """
    out = dict(record)
    out[REJECTED] = with_answer(record, rewrite)
    meta = dict(record.get(META) or {})
    meta[STAGE] = stage_meta
    out[META] = meta
    return out


def reject_record(record: Dict[str, Any], outcome: Outcome, stage_meta: Dict[str, Any]) -> Dict[str, Any]:
    """One line of the rejects file: which record, why, and what the last attempt returned."""
    return {
        "id": record["id"],
        "image": record.get("image"),
        "reason": outcome.reason,
        "detail": outcome.detail,
        "attempts": outcome.attempts,
        **stage_meta,
    }
