// Columnar data to the row-major arrays the M4 kernels read. Plain C++17, no Python.
#pragma once

#include <cstdint>

namespace pym4 {

// k bit-packed boolean columns (Arrow's layout: bit t of byte b is row 8 b + t, least
// significant bit first; column j starts at bit offsets[j] of bits[j]) to the n x k
// row-major uint8 0/1 matrix out. Serial: an engine calls it from each of its threads.
void unpack_bit_columns(const uint8_t* const* bits, const int64_t* offsets, int64_t k, int64_t n, uint8_t* out);

}  // namespace pym4
