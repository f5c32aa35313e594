"""Recipe ``povid_distort`` (POVID stage 2): the model's own hallucinations on noised images.

For every record of a preference file (stage-1 output) or of plain LLaVA instruction data:

1. distort the record's image with forward-diffusion noise (``noise_step``, 500 by default:
   about ``0.8630 x + 0.5052 eps`` on the [0, 1] image at native resolution, ``clamp`` or
   ``wrap`` back to bytes). The noise is seeded by (record id, ``seed``), so a record's distorted
   image never depends on batching, order or a resume;
2. ask the checkpoint the record's question on the distorted image (batched, greedy by default):
   the chosen conversation without its last answer, the ``<image>`` marker moved to the front
   of the first turn as LLaVA's preprocessing does. For POVID's single-turn data that is the
   first human question;
3. write the record, unchanged, plus ``noise_conversations`` (the chosen conversation with the
   last answer replaced by the model's) and ``povid_meta["stage2"]`` (how it was made), to
   ``${output_dir}/preferences.jsonl``. A rerun skips the ids already written. An empty answer
   (EOS first) is no response: that record keeps no ``noise_conversations`` and its
   ``povid_meta["stage2"]["skipped"]`` says why.

``save_images=true`` also writes each distorted image to ``${distorted_dir}/<id>.png``.

``backend=openai`` asks an OpenAI-compatible server (vLLM, SGLang) instead of loading the
checkpoint: the same distorted image (same seed, noise, overflow), sent as PNG, with the same
question; records that fail for good go to ``${output_dir}/rejects.jsonl``;
``povid_meta["stage2"]`` also names ``backend``, ``model`` and ``base_url``.

Run::

    tune run povid_distort --config povid_distort checkpoint_dir=DIR \\
        data_file=preferences.json image_dir=coco/train2014 output_dir=out/
"""

import hashlib
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import PIL.Image
from omegaconf import DictConfig
from torchtune import utils
from tqdm import tqdm

from povid.answering import LlavaAnswerer, answer_records_via_server
from povid.config import check_choice, parse
from povid_data.distort import OVERFLOW_MODES, distort_image, noise_coefficients, noise_seed
from povid_data.jsonl import ResumableJsonlWriter
from povid_data.records import CHOSEN, NOISE, read_llava_records, resolve_image, with_answer
from povid_data.transforms import IMAGE_TOKEN, load_image

log = utils.get_logger("INFO")


def prompt_turns(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The chosen conversation without its last answer, ``<image>\\n`` leading the first turn.

    LLaVA's own preprocessing moves the marker there (some LLaVA-Instruct questions carry it at
    the end), so the model sees the prompt it was trained on.
    """
    turns = [dict(turn) for turn in record[CHOSEN][:-1]]
    key = "value" if "value" in turns[0] else "content"
    turns[0][key] = f"{IMAGE_TOKEN}\n{turns[0][key].replace(IMAGE_TOKEN, '').strip()}"
    return turns


def image_file_name(record_id: Any) -> str:
    """``<id>.png``, made safe for a file name; an id that had to be changed gets a short hash
    so that two ids never share a file."""
    text = str(record_id)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    if safe != text or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"
    return f"{safe}.png"


class DistortRecipe:
    """Loads a checkpoint once, then writes the noise-triggered answer of every record."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.backend = check_choice(cfg, "backend", ("local", "openai"))
        if cfg.overflow not in OVERFLOW_MODES:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}; got {cfg.overflow!r}")
        noise_coefficients(cfg.noise_step)  # a bad step fails now, not after loading the model
        self.image_dir = Path(cfg.image_dir) if cfg.image_dir else Path(str(cfg.data_file)).parent
        # What povid_meta["stage2"] records: enough to remake every distorted image and answer.
        self.meta = {
            "checkpoint": str(cfg.checkpoint_dir) if self.backend == "local" else None,
            "step": int(cfg.noise_step),
            "seed": int(cfg.seed),
            "overflow": str(cfg.overflow),
            "image_mode": str(cfg.image_mode),
            "max_new_tokens": int(cfg.max_new_tokens),
            "temperature": float(cfg.temperature),
            "top_p": float(cfg.top_p),
            "top_k": None if cfg.top_k is None else int(cfg.top_k),
        }

    def setup(self) -> None:
        """Load model, tokenizer and transforms (nothing to load for a server)."""
        self.answerer = LlavaAnswerer.from_config(self.cfg) if self.backend == "local" else None

    def image_path(self, record: Dict[str, Any], source: str) -> Path:
        """The record's image file; an error naming file, id and field if absent."""
        path = resolve_image(record, self.image_dir, source)
        if path is None:
            raise ValueError(
                f"{source}: record id={record['id']!r}: field 'image' is missing: stage 2 distorts "
                "the record's image (drop text-only records first)"
            )
        return path

    def distorted_image(self, record: Dict[str, Any], source: str) -> PIL.Image.Image:
        """The record's image with its own reproducible noise (id + seed)."""
        where = f"{source}: record id={record['id']!r}: field 'image'"
        path = self.image_path(record, source)
        try:
            image = load_image(path)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None
        seed = noise_seed(record["id"], self.cfg.seed)
        return distort_image(image, self.cfg.noise_step, seed=seed, overflow=self.cfg.overflow)

    def process(
        self, batch: List[Dict[str, Any]], source: str
    ) -> Tuple[List[Dict[str, Any]], List[PIL.Image.Image]]:
        """Output records and distorted images for a batch of input records."""
        images = [self.distorted_image(record, source) for record in batch]
        wheres = [f"{source}: record id={record['id']!r}: field {CHOSEN!r}" for record in batch]
        answers = self.answerer.answer([prompt_turns(r) for r in batch], images, wheres)
        return [self.output_record(record, answer, source) for record, answer in zip(batch, answers)], images

    def output_record(
        self, record: Dict[str, Any], answer: str, source: str, backend: Optional[Dict[str, Any]] = None
    ) -> Dict[str, Any]:
        """The record plus its noise conversation and ``povid_meta["stage2"]`` (with
        ``backend``'s fields: backend, model, base_url for a server)."""
        out = dict(record)
        meta = dict(record.get("povid_meta") or {})
        meta["stage2"] = {**self.meta, **(backend or {})}
        if answer:
            out[NOISE] = with_answer(record, answer)
        else:
            # An empty answer (EOS first) is no response: a record with an empty gpt turn
            # would fail validation downstream. Keep the record, without the noise branch.
            out.pop(NOISE, None)
            meta["stage2"]["skipped"] = "empty answer"
            log.warning(f"{source}: record id={record['id']!r}: empty answer on the distorted image; no {NOISE}")
        out["povid_meta"] = meta
        return out

    def run(self) -> Path:
        """Distort and answer every record not yet in ``output_file``. Returns the output path."""
        cfg = self.cfg
        records, source = read_llava_records(cfg.data_file)
        out_path = Path(cfg.output_file)
        if out_path.resolve() == Path(str(cfg.data_file)).resolve():
            raise ValueError(f"output_file {out_path} is the data_file: choose another output_dir")
        image_out = Path(cfg.distorted_dir) if cfg.save_images else None
        if image_out is not None:
            image_out.mkdir(parents=True, exist_ok=True)
        if self.backend == "openai":
            return self._run_on_server(records, source, image_out)
        with ResumableJsonlWriter(out_path) as writer:
            todo = list(writer.pending(records))
            if len(todo) < len(records):
                log.info(f"Resuming: {len(records) - len(todo)} of {len(records)} already in {out_path}")
            for record in todo:  # a missing image stops the run before any generation
                self.image_path(record, source)
            with tqdm(total=len(records), initial=len(records) - len(todo), desc="distort") as bar:
                for i in range(0, len(todo), cfg.batch_size):
                    batch = todo[i : i + cfg.batch_size]
                    outputs, images = self.process(batch, source)
                    if image_out is not None:
                        # Images first: a record in the output implies its image is on disk.
                        for record, image in zip(batch, images):
                            image.save(image_out / image_file_name(record["id"]))
                    writer.write(outputs)
                    bar.update(len(batch))
        log.info(f"Wrote {out_path}")
        return out_path

    def _run_on_server(self, records: List[Dict[str, Any]], source: str, image_out) -> Path:
        for record in records:  # a missing image stops the run before any request
            self.image_path(record, source)

        def prepare(record: Dict[str, Any]):
            image = self.distorted_image(record, source)
            if image_out is not None:  # before the request: a record in the output has its image
                image.save(image_out / image_file_name(record["id"]))
            return prompt_turns(record), image

        answer_records_via_server(
            self.cfg, records, output_file=self.cfg.output_file, rejects_file=self.cfg.rejects_file,
            desc="povid_distort", prepare=prepare,
            make_output=lambda record, answer, backend: self.output_record(record, answer, source, backend),
            greedy=False,
        )  # fmt: skip
        return Path(self.cfg.output_file)

    def cleanup(self) -> None:
        """Free the model."""
        self.answerer = None


@parse
def main(cfg: DictConfig) -> None:
    """Entry point for ``tune run povid_distort --config povid_distort``."""
    recipe = DistortRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(main())
