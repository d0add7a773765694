// Per-extent CRC-32C records of a data file, kept beside it in "<path>.crc32c".
//
// [Note: sidecar layout]
// One record per write made with checksum=True: (offset, length, extent_size, crc of every extent), where extent
// k covers the file bytes [max(offset, k*extent_size), min(offset+length, (k+1)*extent_size)). A write replaces
// every record whose range it overlaps (a write without checksums only removes them), so a record always
// describes the bytes now in the file. Layout: the 8-byte magic "ZCCRC32C", then records of
// u64 offset, u64 length, u32 extent_size, u32 count, u32 crcs[count], u32 crc32c of the record's own bytes;
// little-endian. Readers and writers hold flock on the sidecar, so concurrent writers of one file serialize here.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace zerocore::io {

struct ChecksumRecord {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint32_t extent_size = 0;
  std::vector<uint32_t> crcs;
};

std::string sidecar_path(const std::string& data_path);

// Outcome of a sidecar operation: err is 0 on success, else an errno with a sentence in message.
struct SidecarResult {
  int err = 0;
  std::string message;
};

// Removes the records overlapping [offset, offset + length) and, when `record` is given, adds it.
// Without `record` and without a sidecar file, does nothing.
SidecarResult update_sidecar(const std::string& data_path, uint64_t offset, uint64_t length,
                             const ChecksumRecord* record);

// Finds the record of exactly [offset, offset + length). ENOENT when there is none.
SidecarResult find_record(const std::string& data_path, uint64_t offset, uint64_t length, ChecksumRecord* out);

}  // namespace zerocore::io
