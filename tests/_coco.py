"""Write tiny COCO-format annotation files (instances + captions) for metric and recipe tests."""

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from povid.metrics.chair import COCO_SYNONYMS

# Category ids in the order of the 80 COCO categories (ids only need to be consistent).
CATEGORY_IDS = {name: i + 1 for i, name in enumerate(COCO_SYNONYMS)}


def file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def write_coco(
    directory: Path, images: Dict[int, Tuple[Sequence[str], Sequence[str]]]
) -> Tuple[Path, Path]:
    """``images``: image id -> (instance category names, ground-truth captions).

    A category listed twice gets two instances (as COCO has one annotation per instance).
    Returns the instances and captions file paths (COCO's default names).
    """
    directory.mkdir(parents=True, exist_ok=True)
    image_list = [{"id": i, "file_name": file_name(i), "width": 32, "height": 24} for i in images]
    instances: List[dict] = []
    captions: List[dict] = []
    for image_id, (objects, texts) in images.items():
        for name in objects:
            instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": CATEGORY_IDS[name]})
        for text in texts:
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
    categories = [{"id": i, "name": n, "supercategory": "x"} for n, i in CATEGORY_IDS.items()]
    inst_path, cap_path = directory / "instances_val2014.json", directory / "captions_val2014.json"
    inst_path.write_text(json.dumps({"images": image_list, "annotations": instances, "categories": categories}))
    cap_path.write_text(json.dumps({"images": image_list, "annotations": captions}))
    return inst_path, cap_path
