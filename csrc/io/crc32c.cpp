#include "crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define ZEROCORE_CRC_X86 1
#endif

namespace zerocore::io {
namespace {

constexpr uint32_t kPolyReflected = 0x82F63B78u;

// Slicing-by-8 tables: table[k][b] is the CRC of byte b followed by k zero bytes.
struct Tables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  Tables() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t c = b;
      for (int i = 0; i < 8; ++i) c = (c >> 1) ^ (kPolyReflected & (0u - (c & 1u)));
      t[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; ++b)
      for (int k = 1; k < 8; ++k) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFF];
  }
};

const Tables& tables() {
  static const Tables instance;
  return instance;
}

}  // namespace

uint32_t crc32c_software(uint32_t crc, const void* data, size_t nbytes) {
  const auto& t = tables().t;
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  while (nbytes >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);  // little-endian load, no alignment assumption
    word ^= crc;
    crc = t[7][word & 0xFF] ^ t[6][(word >> 8) & 0xFF] ^ t[5][(word >> 16) & 0xFF] ^ t[4][(word >> 24) & 0xFF] ^
          t[3][(word >> 32) & 0xFF] ^ t[2][(word >> 40) & 0xFF] ^ t[1][(word >> 48) & 0xFF] ^ t[0][word >> 56];
    p += 8;
    nbytes -= 8;
  }
  while (nbytes--) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFF];
  return ~crc;
}

#ifdef ZEROCORE_CRC_X86
__attribute__((target("sse4.2"))) uint32_t crc32c_hardware(uint32_t crc, const void* data, size_t nbytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t c = ~crc;
  while (nbytes >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    c = _mm_crc32_u64(c, word);
    p += 8;
    nbytes -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (nbytes--) c32 = _mm_crc32_u8(c32, *p++);
  return ~c32;
}

bool crc32c_hardware_available() {
  static const bool available = __builtin_cpu_supports("sse4.2");
  return available;
}
#else
uint32_t crc32c_hardware(uint32_t crc, const void* data, size_t nbytes) { return crc32c_software(crc, data, nbytes); }
bool crc32c_hardware_available() { return false; }
#endif

uint32_t crc32c(uint32_t crc, const void* data, size_t nbytes) {
  return crc32c_hardware_available() ? crc32c_hardware(crc, data, nbytes) : crc32c_software(crc, data, nbytes);
}

}  // namespace zerocore::io
