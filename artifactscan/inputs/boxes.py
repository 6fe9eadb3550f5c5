"""Images with ground-truth object boxes, for object discovery (``artifactscan discover``).

``load_box_data(DATA)`` reads, by what DATA is:

* ``synthetic-objects[:N]`` — the built-in object-discovery set (:mod:`artifactscan.inputs.synthetic_objects`);
* ``synthetic[:N]`` — the built-in shapes set, its squares as boxes (small: patch-level boxes cap IoU);
* a Pascal VOC-style folder (``JPEGImages/`` + ``Annotations/*.xml``): every annotation file, every object in it
  (difficult and truncated ones too, as LOST evaluates). VOC coordinates are 1-based and inclusive, so a box
  ``xmin..xmax`` becomes ``[xmin - 1, xmax)`` in pixels (as LOST reads them);
* a COCO-style ``.json`` (``images`` with ``file_name``/``width``/``height``, ``annotations`` with ``bbox`` =
  ``[x, y, w, h]``), its images under ``image_root`` (default: the JSON's folder);
* a COCO-style folder: one ``instances_*.json`` in it or in its ``annotations/`` (:func:`coco_in_folder`);
* any other image folder or file: images without boxes (boxes are discovered and drawn; no CorLoc).

Boxes are ``[x0, y0, x1, y1]`` pixels of the image as annotated (half-open). A box more than 1 px outside its image,
or empty, or not made of numbers, is refused with the file and the box named; so is a VOC annotation naming a missing
image file, and an image whose file has another shape than its annotated width and height. A COCO image whose file is
missing is skipped with a warning (refused when none is left), as are annotations of ids the JSON does not list; a
file that is a uniformly scaled copy of the annotated size keeps its boxes, read relative to the annotated size, with
a warning.

For discovery every image is resized *whole* to the model's input (no crop, so no box leaves the view);
IoU is unchanged by that per-axis scaling, so CorLoc is the same as in the original pixels. A measurement that
runs the model's own preprocessing instead (``signatures``) maps the boxes through it:
:meth:`BoxedData.model_input_boxes`.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from artifactscan.core.errors import InputError, option
from artifactscan.core.paths import display_name, open_regular, read_regular_text, what_it_is
from artifactscan.inputs.images import ImageFolderDataset, collate_skip_bad, discover_images, upright_size
from artifactscan.inputs.sources import ImageSource, NormalizedTensors, parse_synthetic
from artifactscan.inputs.synthetic import SyntheticShapes
from artifactscan.inputs.synthetic_objects import SyntheticObjects
from artifactscan.inputs.transforms import eval_transform

DEFAULT_OBJECT_IMAGES = 128
BOX_TOLERANCE_PX = 1.0


@dataclass
class BoxedItem:
    """One image: its name, file (None for built-in data), annotated size and ground-truth boxes (None: unknown)."""

    name: str
    path: str | None
    width: int
    height: int
    boxes: list[list[float]] | None


@dataclass
class BoxedData:
    """A data set for object discovery: ``kind`` is synthetic-objects / synthetic / voc / coco / images."""

    kind: str
    description: str
    items: list[BoxedItem]
    notes: list[str] = field(default_factory=list)
    synthetic: Dataset | None = None
    # what reading the annotations passed over or adjusted (images missing, sizes that differ): one line each, said
    # as warnings and kept in the report's notes
    warnings: list[str] = field(default_factory=list)

    @property
    def has_boxes(self) -> bool:
        return any(it.boxes is not None for it in self.items)

    def image_source(self, loaded: Any) -> ImageSource:
        """The images resized whole to ``loaded``'s input and normalised with its mean/std."""
        cfg, size = loaded.data_config, loaded.input_size
        names = [it.name for it in self.items]
        if self.synthetic is not None:
            ds = NormalizedTensors(self.synthetic, cfg["mean"], cfg["std"], size)
            return ImageSource(ds, names, self.description, None, len(names))
        folder = ImageFolderDataset([it.path for it in self.items], ResizeNormalise(size, cfg["mean"], cfg["std"]))
        return ImageSource(folder, names, self.description, collate_skip_bad, len(names), folder)

    def model_input_boxes(self, loaded: Any) -> list[list[list[float]]] | None:
        """Each image's boxes in the pixels of ``loaded``'s input, as its preprocessing makes that input: the
        built-in sets are resized whole (:class:`NormalizedTensors`), files go through the model's eval transform
        (resize, then centre crop: a box the crop cuts is clipped, one it cuts off entirely is dropped). ``None``
        when the transform is one whose geometry is not mapped here (timm's own, for crop modes
        :func:`eval_transform` does not rebuild). The mapping uses the annotated size; a file decoded at reduced
        size (docs/data-path.md) is resized from a size that may round differently, by at most a pixel."""
        H, W = (int(v) for v in loaded.input_size)
        if self.synthetic is not None:
            return [[[b[0] * W / it.width, b[1] * H / it.height, b[2] * W / it.width, b[3] * H / it.height]
                     for b in it.boxes or []] for it in self.items]
        transform = eval_transform(loaded.data_config)
        if transform is None:
            return None
        return [[m for b in it.boxes or [] if (m := transform.map_box(b, it.width, it.height)) is not None]
                for it in self.items]

    def scan_images(self) -> Dataset | list[str]:
        """The same images in a form :func:`artifactscan.scan` and the fix's neuron search accept."""
        if self.synthetic is not None:
            return self.synthetic
        return [it.path for it in self.items]  # type: ignore[misc]


class ResizeNormalise:
    """PIL RGB image -> ``[3, H, W]`` tensor: resized whole (bicubic, aspect not kept) and normalised."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]):
        self.size = (int(size[0]), int(size[1]))
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        h, w = self.size
        arr = np.asarray(img.resize((w, h), Image.BICUBIC), dtype=np.uint8)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std


def check_box(box: Sequence[float], width: float, height: float, where: str) -> list[float]:
    """A box inside its image (clipped when within 1 px outside), or InputError naming ``where``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    t = BOX_TOLERANCE_PX
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise InputError(f"{where}: box {list(box)} is not made of finite numbers")
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        raise InputError(f"{where}: box [x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g}] lies outside the "
                         f"{width:g}x{height:g} image; fix the annotation (boxes must be within the image)")
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"{where}: box {list(box)} is empty (x1 <= x0 or y1 <= y0); fix the annotation")
    return [x0, y0, x1, y1]


def _image_size(path: Path, where: str) -> tuple[int, int]:
    """The size of the image as decoded (EXIF orientation applied), from its header."""
    why = what_it_is(path)
    if why is not None:  # Image.open on a named pipe would block
        raise InputError(f"{where}: cannot read the size of {display_name(path)}: it {why}")
    try:
        return upright_size(path)
    except Exception as exc:
        raise InputError(f"{where}: cannot read the size of {display_name(path)}: {exc}") from None


def check_declared_size(path: Path, width: int, height: int, where: str) -> bool:
    """Whether the file's decoded size differs from the annotated ``width`` x ``height`` by a uniform scale (then
    the boxes still fit it: the image is resized whole for the measurement and the boxes are read relative to the
    annotated size); ``False`` when the sizes agree. Any other difference is refused: the boxes would not be where
    the annotation put them. An unreadable file passes here: decoding skips it later, with its warning."""
    try:
        w, h = _image_size(path, where)
    except InputError:
        return False
    if (w, h) == (width, height):
        return False
    if abs(w * height - h * width) > max(width, height):  # not the same shape, even allowing a pixel of rounding
        raise InputError(f"{where}: the annotation says {width}x{height} but {display_name(path)} is {w}x{h} (not "
                         "the same shape): its boxes cannot be placed on it; fix the annotated width and height")
    return True


# ----------------------------------------------------------------------------------------------- VOC
def _voc_number(node: ET.Element | None, tag: str, where: str) -> float:
    child = node.find(tag) if node is not None else None
    try:
        return float(child.text)  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, ValueError):
        raise InputError(f"{where}: missing or non-numeric <{tag}>") from None


def load_voc(root: Path) -> BoxedData:
    """A Pascal VOC-style folder: ``Annotations/*.xml`` naming images in ``JPEGImages/``."""
    images_dir, ann_dir = root / "JPEGImages", root / "Annotations"
    xmls = sorted(ann_dir.glob("*.xml"))
    if not xmls:
        raise InputError(f"{ann_dir} holds no .xml annotation files; a VOC-style folder needs Annotations/*.xml "
                         "next to JPEGImages/")
    if not images_dir.is_dir() or not any(images_dir.iterdir()):
        raise InputError(f"{images_dir} is missing or empty: the {len(xmls)} annotations in {ann_dir} have no "
                         "images; put the JPEG files in JPEGImages/")
    items, rescaled = [], []
    for xml in xmls:
        where = f"{xml.name}"
        try:
            with open_regular(xml) as f:  # a named pipe among the annotations is refused, not waited on
                tree = ET.parse(f).getroot()
        except ET.ParseError as exc:
            raise InputError(f"{where}: not a readable VOC annotation ({exc})") from None
        fname = (tree.findtext("filename") or f"{xml.stem}.jpg").strip()
        path = images_dir / fname
        if not path.is_file():
            raise InputError(f"{where} names image {fname}, which is not in {images_dir}; fix the <filename> or "
                             "add the image")
        size = tree.find("size")
        if size is not None and size.find("width") is not None:
            w, h = int(_voc_number(size, "width", where)), int(_voc_number(size, "height", where))
            if check_declared_size(path, w, h, where):
                rescaled.append(fname)
        else:
            w, h = _image_size(path, where)
        boxes = []
        for obj in tree.findall("object"):
            bb = obj.find("bndbox")
            x0, y0 = _voc_number(bb, "xmin", where) - 1, _voc_number(bb, "ymin", where) - 1
            x1, y1 = _voc_number(bb, "xmax", where), _voc_number(bb, "ymax", where)
            boxes.append(check_box([x0, y0, x1, y1], w, h, f"{where} ({obj.findtext('name') or 'object'})"))
        items.append(BoxedItem(fname, str(path), w, h, boxes))
    warnings = [f"{ann_dir}: {len(rescaled)} image file(s) have another size than annotated, at the same shape "
                f"(first: {rescaled[0]}); their boxes are read relative to the annotated size"] if rescaled else []
    return BoxedData("voc", f"{root} (VOC-style, {len(items)} annotated images)", items, warnings=warnings)


# ----------------------------------------------------------------------------------------------- COCO
def _coco_number(value: Any, what: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {what} {value!r} is not a number; fix the annotation") from None
    return number


def load_coco(json_path: Path, image_root: Path | None = None) -> BoxedData:
    """A COCO-style JSON (``images`` + ``annotations`` with ``bbox = [x, y, w, h]``) and its image folder.

    Images listed whose file is missing are skipped with a warning (refused when none is left), as are annotations
    of image ids that ``images`` does not list; a file whose size differs from the annotated one by a uniform scale
    is read relative to the annotated size, with a warning (any other difference is refused)."""
    root = image_root or json_path.parent
    try:
        data = json.loads(read_regular_text(json_path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{json_path}: not a readable COCO-style JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{json_path}: a COCO-style JSON needs an 'images' list (and 'annotations')")
    if not data["images"]:
        raise InputError(f"{json_path} lists no images ('images' is empty); nothing to discover")
    name = json_path.name
    by_image: dict[Any, list[tuple[Any, Any]]] = {}
    for ann in data.get("annotations") or []:
        if isinstance(ann, dict) and "bbox" in ann and "image_id" in ann:
            by_image.setdefault(ann["image_id"], []).append((ann.get("id"), ann["bbox"]))
    items, missing, rescaled = [], [], []
    listed: set[Any] = set()
    for img in data["images"]:
        try:
            fname, iid = str(img["file_name"]), img["id"]
        except (KeyError, TypeError):
            raise InputError(f"{json_path}: every entry of 'images' needs 'id' and 'file_name'") from None
        listed.add(iid)
        path = root / fname
        if not path.is_file():
            missing.append(fname)
            continue
        where = f"{name} (image {fname})"
        if "width" in img and "height" in img:
            w, h = (int(_coco_number(img[k], k, where)) for k in ("width", "height"))
            if check_declared_size(path, w, h, where):
                rescaled.append(fname)
        else:
            w, h = _image_size(path, name)
        boxes = []
        for ann_id, bb in by_image.get(iid, []):
            what = f"annotation {ann_id}" if ann_id is not None else "an annotation"
            if not isinstance(bb, (list, tuple)) or len(bb) != 4:
                raise InputError(f"{where}, {what}: bbox {bb!r} is not [x, y, w, h]")
            x, y, bw, bh = (_coco_number(v, "bbox value", f"{where}, {what}") for v in bb)
            boxes.append(check_box([x, y, x + bw, y + bh], w, h, where))
        items.append(BoxedItem(fname, str(path), w, h, boxes))
    if not items:
        others = f" (nor is any of the {len(missing) - 1} other images listed)" if len(missing) > 1 else ""
        raise InputError(f"{name}: image {missing[0]} is not in {root}{others}; pass {option('image_root')} with the "
                         "folder that holds the images")
    warnings = []
    if missing:
        warnings.append(f"{name}: {len(missing)} of {len(data['images'])} listed images are not in {root} (first: "
                        f"{missing[0]}); skipped, with their boxes")
    orphans = [iid for iid in by_image if iid not in listed]
    if orphans:
        count = sum(len(by_image[i]) for i in orphans)
        warnings.append(f"{name}: {count} annotation(s) name image ids that 'images' does not list (first: id "
                        f"{orphans[0]!r}); ignored")
    if rescaled:
        warnings.append(f"{name}: {len(rescaled)} image file(s) have another size than annotated, at the same shape "
                        f"(first: {rescaled[0]}); their boxes are read relative to the annotated size")
    return BoxedData("coco", f"{json_path} (COCO-style, {len(items)} images)", items, warnings=warnings)


def coco_in_folder(folder: Path) -> tuple[Path, Path] | None:
    """A COCO-style folder's annotation file and image folder, or None when ``folder`` holds no ``instances_*.json``
    (in it or in its ``annotations/``). The images are in the folder named by the split (``instances_val2017.json``
    -> ``val2017/``) where it exists, as COCO ships them, else in ``folder`` itself. More than one annotation file is
    refused: which split to read is the user's choice."""
    found = sorted(folder.glob("instances_*.json")) + sorted((folder / "annotations").glob("instances_*.json"))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found[:4])
        raise InputError(f"{folder} holds {len(found)} COCO annotation files ({names}); pass the one to read "
                         f"(e.g. {found[0]}) and {option('image_root')} if its images are elsewhere")
    split = folder / found[0].stem[len("instances_"):]
    return found[0], split if split.is_dir() else folder


# ----------------------------------------------------------------------------------------------- dispatch
def names_boxed_data(data: str | Path) -> bool:
    """Whether :func:`load_box_data` reads ``data`` as a set with boxes (a built-in set, a VOC-style folder, a
    COCO-style JSON or folder) rather than as plain images, decided without reading any image."""
    spec = str(data)
    if parse_synthetic(spec, "synthetic-objects") is not None or parse_synthetic(spec) is not None:
        return True
    path = Path(spec).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".json"
    return path.is_dir() and ((path / "Annotations").is_dir() or (path / "JPEGImages").is_dir()
                              or coco_in_folder(path) is not None)



def load_box_data(data: str | Path | None, img_size: int, image_root: str | Path | None = None) -> BoxedData:
    """Read DATA (see the module docstring). ``img_size`` is the side of the built-in synthetic images."""
    if data is None:
        data = f"synthetic-objects:{DEFAULT_OBJECT_IMAGES}"
    spec = str(data)
    n = parse_synthetic(spec, "synthetic-objects", DEFAULT_OBJECT_IMAGES)
    if n is not None:
        ds = SyntheticObjects(n, seed=0, img_size=img_size, split="val")
        items = [BoxedItem(f"synthetic-objects[{i}]", None, img_size, img_size,
                           [[float(v) for v in b] for b in ds.boxes(i)]) for i in range(n)]
        return BoxedData("synthetic-objects", f"synthetic-objects:{n} (built-in object-discovery set)", items,
                         synthetic=ds)
    n = parse_synthetic(spec)
    if n is not None:
        shapes = SyntheticShapes(n, seed=0, img_size=img_size, split="val")
        items = []
        for i in range(n):
            boxes = [[float(x0), float(y0), float(x0 + s), float(y0 + s)] for y0, x0, s in shapes.describe(i)["boxes"]]
            items.append(BoxedItem(f"synthetic[{i}]", None, img_size, img_size, boxes))
        return BoxedData("synthetic", f"synthetic:{n} (built-in shapes set: squares smaller than a patch)", items,
                         notes=["the shapes set's squares are smaller than a patch: a box of whole patches caps IoU "
                                "at 0.25-0.5; use synthetic-objects for CorLoc"], synthetic=shapes)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".json":
        return load_coco(path, Path(image_root).expanduser() if image_root else None)
    coco = coco_in_folder(path) if path.is_dir() else None
    if coco is not None:
        return load_coco(coco[0], Path(image_root).expanduser() if image_root else coco[1])
    if path.is_dir() and ((path / "Annotations").is_dir() or (path / "JPEGImages").is_dir()):
        if not (path / "Annotations").is_dir():
            raise InputError(f"{path} has JPEGImages/ but no Annotations/; a VOC-style folder needs both (or pass "
                             "JPEGImages/ itself to discover boxes without ground truth)")
        return load_voc(path)
    if not path.exists() and ("/" not in spec and not path.suffix):
        raise InputError(f"DATA {spec!r} is not a folder, a file, synthetic-objects[:N] or synthetic[:N]")
    items = []
    for p in discover_images(path):
        try:
            w, h = _image_size(p, str(p))
        except InputError:  # unreadable: skipped with a warning when decoded
            w, h = 0, 0
        items.append(BoxedItem(str(p), str(p), w, h, None))
    return BoxedData("images", f"{spec} ({len(items)} images, no boxes)", items,
                     notes=["no ground-truth boxes: boxes are discovered and drawn, CorLoc is not measured"])
