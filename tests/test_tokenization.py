"""Tokenizer and prompt tokenization: parity with the original LLaVA rule.

The reference is LLaVA's ``tokenizer_image_token`` (re-implemented below) run on
transformers' Llama tokenizers built from the same ``tokenizer.model``, and, so that the tests
do not hinge on a transformers version, on raw ``sentencepiece`` directly.

transformers 5.x facts these tests rely on (checked with 5.23):
- ``LlamaTokenizer`` is the Rust ``tokenizers`` one (``LlamaTokenizerFast`` is an alias). Built
  from a bare ``tokenizer.model`` it adds no BOS unless ``add_bos_token=True``. Its default
  ``legacy=False`` drops the dummy prefix of text that follows ``</s>`` (``USER`` instead of
  ``▁USER``); ``legacy=True`` restores the slow behaviour, except for a text piece that itself
  starts with a space, where SentencePiece prepends a second ``▁`` and the Metaspace
  pre-tokenizer does not.
- The slow SentencePiece tokenizer lives on as ``SentencePieceBackend``; with ``legacy=True`` it
  is the tokenizer LLaVA-1.5 used. With ``legacy=False`` it strips the dummy prefix from the
  first word after ``<s>`` (the quirk DESIGN.md warns about).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import sentencepiece as spm

from povid_data.tokenizer import LlavaTokenizer, train_sentencepiece
from povid_data.transforms import (
    IGNORE_INDEX,
    VICUNA_V1_SYSTEM,
    LlavaMessageTransform,
    build_vicuna_prompt,
)

try:  # pytest puts tests/ on sys.path (rootdir-relative import if tests/ becomes a package)
    from _tiny_tokenizer import make_tiny_tokenizer, tiny_corpus
except ImportError:  # pragma: no cover
    from tests._tiny_tokenizer import make_tiny_tokenizer, tiny_corpus

IMAGE_ID = -200  # original LLaVA's IMAGE_TOKEN_INDEX
N_IMAGE = 4  # placeholders per image; 576 in LLaVA-1.5, small here to keep lists readable


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_tok")
    make_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tok(model_dir) -> LlavaTokenizer:
    return LlavaTokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def sp(model_dir) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def transform(tok) -> LlavaMessageTransform:
    return LlavaMessageTransform(tok, IMAGE_ID, N_IMAGE, max_seq_len=None)


@pytest.fixture(scope="module")
def hf_slow(model_dir):
    """transformers' slow SentencePiece Llama tokenizer in legacy mode (what LLaVA-1.5 used)."""
    transformers = pytest.importorskip("transformers")
    model_file = str(model_dir / "tokenizer.model")
    try:
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    except ImportError:  # transformers 4.x: the slow class is still LlamaTokenizer
        return transformers.LlamaTokenizer(vocab_file=model_file, legacy=True)
    return SentencePieceBackend(
        vocab_file=model_file,
        legacy=True,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        special_tokens_pattern="bos",  # prepend <s> like LlamaTokenizer(add_bos_token=True)
    )


@pytest.fixture(scope="module")
def hf_fast(model_dir):
    """transformers' tokenizers-based Llama tokenizer with the settings closest to the slow one
    (``legacy=True`` keeps the dummy prefix after ``</s>``; BOS must be asked for)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")  # needed to convert tokenizer.model
    return transformers.LlamaTokenizerFast.from_pretrained(
        str(model_dir), legacy=True, add_bos_token=True, from_slow=True
    )


@pytest.fixture(scope="module")
def hf_fast_prepend(hf_fast):
    """``hf_fast`` with transformers 4.x's legacy fast pipeline: an always-prepend ``▁``
    normalizer instead of the Metaspace pre-tokenizer (which skips the dummy prefix when a
    piece already starts with a space). This one equals the slow tokenizer everywhere."""
    normalizers = pytest.importorskip("tokenizers.normalizers")
    fixed = copy.deepcopy(hf_fast)
    fixed.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    fixed.backend_tokenizer.pre_tokenizer = None
    return fixed


# ----------------------------------------------------------------------------- reference


def llava_tokenizer_image_token(prompt: str, hf_tok, image_id: int = IMAGE_ID) -> list[int]:
    """LLaVA's rule, in our words: tokenize each ``<image>``-free chunk with the HF tokenizer,
    keep only the first chunk's BOS, put ``N_IMAGE`` image ids between chunks."""
    chunks = [hf_tok(chunk).input_ids for chunk in prompt.split("<image>")]
    bos = hf_tok.bos_token_id
    assert all(chunk[:1] == [bos] for chunk in chunks)
    ids = [bos]
    for i, chunk in enumerate(chunks):
        if i:
            ids += [image_id] * N_IMAGE
        ids += chunk[1:]
    return ids


def llava_v1_labels(prompt: str, hf_tok) -> list[int]:
    """LLaVA's ``preprocess_v1`` label masking (legacy tokenizer): per round split at
    ``" ASSISTANT: "``, mask the instruction (its length minus BOS and the trailing lone ``▁``),
    keep the answer; the BOS of each round's tokenization stands for the ``</s>`` before it."""
    ids = llava_tokenizer_image_token(prompt, hf_tok)
    labels = list(ids)
    sep = " ASSISTANT: "
    labels[0] = IGNORE_INDEX
    cur = 1
    for rnd in prompt.split("</s>"):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len = len(llava_tokenizer_image_token(rnd, hf_tok))
        instruction_len = len(llava_tokenizer_image_token(parts[0] + sep, hf_tok)) - 2
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    assert cur == len(ids), "LLaVA would report a tokenization mismatch"
    return labels


def turn(role: str, text: str) -> dict:
    return {"from": role, "value": text}


SINGLE = [
    turn("human", "<image>\nDescribe this image in detail."),
    turn("gpt", "The image shows a cat on a red chair, next to a wooden table."),
]
MULTI = [
    turn("human", "<image>\nWhat is in the picture?"),
    turn("gpt", "Two people holding umbrellas."),
    turn("human", "What color is the car?"),
    turn("gpt", "The car is blue.\nIt is parked on the left."),
    turn("human", "How many?"),
    turn("gpt", "There are 12 cats, café 日本!"),
]
IMAGE_LAST = [turn("human", "What is this?\n<image>"), turn("gpt", "A dog.")]
TWO_IMAGES = [
    turn("human", "<image>\nCompare with <image> please."),
    turn("gpt", "The second one has a bus."),
]
TEXT_ONLY = [turn("human", "Hello there"), turn("gpt", "Hi!")]
CONVERSATIONS = {
    "single": SINGLE,
    "multi": MULTI,
    "image_last": IMAGE_LAST,
    "two_images": TWO_IMAGES,
    "text_only": TEXT_ONLY,
}


# ----------------------------------------------------------------------------- tokenizer


def test_trained_model_is_llama_style(tok, sp):
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.vocab_size == sp.get_piece_size()
    # <image> is not a piece: it must be spliced by the message transform
    assert sp.piece_to_id("<image>") == sp.unk_id()
    assert len(tok.encode("<image>")) > 1
    # byte fallback: anything encodes without <unk> and round-trips
    text = "Café 日本 ✓ {x}\t\n"
    ids = tok.encode(text)
    assert sp.unk_id() not in ids
    assert tok.decode(ids) == text
    # dummy prefix
    assert sp.id_to_piece(tok.encode("cat")[0]).startswith("▁")


def test_training_is_deterministic_and_fast(tmp_path):
    corpus = tiny_corpus()
    start = time.perf_counter()
    first = train_sentencepiece(tmp_path / "a", corpus, vocab_size=480, seed=0)
    elapsed = time.perf_counter() - start
    second = train_sentencepiece(tmp_path / "b" / "custom.model", corpus, vocab_size=480, seed=0)
    assert first == tmp_path / "a" / "tokenizer.model"
    assert second.name == "custom.model"
    assert first.read_bytes() == second.read_bytes()
    assert elapsed < 2.0


def test_encode_decode(tok, sp):
    ids = tok.encode("a cat", add_bos=True, add_eos=True)
    assert ids == [1, *sp.encode("a cat"), 2]
    # placeholders (llava-hf 32000, original -200, out-of-vocab) and bos/eos are skipped
    noisy = [1, IMAGE_ID, 32000, tok.vocab_size, *sp.encode("a cat"), 2]
    assert tok.decode(noisy) == "a cat"


def test_from_dir_missing_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.model")):
        LlavaTokenizer.from_dir(tmp_path)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_tokens_match_llava_with_hf_tokenizers(
    name, gen, transform, hf_slow, hf_fast, hf_fast_prepend
):
    messages = CONVERSATIONS[name]
    if gen:  # drop the last answer and ask for it
        messages = messages[:-1]
    prompt = build_vicuna_prompt(messages, add_generation_prompt=gen)
    tokens, _ = transform.tokenize(messages, add_generation_prompt=gen)
    assert tokens == llava_tokenizer_image_token(prompt, hf_slow)
    assert tokens == llava_tokenizer_image_token(prompt, hf_fast_prepend)
    if not any(chunk.startswith(" ") for chunk in prompt.split("<image>")):
        # stock fast tokenizer: equal unless a chunk starts with a space (image mid-text or
        # last, e.g. "...\n<image> ASSISTANT:"), where it emits one "▁" instead of two
        assert tokens == llava_tokenizer_image_token(prompt, hf_fast)


def test_tokens_match_raw_sentencepiece(transform, sp):
    """The rule itself, spelled out with SentencePiece: each text piece between <image>/</s>
    encoded on its own (own dummy prefix), one BOS, EOS ids, image blocks."""
    tokens, _ = transform.tokenize(MULTI)
    img = [IMAGE_ID] * N_IMAGE
    expected = (
        [1]
        + sp.encode(f"{VICUNA_V1_SYSTEM} USER: ")
        + img
        + sp.encode("\nWhat is in the picture? ASSISTANT: Two people holding umbrellas.")
        + [2]
        + sp.encode(
            "USER: What color is the car? ASSISTANT: The car is blue.\nIt is parked on the left."
        )
        + [2]
        + sp.encode("USER: How many? ASSISTANT: There are 12 cats, café 日本!")
        + [2]
    )
    assert tokens == expected
    # the chunk after an image starts with SentencePiece's dummy prefix (Llama: lone "▁" 29871)
    first_after_image = tokens[tokens.index(IMAGE_ID) + N_IMAGE]
    assert sp.id_to_piece(first_after_image).startswith("▁")
    # and "USER" after </s> keeps it too (legacy rule; transformers' legacy=False drops it)
    first_after_eos = tokens[tokens.index(2) + 1]
    assert sp.id_to_piece(first_after_eos) == "▁USER"


def test_chunk_starting_with_space(transform, sp, hf_slow):
    """``"<image> What"``: SentencePiece gives the chunk two ``▁`` (dummy prefix + space); the
    legacy slow tokenizer agrees. (transformers 5's fast tokenizer keeps one: not compared.)"""
    messages = [turn("human", "<image> What is it?"), turn("gpt", "A cat.")]
    tokens, _ = transform.tokenize(messages)
    prompt = build_vicuna_prompt(messages)
    assert tokens == llava_tokenizer_image_token(prompt, hf_slow)
    start = tokens.index(IMAGE_ID) + N_IMAGE
    assert tokens[start:] == sp.encode(" What is it? ASSISTANT: A cat.") + [2]


def test_role_content_messages_equal_llava_format(transform):
    as_roles = [
        {"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]}
        for m in MULTI
    ]
    assert transform.tokenize(as_roles) == transform.tokenize(MULTI)


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_labels_match_llava_masking(name, transform, hf_slow):
    messages = CONVERSATIONS[name]
    tokens, labels = transform.tokenize(messages)
    assert len(labels) == len(tokens)
    assert labels == llava_v1_labels(build_vicuna_prompt(messages), hf_slow)


def _unmasked_spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_only_answers_and_their_eos_are_labelled(messages, transform, sp):
    tokens, labels = transform.tokenize(messages)
    answers = [m["value"] for m in messages if m["from"] == "gpt"]
    spans = _unmasked_spans(labels)
    assert len(spans) == len(answers)
    for (start, end), answer in zip(spans, answers):
        # " answer" after "ASSISTANT:" tokenizes like the answer with its dummy prefix
        assert tokens[start:end] == sp.encode(answer) + [2]
        assert labels[start:end] == tokens[start:end]
    assert IMAGE_ID not in [label for label in labels]


def test_training_sequence_extends_generation_prompt(transform, sp):
    prompt = transform.generation_prompt("Describe this image in detail.")
    tokens, labels = transform.tokenize(SINGLE)
    assert tokens[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in labels[: len(prompt)])
    assert tokens[len(prompt) :] == sp.encode(SINGLE[1]["value"]) + [2]


def test_generation_prompt(transform, tok, sp):
    prompt = transform.generation_prompt("What is this?")
    # ends in the tokens of " ASSISTANT:" (in context: the dummy-prefixed "ASSISTANT:")
    tail = sp.encode("ASSISTANT:")
    assert prompt[-len(tail) :] == tail
    assert tok.decode(prompt).endswith("What is this? ASSISTANT:")
    assert prompt.count(IMAGE_ID) == N_IMAGE
    assert prompt == transform.tokenize(
        [turn("human", "<image>\nWhat is this?")], add_generation_prompt=True
    )[0]
    assert IMAGE_ID not in transform.generation_prompt("What is this?", with_image=False)


def test_image_block_size_and_id(tok):
    transform = LlavaMessageTransform(
        tok, image_token_id=32000, num_image_tokens=576, max_seq_len=None
    )
    tokens, labels = transform.tokenize(TWO_IMAGES)
    assert tokens.count(32000) == 2 * 576
    assert all(l == IGNORE_INDEX for t, l in zip(tokens, labels) if t == 32000)


# ----------------------------------------------------------------------------- errors


def test_image_count_mismatch_names_source(transform):
    assert transform.count_images(TWO_IMAGES) == 2
    transform.tokenize(TWO_IMAGES, num_images=2)  # fine
    with pytest.raises(ValueError, match=r"train\.json#17.*2 <image>.*1 image"):
        transform.tokenize(TWO_IMAGES, num_images=1, source="train.json#17")


def test_too_long_names_source_and_lengths(tok):
    full, _ = LlavaMessageTransform(tok, IMAGE_ID, N_IMAGE, None).tokenize(SINGLE)
    short = LlavaMessageTransform(tok, IMAGE_ID, N_IMAGE, max_seq_len=len(full) - 1)
    expected = rf"rec-3.*{len(full)} tokens.*max_seq_len={len(full) - 1}"
    with pytest.raises(ValueError, match=expected):
        short.tokenize(SINGLE, source="rec-3")


def test_truncate_cuts_only_the_last_answer(tok):
    full_tokens, full_labels = LlavaMessageTransform(tok, IMAGE_ID, N_IMAGE, None).tokenize(MULTI)
    answer_start = _unmasked_spans(full_labels)[-1][0]

    for limit in (len(full_tokens) - 3, answer_start + 1):
        cut = LlavaMessageTransform(tok, IMAGE_ID, N_IMAGE, max_seq_len=limit)
        tokens, labels = cut.tokenize(MULTI, truncate=True)
        assert tokens == full_tokens[:limit] and labels == full_labels[:limit]
        assert labels[-1] != IGNORE_INDEX  # at least one answer token kept

    no_answer_left = LlavaMessageTransform(tok, IMAGE_ID, N_IMAGE, max_seq_len=answer_start)
    with pytest.raises(ValueError, match="rec-9.*only shorten the last answer"):
        no_answer_left.tokenize(MULTI, truncate=True, source="rec-9")


def test_truncate_never_cuts_an_image_block(tok):
    prompt = LlavaMessageTransform(tok, IMAGE_ID, N_IMAGE, None).generation_prompt("Hi")
    inside_image = prompt.index(IMAGE_ID) + 2
    cut = LlavaMessageTransform(tok, IMAGE_ID, N_IMAGE, max_seq_len=inside_image)
    with pytest.raises(ValueError, match="gen-1"):
        cut.tokenize(
            [turn("human", "<image>\nHi")],
            add_generation_prompt=True,
            truncate=True,
            source="gen-1",
        )
    with pytest.raises(ValueError, match="rec-2"):
        cut.tokenize(SINGLE, truncate=True, source="rec-2")


def test_bad_conversations(transform, tok):
    with pytest.raises(ValueError, match="r1.*expected a user turn"):
        transform.tokenize([turn("gpt", "hi")], source="r1")
    with pytest.raises(ValueError, match="unknown role"):
        transform.tokenize([turn("robot", "hi")])
    with pytest.raises(ValueError, match="empty assistant answer"):
        transform.tokenize([turn("human", "hi"), turn("gpt", "")])
    with pytest.raises(ValueError, match="generation prompt needs a final user turn"):
        transform.tokenize(SINGLE, add_generation_prompt=True)
    with pytest.raises(ValueError, match="collides"):
        LlavaMessageTransform(tok, image_token_id=5, num_image_tokens=1, max_seq_len=None)
