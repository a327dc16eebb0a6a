"""Score maps drawn over pictures (PIL images): an image-text explanation's views
(:func:`view_image`) and an image classifier's patch heatmap, for the HTML page and the PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .common import _unit_scores, score_rgb

if TYPE_CHECKING:
    from ..explanation import Explanation


def _picture_array(picture: Any) -> np.ndarray:
    """A picture as an [H, W, 3] uint8 array (PIL image, [H, W, C] or [C, H, W] array)."""
    if hasattr(picture, "convert"):  # PIL
        return np.asarray(picture.convert("RGB"))
    arr = picture.detach().cpu().numpy() if torch.is_tensor(picture) else np.asarray(picture)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"a picture must be a PIL image or an [H, W, 3] array, got shape "
                         f"{arr.shape}")
    arr = arr[..., :3] if arr.shape[-1] != 1 else np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        scale = 255.0 if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0 else 1.0
        arr = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _alpha(unit: float) -> int:
    """Opacity of a map cell over its picture: a faint veil at 0, strong at |score| = 1."""
    return int(40 + 170 * abs(unit))


def view_image(expl: Explanation, image: int = 0, view: str = "whole", *,
               picture: Any = None, side: int = 384):
    """One image view's score map as a PIL image, longer side ``side`` pixels.

    With a picture (``picture``, else ``expl.images[image]``): the picture scaled to ``side``
    and each image unit's colour blended over it, on the unit's ``box`` (its rectangle in the
    original picture) when every unit of the view has one, else on the view's grid stretched
    over the picture. Without a picture: the bare grid, square cells. Colours on the scale of
    all units (:func:`score_rgb` of the score over the largest |score|).
    """
    from PIL import Image

    base, overlay, mask = view_layers(expl, image, view, picture=picture, side=side)
    if base is None:
        return overlay
    return Image.composite(overlay, base, mask)


def view_layers(expl: Explanation, image: int = 0, view: str = "whole", *,
                picture: Any = None, side: int = 384):
    """The two layers :func:`view_image` blends: (picture, map colours, map opacity mask), PIL
    images of one size ("RGB", "RGB", "L"); without a picture (None, the bare grid, None).
    ``Image.composite(colours, picture, mask)`` is :func:`view_image`."""
    from PIL import Image, ImageDraw

    if expl.kind != "image_text":
        raise ValueError(f"view_image needs an image-text explanation, got kind {expl.kind!r}")
    if isinstance(side, bool) or not isinstance(side, int) or side < 16:
        raise ValueError(f"side must be an int >= 16 pixels, got {side!r}")
    found = [v for v in expl.image_views if v["image"] == image and v["view"] == view]
    if not found:
        have = sorted({(v["image"], v["view"]) for v in expl.image_views})
        raise ValueError(f"no image view ({image}, {view!r}); this explanation has {have}")
    rows, cols = (int(x) for x in found[0]["grid"])
    cells = [int(c) for c in found[0]["cells"]]
    if picture is None and expl.images is not None and image < len(expl.images):
        picture = expl.images[image]
    units = _unit_scores(expl.scores)
    heat = Image.new("RGB", (cols, rows))
    alpha = Image.new("L", (cols, rows))
    for k, u in enumerate(cells):
        heat.putpixel((k % cols, k // cols), score_rgb(units[u]))
        alpha.putpixel((k % cols, k // cols), _alpha(units[u]))
    if picture is None:
        cell = max(2, side // max(rows, cols))
        return None, heat.resize((cols * cell, rows * cell), Image.NEAREST), None
    pic = _picture_array(picture)
    h, w = pic.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = Image.fromarray(pic).resize(size, Image.BILINEAR)
    boxes = [expl.spans[u].box for u in cells]
    if all(b is not None for b in boxes):
        overlay = Image.new("RGB", size, "white")
        mask = Image.new("L", size, 0)
        draw_o, draw_m = ImageDraw.Draw(overlay), ImageDraw.Draw(mask)
        for u in dict.fromkeys(cells):  # each unit once (a region covers several cells)
            x0, y0, x1, y1 = (float(b) * scale for b in expl.spans[u].box)
            x0, y0, x1, y1 = round(x0), round(y0), round(x1) - 1, round(y1) - 1
            if x1 < x0 or y1 < y0:  # a cell of padding only: nothing of the picture
                continue
            draw_o.rectangle([x0, y0, x1, y1], fill=score_rgb(units[u]))
            draw_m.rectangle([x0, y0, x1, y1], fill=_alpha(units[u]))
    else:
        overlay = heat.resize(size, Image.NEAREST)
        mask = alpha.resize(size, Image.NEAREST)
    return base, overlay, mask


def _view_images(expl: Explanation, images: Sequence[Any] | None, side: int) -> list:
    """(PIL image, caption) of every view: each picture's "whole" map at ``side``, its
    "global" map (tiling models) at half."""
    from PIL import Image

    return [(overlay if base is None else Image.composite(overlay, base, mask), caption)
            for base, overlay, mask, caption in _view_layer_list(expl, images, side)]


def _view_layer_list(expl: Explanation, images: Sequence[Any] | None, side: int) -> list:
    """(picture, map colours, map mask, caption) of every view (:func:`view_layers`), in the
    order and sizes of :func:`_view_images`."""
    pictures = list(images) if images is not None else expl.images
    out = []
    for v in sorted(expl.image_views, key=lambda v: (v["image"], v["view"] != "whole")):
        i, name = v["image"], v["view"]
        picture = pictures[i] if pictures is not None and i < len(pictures) else None
        small = name == "global"
        base, overlay, mask = view_layers(expl, i, name, picture=picture,
                                          side=side // 2 if small else side)
        rows, cols = v["grid"]
        what = "global view" if small else "whole picture"
        out.append((base, overlay, mask, f"image {i}: {what}, {rows} x {cols} cells"
                    + ("" if picture is not None else " (no picture given)")))
    return out


def _image_heatmap(expl: Explanation, image: torch.Tensor | None):
    """An image classifier's patch map over its picture (bare, 32 px cells, without one)."""
    from PIL import Image

    base, overlay, mask = _image_layers(expl, image)
    return overlay if base is None else Image.composite(overlay, base, mask)


def _image_layers(expl: Explanation, image: torch.Tensor | None):
    """The layers :func:`_image_heatmap` blends: (picture, map colours, map opacity mask), or
    (None, the bare map, None) without a picture."""
    from PIL import Image

    rows, cols = expl.patch_grid
    units = _unit_scores(expl.scores)
    heat = Image.new("RGB", (cols, rows))
    alpha = Image.new("L", (cols, rows))
    for idx, unit in enumerate(units):
        heat.putpixel((idx % cols, idx // cols), score_rgb(unit))
        alpha.putpixel((idx % cols, idx // cols), int(40 + 170 * abs(unit)))
    if image is None:
        size = (cols * 32, rows * 32)
        return None, heat.resize(size, Image.NEAREST), None
    pic = image.detach().to(torch.float32).cpu()
    if pic.dim() == 4 and pic.shape[0] == 1:
        pic = pic[0]
    if pic.dim() != 3 or pic.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape [3, H, W] (or [1, 3, H, W]), got "
                         f"{tuple(image.shape)}")
    lo, hi = float(pic.min()), float(pic.max())
    pic = (pic - lo) / (hi - lo) if hi > lo else torch.zeros_like(pic)
    pic = (pic * 255).round().to(torch.uint8).expand(3, -1, -1).permute(1, 2, 0).contiguous()
    base = Image.fromarray(pic.numpy(), mode="RGB")
    h, w = pic.shape[0], pic.shape[1]
    scale = max(1, -(-224 // min(h, w)))
    size = (w * scale, h * scale)
    base = base.resize(size, Image.BILINEAR)
    overlay = heat.resize(size, Image.NEAREST)
    mask = alpha.resize(size, Image.NEAREST)
    return base, overlay, mask
