// The inner CPU kernel, compiled once per instruction-set level: csrc/isa/attention_kernel_*.cpp
// define ATMAN_ISA_TABLE (the KernelTable to define), ATMAN_ISA_NAME and ATMAN_ISA_VECTOR_BYTES
// (16 baseline, 32 AVX2, 64 AVX-512), then include this file; setup.py
// compiles each with its own -march. Semantics and algorithm: suppressed_attention.h.
//
// Everything here has internal linkage (anonymous namespace) except the one table, and nothing
// from torch or the C++ standard library is used: an inline function with external linkage
// compiled here with -march=x86-64-v4 could otherwise replace the baseline copy of the same
// function elsewhere in the library. `nm` on the object shows only the table and C symbols.
//
// Per work item (variant chunk, query head, block of rows), with K = the keys the block may see,
// cut into tiles of pb.key_tile keys, an online ("flash") softmax per row:
//   - streaming (log mode, no factors): tile by tile, S = scale Q K_tile^T (one BLAS GEMM into
//     a [rows, tile] buffer that stays in cache), soft-capped in place, then per row the tile's
//     maximum of s', the running maximum and sum (the accumulator row rescaled when the
//     maximum grows), P = exp(s' - max), and acc += P V_tile (a second GEMM);
//   - stored scores (paper mode, whose s' needs the row minimum over *all* visible keys before
//     the first exp, and shared q/k, whose scores serve every variant of the item): a first
//     sweep computes every tile's S into a [rows, K] buffer (soft-capped) and each row's minimum
//     while the tile is hot; the second sweep runs the same online softmax over the stored
//     tiles (exact: the minimum is known by then, and the running maximum is exact too).
// The transform is s' = s (no factors), m + f (s - m) (paper), s + log f (log; log f
// precomputed per key); a key that is padded, causally hidden or removed gets exactly 0. Sinks
// start each row's running maximum at the head's sink logit with a sum of 1 (one more softmax
// column whose value row is zero). Out = acc / sum.
// Vectors are GCC/Clang vector extensions of ATMAN_ISA_VECTOR_BYTES bytes (one register of the
// level); exp and tanh are vector polynomials (below). Reductions keep one accumulator per lane,
// combined in a fixed order: each output row is computed the same way whatever the threads.

#ifndef ATMAN_ISA_TABLE
#error "include attention_kernel_impl.h only from csrc/isa/attention_kernel_<level>.cpp"
#endif

#include <stdint.h>
#include <stdlib.h>

#include "attention_kernel.h"

namespace atman {
namespace kernel {
namespace {

constexpr int kVectorBytes = ATMAN_ISA_VECTOR_BYTES;

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t clamp_i64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// ---------------------------------------------------------------------------------------------
// Vectors of one register.

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(kVectorBytes)));
  typedef int32_t I __attribute__((vector_size(kVectorBytes)));
  typedef uint8_t M __attribute__((vector_size(kVectorBytes / 4)));
  typedef int32_t Lane;
  static constexpr int64_t W = kVectorBytes / 4;
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(kVectorBytes)));
  typedef int64_t I __attribute__((vector_size(kVectorBytes)));
  typedef uint8_t M __attribute__((vector_size(kVectorBytes / 8)));
  typedef int64_t Lane;
  static constexpr int64_t W = kVectorBytes / 8;
};

template <typename T>
inline typename Vec<T>::V load(const T* p) {
  typename Vec<T>::V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, typename Vec<T>::V v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename T>
inline typename Vec<T>::V splat(T x) {
  return typename Vec<T>::V{} + x;
}

// All-ones lanes where the key is real (mask byte != 0).
template <typename T>
inline typename Vec<T>::I mask_lanes(const uint8_t* mask) {
  typename Vec<T>::M bytes;
  __builtin_memcpy(&bytes, mask, sizeof(bytes));
  return __builtin_convertvector(bytes, typename Vec<T>::I) != 0;
}

// All-ones lanes l < count (the tail vector of a row).
template <typename T>
inline typename Vec<T>::I first_lanes(int64_t count) {
  typedef typename Vec<T>::I I;
  typedef typename Vec<T>::Lane Lane;
  I iota;
  for (int64_t l = 0; l < Vec<T>::W; ++l) iota[l] = static_cast<Lane>(l);
  return iota < static_cast<Lane>(count);
}

template <typename T>
inline T lanes_min(typename Vec<T>::V v) {
  T r = v[0];
  for (int64_t l = 1; l < Vec<T>::W; ++l) r = v[l] < r ? v[l] : r;
  return r;
}
template <typename T>
inline T lanes_max(typename Vec<T>::V v) {
  T r = v[0];
  for (int64_t l = 1; l < Vec<T>::W; ++l) r = v[l] > r ? v[l] : r;
  return r;
}
template <typename T>
inline T lanes_sum(typename Vec<T>::V v) {
  T r = v[0];
  for (int64_t l = 1; l < Vec<T>::W; ++l) r += v[l];
  return r;
}

// exp(x) for x <= 0 lanes (including -inf), fp32: Cody-Waite range reduction and the Cephes
// expf polynomial (about 2 ulp). Below -87 a lane is exactly 0 (exp(-87) = 1.6e-38 is
// negligible next to the row's largest term, 1), so -inf gives 0 without inf arithmetic.
inline Vec<float>::V exp_nonpositive(Vec<float>::V x) {
  typedef Vec<float>::V V;
  typedef Vec<float>::I I;
  const I keep = x > -87.0f;
  const V xc = keep ? x : splat<float>(-87.0f);
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to int
  const V fn = (xc * 1.44269504088896341f + round_magic) - round_magic;
  V r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  V p = splat<float>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * (r * r) + r + 1.0f;
  const I bits = (__builtin_convertvector(fn, I) + 127) << 23;  // 2^fn, fn in [-126, 0]
  V two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  return keep ? y * two_n : V{};
}

// fp64 (the reference-grade path): the C library's exp per lane.
inline Vec<double>::V exp_nonpositive(Vec<double>::V x) {
  Vec<double>::V r = x;
  for (int64_t l = 0; l < Vec<double>::W; ++l) r[l] = __builtin_exp(x[l]);
  return r;
}

// tanh for fp32 lanes (Cephes tanhf's split, about 2 ulp): a polynomial in x^2 below |x| =
// 0.625, else (1 - e) / (1 + e) with e = exp(-2|x|) (no cancellation there: e <= 0.29).
inline Vec<float>::V tanh_lanes(Vec<float>::V x) {
  typedef Vec<float>::V V;
  const V neg = -x;
  const V a = x < 0.0f ? neg : x;
  const V z = x * x;
  V p = splat<float>(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const V small = p * z * x + x;
  const V e = exp_nonpositive(-2.0f * a);
  const V big = (1.0f - e) / (1.0f + e);
  const V big_signed = x < 0.0f ? -big : big;
  return a < 0.625f ? small : big_signed;
}

inline Vec<double>::V tanh_lanes(Vec<double>::V x) {
  Vec<double>::V r = x;
  for (int64_t l = 0; l < Vec<double>::W; ++l) r[l] = __builtin_tanh(x[l]);
  return r;
}

inline float exp_scalar(float x) { return __builtin_expf(x); }
inline double exp_scalar(double x) { return __builtin_exp(x); }

// ---------------------------------------------------------------------------------------------
// Row passes over the keys s[0, n) of one row of one tile (s, f, logf and mask all point at the
// tile's first key). kKind: 0 no factors, 1 paper, 2 log. A tail shorter than a vector is one
// more vector with the lanes past n switched off: score rows, tile buffers and factor / mask
// rows are padded to a multiple of 16 elements, so the reads stay inside their buffers.

template <typename T>
struct RowArgs {
  const uint8_t* mask;  // null: every key is real
  const T* f;           // paper
  const T* logf;        // log
  T row_min;            // paper
};

template <typename T>
inline RowArgs<T> shifted(const RowArgs<T>& a, int64_t j0) {
  RowArgs<T> r = a;
  if (r.mask) r.mask += j0;
  if (r.f) r.f += j0;
  if (r.logf) r.logf += j0;
  return r;
}

// s' for one vector (kKind as above).
template <typename T, int kKind>
inline typename Vec<T>::V transform(typename Vec<T>::V s, const RowArgs<T>& a, int64_t j) {
  if constexpr (kKind == 1) {
    const typename Vec<T>::V m = splat<T>(a.row_min);
    return m + load<T>(a.f + j) * (s - m);
  } else if constexpr (kKind == 2) {
    return s + load<T>(a.logf + j);
  } else {
    return s;
  }
}

template <typename T>
inline typename Vec<T>::V vmin(typename Vec<T>::V a, typename Vec<T>::V b) {
  return a < b ? a : b;
}
template <typename T>
inline typename Vec<T>::V vmax(typename Vec<T>::V a, typename Vec<T>::V b) {
  return a > b ? a : b;
}

// Minimum of s over the real keys of [0, n) (+inf if none).
template <typename T, bool kMasked>
T segment_min(const T* s, const RowArgs<T>& a, int64_t n) {
  typedef typename Vec<T>::V V;
  constexpr int64_t W = Vec<T>::W;
  const V inf = splat<T>(__builtin_inf());
  V acc0 = inf, acc1 = inf;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    V x0 = load<T>(s + j), x1 = load<T>(s + j + W);
    if constexpr (kMasked) {
      x0 = mask_lanes<T>(a.mask + j) ? x0 : inf;
      x1 = mask_lanes<T>(a.mask + j + W) ? x1 : inf;
    }
    acc0 = vmin<T>(acc0, x0);
    acc1 = vmin<T>(acc1, x1);
  }
  for (; j < n; j += W) {
    auto vis = first_lanes<T>(n - j);
    if constexpr (kMasked) vis = vis & mask_lanes<T>(a.mask + j);
    acc0 = vmin<T>(acc0, vis ? load<T>(s + j) : inf);
  }
  return lanes_min<T>(vmin<T>(acc0, acc1));
}

template <typename T>
T row_segment_min(const T* s, const RowArgs<T>& a, int64_t n) {
  if (n <= 0) return T(__builtin_inf());
  return a.mask ? segment_min<T, true>(s, a, n) : segment_min<T, false>(s, a, n);
}

// One row of one tile of the online softmax. Keys [0, n) of the tile are the row's visible
// ones (causally; the mask and log f = -inf hide more), [n, width) are hidden. Writes
// p[0, width) = exp(s' - max) (0 where hidden) with max the running maximum after this tile,
// adds the row sum of p to *sum, and rescales *sum and acc[0, dim) when the maximum grows.
template <typename T, int kKind, bool kMasked>
void online_row(const T* s, T* p, const RowArgs<T>& a, int64_t n, int64_t width, T* max, T* sum,
                T* acc, int64_t dim) {
  typedef typename Vec<T>::V V;
  typedef typename Vec<T>::I I;
  constexpr int64_t W = Vec<T>::W;
  const V ninf = splat<T>(-__builtin_inf());
  // pass 1: s' into p (hidden lanes -inf) and its maximum
  V top0 = ninf, top1 = ninf;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    V x0 = transform<T, kKind>(load<T>(s + j), a, j);
    V x1 = transform<T, kKind>(load<T>(s + j + W), a, j + W);
    if constexpr (kMasked) {
      x0 = mask_lanes<T>(a.mask + j) ? x0 : ninf;
      x1 = mask_lanes<T>(a.mask + j + W) ? x1 : ninf;
    }
    store<T>(p + j, x0);
    store<T>(p + j + W, x1);
    top0 = vmax<T>(top0, x0);
    top1 = vmax<T>(top1, x1);
  }
  for (; j < n; j += W) {
    I vis = first_lanes<T>(n - j);
    if constexpr (kMasked) vis = vis & mask_lanes<T>(a.mask + j);
    const V x = vis ? transform<T, kKind>(load<T>(s + j), a, j) : ninf;
    store<T>(p + j, x);
    top0 = vmax<T>(top0, x);
  }
  const int64_t filled = j;  // n rounded up to W
  const T top = lanes_max<T>(vmax<T>(top0, top1));
  if (!(top > *max)) {
    if (!(*max > -__builtin_inf())) {  // nothing attended yet, nor in this tile
      for (int64_t c = 0; c < width; ++c) p[c] = T(0);
      return;
    }
  } else {
    const T alpha = exp_scalar(*max - top);  // 0 when the old maximum is -inf
    *sum *= alpha;
    for (int64_t c = 0; c < dim; ++c) acc[c] *= alpha;
    *max = top;
  }
  // pass 2: p = exp(s' - max) in place
  const V shift = splat<T>(*max);
  V sum0{}, sum1{};
  j = 0;
  for (; j + 2 * W <= filled; j += 2 * W) {
    const V e0 = exp_nonpositive(load<T>(p + j) - shift);
    const V e1 = exp_nonpositive(load<T>(p + j + W) - shift);
    store<T>(p + j, e0);
    store<T>(p + j + W, e1);
    sum0 += e0;
    sum1 += e1;
  }
  for (; j < filled; j += W) {
    const V e = exp_nonpositive(load<T>(p + j) - shift);
    store<T>(p + j, e);
    sum0 += e;
  }
  for (; j < width; ++j) p[j] = T(0);
  *sum += lanes_sum<T>(sum0 + sum1);
}

template <typename T>
void row_online(const T* s, T* p, const RowArgs<T>& a, int kind, int64_t n, int64_t width,
                T* max, T* sum, T* acc, int64_t dim) {
  if (n <= 0) {
    for (int64_t c = 0; c < width; ++c) p[c] = T(0);
    return;
  }
  if (a.mask != nullptr) {
    if (kind == 1) return online_row<T, 1, true>(s, p, a, n, width, max, sum, acc, dim);
    if (kind == 2) return online_row<T, 2, true>(s, p, a, n, width, max, sum, acc, dim);
    return online_row<T, 0, true>(s, p, a, n, width, max, sum, acc, dim);
  }
  if (kind == 1) return online_row<T, 1, false>(s, p, a, n, width, max, sum, acc, dim);
  if (kind == 2) return online_row<T, 2, false>(s, p, a, n, width, max, sum, acc, dim);
  return online_row<T, 0, false>(s, p, a, n, width, max, sum, acc, dim);
}

// s <- cap * tanh(s / cap) on rows [0, rows) x keys [0, n) (whole vectors: the padding lanes
// past n are capped too and never read).
template <typename T>
void softcap_rows(T* s, int64_t ld, int64_t rows, int64_t n, T cap) {
  typedef typename Vec<T>::V V;
  constexpr int64_t W = Vec<T>::W;
  const V inv = splat<T>(T(1) / cap), c = splat<T>(cap);
  for (int64_t r = 0; r < rows; ++r) {
    T* row = s + r * ld;
    for (int64_t j = 0; j < n; j += W) store<T>(row + j, c * tanh_lanes(load<T>(row + j) * inv));
  }
}

// ---------------------------------------------------------------------------------------------
// GEMMs on row-major matrices (BLAS is column-major: a row-major [r, c] matrix with leading
// dimension ld is the column-major [c, r] matrix with the same ld).

inline void blas(const Problem<float>& pb, char ta, char tb, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c,
                 int ldc) {
  pb.sgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas(const Problem<double>& pb, char ta, char tb, int m, int n, int k,
                 double alpha, const double* a, int lda, const double* b, int ldb, double beta,
                 double* c, int ldc) {
  pb.dgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline bool has_blas(const Problem<float>& pb) { return pb.sgemm != nullptr; }
inline bool has_blas(const Problem<double>& pb) { return pb.dgemm != nullptr; }

// S[i, j] = alpha * sum_c Q[i, c] K[j, c]; Q [m, d] (ld ldq), K [n, d] (ld ldk), S ld lds.
template <typename T>
void gemm_scores(const Problem<T>& pb, int64_t m, int64_t n, int64_t d, const T* q, int64_t ldq,
                 const T* k, int64_t ldk, T* s, int64_t lds) {
  if (has_blas(pb)) {
    // column-major: S^T [n, m] = K [n, d] (stored as [d, n] -> 'T') x Q^T [d, m] ('N')
    blas(pb, 'T', 'N', static_cast<int>(n), static_cast<int>(m), static_cast<int>(d), pb.scale,
         k, static_cast<int>(ldk), q, static_cast<int>(ldq), T(0), s, static_cast<int>(lds));
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    const T* qi = q + i * ldq;
    for (int64_t j = 0; j < n; ++j) {
      const T* kj = k + j * ldk;
      T acc = 0;
      for (int64_t c = 0; c < d; ++c) acc += qi[c] * kj[c];
      s[i * lds + j] = pb.scale * acc;
    }
  }
}

// O[i, c] += sum_j P[i, j] V[j, c]; P [m, n] (ld ldp), V [n, d] (ld ldv), O [m, d] (ld ldo).
template <typename T>
void gemm_pv(const Problem<T>& pb, int64_t m, int64_t n, int64_t d, const T* p, int64_t ldp,
             const T* v, int64_t ldv, T* o, int64_t ldo) {
  if (has_blas(pb)) {
    // column-major: O^T [d, m] = V^T [d, n] ('N') x P^T [n, m] ('N')
    blas(pb, 'N', 'N', static_cast<int>(d), static_cast<int>(m), static_cast<int>(n), T(1), v,
         static_cast<int>(ldv), p, static_cast<int>(ldp), T(1), o, static_cast<int>(ldo));
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    T* oi = o + i * ldo;
    for (int64_t j = 0; j < n; ++j) {
      const T pij = p[i * ldp + j];
      const T* vj = v + j * ldv;
      for (int64_t c = 0; c < d; ++c) oi[c] += pij * vj[c];
    }
  }
}

// ---------------------------------------------------------------------------------------------

template <typename T>
T* alloc_aligned(int64_t n) {
  int64_t bytes = (n < 1 ? 1 : n) * static_cast<int64_t>(sizeof(T));
  bytes = (bytes + 63) / 64 * 64;
  return static_cast<T*>(aligned_alloc(64, static_cast<size_t>(bytes)));
}

// Work item numbering: item = (chunk * Hq + h) * n_blocks + row block; a chunk is
// variants_per_item consecutive variants (1 unless the scores are shared).
template <typename T>
int run_items(const Problem<T>& pb, int64_t begin, int64_t end) {
  const int64_t len_q = pb.len_q, len_k = pb.len_k, dim = pb.dim;
  const int64_t block = pb.block_rows, n_blocks = pb.n_blocks;
  const bool stored = pb.store_scores != 0;
  const int64_t kKeyTile = pb.key_tile;  // keys per tile (a multiple of 16)
  const int64_t ld_s = stored ? pb.ld_scores : kKeyTile;
  const int64_t group = pb.heads_q / pb.heads_kv;
  const int64_t offset = len_k - len_q;  // causal: row i sees keys j <= i + offset
  const T ninf = -__builtin_inf();
  const T cap = pb.softcap;
  T* scores = alloc_aligned<T>(block * ld_s);
  T* probs = alloc_aligned<T>(block * kKeyTile);
  T* acc = alloc_aligned<T>(block * dim);
  T* row_max = alloc_aligned<T>(block);
  T* row_sum = alloc_aligned<T>(block);
  T* row_min = alloc_aligned<T>(block);
  const bool ok = scores && probs && acc && row_max && row_sum && row_min;
  for (int64_t r = 0; ok && r < block; ++r) row_min[r] = T(__builtin_inf());  // read in paper only
  for (int64_t item = begin; ok && item < end; ++item) {
    const int64_t qb = item % n_blocks;
    const int64_t h = (item / n_blocks) % pb.heads_q;
    const int64_t chunk = item / (n_blocks * pb.heads_q);
    const int64_t row0 = qb * block;
    const int64_t rows = min_i64(block, len_q - row0);
    const int64_t keys = pb.causal ? clamp_i64(row0 + rows + offset, 0, len_k) : len_k;
    const int64_t b_first = chunk * pb.variants_per_item;
    const int64_t b_end = min_i64(pb.batch, b_first + pb.variants_per_item);
    auto visible = [&](int64_t r) {
      return pb.causal ? clamp_i64(row0 + r + 1 + offset, 0, keys) : keys;
    };
    for (int64_t b = b_first; b < b_end; ++b) {
      const Operand<T>& oq = pb.q;
      const Operand<T>& ok_ = pb.k;
      const Operand<T>& ov = pb.v;
      const T* q = oq.data + b * oq.batch_stride + h * oq.head_stride + row0 * oq.row_stride;
      const T* k = ok_.data + b * ok_.batch_stride + (h / group) * ok_.head_stride;
      const T* v = ov.data + b * ov.batch_stride + (h / group) * ov.head_stride;
      RowArgs<T> args{};
      args.f = pb.factors ? pb.factors + b * pb.ld_keys : nullptr;
      args.logf = pb.logf ? pb.logf + b * pb.ld_keys : nullptr;
      args.mask = pb.mask ? pb.mask + b * pb.mask_batch_stride : nullptr;
      for (int64_t i = 0; i < rows * dim; ++i) acc[i] = T(0);
      for (int64_t r = 0; r < rows; ++r) {
        row_max[r] = pb.sinks ? pb.sinks[h] : ninf;  // a sink: one more column, exp(0) = 1
        row_sum[r] = pb.sinks ? T(1) : T(0);
      }
      if (stored) {
        // shared scores: computed for the chunk's first variant, read by the others; the row
        // minimum likewise unless the variants have masks of their own
        const bool compute_scores = !pb.share_scores || b == b_first;
        const bool need_min = pb.kind == 1 && (compute_scores || pb.mask_batch_stride != 0);
        if (need_min) {
          for (int64_t r = 0; r < rows; ++r) row_min[r] = T(__builtin_inf());
        }
        for (int64_t t0 = 0; t0 < keys && (compute_scores || need_min); t0 += kKeyTile) {
          const int64_t t1 = min_i64(keys, t0 + kKeyTile);
          if (compute_scores) {
            gemm_scores<T>(pb, rows, t1 - t0, dim, q, oq.row_stride, k + t0 * ok_.row_stride,
                           ok_.row_stride, scores + t0, ld_s);
            if (cap > T(0)) softcap_rows<T>(scores + t0, ld_s, rows, t1 - t0, cap);
          }
          if (need_min) {
            const RowArgs<T> ta = shifted(args, t0);
            for (int64_t r = 0; r < rows; ++r) {
              const T mn = row_segment_min<T>(scores + r * ld_s + t0, ta,
                                              min_i64(t1, visible(r)) - t0);
              row_min[r] = mn < row_min[r] ? mn : row_min[r];
            }
          }
        }
      }
      for (int64_t t0 = 0; t0 < keys; t0 += kKeyTile) {
        const int64_t t1 = min_i64(keys, t0 + kKeyTile);
        T* s_tile = scores + (stored ? t0 : 0);
        if (!stored) {
          gemm_scores<T>(pb, rows, t1 - t0, dim, q, oq.row_stride, k + t0 * ok_.row_stride,
                         ok_.row_stride, s_tile, ld_s);
          if (cap > T(0)) softcap_rows<T>(s_tile, ld_s, rows, t1 - t0, cap);
        }
        RowArgs<T> ta = shifted(args, t0);
        for (int64_t r = 0; r < rows; ++r) {
          ta.row_min = row_min[r];
          row_online<T>(s_tile + r * ld_s, probs + r * kKeyTile, ta, pb.kind,
                        min_i64(t1, visible(r)) - t0, t1 - t0, row_max + r, row_sum + r,
                        acc + r * dim, dim);
        }
        gemm_pv<T>(pb, rows, t1 - t0, dim, probs, kKeyTile, v + t0 * ov.row_stride,
                   ov.row_stride, acc, dim);
      }
      T* out = pb.out + ((b * pb.heads_q + h) * len_q + row0) * dim;
      for (int64_t r = 0; r < rows; ++r) {
        // a row that attended to nothing has acc = 0 (with or without a sink): zeros
        const T inv = row_sum[r] > T(0) ? T(1) / row_sum[r] : T(0);
        for (int64_t c = 0; c < dim; ++c) out[r * dim + c] = acc[r * dim + c] * inv;
      }
    }
  }
  free(scores);
  free(probs);
  free(acc);
  free(row_max);
  free(row_sum);
  free(row_min);
  return ok ? 0 : -1;
}

}  // namespace

__attribute__((visibility("hidden"))) extern const KernelTable ATMAN_ISA_TABLE = {
    ATMAN_ISA_NAME, kVectorBytes, &run_items<float>, &run_items<double>};

}  // namespace kernel
}  // namespace atman
