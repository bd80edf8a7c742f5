// The Winograd kernel for generic; its compiler flags are set in CMakeLists.txt.
#define WINOGRAD_ISA generic
#define WINOGRAD_LANES 4
#define WINOGRAD_ROWS 2
#define WINOGRAD_ROWS4 0
#define WINOGRAD_TILES 16
#include "winograd_kernel.inc"
