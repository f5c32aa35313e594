"""A tiny Llama-style SentencePiece tokenizer trained on the fly (no downloads in tests)."""

from __future__ import annotations

import random
from pathlib import Path

from povid_data.tokenizer import train_sentencepiece
from povid_data.transforms import VICUNA_V1_SYSTEM

_WORDS = (
    "a the cat dog person man woman sits stands on near under next to holding red blue green "
    "white black table chair street car bus umbrella kitchen plate pizza two three people "
    "image picture photo describe detail detailed what is in this there are of and with "
    "background left right small large wooden sky tree grass"
).split()


def tiny_corpus(n_sentences: int = 300, seed: int = 0) -> list[str]:
    """Caption-like sentences and vicuna_v1 prompts, deterministic.

    The prompts repeat often enough that ``▁USER`` and ``▁ASSISTANT`` become pieces, as in
    Llama's vocabulary, so tests see merges across the template's word boundaries.
    """
    rng = random.Random(seed)

    def sentence() -> str:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        return " ".join(words).capitalize() + rng.choice([".", "?", "!", ", 12."])

    corpus = []
    for _ in range(n_sentences // 3):
        corpus.append(
            f"{VICUNA_V1_SYSTEM} USER: <image>\n{sentence()} ASSISTANT: {sentence()}</s>"
            f"USER: {sentence()} ASSISTANT: {sentence()}</s>"
        )
    corpus += [sentence() for _ in range(n_sentences)]
    return corpus


def make_tiny_tokenizer(directory: Path, vocab_size: int = 480) -> Path:
    """Train the tiny model into ``directory/tokenizer.model`` and return that path."""
    return train_sentencepiece(directory, tiny_corpus(), vocab_size=vocab_size, seed=0)
