// The inner CPU kernel, compiled once per instruction-set level: csrc/isa/attention_kernel_*.cpp
// define ATMAN_ISA_TABLE (the KernelTable to define), ATMAN_ISA_NAME and ATMAN_ISA_VECTOR_BYTES
// (16 baseline, 32 AVX2, 64 AVX-512), then include this file; setup.py compiles each with its
// own -march. Semantics and algorithm: suppressed_attention.h.
//
// Everything here has internal linkage (anonymous namespace) except the one table, and nothing
// from torch or the C++ standard library is used: an inline function with external linkage
// compiled here with -march=x86-64-v4 could otherwise replace the baseline copy of the same
// function elsewhere in the library. `nm` on the object shows only the table and C symbols.
//
// Per work item (variant chunk, query head, block of rows), with K = the keys the block may see:
//   1. S = scale * Q K^T: one BLAS GEMM into a per-thread buffer;
//   2. per row, three vector passes over the visible keys: paper mode's row minimum (reads S),
//      the row maximum of the transformed scores (reads S), then p = exp(s' - max) with the
//      transform recomputed on the fly, written as P, and the row sum. The transform is
//      s' = s (no factors), m + f (s - m) (paper), s + log f (log; log f precomputed per key);
//      a key that is padded, causally hidden or removed gets exactly 0;
//   3. O = P V: a second GEMM, scaled by 1 / rowsum.
// Vectors are GCC/Clang vector extensions of ATMAN_ISA_VECTOR_BYTES bytes (one register of the
// level); the exp is a vector polynomial (below). Reductions keep one accumulator per lane,
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
  Vec<double>::V r;
  for (int64_t l = 0; l < Vec<double>::W; ++l) r[l] = __builtin_exp(x[l]);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Row passes over the visible keys s[0, n) of one row. kKind: 0 no factors, 1 paper, 2 log.
// A tail shorter than a vector is one more vector with the lanes past n switched off: the
// score rows are padded to a multiple of 16 elements and the factor / mask rows likewise, so
// the reads stay inside their buffers.

template <typename T>
struct RowArgs {
  const uint8_t* mask;  // null: every key is real
  const T* f;           // paper
  const T* logf;        // log
  T row_min;            // paper
};

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

template <typename T, bool kMasked>
T row_min(const T* s, const RowArgs<T>& a, int64_t n) {
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
    acc0 = x0 < acc0 ? x0 : acc0;
    acc1 = x1 < acc1 ? x1 : acc1;
  }
  for (; j < n; j += W) {
    auto vis = first_lanes<T>(n - j);
    if constexpr (kMasked) vis = vis & mask_lanes<T>(a.mask + j);
    const V x = vis ? load<T>(s + j) : inf;
    acc0 = x < acc0 ? x : acc0;
  }
  acc0 = acc1 < acc0 ? acc1 : acc0;
  return lanes_min<T>(acc0);
}

template <typename T, int kKind, bool kMasked>
T row_max(const T* s, const RowArgs<T>& a, int64_t n) {
  typedef typename Vec<T>::V V;
  constexpr int64_t W = Vec<T>::W;
  const V ninf = splat<T>(-__builtin_inf());
  V acc0 = ninf, acc1 = ninf;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    V x0 = transform<T, kKind>(load<T>(s + j), a, j);
    V x1 = transform<T, kKind>(load<T>(s + j + W), a, j + W);
    if constexpr (kMasked) {
      x0 = mask_lanes<T>(a.mask + j) ? x0 : ninf;
      x1 = mask_lanes<T>(a.mask + j + W) ? x1 : ninf;
    }
    acc0 = x0 > acc0 ? x0 : acc0;
    acc1 = x1 > acc1 ? x1 : acc1;
  }
  for (; j < n; j += W) {
    auto vis = first_lanes<T>(n - j);
    if constexpr (kMasked) vis = vis & mask_lanes<T>(a.mask + j);
    const V x = vis ? transform<T, kKind>(load<T>(s + j), a, j) : ninf;
    acc0 = x > acc0 ? x : acc0;
  }
  acc0 = acc1 > acc0 ? acc1 : acc0;
  return lanes_max<T>(acc0);
}

// p = exp(s' - row_max) into dst (may be s itself), tail lanes past n written as 0; returns the
// row sum.
template <typename T, int kKind, bool kMasked>
T exp_row(const T* s, T* dst, const RowArgs<T>& a, T max, int64_t n) {
  typedef typename Vec<T>::V V;
  constexpr int64_t W = Vec<T>::W;
  const V max_v = splat<T>(max);
  const V ninf = splat<T>(-__builtin_inf());
  V acc0{}, acc1{};
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    V x0 = transform<T, kKind>(load<T>(s + j), a, j) - max_v;
    V x1 = transform<T, kKind>(load<T>(s + j + W), a, j + W) - max_v;
    if constexpr (kMasked) {
      x0 = mask_lanes<T>(a.mask + j) ? x0 : ninf;
      x1 = mask_lanes<T>(a.mask + j + W) ? x1 : ninf;
    }
    const V p0 = exp_nonpositive(x0), p1 = exp_nonpositive(x1);
    store<T>(dst + j, p0);
    store<T>(dst + j + W, p1);
    acc0 += p0;
    acc1 += p1;
  }
  for (; j < n; j += W) {
    auto vis = first_lanes<T>(n - j);
    if constexpr (kMasked) vis = vis & mask_lanes<T>(a.mask + j);
    const V x = vis ? transform<T, kKind>(load<T>(s + j), a, j) - max_v : ninf;
    const V p = exp_nonpositive(x);
    store<T>(dst + j, p);
    acc0 += p;
  }
  return lanes_sum<T>(acc0 + acc1);
}

template <typename T, int kKind, bool kMasked>
T softmax_row_impl(const T* s, T* dst, RowArgs<T> a, int64_t n) {
  if constexpr (kKind == 1) {
    a.row_min = row_min<T, kMasked>(s, a, n);
    if (!(a.row_min < __builtin_inf())) return T(0);  // no visible key
  }
  const T max = row_max<T, kKind, kMasked>(s, a, n);
  if (!(max > -__builtin_inf())) return T(0);  // nothing attended
  return T(1) / exp_row<T, kKind, kMasked>(s, dst, a, max, n);
}

// Writes the unnormalised probabilities of row s[0, n) into dst[0, round_up(n, W)) and returns
// 1 / rowsum, or 0 for a row that attends to nothing (dst then holds garbage: the caller
// zeroes the row).
template <typename T>
T softmax_row(const T* s, T* dst, const RowArgs<T>& a, int kind, int64_t n) {
  if (n <= 0) return T(0);
  if (a.mask != nullptr) {
    if (kind == 1) return softmax_row_impl<T, 1, true>(s, dst, a, n);
    if (kind == 2) return softmax_row_impl<T, 2, true>(s, dst, a, n);
    return softmax_row_impl<T, 0, true>(s, dst, a, n);
  }
  if (kind == 1) return softmax_row_impl<T, 1, false>(s, dst, a, n);
  if (kind == 2) return softmax_row_impl<T, 2, false>(s, dst, a, n);
  return softmax_row_impl<T, 0, false>(s, dst, a, n);
}

// ---------------------------------------------------------------------------------------------
// Key-tile passes (the main path). A row's visible keys are visited tile by tile, twice:
// segment_stats right after the tile's scores are computed (hot in cache), segment_exp when
// the tile's P V product is formed. s points at the row's first key; j indexes keys.
//
// The shift: log mode and no factors use the row's exact maximum of s' (from segment_stats).
// Paper mode's s' = m + f (s - m) needs the row minimum m, known only after the last tile, so
// its shift is an upper bound known then: keys with f <= 1 have s' <= s, keys with f > 1 have
// s' <= m + f_max (s_max - m) (f_max, s_max over those keys). Any shift >= max s' gives the
// same softmax up to rounding; segment_exp also tracks the exact max, and a row whose bound
// overshoots it by more than kMaxShiftGap is redone with the exact one (softmax_row).

template <typename T>
struct RowStats {
  T min;      // paper: min of s
  T max;      // paper: max of s over keys with f <= 1; else max of s'
  T max_big;  // paper: max of s over keys with f > 1
  T f_big;    // paper: max of f over keys with f > 1 (0 if none)
};

template <typename T>
inline typename Vec<T>::V vmin(typename Vec<T>::V a, typename Vec<T>::V b) {
  return a < b ? a : b;
}
template <typename T>
inline typename Vec<T>::V vmax(typename Vec<T>::V a, typename Vec<T>::V b) {
  return a > b ? a : b;
}

template <typename T, int kKind>
struct StatsAcc {
  typedef typename Vec<T>::V V;
  typedef typename Vec<T>::I I;
  V mn, mx, mx_big, f_big;
  StatsAcc()
      : mn(splat<T>(__builtin_inf())),
        mx(splat<T>(-__builtin_inf())),
        mx_big(splat<T>(-__builtin_inf())),
        f_big(V{}) {}
  inline void add(const T* s, const RowArgs<T>& a, int64_t j, I vis) {
    const V x = load<T>(s + j);
    const V inf = splat<T>(__builtin_inf()), ninf = splat<T>(-__builtin_inf());
    if constexpr (kKind == 1) {
      const V f = load<T>(a.f + j);
      const I big = f > T(1);
      mn = vmin<T>(mn, vis ? x : inf);
      mx = vmax<T>(mx, (vis & ~big) ? x : ninf);
      mx_big = vmax<T>(mx_big, (vis & big) ? x : ninf);
      f_big = vmax<T>(f_big, (vis & big) ? f : V{});
    } else {
      mx = vmax<T>(mx, vis ? transform<T, kKind>(x, a, j) : ninf);
    }
  }
};

template <typename T, int kKind, bool kMasked>
void segment_stats(const T* s, const RowArgs<T>& a, int64_t j0, int64_t j1, RowStats<T>& st) {
  typedef typename Vec<T>::I I;
  constexpr int64_t W = Vec<T>::W;
  const I all = ~I{};
  StatsAcc<T, kKind> acc0, acc1;
  int64_t j = j0;
  for (; j + 2 * W <= j1; j += 2 * W) {
    acc0.add(s, a, j, kMasked ? mask_lanes<T>(a.mask + j) : all);
    acc1.add(s, a, j + W, kMasked ? mask_lanes<T>(a.mask + j + W) : all);
  }
  for (; j < j1; j += W) {
    I vis = first_lanes<T>(j1 - j);
    if constexpr (kMasked) vis = vis & mask_lanes<T>(a.mask + j);
    acc0.add(s, a, j, vis);
  }
  if constexpr (kKind == 1) {
    const T mn = lanes_min<T>(vmin<T>(acc0.mn, acc1.mn));
    const T mb = lanes_max<T>(vmax<T>(acc0.mx_big, acc1.mx_big));
    const T fb = lanes_max<T>(vmax<T>(acc0.f_big, acc1.f_big));
    st.min = mn < st.min ? mn : st.min;
    st.max_big = mb > st.max_big ? mb : st.max_big;
    st.f_big = fb > st.f_big ? fb : st.f_big;
  }
  const T mx = lanes_max<T>(vmax<T>(acc0.mx, acc1.mx));
  st.max = mx > st.max ? mx : st.max;
}

// p[0, round_up(j1 - j0, W)) = exp(s'[j0, j1) - shift), lanes past j1 0; returns the sum and
// (paper) raises *true_max to the largest s' seen.
template <typename T, int kKind, bool kMasked>
T segment_exp(const T* s, T* p, const RowArgs<T>& a, T shift, int64_t j0, int64_t j1,
              T* true_max) {
  typedef typename Vec<T>::V V;
  typedef typename Vec<T>::I I;
  constexpr int64_t W = Vec<T>::W;
  const V shift_v = splat<T>(shift);
  const V ninf = splat<T>(-__builtin_inf());
  V sum0{}, sum1{}, top0 = ninf, top1 = ninf;
  int64_t j = j0;
  for (; j + 2 * W <= j1; j += 2 * W) {
    V x0 = transform<T, kKind>(load<T>(s + j), a, j);
    V x1 = transform<T, kKind>(load<T>(s + j + W), a, j + W);
    if constexpr (kMasked) {
      x0 = mask_lanes<T>(a.mask + j) ? x0 : ninf;
      x1 = mask_lanes<T>(a.mask + j + W) ? x1 : ninf;
    }
    if constexpr (kKind == 1) {
      top0 = vmax<T>(top0, x0);
      top1 = vmax<T>(top1, x1);
    }
    const V p0 = exp_nonpositive(x0 - shift_v), p1 = exp_nonpositive(x1 - shift_v);
    store<T>(p + (j - j0), p0);
    store<T>(p + (j - j0) + W, p1);
    sum0 += p0;
    sum1 += p1;
  }
  for (; j < j1; j += W) {
    I vis = first_lanes<T>(j1 - j);
    if constexpr (kMasked) vis = vis & mask_lanes<T>(a.mask + j);
    const V x = vis ? transform<T, kKind>(load<T>(s + j), a, j) : ninf;
    if constexpr (kKind == 1) top0 = vmax<T>(top0, x);
    const V e = exp_nonpositive(x - shift_v);
    store<T>(p + (j - j0), e);
    sum0 += e;
  }
  if constexpr (kKind == 1) {
    const T top = lanes_max<T>(vmax<T>(top0, top1));
    *true_max = top > *true_max ? top : *true_max;
  }
  return lanes_sum<T>(sum0 + sum1);
}

// Dispatch on kind and masking for the two tile passes.
template <typename T>
void row_segment_stats(const T* s, const RowArgs<T>& a, int kind, int64_t j0, int64_t j1,
                       RowStats<T>& st) {
  if (j1 <= j0) return;
  if (a.mask != nullptr) {
    if (kind == 1) return segment_stats<T, 1, true>(s, a, j0, j1, st);
    if (kind == 2) return segment_stats<T, 2, true>(s, a, j0, j1, st);
    return segment_stats<T, 0, true>(s, a, j0, j1, st);
  }
  if (kind == 1) return segment_stats<T, 1, false>(s, a, j0, j1, st);
  if (kind == 2) return segment_stats<T, 2, false>(s, a, j0, j1, st);
  return segment_stats<T, 0, false>(s, a, j0, j1, st);
}

template <typename T>
T row_segment_exp(const T* s, T* p, const RowArgs<T>& a, int kind, T shift, int64_t j0,
                  int64_t j1, T* true_max) {
  if (a.mask != nullptr) {
    if (kind == 1) return segment_exp<T, 1, true>(s, p, a, shift, j0, j1, true_max);
    if (kind == 2) return segment_exp<T, 2, true>(s, p, a, shift, j0, j1, true_max);
    return segment_exp<T, 0, true>(s, p, a, shift, j0, j1, true_max);
  }
  if (kind == 1) return segment_exp<T, 1, false>(s, p, a, shift, j0, j1, true_max);
  if (kind == 2) return segment_exp<T, 2, false>(s, p, a, shift, j0, j1, true_max);
  return segment_exp<T, 0, false>(s, p, a, shift, j0, j1, true_max);
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

// O[i, c] (+)= sum_j P[i, j] V[j, c]; P [m, n] (ld ldp), V [n, d] (ld ldv), O [m, d] (ld ldo);
// accumulate: add to O instead of overwriting it.
template <typename T>
void gemm_pv(const Problem<T>& pb, int64_t m, int64_t n, int64_t d, const T* p, int64_t ldp,
             const T* v, int64_t ldv, T* o, int64_t ldo, bool accumulate) {
  if (has_blas(pb)) {
    // column-major: O^T [d, m] = V^T [d, n] ('N') x P^T [n, m] ('N')
    blas(pb, 'N', 'N', static_cast<int>(d), static_cast<int>(m), static_cast<int>(n), T(1), v,
         static_cast<int>(ldv), p, static_cast<int>(ldp), accumulate ? T(1) : T(0), o,
         static_cast<int>(ldo));
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    T* oi = o + i * ldo;
    if (!accumulate) {
      for (int64_t c = 0; c < d; ++c) oi[c] = 0;
    }
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

constexpr int64_t kKeyTile = ATMAN_ISA_KEY_TILE;  // keys per tile (a multiple of 16)
// A paper-mode row whose shift overshoots its exact maximum by more than this is redone with
// the exact maximum (exp(-40) = 4e-18 keeps every term that matters far from fp32 underflow).
constexpr double kMaxShiftGap = 40.0;

// Work item numbering: item = (chunk * Hq + h) * n_blocks + row block; a chunk is
// variants_per_item consecutive variants (1 unless the scores are shared).
//
// Per item and variant, with K = the keys the block may see (causal: later keys are never
// touched) cut into tiles of kKeyTile keys:
//   tile by tile: S[:, tile] = scale Q K_tile^T (GEMM; shared scores: once per chunk), then
//     each row's statistics over its visible keys of the tile (segment_stats);
//   per row: the shift (exact max, or paper mode's bound);
//   tile by tile: P = exp(s' - shift) for every row into a tile buffer (segment_exp), then
//     acc += P V_tile (GEMM);
//   per row: out = acc / rowsum (paper rows whose bound overshot: redone exactly).
template <typename T>
int run_items(const Problem<T>& pb, int64_t begin, int64_t end) {
  const int64_t len_q = pb.len_q, len_k = pb.len_k, dim = pb.dim;
  const int64_t block = pb.block_rows, n_blocks = pb.n_blocks, ld_s = pb.ld_scores;
  const int64_t group = pb.heads_q / pb.heads_kv;
  const int64_t offset = len_k - len_q;  // causal: row i sees keys j <= i + offset
  const T ninf = -__builtin_inf();
  T* scores = alloc_aligned<T>(block * ld_s);
  T* probs = alloc_aligned<T>(block * kKeyTile);
  T* row_probs = alloc_aligned<T>(ld_s);  // the exact redo of one row
  T* acc = alloc_aligned<T>(block * dim);
  RowStats<T>* stats = static_cast<RowStats<T>*>(
      aligned_alloc(64, (block * sizeof(RowStats<T>) + 63) / 64 * 64));
  T* shift = alloc_aligned<T>(block);
  T* sum = alloc_aligned<T>(block);
  T* top = alloc_aligned<T>(block);
  const bool ok = scores && probs && row_probs && acc && stats && shift && sum && top;
  for (int64_t item = begin; ok && item < end; ++item) {
    const int64_t qb = item % n_blocks;
    const int64_t h = (item / n_blocks) % pb.heads_q;
    const int64_t chunk = item / (n_blocks * pb.heads_q);
    const int64_t row0 = qb * block;
    const int64_t rows = min_i64(block, len_q - row0);
    const int64_t keys = pb.causal ? clamp_i64(row0 + rows + offset, 0, len_k) : len_k;
    const int64_t b_first = chunk * pb.variants_per_item;
    const int64_t b_end = min_i64(pb.batch, b_first + pb.variants_per_item);
    for (int64_t b = b_first; b < b_end; ++b) {
      T* out = pb.out + ((b * pb.heads_q + h) * len_q + row0) * dim;
      if (keys == 0) {
        for (int64_t i = 0; i < rows * dim; ++i) out[i] = T(0);
        continue;
      }
      const Operand<T>& oq = pb.q;
      const Operand<T>& ok_ = pb.k;
      const Operand<T>& ov = pb.v;
      const T* q = oq.data + b * oq.batch_stride + h * oq.head_stride + row0 * oq.row_stride;
      const T* k = ok_.data + b * ok_.batch_stride + (h / group) * ok_.head_stride;
      const T* v = ov.data + b * ov.batch_stride + (h / group) * ov.head_stride;
      // shared scores: computed for the chunk's first variant, read by the others
      const bool compute_scores = !pb.share_scores || b == b_first;
      RowArgs<T> args{};
      args.f = pb.factors ? pb.factors + b * pb.ld_keys : nullptr;
      args.logf = pb.logf ? pb.logf + b * pb.ld_keys : nullptr;
      args.mask = pb.mask ? pb.mask + b * pb.mask_batch_stride : nullptr;
      auto visible = [&](int64_t r) {
        return pb.causal ? clamp_i64(row0 + r + 1 + offset, 0, keys) : keys;
      };
      for (int64_t r = 0; r < rows; ++r) {
        stats[r] = RowStats<T>{T(__builtin_inf()), ninf, ninf, T(0)};
        sum[r] = T(0);
        top[r] = ninf;
      }
      for (int64_t t0 = 0; t0 < keys; t0 += kKeyTile) {
        const int64_t t1 = min_i64(keys, t0 + kKeyTile);
        if (compute_scores) {
          gemm_scores<T>(pb, rows, t1 - t0, dim, q, oq.row_stride, k + t0 * ok_.row_stride,
                         ok_.row_stride, scores + t0, ld_s);
        }
        for (int64_t r = 0; r < rows; ++r) {
          row_segment_stats<T>(scores + r * ld_s, args, pb.kind, t0, min_i64(t1, visible(r)),
                               stats[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const RowStats<T>& st = stats[r];
        T sh = st.max;
        if (pb.kind == 1) {
          const T m = st.min;
          if (st.f_big > T(0)) {
            const T big = m + st.f_big * (st.max_big - m);
            sh = big > sh ? big : sh;
          }
          if (!(m < __builtin_inf())) sh = ninf;  // no visible key
        }
        shift[r] = sh;  // -inf: the row attends to nothing
      }
      for (int64_t t0 = 0; t0 < keys; t0 += kKeyTile) {
        const int64_t t1 = min_i64(keys, t0 + kKeyTile);
        for (int64_t r = 0; r < rows; ++r) {
          T* p = probs + r * kKeyTile;
          const int64_t j1 = min_i64(t1, visible(r));
          RowArgs<T> row_args = args;
          row_args.row_min = stats[r].min;
          int64_t written = 0;
          if (j1 > t0 && shift[r] > ninf) {
            sum[r] += row_segment_exp<T>(scores + r * ld_s, p, row_args, pb.kind, shift[r], t0,
                                         j1, &top[r]);
            written = j1 - t0;
          }
          for (int64_t j = written; j < t1 - t0; ++j) p[j] = T(0);
        }
        gemm_pv<T>(pb, rows, t1 - t0, dim, probs, kKeyTile, v + t0 * ov.row_stride,
                   ov.row_stride, acc, dim, t0 > 0);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* o = out + r * dim;
        T* a = acc + r * dim;
        T inv = sum[r] > T(0) ? T(1) / sum[r] : T(0);
        if (pb.kind == 1 && shift[r] > ninf && shift[r] - top[r] > T(kMaxShiftGap)) {
          // the bound overshot: the exact three-pass softmax of this row, then its P V
          RowArgs<T> row_args = args;
          const int64_t n = visible(r);
          inv = softmax_row<T>(scores + r * ld_s, row_probs, row_args, pb.kind, n);
          for (int64_t j = inv == T(0) ? 0 : n; j < keys; ++j) row_probs[j] = T(0);
          gemm_pv<T>(pb, 1, keys, dim, row_probs, ld_s, v, ov.row_stride, a, dim, false);
        }
        for (int64_t c = 0; c < dim; ++c) o[c] = a[c] * inv;
      }
    }
  }
  free(scores);
  free(probs);
  free(row_probs);
  free(acc);
  free(stats);
  free(shift);
  free(sum);
  free(top);
  return ok ? 0 : -1;
}

}  // namespace

__attribute__((visibility("hidden"))) extern const KernelTable ATMAN_ISA_TABLE = {
    ATMAN_ISA_NAME, kVectorBytes, &run_items<float>, &run_items<double>};

}  // namespace kernel
}  // namespace atman
