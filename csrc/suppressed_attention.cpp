// Fused suppressed attention on CPU: see suppressed_attention.h for semantics and algorithm.
#include "suppressed_attention.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

// BLAS from the MKL (or other BLAS) that libtorch_cpu exports. Weak: if this torch build has no
// such symbol they stay null and a plain-loop GEMM is used instead (correct, slower).
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

constexpr int64_t kMaxBlockRows = 64;           // query rows per work item
constexpr int64_t kMinBlockRows = 8;            // never fewer (unless Nq is smaller)
constexpr int64_t kScoreBufferElems = 256 * 1024;  // target size of the per-thread score buffer
constexpr int64_t kLanes = 16;                  // width of the elementwise lane loops

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// GEMM on row-major matrices (BLAS is column-major: a row-major [r, c] matrix with leading
// dimension ld is the column-major [c, r] matrix with the same ld).

template <typename T>
void blas_gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
               int ldb, T beta, T* c, int ldc);

template <>
void blas_gemm<float>(char ta, char tb, int m, int n, int k, float alpha, const float* a,
                      int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

template <>
void blas_gemm<double>(char ta, char tb, int m, int n, int k, double alpha, const double* a,
                       int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

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

// S[i, j] = alpha * sum_c Q[i, c] K[j, c]; Q [m, d] (ld ldq), K [n, d] (ld ldk), S ld lds.
template <typename T>
void gemm_scores(bool use_blas, int64_t m, int64_t n, int64_t d, T alpha, const T* q,
                 int64_t ldq, const T* k, int64_t ldk, T* s, int64_t lds) {
  if (use_blas) {
    // column-major: S^T [n, m] = K [n, d] (stored as [d, n] -> 'T') x Q^T [d, m] ('N')
    blas_gemm<T>('T', 'N', static_cast<int>(n), static_cast<int>(m), static_cast<int>(d), alpha,
                 k, static_cast<int>(ldk), q, static_cast<int>(ldq), T(0), s,
                 static_cast<int>(lds));
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    const T* qi = q + i * ldq;
    for (int64_t j = 0; j < n; ++j) {
      const T* kj = k + j * ldk;
      T acc = 0;
      for (int64_t c = 0; c < d; ++c) acc += qi[c] * kj[c];
      s[i * lds + j] = alpha * acc;
    }
  }
}

// O[i, c] = sum_j P[i, j] V[j, c]; P [m, n] (ld ldp), V [n, d] (ld ldv), O [m, d] (ld ldo).
template <typename T>
void gemm_pv(bool use_blas, int64_t m, int64_t n, int64_t d, const T* p, int64_t ldp,
             const T* v, int64_t ldv, T* o, int64_t ldo) {
  if (use_blas) {
    // column-major: O^T [d, m] = V^T [d, n] ('N') x P^T [n, m] ('N')
    blas_gemm<T>('N', 'N', static_cast<int>(d), static_cast<int>(m), static_cast<int>(n), T(1),
                 v, static_cast<int>(ldv), p, static_cast<int>(ldp), T(0), o,
                 static_cast<int>(ldo));
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    T* oi = o + i * ldo;
    for (int64_t c = 0; c < d; ++c) oi[c] = 0;
    for (int64_t j = 0; j < n; ++j) {
      const T pij = p[i * ldp + j];
      const T* vj = v + j * ldv;
      for (int64_t c = 0; c < d; ++c) oi[c] += pij * vj[c];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// exp for x <= 0 (including -inf), written so GCC vectorises it: Cody-Waite range reduction and
// the Cephes expf polynomial (about 2 ulp). Below -87 it returns exactly 0 (exp(-87) = 1.6e-38
// is negligible next to the row's largest term, which is 1), so -inf (masked or removed keys)
// gives exactly 0 without relying on inf arithmetic inside the polynomial.
inline float exp_nonpositive(float x) {
  const bool under = !(x > -87.0f);
  const float xc = under ? -87.0f : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to int
  const float fn = (xc * 1.44269504088896341f + round_magic) - round_magic;
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;  // 2^fn, fn in [-126, 0]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return under ? 0.0f : y * two_n;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// ---------------------------------------------------------------------------------------------
// Row passes over one row of scores s[0, n). The min/max passes use GCC/Clang vector extensions
// (64-byte vectors: one AVX-512 register, or several narrower ones in a portable build): the
// auto-vectoriser leaves these masked reductions scalar. Reductions keep one accumulator per
// lane, combined once at the end in a fixed order: deterministic, no reassociation.

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef uint8_t M __attribute__((vector_size(16)));
  static constexpr int64_t kWidth = 16;
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  typedef uint8_t M __attribute__((vector_size(8)));
  static constexpr int64_t kWidth = 8;
};

template <typename T>
inline typename Vec<T>::V load_vec(const T* p) {
  typename Vec<T>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store_vec(T* p, typename Vec<T>::V v) {
  std::memcpy(p, &v, sizeof(v));
}

// Lanes whose key is real (mask byte != 0), as a vector condition.
template <typename T>
inline typename Vec<T>::I visible_lanes(const uint8_t* mask) {
  typename Vec<T>::M bytes;
  std::memcpy(&bytes, mask, sizeof(bytes));
  return __builtin_convertvector(bytes, typename Vec<T>::I) != 0;
}

template <typename T, bool kMasked>
T masked_row_min(const T* __restrict s, const uint8_t* __restrict mask, int64_t n) {
  using V = typename Vec<T>::V;
  constexpr int64_t W = Vec<T>::kWidth;
  const T inf = std::numeric_limits<T>::infinity();
  const V inf_v = V{} + inf;
  V acc = inf_v;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    V x = load_vec<T>(s + j);
    if constexpr (kMasked) x = visible_lanes<T>(mask + j) ? x : inf_v;
    acc = x < acc ? x : acc;
  }
  T result = inf;
  for (; j < n; ++j) {
    T x = s[j];
    if constexpr (kMasked) x = mask[j] != 0 ? x : inf;
    result = x < result ? x : result;
  }
  for (int64_t l = 0; l < W; ++l) result = acc[l] < result ? acc[l] : result;
  return result;
}

// Transform the scores in place (s' per mode, -inf for padded keys) and return the row max.
// kind: 0 = no factors, 1 = paper (uses f and row_min), 2 = log (uses logf).
template <typename T, int kKind, bool kMasked>
T transform_row(T* __restrict s, const uint8_t* __restrict mask, const T* __restrict f,
                const T* __restrict logf, T row_min, int64_t n) {
  using V = typename Vec<T>::V;
  constexpr int64_t W = Vec<T>::kWidth;
  const T ninf = -std::numeric_limits<T>::infinity();
  const V ninf_v = V{} + ninf;
  const V min_v = V{} + row_min;
  V acc = ninf_v;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    V x = load_vec<T>(s + j);
    if constexpr (kKind == 1) x = min_v + load_vec<T>(f + j) * (x - min_v);
    if constexpr (kKind == 2) x = x + load_vec<T>(logf + j);
    if constexpr (kMasked) x = visible_lanes<T>(mask + j) ? x : ninf_v;
    store_vec<T>(s + j, x);
    acc = x > acc ? x : acc;
  }
  T result = ninf;
  for (; j < n; ++j) {
    T x = s[j];
    if constexpr (kKind == 1) x = row_min + f[j] * (x - row_min);
    if constexpr (kKind == 2) x = x + logf[j];
    if constexpr (kMasked) x = mask[j] != 0 ? x : ninf;
    s[j] = x;
    result = x > result ? x : result;
  }
  for (int64_t l = 0; l < W; ++l) result = acc[l] > result ? acc[l] : result;
  return result;
}

// p = exp(s' - max) in place; returns the row sum.
template <typename T>
T exp_row(T* __restrict s, T row_max, int64_t n) {
  T acc[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) acc[l] = 0;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const T p = exp_nonpositive(s[j + l] - row_max);
      s[j + l] = p;
      acc[l] += p;
    }
  }
  T result = 0;
  for (; j < n; ++j) {
    const T p = exp_nonpositive(s[j] - row_max);
    s[j] = p;
    result += p;
  }
  T lanes = 0;
  for (int64_t l = 0; l < kLanes; ++l) lanes += acc[l];
  return lanes + result;
}

template <typename T, int kKind, bool kMasked>
T softmax_row_impl(T* s, const uint8_t* mask, const T* f, const T* logf, int64_t n) {
  T row_min = 0;
  if constexpr (kKind == 1) {
    row_min = masked_row_min<T, kMasked>(s, mask, n);
    if (!(row_min < std::numeric_limits<T>::infinity())) return T(0);  // no visible key
  }
  const T row_max = transform_row<T, kKind, kMasked>(s, mask, f, logf, row_min, n);
  if (!(row_max > -std::numeric_limits<T>::infinity())) return T(0);  // nothing attended
  const T sum = exp_row<T>(s, row_max, n);
  return T(1) / sum;
}

// Turns row s[0, n) into unnormalised probabilities; returns 1 / rowsum, or 0 for a row that
// attends to nothing (the caller then writes zeros).
template <typename T>
T softmax_row(T* s, const uint8_t* mask, const T* f, const T* logf, int kind, int64_t n) {
  if (n <= 0) return T(0);
  if (mask != nullptr) {
    if (kind == 1) return softmax_row_impl<T, 1, true>(s, mask, f, logf, n);
    if (kind == 2) return softmax_row_impl<T, 2, true>(s, mask, f, logf, n);
    return softmax_row_impl<T, 0, true>(s, mask, f, logf, n);
  }
  if (kind == 1) return softmax_row_impl<T, 1, false>(s, mask, f, logf, n);
  if (kind == 2) return softmax_row_impl<T, 2, false>(s, mask, f, logf, n);
  return softmax_row_impl<T, 0, false>(s, mask, f, logf, n);
}

// ---------------------------------------------------------------------------------------------

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

template <typename T>
std::unique_ptr<T[], AlignedFree> aligned_buffer(int64_t n) {
  const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * sizeof(T), 64));
  void* p = std::aligned_alloc(64, bytes);
  TORCH_CHECK(p != nullptr, "suppressed_attention: cannot allocate ", bytes, " bytes");
  return std::unique_ptr<T[], AlignedFree>(static_cast<T*>(p));
}

// A [batch, heads, seq, D] operand addressed through strides (in elements); batch stride 0
// when shared by every variant.
template <typename T>
struct Operand {
  const T* data;
  int64_t batch_stride, head_stride, row_stride;
  const T* rows(int64_t b, int64_t h) const { return data + b * batch_stride + h * head_stride; }
};

template <typename T, typename out_t>
struct Problem {
  Operand<T> q, k, v;
  const T* factors;   // [B, Nk] or null
  const T* logf;      // [B, Nk] or null (log mode)
  const uint8_t* mask;  // [Bm, Nk] (bool storage) or null
  int64_t mask_batch_stride;
  out_t* out;         // [B, Hq, Nq, D] contiguous
  int64_t batch, heads_q, heads_kv, len_q, len_k, dim;
  T scale;
  bool causal;
  int kind;           // 0 none, 1 paper, 2 log
  bool use_blas;      // BLAS GEMM, else the plain loops
};

template <typename T, typename out_t>
void run_problem(const Problem<T, out_t>& pb) {
  const int64_t len_q = pb.len_q, len_k = pb.len_k, dim = pb.dim;
  int64_t block = std::min(len_q, kMaxBlockRows);
  const int64_t ld_s = round_up(len_k, 16);
  while (block > kMinBlockRows && block * ld_s > kScoreBufferElems) block = (block + 1) / 2;
  const int64_t n_blocks = (len_q + block - 1) / block;
  const int64_t group = pb.heads_q / pb.heads_kv;
  const int64_t offset = len_k - len_q;  // causal: row i sees keys j <= i + offset
  // When every variant reads the same q and k (batch 1 or expanded: AtMan's first layer), the
  // scores are equal for all variants: a work item then takes a chunk of variants and computes
  // QK^T once for the chunk. The chunking only decides which items share that GEMM; every
  // variant's result is computed the same way whatever the chunks are.
  const bool share_scores = pb.batch > 1 && pb.q.batch_stride == 0 && pb.k.batch_stride == 0;
  int64_t per_item = 1;
  if (share_scores) {
    const int64_t base = pb.heads_q * n_blocks;
    const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
    const int64_t chunks = std::min(pb.batch, (want + base - 1) / base);
    per_item = (pb.batch + chunks - 1) / chunks;
  }
  const int64_t n_chunks = (pb.batch + per_item - 1) / per_item;
  const int64_t items = n_chunks * pb.heads_q * n_blocks;

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    // Inside the OpenMP region each BLAS call runs single-threaded (MKL does not nest).
    auto scores = aligned_buffer<T>(block * ld_s);
    auto shared = aligned_buffer<T>(share_scores ? block * ld_s : 0);
    auto acc = aligned_buffer<T>(block * dim);
    std::vector<T> inv_sum(block);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % n_blocks;
      const int64_t h = (item / n_blocks) % pb.heads_q;
      const int64_t chunk = item / (n_blocks * pb.heads_q);
      const int64_t row0 = qb * block;
      const int64_t rows = std::min(block, len_q - row0);
      // keys the block may see at all (causal: later keys are never touched)
      const int64_t keys =
          pb.causal ? std::clamp<int64_t>(row0 + rows + offset, 0, len_k) : len_k;
      const int64_t b_first = chunk * per_item;
      const int64_t b_end = std::min(pb.batch, b_first + per_item);
      for (int64_t b = b_first; b < b_end; ++b) {
        out_t* out = pb.out + ((b * pb.heads_q + h) * len_q + row0) * dim;
        if (keys == 0) {
          for (int64_t i = 0; i < rows * dim; ++i) out[i] = static_cast<out_t>(T(0));
          continue;
        }
        const T* q = pb.q.rows(b, h) + row0 * pb.q.row_stride;
        const T* k = pb.k.rows(b, h / group);
        const T* v = pb.v.rows(b, h / group);
        if (!share_scores) {
          gemm_scores<T>(pb.use_blas, rows, keys, dim, pb.scale, q, pb.q.row_stride, k,
                         pb.k.row_stride, scores.get(), ld_s);
        } else {
          if (b == b_first) {
            gemm_scores<T>(pb.use_blas, rows, keys, dim, pb.scale, q, pb.q.row_stride, k,
                           pb.k.row_stride, shared.get(), ld_s);
          }
          for (int64_t r = 0; r < rows; ++r) {
            std::memcpy(scores.get() + r * ld_s, shared.get() + r * ld_s, keys * sizeof(T));
          }
        }
        const T* f = pb.factors ? pb.factors + b * len_k : nullptr;
        const T* logf = pb.logf ? pb.logf + b * len_k : nullptr;
        const uint8_t* mask = pb.mask ? pb.mask + b * pb.mask_batch_stride : nullptr;
        for (int64_t r = 0; r < rows; ++r) {
          T* s = scores.get() + r * ld_s;
          const int64_t visible =
              pb.causal ? std::clamp<int64_t>(row0 + r + 1 + offset, 0, keys) : keys;
          const T inv = softmax_row<T>(s, mask, f, logf, pb.kind, visible);
          // keys past this row's causal limit (and whole rows attending to nothing) weigh 0
          const int64_t zero_from = inv == T(0) ? 0 : visible;
          for (int64_t j = zero_from; j < keys; ++j) s[j] = T(0);
          inv_sum[r] = inv;
        }
        gemm_pv<T>(pb.use_blas, rows, keys, dim, scores.get(), ld_s, v, pb.v.row_stride,
                   acc.get(), dim);
        for (int64_t r = 0; r < rows; ++r) {
          const T inv = inv_sum[r];
          const T* a = acc.get() + r * dim;
          out_t* o = out + r * dim;
          for (int64_t c = 0; c < dim; ++c) o[c] = static_cast<out_t>(a[c] * inv);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------

struct Shapes {
  int64_t batch, heads_q, heads_kv, len_q, len_k, dim;
  int kind;
};

Shapes check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& factors,
                    const std::optional<at::Tensor>& key_padding_mask, double scale,
                    c10::string_view mode) {
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

template <typename T, typename out_t>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const std::optional<at::Tensor>& factors,
            const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
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
  Problem<T, out_t> pb{};
  pb.q = as_operand<T>(qc, qk);
  pb.k = as_operand<T>(kc, kk);
  pb.v = as_operand<T>(vc, vk);
  at::Tensor f, logf, mask;
  if (s.kind != 0) {
    f = factors->to(compute).contiguous();
    pb.factors = f.const_data_ptr<T>();
    if (s.kind == 2) {
      logf = at::empty(f.sizes(), f.options());
      const T* src = f.const_data_ptr<T>();
      T* dst = logf.mutable_data_ptr<T>();
      for (int64_t i = 0; i < f.numel(); ++i) dst[i] = std::log(src[i]);  // log(0) = -inf
      pb.logf = logf.const_data_ptr<T>();
    }
  }
  if (key_padding_mask.has_value()) {
    mask = key_padding_mask->contiguous();
    pb.mask = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
    pb.mask_batch_stride = mask.size(0) == 1 ? 0 : s.len_k;
  }
  pb.out = out.mutable_data_ptr<out_t>();
  pb.batch = s.batch;
  pb.heads_q = s.heads_q;
  pb.heads_kv = s.heads_kv;
  pb.len_q = s.len_q;
  pb.len_k = s.len_k;
  pb.dim = s.dim;
  pb.scale = static_cast<T>(scale);
  pb.causal = causal;
  pb.kind = s.kind;
  pb.use_blas = have_blas<T>() && !blas_disabled();
  run_problem<T, out_t>(pb);
}

void dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& factors,
              const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
              const Shapes& s, const at::Tensor& out) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return launch<float, float>(q, k, v, factors, key_padding_mask, causal, scale, s, out);
    case at::kDouble:
      return launch<double, double>(q, k, v, factors, key_padding_mask, causal, scale, s, out);
    case at::kHalf:
      return launch<float, c10::Half>(q, k, v, factors, key_padding_mask, causal, scale, s, out);
    case at::kBFloat16:
      return launch<float, c10::BFloat16>(q, k, v, factors, key_padding_mask, causal, scale, s,
                                          out);
    default:
      TORCH_CHECK(false, "suppressed_attention: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace

bool blas_available() { return have_blas<float>() && have_blas<double>(); }

at::Tensor suppressed_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& factors,
                                    const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                    double scale, c10::string_view mode) {
  const Shapes s = check_inputs(q, k, v, factors, key_padding_mask, scale, mode);
  at::Tensor out = at::empty({s.batch, s.heads_q, s.len_q, s.dim}, q.options());
  dispatch(q, k, v, factors, key_padding_mask, causal, scale, s, out);
  return out;
}

void suppressed_attention_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& factors,
                                  const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                  double scale, c10::string_view mode, const at::Tensor& out) {
  const Shapes s = check_inputs(q, k, v, factors, key_padding_mask, scale, mode);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == q.scalar_type() &&
                  out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({s.batch, s.heads_q, s.len_q, s.dim}),
              "suppressed_attention_out: out must be a contiguous CPU tensor of shape [", s.batch,
              ", ", s.heads_q, ", ", s.len_q, ", ", s.dim, "] and dtype ", q.scalar_type(),
              ", got shape ", out.sizes(), ", dtype ", out.scalar_type());
  dispatch(q, k, v, factors, key_padding_mask, causal, scale, s, out);
}

}  // namespace atman
