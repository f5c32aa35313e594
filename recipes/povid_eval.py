"""Recipe ``povid_eval``: hallucination benchmarks (CHAIR, POPE) with a pinned protocol.

CHAIR and POPE numbers swing with the prompt, the token limit, the image subset and the
decoding, so all of them live in the config and are written into the results::

    tune run povid_eval --config eval_chair_coco checkpoint_dir=DIR \\
        annotations_dir=coco/annotations image_dir=coco/val2014 output_dir=out/base_chair
    tune run povid_eval --config eval_pope_coco checkpoint_dir=DIR \\
        annotations_dir=coco/annotations image_dir=coco/val2014 output_dir=out/base_pope
    povid compare out/base_chair/results.json out/povid_chair/results.json

What a run does:

1. CHAIR: sample ``num_images`` images of the instances file with ``seed``; POPE: build the
   random / popular / adversarial questions from the instances (or read ``questions_file``).
2. Generate greedily with ``prompt`` and ``max_new_tokens`` through the library's answering
   loop (:mod:`povid.answering`, the one ``povid_generate`` uses: same batching, KV cache and
   resumable ``generations.jsonl``): a rerun after a crash only generates what is missing. A
   rerun with a different checkpoint or decoding setting into the same ``output_dir`` is
   refused instead of mixing outputs.
3. Score, and write ``results.json`` and ``results.md`` (also printed). CHAIR counts mentions
   with ``chair.mode``: ``reference`` (default, the original script's counting, comparable to
   published numbers) or ``corrected`` (see ``povid/metrics/CHAIR.md``); ``results.json``
   records it, and ``povid compare`` lists it when two runs differ.

Scoring existing outputs skips generation (no checkpoint needed): ``captions_file=`` (CHAIR,
JSONL ``{"image_id", "caption"}``) or ``answers_file=`` with ``questions_file=`` (POPE, LLaVA's
layout).
"""

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, ListConfig
from torchtune import utils

from povid.answering import (
    LlavaAnswerer,
    answer_records_via_server,
    answer_requests_file,
    question_turns,
    read_answer_requests,
)
from povid.config import check_choice, parse
from povid.metrics.chair import DEFAULT_CHAIR_MODE, check_chair_mode, evaluate_chair, read_captions
from povid.metrics.coco import CocoAnnotations, load_coco
from povid.metrics.pope import (
    POPE_SPLITS,
    PopeQuestion,
    build_pope_questions,
    evaluate_pope,
    format_pope_prompt,
    match_answers,
    read_pope_answers,
    read_pope_questions,
)
from povid.metrics.report import make_result, results_markdown, write_results
from povid_data.jsonl import ResumableJsonlWriter, read_records

log = utils.get_logger("INFO")

GENERATIONS_FILE = "generations.jsonl"
REQUESTS_FILE = "requests.jsonl"
PROTOCOL_FILE = "generation_protocol.json"
REJECTS_FILE = "rejects.jsonl"


def _fingerprint(items: Any) -> str:
    """Short stable hash of JSON-able data: tells at a glance whether two runs used one subset."""
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def _write_jsonl(records: List[Dict[str, Any]], path: Path) -> None:
    """Write a whole JSONL file at once (derived files, rewritten on every run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def select_images(coco: CocoAnnotations, num_images: Optional[int], seed: int) -> List[int]:
    """``num_images`` image ids drawn with ``seed`` from the instances file (all if None), sorted."""
    ids = sorted(coco.images)
    if num_images is None:
        return ids
    if num_images > len(ids):
        raise ValueError(f"{coco.instances_path}: num_images={num_images} but the file lists only {len(ids)} images")
    return sorted(random.Random(seed).sample(ids, num_images))


def _chair_mode(cfg: DictConfig) -> str:
    """``chair.mode`` of the config; configs written before modes existed get the default."""
    chair = cfg.get("chair")
    if chair is None:
        return DEFAULT_CHAIR_MODE
    if not isinstance(chair, (dict, DictConfig)):
        raise ValueError(f"chair must be a block with a 'mode' key (chair.mode=reference), got {chair!r}")
    return chair.get("mode", DEFAULT_CHAIR_MODE)


class EvalRecipe:
    """Builds the benchmark items, generates (or reads) the model's outputs, scores them."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.benchmark = cfg.benchmark
        if self.benchmark not in ("chair", "pope"):
            raise ValueError(f"benchmark must be 'chair' or 'pope', got {self.benchmark!r}")
        self.output_dir = Path(cfg.output_dir)
        given = self._existing_outputs()
        if self.benchmark == "chair" and (cfg.get("answers_file") or cfg.get("questions_file")):
            raise ValueError("answers_file= and questions_file= are POPE inputs; use --config eval_pope_coco")
        if self.benchmark == "pope" and cfg.get("captions_file"):
            raise ValueError("captions_file= is a CHAIR input; use --config eval_chair_coco or eval_chair_opera")
        if self.benchmark == "pope" and cfg.get("answers_file") and not cfg.get("questions_file"):
            raise ValueError("answers_file= needs questions_file= (the questions with their labels)")
        if self.benchmark == "chair":
            # Checked before any generation: a typo must not cost a 500-caption run.
            self.chair_mode = check_chair_mode(_chair_mode(cfg))
        self.generating = not given
        self.backend = check_choice(cfg, "backend", ("local", "openai"))
        if self.generating:
            needed = ("checkpoint_dir", "image_dir") if self.backend == "local" else ("image_dir",)
            missing = [key for key in needed if not cfg.get(key)]
            if missing:
                raise ValueError(
                    f"generating needs {' and '.join(f'{k}=' for k in missing)}; to score existing "
                    f"outputs instead pass {'captions_file=' if self.benchmark == 'chair' else 'answers_file= and questions_file='}"
                )

    def _existing_outputs(self) -> Optional[str]:
        return self.cfg.get("captions_file") if self.benchmark == "chair" else self.cfg.get("answers_file")

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Load annotations and build the items to evaluate (no model yet)."""
        cfg = self.cfg
        if self.benchmark == "chair":
            if not cfg.get("annotations_dir"):
                raise ValueError("CHAIR needs annotations_dir= (COCO instances and captions files)")
            self.coco = load_coco(
                cfg.annotations_dir,
                instances_file=cfg.coco_instances_file,
                captions_file=cfg.coco_captions_file,
            )
            if self.generating:
                self.image_ids = select_images(self.coco, cfg.num_images, cfg.seed)
            else:
                self.captions = read_captions(cfg.captions_file)
                self.image_ids = [image_id for image_id, _ in self.captions]
            log.info(f"CHAIR on {len(self.image_ids)} images of {self.coco.instances_path}")
        else:
            self.questions = self._pope_questions()
            log.info(f"POPE: {len(self.questions)} questions")

    def _pope_questions(self) -> List[PopeQuestion]:
        cfg = self.cfg
        if cfg.get("questions_file"):
            files = cfg.questions_file
            files = list(files) if isinstance(files, (list, ListConfig)) else [files]
            return read_pope_questions(files)
        if not cfg.get("annotations_dir"):
            raise ValueError("POPE needs questions_file= or annotations_dir= to build the questions from")
        coco = load_coco(cfg.annotations_dir, instances_file=cfg.coco_instances_file, captions_file=None)
        questions = build_pope_questions(
            coco,
            num_images=cfg.num_images,
            objects_per_image=cfg.objects_per_image,
            seed=cfg.seed,
            splits=list(cfg.get("splits") or POPE_SPLITS),
            template=cfg.question_template,
        )
        _write_jsonl([q.to_record() for q in questions], self.output_dir / "pope_questions.jsonl")
        return questions

    # ------------------------------------------------------------------ run

    def run(self) -> Dict[str, Any]:
        """Generate what is missing, score, write ``results.json`` / ``results.md``."""
        result = self._run_chair() if self.benchmark == "chair" else self._run_pope()
        json_path, md_path = write_results(result, self.output_dir)
        print(results_markdown(result))
        log.info(f"Wrote {json_path} and {md_path}")
        return result

    def _run_chair(self) -> Dict[str, Any]:
        cfg = self.cfg
        if self.generating:
            requests = [{"id": i, "image": self.coco.images[i], "prompt": cfg.prompt} for i in self.image_ids]
            responses = self._generate(requests)
            self.captions = [(i, responses[str(i)]) for i in self.image_ids]
            _write_jsonl([{"image_id": i, "caption": c} for i, c in self.captions], self.output_dir / "captions.jsonl")
        scored = evaluate_chair(
            self.captions,
            self.coco,
            source=str(cfg.get("captions_file") or "generated captions"),
            mode=self.chair_mode,
        )
        protocol = {
            "benchmark": "chair",
            "protocol_name": cfg.get("protocol_name"),
            "chair_mode": self.chair_mode,
            **self._generation_protocol(),
            "num_images": len(self.image_ids),
            "seed": cfg.seed if self.generating else None,
            "image_ids_sha256": _fingerprint(sorted(self.image_ids)),
            "annotations_dir": str(cfg.annotations_dir),
            "coco_instances_file": cfg.coco_instances_file,
            "coco_captions_file": cfg.coco_captions_file,
            "captions_file": str(cfg.captions_file) if cfg.get("captions_file") else None,
        }
        return make_result("chair", self._name(), protocol, scored["metrics"], scored["captions"])

    def _run_pope(self) -> Dict[str, Any]:
        cfg = self.cfg
        if self.generating:
            requests, key_of = [], {}
            for q in self.questions:
                # Positives repeat across the three splits: each (image, question) is asked once.
                key = f"{q.image}|{q.text}"
                if key not in key_of:
                    key_of[key] = len(requests)
                    requests.append({"id": key, "image": q.image, "prompt": format_pope_prompt(cfg.prompt, q.text)})
            responses = self._generate(requests)
            answers = [responses[f"{q.image}|{q.text}"] for q in self.questions]
            _write_jsonl(
                [{"question_id": q.question_id, "category": q.split, "text": a} for q, a in zip(self.questions, answers)],
                self.output_dir / "answers.jsonl",
            )
        else:
            answers = match_answers(self.questions, read_pope_answers(cfg.answers_file), cfg.answers_file)
        metrics = evaluate_pope(self.questions, answers)
        questions_file = cfg.get("questions_file")
        protocol = {
            "benchmark": "pope",
            **self._generation_protocol(),
            "num_images": len({q.image for q in self.questions}),
            "seed": cfg.seed if not questions_file else None,
            "objects_per_image": cfg.objects_per_image if not questions_file else None,
            "question_template": cfg.question_template if not questions_file else None,
            "splits": list(metrics),
            "questions_sha256": _fingerprint([[q.split, q.question_id, q.image, q.text, q.label] for q in self.questions]),
            "annotations_dir": str(cfg.annotations_dir) if cfg.get("annotations_dir") else None,
            "questions_file": str(questions_file) if questions_file else None,
            "answers_file": str(cfg.answers_file) if cfg.get("answers_file") else None,
        }
        return make_result("pope", self._name(), protocol, metrics)

    def _name(self) -> str:
        if self.cfg.get("run_name"):
            return str(self.cfg.run_name)
        if self.generating and self.backend == "openai":
            return str(self.cfg.client.model).rstrip("/").rsplit("/", 1)[-1]
        if self.generating:
            return Path(str(self.cfg.checkpoint_dir)).name
        return Path(str(self._existing_outputs())).stem

    def _generation_protocol(self) -> Dict[str, Any]:
        """The settings that decide what the model writes (None when outputs were given)."""
        cfg = self.cfg
        if not self.generating:
            return {"generated": False}
        if self.backend == "openai":
            # What a server decides: its model and template; the prompt and length are ours.
            return {"generated": True, "backend": "openai", "model": cfg.client.model,
                    "base_url": cfg.client.base_url, "prompt": cfg.prompt, "max_new_tokens": cfg.max_new_tokens,
                    "decoding": "greedy"}  # fmt: skip
        return {
            "generated": True,
            "backend": "local",
            "checkpoint_dir": str(Path(cfg.checkpoint_dir).absolute()),
            "prompt": cfg.prompt,
            "max_new_tokens": cfg.max_new_tokens,
            "decoding": "greedy",
            "image_mode": cfg.image_mode,
            "dtype": cfg.dtype,
            "quantization": cfg.get("quantization"),
        }

    # ------------------------------------------------------------------ generation

    def _check_generation_protocol(self) -> None:
        """Refuse to resume into outputs made with another checkpoint or decoding setting."""
        protocol = self._generation_protocol()
        protocol.pop("prompt")  # checked per line: one run may use several prompts (POPE)
        path = self.output_dir / PROTOCOL_FILE
        if path.exists() and (self.output_dir / GENERATIONS_FILE).exists():
            previous = json.loads(path.read_text(encoding="utf-8"))
            previous.setdefault("backend", "local")  # written before backends existed
            differing = {k: (previous.get(k), v) for k, v in protocol.items() if previous.get(k) != v}
            if differing:
                shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differing.items())
                raise ValueError(
                    f"{path}: {self.output_dir / GENERATIONS_FILE} was generated with other settings "
                    f"({shown}); use another output_dir, or delete that file to start over"
                )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(protocol, indent=2) + "\n", encoding="utf-8")

    def _generate(self, requests: List[Dict[str, Any]]) -> Dict[str, str]:
        """Responses (by ``str(id)``) to ``{"id", "image", "prompt"}`` requests, generating only
        those not yet in ``generations.jsonl``."""
        self._check_generation_protocol()
        data_file, output_file = self.output_dir / REQUESTS_FILE, self.output_dir / GENERATIONS_FILE
        _write_jsonl(requests, data_file)
        with ResumableJsonlWriter(output_file) as writer:  # also drops a line cut by a crash
            pending = sum(1 for _ in writer.pending(requests))
        if pending and self.backend == "openai":
            self._generate_on_server(read_answer_requests(data_file, self.cfg.image_dir), output_file)
        elif pending:
            log.info(f"Generating {pending} of {len(requests)} answers into {output_file}")
            # The protocol is greedy decoding: the eval configs have no sampling keys.
            answerer = LlavaAnswerer.from_config(self.cfg, greedy=True)
            answer_requests_file(answerer, read_answer_requests(data_file, self.cfg.image_dir), output_file,
                                 batch_size=self.cfg.batch_size, source=str(data_file))  # fmt: skip
            del answerer
        else:
            log.info(f"All {len(requests)} answers already in {output_file}")
        rows = {str(r["id"]): r for r in read_records(output_file)}
        unanswered = [str(r["id"]) for r in requests if str(r["id"]) not in rows]
        if unanswered:
            # A score over the answered items only would not be the benchmark's.
            raise RuntimeError(
                f"{len(unanswered)} of {len(requests)} items have no answer (first: {unanswered[:5]}); "
                f"see {self.output_dir / REJECTS_FILE} for the reasons. Rerun to resume (retry_rejects=true "
                "tries the rejected ones again)"
            )
        responses = {}
        for request in requests:
            row = rows[str(request["id"])]
            if row.get("prompt") != request["prompt"]:
                raise ValueError(
                    f"{output_file}: id {request['id']!r} was answered with prompt {row.get('prompt')!r}, "
                    f"not {request['prompt']!r}; use another output_dir, or delete the file to start over"
                )
            responses[str(request["id"])] = row["response"]
        return responses

    def _generate_on_server(self, requests: List[Dict[str, Any]], output_file: Path) -> None:
        from povid_data.record_run import move_rejects_aside
        from povid_data.transforms import load_image

        rejects = self.output_dir / REJECTS_FILE
        if self.cfg.get("retry_rejects") and rejects.exists():
            log.info(f"retry_rejects: moved {rejects} to {move_rejects_aside(rejects)}")
        answer_records_via_server(
            self.cfg, requests, output_file=output_file, rejects_file=rejects, desc=f"povid_eval[{self.benchmark}]",
            prepare=lambda r: (question_turns(r["prompt"]), load_image(r["image"])),
            make_output=lambda r, text, meta: {"id": r["id"], "image": r["image_ref"], "prompt": r["prompt"],
                                               "response": text, "meta": meta},
            greedy=True,
        )  # fmt: skip

    def cleanup(self) -> None:
        """Nothing to free: the generator is released right after generating."""


@parse
def main(cfg: DictConfig) -> None:
    """Entry point for ``tune run povid_eval --config eval_chair_coco | eval_chair_opera | eval_pope_coco``."""
    recipe = EvalRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(main())
