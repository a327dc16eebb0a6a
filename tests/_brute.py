"""An independent brute force for explainer tests, and tiny random models.

The brute force shares no code with the explainer: a plain eager attention with the
suppression formulas written out (registered with transformers under its own name), one full
forward per variant, logits at every position, and the factors (plain and conceptual)
computed with Python loops.
"""

from __future__ import annotations

import math
import re

import torch
from transformers import (
    AttentionInterface,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from atman_kernels.suppression import current_suppression, suppression

BRUTE = "brute_eager_test"


# ------------------------------------------------------------------ independent brute force
def _brute_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    """Eager attention applying the AtMan formulas to the active suppression, written plainly."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1).double()
    v = value.repeat_interleave(group, dim=1).double()
    q = query.double()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    s = q @ k.transpose(-1, -2) * scale  # [B, H, Nq, Nk]
    if attention_mask is None:
        visible = torch.ones_like(s, dtype=torch.bool)
        if getattr(module, "is_causal", False) and s.shape[-2] > 1:
            visible = torch.ones(s.shape[-2:], dtype=torch.bool).tril()[None, None]
    else:
        # a mask sized for a longer cache (models that build their own, e.g. Falcon-H1 on
        # transformers 5.0) covers the keys first: cut it to them, as eager attention does
        mask = attention_mask[..., : s.shape[-1]]
        if mask.dtype == torch.bool:
            visible = mask
        else:  # additive: the dtype's minimum hides a key, other values are added
            visible = mask > torch.finfo(mask.dtype).min / 2
            s = s + mask.double().masked_fill(~visible, 0.0)
    visible = visible.expand_as(s)
    state = current_suppression()
    if state is not None and state.applies_to(getattr(module, "layer_idx", None)):
        f = state.factors.double()[:, None, None, :]
        row_min = s.masked_fill(~visible, math.inf).amin(dim=-1, keepdim=True)
        if state.mode == "paper":
            s = row_min + f * (s - row_min)
        else:
            s = s + torch.log(f)
    s = s.masked_fill(~visible, -math.inf)
    out = torch.softmax(s, dim=-1) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(BRUTE, _brute_attention)
AttentionMaskInterface.register(
    BRUTE, lambda *a, **kw: sdpa_mask(*a, **{**kw, "allow_is_causal_skip": False})
)


def _plain_factors(n, explained, c, emb=None, kappa=None):
    """[V, n] factors, written as loops over the definition (docs/semantics.md)."""
    rows = []
    for j in explained:
        row = [1.0] * n
        if kappa is not None:
            for k in explained:
                if k == j:
                    continue
                a, b = emb[j].double(), emb[k].double()
                sim = float(a @ b / (max(a.norm(), 1e-8) * max(b.norm(), 1e-8)))
                sim = max(-1.0, min(1.0, sim))
                if sim >= kappa:
                    row[k] = min(row[k], 1 - (1 - c) * sim)
        row[j] = min(row[j], c)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def _with_impl(model, impl, fn):
    previous = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return fn()
    finally:
        model.set_attn_implementation(previous)


def _brute_causal_rows(model, seq, n_prompt, target, rows, mode="paper", layers=None, *,
                       inputs=None, switch=None):
    """[T, V] rise of CE per target token: one full forward per factor row, logits at every
    position (plain and slow). ``inputs``: the model inputs of ``seq`` when they are more than
    its ids (a vision-language model's pictures); ``switch``: the sub-model put on the brute
    attention (default: the whole model)."""
    n = len(seq)
    inputs = {"input_ids": torch.tensor([seq])} if inputs is None else inputs
    tgt = torch.tensor(target)

    def ce(factor_row):
        with suppression(factor_row[None].to(model.dtype), mode, layers):
            logits = model(**inputs).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        return -logp[torch.arange(n_prompt - 1, n), tgt]

    def loop():
        base = ce(torch.ones(n))
        return torch.stack([ce(row) - base for row in rows], dim=1)

    return _with_impl(model if switch is None else switch, BRUTE, loop)


def _brute_classifier_rows(model, model_inputs, seq_len, rows, cls, mode="paper"):
    """[1, V] rise of the class's CE: one full forward per factor row."""

    def ce(factor_row):
        with suppression(factor_row[None], mode):
            logits = model(**model_inputs).logits[0]
        return -torch.log_softmax(logits.double(), -1)[cls]

    def loop():
        base = ce(torch.ones(seq_len))
        return torch.stack([ce(row) - base for row in rows])[None]

    return _with_impl(model, BRUTE, loop)


def brute_causal(model, prompt, target, c=0.1, kappa=None, mode="paper", layers=None):
    """[T, N] rise of CE per target token, one full forward per suppressed position."""
    seq = prompt + target[:-1]
    emb = model.get_input_embeddings().weight[torch.tensor(seq)].detach()
    rows = _plain_factors(len(seq), range(len(seq)), c, emb, kappa)
    return _brute_causal_rows(model, seq, len(prompt), target, rows, mode, layers)


def brute_classifier(model, model_inputs, explained, seq_len, cls, c=0.1, kappa=None,
                     emb=None, mode="paper"):
    rows = _plain_factors(seq_len, explained, c, emb, kappa)
    return _brute_classifier_rows(model, model_inputs, seq_len, rows, cls, mode)


def _unit_rows(n, units, c):
    """[V, n] factors: c at every position of the unit, 1 elsewhere (no conceptual part)."""
    rows = []
    for unit in units:
        row = [1.0] * n
        for p in unit:
            row[p] = c
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def brute_causal_units(model, seq, n_prompt, target, units, c=0.1, mode="paper"):
    """[T, V] rise of CE per target token, one full forward per unit (all its tokens at c)."""
    return _brute_causal_rows(model, seq, n_prompt, target, _unit_rows(len(seq), units, c),
                              mode)


def brute_classifier_units(model, model_inputs, seq_len, units, cls, c=0.1, mode="paper"):
    """[1, V] rise of the class's CE, one full forward per unit."""
    return _brute_classifier_rows(model, model_inputs, seq_len,
                                  _unit_rows(seq_len, units, c), cls, mode)


# ----------------------------------------------------------------------------- tokenizers
def trained_bpe(corpus, vocab_size):
    """A small byte-level BPE tokenizer with a BOS ("<s>", id 0) and an EOS, trained here on
    ``corpus`` (a list of strings; offline, fast), with character offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


# --------------------------------------------------------------------------------- models
def unit_scale_(model, seed=0):
    """Unit-scale random weights in place (every matrix ~ N(0, 1/fan_in)): attention far from
    uniform, so suppression moves the loss; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    return model.eval()


def tiny_llama(seed=0, vocab=61, positions=64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=positions,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0, vocab=61):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed=0, vocab=61):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3,
                     initializer_range=0.2, id2label={0: "neg", 1: "neu", 2: "pos"},
                     label2id={"neg": 0, "neu": 1, "pos": 2})
    return BertForSequenceClassification(cfg).eval()


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                    intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_labels=3, initializer_range=0.2)
    return ViTForImageClassification(cfg).eval()


def _close(actual, expected, rel=1e-4):
    """Max error relative to the largest magnitude (scores near 0 have no relative error)."""
    actual, expected = actual.double(), expected.double()
    peak = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert peak > 1e-3, f"degenerate test: scores too small ({peak})"
    assert err <= rel * peak, f"max error {err:.3g} > {rel} x peak {peak:.3g}"


# ----------------------------------------------------- image units from the processor's layout
# Written from the processors' token layouts (transformers' processors and ATMAN.md §9), not
# from atman_kernels.explain.vision: each view is a dict {(row, col): token position}.
def llava_layout(ids, image_token):
    """LLaVA (and Gemma 3's soft-token block): one run of image tokens per image, a square
    patch grid flattened row-major: token k of the run is patch (k // side, k % side)."""
    pos = [i for i, t in enumerate(ids) if t == image_token]
    assert pos and pos == list(range(pos[0], pos[0] + len(pos))), "one contiguous run"
    side = math.isqrt(len(pos))
    assert side * side == len(pos)
    return [("whole", (side, side), {(k // side, k % side): p for k, p in enumerate(pos)})]


def block_layout(ids, start_token, end_token, image_token):
    """Gemma 3: the soft tokens strictly between <start_of_image> and <end_of_image>."""
    a, b = ids.index(start_token), ids.index(end_token)
    assert all(t == image_token for t in ids[a + 1:b]) and b - a - 1 > 0
    assert image_token not in ids[:a] + ids[b + 1:]
    return llava_layout([t if a < i < b else -1 for i, t in enumerate(ids)], image_token)


def qwen2_vl_layout(ids, image_token, grid_thw, merge):
    """Qwen2-VL: the image tokens are the (h / merge) x (w / merge) merged patches of
    image_grid_thw's one frame, row-major."""
    (t, h, w), = grid_thw
    assert t == 1
    rows, cols = h // merge, w // merge
    pos = [i for i, tok in enumerate(ids) if tok == image_token]
    assert len(pos) == rows * cols
    return [("whole", (rows, cols), {(k // cols, k % cols): p for k, p in enumerate(pos)})]


def idefics3_layout(ids, image_token, token_str):
    """Idefics3 / SmolVLM: tile (r, c) is ``<fake_token_around_image><row_{r+1}_col_{c+1}>``
    and g x g image tokens (pixel shuffle: token k of the tile is block (k // g, k % g));
    tiles row-major, then ``<global-img>`` and the global view's g x g tokens. The whole
    view puts tile (r, c)'s block (i, j) at cell (r g + i, c g + j)."""
    tiles, glob, i = {}, None, 0
    while i < len(ids):
        name = token_str(ids[i])
        m = re.fullmatch(r"<row_(\d+)_col_(\d+)>", name)
        if m or name == "<global-img>":
            assert token_str(ids[i - 1]) == "<fake_token_around_image>"
            j = i + 1
            while j < len(ids) and ids[j] == image_token:
                j += 1
            run = list(range(i + 1, j))
            if m:
                tiles[(int(m[1]) - 1, int(m[2]) - 1)] = run
            else:
                glob = run
            i = j
        else:
            i += 1
    assert tiles and glob is not None
    g = math.isqrt(len(glob))
    n_rows, n_cols = 1 + max(r for r, _ in tiles), 1 + max(c for _, c in tiles)
    assert set(tiles) == {(r, c) for r in range(n_rows) for c in range(n_cols)}
    whole = {}
    for (r, c), run in tiles.items():
        assert len(run) == g * g
        for k, p in enumerate(run):
            whole[(r * g + k // g, c * g + k % g)] = p
    return [("whole", (n_rows * g, n_cols * g), whole),
            ("global", (g, g), {(k // g, k % g): p for k, p in enumerate(glob)})]


def image_units(layout, k=None, image=0):
    """[(label, positions)] of each cell, or k x k region (a ragged last row / column), of
    every view, regions in row-major order; labels as the explainer writes them."""
    k = k or 1
    out = []
    for view, (rows, cols), cells in layout:
        assert set(cells) == {(r, c) for r in range(rows) for c in range(cols)}
        for r0 in range(0, rows, k):
            for c0 in range(0, cols, k):
                rs = range(r0, min(r0 + k, rows))
                cs = range(c0, min(c0 + k, cols))
                where = (f"({r0},{c0})" if len(rs) * len(cs) == 1 else
                         f"rows {rs[0]}-{rs[-1]} cols {cs[0]}-{cs[-1]}")
                out.append((f"image {image} {view} {where}",
                            tuple(sorted(cells[(r, c)] for r in rs for c in cs))))
    return out


def check_image_units(expl, layout, k=None):
    """The explanation's units with its image units replaced by the independent ones (sorted
    by first position, as the explainer orders units); asserts afterwards (call after the
    brute force) that its image spans are exactly those, labelled alike, and that each
    view's score map reads each cell's unit score."""
    mine = image_units(layout, k)
    text = [tuple(s.positions) for s in expl.spans if s.source != "image"]
    units = sorted(text + [p for _, p in mine], key=lambda u: u[0])

    def verify():
        got = [(s.text, tuple(s.positions)) for s in expl.spans if s.source == "image"]
        got, want = (sorted(u, key=lambda x: x[1][0]) for u in (got, mine))
        assert got == want, ("the explainer's image units differ from the processor's "
                             f"layout: {[u for u in got if u not in want][:3]} not expected, "
                             f"{[u for u in want if u not in got][:3]} missing")
        index = {tuple(s.positions): i for i, s in enumerate(expl.spans)}
        kk = k or 1
        for view, (rows, cols), cells in layout:
            smap = expl.score_map(0, view)
            assert tuple(smap.shape) == (rows, cols)
            for (r, c) in cells:
                r0, c0 = r - r % kk, c - c % kk
                unit = tuple(sorted(cells[(a, b)] for a in range(r0, min(r0 + kk, rows))
                                    for b in range(c0, min(c0 + kk, cols))))
                assert float(smap[r, c]) == float(expl.scores[index[unit]]), (
                    f"score map {view} ({r},{c}) is not the score of its unit {unit}")

    return [list(u) for u in units], verify
