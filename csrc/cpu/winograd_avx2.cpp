// The Winograd kernel for avx2; its compiler flags are set in CMakeLists.txt.
#define WINOGRAD_ISA avx2
#define WINOGRAD_LANES 8
#define WINOGRAD_ROWS 4
#define WINOGRAD_ROWS4 2
#define WINOGRAD_TILES 24
#include "winograd_kernel.inc"
