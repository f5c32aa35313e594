"""``summary.png`` of ``povid demo``, drawn with matplotlib: training curves, the headline
numbers, and test images with the base and the POVID description (hallucinated words in red)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

__all__ = ["draw_summary", "caption_words"]

_BLUE, _RED, _GREEN, _GREY = "#1f5adc", "#d62728", "#2ca02c", "#5a5a5a"
_LINE_CHARS = 150  # wrap captions at about this many characters


def _read_metrics(path: Path) -> List[Dict[str, float]]:
    """The rows of a recipe's ``metrics.jsonl`` (none if absent; a torn last line is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _moving_average(values: Sequence[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _curves(ax, title: str, rows: Sequence[Mapping[str, float]], series: Sequence[Tuple[str, str, str]]) -> None:
    """``series``: ``(label, metric key, colour)``, smoothed over 20 steps."""
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    if not rows:
        ax.text(0.5, 0.5, "(no data)", ha="center", va="center", transform=ax.transAxes)
        return
    for label, key, colour in series:
        ys = _moving_average([float(r.get(key, 0.0)) for r in rows], 20)
        ax.plot(range(1, len(ys) + 1), ys, color=colour, linewidth=1.5, label=f"{label}: {ys[-1]:.3g}")
    ax.legend(fontsize=8, frameon=False)


def caption_words(text: str, hallucinated: set) -> List[Tuple[str, str]]:
    """Words of a caption with a colour each: red when the word names a hallucinated object."""
    from povid.metrics.chair import singularize, tokenize

    return [
        (word, _RED if any(singularize(t) in hallucinated for t in tokenize(word)) else "black")
        for word in text.split()
    ]


def _wrap(words: Sequence[Tuple[str, str]], width: int = _LINE_CHARS) -> List[List[Tuple[str, str]]]:
    lines, line, used = [], [], 0
    for word, colour in words:
        if line and used + len(word) > width:
            lines.append(line)
            line, used = [], 0
        line.append((word, colour))
        used += len(word) + 1
    return lines + [line] if line else lines


def _coloured_lines(ax, labelled: Sequence[Tuple[str, Sequence[Tuple[str, str]]]]) -> None:
    """Write ``(label, words)`` blocks top-left in ``ax``, each word in its own colour."""
    from matplotlib.offsetbox import AnchoredOffsetbox, HPacker, TextArea, VPacker

    blocks = []
    for label, words in labelled:
        for k, line in enumerate(_wrap(words) or [[]]):
            parts = [TextArea(f"{label + ':' if k == 0 else '':<7}", textprops=dict(fontsize=8, weight="bold", family="monospace"))]
            parts += [TextArea(word, textprops=dict(fontsize=8, color=colour)) for word, colour in line]
            blocks.append(HPacker(children=parts, pad=0, sep=3))
    box = AnchoredOffsetbox(loc="upper left", child=VPacker(children=blocks, pad=0, sep=2), frameon=False, pad=0.2)
    ax.add_artist(box)
    ax.axis("off")


def draw_summary(
    out_file: Path,
    *,
    sft_metrics: Path,
    dpo_metrics: Path,
    base_chair: Path,
    povid_chair: Path,
    image_dir: Path,
    annotations_file: Path,
    rows: Sequence[Mapping[str, Any]],
    n_examples: int = 6,
) -> Path:
    """Draw ``out_file`` (PNG): SFT and DPO training curves, the table's headline numbers, and
    test images where the base and POVID captions differ (hallucinated words red)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe when a user's backend is interactive
    import matplotlib.pyplot as plt
    from PIL import Image

    from povid.metrics.report import read_results

    base = {c["image_id"]: c for c in read_results(base_chair).get("details", [])}
    tuned = {c["image_id"]: c for c in read_results(povid_chair).get("details", [])}
    files = {i["id"]: i["file_name"] for i in json.loads(annotations_file.read_text())["images"]}
    differ = [i for i in sorted(base) if i in tuned and base[i]["caption"] != tuned[i]["caption"]]
    # Images where the base hallucinated first, then the others; in id order within each group.
    shown = ([i for i in differ if base[i]["hallucinated"]] + [i for i in differ if not base[i]["hallucinated"]])[:n_examples]

    height = 4.2 + 1.45 * len(shown)  # inches
    fig = plt.figure(figsize=(14, height), dpi=100)
    grid = fig.add_gridspec(
        2 + len(shown), 4, height_ratios=[2.4, 1.0] + [1.3] * len(shown), width_ratios=[1, 2.6, 2.6, 2.6]
    )
    fig.subplots_adjust(left=0.04, right=0.99, top=1 - 0.8 / height, bottom=0.02, hspace=0.4, wspace=0.18)
    fig.suptitle("POVID on the synthetic world: base (SFT) vs POVID", x=0.01, ha="left", fontsize=13)
    sft, dpo = _read_metrics(sft_metrics), _read_metrics(dpo_metrics)
    _curves(fig.add_subplot(grid[0, :2]), "llava_sft: loss per step", sft, [("loss", "loss", _BLUE)])
    _curves(fig.add_subplot(grid[0, 2]), "povid_dpo: loss and reward accuracy", dpo,
            [("loss", "loss", _RED), ("accuracy", "rewards/accuracy", _GREEN)])  # fmt: skip
    _curves(fig.add_subplot(grid[0, 3]), "povid_dpo: log-prob of chosen / rejected", dpo,
            [("chosen", "logps/chosen", _BLUE), ("rejected", "logps/rejected", _RED)])  # fmt: skip

    numbers = fig.add_subplot(grid[1, :])
    numbers.axis("off")
    lines = [
        f"{row['name']:<8} CHAIR_S {row['chair_s']:5.1f}   CHAIR_I {row['chair_i']:5.1f}   recall {row['recall']:5.1f}"
        f"   companion {row['companion']:5.1f}   POPE F1 {row['pope_f1']:5.1f}"
        for row in rows
    ]
    lines.append(f"Test images whose captions differ: {len(differ)} of {len(base)}; first {len(shown)} below, "
                 "base hallucinating first. Red: an object not in the image.")  # fmt: skip
    numbers.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=9, transform=numbers.transAxes)

    for k, image_id in enumerate(shown):
        picture = fig.add_subplot(grid[2 + k, 0])
        picture.imshow(Image.open(image_dir / files[image_id]).convert("RGB"), interpolation="nearest")
        picture.axis("off")
        truth = [(w, _GREY) for w in ", ".join(base[image_id]["ground_truth"]).split()]
        captions = [
            (label, caption_words(c["caption"], {w for w, _ in c["hallucinated"]}))
            for label, c in (("base", base[image_id]), ("POVID", tuned[image_id]))
        ]
        _coloured_lines(fig.add_subplot(grid[2 + k, 1:]), [("truth", truth), *captions])

    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file)
    plt.close(fig)
    return out_file
