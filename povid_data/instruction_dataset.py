"""LLaVA instruction data (supervised fine-tuning) as tokenized, image-preprocessed examples.

One example is one LLaVA record (``{"id", "image"?, "conversations"}``, any number of turns):
the whole conversation tokenized with the vicuna_v1 template (labels -100 except the
assistant answers and their ``</s>``) and, when the record has an image, the image
preprocessed for the CLIP tower. Text-only records are allowed, as in LLaVA's own SFT mix.

:func:`collate_instructions` right-pads a batch and stacks the images of the rows that have
one, in row order: the fusion model fills each row's placeholders with its own image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from povid_data.records import CHOSEN, check_image_markers, default_image_dir, read_llava_records, resolve_image
from povid_data.transforms import (
    IGNORE_INDEX,
    LlavaImageTransform,
    LlavaMessageTransform,
    load_image,
)

__all__ = ["InstructionDataset", "collate_instructions"]


class InstructionDataset(Dataset):
    """LLaVA instruction records for supervised fine-tuning.

    Args:
        source: JSON list / JSONL / ``datasets`` directory of LLaVA records.
        message_transform: tokenizes conversations (vicuna_v1, masked labels).
        image_transform: image -> CLIP tensor.
        image_dir: images resolve against it (default: the data file's folder).
        truncate: cut an overlong last answer at ``max_seq_len`` instead of raising.
    """

    def __init__(
        self,
        source: Any,
        message_transform: LlavaMessageTransform,
        image_transform: LlavaImageTransform,
        *,
        image_dir: Optional[str | Path] = None,
        truncate: bool = True,
    ) -> None:
        self.records, self.source = read_llava_records(source, require=(CHOSEN,))
        if not self.records:
            raise ValueError(f"{self.source}: no records")
        self.image_dir = default_image_dir(source, image_dir)
        self.messages = message_transform
        self.images = image_transform
        self.truncate = truncate
        for record in self.records:
            check_image_markers(record, (CHOSEN,), self.source)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        record = self.records[index]
        where = f"{self.source}: record id={record['id']!r}"
        tokens, labels = self.messages.tokenize(
            record[CHOSEN], source=f"{where}: field {CHOSEN!r}", truncate=self.truncate
        )
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"{where}: no answer tokens to train on")
        example: Dict[str, Any] = {"id": str(record["id"]), "tokens": tokens, "labels": labels}
        path = resolve_image(record, self.image_dir, self.source)
        if path is not None:
            try:
                example["image"] = self.images(load_image(path))
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{where}: field 'image': {e}") from None
        return example


def collate_instructions(batch: List[Dict[str, Any]], pad_id: int = 0) -> Dict[str, Any]:
    """Right-pad tokens (``pad_id``) and labels (-100); stack the images in row order.

    Returns ``tokens``/``labels`` ``[B, L]``, ``images`` ``[n_images, 3, H, W]`` or None when no
    row has an image, and ``ids``.
    """
    tokens = pad_sequence([torch.tensor(e["tokens"]) for e in batch], batch_first=True, padding_value=pad_id)
    labels = pad_sequence(
        [torch.tensor(e["labels"]) for e in batch], batch_first=True, padding_value=IGNORE_INDEX
    )
    images = [e["image"] for e in batch if "image" in e]
    return {
        "ids": [e["id"] for e in batch],
        "tokens": tokens,
        "labels": labels,
        "images": torch.stack(images) if images else None,
    }
