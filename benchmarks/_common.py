"""Shared pieces of the benchmarks: the benchmark model, its checkpoint, tokenizer and data.

Everything is made here from random weights, nothing is downloaded:

- a LLaVA-1.5-shaped model built with transformers (``LlavaForConditionalGeneration``, random
  init), written with ``save_pretrained``; povid_dpo reads it through ``LlavaCheckpointer``
  (converting to torchtune keys), TRL through ``from_pretrained``: both train the same weights;
- a SentencePiece ``tokenizer.model`` trained in-process on caption-like text (the model keeps
  Llama's 32064-row vocabulary, so the output head costs what it costs in LLaVA-1.5), plus the
  transformers tokenizer/processor files TRL needs;
- a POVID preference file (chosen, text-rejected and noise answers) over drawn images.

Rows are truncated to exactly ``seq_len`` tokens on both sides (``max_seq_len`` in povid_dpo,
``max_length`` in TRL), so the two frameworks see the same sequence lengths.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = Path(os.environ.get("POVID_BENCH_DIR", "/tmp/povid_bench"))


@dataclass(frozen=True)
class BenchModel:
    """Shape of the benchmark LLaVA (LLaVA-1.5 structure, smaller widths/depths)."""

    embed_dim: int = 640
    num_layers: int = 10
    num_heads: int = 10
    intermediate_dim: int = 1728
    vocab_size: int = 32064
    vision_embed_dim: int = 384
    vision_num_layers: int = 5  # 4 run (feature layer -2), like CLIP-L's 23 of 24
    vision_num_heads: int = 6
    vision_intermediate_dim: int = 1536
    image_size: int = 112
    patch_size: int = 14

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# ~100 M parameters (41 M of them the 32064-row embedding and output head): the default.
# "tiny" is a smoke-test size; "medium" ~200 M for a longer run.
PRESETS: Dict[str, BenchModel] = {
    "tiny": BenchModel(embed_dim=256, num_layers=2, num_heads=4, intermediate_dim=688,
                       vision_embed_dim=128, vision_num_layers=3, vision_num_heads=2,
                       vision_intermediate_dim=512),
    "small": BenchModel(),
    "medium": BenchModel(embed_dim=1024, num_layers=12, num_heads=16, intermediate_dim=2752,
                         vision_embed_dim=512, vision_num_layers=7, vision_num_heads=8,
                         vision_intermediate_dim=2048, image_size=224),
    # LLaVA-1.5's token shapes (336 px in 14 px patches: 576 image tokens, ~630-token prompts)
    # on a model narrow enough for 2 CPU cores: the sequence structure is the real one, the
    # widths are not. Use it with --answer-tokens 150 250 (the answers of LLaVA-style data).
    "llava_shapes": BenchModel(embed_dim=256, num_layers=4, num_heads=4, intermediate_dim=688,
                               vision_embed_dim=128, vision_num_layers=3, vision_num_heads=2,
                               vision_intermediate_dim=512, image_size=336),
}  # fmt: skip

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
QUESTION = "Describe this image in detail."
_COLOURS = ["red", "green", "blue", "yellow", "purple", "white", "black", "orange", "brown", "gray"]
_OBJECTS = ["circle", "square", "triangle", "cup", "dog", "cat", "car", "tree", "person", "chair",
            "table", "bus", "bench", "kite", "clock", "bird", "horse", "plate", "pizza", "boat"]
_PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle",
           "next to the window", "under the table", "near the water", "on the grass"]
_VERBS = ["is sitting", "is standing", "is lying", "is parked", "is resting", "is waiting"]


def _sentence(rng: random.Random) -> str:
    c, o, p, v = rng.choice(_COLOURS), rng.choice(_OBJECTS), rng.choice(_PLACES), rng.choice(_VERBS)
    k = rng.randint(1, 9)
    return f"A {c} {o} {v} {p}, and there are {k} {rng.choice(_OBJECTS)}s close to it."


def _answer(rng: random.Random, n_sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(n_sentences))


def peak_rss_gb() -> float:
    """Peak resident set size of this process (reset by :func:`reset_peak_rss`)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def rss_gb() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def model_config(spec: BenchModel, text_vocab: int):
    """transformers ``LlavaConfig`` for ``spec`` (llava-hf conventions, image id = text vocab)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_embed_dim, intermediate_size=spec.vision_intermediate_dim,
        num_hidden_layers=spec.vision_num_layers, num_attention_heads=spec.vision_num_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=spec.vision_embed_dim,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.embed_dim,
        intermediate_size=spec.intermediate_dim, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=text_vocab + 1,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=text_vocab,
        image_seq_length=spec.num_image_tokens, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        multimodal_projector_bias=True, tie_word_embeddings=False,
    )  # fmt: skip


def _write_checkpoint(directory: Path, spec: BenchModel, seed: int) -> None:
    """tokenizer.model, a random transformers LLaVA (save_pretrained) and its processor."""
    import torch
    from transformers import CLIPImageProcessor, LlamaTokenizerFast, LlavaForConditionalGeneration
    from transformers import LlavaProcessor

    from povid_data.tokenizer import LlavaTokenizer, train_sentencepiece

    rng = random.Random(seed)
    corpus = [SYSTEM, f"USER: {QUESTION} ASSISTANT:"] + [_sentence(rng) for _ in range(3000)]
    train_sentencepiece(directory, corpus, vocab_size=1000, seed=seed)
    text_vocab = LlavaTokenizer.from_dir(directory).vocab_size

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(model_config(spec, text_vocab)).to(torch.float32)
    model.save_pretrained(directory)  # layout C; povid's checkpointer converts it on load
    del model

    tokenizer = LlamaTokenizerFast.from_pretrained(
        str(directory), legacy=True, add_bos_token=False, from_slow=True
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.convert_tokens_to_ids("<image>") == text_vocab
    assert tokenizer.pad_token_id == text_vocab + 1
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True, do_normalize=True, do_resize=True, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    processor.save_pretrained(directory)
    # save_pretrained may rewrite tokenizer.model; povid reads it, so make sure it stays ours.


def _write_images(directory: Path, n: int, seed: int) -> List[str]:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    names = []
    for i in range(n):
        image = Image.new("RGB", (320, 240), rng.choice(["white", "lightgray", "beige"]))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x, y = rng.randint(0, 260), rng.randint(0, 180)
            box = (x, y, x + rng.randint(20, 60), y + rng.randint(20, 60))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=rng.choice(_COLOURS))
        names.append(f"img{i}.png")
        image.save(directory / names[-1])
    return names


def _answer_of_tokens(rng: random.Random, tokenizer, target: int) -> str:
    """Sentences up to ``target`` tokens (cut at a word boundary: within a few tokens of it)."""
    words: List[str] = []
    while len(tokenizer.encode(" ".join(words))) < target:
        words += _sentence(rng).split()
    while len(tokenizer.encode(" ".join(words))) > target:
        words.pop()
    return " ".join(words)


def _write_records(
    directory: Path, images: List[str], answer_sentences: int, seed: int,
    answer_tokens: Optional[Tuple[int, int]] = None, tokenizer=None,
) -> Path:
    """Preference records; ``answer_tokens`` (lo, hi): each answer drawn to a length in that
    range instead of ``answer_sentences`` sentences."""
    rng = random.Random(seed + 1)

    def answer() -> str:
        if answer_tokens is None:
            return _answer(rng, answer_sentences)
        return _answer_of_tokens(rng, tokenizer, rng.randint(*answer_tokens))

    def turns(answer: str) -> list:
        return [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}]

    records = []
    for i, image in enumerate(images):
        records.append({
            "id": f"b{i}",
            "image": image,
            "conversations": turns(answer()),
            "rejected_conversations": turns(answer()),
            "noise_conversations": turns(answer()),
        })  # fmt: skip
    path = directory / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class Workspace:
    """Paths of a prepared benchmark workspace."""

    root: Path
    checkpoint_dir: Path
    data_file: Path
    image_dir: Path
    spec: BenchModel
    n_records: int


def prepare_workspace(
    spec: BenchModel, *, seq_len: int, n_records: int, seed: int = 0, workdir: Path = DEFAULT_WORKDIR,
    answer_tokens: Optional[Tuple[int, int]] = None,
) -> Workspace:
    """Make (or reuse) the checkpoint, images and preference data for one setting.

    Answers are made long enough that every row is cut to exactly ``seq_len`` tokens, or with
    ``answer_tokens`` (lo, hi) drawn to a length in that range (``seq_len`` is then only a cap).
    """
    key = hashlib.sha256(json.dumps([asdict(spec), seed]).encode()).hexdigest()[:12]
    ckpt = workdir / f"model_{key}"
    if not (ckpt / "config.json").exists() or not (ckpt / "processor_config.json").exists():
        ckpt.mkdir(parents=True, exist_ok=True)
        _write_checkpoint(ckpt, spec, seed)
    # ~24 tokens per sentence; leave a margin so truncation, not the answer, sets the length.
    answer_budget = max(seq_len - spec.num_image_tokens - 40, 8)
    sentences = answer_budget // 20 + 2
    lengths = "" if answer_tokens is None else f"_a{answer_tokens[0]}-{answer_tokens[1]}"
    data_dir = workdir / f"data_{key}_{seq_len}_{n_records}{lengths}"
    data_file = data_dir / "preferences.jsonl"
    if not data_file.exists():
        from povid_data.tokenizer import LlavaTokenizer

        data_dir.mkdir(parents=True, exist_ok=True)
        images = _write_images(data_dir, n_records, seed)
        _write_records(data_dir, images, sentences, seed, answer_tokens, LlavaTokenizer.from_dir(ckpt))
    return Workspace(workdir, ckpt, data_file, data_dir, spec, n_records)


def prompt_tokens(tokenizer, num_image_tokens: int) -> int:
    """Tokens of the benchmark's prompt as povid_dpo's vicuna_v1 transform builds it: BOS, the
    image placeholders, the system prompt and the describe question."""
    return 1 + num_image_tokens + len(tokenizer.encode(f"{SYSTEM} USER: \n{QUESTION} ASSISTANT:"))


def mean_row_tokens(ws: "Workspace", n: int) -> float:
    """Mean tokens of a chosen/rejected row over the first ``n`` records (prompt with its image
    placeholders, answer, ``</s>``), as povid_dpo's vicuna_v1 transform builds it."""
    from povid_data.tokenizer import LlavaTokenizer

    tokenizer = LlavaTokenizer.from_dir(ws.checkpoint_dir)
    prompt = prompt_tokens(tokenizer, ws.spec.num_image_tokens)
    lengths = []
    for line in ws.data_file.read_text().splitlines()[:n]:
        record = json.loads(line)
        for key in ("conversations", "rejected_conversations"):
            lengths.append(prompt + len(tokenizer.encode(record[key][1]["value"])) + 1)
    return sum(lengths) / len(lengths)


def spec_from_args(preset: str, overrides: Dict[str, int]) -> BenchModel:
    """A preset with field overrides (``--set embed_dim=512``)."""
    return replace(PRESETS[preset], **overrides)


def parse_overrides(items: List[str]) -> Dict[str, int]:
    out = {}
    for item in items or []:
        key, value = item.split("=", 1)
        out[key] = int(value)
    return out


def count_parameters(spec: BenchModel) -> int:
    """Parameters of the benchmark model (built on the meta device, as povid builds it)."""
    import torch

    from povid.model import llava_1_5

    args = llava_args(spec)
    with torch.device("meta"):
        model = llava_1_5(args)
    return sum(p.numel() for p in model.parameters())


def llava_args(spec: BenchModel, text_vocab: int = 1000):
    """povid ``LlavaArgs`` equivalent to ``spec``."""
    from povid.model import LlavaArgs

    return LlavaArgs(
        vocab_size=spec.vocab_size, embed_dim=spec.embed_dim, num_layers=spec.num_layers,
        num_heads=spec.num_heads, num_kv_heads=spec.num_heads, intermediate_dim=spec.intermediate_dim,
        max_seq_len=4096, vision_embed_dim=spec.vision_embed_dim,
        vision_num_layers=spec.vision_num_layers, vision_num_heads=spec.vision_num_heads,
        vision_intermediate_dim=spec.vision_intermediate_dim, image_size=spec.image_size,
        patch_size=spec.patch_size, image_token_id=text_vocab, pad_token_id=text_vocab + 1,
    )  # fmt: skip


def run_worker(worker_args: List[str], *, env: Dict[str, str] | None = None) -> dict:
    """Run ``_worker.py`` in a fresh process and return its RESULT (raises with its log)."""
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(__file__).with_name("_worker.py")), *worker_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + "\n" + proc.stderr[-4000:])
        raise RuntimeError(f"benchmark worker failed: {' '.join(cmd)}")
    return json.loads(lines[-1][len("RESULT ") :])


def step_s(result: dict, clock: str) -> float:
    """Median step time of a worker result from CPU time (``cpu``) or wall time (``wall``)."""
    times = result["cpu_s_all"] if clock == "cpu" else result["step_s_all"]
    return sorted(times)[len(times) // 2]


def print_table(head: List[str], lines: List[List[str]], markdown: bool = False) -> None:
    """A plain or Markdown table."""
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for line in lines:
            print("| " + " | ".join(str(x) for x in line) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for line in lines:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
