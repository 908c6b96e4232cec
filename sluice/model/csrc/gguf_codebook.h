// GGUF's non-linear 4-bit codebook (ggml-common.h kvalues_iq4nl): an IQ4_NL / IQ4_XS weight is a
// block scale times kIq4nlValues[its 4-bit index]. Shared by quant_linear.cpp's decoder and
// vnni_linear.cpp's packed kernel (which looks it up with vpshufb, + 128 for vpdpbusd).
#pragma once

#include <cstdint>

namespace sluice {

inline constexpr int8_t kIq4nlValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                            1,    13,   25,  38,  53,  69,  89,  113};

}  // namespace sluice
