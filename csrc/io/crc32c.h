// CRC-32C (Castagnoli, the polynomial of iSCSI, ext4 and SSE4.2's crc32 instruction). The hardware path is
// chosen at run time, so one binary runs on any x86-64; both paths give identical results.
#pragma once
#include <cstddef>
#include <cstdint>

namespace zerocore::io {

// Continues a running CRC: crc32c(crc32c(0, a), b) == crc32c(0, a + b). Start with 0.
uint32_t crc32c(uint32_t crc, const void* data, size_t nbytes);
uint32_t crc32c_software(uint32_t crc, const void* data, size_t nbytes);
// Only call when crc32c_hardware_available().
uint32_t crc32c_hardware(uint32_t crc, const void* data, size_t nbytes);
bool crc32c_hardware_available();

}  // namespace zerocore::io
