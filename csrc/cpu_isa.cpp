// Run-time choice of the kernel's instruction-set level: see cpu_isa.h.
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace atman {
namespace {

using kernel::kIsaAvx2;
using kernel::kIsaAvx512;
using kernel::kIsaDefault;

const char* level_name(int level) {
  return level == kIsaAvx512 ? "avx512" : level == kIsaAvx2 ? "avx2" : "default";
}

// -1 for an unknown name.
int level_of(const char* name) {
  if (std::strcmp(name, "default") == 0) return kIsaDefault;
  if (std::strcmp(name, "avx2") == 0) return kIsaAvx2;
  if (std::strcmp(name, "avx512") == 0) return kIsaAvx512;
  return -1;
}

// The best level this CPU runs and this build has, capped by ATMAN_CPU_ISA_LIMIT.
int cpu_level();

int supported_level() {
  const int level = cpu_level();
  const char* limit = std::getenv("ATMAN_CPU_ISA_LIMIT");
  const int cap = limit == nullptr ? -1 : level_of(limit);
  return cap >= 0 && cap < level ? cap : level;
}

int cpu_level() {
#if defined(ATMAN_HAVE_X86_ISA_PATHS) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();  // libgcc's CPUID probe (also checks that the OS saves AVX/AVX-512 state)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  const bool v3 = __builtin_cpu_supports("x86-64-v3");
  const bool v4 = __builtin_cpu_supports("x86-64-v4");
#else
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512cd");
#endif
  return v4 ? kIsaAvx512 : v3 ? kIsaAvx2 : kIsaDefault;
#else
  return kIsaDefault;
#endif
}

// ATEN_CPU_CAPABILITY, then CPUID (read once).
int chosen_level() {
  const int supported = supported_level();
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  if (env == nullptr) return supported;
  const int asked = level_of(env);
  if (asked < 0) {
    TORCH_WARN("atman_kernels: ignoring invalid value for ATEN_CPU_CAPABILITY: ", env,
               " (expected default, avx2 or avx512)");
    return supported;
  }
  if (asked > supported) {
    TORCH_WARN("atman_kernels: ATEN_CPU_CAPABILITY=", env, " asks for more than this CPU (or "
               "build) supports; using ", level_name(supported));
    return supported;
  }
  return asked;
}

std::atomic<int> override_level{-1};

int active_level() {
  const int forced = override_level.load(std::memory_order_relaxed);
  if (forced >= 0) return forced;
  static const int level = chosen_level();
  return level;
}

}  // namespace

const kernel::KernelTable& active_kernels() {
  switch (active_level()) {
#ifdef ATMAN_HAVE_X86_ISA_PATHS
    case kIsaAvx512:
      return kernel::kTableAvx512;
    case kIsaAvx2:
      return kernel::kTableAvx2;
#endif
    default:
      return kernel::kTableDefault;
  }
}

std::string active_isa() { return level_name(active_level()); }

std::string supported_isa() { return level_name(supported_level()); }

std::string set_isa_override(const std::string& name) {
  const std::string before = active_isa();
  if (name.empty()) {
    override_level = -1;
    return before;
  }
  const int level = level_of(name.c_str());
  TORCH_CHECK(level >= 0, "isa must be 'default', 'avx2' or 'avx512', got '", name, "'");
  TORCH_CHECK(level <= supported_level(), "isa '", name, "' is not supported here (the best "
              "this CPU and build run is '", supported_isa(), "')");
  override_level = level;
  return before;
}

}  // namespace atman
