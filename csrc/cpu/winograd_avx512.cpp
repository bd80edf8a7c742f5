// The Winograd kernel for avx512; its compiler flags are set in CMakeLists.txt.
#define WINOGRAD_ISA avx512
#define WINOGRAD_LANES 16
#define WINOGRAD_ROWS 12
#define WINOGRAD_ROWS4 6
#define WINOGRAD_TILES 36
#include "winograd_kernel.inc"
