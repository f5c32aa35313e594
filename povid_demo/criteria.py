"""The criteria a synthetic world's base model must meet before POVID is measured on it.

POVID targets a model that *knows* what is in the image (LLaVA-1.5-7B: POPE ~86 %) and still
*adds* co-occurring objects when it writes a long description (CHAIR_I 12.7). A world whose base
misnames what it sees (a perception failure) or answers yes/no at chance measures something
else, so the demo checks its base against these, fixed before any preference run:

- it knows what is there: POPE accuracy at least 85 % on each of the random, popular and
  adversarial splits;
- it still hallucinates in long descriptions: CHAIR_I at least 5 %, object recall at least 90 %;
- its errors are additions: at least 70 % of the hallucinated object mentions are in captions
  that also name every object that is there (an absent object added, not a present one
  misnamed).

All of it is read from ``povid_eval``'s results (CHAIR's per-caption ``details``, POPE's
per-split metrics); :func:`criteria_table` prints it with PASS / NOT MET per line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = [
    "Criterion",
    "POPE_ACCURACY_MIN",
    "CHAIR_I_MIN",
    "RECALL_MIN",
    "ADDITION_SHARE_MIN",
    "addition_counts",
    "base_criteria",
    "criteria_met",
    "criteria_as_dict",
    "criteria_table",
]

POPE_ACCURACY_MIN = 0.85
CHAIR_I_MIN = 0.05
RECALL_MIN = 0.90
ADDITION_SHARE_MIN = 0.70
_POPE_SPLITS = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class Criterion:
    """One line of the criteria: ``value >= threshold`` (fractions); ``value`` is None when the
    results cannot give it (a POPE split not run, no hallucinated mention to classify)."""

    key: str
    label: str
    value: Optional[float]
    threshold: float

    @property
    def passed(self) -> bool:
        """Whether the value is known and reaches the threshold."""
        return self.value is not None and self.value >= self.threshold


def _is_addition(caption: Mapping[str, Any]) -> bool:
    """A hallucinating caption that still names every object that is there."""
    named = {obj for _, obj in caption["correct"]}
    return bool(caption["hallucinated"]) and set(caption["ground_truth"]) <= named


def addition_counts(chair_details: Sequence[Mapping[str, Any]]) -> Dict[str, int]:
    """Hallucinated mentions and captions, and how many of them are additions.

    Args:
        chair_details: CHAIR's per-caption scores (``povid_eval``'s ``details``: each with
            ``hallucinated`` and ``correct`` ``[word, object]`` mentions and ``ground_truth``).

    Returns:
        ``hallucinated_mentions``, ``addition_mentions`` (mentions in addition captions, repeats
        kept as CHAIR_I keeps them), ``hallucinating_captions``, ``addition_captions``.
    """
    hallucinating = [c for c in chair_details if c["hallucinated"]]
    additions = [c for c in hallucinating if _is_addition(c)]
    return {
        "hallucinated_mentions": sum(len(c["hallucinated"]) for c in hallucinating),
        "addition_mentions": sum(len(c["hallucinated"]) for c in additions),
        "hallucinating_captions": len(hallucinating),
        "addition_captions": len(additions),
    }


def base_criteria(chair_result: Mapping[str, Any], pope_result: Mapping[str, Any]) -> List[Criterion]:
    """The six criteria of a base model from its ``povid_eval`` results (CHAIR with per-caption
    details, POPE with the three splits), in the order :func:`criteria_table` prints them."""
    pope = pope_result["metrics"]
    criteria = [
        Criterion(f"pope_{split}_accuracy", f"POPE accuracy, {split}",
                  pope[split]["accuracy"] if split in pope else None, POPE_ACCURACY_MIN)  # fmt: skip
        for split in _POPE_SPLITS
    ]
    chair = chair_result["metrics"]
    counts = addition_counts(chair_result.get("details", []))
    mentions = counts["hallucinated_mentions"]
    criteria += [
        Criterion("chair_i", "CHAIR_I (long descriptions)", chair["chair_i"], CHAIR_I_MIN),
        Criterion("recall", "object recall (long descriptions)", chair["recall"], RECALL_MIN),
        Criterion("addition_share", "hallucinated mentions that are additions",
                  counts["addition_mentions"] / mentions if mentions else None, ADDITION_SHARE_MIN),  # fmt: skip
    ]
    return criteria


def criteria_met(criteria: Sequence[Criterion]) -> bool:
    """All criteria pass."""
    return all(c.passed for c in criteria)


def criteria_as_dict(criteria: Sequence[Criterion]) -> Dict[str, Dict[str, Any]]:
    """``{key: {"label", "value", "threshold", "passed"}}`` for JSON files."""
    return {c.key: {**{k: v for k, v in asdict(c).items() if k != "key"}, "passed": c.passed} for c in criteria}


def criteria_table(criteria: Sequence[Criterion]) -> str:
    """Markdown table, one criterion a row with value, threshold and PASS / NOT MET, then a
    line that says whether the base has the failure POVID targets."""
    lines = ["| base criterion | value | needs | result |", "|---|---|---|---|"]
    for c in criteria:
        value = "n/a" if c.value is None else f"{100 * c.value:.1f} %"
        lines.append(f"| {c.label} | {value} | >= {100 * c.threshold:.0f} % | {'PASS' if c.passed else 'NOT MET'} |")
    missed = [c.label for c in criteria if not c.passed]
    verdict = (
        "all base criteria met: the base knows what is there and still adds objects in long descriptions"
        if not missed
        else f"base criteria NOT MET ({len(missed)} of {len(criteria)}): " + "; ".join(missed)
    )
    return "\n".join(lines) + "\n\n" + verdict + "\n"
