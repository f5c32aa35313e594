"""The pair audit: does a preference file teach grounding at all?

mDPO (Wang et al., 2024) showed that multimodal DPO can learn to prefer the chosen answer without
looking at the image: if a pair can be told apart from its text alone, DPO learns the text's form.
The audit scores every pair with the true image and with a null image (a blank one in the CLIP
mean colour, or another record's image) and asks how much of the model's preference survives
without the image. The recipe ``povid_audit`` computes the per-pair rows; this module holds what
the recipe, the demo and users share: the null images and the summary.

A row (one line of ``audit.jsonl``) holds, for each answer ``a`` of the pair (``chosen``,
``rejected``, and ``noise`` when the pair has a noise answer), the summed log-probability of the
answer tokens and ``</s>`` (as ``povid_dpo`` scores them) with the true image, ``{a}_image``, and
with the null image, ``{a}_null``; ``tokens`` (answer tokens scored per answer) and ``kinds`` (the
stage-1 edit kinds from ``povid_meta.stage1.kinds``, empty when unknown).

Per dispreferred answer ``d`` (``rejected``, ``noise``) the margin of a pair is
``chosen - d``; :func:`summarize` reports, per group of pairs (all pairs, and the pairs of each
stage-1 edit kind), how often the margin is positive with the image and with the null image, the
mean margins, the mean log-probs, and the share of the margin that needs the image
(:func:`image_share`).
"""

from __future__ import annotations

import math
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import PIL.Image

from povid_data.transforms import OPENAI_CLIP_MEAN

__all__ = [
    "NULL_IMAGES",
    "ANSWERS",
    "DISPREFERRED",
    "ALL",
    "CLIP_MEAN_RGB",
    "blank_image",
    "image_derangement",
    "edit_kinds",
    "image_share",
    "group_stats",
    "summarize",
    "markdown",
    "headline",
]

NULL_IMAGES = ("blank", "other")
ANSWERS = ("chosen", "rejected", "noise")
DISPREFERRED = ("rejected", "noise")
ALL = "all"  # the group of every pair

# LLaVA's padding colour: tuple(int(m * 255) for m in the CLIP mean) = (122, 116, 104). After
# CLIP normalisation it is (almost) all zeros: the image carrying the least information.
CLIP_MEAN_RGB: Tuple[int, int, int] = tuple(int(m * 255) for m in OPENAI_CLIP_MEAN)  # type: ignore[assignment]


def blank_image(size: Tuple[int, int]) -> PIL.Image.Image:
    """An RGB image of ``size`` (width, height) filled with :data:`CLIP_MEAN_RGB`.

    Same size as the record's image, so the same padding, resizing and cropping run on it.
    """
    return PIL.Image.new("RGB", tuple(size), CLIP_MEAN_RGB)


def image_derangement(images: Sequence[str], seed: int) -> Dict[str, str]:
    """Map every distinct image to another one: a random cyclic permutation (Sattolo's
    algorithm, ``random.Random(seed)``) of the distinct images in first-seen order.

    A cycle has no fixed point, so no record gets its own image back, and records that share an
    image share its partner. It depends only on the list and the seed: the same in every run and
    resume, whatever ``max_records`` selects.

    Raises:
        ValueError: fewer than two distinct images.
    """
    distinct = list(dict.fromkeys(images))
    if len(distinct) < 2:
        raise ValueError(
            f"null_image=other needs at least two distinct images; the data has {len(distinct)}"
        )
    order = list(range(len(distinct)))
    rng = random.Random(seed)
    for i in range(len(order) - 1, 0, -1):  # Sattolo: j < i, so the result is one cycle
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    return {distinct[i]: distinct[order[i]] for i in range(len(distinct))}


def edit_kinds(record: Mapping[str, Any]) -> List[str]:
    """The stage-1 edit kinds of a record (``povid_meta.stage1.kinds``, as ``povid_hallucinate``
    writes them); ``[]`` when the record has none (another source, or an OpenAI rewrite)."""
    stage1 = (record.get("povid_meta") or {}).get("stage1") or {}
    kinds = stage1.get("kinds")
    if not isinstance(kinds, list):
        return []
    return [str(kind) for kind in dict.fromkeys(kinds)]


def image_share(margin_image: float, margin_null: float) -> Tuple[Optional[float], str]:
    """The share of the mean margin that needs the image, ``1 - margin_null / margin_image``.

    Defined only where the model prefers the chosen answer on average with the image
    (``margin_image > 0``). Then 1 means no preference is left without the image, 0 that the
    image adds nothing (the text alone gives the whole margin), above 1 that without the image
    the model prefers the dispreferred answer, below 0 that the margin is larger without it.

    Returns:
        ``(share, note)``: ``share`` is None where undefined, and ``note`` says why.
    """
    if not (math.isfinite(margin_image) and math.isfinite(margin_null)):
        return None, "undefined: a margin is not finite"
    if margin_image <= 0:
        return None, "undefined: with the image the chosen answer is not preferred on average (margin <= 0)"
    share = 1.0 - margin_null / margin_image
    if share > 1:
        return share, "above 1: without the image the dispreferred answer is preferred on average"
    if share < 0:
        return share, "below 0: the margin is larger without the image"
    return share, ""


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def group_stats(rows: Sequence[Mapping[str, Any]], dispreferred: str) -> Dict[str, Any]:
    """The audit of ``rows`` against one dispreferred answer (``rejected`` or ``noise``).

    Every row must hold ``chosen_image``, ``chosen_null``, ``{dispreferred}_image`` and
    ``{dispreferred}_null``. Accuracy counts a pair as preferred when chosen is strictly above the
    dispreferred answer.
    """
    if not rows:
        raise ValueError("group_stats needs at least one row")
    d = dispreferred
    margin_image = [r["chosen_image"] - r[f"{d}_image"] for r in rows]
    margin_null = [r["chosen_null"] - r[f"{d}_null"] for r in rows]
    mean_image, mean_null = _mean(margin_image), _mean(margin_null)
    share, note = image_share(mean_image, mean_null)
    return {
        "pairs": len(rows),
        "accuracy_image": _mean([float(m > 0) for m in margin_image]),
        "accuracy_null": _mean([float(m > 0) for m in margin_null]),
        "margin_image": mean_image,
        "margin_null": mean_null,
        "margin_from_image": mean_image - mean_null,
        "image_share": share,
        "image_share_note": note,
        "logp": {
            answer: {condition: _mean([r[f"{answer}_{condition}"] for r in rows]) for condition in ("image", "null")}
            for answer in ("chosen", d)
        },
    }


def summarize(rows: Sequence[Mapping[str, Any]], **settings: Any) -> Dict[str, Any]:
    """The audit summary of per-pair rows (see the module docstring for the row fields).

    For each dispreferred answer present in the rows (``rejected``; ``noise`` for the rows that
    have one) it gives :func:`group_stats` for all those pairs (group ``"all"``) and for the pairs
    of each stage-1 edit kind (a pair with several kinds counts in each of them). ``settings``
    (null image, noise source, checkpoint, ...) are copied into the summary as they are.

    Returns:
        ``{"pairs", **settings, "answers": {d: {group: stats}}}``.
    """
    summary: Dict[str, Any] = {"pairs": len(rows), **settings, "answers": {}}
    for d in DISPREFERRED:
        with_d = [r for r in rows if f"{d}_image" in r]
        if not with_d:
            continue
        groups = {ALL: group_stats(with_d, d)}
        kinds = sorted({k for r in with_d for k in r.get("kinds") or []})
        for kind in kinds:
            groups[kind] = group_stats([r for r in with_d if kind in (r.get("kinds") or [])], d)
        summary["answers"][d] = groups
    return summary


def _pct(value: Optional[float]) -> str:
    # round() then + 0.0: a tiny negative share prints as 0.0 %, not -0.0 %
    return "n/a" if value is None else f"{round(100 * value, 1) + 0.0:.1f} %"


def markdown(summary: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`summarize`'s output, one line per (dispreferred answer, group).

    Margins and log-probs are in nats, summed over the answer tokens and ``</s>``.
    """
    null = summary.get("null_image", "null")
    lines = [
        f"Pair audit: {summary['pairs']} pairs; null image: {null}",
        "",
        "| vs | group | pairs | chosen preferred (image) | chosen preferred (null) | margin (image) "
        "| margin (null) | share of the margin that needs the image | log p chosen (image / null) "
        "| log p dispreferred (image / null) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for d, groups in summary["answers"].items():
        for group, s in groups.items():
            chosen, other = s["logp"]["chosen"], s["logp"][d]
            lines.append(
                f"| {d} | {group} | {s['pairs']} | {_pct(s['accuracy_image'])} | {_pct(s['accuracy_null'])} "
                f"| {s['margin_image']:.2f} | {s['margin_null']:.2f} | {_pct(s['image_share'])} "
                f"| {chosen['image']:.2f} / {chosen['null']:.2f} | {other['image']:.2f} / {other['null']:.2f} |"
            )
            if s["image_share_note"]:
                notes.append(f"- {d}, {group}: share {s['image_share_note']}")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def headline(summary: Mapping[str, Any]) -> str:
    """One line per dispreferred answer (group ``all``): accuracy with and without the image and
    the share of the margin that needs it. What the demo prints."""
    null = summary.get("null_image", "null")
    parts = []
    for d, groups in summary["answers"].items():
        s = groups[ALL]
        parts.append(
            f"chosen > {d} in {_pct(s['accuracy_image'])} of {s['pairs']} pairs with the image, "
            f"{_pct(s['accuracy_null'])} with the {null} image; margin {s['margin_image']:.2f} -> "
            f"{s['margin_null']:.2f} nats, share that needs the image {_pct(s['image_share'])}"
        )
    return "\n".join(parts)
