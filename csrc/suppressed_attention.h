// Fused suppressed attention for CPU tensors (AtMan, docs/semantics.md, suppression formulas).
//
// Shapes: q [Bq, Hq, Nq, D], k and v [Bk, Hkv, Nk, D], Bq and Bk in {1, B} (a 1 is read by every
// variant, never copied), Hq a multiple of Hkv (query head h reads kv head h / (Hq / Hkv)).
// factors [B, Nk] (any float dtype, >= 0) or undefined; key_padding_mask [1 or B, Nk] bool
// (True = a real key) or undefined. Output [B, Hq, Nq, D] contiguous, q's dtype.
//
// Semantics (identical to atman_kernels/ops/reference.py): visible keys of query row i are the
// keys allowed by the causal mask (bottom-right aligned: row i sits at absolute position
// Nk - Nq + i) and by key_padding_mask. s = scale * q.k over visible keys, then, with a
// softcap c, s = c * tanh(s / c) (Gemma 2: before the suppression, so the row minimum is taken
// over capped scores);
//   paper: s' = m + f (s - m), m = min of s over the row's visible keys;
//   log:   s' = s + log f (f = 0 removes the key);
//   no factors: s' = s.
// Softmax over the visible keys, plus, with sinks [Hq], one more logit z_h per query head that
// joins the denominator only (GPT-OSS; never suppressed, no part of the minimum). A row with no
// visible key (or only removed keys) is zero, sinks or not.
//
// Algorithm: one work item = (variant b, query head h, block of BQ query rows); items run in
// parallel (at::parallel_for, OpenMP), each on one thread from start to end, and every output
// row is computed by the same sequence of operations whatever the thread count or partition
// (bit-identical reruns on one instruction-set level).
// Per item, with K = the keys the block may see (causal: keys past the block's last row are
// never touched, which skips every future key tile), cut into tiles of 256 keys, an online
// (flash-style) softmax: per tile, S = scale * Q K_tile^T with a single-threaded BLAS GEMM
// (MKL sgemm/dgemm from libtorch_cpu), soft-capped in place; per row the tile's maximum of s',
// the running maximum and sum (the row's accumulator rescaled when the maximum grows; a sink
// starts them at z_h and 1), P = exp(s' - max) (a vector polynomial exp; exact 0 for hidden or
// removed keys); O += P V_tile with a second GEMM; at the end O / sum.
//   - log mode and no factors stream S tile by tile ([BQ, 256] per thread, BQ = 64);
//   - paper mode's s' needs the row minimum over all visible keys before the first exp: a first
//     sweep computes every tile's S into a [BQ, K] buffer and the row minima while each tile is
//     hot, the second sweep runs the online softmax over the stored tiles. So paper mode costs
//     the FLOPs of plain attention (2 * Nq * K * D for QK^T plus the same for PV, per variant
//     and head; no second QK^T for the minimum), plus O(Nq * K) elementwise work. BQ is 64
//     rows, halved while BQ * K exceeds 1M elements, down to 8 rows (no [N, N] buffer).
//
// Instruction sets: the per-item work (attention_kernel_impl.h) is compiled once per level (default,
// avx2 = x86-64-v3, avx512 = x86-64-v4) and the level is chosen at run time (cpu_isa.h:
// CPUID, ATEN_CPU_CAPABILITY); everything else is built for the baseline.
//
// Shared inputs: when every variant reads the same q and k (batch 1 or expanded, as in the first
// layer of an AtMan run), a work item takes a chunk of variants and computes their common
// QK^T once for the chunk (stored as in paper mode, in both modes), so the chunk costs one QK^T
// GEMM plus one PV GEMM per variant.
//
// Precision: fp32 math for fp32/fp16/bf16 (fp16/bf16 q, k, v are converted to fp32 copies once
// per call, i.e. twice their size in extra memory; the output is computed in fp32 and rounded
// once at the end), fp64 math for fp64.
//
// BLAS: sgemm_/dgemm_ are declared weak and resolved from libtorch_cpu (MKL in the x86 wheels);
// without them, or with ATMAN_CPP_DISABLE_BLAS=1 in the environment, plain loops do the GEMMs
// (same results up to rounding, several times slower).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace atman {

// Returns the attention output [B, Hq, Nq, D] in q's dtype. `mode` is "paper" or "log";
// `softcap` (finite, > 0) or nullopt; `sinks` [Hq] (floating, finite) or undefined.
at::Tensor suppressed_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& factors,
                                    const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                    double scale, c10::string_view mode,
                                    std::optional<double> softcap,
                                    const std::optional<at::Tensor>& sinks);

// Same, written into `out` ([B, Hq, Nq, D], contiguous, q's dtype); every element is written.
void suppressed_attention_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& factors,
                                  const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                  double scale, c10::string_view mode, const at::Tensor& out,
                                  std::optional<double> softcap,
                                  const std::optional<at::Tensor>& sinks);

// Whether a BLAS GEMM from libtorch_cpu was found at load time (else a plain-loop fallback).
bool blas_available();

}  // namespace atman
