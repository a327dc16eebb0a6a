// Fused suppressed attention for CPU tensors (AtMan, docs/semantics.md, suppression formulas).
//
// Shapes: q [Bq, Hq, Nq, D], k and v [Bk, Hkv, Nk, D], Bq and Bk in {1, B} (a 1 is read by every
// variant, never copied), Hq a multiple of Hkv (query head h reads kv head h / (Hq / Hkv)).
// factors [B, Nk] (any float dtype, >= 0) or undefined; key_padding_mask [1 or B, Nk] bool
// (True = a real key) or undefined. Output [B, Hq, Nq, D] contiguous, q's dtype.
//
// Semantics (identical to atman_kernels/ops/reference.py): visible keys of query row i are the
// keys allowed by the causal mask (bottom-right aligned: row i sits at absolute position
// Nk - Nq + i) and by key_padding_mask. s = scale * q.k over visible keys;
//   paper: s' = m + f (s - m), m = min of s over the row's visible keys;
//   log:   s' = s + log f (f = 0 removes the key);
//   no factors: s' = s.
// Softmax over the visible keys; a row with no visible key (or only removed keys) is zero.
//
// Algorithm: one work item = (variant b, query head h, block of BQ query rows); items run in
// parallel (at::parallel_for, OpenMP), each on one thread from start to end, and every output
// row is computed by the same sequence of operations whatever the thread count or partition
// (bit-identical reruns).
// Per item, with K = the keys the block may see (causal: keys past the block's last row are
// never touched, which skips every future key tile):
//   1. S[BQ, K] = scale * Q K^T with one single-threaded BLAS GEMM (MKL sgemm/dgemm from
//      libtorch_cpu) into a per-thread buffer;
//   2. per row, vectorised loops: masked row minimum (paper mode), the transform, the masked
//      row maximum, exp(s' - max) (an inline polynomial exp for fp32, exact 0 for -inf) and the
//      row sum, written back in place as P;
//   3. O[BQ, D] = P V with a second GEMM, scaled by 1 / rowsum and stored in the output dtype.
// This is the "keep the row block's scores" scheme: the scores of the block are computed once,
// so paper mode costs exactly the FLOPs of plain attention (2 * Nq * K * D for QK^T plus the same
// for PV, per variant and head; no recomputation for the row minimum, no online rescaling),
// plus O(Nq * K) elementwise work. Memory: BQ * K scores per thread (no [N, N] buffer): BQ is
// 64 rows, halved while BQ * K exceeds 256K elements (1 MiB in fp32) down to 8 rows, so it stays
// cache-sized up to K = 32768 and grows only linearly in K beyond.
//
// Shared inputs: when every variant reads the same q and k (batch 1 or expanded, as in the first
// layer of an AtMan run), a work item takes a chunk of variants and computes their common
// QK^T once, so the chunk costs one QK^T GEMM plus one PV GEMM per variant.
//
// Precision: fp32 math for fp32/fp16/bf16 (fp16/bf16 q, k, v are converted to fp32 copies once
// per call, i.e. twice their size in extra memory; the output is rounded once at the end), fp64
// math for fp64.
//
// BLAS: sgemm_/dgemm_ are declared weak and resolved from libtorch_cpu (MKL in the x86 wheels);
// without them, or with ATMAN_CPP_DISABLE_BLAS=1 in the environment, plain loops do the GEMMs
// (same results up to rounding, several times slower).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace atman {

// Returns the attention output [B, Hq, Nq, D] in q's dtype. `mode` is "paper" or "log".
at::Tensor suppressed_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& factors,
                                    const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                    double scale, c10::string_view mode);

// Same, written into `out` ([B, Hq, Nq, D], contiguous, q's dtype); every element is written.
void suppressed_attention_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& factors,
                                  const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                  double scale, c10::string_view mode, const at::Tensor& out);

// Whether a BLAS GEMM from libtorch_cpu was found at load time (else a plain-loop fallback).
bool blas_available();

}  // namespace atman
