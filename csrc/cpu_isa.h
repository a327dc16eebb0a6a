// Which compiled instruction-set level of the inner kernel runs (csrc/isa/*.cpp).
//
// The choice is ATen's (aten/src/ATen/native/DispatchStub.cpp): ATEN_CPU_CAPABILITY, when set
// to exactly "default", "avx2" or "avx512", names the level; another value is ignored with a
// warning; unset, the best level the CPU supports (CPUID: x86-64-v4 for avx512, x86-64-v3 for
// avx2). Unlike ATen, a level above what the CPU supports is lowered to the best supported one
// (with a warning) instead of running instructions the CPU lacks. The variable is read once,
// on first use, as ATen reads it. Non-x86 builds and ATMAN_PORTABLE_BUILD=1 builds only have
// "default".
//
// ATMAN_CPU_ISA_LIMIT (same values) caps what counts as supported, as if the CPU had no more:
// it lets one host test the fallback of a CPU without AVX-512 or AVX2. It never raises the
// level above what CPUID reports.
#pragma once

#include <string>

#include "attention_kernel.h"

namespace atman {

// The kernels of the active level.
const kernel::KernelTable& active_kernels();

// "default", "avx2" or "avx512": the active level.
std::string active_isa();

// The best level both this CPU and this build support.
std::string supported_isa();

// For tests: run `name` ("default", "avx2", "avx512") from now on, or go back to the
// ATEN_CPU_CAPABILITY / CPUID choice with "". Throws (c10::Error) when the CPU or the build
// does not support `name`. Returns the level that was active before.
std::string set_isa_override(const std::string& name);

}  // namespace atman
