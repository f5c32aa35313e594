"""Scene-level hallucination injection for the synthetic world (backend ``world`` of
``povid_hallucinate``).

What a capable stage-1 model (GPT-4V in the paper) writes when asked to hallucinate into a
description is a fluent, self-consistent description of a *slightly different scene*. In the
synthetic world that can be done exactly: the ground-truth caption is read back into its scene
(:func:`~povid_data.synthetic_world.parse_caption`), the scene is changed by one edit (sometimes
two) of the kinds the paper names, and the changed scene is captioned again with the world's own
:func:`~povid_data.synthetic_world.caption`, so the rewrite has the ground truth's grammar, its
object order and a count sentence that agrees with it. Only the image tells the two apart.

Edit kinds (names shared with the ``rules`` backend):

- ``object_addition``: object co-occurrence, the failure POVID targets. The companion of a kind
  in the scene (pizza -> donut) is added in a free quadrant with a colour and size drawn as the
  world draws them. Where every companion is already there, another absent kind may be added
  (``addition_fallback``; the edit says ``source: "other_kind"``). Never a kind of the ground truth.
- ``object_swap``: a companion of a kind in the scene replaces one of the objects (same place,
  colour and size), as a model that expects the companion misnames what it sees.
- ``attribute``: one object's colour or size changes.
- ``relation``: one object moves to a free quadrant (its position relative to the others changes).

Every edit records the object before and after (``{"kind", "before", "after", ...}``, objects
as dicts of :class:`~povid_data.synthetic_world.WorldObject` fields; ``before`` is None for an
addition), so ``caption(replay(ground_truth, edits))`` is the rewrite exactly (:func:`replay`).
Choices are seeded by ``(seed, record id)``, independent of record order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from povid_data.hallucinate_rules import record_rng
from povid_data.synthetic_world import (
    COLOURS,
    COMPANION,
    KINDS,
    POSITIONS,
    SIZES,
    Scene,
    WorldObject,
    caption,
    max_caption_objects,
)

__all__ = ["SCENE_KINDS", "DEFAULT_WEIGHTS", "SceneRewrite", "SceneInjector", "replay", "in_caption_order"]

SCENE_KINDS = ("object_addition", "object_swap", "attribute", "relation")

# The co-occurrence addition is what POVID's text pairs must teach against, so it dominates; the
# others keep the pairs from teaching "a longer caption is worse" alone.
DEFAULT_WEIGHTS: Dict[str, float] = {"object_addition": 0.7, "object_swap": 0.1, "attribute": 0.1, "relation": 0.1}


# A possible edit: the object it replaces (None: an addition), the object it puts there, and the
# edit's extra fields (source, attribute ...).
_Candidate = Tuple[Optional[WorldObject], WorldObject, Dict[str, str]]


def in_caption_order(objects: Sequence[WorldObject]) -> Scene:
    """A scene of ``objects`` in the world's caption order (kind order, partners adjacent), the
    order every ground-truth caption names its objects in."""
    return Scene(sorted(objects, key=lambda o: KINDS.index(o.kind)))


def _as_dict(obj: Optional[WorldObject]) -> Optional[Dict[str, str]]:
    return None if obj is None else asdict(obj)


def _as_object(value: Optional[Mapping[str, str]]) -> Optional[WorldObject]:
    return None if value is None else WorldObject(**value)


def replay(ground_truth: Scene, edits: Sequence[Mapping[str, Any]]) -> Scene:
    """Apply recorded edits to the ground-truth scene: each replaces its ``before`` object by its
    ``after`` one (``before`` None: an addition; ``after`` None: a removal).

    Raises:
        ValueError: an edit's ``before`` object is not in the scene it is applied to.
    """
    objects = list(ground_truth.objects)
    for edit in edits:
        before, after = _as_object(edit.get("before")), _as_object(edit.get("after"))
        if before is not None:
            if before not in objects:
                raise ValueError(f"edit {dict(edit)} does not apply: {before} is not in the scene")
            objects.remove(before)
        if after is not None:
            objects.append(after)
    return in_caption_order(objects)


@dataclass
class SceneRewrite:
    """A scene-level rewrite: the changed scene, its caption, and the edits that make it."""

    scene: Scene
    text: str
    edits: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def kinds(self) -> List[str]:
        """The kinds of the edits, in the order applied."""
        return list(dict.fromkeys(edit["kind"] for edit in self.edits))


class SceneInjector:
    """Rewrites world scenes into slightly different ones, deterministically per record.

    Args:
        seed: with the record id, seeds every choice.
        weights: relative weight of each edit kind (:data:`SCENE_KINDS`); a kind is drawn among
            those that can change the scene at hand, so the realised mix also depends on the
            scenes (an addition needs a free quadrant and a count the caption can say).
        max_edits: at most this many edits per record (1 or 2 is what the paper's rewrites do).
        extra_edit_rate: probability of each edit after the first, up to ``max_edits``.
        addition_fallback: where every present kind's companion is already in the scene, add
            another absent kind instead (an object that co-occurs with the scene in the world's
            data less often than the companion); False: no addition then.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        weights: Optional[Mapping[str, float]] = None,
        max_edits: int = 2,
        extra_edit_rate: float = 0.25,
        addition_fallback: bool = True,
    ) -> None:
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        unknown = set(weights) - set(SCENE_KINDS)
        if unknown:
            raise ValueError(f"unknown scene edit kinds {sorted(unknown)}; known: {list(SCENE_KINDS)}")
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"scene edit weights must be >= 0 with one > 0, got {weights}")
        if max_edits < 1:
            raise ValueError(f"max_edits must be at least 1, got {max_edits}")
        if not 0.0 <= extra_edit_rate <= 1.0:
            raise ValueError(f"extra_edit_rate must be in [0, 1], got {extra_edit_rate}")
        self.seed = seed
        self.weights = {k: float(w) for k, w in weights.items() if w > 0}
        self.max_edits = max_edits
        self.extra_edit_rate = extra_edit_rate
        self.addition_fallback = addition_fallback
        self.max_objects = max_caption_objects()

    def rewrite(self, record_id: Any, ground_truth: Scene, context_kinds: Set[str] = frozenset()) -> SceneRewrite:
        """Hallucinate into ``ground_truth``.

        Args:
            record_id: seeds the record's choices.
            ground_truth: the scene of the ground-truth caption.
            context_kinds: kinds the rest of the record names (an earlier question, say): never
                added or swapped in, like the ground truth's own.
        """
        rng = record_rng(self.seed, record_id)
        banned = set(ground_truth.kinds) | set(context_kinds)
        objects = list(ground_truth.objects)
        touched: List[WorldObject] = []  # objects an edit produced: a later edit leaves them alone
        edits: List[Dict[str, Any]] = []
        used: Set[str] = set()
        while len(edits) < self.max_edits:
            if edits and rng.random() >= self.extra_edit_rate:
                break
            options = {kind: self._candidates(kind, objects, banned, touched) for kind in self.weights if kind not in used}
            options = {kind: found for kind, found in options.items() if found}
            if not options:
                break
            kinds = sorted(options, key=SCENE_KINDS.index)  # a fixed order: draws do not depend on hashing
            kind = rng.choices(kinds, weights=[self.weights[k] for k in kinds])[0]
            before, after, extra = rng.choice(options[kind])
            if before is not None:
                objects.remove(before)
            objects.append(after)
            touched.append(after)
            used.add(kind)
            edits.append({"kind": kind, "before": _as_dict(before), "after": _as_dict(after), **extra})
        scene = in_caption_order(objects)
        return SceneRewrite(scene, caption(scene), edits)

    # Each candidate is (object before or None, object after, extra fields of the edit); the
    # candidate lists enumerate every change of a kind, so one draw picks uniformly among them.

    def _candidates(
        self, kind: str, objects: List[WorldObject], banned: Set[str], touched: List[WorldObject]
    ) -> List["_Candidate"]:
        free = [p for p in POSITIONS if p not in {o.position for o in objects}]
        present = [o.kind for o in objects]
        editable = [o for o in objects if o not in touched]
        if kind == "object_addition":
            return self._additions(present, banned, free)
        if kind == "object_swap":
            return [
                (o, WorldObject(new, o.colour, o.size, o.position), {"source": "companion", "companion_of": partner})
                for partner, new in self._absent_companions(present, banned)
                for o in editable
            ]
        if kind == "attribute":
            changes = []
            for o in editable:
                changes += [(o, WorldObject(o.kind, c, o.size, o.position), {"attribute": "colour"})
                            for c in COLOURS if c != o.colour]  # fmt: skip
                changes += [(o, WorldObject(o.kind, o.colour, s, o.position), {"attribute": "size"})
                            for s in SIZES if s != o.size]  # fmt: skip
            return changes
        if kind == "relation":
            return [(o, WorldObject(o.kind, o.colour, o.size, p), {}) for o in editable for p in free]
        raise ValueError(f"unknown scene edit kind {kind!r}")

    @staticmethod
    def _absent_companions(present: List[str], banned: Set[str]) -> List[Tuple[str, str]]:
        """(present kind, its companion) for every companion neither in the scene nor banned."""
        return [(k, COMPANION[k]) for k in present if COMPANION[k] not in present and COMPANION[k] not in banned]

    def _additions(self, present: List[str], banned: Set[str], free: List[str]) -> List["_Candidate"]:
        if len(present) >= self.max_objects or not free:
            return []  # the caption could not say the new count, or no quadrant is free
        companions = self._absent_companions(present, banned)
        if companions:
            new_kinds = [(kind, {"source": "companion", "companion_of": partner}) for partner, kind in companions]
        elif self.addition_fallback:
            new_kinds = [(kind, {"source": "other_kind"}) for kind in KINDS if kind not in present and kind not in banned]
        else:
            return []
        # A colour and size as the world draws them (uniformly), in any free quadrant.
        return [
            (None, WorldObject(kind, colour, size, position), extra)
            for kind, extra in new_kinds
            for colour in COLOURS
            for size in SIZES
            for position in free
        ]
