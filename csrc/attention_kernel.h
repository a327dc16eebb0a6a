// The per-ISA part of the CPU kernel: what the generic code (suppressed_attention.cpp) hands to
// the inner kernel that is compiled once per instruction-set level (csrc/isa/*.cpp, see
// attention_kernel_impl.h), and the table of those compiled kernels.
//
// This header must stay free of torch, c10 and standard-library templates: it is included by
// translation units compiled with -march=x86-64-v3 / -v4, and any inline function with external
// linkage they instantiated could be picked by the linker for the whole library (then a
// baseline caller would run AVX-512 code). Plain structs and function pointers only.
#pragma once

#include <stdint.h>

namespace atman {
namespace kernel {

// Instruction-set levels, ordered: a CPU that runs a level runs every lower one.
enum Isa : int { kIsaDefault = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

// Row-major GEMM on float / double (C = alpha * op(A) op(B) + beta * C, column-major BLAS
// convention, the Fortran sgemm_/dgemm_ signature). Null: plain loops.
typedef void (*SgemmFn)(const char*, const char*, const int*, const int*, const int*,
                        const float*, const float*, const int*, const float*, const int*,
                        const float*, float*, const int*);
typedef void (*DgemmFn)(const char*, const char*, const int*, const int*, const int*,
                        const double*, const double*, const int*, const double*, const int*,
                        const double*, double*, const int*);

// A [batch, heads, seq, D] operand addressed through strides (in elements); batch stride 0
// when every variant reads the same tensor.
template <typename T>
struct Operand {
  const T* data;
  int64_t batch_stride, head_stride, row_stride;
};

// One call, fully prepared by the generic code. T is the compute type (float or double).
template <typename T>
struct Problem {
  Operand<T> q, k, v;
  // [B, ld_keys] each, padded past len_k (factors with 1, logf with 0, mask with 0) so the
  // vector loops may read a whole vector past a row's last key; null when absent.
  const T* factors;
  const T* logf;           // log mode: log(factors), -inf for 0
  const uint8_t* mask;     // bool storage, nonzero = a real key
  int64_t mask_batch_stride, ld_keys;
  T* out;                  // [B, Hq, Nq, D] contiguous, compute type
  int64_t batch, heads_q, heads_kv, len_q, len_k, dim;
  T scale;
  T softcap;               // > 0: s -> softcap * tanh(s / softcap) after the scale; 0: none
  const T* sinks;          // [Hq] sink logits (one more softmax column per head), or null
  int causal;
  int kind;                // 0 no factors, 1 paper, 2 log
  // Work split (chosen by the generic code; see plan_work in suppressed_attention.cpp).
  int64_t block_rows, n_blocks, variants_per_item, ld_scores;
  int64_t key_tile;        // keys per tile, a multiple of 16
  int share_scores;        // every variant reads the same q and k: one QK^T per item
  int store_scores;        // keep the block's [rows, ld_scores] scores (paper, shared), else
                           // stream them tile by tile
  SgemmFn sgemm;           // used when T = float
  DgemmFn dgemm;           // used when T = double
};

// Runs work items [begin, end) of the problem (items are independent; see
// suppressed_attention.cpp for the numbering). Returns 0, or -1 when scratch memory could not
// be allocated (nothing thrown across this boundary).
typedef int (*RunF32)(const Problem<float>& pb, int64_t begin, int64_t end);
typedef int (*RunF64)(const Problem<double>& pb, int64_t begin, int64_t end);

struct KernelTable {
  const char* name;      // "default", "avx2", "avx512"
  int vector_bytes;      // width of the elementwise vectors of this build
  RunF32 run_f32;
  RunF64 run_f64;
};

// One table per compiled level (defined in csrc/isa/attention_kernel_<level>.cpp). The avx2 and
// avx512 tables exist only where setup.py compiled them (x86-64, ATMAN_HAVE_X86_ISA_PATHS).
extern const KernelTable kTableDefault;
#ifdef ATMAN_HAVE_X86_ISA_PATHS
extern const KernelTable kTableAvx2;
extern const KernelTable kTableAvx512;
#endif

}  // namespace kernel
}  // namespace atman
