"""COCO-format annotations (instances and captions) for the hallucination metrics.

CHAIR needs, per image, the object categories annotated in ``instances_*.json`` and the
ground-truth sentences of ``captions_*.json`` (the original metric takes object words from
both). POPE needs the instance categories and the image file names. Everything is checked on
load: a malformed file or an annotation that points at an unknown image or category stops with
an :class:`AnnotationError` naming the file and the offending id, instead of silently skewing
the scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set

__all__ = [
    "AnnotationError",
    "CocoAnnotations",
    "DEFAULT_INSTANCES_FILE",
    "DEFAULT_CAPTIONS_FILE",
    "load_coco",
]

DEFAULT_INSTANCES_FILE = "instances_val2014.json"
DEFAULT_CAPTIONS_FILE = "captions_val2014.json"


class AnnotationError(ValueError):
    """An annotation file that is missing, malformed, or lacks an image the evaluation needs."""


@dataclass
class CocoAnnotations:
    """The parts of a COCO annotation set the metrics use.

    Attributes:
        images: image id -> ``file_name`` (from the instances file).
        objects: image id -> sorted names of the categories with at least one instance there
            (images without instances are present with an empty list).
        captions: image id -> ground-truth captions (empty when no captions file was loaded).
        instances_path: the instances file read.
        captions_path: the captions file read, or None.
    """

    images: Dict[int, str]
    objects: Dict[int, List[str]]
    captions: Dict[int, List[str]] = field(default_factory=dict)
    instances_path: Path = Path(DEFAULT_INSTANCES_FILE)
    captions_path: Optional[Path] = None
    _caption_image_ids: Set[int] = field(default_factory=set, repr=False)

    def require_images(self, image_ids: Iterable[int], requested_by: str = "") -> None:
        """Raise :class:`AnnotationError` for the first id missing from an annotation file.

        Args:
            image_ids: ids the evaluation needs.
            requested_by: where the ids came from (named in the error), e.g. a captions file.
        """
        by = f" (requested by {requested_by})" if requested_by else ""
        for image_id in image_ids:
            if image_id not in self.images:
                raise AnnotationError(
                    f"{self.instances_path}: no image with id {image_id}{by}; the file lists "
                    f"{len(self.images)} images"
                )
            if self.captions_path is not None and image_id not in self._caption_image_ids:
                raise AnnotationError(
                    f"{self.captions_path}: no image with id {image_id}{by}; the file lists "
                    f"{len(self._caption_image_ids)} images"
                )


def _read_json_object(path: Path, what: str) -> Dict[str, Any]:
    """A JSON file whose top level is an object, or an AnnotationError naming it."""
    if not path.is_file():
        raise AnnotationError(f"{path}: {what} file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{path}: expected a COCO {what} object with 'images' and 'annotations', "
            f"got a JSON {type(data).__name__}"
        )
    return data


def _list_field(data: Dict[str, Any], key: str, path: Path) -> List[Dict[str, Any]]:
    value = data.get(key)
    if not isinstance(value, list):
        raise AnnotationError(f"{path}: top-level field {key!r} is missing or not a list")
    return value


def _int_field(entry: Any, key: str, path: Path, what: str, index: int) -> int:
    """``entry[key]`` as an int (COCO ids are ints), or an error naming the entry."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {what} #{index} is not a JSON object")
    value = entry.get(key)
    # bool is an int subclass; an id of `true` is a malformed file, not image 1.
    if not isinstance(value, int) or isinstance(value, bool):
        ident = f" (id {entry['id']})" if isinstance(entry.get("id"), int) else ""
        raise AnnotationError(
            f"{path}: {what} #{index}{ident}: field {key!r} is missing or not an integer "
            f"(got {value!r})"
        )
    return value


def _read_images(data: Dict[str, Any], path: Path) -> Dict[int, str]:
    images: Dict[int, str] = {}
    for i, image in enumerate(_list_field(data, "images", path)):
        image_id = _int_field(image, "id", path, "image", i)
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise AnnotationError(f"{path}: image id {image_id}: field 'file_name' is missing or empty")
        if image_id in images:
            raise AnnotationError(f"{path}: image id {image_id} is listed twice")
        images[image_id] = file_name
    return images


def _read_instances(path: Path) -> tuple[Dict[int, str], Dict[int, List[str]]]:
    data = _read_json_object(path, "instances")
    images = _read_images(data, path)
    categories: Dict[int, str] = {}
    for i, category in enumerate(_list_field(data, "categories", path)):
        category_id = _int_field(category, "id", path, "category", i)
        name = category.get("name")
        if not isinstance(name, str) or not name.strip():
            raise AnnotationError(f"{path}: category id {category_id}: field 'name' is missing or empty")
        categories[category_id] = name.strip()
    found: Dict[int, Set[str]] = {image_id: set() for image_id in images}
    for i, annotation in enumerate(_list_field(data, "annotations", path)):
        image_id = _int_field(annotation, "image_id", path, "annotation", i)
        category_id = _int_field(annotation, "category_id", path, "annotation", i)
        if image_id not in found:
            raise AnnotationError(
                f"{path}: annotation #{i} refers to image id {image_id}, which is not in 'images'"
            )
        if category_id not in categories:
            raise AnnotationError(
                f"{path}: annotation #{i} (image id {image_id}) refers to category id "
                f"{category_id}, which is not in 'categories'"
            )
        found[image_id].add(categories[category_id])
    return images, {image_id: sorted(names) for image_id, names in found.items()}


def _read_captions(path: Path) -> tuple[Set[int], Dict[int, List[str]]]:
    data = _read_json_object(path, "captions")
    image_ids = set(_read_images(data, path))
    captions: Dict[int, List[str]] = {image_id: [] for image_id in image_ids}
    for i, annotation in enumerate(_list_field(data, "annotations", path)):
        image_id = _int_field(annotation, "image_id", path, "annotation", i)
        caption = annotation.get("caption")
        if not isinstance(caption, str):
            raise AnnotationError(
                f"{path}: annotation #{i} (image id {image_id}): field 'caption' is missing or "
                f"not a string"
            )
        if image_id not in captions:
            raise AnnotationError(
                f"{path}: annotation #{i} refers to image id {image_id}, which is not in 'images'"
            )
        captions[image_id].append(caption)
    return image_ids, captions


def load_coco(
    annotations_dir: str | Path,
    *,
    instances_file: str = DEFAULT_INSTANCES_FILE,
    captions_file: Optional[str] = DEFAULT_CAPTIONS_FILE,
) -> CocoAnnotations:
    """Read and check a COCO-layout annotation directory.

    Args:
        annotations_dir: directory holding the files (COCO's ``annotations/``).
        instances_file: instances file name (relative to ``annotations_dir``, or absolute).
        captions_file: captions file name, or None to skip captions (POPE needs none).

    Raises:
        AnnotationError: a file is missing, is not valid JSON, lacks ``images`` /
            ``annotations`` / ``categories``, or has an annotation with a missing field or an
            unknown image or category id (the message names the file and the id).
    """
    directory = Path(annotations_dir)
    instances_path = directory / instances_file
    images, objects = _read_instances(instances_path)
    coco = CocoAnnotations(images=images, objects=objects, instances_path=instances_path)
    if captions_file:
        coco.captions_path = directory / captions_file
        coco._caption_image_ids, coco.captions = _read_captions(coco.captions_path)
    return coco
