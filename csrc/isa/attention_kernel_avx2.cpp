// The inner CPU kernel at the "avx2" instruction-set level (setup.py gives this file its flags).
#define ATMAN_ISA_TABLE kTableAvx2
#define ATMAN_ISA_NAME "avx2"
#define ATMAN_ISA_VECTOR_BYTES 32
#include "../attention_kernel_impl.h"
