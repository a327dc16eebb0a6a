"""The suppression factors of one attention call: which factor applies to each key.

By absolute key position (factors for the whole sequence, keys 0 .. Nk-1 of a cached
prefix), or, for windowed attention (Swin), through a
:class:`atman_kernels.suppression.KeyLayout`: the factor column of every key of every window
and the keys each window's queries may see.
"""

from __future__ import annotations

import torch

from ..suppression import KeyLayout, Suppression, make_suppression
from ._tags import _layer_index, _where


def _suppression_from_kwargs(kwargs: dict) -> Suppression | None:
    factors = kwargs.get("atman_factors")
    if factors is None:
        return None
    return make_suppression(
        factors,
        kwargs.get("atman_mode") or "paper",
        kwargs.get("atman_layers"),
        prefix="atman_",
        check_values=False,
    )


def _factors_for_call(
    state: Suppression,
    module: torch.nn.Module,
    len_k: int,
    key_offset: int,
    batch: int,
    device,
    layout: KeyLayout | None = None,
) -> torch.Tensor | None:
    if not state.applies_to(_layer_index(module)):
        return None
    if layout is not None:
        return _layout_factors(state, layout, batch, device)
    factors = state.factors_for_keys(len_k, key_offset).to(device)
    variants = factors.shape[0]
    if variants == batch:
        return factors
    if variants == 1:
        return factors.expand(batch, len_k)
    if batch == 1:
        raise ValueError(
            f"the suppression factors hold {variants} variants but the model's batch is 1; "
            f"feed the input once per variant (e.g. input_ids.expand({variants}, -1))"
        )
    raise ValueError(
        f"the suppression factors hold {variants} variants but the model's batch is {batch}; "
        "they must match (or factors must have 1 row)"
    )


def _layout_factors(
    state: Suppression, layout: KeyLayout, batch: int, device
) -> torch.Tensor:
    """Factors [batch, Nk] of a grouped call: row b * G + g holds input b's factors of the
    columns ``layout.positions[g]`` (1 where the position is -1)."""
    positions = layout.positions.to(device)
    groups, len_k = positions.shape
    f = state.factors.to(device)
    variants, n = f.shape
    bad = positions[(positions < -1) | (positions >= n)]
    if bad.numel():
        raise ValueError(
            f"the key layout names factor column {int(bad[0])} but the suppression factors "
            f"have {n} columns"
        )
    padded = torch.cat([f, f.new_ones(variants, 1)], dim=1)  # column n: factor 1
    rows = padded[:, positions.masked_fill(positions < 0, n)]  # [V, G, Nk]
    inputs = batch // groups
    if variants == inputs:
        return rows.reshape(batch, len_k)
    if variants == 1:
        return rows.expand(inputs, groups, len_k).reshape(batch, len_k)
    raise ValueError(
        f"the suppression factors hold {variants} variants but the model's batch holds "
        f"{inputs} inputs ({batch} rows of {groups} key groups); they must match (or factors "
        "must have 1 row)"
    )


def _check_layout(module, layout: KeyLayout, batch: int, len_q: int, len_k: int,
                  key_offset: int) -> None:
    """The call must have the shape its layout describes (else factors would land on the
    wrong keys)."""
    groups, keys = layout.positions.shape
    vis = layout.visible
    if (keys != len_k or batch % groups or key_offset
            or (vis is not None and vis.shape[1] != len_q)):
        raise ValueError(
            f"{_where(module)}: its key layout describes {groups} groups of {keys} keys"
            + ("" if vis is None else f" and {vis.shape[1]} queries")
            + f", but the attention call has batch {batch}, {len_q} queries and {len_k} keys"
            + (f" from position {key_offset}" if key_offset else "")
            + "; the layout was made for another input size"
        )


def _layout_visible(layout: KeyLayout, batch: int, device) -> torch.Tensor:
    """``layout.visible`` [G, Nq, Nk] as [batch, 1, Nq, Nk] (input-major rows)."""
    vis = layout.visible.to(device)
    groups = vis.shape[0]
    return vis[None].expand(batch // groups, *vis.shape).reshape(batch, 1, *vis.shape[1:])
