"""Where the image tokens of a vision-language prompt come from: images, views, patches, pixels.

A vision-language model (LLaVA, Idefics3 / SmolVLM) puts each image into its language model's
sequence as runs of image tokens. This module maps every image token back to its picture:

- :func:`image_views`: the runs of image tokens grouped into :class:`ImageView` grids, one per
  image for LLaVA (the patch grid, row-major); for Idefics3 / SmolVLM (an image split
  row-major into tiles, each a run behind its ``<row_r_col_c>`` marker and pixel-shuffled so
  token k of a run is block (k // g, k % g), then a global view of the whole picture) one
  "whole" view assembled from the tiles and the "global" view apart;
- :func:`probe_boxes`: each cell's rectangle in the *original* picture's pixels, found by running
  the model's own image processor on a picture whose pixels hold their own coordinates, so
  every resize, crop, pad and split the processor does is accounted for exactly (to about a
  pixel of interpolation at the edges);
- :func:`region_cells`: cells grouped k x k into regions, one variant each.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

_MARKER = re.compile(r"<row_(\d+)_col_(\d+)>")


@dataclass
class ImageView:
    """One grid of image tokens.

    Attributes:
        image: index of the image in the prompt (0-based, in order of appearance).
        view: "whole" (the picture: a patch grid, or the tiles assembled), or "global" (the
            down-scaled whole picture a tiling model adds after the tiles).
        grid: (rows, cols) of cells.
        positions: [rows * cols] token position of each cell, row-major.
        frames: [rows * cols] (frame index into the image's processed frames, block row,
            block col, blocks per side) of each cell, for :func:`probe_boxes`.
        boxes: [rows * cols] (x0, y0, x1, y1) of each cell in the original picture's pixels,
            once known.
    """

    image: int
    view: str
    grid: tuple[int, int]
    positions: list[int]
    frames: list[tuple[int, int, int, int]]
    boxes: list[tuple[float, float, float, float]] | None = field(default=None)


def _runs(ids: Sequence[int], token: int) -> list[tuple[int, int]]:
    """(start, end) of every maximal run of ``token`` in ``ids``."""
    runs, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _square(n: int, what: str) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise NotImplementedError(f"{what} holds {n} image tokens, not a square grid: the "
                                  "patch layout of this model is not known")
    return g


def image_views(family: str, ids: Sequence[int], image_token: int,
                token_text: Callable[[int], str],
                grids: Sequence[tuple[int, int]] | None = None) -> list[ImageView]:
    """The image views of a prompt.

    Args:
        family: "llava" (one square run per image), "idefics3" (tiles behind
            ``<row_r_col_c>`` markers, then a global view) or "qwen2_vl" (one run per image,
            row-major over the merged patch grid given by ``grids``).
        ids: the prompt's token ids.
        image_token: the image token id.
        token_text: the text of a token id (to read the tile markers).
        grids: "qwen2_vl": (rows, cols) of each image's merged patch grid.
    """
    runs = _runs(ids, image_token)
    if not runs:
        return []
    if family == "qwen2_vl":
        if grids is None or len(grids) != len(runs):
            raise ValueError(f"the prompt has {len(runs)} image runs but image_grid_thw gives "
                             f"{0 if grids is None else len(grids)} grids")
        views = []
        for i, ((a, b), (rows, cols)) in enumerate(zip(runs, grids, strict=True)):
            if rows * cols != b - a:
                raise ValueError(f"image {i}: {b - a} image tokens, but its grid is "
                                 f"{rows} x {cols}")
            views.append(ImageView(i, "whole", (rows, cols), list(range(a, b)),
                                   [(0, k // cols, k % cols, 0) for k in range(b - a)]))
        return views
    if family == "llava":
        views = []
        for i, (a, b) in enumerate(runs):
            g = _square(b - a, f"image {i}")
            views.append(ImageView(i, "whole", (g, g), list(range(a, b)),
                                   [(0, k // g, k % g, g) for k in range(b - a)]))
        return views
    if family != "idefics3":
        raise ValueError(f"unknown image layout family {family!r}")
    views: list[ImageView] = []
    tiles: list[tuple[int, int, int, int]] = []  # (row, col, start, end) of the current image
    for a, b in runs:
        marker = token_text(ids[a - 1]) if a > 0 else ""
        found = _MARKER.search(marker)
        if found:
            tiles.append((int(found.group(1)) - 1, int(found.group(2)) - 1, a, b))
            continue
        g = _square(b - a, f"image {len(views)}")  # a global view ends the image
        image = len({v.image for v in views})
        frame = len(tiles)
        glob = ImageView(image, "global", (g, g), list(range(a, b)),
                         [(frame, k // g, k % g, g) for k in range(b - a)])
        if tiles:
            rows = 1 + max(r for r, _, _, _ in tiles)
            cols = 1 + max(c for _, c, _, _ in tiles)
            if len(tiles) != rows * cols:
                raise NotImplementedError(f"image {image}: {len(tiles)} tiles do not fill a "
                                          f"{rows} x {cols} grid")
            tg = _square(tiles[0][3] - tiles[0][2], f"image {image}'s first tile")
            positions = [0] * (rows * cols * tg * tg)
            frames: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * len(positions)
            for t, (r, c, s, e) in enumerate(tiles):
                if e - s != tg * tg:
                    raise NotImplementedError(f"image {image}: tiles of unequal size")
                for k in range(e - s):
                    cell = (r * tg + k // tg) * (cols * tg) + c * tg + k % tg
                    positions[cell] = s + k
                    frames[cell] = (t, k // tg, k % tg, tg)
            views.append(ImageView(image, "whole", (rows * tg, cols * tg), positions, frames))
            views.append(glob)
        else:  # not split: the one view is the whole picture
            glob.view = "whole"
            views.append(glob)
        tiles = []
    if tiles:
        raise NotImplementedError("tiles of an image without its global view: the prompt's "
                                  "image tokens do not follow the Idefics3 layout")
    return views


def region_cells(grid: tuple[int, int], k: int) -> list[list[int]]:
    """Row-major cell indices of each k x k region of a grid (the last row/column of regions
    is smaller where k does not divide the grid: a ragged edge, never a dropped cell)."""
    rows, cols = grid
    out = []
    for r0 in range(0, rows, k):
        for c0 in range(0, cols, k):
            out.append([r * cols + c for r in range(r0, min(r0 + k, rows))
                        for c in range(c0, min(c0 + k, cols))])
    return out


def picture_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, an [H, W, C] array or a [C, H, W] tensor."""
    if hasattr(image, "size") and isinstance(getattr(image, "size", None), tuple):
        w, h = image.size  # PIL
        return int(h), int(w)
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        return int(arr.shape[1]), int(arr.shape[2])
    if arr.ndim in (2, 3):
        return int(arr.shape[0]), int(arr.shape[1])
    raise ValueError(f"an image must be a PIL image or an [H, W, C] array, got shape "
                     f"{arr.shape}")


def probe_boxes(image_processor: Any, size: tuple[int, int], views: list[ImageView]) -> None:
    """Fill ``boxes`` of ``views`` (all of one image) in original-picture pixels.

    The processor runs on a float picture of ``size`` whose channels hold x, y and 1 (with its
    rescaling and normalisation off): after its resize/crop/pad/split, each processed pixel
    holds the original coordinates it came from, and padding holds 0 in the third channel.
    A cell's box spans the coordinates of its block's pixels.
    """
    h, w = size
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5,
                         np.arange(w, dtype=np.float32) + 0.5, indexing="ij")
    probe = np.stack([xs / w, ys / h, np.ones_like(xs)], axis=-1)  # in [0, 1]
    out = image_processor(images=[probe], return_tensors="pt", do_rescale=False,
                          do_normalize=False)
    frames = out["pixel_values"]
    frames = frames.reshape(-1, *frames.shape[-3:]).to(torch.float64)  # [F, 3, S, S]
    for view in views:
        boxes = []
        for frame, br, bc, per_side in view.frames:
            if frame >= frames.shape[0]:
                raise NotImplementedError("the image processor made fewer frames than the "
                                          "prompt has image views")
            f = frames[frame]
            sh, sw = f.shape[-2] // per_side, f.shape[-1] // per_side
            block = f[:, br * sh:(br + 1) * sh, bc * sw:(bc + 1) * sw]
            valid = block[2] > 0.5
            if not bool(valid.any()):  # padding only
                boxes.append((0.0, 0.0, 0.0, 0.0))
                continue
            x, y = block[0][valid] * w, block[1][valid] * h
            # pixel centres -> edges: half a source pixel (or half a block) either side
            half_x = max(0.5, w / max(1, f.shape[-1]) / 2)
            half_y = max(0.5, h / max(1, f.shape[-2]) / 2)
            boxes.append((max(0.0, float(x.min()) - half_x), max(0.0, float(y.min()) - half_y),
                          min(float(w), float(x.max()) + half_x),
                          min(float(h), float(y.max()) + half_y)))
        view.boxes = boxes
