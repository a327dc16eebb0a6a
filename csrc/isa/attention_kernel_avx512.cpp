// The inner CPU kernel at the "avx512" instruction-set level (setup.py gives this file its flags).
#define ATMAN_ISA_TABLE kTableAvx512
#define ATMAN_ISA_NAME "avx512"
#define ATMAN_ISA_VECTOR_BYTES 64
#include "../attention_kernel_impl.h"
