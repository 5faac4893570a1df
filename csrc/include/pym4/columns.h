// Columnar data to the row-major arrays the M4 kernels read. Plain C++17, no Python.
#pragma once

#include <cstdint>

namespace pym4 {

// k bit-packed boolean columns (Arrow's layout: bit t of byte b is row 8 b + t, least
// significant bit first; column j starts at bit offsets[j] of bits[j]) to the n x k
// row-major uint8 0/1 matrix out. Serial: an engine calls it from each of its threads.
void unpack_bit_columns(const uint8_t* const* bits, const int64_t* offsets, int64_t k, int64_t n, uint8_t* out);

// 0/1 columns packed into int64 words, as an engine hands them over (pym4/m4/_columns.py,
// PackedLayout): w word columns of n rows (words[i] is word column i); column b of the
// packed layout is bit b % kWordBits of word column b / kWordBits; bit 63 of a word is a
// flag (a row with a bad value, set by the engine's packing), never a column. Bits
// first .. first + k - 1 of each row to the n x k row-major uint8 0/1 matrix out. Serial.
constexpr int64_t kWordBits = 63;
void unpack_bit_words(const int64_t* const* words, int64_t w, int64_t n, int64_t first, int64_t k, uint8_t* out);

}  // namespace pym4
