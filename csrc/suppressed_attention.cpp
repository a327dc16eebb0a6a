// Fused suppressed attention on CPU: see suppressed_attention.h for semantics and algorithm.
//
// This file is compiled for the baseline of the target (no -march): it checks the inputs,
// prepares the operands, splits the work and runs it in parallel; the inner kernel is the one
// of the instruction-set level chosen at run time (cpu_isa.cpp, attention_kernel_impl.h).
#include "suppressed_attention.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/log.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "attention_kernel.h"
#include "cpu_isa.h"

// BLAS from the MKL (or other BLAS) that libtorch_cpu exports. Weak: if this torch build has no
// such symbol they stay null and the kernel's plain-loop GEMM is used instead (correct, slower).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace atman {
namespace {

using kernel::Operand;
using kernel::Problem;

constexpr int64_t kMaxBlockRows = 64;              // query rows per work item
constexpr int64_t kKeyTile = 256;                  // keys per tile
constexpr int64_t kMinBlockRows = 8;               // never fewer (unless Nq is smaller)
// Stored scores (paper mode, shared q/k): the per-thread [rows, Nk] buffer is kept to this many
// elements (4 MiB fp32); at longer Nk the row block shrinks (down to kMinBlockRows). Measured
// (N = 8192, one thread, AVX-512): 64-row blocks whose 2 MiB of scores are re-read from L3 beat
// 16-row blocks whose scores stay in L2 by 15 % (the GEMMs lose more on 16 rows than the second
// sweep loses on L3). Streamed scores (log mode, no factors) need [rows, kKeyTile] only.
constexpr int64_t kScoreBufferElems = 1 << 20;
constexpr int64_t kPad = 16;  // score, factor and mask rows are padded to a multiple of this

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ATMAN_CPP_DISABLE_BLAS=1 forces the plain-loop GEMM (read per call; lets tests cover it).
bool blas_disabled() {
  const char* env = std::getenv("ATMAN_CPP_DISABLE_BLAS");
  return env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0;
}

template <typename T>
bool have_blas();
template <>
bool have_blas<float>() {
  return sgemm_ != nullptr;
}
template <>
bool have_blas<double>() {
  return dgemm_ != nullptr;
}

// ---------------------------------------------------------------------------------------------

struct Shapes {
  int64_t batch, heads_q, heads_kv, len_q, len_k, dim;
  int kind;
};

Shapes check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& factors,
                    const std::optional<at::Tensor>& key_padding_mask, double scale,
                    c10::string_view mode, std::optional<double> softcap,
                    const std::optional<at::Tensor>& sinks) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4, "suppressed_attention: q, k and v must have rank 4 "
                "[batch, heads, seq, head_dim], got a tensor of shape ", t->sizes());
    TORCH_CHECK(t->device().is_cpu(), "suppressed_attention (C++ backend): q, k and v must be CPU "
                "tensors, got ", t->device());
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "suppressed_attention: q must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype,
              "suppressed_attention: q, k and v must share one dtype, got ", dtype, ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "suppressed_attention: v must have the shape of k ",
              k.sizes(), ", got ", v.sizes());
  Shapes s{};
  s.heads_q = q.size(1);
  s.len_q = q.size(2);
  s.dim = q.size(3);
  s.heads_kv = k.size(1);
  s.len_k = k.size(2);
  TORCH_CHECK(k.size(3) == s.dim, "suppressed_attention: k's head dim must equal q's (", s.dim,
              "), got ", k.size(3));
  TORCH_CHECK(q.numel() > 0 && k.numel() > 0, "suppressed_attention: q and k must have no empty "
              "dimension, got q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(s.heads_q % s.heads_kv == 0, "suppressed_attention: q's head count (", s.heads_q,
              ") must be a multiple of k's head count (", s.heads_kv, ")");
  TORCH_CHECK(s.len_k < (int64_t{1} << 30) && s.dim < (int64_t{1} << 20),
              "suppressed_attention: sequence length or head dim too large for the BLAS tiles");
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "suppressed_attention: scale must be finite and "
              "> 0, got ", scale);
  if (mode == "paper") {
    s.kind = 1;
  } else if (mode == "log") {
    s.kind = 2;
  } else {
    TORCH_CHECK(false, "suppressed_attention: mode must be 'paper' or 'log', got '",
                std::string(mode), "'");
  }
  if (factors.has_value()) {
    const auto& f = *factors;
    TORCH_CHECK(f.dim() == 2 && f.size(1) == s.len_k, "suppressed_attention: factors must have "
                "shape [variants, ", s.len_k, "], got ", f.sizes());
    TORCH_CHECK(f.is_floating_point(), "suppressed_attention: factors must be a floating tensor, "
                "got ", f.scalar_type());
    TORCH_CHECK(f.device().is_cpu(), "suppressed_attention: factors must be a CPU tensor");
    TORCH_CHECK(f.size(0) >= 1, "suppressed_attention: factors must hold at least one variant");
    s.batch = f.size(0);
  } else {
    s.kind = 0;
    s.batch = std::max(q.size(0), k.size(0));
  }
  TORCH_CHECK(q.size(0) == 1 || q.size(0) == s.batch, "suppressed_attention: q's batch size must "
              "be 1 or ", s.batch, " (the number of variants), got ", q.size(0));
  TORCH_CHECK(k.size(0) == 1 || k.size(0) == s.batch, "suppressed_attention: k's batch size must "
              "be 1 or ", s.batch, " (the number of variants), got ", k.size(0));
  if (key_padding_mask.has_value()) {
    const auto& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "suppressed_attention: key_padding_mask must be "
                "bool (True = a real key), got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(1) == s.len_k && (m.size(0) == 1 || m.size(0) == s.batch),
                "suppressed_attention: key_padding_mask must have shape [1 or ", s.batch, ", ",
                s.len_k, "], got ", m.sizes());
    TORCH_CHECK(m.device().is_cpu(), "suppressed_attention: key_padding_mask must be a CPU tensor");
  }
  if (softcap.has_value()) {
    TORCH_CHECK(std::isfinite(*softcap) && *softcap > 0, "suppressed_attention: softcap must be "
                "finite and > 0 (s -> c * tanh(s / c)), got ", *softcap);
  }
  if (sinks.has_value()) {
    const auto& z = *sinks;
    TORCH_CHECK(z.dim() == 1 && z.size(0) == s.heads_q, "suppressed_attention: sinks must have "
                "shape [", s.heads_q, "] (one logit per query head), got ", z.sizes());
    TORCH_CHECK(z.is_floating_point(), "suppressed_attention: sinks must be a floating tensor, "
                "got ", z.scalar_type());
    TORCH_CHECK(z.device().is_cpu(), "suppressed_attention: sinks must be a CPU tensor");
    TORCH_CHECK(z.isfinite().all().item<bool>(), "suppressed_attention: sinks must be finite, "
                "got NaN or inf");
  }
  return s;
}

// A view the GEMM can read: unit stride along D and a row stride in [D, INT_MAX] (else a
// contiguous copy).
template <typename T>
Operand<T> as_operand(const at::Tensor& t, at::Tensor& keep) {
  const int64_t d = t.size(3);
  const bool rows_ok =
      t.size(2) == 1 || (t.stride(2) >= d && t.stride(2) <= std::numeric_limits<int>::max());
  keep = (t.stride(3) == 1 || d == 1) && rows_ok ? t : t.contiguous();
  const int64_t row_stride = keep.size(2) == 1 ? d : keep.stride(2);
  return Operand<T>{keep.const_data_ptr<T>(), keep.size(0) == 1 ? 0 : keep.stride(0),
                    keep.stride(1), row_stride};
}

// How the work is cut (see run_items in attention_kernel_impl.h for the item numbering).
template <typename T>
void plan_work(Problem<T>& pb) {
  const int64_t ld_s = round_up(pb.len_k, kPad);
  // When every variant reads the same q and k (batch 1 or expanded: AtMan's first layer), the
  // scores are equal for all variants: a work item then takes a chunk of variants and computes
  // QK^T once for the chunk. The chunking only decides which items share that GEMM; every
  // variant's result is computed the same way whatever the chunks are.
  pb.share_scores = pb.batch > 1 && pb.q.batch_stride == 0 && pb.k.batch_stride == 0;
  // Paper mode needs each row's minimum over all its keys before its first exp: its scores are
  // stored for the block (one QK^T), as are shared ones; log mode and no factors stream them.
  pb.store_scores = pb.kind == 1 || pb.share_scores;
  pb.key_tile = kKeyTile;
  int64_t block = std::min(pb.len_q, kMaxBlockRows);
  if (pb.store_scores) {
    while (block > kMinBlockRows && block * ld_s > kScoreBufferElems) block = (block + 1) / 2;
  }
  pb.ld_scores = ld_s;
  pb.block_rows = block;
  pb.n_blocks = (pb.len_q + block - 1) / block;
  int64_t per_item = 1;
  if (pb.share_scores) {
    const int64_t base = pb.heads_q * pb.n_blocks;
    const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
    const int64_t chunks = std::min(pb.batch, (want + base - 1) / base);
    per_item = (pb.batch + chunks - 1) / chunks;
  }
  pb.variants_per_item = per_item;
}

int run_kernel(const kernel::KernelTable& table, const Problem<float>& pb, int64_t b,
               int64_t e) {
  return table.run_f32(pb, b, e);
}
int run_kernel(const kernel::KernelTable& table, const Problem<double>& pb, int64_t b,
               int64_t e) {
  return table.run_f64(pb, b, e);
}

void set_blas(Problem<float>& pb, bool use) { pb.sgemm = use ? &sgemm_ : nullptr; }
void set_blas(Problem<double>& pb, bool use) { pb.dgemm = use ? &dgemm_ : nullptr; }

// A [B, Nk] row vector per variant, copied into [B, round_up(Nk, kPad)] filled with `pad`.
at::Tensor padded_rows(const at::Tensor& t, at::ScalarType dtype, double pad) {
  const int64_t n = t.size(1);
  at::Tensor out = pad == 0 ? at::zeros({t.size(0), round_up(n, kPad)}, t.options().dtype(dtype))
                            : at::ones({t.size(0), round_up(n, kPad)}, t.options().dtype(dtype));
  out.narrow(1, 0, n).copy_(t);
  return out;
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const std::optional<at::Tensor>& factors,
            const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
            std::optional<double> softcap, const std::optional<at::Tensor>& sinks,
            const Shapes& s, const at::Tensor& out) {
  const auto compute = c10::CppTypeToScalarType<T>::value;
  // A batch expanded with stride 0 is one shared batch: keep it as batch 1 (never copied).
  auto prepare = [&](const at::Tensor& t) {
    at::Tensor one = t.size(0) > 1 && t.stride(0) == 0 ? t.narrow(0, 0, 1) : t;
    return one.scalar_type() == compute ? one : one.to(compute);
  };
  at::Tensor qc = prepare(q);
  at::Tensor kc = prepare(k);
  at::Tensor vc = prepare(v);
  at::Tensor qk, kk, vk;
  Problem<T> pb{};
  pb.q = as_operand<T>(qc, qk);
  pb.k = as_operand<T>(kc, kk);
  pb.v = as_operand<T>(vc, vk);
  pb.ld_keys = round_up(s.len_k, kPad);
  at::Tensor f, logf, mask;
  if (s.kind != 0) {
    f = padded_rows(*factors, compute, 1.0);
    pb.factors = f.const_data_ptr<T>();
    if (s.kind == 2) {
      logf = at::log(f);  // log(0) = -inf: the key is removed; the padding's log(1) = 0
      pb.logf = logf.const_data_ptr<T>();
    }
  }
  if (key_padding_mask.has_value()) {
    mask = padded_rows(*key_padding_mask, at::kBool, 0.0);
    pb.mask = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
    pb.mask_batch_stride = mask.size(0) == 1 ? 0 : pb.ld_keys;
  }
  // The kernel writes the compute type; fp16 / bf16 outputs are rounded once at the end.
  at::Tensor result = out.scalar_type() == compute ? out : at::empty(out.sizes(),
                                                                      out.options().dtype(compute));
  pb.out = result.mutable_data_ptr<T>();
  pb.batch = s.batch;
  pb.heads_q = s.heads_q;
  pb.heads_kv = s.heads_kv;
  pb.len_q = s.len_q;
  pb.len_k = s.len_k;
  pb.dim = s.dim;
  pb.scale = static_cast<T>(scale);
  pb.softcap = softcap.has_value() ? static_cast<T>(*softcap) : T(0);
  at::Tensor sink_values;
  if (sinks.has_value()) {
    sink_values = sinks->to(compute).contiguous();
    pb.sinks = sink_values.const_data_ptr<T>();
  }
  pb.causal = causal ? 1 : 0;
  pb.kind = s.kind;
  set_blas(pb, have_blas<T>() && !blas_disabled());
  plan_work(pb);
  const int64_t n_chunks = (pb.batch + pb.variants_per_item - 1) / pb.variants_per_item;
  const int64_t items = n_chunks * pb.heads_q * pb.n_blocks;
  const kernel::KernelTable& table = active_kernels();
  std::atomic<bool> failed{false};
  // One work item per task; inside the OpenMP region each BLAS call runs single-threaded.
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    if (run_kernel(table, pb, begin, end) != 0) failed = true;
  });
  TORCH_CHECK(!failed, "suppressed_attention: cannot allocate the per-thread score buffers (",
              pb.block_rows, " x ", pb.ld_scores, " elements)");
  if (!result.is_same(out)) out.copy_(result);
}

void dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& factors,
              const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
              std::optional<double> softcap, const std::optional<at::Tensor>& sinks,
              const Shapes& s, const at::Tensor& out) {
  if (q.scalar_type() == at::kDouble) {
    return launch<double>(q, k, v, factors, key_padding_mask, causal, scale, softcap, sinks, s,
                          out);
  }
  // fp32 math for fp32, fp16 and bf16
  return launch<float>(q, k, v, factors, key_padding_mask, causal, scale, softcap, sinks, s,
                       out);
}

}  // namespace

bool blas_available() { return have_blas<float>() && have_blas<double>(); }

at::Tensor suppressed_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& factors,
                                    const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                    double scale, c10::string_view mode,
                                    std::optional<double> softcap,
                                    const std::optional<at::Tensor>& sinks) {
  const Shapes s = check_inputs(q, k, v, factors, key_padding_mask, scale, mode, softcap, sinks);
  at::Tensor out = at::empty({s.batch, s.heads_q, s.len_q, s.dim}, q.options());
  dispatch(q, k, v, factors, key_padding_mask, causal, scale, softcap, sinks, s, out);
  return out;
}

void suppressed_attention_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& factors,
                                  const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                  double scale, c10::string_view mode, const at::Tensor& out,
                                  std::optional<double> softcap,
                                  const std::optional<at::Tensor>& sinks) {
  const Shapes s = check_inputs(q, k, v, factors, key_padding_mask, scale, mode, softcap, sinks);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == q.scalar_type() &&
                  out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({s.batch, s.heads_q, s.len_q, s.dim}),
              "suppressed_attention_out: out must be a contiguous CPU tensor of shape [", s.batch,
              ", ", s.heads_q, ", ", s.len_q, ", ", s.dim, "] and dtype ", q.scalar_type(),
              ", got shape ", out.sizes(), ", dtype ", out.scalar_type());
  dispatch(q, k, v, factors, key_padding_mask, causal, scale, softcap, sinks, s, out);
}

}  // namespace atman
