"""Recipe ``povid_audit``: does a preference file teach grounding at all?

mDPO showed that multimodal DPO can learn to prefer the chosen answer without using the image.
This recipe measures, for any checkpoint and any POVID preference file, how much of the model's
preference for the chosen answer needs the image::

    tune run povid_audit --config povid_audit checkpoint_dir=llava-1.5-7b-hf \\
        data_file=preferences.jsonl image_dir=coco/train2014 output_dir=out/audit

For every pair (in file order, ``batch_size`` at a time, the first ``max_records`` only if set):

1. tokenize the chosen, rejected and (``noise.source=dataset``) noise answers and preprocess the
   image exactly as ``povid_dpo`` does (``PreferenceDataset``, same transforms, same truncation);
2. build the null image: ``null_image=blank`` (default) a blank image in the CLIP mean colour
   (122, 116, 104) at the record image's size, so the same padding and resizing run on it;
   ``null_image=other`` another record's image (a cyclic derangement of the distinct images,
   drawn with ``seed``);
3. ``noise.source=online``: the released code's noise answer, the teacher-forced argmax on the
   diffusion-noised image (the noise ``povid_dpo`` draws for this record in epoch 0 with the same
   ``seed``); it is scored like the others;
4. score every answer with the true image and with the null image: summed log-probs over the
   answer tokens and ``</s>``, as ``povid_dpo`` scores them;
5. append one line per pair to ``${output_dir}/audit.jsonl`` (flushed; a rerun skips ids already
   there), then summarize every selected pair into ``audit.json`` and ``audit.md`` (printed).

What the summary means: ``povid.audit`` and README (section ``povid_audit``).
"""

import json
import sys
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Tuple

import PIL.Image
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset
from torchtune import config, training, utils
from tqdm import tqdm

from povid.audit import NULL_IMAGES, blank_image, edit_kinds, image_derangement, markdown, summarize
from povid.config import parse
from povid.loss import answer_logprobs
from povid.model import read_llava_args
from povid.training import (
    answer_positions,
    answer_targets,
    answer_token_counts,
    encode_images,
    row_logits,
)
from povid_data.distort import OVERFLOW_MODES, RecordNoise, noise_coefficients
from povid_data.jsonl import ResumableJsonlWriter, read_records
from povid_data.preference_dataset import PreferenceBatch, PreferenceDataset, collate_preferences
from povid_data.records import resolve_image
from povid_data.transforms import LlavaImageTransform, LlavaMessageTransform, load_image

log = utils.get_logger("INFO")

ROWS_FILE = "audit.jsonl"
SUMMARY_FILE = "audit.json"
TABLE_FILE = "audit.md"
SETTINGS_FILE = "audit_settings.json"
NOISE_SOURCES = ("dataset", "online", "none")


class AuditDataset(PreferenceDataset):
    """``PreferenceDataset`` examples (tokens, labels, the true image and, for online noise, the
    noisy image), plus ``null_image``: the image the same answers are scored against in its place.

    Args:
        null_image: ``blank`` or ``other`` (see the recipe docstring).
        seed: draws the derangement for ``other``.
        *args, **kwargs: as :class:`PreferenceDataset`.
    """

    def __init__(self, *args: Any, null_image: str, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.null_kind = null_image
        self.partner: Dict[str, str] = {}
        if null_image == "other":
            with_image = [str(r["image"]) for r in self.records if r.get("image")]
            self.partner = image_derangement(with_image, seed)

    def image_path(self, record: Dict[str, Any]) -> Path:
        """The record's image file; an error naming the file, record id and field if absent."""
        path = resolve_image(record, self.image_dir, self.source)
        if path is None:
            raise ValueError(
                f"{self.source}: record id={record['id']!r}: field 'image' is missing: the audit "
                "compares each pair with and without its image"
            )
        return path

    def null_image_path(self, record: Dict[str, Any]) -> Path:
        """``null_image=other``: the file of the image this record is scored against instead."""
        partner = {"id": record["id"], "image": self.partner[str(record["image"])]}
        return resolve_image(partner, self.image_dir, f"{self.source} (null_image=other)")

    def null_image(self, record: Dict[str, Any]) -> PIL.Image.Image:
        """The record's null image, before preprocessing."""
        where = f"{self.source}: record id={record['id']!r}: field 'image'"
        try:
            if self.null_kind == "other":
                return load_image(self.null_image_path(record))
            with PIL.Image.open(self.image_path(record)) as image:  # the header gives the size
                return blank_image(image.size)
        except (OSError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None

    def __getitem__(self, index: int) -> Dict[str, Any]:
        example = super().__getitem__(index)
        example["null_image"] = self.images(self.null_image(self.records[index]))
        return example


def collate_audit(examples: List[Dict[str, Any]], pad_id: int) -> Tuple[PreferenceBatch, torch.Tensor]:
    """:func:`collate_preferences` and the stacked null images (one per example)."""
    return collate_preferences(examples, pad_id=pad_id), torch.stack([example["null_image"] for example in examples])


class AuditRecipe:
    """Loads a checkpoint and a preference file, scores every pair, writes rows and summary."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        if cfg.null_image not in NULL_IMAGES:
            raise ValueError(f"null_image must be one of {', '.join(NULL_IMAGES)}; got {cfg.null_image!r}")
        if cfg.noise.source not in NOISE_SOURCES:
            raise ValueError(f"noise.source must be one of {', '.join(NOISE_SOURCES)}; got {cfg.noise.source!r}")
        if cfg.noise.source == "online":
            noise_coefficients(cfg.noise.step)  # a bad step fails now, not after loading the model
            if cfg.noise.overflow not in OVERFLOW_MODES:
                modes = ", ".join(OVERFLOW_MODES)
                raise ValueError(f"noise.overflow must be one of {modes}; got {cfg.noise.overflow!r}")
        if int(cfg.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
        if cfg.max_records is not None and int(cfg.max_records) < 1:
            raise ValueError(f"max_records must be >= 1 or null, got {cfg.max_records}")
        self.noise_source = cfg.noise.source
        self.online_noise = self.noise_source == "online"
        self.device = utils.get_device(cfg.device)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.output_dir = Path(cfg.output_dir)

    # ------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Load the model, the tokenizer, the transforms and the data; check every image."""
        cfg = self.cfg
        # The data and its images first: a bad file fails in seconds, before a 7B checkpoint
        # is read. The architecture (image tokens, image size) comes from config.json alone.
        self.args = read_llava_args(cfg.checkpoint_dir, cfg.clip_dir)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        messages = LlavaMessageTransform(
            self.tokenizer, self.args.image_token_id, self.args.num_image_tokens, max_seq_len=cfg.max_seq_len
        )
        images = LlavaImageTransform(cfg.image_mode, size=self.args.image_size)
        noise_fn = None
        if self.online_noise:
            # Epoch 0 of povid_dpo's online noise with the same seed: the noisy image training sees first.
            noise_fn = RecordNoise(step=cfg.noise.step, overflow=cfg.noise.overflow, seed=cfg.seed, per_epoch=True,
                                   fixed_epoch=0)  # fmt: skip
        self.dataset = AuditDataset(
            cfg.data_file,
            messages,
            images,
            image_dir=cfg.image_dir,
            use_noise_answers=self.noise_source == "dataset",
            noise_fn=noise_fn,
            null_image=cfg.null_image,
            seed=cfg.seed,
        )
        n = len(self.dataset)
        self.selected = list(range(n if cfg.max_records is None else min(n, int(cfg.max_records))))
        for index in self.selected:  # a missing image stops the run before any scoring
            record = self.dataset.records[index]
            self.dataset.image_path(record)
            if cfg.null_image == "other":
                self.dataset.null_image_path(record)
        self.dataset_index = {str(r["id"]): i for i, r in enumerate(self.dataset.records)}
        self.model = config.instantiate(cfg.model, device=self.device, dtype=self.dtype)

    def settings(self) -> Dict[str, Any]:
        """What the rows depend on: a resumed run must use the same."""
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        noise = {"source": self.noise_source}
        if self.online_noise:
            noise.update(step=cfg["noise"]["step"], overflow=cfg["noise"]["overflow"])
        return {
            "checkpoint_dir": str(Path(cfg["checkpoint_dir"]).resolve()),
            "data_file": str(Path(str(cfg["data_file"])).resolve()),
            "image_dir": str(self.dataset.image_dir),
            "null_image": cfg["null_image"],
            "noise": noise,
            "seed": cfg["seed"],
            "image_mode": cfg["image_mode"],
            "max_seq_len": cfg["max_seq_len"],
            "dtype": cfg["dtype"],
        }

    def _check_settings(self) -> None:
        """Write the settings next to the rows, or refuse to mix rows made with other ones."""
        path = self.output_dir / SETTINGS_FILE
        settings = self.settings()
        rows = self.output_dir / ROWS_FILE
        if path.exists() and rows.exists() and rows.stat().st_size:
            before = json.loads(path.read_text(encoding="utf-8"))
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            if changed:
                raise ValueError(
                    f"{rows} holds rows made with other settings ({', '.join(changed)}: "
                    f"{[before.get(k) for k in changed]} then, {[settings.get(k) for k in changed]} now); "
                    "choose another output_dir or move the file away"
                )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def score(self, batch: PreferenceBatch, null_images: torch.Tensor) -> List[Dict[str, Any]]:
        """One audit row per example of a collated batch (``null_images``: one per example)."""
        batch = batch.to(self.device, self.dtype)
        tokens, labels = batch.tokens, batch.labels
        # Output head on answer positions only, as povid_dpo: the same logits, the same sums.
        positions = answer_positions(labels)
        targets = answer_targets(labels, positions)
        chosen_rows = batch.chosen_rows
        of_chosen = torch.isin(positions[0], chosen_rows)
        noise = self._online_noise_targets(batch, tokens, labels, chosen_rows) if self.online_noise else None
        logps: Dict[str, torch.Tensor] = {}
        noise_logps: Dict[str, torch.Tensor] = {}
        for condition, images in (("image", batch.images), ("null", null_images.to(self.device, self.dtype))):
            features = encode_images(self.model, images)
            logits = row_logits(self.model, tokens, features, batch.row_image, positions)
            logps[condition] = answer_logprobs(logits, positions[0], targets, len(tokens)).cpu()
            if noise is not None:
                # The online noise answer is read off the chosen rows' logits (y_w,<t as the
                # context), as the released code scores it.
                chosen_positions, noise_targets = noise
                noise_logps[condition] = answer_logprobs(
                    logits[of_chosen], chosen_positions[0], noise_targets, len(chosen_rows)
                ).cpu()
        return self._rows(batch, logps, noise_logps, noise)

    def _online_noise_targets(self, batch, tokens, labels, chosen_rows):
        """Teacher-forced argmax on the noisy image: ``y_noise_t = argmax p(. | noisy, y_w,<t)``."""
        chosen_positions = answer_positions(labels[chosen_rows])
        noisy = encode_images(self.model, batch.noisy_images)
        # Chosen rows come in example order, one per example: row i uses noisy image i.
        noisy_logits = row_logits(self.model, tokens[chosen_rows], noisy, positions=chosen_positions)
        return chosen_positions, noisy_logits.argmax(-1)

    def _rows(self, batch, logps, noise_logps, noise) -> List[Dict[str, Any]]:
        """The batch's log-probs (per row, per condition) regrouped as one row per pair."""
        counts = answer_token_counts(batch.labels).tolist()
        where = {
            (kind, owner): row
            for kind, indices in batch.kind_rows.items()
            for row, owner in zip(indices.tolist(), batch.row_example[indices].tolist())
        }
        rows = []
        for example, rid in enumerate(batch.ids):
            record = self.dataset.records[self.dataset_index[rid]]
            row: Dict[str, Any] = {"id": rid, "kinds": edit_kinds(record), "tokens": {}}
            for kind in ("chosen", "rejected", "noise"):
                i = where.get((kind, example))
                if i is None:
                    continue
                row[f"{kind}_image"] = float(logps["image"][i])
                row[f"{kind}_null"] = float(logps["null"][i])
                row["tokens"][kind] = counts[i]
            if noise is not None:
                chosen_positions, noise_targets = noise
                row["noise_image"] = float(noise_logps["image"][example])
                row["noise_null"] = float(noise_logps["null"][example])
                row["tokens"]["noise"] = row["tokens"]["chosen"]
                # Chosen rows are in example order: chosen row ``example`` is this pair's.
                ids = noise_targets[chosen_positions[0] == example].tolist()
                row["noise_answer"] = self.tokenizer.decode([t for t in ids if t < self.tokenizer.vocab_size])
            rows.append(row)
        return rows

    # ------------------------------------------------------------------------------- run

    def run(self) -> Dict[str, Any]:
        """Score every selected pair not yet in ``audit.jsonl``; write and print the summary."""
        cfg = self.cfg
        self._check_settings()
        rows_path = self.output_dir / ROWS_FILE
        with ResumableJsonlWriter(rows_path) as writer:
            todo = [i for i in self.selected if str(self.dataset.records[i]["id"]) not in writer.done]
            if len(todo) < len(self.selected):
                done = len(self.selected) - len(todo)
                log.info(f"Resuming: {done} of {len(self.selected)} pairs already in {rows_path}")
            loader = DataLoader(
                Subset(self.dataset, todo),
                batch_size=int(cfg.batch_size),
                collate_fn=partial(collate_audit, pad_id=self.args.pad_token_id),
                num_workers=int(cfg.get("num_workers", 0)),
            )
            with tqdm(total=len(self.selected), initial=len(self.selected) - len(todo), desc="povid_audit") as bar:
                for batch, null_images in loader:
                    writer.write(self.score(batch, null_images))
                    bar.update(batch.num_examples)
        summary = self.summarize(rows_path)
        print(markdown(summary), end="")
        return summary

    def summarize(self, rows_path: Path) -> Dict[str, Any]:
        """Summary of the selected pairs' rows: ``audit.json`` and ``audit.md``."""
        wanted = {str(self.dataset.records[i]["id"]) for i in self.selected}
        rows = [r for r in read_records(rows_path) if str(r["id"]) in wanted] if rows_path.stat().st_size else []
        settings = self.settings()
        summary = summarize(
            rows,
            checkpoint_dir=settings["checkpoint_dir"],
            data_file=settings["data_file"],
            null_image=settings["null_image"],
            noise_source=self.noise_source,
            seed=settings["seed"],
        )
        (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (self.output_dir / TABLE_FILE).write_text(markdown(summary), encoding="utf-8")
        log.info(f"Wrote {self.output_dir / SUMMARY_FILE} and {self.output_dir / TABLE_FILE}")
        return summary

    def cleanup(self) -> None:
        """Free the model."""
        del self.model


@parse
def main(cfg: DictConfig) -> None:
    """Entry point for ``tune run povid_audit --config povid_audit``."""
    recipe = AuditRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(main())
