"""The POVID training dataset and collate: rows, masks, images, online noise, bad records."""

import json

import pytest
import torch

from povid.model import read_llava_args
from povid_data.distort import distort_image, noise_seed
from povid_data.preference_dataset import PreferenceDataset, collate_preferences
from povid_data.tokenizer import LlavaTokenizer
from povid_data.transforms import IGNORE_INDEX, LlavaImageTransform, LlavaMessageTransform


@pytest.fixture(scope="module")
def transforms(tiny_checkpoint):
    args = read_llava_args(tiny_checkpoint)
    messages = LlavaMessageTransform(
        LlavaTokenizer.from_dir(tiny_checkpoint), args.image_token_id, args.num_image_tokens, 512
    )
    return messages, LlavaImageTransform("pad", size=args.image_size), args


def _noise(image, rid, epoch):
    return distort_image(image, 500, seed=noise_seed(f"{rid}@{epoch}", 0))


def test_rows_images_and_labels(preference_data, transforms):
    messages, images, args = transforms
    dataset = PreferenceDataset(preference_data, messages, images)
    batch = collate_preferences([dataset[i] for i in range(4)], pad_id=0)
    # r0 and r2 have noise answers, r1 and r3 do not
    assert {kind: rows.tolist() for kind, rows in batch.kind_rows.items()} == {
        "chosen": [0, 1, 2, 3], "rejected": [4, 5, 6, 7], "noise": [8, 9]
    }
    assert batch.row_example.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 2]
    assert batch.row_image.tolist() == batch.row_example.tolist()
    assert batch.images.shape == (4, 3, args.image_size, args.image_size)
    tokens, labels = batch.tokens, batch.labels
    assert tokens.shape == labels.shape and tokens.shape[0] == 10
    for row in range(10):
        assert int((tokens[row] == args.image_token_id).sum()) == args.num_image_tokens
        scored = labels[row] != IGNORE_INDEX
        # only the answer and its </s> are scored; image placeholders never are
        assert scored.any() and not (scored & (tokens[row] == args.image_token_id)).any()
        last = int(scored.nonzero().max())
        assert int(tokens[row, last]) == 2  # </s>
    # the three answers of an example share the prompt
    prompt_len = int((labels[0] != IGNORE_INDEX).nonzero().min())
    assert torch.equal(tokens[0, :prompt_len], tokens[4, :prompt_len])
    assert torch.equal(tokens[0, :prompt_len], tokens[8, :prompt_len])
    assert batch.noisy_images is None


def test_online_noise_is_fresh_per_epoch_and_reproducible(preference_data, transforms):
    messages, images, _ = transforms
    dataset = PreferenceDataset(
        preference_data, messages, images, use_noise_answers=False, noise_fn=_noise
    )
    first = dataset[0]
    assert "noise_tokens" not in first
    assert not torch.equal(first["noisy_image"], first["image"])
    assert torch.equal(dataset[0]["noisy_image"], first["noisy_image"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["noisy_image"], first["noisy_image"])
    batch = collate_preferences([dataset[0], dataset[1]])
    assert batch.noisy_images.shape == batch.images.shape


def test_noise_rows_can_point_at_the_noisy_images(preference_data, transforms):
    """noise.condition=noisy with dataset answers: the noisy copies follow the clean images
    and only the noise rows point at them; the batch moves to a device and dtype whole."""
    messages, images, _ = transforms
    dataset = PreferenceDataset(preference_data, messages, images, noise_fn=_noise)
    examples = [dataset[i] for i in range(4)]
    batch = collate_preferences(examples, noise_rows_on_noisy_image=True)
    assert len(batch.images) == 8
    assert torch.equal(batch.images[4:], batch.noisy_images)
    assert batch.row_image[batch.noise_rows].tolist() == [4 + 0, 4 + 2]  # r0 and r2's noisy copies
    assert batch.row_image[batch.chosen_rows].tolist() == [0, 1, 2, 3]
    moved = batch.to("cpu", torch.float64)
    assert moved.images.dtype == torch.float64 and moved.tokens.dtype == torch.long
    with pytest.raises(ValueError, match="noisy_image"):
        collate_preferences([{k: v for k, v in e.items() if k != "noisy_image"} for e in examples],
                            noise_rows_on_noisy_image=True)  # fmt: skip


def _write(tmp_path, record):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


def _record(**overrides):
    q = [{"from": "human", "value": "<image>\nDescribe."}]
    record = {
        "id": "x1", "image": "0.png",
        "conversations": q + [{"from": "gpt", "value": "A red circle."}],
        "rejected_conversations": q + [{"from": "gpt", "value": "A red circle and a dog."}],
    }  # fmt: skip
    record.update(overrides)
    return record


def test_bad_records_name_file_id_and_field(tmp_path, preference_data, transforms):
    messages, images, _ = transforms
    no_rejected = _record()
    del no_rejected["rejected_conversations"]
    with pytest.raises(ValueError, match=r"bad\.jsonl: record id='x1': field 'rejected_conversations'"):
        PreferenceDataset(_write(tmp_path, no_rejected), messages, images)
    two_images = _record()
    two_images["conversations"][0] = {"from": "human", "value": "<image>\n<image>\nDescribe."}
    with pytest.raises(ValueError, match=r"record id='x1': field 'conversations' has 2 <image>"):
        PreferenceDataset(_write(tmp_path, two_images), messages, images)
    missing_image = PreferenceDataset(_write(tmp_path, _record(image="nope.png")), messages, images)
    with pytest.raises(FileNotFoundError, match=r"record id='x1': field 'image'.*nope\.png"):
        missing_image[0]


def test_reads_json_list_jsonl_and_datasets_alike(tmp_path, preference_data):
    from datasets import Dataset

    from povid_data.records import read_llava_records

    from_jsonl, _ = read_llava_records(preference_data)
    as_list = tmp_path / "prefs.json"
    as_list.write_text(json.dumps(from_jsonl))
    from_list, _ = read_llava_records(as_list)
    dataset = Dataset.from_list(from_jsonl)
    dataset.save_to_disk(str(tmp_path / "saved"))
    from_disk, name = read_llava_records(tmp_path / "saved")
    from_memory, _ = read_llava_records(dataset)
    ids = [r["id"] for r in from_jsonl]
    for records in (from_list, from_disk, from_memory):
        assert [r["id"] for r in records] == ids
        assert [r["conversations"] for r in records] == [r["conversations"] for r in from_jsonl]
    assert name == str(tmp_path / "saved")
