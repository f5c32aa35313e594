"""The POVID training dataset and its collate function.

One example is one preference record: the clean image and up to three answers to the same
prompt, each tokenized with masked labels:

- ``chosen``: the ground truth (``conversations``),
- ``rejected``: the text-hallucinated answer (``rejected_conversations``, stage 1),
- ``noise``: the answer the model gave on the noised image (``noise_conversations``, stage 2;
  may be absent — the objective then drops that term or computes it online).

For the online noise branch the dataset also returns the image distorted with fresh noise
(different every epoch, reproducible given seed, id and epoch), preprocessed like the clean one.

:func:`collate_preferences` stacks every answer of the batch into one padded token matrix, so a
single forward pass scores chosen, rejected and noise rows together, and keeps one copy of each
image: ``row_image`` says which image every row uses, so the vision tower runs once per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import PIL.Image
import torch
from torch.utils.data import Dataset

from povid_data.records import (
    CHOSEN,
    NOISE,
    REJECTED,
    check_image_markers,
    default_image_dir,
    read_llava_records,
    resolve_image,
)
from povid_data.transforms import (
    IGNORE_INDEX,
    LlavaImageTransform,
    LlavaMessageTransform,
    load_image,
)

__all__ = ["PreferenceDataset", "collate_preferences", "ROW_KINDS"]

ROW_KINDS = ("chosen", "rejected", "noise")
_FIELDS = {"chosen": CHOSEN, "rejected": REJECTED, "noise": NOISE}

NoiseFn = Callable[[PIL.Image.Image, str, int], PIL.Image.Image]


class PreferenceDataset(Dataset):
    """POVID preference records as tokenized, image-preprocessed training examples.

    Args:
        source: POVID preference file (JSON list / JSONL) or a ``datasets`` dataset.
        message_transform: tokenizes conversations (vicuna_v1, masked labels).
        image_transform: clean image -> CLIP tensor.
        image_dir: images resolve against it (default: the data file's folder).
        use_noise_answers: read ``noise_conversations`` when a record has them.
        noise_fn: ``(image, record_id, epoch) -> distorted image`` for the online noise branch;
            when given, every example also carries ``noisy_image``.
        truncate: cut overlong answers at ``max_seq_len`` (the prompt is never cut).
    """

    def __init__(
        self,
        source: Any,
        message_transform: LlavaMessageTransform,
        image_transform: LlavaImageTransform,
        *,
        image_dir: Optional[str | Path] = None,
        use_noise_answers: bool = True,
        noise_fn: Optional[NoiseFn] = None,
        truncate: bool = True,
    ) -> None:
        self.records, self.source = read_llava_records(source, require=(CHOSEN, REJECTED))
        if not self.records:
            raise ValueError(f"{self.source}: no records")
        self.image_dir = default_image_dir(source, image_dir)
        self.messages = message_transform
        self.images = image_transform
        self.use_noise_answers = use_noise_answers
        self.noise_fn = noise_fn
        self.truncate = truncate
        self.epoch = 0
        for record in self.records:
            check_image_markers(record, list(_FIELDS.values()), self.source)

    def set_epoch(self, epoch: int) -> None:
        """Online noise is drawn afresh per epoch (and reproducibly: seed, id, epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def has_noise_answer(self, index: int) -> bool:
        """Whether record ``index`` carries a stage-2 noise answer that will be used."""
        return self.use_noise_answers and self.records[index].get(NOISE) is not None

    def __getitem__(self, index: int) -> Dict[str, Any]:
        record = self.records[index]
        rid = str(record["id"])
        where = f"{self.source}: record id={rid!r}"
        example: Dict[str, Any] = {"id": rid}
        for kind in ROW_KINDS:
            field = _FIELDS[kind]
            if record.get(field) is None or (kind == "noise" and not self.use_noise_answers):
                continue
            tokens, labels = self.messages.tokenize(
                record[field], source=f"{where}: field {field!r}", truncate=self.truncate
            )
            if all(label == IGNORE_INDEX for label in labels):
                raise ValueError(f"{where}: field {field!r}: no answer tokens to score")
            example[f"{kind}_tokens"] = tokens
            example[f"{kind}_labels"] = labels
        path = resolve_image(record, self.image_dir, self.source)
        if path is None:
            raise ValueError(f"{where}: field 'image': POVID training needs an image per record")
        try:
            image = load_image(path)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{where}: field 'image': {e}") from None
        example["image"] = self.images(image)
        if self.noise_fn is not None:
            example["noisy_image"] = self.images(self.noise_fn(image, rid, self.epoch))
        return example


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate_preferences(batch: List[Dict[str, Any]], pad_id: int = 0) -> Dict[str, Any]:
    """Stack a batch into one row matrix: all chosen rows, then rejected, then noise.

    Returns a dict with
        ``tokens``/``labels`` ``[rows, L]`` (right-padded; labels -100 at padding),
        ``row_kind`` (list of ``"chosen"|"rejected"|"noise"``), ``kind_rows`` (each present
        kind's row indices, in row order), ``row_example`` ``[rows]``
        (index of the example a row belongs to), ``row_image`` ``[rows]`` (index into
        ``images``), ``images`` ``[B, 3, H, W]``, ``noisy_images`` (if present), ``ids``.
    Examples without a noise answer simply contribute no noise row.
    """
    tokens, labels, kinds, owners = [], [], [], []
    for kind in ROW_KINDS:
        for i, example in enumerate(batch):
            if f"{kind}_tokens" in example:
                tokens.append(example[f"{kind}_tokens"])
                labels.append(example[f"{kind}_labels"])
                kinds.append(kind)
                owners.append(i)
    for i, example in enumerate(batch):
        if "rejected_tokens" not in example or "chosen_tokens" not in example:
            raise ValueError(f"record id={example['id']!r}: needs chosen and rejected answers")
    owner = torch.tensor(owners, dtype=torch.long)
    collated = {
        "ids": [example["id"] for example in batch],
        "tokens": _pad(tokens, pad_id),
        "labels": _pad(labels, IGNORE_INDEX),
        "row_kind": kinds,
        # Each kind's row indices, computed once here rather than from row_kind at every use.
        "kind_rows": {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in ROW_KINDS if kind in kinds},
        "row_example": owner,
        # One image per example; rows point at their example's image.
        "row_image": owner.clone(),
        "images": torch.stack([example["image"] for example in batch]),
    }
    if all("noisy_image" in example for example in batch):
        collated["noisy_images"] = torch.stack([example["noisy_image"] for example in batch])
    return collated
