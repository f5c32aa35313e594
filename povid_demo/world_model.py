"""The tiny LLaVA of the synthetic world (:mod:`povid_data.synthetic_world`), before training.

A SentencePiece tokenizer trained on the world's vocabulary (captions, questions, the vicuna_v1
prompt), a small CLIP-style tower on 64 px images (patch 32: 4 image tokens), the LLaVA
projector and a small Llama decoder, with random weights, saved in the llava-hf layout like any
real checkpoint. ``tune run llava_sft`` then trains it into the base model POVID aligns
(config ``llava_sft_tiny_full``: the tower trains too, at 2 % of the learning rate; at the full
rate its features collapse to a constant within ~50 steps and the model never looks at images).
"""

from __future__ import annotations

from pathlib import Path

import torch

from povid.checkpoint import save_llava_hf
from povid.model import LlavaArgs, llava_1_5
from povid_data.synthetic_world import IMAGE_SIZE, world_corpus
from povid_data.tokenizer import LlavaTokenizer, train_sentencepiece

__all__ = ["world_llava_args", "make_world_checkpoint", "POSITION_INIT_STD"]

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


def make_world_checkpoint(out_dir: str | Path, seed: int = 0, vocab_size: int = 600) -> Path:
    """Write the untrained world LLaVA (llava-hf layout + ``tokenizer.model``) to ``out_dir``.

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
    return save_llava_hf(model.state_dict(), args, out_dir)
