"""SentencePiece tokenizer for LLaVA-1.5 (Llama / Vicuna vocabulary).

Two things live here:

- :func:`train_sentencepiece` trains a tiny Llama-style SentencePiece model in-process, so
  tests and the offline demo never need to download a tokenizer;
- :class:`LlavaTokenizer`, a thin wrapper around ``sentencepiece.SentencePieceProcessor``
  that reads ``<checkpoint_dir>/tokenizer.model``.

The toolkit deliberately tokenizes with SentencePiece directly instead of transformers'
Llama tokenizer: the original LLaVA rule (see ``povid_data.transforms``) is defined in terms
of SentencePiece's behaviour, and transformers' behaviour around the dummy prefix has
changed between versions.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

TOKENIZER_FILENAME = "tokenizer.model"

# The placeholder that marks an image in LLaVA prompts. It must never be a SentencePiece
# piece: the message transform replaces it by image placeholder ids before encoding.
_IMAGE_TAG = "<image>"


def _model_file(model_prefix_or_path: str | Path) -> Path:
    """Where to write the model: a ``*.model`` path as is, otherwise ``<dir>/tokenizer.model``."""
    path = Path(model_prefix_or_path)
    if path.suffix == ".model":
        return path
    return path / TOKENIZER_FILENAME


def train_sentencepiece(
    model_prefix_or_path: str | Path,
    sentences: Iterable[str],
    vocab_size: int = 512,
    seed: int = 0,
    model_type: str = "bpe",
) -> Path:
    """Train a small Llama-style SentencePiece model in-process and write it to disk.

    The model mirrors the settings of the Llama-2 / Vicuna ``tokenizer.model`` that LLaVA-1.5
    uses: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, no pad piece, a dummy prefix, no
    normalization and no whitespace collapsing, digits split, byte fallback (so every string
    encodes without ``<unk>``). ``<image>`` is removed from the corpus so that it can never
    become a piece.

    Args:
        model_prefix_or_path: a directory (``tokenizer.model`` is written inside it, the
            directory is created) or a path ending in ``.model``.
        sentences: training text, one sentence per item.
        vocab_size: number of pieces, including the 3 specials and 256 byte pieces. It is an
            upper bound: a corpus too small to fill it gives a smaller vocabulary instead of
            an error (check ``LlavaTokenizer.vocab_size`` if an exact size matters).
        seed: seed of SentencePiece's random generator (training is single-threaded and the
            corpus is not shuffled, so the result is deterministic anyway).
        model_type: ``"bpe"`` like Llama, or ``"unigram"``.

    Returns:
        Path of the written ``.model`` file.
    """
    corpus = [s.replace(_IMAGE_TAG, " ") for s in sentences if s and s.strip()]
    if not corpus:
        raise ValueError("train_sentencepiece needs at least one non-empty sentence")
    out_file = _model_file(model_prefix_or_path)
    out_file.parent.mkdir(parents=True, exist_ok=True)

    spm.set_random_generator_seed(seed)
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model_bytes,
        model_type=model_type,
        vocab_size=vocab_size,
        # Special ids as in Llama: unk 0, bos 1, eos 2, and no pad piece.
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # Llama's normalizer: none at all, so whitespace and newlines survive verbatim.
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        character_coverage=1.0,
        # Determinism and speed on a tiny corpus.
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    out_file.write_bytes(model_bytes.getvalue())

    tokenizer = LlavaTokenizer(out_file)
    if tokenizer.sp.piece_to_id(_IMAGE_TAG) != tokenizer.sp.unk_id():
        raise RuntimeError(f"{_IMAGE_TAG!r} became a SentencePiece piece in {out_file}")
    return out_file


class LlavaTokenizer:
    """SentencePiece tokenizer with LLaVA-1.5's special ids.

    ``encode`` is raw SentencePiece: strings such as ``"</s>"`` or ``"<image>"`` in the text
    are encoded as ordinary characters. Splitting a prompt at those markers is the job of
    :class:`povid_data.transforms.LlavaMessageTransform`.

    Args:
        model_path: path of a SentencePiece ``.model`` file.
    """

    # The original LLaVA code pads with id 0 (<unk>); llava-hf adds a separate <pad> piece,
    # which is a model-side concern (embedding rows), not a SentencePiece one.
    pad_id: int = 0

    def __init__(self, model_path: str | Path) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> "LlavaTokenizer":
        """Load ``<checkpoint_dir>/tokenizer.model``."""
        path = Path(checkpoint_dir) / TOKENIZER_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"No {TOKENIZER_FILENAME} in checkpoint directory {Path(checkpoint_dir)}: "
                f"expected {path}"
            )
        return cls(path)

    @property
    def bos_id(self) -> int:
        """Id of ``<s>`` (1 for Llama)."""
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of ``</s>`` (2 for Llama)."""
        return self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (32000 for Llama); added model tokens are extra."""
        return self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encode ``text`` with SentencePiece (which adds its dummy prefix ``▁``)."""
        ids = list(self.sp.encode(text, out_type=int))
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, skipping bos/eos and ids SentencePiece does not know.

        Ids outside ``[0, vocab_size)`` are image placeholders (e.g. 32000 in llava-hf,
        -200 in the original LLaVA) or added tokens such as llava-hf's ``<pad>``.
        """
        skip = {self.bos_id, self.eos_id}
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in skip]
        return self.sp.decode(kept)
