"""Every architecture of the installed transformers: explained exactly, or refused by name.

Enumerates ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``,
``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES``
and ``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``, builds a tiny random model of each (the
default config of the model type, shrunk generically: widths, layers, heads, experts, vocabulary
and image size capped, per-layer lists cut to one layer of each kind) and asserts one of:

- **explained**: the explainer's scores equal a brute force written here (one full forward per
  suppressed position, the suppression formulas written out in a plain fp64 attention of its
  own, sharing no code with the package) within 1e-4 of the peak score; causal LMs with and
  without prefix reuse;
- **refused**: the explainer raised TypeError / ValueError / NotImplementedError from
  ``atman_kernels`` code (the innermost frame of the traceback), with a message that names the
  model (class or model type) or the calling module;
- **not built**: building the tiny model or its plain forward fails with the exception listed
  for the model type in NOT_BUILT: a missing optional dependency (timm, detectron2, natten),
  a transformers bug that the unshrunk default config shows as well (checked on the meta
  device), or a class that takes inputs no generic tiny input provides (a draft model, an
  image-text classifier, colour-cluster ids). Any other failure to build fails the test.

Anything else (a crash, a result that differs from the brute force, an explanation the brute
force cannot check) fails the architecture's test. ``benchmarks/model_zoo.py`` runs the same
enumeration and writes ``docs/model_zoo.md`` and ``benchmarks/results/model_zoo.csv``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import re
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AttentionInterface, AutoConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

import atman_kernels
from atman_kernels.explain import AtManExplainer

PACKAGE_DIR = Path(atman_kernels.__file__).resolve().parent
KINDS = {
    "causal_lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "classifier": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "image": MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
}
REL_TOL = 1e-4  # max error relative to the peak |score| of the brute force
MIN_PEAK = 1e-3  # below this the comparison proves nothing (suppression changed nothing)
VOCAB = 128
PROMPT = [5, 17, 42, 9, 17, 30, 11, 8, 25]  # 9 tokens, all below VOCAB and no special id
TARGET = [7, 19]
TEXT_INPUT = [5, 17, 42, 9, 17, 30, 11, 8]
N_LABELS = 3
CLASS = 1
IMAGE_SIZE = 32
PATCH = 8
SEED = 0


def architectures() -> list[tuple[str, str, str]]:
    """(kind, model_type, class name) for every class of the three mappings, sorted."""
    out = set()
    for kind, mapping in KINDS.items():
        for model_type, names in mapping.items():
            for name in (names,) if isinstance(names, str) else names:
                out.add((kind, model_type, name))
    return sorted(out)


# ------------------------------------------------------------------------ config shrinking
WIDTH = 64
CAPS = {
    # widths
    **dict.fromkeys(("hidden_size", "n_embd", "n_embed", "d_model", "embed_dim", "dim",
                     "embedding_size", "word_embed_proj_dim", "projection_dim",
                     "hidden_size_per_layer_input", "text_embed_dim", "vision_embed_dim"),
                    WIDTH),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim",
                     "decoder_ffn_dim", "d_ff", "hidden_dim", "ffn_hidden_size", "mlp_dim",
                     "intermediate_size_mlp", "dense_intermediate_size"), 2 * WIDTH),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size",
                     "shared_experts_intermediate_size", "expert_intermediate_size"), WIDTH),
    # depth
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers",
                     "decoder_layers", "num_decoder_layers"), 2),
    # heads
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads",
                     "encoder_attention_heads", "decoder_attention_heads"), 4),
    **dict.fromkeys(("head_dim", "kv_channels", "attention_head_dim", "d_kv", "qk_head_dim",
                     "v_head_dim", "index_head_dim"), 16),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim"), 8),
    "kv_lora_rank": 16,
    **dict.fromkeys(("rotary_dim", "rotary_emb_dim"), 8),
    **dict.fromkeys(("pooler_hidden_size", "emb_dim", "embedding_dim", "attention_hidden_size",
                     "d_latents", "entity_emb_size", "hidden_size_global"), WIDTH),
    "encoder_hash_byte_group_vocab": VOCAB,
    **dict.fromkeys(("num_latents", "entity_vocab_size"), 16),
    "q_lora_rank": 32,
    "index_n_heads": 2,
    "index_topk": 4,
    # vocabulary
    **dict.fromkeys(("vocab_size", "vocab_size_per_layer_input"), VOCAB),
    # mixture of experts
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                     "num_routed_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k_experts",
                     "num_experts_per_token"), 2),
    **dict.fromkeys(("n_group", "topk_group", "n_shared_experts", "num_shared_experts"), 1),
    # linear-attention / state-space widths of hybrids
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "mamba_d_head",
                     "mamba_d_state", "ssm_state_size", "state_size"), 16),
    **dict.fromkeys(("linear_num_key_heads", "linear_num_value_heads", "mamba_n_heads"), 4),
    **dict.fromkeys(("mamba_d_ssm", "mamba_dt_rank", "time_step_rank"), 64),
}
MLA_DIMS = ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "head_dim", "kv_lora_rank",
            "q_lora_rank", "qk_head_dim")
KV_HEADS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num",
            "n_head_kv", "num_key_value_groups")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def _num(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scale_sections(sections: list[int], total: int) -> list[int]:
    """Integers proportional to ``sections`` summing to ``total`` (rope sections)."""
    old = sum(sections)
    out = [max(1, round(s * total / old)) for s in sections]
    out[-1] += total - sum(out)
    return out


def _per_layer_list(value, n_old: int) -> bool:
    """A list with one entry per layer (not a list of layer indices that happens to be as
    long as the model is deep)."""
    if not isinstance(value, list) or len(value) != n_old:
        return False
    indices = all(_num(v) for v in value) and value == sorted(set(value)) and len(value) > 2
    return not indices


def _layer_selection(d: dict, n_old: int) -> list[int]:
    """Layers to keep: the first of every distinct per-layer signature, at least 2 layers."""
    per_layer = [k for k, v in d.items() if _per_layer_list(v, n_old)]
    overrides = d.get("per_layer_config") or {}
    signature = []
    for i in range(n_old):
        sig = [repr(d[k][i]) for k in per_layer]
        sig.append(repr(sorted((overrides.get(f"{i:02d}") or overrides.get(str(i)) or
                                overrides.get(i) or {}).items())))
        signature.append(tuple(sig))
    keep, seen = [], set()
    for i, sig in enumerate(signature):
        if sig not in seen:
            seen.add(sig)
            keep.append(i)
    for i in range(n_old):
        if len(keep) >= 2:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _shrink_dict(d: dict) -> dict:
    """The config dict (and its sub-config dicts) with sizes capped (see CAPS)."""
    d = dict(d)
    original = dict(d)
    for key, value in list(d.items()):
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
            if key != "per_layer_config":
                d[key] = _shrink_dict(value)
    aliases = _attribute_map(d.get("model_type"))
    for key, cap in CAPS.items():
        for name in {key, aliases.get(key, key)}:
            if _num(d.get(name)) and d[name] > cap:
                d[name] = cap
    heads = next((d[k] for k in HEADS if _num(d.get(k))), None)
    old_heads = next((original[k] for k in HEADS if _num(original.get(k))), None)
    for key in KV_HEADS:
        if _num(d.get(key)) and heads:
            if old_heads and d[key] >= old_heads:
                d[key] = heads
            else:
                d[key] = min(d[key], 2)
    for key, fill in (("head_dim", d.get("hidden_size", WIDTH) // (heads or 4)),
                      ("num_key_value_heads", heads), ("num_experts_per_tok", 2)):
        if key in d and d[key] is None and fill and (key != "num_experts_per_tok" or any(
                _num(d.get(k)) for k in ("n_routed_experts", "num_experts"))):
            d[key] = fill
    if _num(original.get("qk_rope_head_dim")) and original["qk_rope_head_dim"] > 8:
        # multi-head latent attention: its dims keep their ratios (head_dim = rope + nope...)
        div = original["qk_rope_head_dim"] / 8
        for key in MLA_DIMS:
            if _num(original.get(key)):
                d[key] = max(1, round(original[key] / div))
    if _num(d.get("num_kv_shared_layers")):
        d["num_kv_shared_layers"] = 0
    _fix_state_space(d)
    # per-layer lists and overrides: keep one layer of each kind
    layer_key = next((k for k in LAYERS if _num(original.get(k))), None)
    if layer_key is not None and original[layer_key] > d[layer_key]:
        n_old = original[layer_key]
        keep = _layer_selection(original, n_old)
        d[layer_key] = len(keep)
        for key, value in original.items():
            if _per_layer_list(value, n_old):
                d[key] = [value[i] for i in keep]
        overrides = original.get("per_layer_config")
        if isinstance(overrides, dict):
            new = {}
            for j, i in enumerate(keep):
                o = overrides.get(f"{i:02d}") or overrides.get(str(i)) or overrides.get(i)
                if o:
                    new[f"{j:02d}"] = {k: _scaled_override(k, v, original, d)
                                       for k, v in o.items()}
            d["per_layer_config"] = new or None
        for key in ("attn_layer_period", "expert_layer_period"):
            if _num(d.get(key)) and d[key] > len(keep):
                d[key] = len(keep)
        for key in ("attn_layer_offset", "expert_layer_offset"):
            if _num(d.get(key)) and d[key] >= len(keep):
                d[key] = len(keep) - 1
        for key, value in original.items():  # lists of layer indices
            if (key.endswith(("_layers", "_layer_ids", "_indices", "layers_block_type"))
                    and isinstance(value, list) and value and all(_num(v) for v in value)
                    and not _per_layer_list(value, n_old)):
                d[key] = [keep.index(v) for v in value if v in keep]
    # token ids inside the vocabulary
    vocab = d.get("vocab_size")
    if _num(vocab):
        for key, value in list(d.items()):
            if key.endswith(("_token_id", "_token_index")):
                if _num(value) and value >= vocab:
                    d[key] = vocab - 1
                elif isinstance(value, list):
                    d[key] = [min(v, vocab - 1) if _num(v) else v for v in value]
    # vision
    if _num(d.get("image_size")) and d["image_size"] > IMAGE_SIZE:
        d["image_size"] = IMAGE_SIZE
        if _num(d.get("patch_size")) and (IMAGE_SIZE % d["patch_size"] or d["patch_size"] > 8):
            d["patch_size"] = PATCH
    if isinstance(d.get("image_size"), list) and len(d["image_size"]) == 2:
        d["image_size"] = [IMAGE_SIZE, IMAGE_SIZE]
    if d.get("model_type") not in UNCUT_STAGES:
        _shrink_stages(d, original)
    for key in ("stage_names", "out_features", "out_indices"):  # backbone views: derived
        d.pop(key, None)
    # rope sections sized to the head dim
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    head_dim = d.get("head_dim") if _num(d.get("head_dim")) else None
    if head_dim is None and _num(d.get("hidden_size")) and heads:
        head_dim = d["hidden_size"] // heads
    for params in (rope.values() if isinstance(rope, dict) and
                   all(isinstance(v, dict) for v in rope.values()) else [rope]):
        if isinstance(params, dict) and isinstance(params.get("mrope_section"), list) and head_dim:
            params["mrope_section"] = _scale_sections(params["mrope_section"], head_dim // 2)
    for key in ("initializer_range",):
        if isinstance(d.get(key), float):
            d[key] = 0.02
    fix = CONSISTENT.get(d.get("model_type"))
    if fix is not None:
        fix(d)
    return d


def _attribute_map(model_type) -> dict:
    """The config class's own names of standard attributes (Ernie 4.5 MoE: num_experts_per_tok
    is moe_k), so that a cap reaches the field the config really has."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return {}
    return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {})


# Fields that must stay consistent with each other after the generic caps, per model type
# (read from each config's validation and its model's __init__/forward): the generic
# shrinking alone gives these models shapes that do not fit together.
def _zamba(d: dict) -> None:
    """Zamba / Zamba2: the attention runs on [hidden, original embeddings] (2 x hidden);
    Mamba heads x head dim = expand x hidden; a shared transformer is tied across hybrid
    layers, so two hybrid layers are kept (one alone has nothing to tie to)."""
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    d["attention_hidden_size"] = 2 * hidden
    d["attention_head_dim"] = 2 * hidden // heads
    if "kv_channels" in d:
        d["kv_channels"] = hidden // heads
    if "mamba_headdim" in d:
        d["mamba_headdim"] = 16
        d["n_mamba_heads"] = d["mamba_expand"] * hidden // 16
    if _num(d.get("mamba_dt_rank")):
        d["mamba_dt_rank"] = math.ceil(hidden / 16)
    d["num_hidden_layers"] = 4
    d["layers_block_type"] = ["linear_attention", "hybrid"] * 2
    for key in ("attn_layer_period", "attn_layer_offset"):
        if key in d:
            d[key] = {"attn_layer_period": 2, "attn_layer_offset": 1}[key]
    if isinstance(d.get("hybrid_layer_ids"), list):
        d["hybrid_layer_ids"] = [1, 3]


def _xlnet(d: dict) -> None:
    d["d_head"] = d["d_model"] // d["n_head"]


def _reformer(d: dict) -> None:
    """Axial position embeddings split the hidden size; heads x head size = hidden."""
    hidden = d["hidden_size"]
    d["axial_pos_embds_dim"] = [hidden // 4, hidden - hidden // 4]
    d["attention_head_size"] = hidden // d["num_attention_heads"]
    d["feed_forward_size"] = 2 * hidden


def _musicgen_decoder(d: dict) -> None:
    """One codebook: the test's input_ids are one row of tokens (4 codebooks would take a
    [4, T] stack)."""
    d["num_codebooks"] = 1


def _dory(d: dict) -> None:
    """input + recurrent + output layers = num_hidden_layers: three layers, one of each."""
    kinds = [t for t in d["layer_types"] if t != "mlp"]
    d["layer_types"] = [x for t in (kinds[0], kinds[0], kinds[-1]) for x in (t, "mlp")]
    # a serialized Dory lists (attention, mlp) pairs: __post_init__ halves the counts
    d["num_hidden_layers"] = 6
    d["n_input_layers"] = d["n_recurrent_layers"] = d["n_output_layers"] = 2


def _hrm_text(d: dict) -> None:
    """num_hidden_layers = layers per stack x H_cycles x (L_cycles + 1) cache slots."""
    d.update(num_layers_per_stack=1, H_cycles=1, L_cycles=1, L_bp_cycles=[1])
    d["num_hidden_layers"] = 2


def _xlstm(d: dict) -> None:
    """The cache sizes its states by the qk / v widths rounded up to a multiple of 64, the
    blocks by the widths themselves: a width of 128 keeps both equal (0.5 x 128 = 64)."""
    d["num_blocks"] = d["num_hidden_layers"]
    d["hidden_size"] = d["embedding_dim"] = 2 * WIDTH


def _pvt(d: dict) -> None:
    """The last stage attends over its cells plus a CLS token, so it cannot reduce its
    sequence spatially: the reduction ratios of the last two stages are kept (..., 2, 1)."""
    d["sequence_reduction_ratios"] = [2, 1]


def _bailing_hybrid(d: dict) -> None:
    """Experts split into num_expert_group groups; linear-attention heads x head dim."""
    d["num_expert_group"] = 1
    d["linear_num_heads"] = d["num_attention_heads"]
    d["linear_head_dim"] = d["hidden_size"] // d["num_attention_heads"]


def _bamba(d: dict) -> None:
    """The default Bamba has no attention layer (attn_layer_indices None): keep one."""
    d["attn_layer_indices"] = [1]
    d.pop("layer_types", None)


def _granitemoehybrid(d: dict) -> None:
    """The default is all Mamba: the second layer is made attention."""
    d["layer_types"] = ["linear_attention", "full_attention"]
    d.pop("layers_block_type", None)


def _recurrent_gemma(d: dict) -> None:
    """Blocks recurrent, recurrent, attention: three layers so that one attends."""
    d["num_hidden_layers"] = len(d["block_types"])
    d["lru_width"] = d["hidden_size"]


def _dots3_vision(d: dict) -> None:
    d["adapter_in_dim"] = d["hidden_size"]
    d["adapter_out_dim"] = WIDTH


def _dots3_audio(d: dict) -> None:
    d["adapter_input_size"] = d["hidden_size"]
    d["adapter_out_dim"] = WIDTH


def _bit(d: dict) -> None:
    """Group norms over bottleneck widths of hidden / 4 (16 at 64): 8 groups, not 32."""
    d["num_groups"] = 8


def _efficientnet(d: dict) -> None:
    """The top convolution's width is round_filters(1280) (2560 at width factor 2), which
    hidden_dim must equal; its stages are not cut (a CNN, refused as such)."""
    d["hidden_dim"] = 2560


def _hiera(d: dict) -> None:
    d["num_query_pool"] = len(d["depths"]) - 1


def _levit(d: dict) -> None:
    """Attention biases are sized by the resolution after the 16x patch stem: 64 pixels make
    4 x 4 cells, 2 x 2 after the one subsampling."""
    d["down_ops"] = d["down_ops"][: len(d["depths"]) - 1]
    d["image_size"], d["patch_size"] = 2 * IMAGE_SIZE, 16


def _mobilevitv2(d: dict) -> None:
    """Output stride 32 leaves 1 x 1 cells of a 32-pixel image for a 2 x 2 unfold: 64."""
    d["image_size"] = 2 * IMAGE_SIZE


def _perceiver(d: dict) -> None:
    """The image preprocessors give 261 / 322 channels (prime-ish): one cross-attention head
    (the released image classifiers use one); self-attention blocks capped."""
    d["num_cross_attention_heads"] = 1
    d["num_self_attends_per_block"] = 2


def _layoutlmv3(d: dict) -> None:
    """Spatial embeddings: 4 x coordinate_size + 2 x shape_size = hidden_size."""
    d["coordinate_size"], d["shape_size"] = 10, 12


def _lilt(d: dict) -> None:
    """Six layout embeddings of hidden // 6 make hidden: a width divisible by 6 and 4."""
    d["hidden_size"], d["intermediate_size"] = 48, 96


CONSISTENT = {
    "zamba": _zamba, "zamba2": _zamba, "xlnet": _xlnet, "reformer": _reformer,
    "musicgen_decoder": _musicgen_decoder, "musicgen_melody_decoder": _musicgen_decoder,
    "dory": _dory, "hrm_text": _hrm_text, "xlstm": _xlstm, "bailing_hybrid": _bailing_hybrid,
    "bamba": _bamba, "pvt": _pvt, "granitemoehybrid": _granitemoehybrid,
    "recurrent_gemma": _recurrent_gemma,
    "dots3_note_vision_encoder": _dots3_vision, "dots3_note_audio_encoder": _dots3_audio,
    "bit": _bit, "efficientnet": _efficientnet, "hiera": _hiera, "levit": _levit,
    "mobilevitv2": _mobilevitv2, "perceiver": _perceiver, "layoutlmv3": _layoutlmv3,
    "lilt": _lilt,
}
# Configs whose stage lists are validated as a whole (PP-LCNet: exactly 5 stages): not cut.
UNCUT_STAGES = ("pp_lcnet",)


def _fix_state_space(d: dict) -> None:
    """Mamba-2 style heads: n_heads x head_dim = expand x hidden."""
    hidden = d.get("hidden_size")
    for heads, head_dim, expand in (("mamba_n_heads", "mamba_d_head", "mamba_expand"),
                                    ("num_heads", "head_dim", "expand")):
        if all(_num(d.get(k)) for k in (heads, head_dim, expand)) and _num(hidden) and (
                "mamba" in d.get("model_type", "") or heads.startswith("mamba")):
            d[heads] = d[expand] * hidden // d[head_dim]
            if _num(d.get("mamba_d_ssm")):
                d["mamba_d_ssm"] = d[heads] * d[head_dim]


def _scaled_override(key, value, original, shrunk):
    """A per-layer override scaled like its global value was (keeps the model heterogeneous)."""
    old, new = original.get(key), shrunk.get(key)
    if _num(value) and _num(old) and _num(new) and old > 0:
        return max(1, round(value * new / old))
    return value


STEM_AND_STAGES = ("hidden_sizes",)


def _shrink_stages(d: dict, original: dict) -> None:
    """Hierarchical vision models (Swin, PVT, ConvNeXt, ...): two small stages."""
    depths_key = next((k for k in ("depths", "num_encoder_blocks", "stage_depths")
                       if isinstance(d.get(k), list)), None)
    if depths_key is None:
        for key in ("hidden_sizes", "embed_dims", "embedding_sizes"):
            if isinstance(d.get(key), list):
                d[key] = [min(v, WIDTH) if _num(v) else v for v in d[key]]
        return
    n_old = len(original[depths_key])
    n_new = min(n_old, 2)
    for key, value in original.items():
        if isinstance(value, list) and len(value) == n_old:
            d[key] = value[:n_new]
        elif key in STEM_AND_STAGES and isinstance(value, list) and len(value) == n_old + 1:
            d[key] = value[:n_new + 1]  # the stem's width, then one per stage (TextNet)
    if isinstance(d.get("stage_out_channels"), list) and isinstance(d.get("hidden_sizes"), list):
        # HGNetV2: the classifier reads hidden_sizes[-1], the stages produce their
        # stage_out_channels: the two are one list in the default config, kept so
        d["hidden_sizes"] = list(d["stage_out_channels"])
        return
    d[depths_key] = [1] * n_new
    for key in ("hidden_sizes", "embed_dims", "embedding_sizes", "num_channels_per_stage"):
        if isinstance(d.get(key), list):
            d[key] = [min(v, WIDTH * 2 ** i) if _num(v) else v for i, v in enumerate(d[key])]
    for key in ("num_heads", "num_attention_heads", "heads"):
        if isinstance(d.get(key), list):
            d[key] = [2 * 2 ** i for i in range(len(d[key]))]
    if _num(d.get("embed_dim")):
        d["embed_dim"] = 32
    if _num(d.get("window_size")) and d["window_size"] > 4:
        d["window_size"] = 4
    for key in ("num_layers", "num_stages", "num_encoder_blocks"):  # stage counts
        if _num(d.get(key)):
            d[key] = n_new


def tiny_config(model_type: str, kind: str, class_name: str):
    """The shrunk default config of ``model_type``, the one ``class_name`` takes (a composite
    config's text or vision part where the class takes that), set up for ``kind``."""
    config = AutoConfig.for_model(model_type)
    d = _shrink_dict(config.to_dict())
    d.pop("transformers_version", None)
    config = type(config).from_dict(d)
    want = getattr(getattr(transformers, class_name), "config_class", None)
    if want is not None and not isinstance(config, want):
        config = next((c for c in _configs(config) if isinstance(c, want)), config)
    for c in _configs(config):
        if kind != "causal_lm":
            c.num_labels = N_LABELS
            c.id2label = {i: f"label{i}" for i in range(N_LABELS)}
            c.label2id = {f"label{i}": i for i in range(N_LABELS)}
        if kind == "classifier" and "pad_token_id" in vars(c) and c.pad_token_id is None:
            c.pad_token_id = 0
        if kind == "image" and "vision_use_head" in vars(c):
            # SigLIP classifiers mean-pool the patches: the attention-pooling head (torch
            # MultiheadAttention, outside the interface) runs but its output is unused
            c.vision_use_head = False
        if kind == "causal_lm" and "is_decoder" in vars(c):
            c.is_decoder = True  # BERT-style models as causal LMs
        if "vocab_size" in vars(c) and c.vocab_size is None:
            c.vocab_size = VOCAB
        if getattr(c, "is_encoder_decoder", False) and getattr(
                c, "decoder_start_token_id", None) is None:
            c.decoder_start_token_id = 0
        if getattr(c, "languages", None) and getattr(c, "default_language", "") is None:
            c.default_language = c.languages[0]
    return config


def _configs(config):
    """The config and its sub-configs."""
    yield config
    for value in vars(config).values():
        if isinstance(value, transformers.PretrainedConfig):
            yield from _configs(value)


def _reinit(model: torch.nn.Module) -> None:
    """Weights of unit-scale fan-in variance, so that attention is far from uniform and
    suppression moves the loss measurably (default inits of 0.02 barely do)."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.is_floating_point():
                fan_in = p.shape[-1] if p.dim() == 2 else math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(1, fan_in)))
            elif (p.dim() == 1 and p.is_floating_point() and not name.endswith("bias")
                  and not bool(p.any())):
                # a scale initialised to 0 (e.g. zaya's qk_norm temperature) makes every
                # attention score equal, and a uniform row is unchanged by paper-mode
                # suppression: nothing would be compared
                p.fill_(1.0)


def model_inputs(kind: str, config) -> dict:
    if kind == "image":
        channels = next((c.num_channels for c in _configs(config)
                         if _num(getattr(c, "num_channels", None))), 3)
        size = next((c.image_size for c in _configs(config)
                     if _num(getattr(c, "image_size", None))), IMAGE_SIZE)
        gen = torch.Generator().manual_seed(SEED + 1)
        flat = next((c for c in _configs(config) if _num(getattr(c, "num_patches", None))
                     and not hasattr(c, "image_size")), None)
        if flat is not None:  # SigLIP 2: pre-patchified, a 3 x 4 patch image in 16 slots
            width = channels * flat.patch_size ** 2
            return {"pixel_values": torch.randn(1, 16, width, generator=gen),
                    "pixel_attention_mask": torch.tensor([[1] * 12 + [0] * 4]),
                    "spatial_shapes": torch.tensor([[3, 4]])}
        return {"pixel_values": torch.randn(1, channels, size, size, generator=gen)}
    ids = PROMPT + TARGET[:-1] if kind == "causal_lm" else list(TEXT_INPUT)
    eos = getattr(config, "eos_token_id", None)
    if kind == "classifier" and getattr(config, "is_encoder_decoder", False) and _num(eos):
        ids.append(eos)  # BART-style classifiers read the hidden state at the last EOS
    return {"input_ids": torch.tensor([ids])}


@functools.lru_cache(maxsize=4)
def build(kind: str, model_type: str, class_name: str):
    """(model, inputs) of a tiny random model; raises whatever building or a plain forward
    raises (the architecture is then "not built")."""
    config = tiny_config(model_type, kind, class_name)
    cls = getattr(transformers, class_name)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config).float().eval()
    _reinit(model)
    inputs = model_inputs(kind, config)
    with torch.no_grad():
        out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if not torch.isfinite(logits).all():
        raise FloatingPointError("the tiny model's plain forward gives non-finite logits")
    return model, inputs


# ----------------------------------------------------------------------- the brute force
BRUTE = "zoo_brute_force"


class BruteCannotCheck(Exception):
    """The brute force cannot compute this model's suppressed attention (it says why)."""


# Keywords a plain eager attention ignores as well: the mask or the caller already applied
# what they stand for (a sliding window through the mask function registered below).
BRUTE_IGNORES = frozenset({
    "position_ids", "cache_position", "use_cache", "past_key_values", "past_key_value",
    "sliding_window", "output_attentions", "output_hidden_states", "return_dict",
    "output_router_logits", "logits_to_keep", "encoder_hidden_states",
    "encoder_attention_mask", "seq_idx", "deterministic", "layer_idx",
})


@dataclass
class _BruteRun:
    factors: torch.Tensor | None  # [N] float64, suppression factor per key position
    names: dict  # module -> qualified name in the model
    key_lengths: set
    modules: set


_RUN: list[_BruteRun] = []


def _brute_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     is_causal=None, softcap=None, sinks=None, s_aux=None, position_bias=None,
                     **kwargs):
    """Eager attention with AtMan's paper-mode suppression written out, in float64.

    s = scale q.k, soft-capped (c tanh(s / c)) where the model asks, plus any additive bias
    (position bias, float mask); m = min of s over the keys the row may see; s' = m + f (s - m);
    softmax over the visible keys, with per-head sink logits joining the denominator (never
    suppressed, not part of the minimum).
    """
    run = _RUN[-1]
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in BRUTE_IGNORES)
    if unknown:
        raise BruteCannotCheck(f"the attention of {type(module).__name__} gets {unknown}")
    if dropout:
        raise BruteCannotCheck(f"attention dropout {dropout} in eval mode")
    name = run.names.get(module, "")
    if ("cross" in name.lower() or "encoder_attn" in name.lower()
            or "Cross" in type(module).__name__ or getattr(module, "is_cross_attention", False)):
        raise BruteCannotCheck(f"cross-attention {name} ({type(module).__name__}): its keys "
                               "are another sequence")
    if query.shape[0] != 1 or key.shape[0] != 1:
        raise BruteCannotCheck(f"{name} attends over a batch of {query.shape[0]} rows for one "
                               "input (windows or patches): keys are not the token sequence")
    run.modules.add(module)
    run.key_lengths.add(key.shape[2])
    group = query.shape[1] // key.shape[1]
    q = query.double()
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    s = q @ k.transpose(-1, -2) * scale  # [1, H, Nq, Nk]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    n_q, n_k = s.shape[-2:]
    if attention_mask is None:
        causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
        visible = torch.ones(n_q, n_k, dtype=torch.bool)
        if causal and n_q > 1:
            visible = visible.tril(diagonal=n_k - n_q)
        visible = visible[None, None]
    elif attention_mask.dtype == torch.bool:
        visible = attention_mask
    else:
        visible = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        s = s + attention_mask.double().masked_fill(~visible, 0.0)
    if position_bias is not None:
        s = s + position_bias.double()
    visible = visible.expand_as(s)
    if run.factors is not None:
        if n_k != run.factors.shape[0]:
            raise BruteCannotCheck(f"{name} attends over {n_k} keys, the factors cover "
                                   f"{run.factors.shape[0]} positions")
        m = s.masked_fill(~visible, math.inf).amin(dim=-1, keepdim=True)
        s = m + run.factors * (s - m)
    s = s.masked_fill(~visible, -math.inf)
    sink = sinks if sinks is not None else s_aux
    if sink is not None:
        col = sink.double().reshape(1, -1, 1, 1).expand(1, s.shape[1], n_q, 1)
        p = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    out = p @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(BRUTE, _brute_attention)
AttentionMaskInterface.register(BRUTE, lambda *a, **kw: sdpa_mask(
    *a, **{**kw, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False}))


@contextlib.contextmanager
def _brute_mode(model):
    previous = model.config._attn_implementation
    model.set_attn_implementation(BRUTE)
    run = _BruteRun(None, {m: n for n, m in model.named_modules()}, set(), set())
    _RUN.append(run)
    ran = set()
    # attention modules by name; a decoder layer named after its mixer (OLMo hybrid's
    # "LinearAttentionDecoderLayer" around a gated delta net) is a layer, not an attention
    hooks = [m.register_forward_hook(lambda mod, *_: ran.add(mod))
             for m in model.modules() if ("Attention" in type(m).__name__
                                          or "Attn" in type(m).__name__)
             and not type(m).__name__.endswith("Layer")]
    try:
        with torch.no_grad():
            yield run, ran
    finally:
        for h in hooks:
            h.remove()
        _RUN.pop()
        model.set_attn_implementation(previous)


def _bypassing(run: _BruteRun, ran: set) -> list[str]:
    """Attention-named modules that ran but neither reached the brute force nor contain or
    sit inside a module that did: attention computed outside the interface."""
    reached = [run.names[m] for m in run.modules]
    out = []
    for m in ran:
        name = run.names.get(m, "")
        if not any(name == r or r.startswith(name + ".") or name.startswith(r + ".")
                   for r in reached):
            out.append(f"{name} ({type(m).__name__})")
    return sorted(out)


def _logits(model, inputs):
    out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out[0])[0].double()


def brute_force(kind: str, model, inputs: dict, positions: list[int]) -> torch.Tensor:
    """[T, len(positions)] rise of the target's cross-entropy, one full forward per position
    (factor 0.1 at that key in every attention, 1 elsewhere). Swin (window attention, units
    are final-stage cells): the window-aware brute force of test_swin.py."""
    if kind == "image" and isinstance(model, transformers.SwinForImageClassification):
        from test_swin import brute_force_swin

        return brute_force_swin(model, inputs, positions, cls=CLASS)
    with _brute_mode(model) as (run, ran):
        base_logits = _logits(model, inputs)
        if not run.modules:
            raise BruteCannotCheck("no attention of the model reached the brute force "
                                   "(it computes attention outside transformers' interface)")
        bypass = _bypassing(run, ran)
        if bypass:
            raise BruteCannotCheck(f"attention modules ran outside the interface: {bypass[:4]}")
        lengths = run.key_lengths
        if len(lengths) != 1:
            raise BruteCannotCheck(f"attention calls over different key lengths {lengths}")
        n = lengths.pop()

        def loss(logits):
            logp = torch.log_softmax(logits, -1)
            if kind == "causal_lm":
                n_p = len(PROMPT)
                return -logp[torch.arange(n_p - 1, n_p + len(TARGET) - 1), torch.tensor(TARGET)]
            return -logp[[CLASS]]

        base = loss(base_logits)
        rows = []
        for j in positions:
            run.factors = torch.ones(n, dtype=torch.float64)
            run.factors[j] = 0.1
            rows.append(loss(_logits(model, inputs)) - base)
            run.factors = None
    return torch.stack(rows, dim=1)


# --------------------------------------------------------------------------- the outcome
@dataclass(frozen=True)
class Outcome:
    status: str  # "explained", "refused", "not built" or "failing"
    reason: str


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _innermost(exc: BaseException):
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def refusal(exc: BaseException, model, kind: str, model_type: str) -> str | None:
    """The message when ``exc`` is a deliberate refusal by the package, else None: a
    TypeError / ValueError / NotImplementedError raised by a ``raise`` statement of
    atman_kernels code, naming the model class, its model type or one of its modules."""
    if not isinstance(exc, (TypeError, ValueError, NotImplementedError)):
        return None
    tb = _innermost(exc)
    if tb is None:
        return None
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    if PACKAGE_DIR not in path.parents:
        return None
    import linecache

    if not linecache.getline(str(path), tb.tb_lineno).strip().startswith("raise"):
        return None
    text = str(exc)
    names = {type(model).__name__, model_type} | {type(m).__name__ for m in model.modules()}
    if not any(name in text for name in names):
        return None
    return _one_line(exc, 400)


def _frames(exc: BaseException, n: int = 3) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-n:]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))


def explain(kind: str, model, inputs: dict) -> list:
    """The explainer's explanations: causal LMs with and without prefix reuse."""
    if kind == "causal_lm":
        return [AtManExplainer(model, progress=False, batch_size=batch, prefix_reuse=reuse)
                .explain(PROMPT, TARGET) for reuse, batch in ((True, "auto"), (False, 3))]
    target = inputs["input_ids"] if kind == "classifier" else inputs
    return [AtManExplainer(model, progress=False, batch_size=batch).explain(target, CLASS)
            for batch in ("auto", 3)]


@dataclass(frozen=True)
class NotBuilt:
    """A named reason why an architecture cannot be built here; building it must fail with
    ``error`` and a message matching ``match`` (anything else is a failure).

    ``why`` is "dependency" (``module`` is not installed), "transformers" (the default config
    of the model type fails the same way: checked on the meta device by
    test_named_transformers_bugs_fail_on_the_default_config, so the reason is not this test's
    shrinking) or "inputs" (the class needs inputs no generic tiny input provides)."""

    error: type
    match: str
    why: str
    note: str
    module: str | None = None


_TIMM = NotBuilt(ImportError, r"requires the timm library", "dependency", "needs timm", "timm")
NOT_BUILT = {
    "gemma3n": _TIMM, "timm_wrapper": _TIMM,
    "layoutlmv2": NotBuilt(ImportError, r"requires the detectron2 library", "dependency",
                           "needs detectron2", "detectron2"),
    "dinat": NotBuilt(ImportError, r"requires the natten library", "dependency",
                      "needs natten", "natten"),
    "blt": NotBuilt(AttributeError, r"'BltConfig' object has no attribute 'num_hidden_layers'",
                    "transformers", "the per-layer config view reads num_hidden_layers, which "
                    "BltConfig does not have"),
    "cohere_compass_text": NotBuilt(KeyError, r"full_attention", "transformers",
                                    "the default rope_parameters ({}) has no entry for its "
                                    "full_attention layers"),
    "dbrx": NotBuilt(AttributeError, r"'DbrxAttentionConfig' object has no attribute "
                     r"'rope_theta'", "transformers", "DbrxAttention reads "
                     "attn_config.rope_theta, which the attention config no longer has"),
    "dots1": NotBuilt(TypeError, r"empty\(\) takes 1 positional argument but 3 were given",
                      "transformers", "the default n_routed_experts is None: the experts "
                      "are allocated with torch.empty(None, ...)"),
    "gemma4_assistant": NotBuilt(StrictDataclassClassValidationError,
                                 r"hidden_size_per_layer_input must be 0",
                                 "transformers", "the default config fails its own validation"),
    "lfm2_moe": NotBuilt(TypeError, r"'NoneType' object is not subscriptable", "transformers",
                         "the default layer_types is None and the layers index it"),
    "qwen4_exp": NotBuilt(TypeError, r"unsupported operand type\(s\) for //: 'NoneType' and "
                          r"'NoneType'", "transformers", "the default indexer_budget and "
                          "indexer_compress_ratio are None (budget // ratio)"),
    "gemma4_unified_assistant": NotBuilt(ValueError, r"inputs_embeds and shared_kv_states "
                                         r"cannot be None", "inputs", "a draft model: it "
                                         "runs on the main model's embeddings and KV states"),
    "imagegpt": NotBuilt(ValueError, r"You have to specify either input_ids or inputs_embeds",
                         "inputs", "takes colour-cluster token ids, not pixel_values"),
    "shieldgemma2": NotBuilt(ValueError, r"You must specify exactly one of input_ids or "
                             r"inputs_embeds", "inputs", "an image-text classifier: takes a "
                             "policy prompt's input_ids with the pixel_values"),
}
NOT_BUILT["qwen4_exp_text"] = NOT_BUILT["qwen4_exp"]


def not_built_reason(model_type: str, exc: BaseException) -> str | None:
    """The named reason when ``exc`` is the failure NOT_BUILT lists for ``model_type``."""
    entry = NOT_BUILT.get(model_type)
    if entry is None or not isinstance(exc, entry.error):
        return None
    if not re.search(entry.match, " ".join(str(exc).split())):
        return None
    if entry.why == "dependency" and importlib.util.find_spec(entry.module) is not None:
        return None  # installed now: the failure is something else
    label = {"dependency": "missing optional dependency", "transformers": "transformers bug",
             "inputs": "needs other inputs"}[entry.why]
    return f"{label}: {entry.note} ({_one_line(exc, 160)})"


@functools.cache
def outcome(kind: str, model_type: str, class_name: str) -> Outcome:
    try:
        model, inputs = build(kind, model_type, class_name)
    except Exception as exc:  # noqa: BLE001 - a named reason, or the test fails
        reason = not_built_reason(model_type, exc)
        if reason is not None:
            return Outcome("not built", reason)
        return Outcome("failing", f"the tiny model could not be built or run a plain forward "
                                  f"(no named reason in NOT_BUILT): {_one_line(exc)} "
                                  f"[{_frames(exc)}]")
    try:
        explanations = explain(kind, model, inputs)
    except Exception as exc:  # noqa: BLE001 - sorted right below
        message = refusal(exc, model, kind, model_type)
        if message is not None:
            return Outcome("refused", message)
        return Outcome("failing", f"the explainer crashed: {_one_line(exc)} "
                                  f"[{_frames(exc)}]")
    positions = explanations[0].positions
    try:
        expected = brute_force(kind, model, inputs, positions)
    except BruteCannotCheck as exc:
        return Outcome("failing", f"explained, but the brute force cannot check it: {exc}")
    except Exception as exc:  # noqa: BLE001
        return Outcome("failing", f"explained, but the brute force crashed: {_one_line(exc)} "
                                  f"[{_frames(exc)}]")
    peak = float(expected.abs().max())
    if not peak > MIN_PEAK:
        return Outcome("failing", f"suppression changes nothing in the brute force (peak "
                                  f"{peak:.2g}): the comparison proves nothing")
    worst = 0.0
    labels = (("prefix reuse, batch auto", "full recompute, batch 3") if kind == "causal_lm"
              else ("batch auto", "batch 3"))
    for expl, label in zip(explanations, labels, strict=True):
        if list(expl.positions) != list(positions) or expl.per_target.shape != expected.shape:
            return Outcome("failing", f"{label}: explained positions {expl.positions} / shape "
                                      f"{tuple(expl.per_target.shape)} differ")
        err = float((expl.per_target.double() - expected).abs().max())
        if not err <= REL_TOL * peak:
            return Outcome("failing", f"silently wrong ({label}): max error {err:.3g} against "
                                      f"the brute force, peak {peak:.3g}")
        worst = max(worst, err / peak)
    return Outcome("explained", f"max error {worst:.1e} of the peak {peak:.3g}")


ARCHITECTURES = architectures()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine two threads waiting on
    each other make the module many times slower; the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _test_id(kind: str, model_type: str, class_name: str) -> str:
    """kind-model_type, and the class where a model type has several in one mapping."""
    several = sum(1 for k, t, _ in ARCHITECTURES if (k, t) == (kind, model_type)) > 1
    return f"{kind}-{model_type}" + (f"-{class_name}" if several else "")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "model_type", "class_name"), ARCHITECTURES,
                         ids=[_test_id(*a) for a in ARCHITECTURES])
def test_architecture_is_explained_exactly_or_refused(kind, model_type, class_name):
    result = outcome(kind, model_type, class_name)
    assert result.status in ("explained", "refused", "not built"), result.reason


def test_memory_estimate_reads_per_layer_configs():
    """A heterogeneous config (Gemma 4: larger head_dim in its full-attention layers) refuses
    global reads of per-layer attributes; the estimate sums each layer's own KV cache."""
    from atman_kernels.explain.batching import bytes_per_variant

    if "gemma4_text" not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip("this transformers has no Gemma 4")
    config = tiny_config("gemma4_text", "causal_lm", "Gemma4ForCausalLM")
    assert config.is_heterogeneous
    layers = list(config.per_layer_config)
    dims = [c.head_dim for c in layers]
    kv_heads = [c.num_key_value_heads for c in layers]
    assert len(set(dims)) > 1, dims  # the shrunk config stays heterogeneous
    homogeneous = type(config).from_dict({**config.to_dict(), "per_layer_config": None})
    assert not homogeneous.is_heterogeneous and homogeneous.head_dim == dims[0]
    len_k, elt = 1000, 4
    got = bytes_per_variant(config, len_q=1, len_k=len_k, n_logits=1)
    base = bytes_per_variant(homogeneous, len_q=1, len_k=len_k, n_logits=1)
    extra_kv = sum(2 * (h * d - kv_heads[0] * dims[0]) * len_k * elt  # keys and values
                   for h, d in zip(kv_heads, dims, strict=True))
    assert got - base == extra_kv > 0


def _default_build_and_forward(kind: str, model_type: str, class_name: str) -> None:
    """Build ``class_name`` from the unshrunk default config on the meta device (no memory)
    and run its plain forward there: raises what transformers itself raises."""
    config = AutoConfig.for_model(model_type)
    want = getattr(getattr(transformers, class_name), "config_class", None)
    if want is not None and not isinstance(config, want):
        config = next((c for c in _configs(config) if isinstance(c, want)), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = getattr(transformers, class_name)(config).eval()
    inputs = {k: v.to("meta") for k, v in model_inputs(kind, config).items()}
    with torch.no_grad():
        model(**inputs)


TRANSFORMERS_BUGS = sorted((k, t, c) for k, t, c in ARCHITECTURES
                           if NOT_BUILT.get(t) is not None
                           and NOT_BUILT[t].why == "transformers")


@pytest.mark.parametrize(("kind", "model_type", "class_name"), TRANSFORMERS_BUGS,
                         ids=[_test_id(*a) for a in TRANSFORMERS_BUGS])
def test_named_transformers_bugs_fail_on_the_default_config(kind, model_type, class_name):
    """A "transformers bug" of NOT_BUILT is transformers' own: the default config, not
    shrunk by this test, fails with the same exception (so the shrinking is not the cause)."""
    entry = NOT_BUILT[model_type]
    with pytest.raises(entry.error) as info:
        _default_build_and_forward(kind, model_type, class_name)
    assert re.search(entry.match, " ".join(str(info.value).split())), str(info.value)


def test_named_reasons_are_about_installed_model_types():
    """Every NOT_BUILT entry names a model type of this transformers and, for a missing
    dependency, a module that is indeed not installed; a failure outside the list fails."""
    types = {t for _, t, _ in ARCHITECTURES}
    assert set(NOT_BUILT) <= types, sorted(set(NOT_BUILT) - types)
    for entry in NOT_BUILT.values():
        if entry.why == "dependency":
            assert importlib.util.find_spec(entry.module) is None, entry.module
    wrong = IndexError("list index out of range")
    assert not_built_reason("poolformer", wrong) is None  # not listed: not "not built"
    assert not_built_reason("dbrx", wrong) is None  # listed, but another exception
    assert not_built_reason("dbrx", AttributeError(
        "'DbrxAttentionConfig' object has no attribute 'rope_theta'")).startswith(
        "transformers bug")
