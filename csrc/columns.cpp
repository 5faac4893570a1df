// Bit-packed boolean columns to a row-major byte matrix (include/pym4/columns.h).
//
// Why in C++: a pass of the M4 solver over Parquet reads its groups and labels as Arrow
// boolean columns (one bit a row); the core wants each row's bytes side by side. numpy's
// unpackbits along the rows of the stacked bitmaps did 16-30 M rows/s for 34 columns
// (measured), as slow as the solver's own work on the rows. Here each 8 rows x 8 columns
// tile is one 64-bit word: a bit transpose (Hacker's Delight, transpose8) turns the columns'
// bytes into the rows' bytes, and a table spreads each row byte over 8 output bytes, so
// the output is written 8 bytes at a time along each row instead of byte by byte down it.
#include "pym4/columns.h"

#include <array>
#include <cstring>
#include <vector>

namespace pym4 {
namespace {

// kSpread[b]: byte i is bit i of b (0 or 1).
constexpr std::array<uint64_t, 256> make_spread() {
  std::array<uint64_t, 256> t{};
  for (int b = 0; b < 256; ++b)
    for (int i = 0; i < 8; ++i) t[b] |= uint64_t((b >> i) & 1) << (8 * i);
  return t;
}
constexpr std::array<uint64_t, 256> kSpread = make_spread();

// Bits p .. p+7 of a bitmap (all inside it) as one byte.
inline uint64_t byte_at(const uint8_t* bits, int64_t p) {
  const int64_t q = p >> 3;
  const int sh = static_cast<int>(p & 7);
  if (sh == 0) return bits[q];
  return ((bits[q] >> sh) | (bits[q + 1] << (8 - sh))) & 0xffu;
}

// Byte i of x is row i of an 8 x 8 bit matrix (bit j = column j); returns its transpose.
inline uint64_t transpose8(uint64_t x) {
  uint64_t t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAull;
  x ^= t ^ (t << 7);
  t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCull;
  x ^= t ^ (t << 14);
  t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ull;
  x ^= t ^ (t << 28);
  return x;
}


// Columns j0 .. j0+W-1 of rows r0 .. r0+7 (W <= 8; a constant, so the loops unroll and
// the full tiles' stores are single 8-byte moves rather than memcpy calls).
template <int W>
inline void tile(const uint8_t* const* bits, const int64_t* offsets, int64_t k, int64_t j0, int64_t r0, uint8_t* out) {
  uint64_t x = 0;  // byte i: rows r0 .. r0+7 of column j0 + i
  for (int i = 0; i < W; ++i) x |= byte_at(bits[j0 + i], offsets[j0 + i] + r0) << (8 * i);
  x = transpose8(x);  // byte t: columns j0 .. j0+7 of row r0 + t
  uint8_t* dst = out + r0 * k + j0;
  for (int t = 0; t < 8; ++t) {
    const uint64_t e = kSpread[(x >> (8 * t)) & 0xffu];
    std::memcpy(dst + t * k, &e, W);
  }
}

template <int W>
void tiles(const uint8_t* const* bits, const int64_t* offsets, int64_t k, int64_t j0, int64_t full, uint8_t* out) {
  for (int64_t r0 = 0; r0 < full; r0 += 8) tile<W>(bits, offsets, k, j0, r0, out);
}

}  // namespace

void unpack_bit_columns(const uint8_t* const* bits, const int64_t* offsets, int64_t k, int64_t n, uint8_t* out) {
  const int64_t full = n & ~int64_t(7);
  // Column groups outer, rows inner: each group reads its 8 bitmaps in order. Blocks of
  // 4096 rows keep the output rows being written in L2 across the groups.
  constexpr int64_t kRows = 4096;
  for (int64_t b0 = 0; b0 < full; b0 += kRows) {
    const int64_t rows = full - b0 < kRows ? full - b0 : kRows;
    uint8_t* block = out + b0 * k;
    std::vector<int64_t> off(offsets, offsets + k);
    for (int64_t j = 0; j < k; ++j) off[j] += b0;
    for (int64_t j0 = 0; j0 < k; j0 += 8) {
      switch (k - j0 < 8 ? k - j0 : 8) {
        case 8: tiles<8>(bits, off.data(), k, j0, rows, block); break;
        case 7: tiles<7>(bits, off.data(), k, j0, rows, block); break;
        case 6: tiles<6>(bits, off.data(), k, j0, rows, block); break;
        case 5: tiles<5>(bits, off.data(), k, j0, rows, block); break;
        case 4: tiles<4>(bits, off.data(), k, j0, rows, block); break;
        case 3: tiles<3>(bits, off.data(), k, j0, rows, block); break;
        case 2: tiles<2>(bits, off.data(), k, j0, rows, block); break;
        default: tiles<1>(bits, off.data(), k, j0, rows, block); break;
      }
    }
  }
  for (int64_t r = full; r < n; ++r)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t b = offsets[j] + r;
      out[r * k + j] = static_cast<uint8_t>((bits[j][b >> 3] >> (b & 7)) & 1u);
    }
}

void unpack_bit_words(const int64_t* const* words, int64_t w, int64_t n, int64_t first, int64_t k, uint8_t* out) {
  (void)w;  // the caller checked that first + k bits lie within the w words
  // Row by row: up to 8 bits of one word at a time, spread over 8 output bytes by the table
  // (a row of c = 32 labels is 4 lookups and 4 stores, not 32 shifts).
  for (int64_t r = 0; r < n; ++r) {
    uint8_t* dst = out + r * k;
    for (int64_t j = 0; j < k;) {
      const int64_t b = first + j;
      const int64_t bit = b % kWordBits;
      int64_t take = k - j < 8 ? k - j : 8;
      if (take > kWordBits - bit) take = kWordBits - bit;
      const uint64_t x = (static_cast<uint64_t>(words[b / kWordBits][r]) >> bit) & ((1u << take) - 1u);
      const uint64_t e = kSpread[x];
      if (take == 8) {
        std::memcpy(dst + j, &e, 8);
      } else {
        std::memcpy(dst + j, &e, static_cast<size_t>(take));
      }
      j += take;
    }
  }
}

}  // namespace pym4
