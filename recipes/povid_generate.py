"""Recipe ``povid_generate``: answer images with a LLaVA-1.5 checkpoint.

Two modes, chosen by the config:

- ``image=IMG prompt="..."``: answer one image, print the answer;
- ``data_file=records.jsonl``: answer every record (``id``, ``image``, ``prompt``) in batches
  with a KV cache, appending ``{"id", "image", "prompt", "response"}`` lines to
  ``${output_dir}/generations.jsonl``. A rerun skips the ids already there, so a crashed run
  resumes where it stopped.

Run::

    tune run povid_generate --config llava_generate checkpoint_dir=DIR image=IMG \\
        prompt="Describe this image in detail."

Any layout of LLaVA-1.5 checkpoint loads (llava-hf, transformers in-memory names, original
LLaVA with ``clip_dir=``); weight-only int8/int4 quantization with ``quantization=``.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig
from torchtune import utils
from tqdm import tqdm

from povid.answering import LlavaAnswerer, question_turns
from povid.config import parse
from povid_data.jsonl import ResumableJsonlWriter, read_records, require_field
from povid_data.transforms import load_image

log = utils.get_logger("INFO")


class GenerateRecipe:
    """Loads a checkpoint once, then answers a single image or a file of records."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        """Load model, tokenizer and transforms (the answerer shared with other recipes)."""
        self.answerer = LlavaAnswerer.from_config(self.cfg)

    def answer(self, batch: List[Dict[str, Any]], source: str) -> List[str]:
        """Answers for records with ``image`` (a path) and ``prompt``."""
        wheres = [f"{source}: record id={record['id']!r}" for record in batch]
        images = []
        for record, where in zip(batch, wheres):
            try:
                images.append(load_image(record["image"]))
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{where}: field 'image': {e}") from None
        turns = [question_turns(record["prompt"]) for record in batch]
        return self.answerer.answer(turns, images, wheres)

    def run_single(self) -> str:
        """Answer ``cfg.image`` with ``cfg.prompt`` and print the answer."""
        record = {"id": "single", "image": self.cfg.image, "prompt": self.cfg.prompt}
        response = self.answer([record], source="image=")[0]
        print(response)
        return response

    def run_file(self) -> Path:
        """Answer every record of ``cfg.data_file``; resumable. Returns the output path."""
        cfg = self.cfg
        records = self._load_records(cfg.data_file)
        out_path = Path(cfg.output_file)
        with ResumableJsonlWriter(out_path) as writer:
            todo = list(writer.pending(records))
            if len(todo) < len(records):
                log.info(f"Resuming: {len(records) - len(todo)} of {len(records)} already in {out_path}")
            with tqdm(total=len(records), initial=len(records) - len(todo), desc="generate") as bar:
                for i in range(0, len(todo), cfg.batch_size):
                    batch = todo[i : i + cfg.batch_size]
                    responses = self.answer(batch, source=str(cfg.data_file))
                    writer.write(
                        {
                            "id": r["id"],
                            "image": r["image_ref"],
                            "prompt": r["prompt"],
                            "response": text,
                        }
                        for r, text in zip(batch, responses)
                    )
                    bar.update(len(batch))
        log.info(f"Wrote {out_path}")
        return out_path

    def _load_records(self, data_file: str) -> List[Dict[str, Any]]:
        """Records with ``image`` resolved against ``image_dir``; ids must be unique."""
        image_dir = Path(self.cfg.image_dir) if self.cfg.image_dir else Path(data_file).parent
        records, seen = [], set()
        for raw in read_records(data_file):
            rid = str(require_field(raw, "id", data_file, kind=(str, int)))
            if rid in seen:
                raise ValueError(f"{data_file}: record id={rid!r} appears twice")
            seen.add(rid)
            image_ref = require_field(raw, "image", data_file)
            prompt = raw.get("prompt") or self.cfg.prompt
            records.append(
                {"id": raw["id"], "image": str(image_dir / image_ref), "image_ref": image_ref, "prompt": prompt}
            )
        return records

    def cleanup(self) -> None:
        """Free the model."""
        del self.answerer


@parse
def main(cfg: DictConfig) -> None:
    """Entry point for ``tune run povid_generate --config llava_generate``."""
    recipe = GenerateRecipe(cfg)
    recipe.setup()
    if cfg.data_file:
        recipe.run_file()
    elif cfg.image:
        recipe.run_single()
    else:
        raise ValueError("povid_generate needs image=IMG (with prompt=...) or data_file=RECORDS.jsonl")
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(main())
