"""Prompt and image transforms for LLaVA-1.5, exactly as the original LLaVA code does them.

Prompt side (``vicuna_v1`` conversation template)::

    {SYSTEM} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question2} ASSISTANT: ...

Tokenization follows the original LLaVA ``tokenizer_image_token`` rule with the legacy
(slow) Llama tokenizer:

- the prompt is cut at every ``<image>`` and every ``</s>``; each text piece in between is
  encoded on its own with SentencePiece, so each piece gets SentencePiece's dummy prefix
  (``"\\nDescribe"`` after an image starts with the lone ``▁`` piece, ``"USER:"`` after
  ``</s>`` starts with ``▁USER``);
- ``</s>`` becomes the EOS id, each ``<image>`` becomes ``num_image_tokens`` copies of the
  image placeholder id (torchtune's ``EarlyFusionModel`` scatters one image feature into
  each placeholder, so the count must equal the number of image patches);
- one BOS at the very start.

Labels are -100 everywhere except each assistant answer and its ``</s>``.

Image side: :class:`LlavaImageTransform` reproduces ``expand2square`` + transformers'
``CLIPImageProcessor`` (PIL path) bit for bit; see its docstring.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import PIL.Image
import torch

from povid_data.tokenizer import LlavaTokenizer

# ----------------------------------------------------------------------------- constants

IMAGE_TOKEN = "<image>"
EOS_TEXT = "</s>"
IGNORE_INDEX = -100  # same value as torchtune's CROSS_ENTROPY_IGNORE_IDX

# vicuna_v1 template of LLaVA-1.5 (conv_vicuna_v1 / conv_llava_v1: SeparatorStyle.TWO).
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V1_ROLES = ("USER", "ASSISTANT")
VICUNA_V1_SEP = " "  # after the system prompt and after each user turn
VICUNA_V1_SEP2 = EOS_TEXT  # after each assistant turn

# The same prompt as a Jinja chat template, for a server (vLLM ``--chat-template``, SGLang) that
# serves a llava-hf checkpoint: llava-hf's own template has no system prompt. The image part of
# an OpenAI message becomes ``<image>\n`` before its text, where LLaVA's preprocessing puts it.
VICUNA_V1_CHAT_TEMPLATE = (
    "{{- '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + VICUNA_V1_SEP + "' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image_url', 'image') -%}{{- '<image>\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + message['content'] + '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_USER, _ASSISTANT = "user", "assistant"
_ROLE_ALIASES = {"human": _USER, "user": _USER, "gpt": _ASSISTANT, "assistant": _ASSISTANT}
_SPECIALS_RE = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(EOS_TEXT)})")


# ----------------------------------------------------------------------------- messages


def _where(source: str) -> str:
    """Prefix for error messages so a bad record can be found in its file."""
    return f"[{source}] " if source else ""


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], source: str = ""
) -> list[tuple[str, str]]:
    """Turn LLaVA-style or role/content messages into ``[(role, text), ...]``.

    Accepts ``{"from": "human"|"gpt", "value": str}`` (LLaVA / POVID files) and
    ``{"role": "user"|"assistant", "content": str}``. Turns must alternate and start with
    the user, as LLaVA's own preprocessing asserts.

    Returns:
        list of ``(role, text)`` with role ``"user"`` or ``"assistant"``.
    """
    out: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        raw_role = message.get("from", message.get("role"))
        text = message.get("value", message.get("content"))
        role = _ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise ValueError(f"{_where(source)}message {i}: unknown role {raw_role!r}")
        if not isinstance(text, str):
            raise TypeError(
                f"{_where(source)}message {i}: text must be a str, got {type(text).__name__}"
            )
        expected = _USER if i % 2 == 0 else _ASSISTANT
        if role != expected:
            raise ValueError(
                f"{_where(source)}message {i}: expected a {expected} turn (turns alternate, "
                f"user first), got {role}"
            )
        if role == _ASSISTANT and not text:
            # vicuna_v1 renders an empty answer as a generation prompt without </s>.
            raise ValueError(f"{_where(source)}message {i}: empty assistant answer")
        if role == _ASSISTANT and IMAGE_TOKEN in text:
            raise ValueError(
                f"{_where(source)}message {i}: {IMAGE_TOKEN} inside an assistant answer"
            )
        out.append((role, text))
    if not out:
        raise ValueError(f"{_where(source)}no messages")
    return out


def _template_pieces(
    turns: Sequence[tuple[str, str]], add_generation_prompt: bool, source: str = ""
) -> list[tuple[str, bool]]:
    """The vicuna_v1 prompt as consecutive ``(text, trainable)`` pieces.

    Joining the texts gives :func:`build_vicuna_prompt`; ``trainable`` marks the answer text
    (with the space that separates it from ``ASSISTANT:``) and its ``</s>``.
    """
    user, assistant = VICUNA_V1_ROLES
    pieces: list[tuple[str, bool]] = [(VICUNA_V1_SYSTEM + VICUNA_V1_SEP, False)]
    for role, text in turns:
        if role == _USER:
            pieces.append((f"{user}: {text}{VICUNA_V1_SEP}", False))
        else:
            pieces.append((f"{assistant}:", False))
            pieces.append((f" {text}", True))
            pieces.append((VICUNA_V1_SEP2, True))
    if add_generation_prompt:
        if turns[-1][0] != _USER:
            raise ValueError(f"{_where(source)}a generation prompt needs a final user turn")
        pieces.append((f"{assistant}:", False))
    return pieces


def build_vicuna_prompt(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
) -> str:
    """Render messages with LLaVA-1.5's vicuna_v1 template.

    ``system + " " + "USER: " + q + " " + "ASSISTANT: " + a + "</s>" + "USER: ..."``;
    with ``add_generation_prompt`` the prompt ends in ``" ASSISTANT:"``.
    """
    turns = normalize_messages(messages)
    return "".join(text for text, _ in _template_pieces(turns, add_generation_prompt))


def count_images(messages: Sequence[Mapping[str, Any]]) -> int:
    """Number of ``<image>`` markers in all message texts."""
    total = 0
    for message in messages:
        text = message.get("value", message.get("content"))
        if isinstance(text, str):
            total += text.count(IMAGE_TOKEN)
    return total


class LlavaMessageTransform:
    """Tokenize vicuna_v1 conversations with image placeholders, as original LLaVA does.

    Args:
        tokenizer: the model's SentencePiece tokenizer.
        image_token_id: id written at image positions: 32000 for llava-hf checkpoints, -200
            for original LLaVA; it must not be a SentencePiece id.
        num_image_tokens: placeholders per ``<image>`` (576 for 336 px / patch 14).
        max_seq_len: longest allowed sequence, or None for no limit.
    """

    def __init__(
        self,
        tokenizer: LlavaTokenizer,
        image_token_id: int,
        num_image_tokens: int,
        max_seq_len: int | None,
    ) -> None:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if 0 <= image_token_id < tokenizer.vocab_size:
            # The fusion model replaces every position holding this id by image features.
            raise ValueError(
                f"image_token_id {image_token_id} collides with a text token "
                f"(SentencePiece vocab size {tokenizer.vocab_size})"
            )
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_seq_len = max_seq_len

    @staticmethod
    def count_images(messages: Sequence[Mapping[str, Any]]) -> int:
        """Number of ``<image>`` markers in the messages."""
        return count_images(messages)

    def tokenize(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        source: str = "",
        num_images: int | None = None,
        truncate: bool = False,
    ) -> tuple[list[int], list[int]]:
        """Tokenize a conversation into ``(tokens, labels)``.

        Args:
            messages: LLaVA (``from``/``value``) or ``role``/``content`` messages.
            add_generation_prompt: end with ``" ASSISTANT:"`` (last turn must be the user's).
            source: record identifier (file, id) named in every error.
            num_images: images the caller will provide; must equal the ``<image>`` count.
            truncate: if the sequence exceeds ``max_seq_len``, cut the end of the last
                answer (its ``</s>`` first) instead of raising. Only the last answer is ever
                cut and at least one of its tokens is kept; anything else raises.

        Returns:
            tokens and labels of equal length; labels are -100 except answer tokens and
            their ``</s>``.
        """
        turns = normalize_messages(messages, source)
        if num_images is not None and num_images != count_images(messages):
            raise ValueError(
                f"{_where(source)}{count_images(messages)} {IMAGE_TOKEN} marker(s) in the "
                f"conversation but {num_images} image(s) given"
            )
        pieces = _template_pieces(turns, add_generation_prompt, source)
        tokens, labels = [self.tokenizer.bos_id], [IGNORE_INDEX]
        run: list[tuple[str, bool]] = []  # text since the last special, awaiting encoding
        for text, trainable in pieces:
            for part in _SPECIALS_RE.split(text):
                if part in (IMAGE_TOKEN, EOS_TEXT):
                    self._flush(run, tokens, labels, source)
                    run = []
                    self._append_special(part, trainable, tokens, labels)
                elif part and run and run[-1][1] == trainable:
                    # One fragment per label kind: a boundary inside the prompt (e.g. between
                    # "q " and "ASSISTANT:") is not a token boundary and must not be checked.
                    run[-1] = (run[-1][0] + part, trainable)
                elif part:
                    run.append((part, trainable))
        self._flush(run, tokens, labels, source)

        last_answer_start = self._last_answer_start(labels) if turns[-1][0] == _ASSISTANT else None
        return self._fit(tokens, labels, last_answer_start, truncate, source)

    def generation_prompt(self, question: str, with_image: bool = True) -> list[int]:
        """Tokens of ``USER: <image>\\n{question} ASSISTANT:`` (after the system prompt)."""
        if IMAGE_TOKEN in question:
            raise ValueError(f"question must not contain {IMAGE_TOKEN}; use with_image=True")
        text = f"{IMAGE_TOKEN}\n{question}" if with_image else question
        messages = [{"from": "human", "value": text}]
        tokens, _ = self.tokenize(messages, add_generation_prompt=True, source="generation prompt")
        return tokens

    # -- helpers

    def _append_special(
        self, marker: str, trainable: bool, tokens: list[int], labels: list[int]
    ) -> None:
        """Append EOS (trained after an answer) or an image block (never trained)."""
        if marker == EOS_TEXT:
            tokens.append(self.tokenizer.eos_id)
            labels.append(self.tokenizer.eos_id if trainable else IGNORE_INDEX)
        else:
            tokens.extend([self.image_token_id] * self.num_image_tokens)
            labels.extend([IGNORE_INDEX] * self.num_image_tokens)

    def _flush(
        self, run: list[tuple[str, bool]], tokens: list[int], labels: list[int], source: str
    ) -> None:
        """Encode one text piece between specials and label the answer part of it.

        The whole piece is encoded at once (one dummy prefix); the answer's token span is
        found by encoding the text before it, which must be a token prefix of the whole.
        SentencePiece never merges across a space, and answers start with one, so this holds.
        """
        if not run:
            return
        ids = self.tokenizer.encode("".join(text for text, _ in run))
        prefix_text, start = "", 0
        for i, (text, trainable) in enumerate(run):
            prefix_text += text
            end = len(ids)
            if i < len(run) - 1:
                prefix_ids = self.tokenizer.encode(prefix_text)
                end = len(prefix_ids)
                if ids[:end] != prefix_ids:
                    raise ValueError(
                        f"{_where(source)}tokenization is not prefix-consistent after "
                        f"{prefix_text[-40:]!r}: cannot locate the answer tokens exactly"
                    )
            tokens.extend(ids[start:end])
            labels.extend(ids[start:end] if trainable else [IGNORE_INDEX] * (end - start))
            start = end

    @staticmethod
    def _last_answer_start(labels: list[int]) -> int:
        """Index of the first label of the final answer (the trailing trainable block)."""
        i = len(labels)
        while i > 0 and labels[i - 1] != IGNORE_INDEX:
            i -= 1
        return i

    def _fit(
        self,
        tokens: list[int],
        labels: list[int],
        last_answer_start: int | None,
        truncate: bool,
        source: str,
    ) -> tuple[list[int], list[int]]:
        """Check the length against ``max_seq_len``; optionally cut the last answer's tail."""
        if self.max_seq_len is None or len(tokens) <= self.max_seq_len:
            return tokens, labels
        n_image = sum(1 for t in tokens if t == self.image_token_id)
        detail = (
            f"{len(tokens)} tokens ({n_image} image placeholders) exceed max_seq_len="
            f"{self.max_seq_len}"
        )
        if not truncate:
            raise ValueError(f"{_where(source)}{detail}")
        if last_answer_start is None or self.max_seq_len <= last_answer_start:
            prompt_len = len(tokens) if last_answer_start is None else last_answer_start
            raise ValueError(
                f"{_where(source)}{detail}, and the prompt alone is {prompt_len} tokens: "
                "truncation may only shorten the last answer"
            )
        # Answers never hold image placeholders, so this cut cannot split an image block.
        return tokens[: self.max_seq_len], labels[: self.max_seq_len]


# ----------------------------------------------------------------------------- images


def load_image(path: str | Path) -> PIL.Image.Image:
    """Open an image file as RGB (alpha dropped, as LLaVA's ``.convert('RGB')``).

    Raises:
        FileNotFoundError: the file does not exist (message names the path).
        ValueError: the file is not a readable image (message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with PIL.Image.open(path) as image:
            image.load()  # decode now: truncated files fail here, not later in a worker
            return image.convert("RGB")
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as err:
        # UnidentifiedImageError is an OSError; some PIL plugins raise SyntaxError.
        raise ValueError(f"Cannot read image file {path}: {err}") from err


def expand_to_square(image: PIL.Image.Image, fill: tuple[int, ...]) -> PIL.Image.Image:
    """Pad to a square canvas of colour ``fill``, image centred (LLaVA's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = PIL.Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Output ``(width, height)`` when resizing the shortest edge to ``size``.

    Same rule as transformers' ``get_resize_output_image_size(default_to_square=False)``:
    the long edge is ``int(size * long / short)``, i.e. rounded down.
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


class LlavaImageTransform:
    """PIL image -> normalized ``float32`` tensor ``[3, size, size]`` for the CLIP tower.

    ``mode="pad"`` (original LLaVA-1.5 and POVID, ``image_aspect_ratio="pad"``): pad to a
    square with the mean colour ``tuple(int(m * 255) for m in mean)`` = (122, 116, 104),
    image centred. ``mode="crop"`` (llava-hf's processor): no padding, so the centre crop
    drops the sides of non-square images. Then the CLIP steps, in the order and arithmetic
    of transformers' ``CLIPImageProcessor`` (PIL path): resize the shortest edge to
    ``size`` with PIL bicubic (long edge rounded down), centre crop with offsets
    ``(dim - size) // 2``, rescale ``uint8 * (1/255)`` in float64 then cast to float32,
    normalize ``(x - mean) / std`` in float32.
    """

    def __init__(
        self,
        mode: str = "pad",
        size: int = 336,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        if mode not in ("pad", "crop"):
            raise ValueError(f"mode must be 'pad' or 'crop', got {mode!r}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.mode = mode
        self.size = size
        self.fill = tuple(int(m * 255) for m in mean)  # LLaVA truncates, not rounds
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        """Preprocess one image; returns ``torch.float32`` of shape ``[3, size, size]``."""
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.mode == "pad":
            image = expand_to_square(image, self.fill)
        image = image.resize(
            shortest_edge_size(*image.size, self.size), resample=PIL.Image.Resampling.BICUBIC
        )
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        top = (pixels.shape[1] - self.size) // 2
        left = (pixels.shape[2] - self.size) // 2
        pixels = pixels[:, top : top + self.size, left : left + self.size]
        # float64 then float32, like transformers' rescale, so results match bit for bit.
        scaled = (pixels.to(torch.float64) * (1 / 255)).to(torch.float32)
        return ((scaled - self._mean) / self._std).contiguous()
