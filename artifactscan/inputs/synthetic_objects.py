"""The built-in object-discovery data set ("objects"): images with one or two large objects and their boxes.

Why it exists: the "shapes" set (:mod:`artifactscan.inputs.synthetic`) draws 3–4 px squares at 32 px, smaller than
one 4 px patch, so a box made of whole patches reaches IoU 0.25–0.5 at best when a square straddles patches and
CorLoc (IoU >= 0.5) measures the grid, not the method. Here objects are 3/8 to 5/8 of the image side (12–20 px at
32 px: 3–5 patches of 4 px), so a patch-aligned box can always reach IoU >= 0.5 and CorLoc measures discovery.

Each image: the shapes set's background (grey with a per-image tint, Gaussian noise sd 0.03) and 1 or 2 (a fair
coin) axis-aligned rectangles in the shapes colours, each side drawn independently, the second one placed without
overlapping the first (1 px apart; when 20 tries fail the image keeps one object). A pure function of
``(seed, split, index)``, like the shapes set. ``boxes(i)`` gives the ground truth as ``[x0, y0, x1, y1]`` pixels
(half-open: ``x1 - x0`` is the width).
"""

from __future__ import annotations

import numpy as np
import torch

from artifactscan.inputs.synthetic import COLOURS, SyntheticImages, background_colour, noisy_background

MIN_SIDE = 3 / 8  # of the image side
MAX_SIDE = 5 / 8
_TAG = 7001  # its own random stream: never the same pixels as the shapes set


class SyntheticObjects(SyntheticImages):
    """On-the-fly object-discovery images: ``ds[i]`` -> ``(float tensor 3xHxW in [0, 1], number of objects)``.

    Args:
        num_images: length of the data set.
        seed: base seed; the same ``(seed, split, index)`` always gives the same image.
        img_size: side in pixels (at least 8).
        split: any name; different splits never share an image.
    """

    def __init__(self, num_images: int, seed: int = 0, img_size: int = 32, split: str = "val"):
        super().__init__(num_images, seed, img_size, split, "synthetic-objects")
        self._split_tag = sum(split.encode()) + 31 * len(split)
        self._lo = max(2, round(img_size * MIN_SIDE))
        self._hi = max(self._lo, round(img_size * MAX_SIDE))

    def _rng(self, index: int) -> np.random.Generator:
        return self.stream(index, _TAG, self._split_tag)

    def describe(self, index: int) -> dict:
        """The scene of image ``index``: ``boxes`` (``[x0, y0, x1, y1]`` pixels), ``colours`` and the rng."""
        rng = self._rng(index)
        s = self.img_size
        want = 1 + int(rng.random() < 0.5)
        boxes: list[list[int]] = []
        for _ in range(want):
            for _try in range(20):
                w, h = (int(v) for v in rng.integers(self._lo, self._hi + 1, size=2))
                x0, y0 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
                box = [x0, y0, x0 + w, y0 + h]
                if all(_apart(box, b) for b in boxes):
                    boxes.append(box)
                    break
        colours = rng.permutation(len(COLOURS))[:len(boxes)]
        return {"boxes": boxes, "colours": [int(c) for c in colours], "background": background_colour(rng),
                "_rng": rng}

    def render(self, index: int) -> tuple[np.ndarray, list[list[int]]]:
        """``(image float32 3xHxW in [0, 1], boxes)`` for ``index``."""
        scene = self.describe(index)
        rng = scene.pop("_rng")
        img = noisy_background(scene["background"], self.img_size, rng)
        for (x0, y0, x1, y1), c in zip(scene["boxes"], scene["colours"]):
            img[:, y0:y1, x0:x1] = COLOURS[c][:, None, None]
        np.clip(img, 0.0, 1.0, out=img)
        return img, scene["boxes"]

    def boxes(self, index: int) -> list[list[int]]:
        """The ground-truth boxes of image ``index`` (cheap: no pixels are drawn)."""
        return self.describe(index)["boxes"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, boxes = self.render(index)
        return torch.from_numpy(img), len(boxes)


def _apart(a: list[int], b: list[int]) -> bool:
    """True when boxes ``a`` and ``b`` do not overlap and leave at least 1 px between them."""
    return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
