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

``backend=openai`` answers the file through an OpenAI-compatible server instead (vLLM, SGLang:
``client.base_url``, ``client.model``): concurrent requests, retries, a request budget, records
that fail for good in ``${output_dir}/rejects.jsonl``, the same output lines plus ``meta``
(backend, model, base_url); a rerun skips the ids in either file.
"""

import sys
from pathlib import Path

from omegaconf import DictConfig
from torchtune import utils

from povid.answering import (
    LlavaAnswerer,
    answer_records_via_server,
    answer_requests,
    answer_requests_file,
    question_turns,
    read_answer_requests,
)
from povid.config import check_choice, parse
from povid_data.transforms import load_image

log = utils.get_logger("INFO")


class GenerateRecipe:
    """Loads a checkpoint once, then answers a single image or a file of records."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.backend = check_choice(cfg, "backend", ("local", "openai"))
        if self.backend == "openai" and not cfg.data_file:
            raise ValueError("povid_generate: backend=openai answers a data_file=RECORDS.jsonl")

    def setup(self) -> None:
        """Load model, tokenizer and transforms (the answerer shared with other recipes);
        nothing to load for a server."""
        self.answerer = LlavaAnswerer.from_config(self.cfg) if self.backend == "local" else None

    def run_single(self) -> str:
        """Answer ``cfg.image`` with ``cfg.prompt`` and print the answer."""
        record = {"id": "single", "image": self.cfg.image, "prompt": self.cfg.prompt}
        response = answer_requests(self.answerer, [record], source="image=")[0]
        print(response)
        return response

    def run_file(self) -> Path:
        """Answer every record of ``cfg.data_file``; resumable. Returns the output path."""
        cfg = self.cfg
        requests = read_answer_requests(cfg.data_file, cfg.image_dir, default_prompt=cfg.prompt)
        if self.backend == "openai":
            for r in requests:  # a missing image stops the run before any request
                _require_file(r, cfg.data_file)
            answer_records_via_server(
                cfg, requests, output_file=cfg.output_file, rejects_file=cfg.rejects_file, desc="povid_generate",
                prepare=lambda r: (question_turns(r["prompt"]), load_image(r["image"])),
                make_output=lambda r, text, meta: {"id": r["id"], "image": r["image_ref"], "prompt": r["prompt"],
                                                   "response": text, "meta": meta},
            )  # fmt: skip
            return Path(cfg.output_file)
        return answer_requests_file(self.answerer, requests, cfg.output_file, batch_size=cfg.batch_size,
                                    source=str(cfg.data_file))  # fmt: skip

    def cleanup(self) -> None:
        """Free the model."""
        self.answerer = None


def _require_file(request, data_file) -> None:
    if not Path(request["image"]).is_file():
        raise FileNotFoundError(f"{data_file}: record id={request['id']!r}: field 'image': no file {request['image']}")


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
