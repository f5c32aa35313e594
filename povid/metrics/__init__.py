"""Hallucination metrics: CHAIR and POPE on COCO-format annotations, and results reports.

- :mod:`povid.metrics.coco`: read and check ``instances_*.json`` / ``captions_*.json``;
- :mod:`povid.metrics.chair`: CHAIR_S, CHAIR_I, recall, length and per-caption details, in
  ``reference`` (the original script's counting, default) or ``corrected`` mode
  (:mod:`povid.metrics.chair_reference` holds the reference counting; ``CHAIR.md`` the differences);
- :mod:`povid.metrics.pope`: POPE questions (random / popular / adversarial), answer parsing,
  accuracy / precision / recall / F1 / yes-ratio;
- :mod:`povid.metrics.report`: ``results.json``, Markdown tables, side-by-side comparison.

Nothing here imports torch: scoring existing outputs and comparing runs is instant.
"""

from povid.metrics.chair import (
    CHAIR_MODES,
    COCO_SYNONYMS,
    DEFAULT_CHAIR_MODE,
    Mention,
    chair_metrics,
    check_chair_mode,
    evaluate_chair,
    find_objects,
    ground_truth_objects,
    read_captions,
    score_caption,
    singularize,
    tokenize,
)
from povid.metrics.coco import AnnotationError, CocoAnnotations, load_coco
from povid.metrics.pope import (
    POPE_SPLITS,
    PopeQuestion,
    build_pope_questions,
    evaluate_pope,
    format_pope_prompt,
    match_answers,
    parse_yes_no,
    pope_metrics,
    read_pope_answers,
    read_pope_questions,
)
from povid.metrics.report import (
    compare_files,
    compare_markdown,
    make_result,
    read_results,
    results_markdown,
    write_results,
)

__all__ = [
    "AnnotationError",
    "CHAIR_MODES",
    "COCO_SYNONYMS",
    "DEFAULT_CHAIR_MODE",
    "CocoAnnotations",
    "Mention",
    "POPE_SPLITS",
    "PopeQuestion",
    "build_pope_questions",
    "chair_metrics",
    "check_chair_mode",
    "compare_files",
    "compare_markdown",
    "evaluate_chair",
    "evaluate_pope",
    "find_objects",
    "format_pope_prompt",
    "ground_truth_objects",
    "load_coco",
    "make_result",
    "match_answers",
    "parse_yes_no",
    "pope_metrics",
    "read_captions",
    "read_pope_answers",
    "read_pope_questions",
    "read_results",
    "results_markdown",
    "score_caption",
    "singularize",
    "tokenize",
    "write_results",
]
