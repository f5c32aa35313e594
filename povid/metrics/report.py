"""Results files of ``povid_eval``: ``results.json``, its Markdown table, and side-by-side
comparison of several runs (``povid compare base/results.json povid/results.json``).

A results file is one JSON object::

    {"format": "povid-eval/1", "benchmark": "chair" | "pope", "name": "...",
     "protocol": {...how the outputs were made and scored...},
     "metrics": {...},            # CHAIR: flat; POPE: one dict per split
     "details": [...]}            # CHAIR: per caption (optional)

Rates are stored as fractions and shown as percentages; differences are percentage points.
This module imports neither torch nor torchtune, so ``povid compare`` answers instantly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "RESULTS_FORMAT",
    "make_result",
    "write_results",
    "read_results",
    "metric_rows",
    "results_markdown",
    "compare_markdown",
    "compare_files",
]

RESULTS_FORMAT = "povid-eval/1"

# (metric key, label, kind); kind "rate" is shown x100, "number" with 2 decimals, "count" as int.
_CHAIR_ROWS: Tuple[Tuple[str, str, str], ...] = (
    ("chair_s", "CHAIR_S (%)", "rate"),
    ("chair_i", "CHAIR_I (%)", "rate"),
    ("recall", "Recall (%)", "rate"),
    ("mean_length", "Mean length (words)", "number"),
    ("num_captions", "Captions", "count"),
)
_POPE_ROWS: Tuple[Tuple[str, str, str], ...] = (
    ("accuracy", "accuracy (%)", "rate"),
    ("precision", "precision (%)", "rate"),
    ("recall", "recall (%)", "rate"),
    ("f1", "F1 (%)", "rate"),
    ("yes_ratio", "yes ratio (%)", "rate"),
    ("num_unclear", "unclear answers", "count"),
    ("num_questions", "questions", "count"),
)
# Protocol entries that name this run's files: expected to differ between compared runs.
# ("generated" is false for scored-only runs, whose generation settings show as null anyway.)
_RUN_SPECIFIC = {"checkpoint_dir", "clip_dir", "captions_file", "answers_file", "output_dir",
                 "annotations_dir", "image_dir", "questions_file", "device", "batch_size",
                 "generated"}  # fmt: skip


def make_result(
    benchmark: str,
    name: str,
    protocol: Mapping[str, Any],
    metrics: Mapping[str, Any],
    details: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
    """Assemble a results object (see the module docstring)."""
    if benchmark not in ("chair", "pope"):
        raise ValueError(f"benchmark must be 'chair' or 'pope', got {benchmark!r}")
    result: Dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "benchmark": benchmark,
        "name": name,
        "protocol": dict(protocol),
        "metrics": dict(metrics),
    }
    if details is not None:
        result["details"] = list(details)
    return result


def write_results(result: Mapping[str, Any], output_dir: str | Path) -> Tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``output_dir``; returns both paths.

    The JSON goes through a temporary file and a rename, so a crash never leaves half a file.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "results.json", output_dir / "results.md"
    for path, text in ((json_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n"),
                       (md_path, results_markdown(result))):  # fmt: skip
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return json_path, md_path


def read_results(path: str | Path) -> Dict[str, Any]:
    """Read a results file written by ``povid_eval``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not a ``povid-eval`` results object (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results file not found")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(result, dict) or result.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path}: not a povid_eval results file (expected \"format\": \"{RESULTS_FORMAT}\")")
    if result.get("benchmark") not in ("chair", "pope") or not isinstance(result.get("metrics"), dict):
        raise ValueError(f"{path}: results file without a known 'benchmark' and a 'metrics' object")
    return result


def metric_rows(result: Mapping[str, Any]) -> List[Tuple[str, float, str]]:
    """The headline metrics of a result as ``(label, value, kind)`` rows, in table order.

    POPE labels are prefixed with the split (``"adversarial F1 (%)"``).
    """
    metrics = result["metrics"]
    if result["benchmark"] == "chair":
        return [(label, metrics[key], kind) for key, label, kind in _CHAIR_ROWS if key in metrics]
    rows = []
    for split, split_metrics in metrics.items():
        rows += [(f"{split} {label}", split_metrics[key], kind)
                 for key, label, kind in _POPE_ROWS if key in split_metrics]  # fmt: skip
    return rows


def _format(value: Optional[float], kind: str) -> str:
    if value is None:
        return "-"
    if kind == "rate":
        return f"{100 * value:.1f}"
    if kind == "count":
        return str(int(value))
    return f"{value:.2f}"


def _format_delta(delta: float, kind: str) -> str:
    if kind == "rate":
        return f"{100 * delta:+.1f}"
    if kind == "count":
        return f"{int(delta):+d}"
    return f"{delta:+.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _protocol_lines(protocol: Mapping[str, Any]) -> List[str]:
    return [f"- `{key}`: {json.dumps(value, ensure_ascii=False)}" for key, value in protocol.items()]


def results_markdown(result: Mapping[str, Any]) -> str:
    """A Markdown report of one result: metric table, notable details, protocol."""
    title = {"chair": "CHAIR", "pope": "POPE"}[result["benchmark"]]
    out = [f"# {title}: {result.get('name', '')}\n"]
    metrics = result["metrics"]
    if result["benchmark"] == "chair":
        out.append(_table(["metric", "value"], [[label, _format(v, kind)] for label, v, kind in metric_rows(result)]))
        counts: Dict[str, int] = {}
        for caption in result.get("details", []):
            for _, obj in caption["hallucinated"]:
                counts[obj] = counts.get(obj, 0) + 1
        if counts:
            top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
            out.append("Most hallucinated objects: " + ", ".join(f"{o} ({n})" for o, n in top) + "\n")
    else:
        header = ["split"] + [label for _, label, _ in _POPE_ROWS]
        rows = [[split] + [_format(m.get(key), kind) for key, _, kind in _POPE_ROWS]
                for split, m in metrics.items()]  # fmt: skip
        out.append(_table(header, rows))
    out.append("## Protocol\n\n" + "\n".join(_protocol_lines(result.get("protocol", {}))) + "\n")
    return "\n".join(out)


def _column_names(results: Sequence[Mapping[str, Any]], sources: Sequence[str]) -> List[str]:
    """Run names for the columns; a name used twice gets its file to tell them apart."""
    names = [str(r.get("name") or Path(s).parent.name or s) for r, s in zip(results, sources)]
    return [f"{n} ({s})" if names.count(n) > 1 else n for n, s in zip(names, sources)]


def compare_markdown(
    results: Sequence[Mapping[str, Any]], sources: Optional[Sequence[str]] = None
) -> str:
    """Several results side by side, each with its difference from the first.

    Args:
        results: result objects (:func:`read_results`); two or more.
        sources: where each came from (used to tell equal names apart).

    Returns:
        Markdown: one table (metric, first run, then each other run and its difference), and a
        list of protocol settings that differ between the runs, since those make numbers
        incomparable (prompt, token limit, image subset, ...).
    """
    if len(results) < 2:
        raise ValueError("compare needs at least two results")
    sources = list(sources or [f"#{i + 1}" for i in range(len(results))])
    names = _column_names(results, sources)
    rows_per_result = [{label: (value, kind) for label, value, kind in metric_rows(r)} for r in results]
    labels: List[str] = []
    for rows in rows_per_result:
        labels += [label for label in rows if label not in labels]

    header = ["metric", names[0]]
    for name in names[1:]:
        header += [name, f"Δ {name}"]
    table_rows = []
    for label in labels:
        base = rows_per_result[0].get(label)
        kind = next(rows[label][1] for rows in rows_per_result if label in rows)
        row = [label, _format(base[0] if base else None, kind)]
        for rows in rows_per_result[1:]:
            value = rows.get(label)
            row.append(_format(value[0] if value else None, kind))
            row.append(_format_delta(value[0] - base[0], kind) if value and base else "-")
        table_rows.append(row)

    out = [_table(header, table_rows)]
    benchmarks = {r["benchmark"] for r in results}
    if len(benchmarks) > 1:
        # Protocols of different benchmarks differ by construction: listing them is noise.
        out.append(f"\nNote: the files hold different benchmarks ({', '.join(sorted(benchmarks))}).\n")
        return "".join(out)
    differing = []
    keys: List[str] = []
    for r in results:
        keys += [k for k in r.get("protocol", {}) if k not in keys and k not in _RUN_SPECIFIC]
    for key in keys:
        values = [r.get("protocol", {}).get(key) for r in results]
        if any(v != values[0] for v in values[1:]):
            shown = ", ".join(f"{n}: {json.dumps(v, ensure_ascii=False)}" for n, v in zip(names, values))
            differing.append(f"- `{key}`: {shown}")
    if differing:
        out.append(
            "\nProtocol settings differ (null: not recorded, the outputs were scored from a file), "
            "so the numbers may not be comparable:\n\n" + "\n".join(differing) + "\n"
        )
    if any(line.startswith("- `chair_mode`") for line in differing):
        out.append(_CHAIR_MODE_NOTE)
    return "".join(out)


# Shown when compared CHAIR runs counted mentions differently: the same captions score
# differently under the two modes, so the difference is a protocol difference, not a model one.
_CHAIR_MODE_NOTE = (
    "\nThe runs count CHAIR mentions differently (`chair_mode`): reference is the original "
    "script's counting (comparable to published numbers), corrected fixes its quirks (see "
    "povid/metrics/CHAIR.md). null: scored before modes existed, i.e. with corrected counting. "
    "Rescore with one mode (`captions_file=... chair.mode=...`) to compare models.\n"
)


def compare_files(paths: Sequence[str | Path]) -> str:
    """:func:`compare_markdown` of results files (errors name the bad file)."""
    results = [read_results(p) for p in paths]
    return compare_markdown(results, [str(p) for p in paths])
