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
The result is a :class:`PreferenceBatch` (typed fields, an index tensor per row kind).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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

__all__ = ["PreferenceDataset", "PreferenceBatch", "collate_preferences", "ROW_KINDS"]

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


@dataclass(frozen=True)
class PreferenceBatch:
    """A collated batch of preference examples: every answer row in one padded matrix.

    Rows come chosen first (one per example, in example order), then rejected (one per
    example), then noise (one per example that has a dataset noise answer). Each row points at
    the image it is scored on (``row_image``, an index into ``images``), so the vision tower
    runs once per image however many rows share it.

    Attributes:
        ids: record ids, one per example.
        tokens: ``[rows, L]`` token ids, right-padded.
        labels: ``[rows, L]``, -100 everywhere but the answer tokens.
        row_example: ``[rows]`` index of the example each row belongs to.
        row_image: ``[rows]`` index into ``images`` of the image each row is scored on.
        images: the images rows point at: the clean ones ``[B, 3, H, W]``, followed, when
            noise rows are scored on their noisy image, by the noisy copies.
        chosen_rows, rejected_rows, noise_rows: ``[n]`` row indices of each kind (``noise_rows``
            may be empty).
        noisy_images: ``[B, 3, H, W]`` each example's distorted image, when the dataset gives
            one (online noise, or dataset noise scored on the noisy image); else None.
    """

    ids: List[str]
    tokens: torch.Tensor
    labels: torch.Tensor
    row_example: torch.Tensor
    row_image: torch.Tensor
    images: torch.Tensor
    chosen_rows: torch.Tensor
    rejected_rows: torch.Tensor
    noise_rows: torch.Tensor
    noisy_images: Optional[torch.Tensor] = None

    @property
    def num_examples(self) -> int:
        """Number of preference examples (not rows)."""
        return len(self.ids)

    @property
    def kind_rows(self) -> Dict[str, torch.Tensor]:
        """Each present row kind's indices (``noise`` only when the batch has noise rows)."""
        rows = {"chosen": self.chosen_rows, "rejected": self.rejected_rows}
        if len(self.noise_rows):
            rows["noise"] = self.noise_rows
        return rows

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "PreferenceBatch":
        """A copy on ``device``; images (not token ids) also cast to ``dtype`` if given."""

        def images(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if x is None else x.to(device, dtype)

        return replace(
            self,
            **{
                name: getattr(self, name).to(device)
                for name in ("tokens", "labels", "row_example", "row_image", "chosen_rows", "rejected_rows", "noise_rows")
            },
            images=images(self.images),
            noisy_images=images(self.noisy_images),
        )


def collate_preferences(
    batch: List[Dict[str, Any]], pad_id: int = 0, *, noise_rows_on_noisy_image: bool = False
) -> PreferenceBatch:
    """Stack a batch of :class:`PreferenceDataset` examples into a :class:`PreferenceBatch`.

    Args:
        batch: examples as the dataset returns them.
        pad_id: token id for padding.
        noise_rows_on_noisy_image: score each dataset noise row on its example's noisy image
            (``noise.condition=noisy``): the noisy copies are stacked after the clean images
            and the noise rows point at them. Needs ``noisy_image`` in every example.

    Examples without a noise answer simply contribute no noise row.
    """
    for example in batch:
        if "rejected_tokens" not in example or "chosen_tokens" not in example:
            raise ValueError(f"record id={example['id']!r}: needs chosen and rejected answers")
    tokens, labels, kinds, owners = [], [], [], []
    for kind in ROW_KINDS:
        for i, example in enumerate(batch):
            if f"{kind}_tokens" in example:
                tokens.append(example[f"{kind}_tokens"])
                labels.append(example[f"{kind}_labels"])
                kinds.append(kind)
                owners.append(i)
    owner = torch.tensor(owners, dtype=torch.long)
    rows = {kind: torch.tensor([i for i, k in enumerate(kinds) if k == kind], dtype=torch.long) for kind in ROW_KINDS}
    images = torch.stack([example["image"] for example in batch])
    noisy_images = None
    if all("noisy_image" in example for example in batch):
        noisy_images = torch.stack([example["noisy_image"] for example in batch])
    row_image = owner.clone()  # one image per example; rows point at their example's
    if noise_rows_on_noisy_image:
        if noisy_images is None:
            missing = next(example["id"] for example in batch if "noisy_image" not in example)
            raise ValueError(f"record id={missing!r}: noise rows scored on the noisy image need a noisy_image")
        images = torch.cat([images, noisy_images])
        row_image[rows["noise"]] += len(batch)
    return PreferenceBatch(
        ids=[example["id"] for example in batch],
        tokens=_pad(tokens, pad_id),
        labels=_pad(labels, IGNORE_INDEX),
        row_example=owner,
        row_image=row_image,
        images=images,
        chosen_rows=rows["chosen"],
        rejected_rows=rows["rejected"],
        noise_rows=rows["noise"],
        noisy_images=noisy_images,
    )
