// The CUDA device (engine/backend.h): one per process, on GPU 0, made on first use.
#pragma once

#include <string>

#include "engine/backend.h"

namespace moeflux {

// The process's CUDA device. Throws Error (kUnsupported) with one line saying what is missing
// (no NVIDIA driver, a driver older than this build's CUDA runtime, no GPU, a GPU older than
// the kernels were built for) and suggesting --backend cpu.
Device& cuda_device();
// True when cuda_device() would succeed (for --backend auto); else false and, when `why` is
// given, the reason as cuda_device() would say it. Probes once per process.
bool cuda_usable(std::string* why);
// GPU memory bandwidth in GB/s as a device-to-device copy of 1 GiB measures it (bytes read plus
// bytes written over the time; best of 3): the floor `bench` reports on CUDA.
double cuda_copy_bandwidth();

}  // namespace moeflux
