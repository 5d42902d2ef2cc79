// Stand-in for the CUDA toolkit header of this name: see cuda_host.h (tests only).
#pragma once
#include "cuda_host.h"
