// The emulator stands in for CUDA's fp16 header when kernels.cu is compiled for the CPU.
#pragma once
#include "cuda_emu.h"
