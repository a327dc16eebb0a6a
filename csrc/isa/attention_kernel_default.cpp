// The inner CPU kernel at the "default" instruction-set level (setup.py gives this file its flags).
#define ATMAN_ISA_TABLE kTableDefault
#define ATMAN_ISA_NAME "default"
#define ATMAN_ISA_VECTOR_BYTES 16
#include "../attention_kernel_impl.h"
