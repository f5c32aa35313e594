"""A tiny random LLaVA-1.5-shaped checkpoint, written without any download.

For the tests (and the CPU-size run of benchmarks/precision_check.py): a SentencePiece
tokenizer trained in-process on a small description corpus, a CLIP-style tower, projector and
Llama decoder with random weights, saved in the llava-hf layout exactly as a real checkpoint
would be.
"""

from __future__ import annotations

from pathlib import Path

import torch

from povid.checkpoint import save_llava_hf
from povid.model import LlavaArgs, llava_1_5
from povid_data.tokenizer import LlavaTokenizer, train_sentencepiece

__all__ = ["TINY_CORPUS", "tiny_llava_args", "make_tiny_checkpoint"]

_COLOURS = ["red", "green", "blue", "yellow", "purple", "white", "black"]
_OBJECTS = ["circle", "square", "triangle", "cup", "dog", "cat", "car", "tree", "person", "chair"]
_PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]

# Enough text for a few hundred BPE pieces; the grammar of captions and LLaVA's prompt template.
TINY_CORPUS = [
    f"There is a {c} {o} {p} of the image." for c in _COLOURS for o in _OBJECTS for p in _PLACES
] + [
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions.",
    "USER: Describe this image in detail. ASSISTANT: The image shows a small scene.",
    "Is there a dog in the image? Yes, there is. No, there is not.",
]


def tiny_llava_args(vocab_size: int, **overrides: object) -> LlavaArgs:
    """A LLaVA-1.5-shaped architecture of ~0.5 M parameters (32 px images, 16 image tokens).

    The ``<image>`` id is the first id after the tokenizer's pieces, as in llava-hf (32000).
    """
    fields = dict(
        vocab_size=vocab_size + 2,  # + <image>, <pad>, like llava-hf's 32000 + 2
        # 128 x 128 and 128 x 256 weights: the smallest that torchao's NF4 (blocks of 64,
        # scalers in blocks of 256) can quantize, so the QLoRA path runs on this model too.
        embed_dim=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        intermediate_dim=256,
        max_seq_len=512,
        vision_embed_dim=32,
        vision_num_layers=3,
        vision_num_heads=2,
        vision_intermediate_dim=128,
        image_size=32,
        patch_size=8,
        image_token_id=vocab_size,
        pad_token_id=0,
    )
    fields.update(overrides)
    return LlavaArgs(**fields)


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, vocab_size: int = 400) -> Path:
    """Write a random tiny LLaVA checkpoint (llava-hf layout + ``tokenizer.model``) to ``out_dir``.

    Deterministic for a given ``seed``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    train_sentencepiece(out_dir, TINY_CORPUS, vocab_size=vocab_size, seed=seed)
    tokenizer = LlavaTokenizer.from_dir(out_dir)
    args = tiny_llava_args(tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = llava_1_5(args)
    # Default inits leave norms at exactly 1 and biases at 0; perturb everything so that a wrong
    # mapping of any tensor changes the outputs (the tests rely on that).
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return save_llava_hf(model.state_dict(), args, out_dir)
