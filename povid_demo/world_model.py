"""The tiny LLaVA of the synthetic world (:mod:`povid_data.synthetic_world`), before training.

A SentencePiece tokenizer trained on the world's vocabulary (captions, questions, the vicuna_v1
prompt), a small CLIP-style tower on 64 px images (patch 32: 4 image tokens), the LLaVA
projector and a small Llama decoder, saved in the llava-hf layout like any real checkpoint.
``tune run llava_sft`` then trains it into the base model POVID aligns (config
``llava_sft_tiny_full``: the tower trains too, at 2 % of the learning rate; at the full rate its
features collapse to a constant within ~50 steps and the model never looks at images).

LLaVA starts from a pretrained CLIP tower: it sees before it learns to talk. The world's tower
does too when ``pretrain_steps`` > 0 (:func:`pretrain_world_tower`): a short supervised
pretraining on the ``train`` images, a linear probe per image token (one per quadrant) naming
what is there (kind or nothing, colour, size), the probes then dropped. From a random tower,
whether and when SFT learns to read the image was left to chance: on one seed of the
``absent_companion_share=1.0`` world the loss stayed on its language-only plateau (0.32) for
all 2,000 steps, on another it left it at step ~750.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from povid.checkpoint import save_llava_hf
from povid.model import LlavaArgs, llava_1_5
from povid_data.synthetic_world import COLOURS, IMAGE_SIZE, KINDS, SIZES, world_corpus
from povid_data.tokenizer import LlavaTokenizer, train_sentencepiece
from povid_data.transforms import LlavaImageTransform, load_image

__all__ = ["world_llava_args", "make_world_checkpoint", "pretrain_world_tower", "quadrant_labels", "POSITION_INIT_STD"]

POSITION_INIT_STD = 0.3


def world_llava_args(vocab_size: int, **overrides: object) -> LlavaArgs:
    """About 2.0 M parameters (1.8 M in the layers that run): CLIP-style tower 128 wide x 4 layers (3 used, as LLaVA takes the
    second-to-last layer) with 32 px patches, so 4 image tokens, one per quadrant of the 64 px
    image; Llama decoder 128 wide x 3 layers."""
    fields = dict(
        vocab_size=vocab_size + 2,  # + <image>, <pad>, as llava-hf's 32000 + 2
        embed_dim=128,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        intermediate_dim=384,
        max_seq_len=512,
        vision_embed_dim=128,
        vision_num_layers=4,
        vision_num_heads=4,
        vision_intermediate_dim=512,
        image_size=IMAGE_SIZE,
        patch_size=32,
        image_token_id=vocab_size,
        pad_token_id=0,
    )
    fields.update(overrides)
    return LlavaArgs(**fields)


# Image token i of the 2 x 2 patch grid covers this quadrant (row-major, as the patches).
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = {"kind": list(KINDS), "colour": list(COLOURS), "size": list(SIZES)}


def quadrant_labels(world_dir: str | Path, split: str) -> Dict[str, torch.Tensor]:
    """Per image of ``split`` (file name order) and quadrant, the index of its object's kind,
    colour and size, 0 for an empty quadrant: ``{"files": [...], "kind": [n, 4], ...}``."""
    world_dir = Path(world_dir)
    coco = json.loads((world_dir / "annotations" / f"instances_{split}.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = sorted(coco["images"], key=lambda i: i["file_name"])
    row = {image["id"]: n for n, image in enumerate(images)}
    labels = {key: torch.zeros(len(images), len(QUADRANTS), dtype=torch.long) for key in ATTRIBUTES}
    for ann in coco["annotations"]:
        attributes = {"kind": names[ann["category_id"]], **ann["attributes"]}
        quadrant = QUADRANTS.index(attributes["position"])
        for key, values in ATTRIBUTES.items():
            labels[key][row[ann["image_id"]], quadrant] = values.index(attributes[key]) + 1
    return {"files": [str(world_dir / "images" / i["file_name"]) for i in images], **labels}


def pretrain_world_tower(
    model: nn.Module,
    world_dir: str | Path,
    *,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, float]:
    """Pretrain the tower of ``model`` (in place) to see the world, as CLIP is pretrained
    before LLaVA: on the ``train`` images, from the features LLaVA reads (the feature layer),
    a linear probe per attribute names each quadrant's kind, colour and size (or nothing).
    Returns the probe's accuracy per attribute on the held-out ``test`` images."""
    encoder = model.encoders["image"]
    transform = LlavaImageTransform("pad", size=model.llava_args.image_size)

    def pixels(files: List[str]) -> torch.Tensor:
        return torch.stack([transform(load_image(f)) for f in files])

    train, test = quadrant_labels(world_dir, "train"), quadrant_labels(world_dir, "test")
    train_pixels, test_pixels = pixels(train["files"]), pixels(test["files"])
    width = model.llava_args.vision_embed_dim
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probes = nn.ModuleDict({key: nn.Linear(width, len(values) + 1) for key, values in ATTRIBUTES.items()})
    tower = encoder.clip
    frozen = {name for name, p in tower.named_parameters() if not p.requires_grad}
    tower.requires_grad_(True)  # the builder freezes the tower, as LLaVA's SFT does
    optimizer = torch.optim.AdamW([*tower.parameters(), *probes.parameters()], lr=lr, weight_decay=0.0)

    def loss_and_correct(images: torch.Tensor, rows: torch.Tensor, labels: Dict[str, torch.Tensor]):
        features = encoder.image_features(images)  # [n, 4, width]
        loss, correct = 0.0, {}
        for key, probe in probes.items():
            logits = probe(features)
            target = labels[key][rows]
            loss = loss + F.cross_entropy(logits.flatten(0, 1), target.flatten())
            correct[key] = (logits.argmax(-1) == target).float().mean().item()
        return loss, correct

    tower.train()
    n = len(train_pixels)
    for step in range(1, steps + 1):
        rows = torch.randint(0, n, (batch_size,), generator=generator)
        loss, _ = loss_and_correct(train_pixels[rows], rows, train)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress and (step % 100 == 0 or step == steps):
            progress(f"tower pretraining: step {step}/{steps}, loss {loss.item():.3f}")
    tower.eval()
    for name, p in tower.named_parameters():
        p.requires_grad_(name not in frozen)
    with torch.no_grad():
        _, accuracy = loss_and_correct(test_pixels, torch.arange(len(test_pixels)), test)
    return accuracy


def make_world_checkpoint(
    out_dir: str | Path,
    seed: int = 0,
    vocab_size: int = 600,
    *,
    world_dir: Optional[str | Path] = None,
    pretrain_steps: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write the world LLaVA (llava-hf layout + ``tokenizer.model``) to ``out_dir``: random
    weights, the tower pretrained on ``world_dir``'s images first when ``pretrain_steps`` > 0
    (the probe's test accuracy goes to ``tower_pretraining.json``).

    Deterministic given ``seed``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    train_sentencepiece(out_dir, world_corpus(), vocab_size=vocab_size, seed=0)
    tokenizer = LlavaTokenizer.from_dir(out_dir)
    args = world_llava_args(tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = llava_1_5(args)
    with torch.no_grad():
        # A random tower's positional embedding (std dim**-0.5 = 0.09) is faint next to its patch
        # embedding; at 0.3, where a patch is survives into the features, as in a trained CLIP.
        model.encoders["image"].clip.token_pos_embedding.positional_embedding.normal_(0.0, POSITION_INIT_STD)
    if pretrain_steps:
        if world_dir is None:
            raise ValueError("make_world_checkpoint: pretrain_steps > 0 needs the world_dir to pretrain on")
        accuracy = pretrain_world_tower(model, world_dir, steps=pretrain_steps, seed=seed, progress=progress)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tower_pretraining.json").write_text(json.dumps({"steps": pretrain_steps, "test_accuracy": accuracy}) + "\n")
        if progress:
            progress("tower probe accuracy on test: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in accuracy.items()))
    return save_llava_hf(model.state_dict(), args, out_dir)
