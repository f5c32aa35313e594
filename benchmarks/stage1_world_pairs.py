"""How a stage-1 preference file on the synthetic world reads without the image.

A model can only tell a pair apart without its image when the rejected text gives itself away.
On the world that is measurable with no model at all, because the ground truth's grammar is
exact: a rejected caption the world's grammar cannot produce (it does not parse), that describes
a scene the world never draws (two objects in a quadrant, objects out of caption order), or
whose count sentence does not match the objects it names, is told apart by its form. For each
``preferences.jsonl`` (``povid_hallucinate`` output on ``pref.json``) this prints:

- pairs, and edits (changes) per pair;
- the share of pairs containing each edit kind, and where additions came from;
- *parses*: rejected answers that are grammatical world captions (:func:`parse_caption`);
- *valid scene*: of those, scenes the world could draw (:func:`scene_problems` empty);
- *count agrees*: rejected answers whose stated total equals the number of world kinds named.

    python benchmarks/stage1_world_pairs.py out/stage1_world/preferences.jsonl out/stage1_rules/preferences.jsonl

``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Sequence

from povid_data.synthetic_world import KINDS, CaptionParseError, parse_caption, scene_problems

_STATED = re.compile(r"There (?:is|are) (\w+) objects? in total\.\s*$")
_NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _stated_count(text: str) -> int:
    """The total the closing sentence states (-1: none, or not a number word)."""
    match = _STATED.search(text)
    word = match.group(1).lower() if match else ""
    return _NUMBER_WORDS.index(word) + 1 if word in _NUMBER_WORDS else -1


def _kinds_named(text: str) -> int:
    return sum(bool(re.search(rf"\b{kind}s?\b", text, re.IGNORECASE)) for kind in KINDS)


def pair_report(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The blind-separability proxies of one preference file's rows (see the module docstring)."""
    kinds, sources, edits_per_pair = Counter(), Counter(), Counter()
    parses = valid = count_agrees = 0
    for row in rows:
        rejected = row["rejected_conversations"][-1]["value"]
        stage1 = row.get("povid_meta", {}).get("stage1", {})
        edits = [e for e in stage1.get("edits", []) if e.get("role") != "total_count"]
        # A rules swap edits every mention of a noun: one change; count changes by kind.
        edits_per_pair[len(stage1.get("kinds") or [])] += 1
        kinds.update(stage1.get("kinds") or [])
        sources.update(e.get("source", "?") for e in edits if e["kind"] == "object_addition")
        try:
            scene = parse_caption(rejected)
        except CaptionParseError:
            scene = None
        parses += scene is not None
        valid += scene is not None and not scene_problems(scene)
        count_agrees += _stated_count(rejected) == _kinds_named(rejected)
    n = len(rows)
    share = lambda k: round(k / n, 4) if n else 0.0  # noqa: E731
    return {
        "pairs": n,
        "changes_per_pair": {str(k): share(v) for k, v in sorted(edits_per_pair.items())},
        "pairs_with_kind": {k: share(v) for k, v in kinds.most_common()},
        "addition_sources": dict(sources.most_common()),
        "parses": share(parses),
        "valid_scene": share(valid),
        "count_agrees": share(count_agrees),
    }


def markdown(reports: Dict[str, Dict[str, Any]]) -> str:
    """One row per file."""
    lines = ["| file | pairs | 1 / 2 / 3 changes | pairs with: addition / swap / attribute / relation / count | "
             "parses | valid scene | count agrees |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in reports.items():
        c, k = r["changes_per_pair"], r["pairs_with_kind"]
        changes = " / ".join(f"{c.get(str(i), 0):.0%}" for i in (1, 2, 3))
        mix = " / ".join(f"{k.get(kind, 0):.0%}" for kind in ("object_addition", "object_swap", "attribute", "relation", "count"))
        lines.append(f"| {name} | {r['pairs']} | {changes} | {mix} | {r['parses']:.1%} | {r['valid_scene']:.1%} | {r['count_agrees']:.1%} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/stage1_world_pairs.py FILE [FILE ...] [--json OUT]``"""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    reports: Dict[str, Dict[str, Any]] = {}
    for path in args.files:
        rows: List[Dict[str, Any]] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        reports[str(path)] = pair_report(rows)
    print(markdown(reports))
    for name, r in reports.items():
        print(f"{name}: addition sources {r['addition_sources']}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
