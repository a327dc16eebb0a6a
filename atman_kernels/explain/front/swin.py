"""Swin image classifiers: shifted-window attention over a hierarchy of stages.

Swin attends within windows: each attention call's batch is images x windows of the current
stage (after padding the grid to a multiple of the window and, in every other block, a cyclic
shift by half a window), its keys one window's tokens; between stages a patch merging turns
each 2 x 2 tokens into one. So there is no token sequence the factors could index.

The units are the cells of the *final* stage's grid (7 x 7 for Swin-T at 224 pixels: each
covers 32 x 32 pixels). Stage ``s`` token (i, j) lies in final cell
(i >> k_s, j >> k_s), with ``k_s`` the patch mergings from stage ``s`` on (S - 1 - s in the
standard hierarchy; a merging of an odd grid pads it, so edge cells cover fewer tokens).
Suppressing a cell gives every token in its region the factor, as a key, in every attention
call of every block of every stage. Tokens the model adds as window padding lie in no cell
(factor 1; they are keys in Swin's own attention as well). Each block's window attention gets
a :class:`atman_kernels.suppression.KeyLayout`: the cell of each key of each window, found by
running the block's own ``maybe_pad``, ``cyclic_shift`` and the model file's
``window_partition`` on a grid of cell indices, and the keys each query may see, from the
block's own ``get_attn_mask`` (its -100 entries become excluded keys: a mask, not part of
paper mode's row minimum).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ...suppression import KeyLayout, key_layouts
from ..tasks import ClassificationTask
from ..units import Span, token_spans

_BLOCK_METHODS = ("set_shift_and_window_size", "maybe_pad", "cyclic_shift", "get_attn_mask")


def swin_stages(model: Any) -> list[Any] | None:
    """The stages (``encoder.layers``) of a Swin-style classifier, else None: stages with
    ``blocks`` that pad, shift and mask windows as Swin's blocks do."""
    base = getattr(model, "base_model", None)
    stages = getattr(getattr(base, "encoder", None), "layers", None)
    if not isinstance(stages, torch.nn.ModuleList) or len(stages) == 0:
        return None
    for stage in stages:
        blocks = getattr(stage, "blocks", None)
        if not isinstance(blocks, torch.nn.ModuleList) or not all(
                all(callable(getattr(b, m, None)) for m in _BLOCK_METHODS) for b in blocks):
            return None
    return list(stages)


@dataclass
class SwinUnits:
    """Model inputs (batch 1), the final cells (units, grid) and each window attention's
    layout."""

    model_inputs: dict[str, torch.Tensor]
    units: list[Span]
    grid: tuple[int, int]
    layouts: dict[torch.nn.Module, KeyLayout]
    cell_pixels: tuple[int, int]
    picture: torch.Tensor


def swin_units(model: Any, pixels: torch.Tensor) -> SwinUnits:
    """The units and window layouts of ``pixels`` [1, C, H, W] (on the model's device and
    dtype) for the Swin-style classifier ``model``."""
    from ...hf import interface_attention_modules

    name = type(model).__name__
    stages = swin_stages(model)
    if stages is None:
        raise TypeError(f"unsupported model class {name}: not a Swin-style hierarchy of "
                        "window-attention stages")
    base = model.base_model
    patch_embeddings = getattr(getattr(base, "embeddings", None), "patch_embeddings", None)
    if not isinstance(patch_embeddings, torch.nn.Module):
        raise TypeError(f"unsupported model class {name}: no embeddings.patch_embeddings")
    window_partition = getattr(sys.modules[type(stages[0].blocks[0]).__module__],
                               "window_partition", None)
    if not callable(window_partition):
        raise TypeError(f"unsupported model class {name}: its modeling file has no "
                        "window_partition, so its windows cannot be laid out")
    for stage in stages[:-1]:
        down = getattr(stage, "downsample", None)
        if down is not None and "PatchMerging" not in type(down).__name__:
            raise NotImplementedError(
                f"{name}: stage downsampling by {type(down).__name__}, not a 2 x 2 patch "
                "merging, so stage tokens cannot be mapped to final cells")
    if getattr(stages[-1], "downsample", None) is not None:
        raise NotImplementedError(f"{name}: its last stage downsamples (a backbone layout), "
                                  "so its attention grid is not the final grid")

    out = patch_embeddings(pixels)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"unsupported model class {name}: its patch embedding does not return "
                        "(embeddings, (rows, cols)) as Swin's does")
    dims = [tuple(int(d) for d in out[1])]
    merges = [getattr(stage, "downsample", None) is not None for stage in stages]
    for merged in merges[:-1]:
        h, w = dims[-1]
        dims.append(((h + 1) // 2, (w + 1) // 2) if merged else (h, w))
    grid = dims[-1]
    layouts: dict[torch.nn.Module, KeyLayout] = {}
    for s, (stage, (h, w)) in enumerate(zip(stages, dims, strict=True)):
        k = sum(merges[s:])
        rows = torch.arange(h) >> k
        cols = torch.arange(w) >> k
        cells = rows[:, None] * grid[1] + cols[None, :]  # [h, w] final cell of each token
        for block in stage.blocks:
            routed = interface_attention_modules(block)
            if len(routed) != 1:
                raise NotImplementedError(
                    f"{name}: a block of stage {s} ({type(block).__name__}) holds "
                    f"{len(routed)} attention modules that call transformers' attention "
                    "interface, not one, so its window attention cannot be suppressed")
            block.set_shift_and_window_size((h, w))  # what its forward does first
            window = int(block.window_size)
            # cell index + 1 as a float map [1, h, w, 1]: padding becomes 0, i.e. no cell
            grid_map = (cells + 1).to(torch.float64)[None, :, :, None]
            grid_map, _ = block.maybe_pad(grid_map, h, w)
            height, width = grid_map.shape[1:3]
            windows = window_partition(block.cyclic_shift(grid_map), window)
            positions = windows.reshape(-1, window * window).round().long() - 1
            mask = block.get_attn_mask(height, width, dtype=torch.float32,
                                       device=torch.device("cpu"))
            visible = None if mask is None else (mask == 0).reshape(
                positions.shape[0], window * window, window * window)
            device = pixels.device
            layouts[routed[0]] = KeyLayout(
                positions.to(device), None if visible is None else visible.to(device))
    patch = getattr(patch_embeddings, "patch_size", (1, 1))
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    scale = 2 ** sum(merges)
    n = grid[0] * grid[1]
    units = token_spans([f"cell({i // grid[1]},{i % grid[1]})" for i in range(n)],
                        list(range(n)), source="image")
    return SwinUnits(model_inputs={"pixel_values": pixels}, units=units, grid=grid,
                     layouts=layouts, cell_pixels=(patch[0] * scale, patch[1] * scale),
                     picture=pixels[0].detach().float().cpu())


class WindowedClassificationTask(ClassificationTask):
    """A classifier whose window attentions read their :class:`KeyLayout` (every forward runs
    inside :func:`atman_kernels.suppression.key_layouts`)."""

    def __init__(self, model: Any, inputs: dict[str, torch.Tensor], seq_len: int,
                 labels: list[int], *, layouts: dict[torch.nn.Module, KeyLayout]) -> None:
        super().__init__(model, inputs, seq_len, labels)
        self.layouts = layouts
        # for the memory estimate: the largest block's tokens (queries of all its windows
        # together) and one window's keys, not the number of cells the factors index
        self.attention_shape = max(((int(lay.positions.numel()), int(lay.positions.shape[1]))
                                    for lay in layouts.values()), default=None)

    @contextmanager
    def _laid_out(self) -> Iterator[None]:
        with key_layouts(self.layouts):
            yield

    def baseline(self) -> torch.Tensor:
        with self._laid_out():
            return super().baseline()

    def run(self, batch: int, start: int) -> torch.Tensor:
        with self._laid_out():
            return super().run(batch, start)
