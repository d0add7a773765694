// Per-extent CRC-32C records of a data file, kept beside it in "<path>.crc32c".
//
// [Note: sidecar layout]
// One record per write made with checksum=True: (offset, length, extent_size, crc of every extent), where extent
// k covers the file bytes [max(offset, k*extent_size), min(offset+length, (k+1)*extent_size)). A write replaces
// every record whose range it overlaps (a write without checksums only removes them), so a record always
// describes the bytes now in the file. Layout: the 8-byte magic "ZCCRC32C", then records of
// u64 offset, u64 length, u32 extent_size, u32 count, u32 crcs[count], u32 crc32c of the record's own bytes;
// little-endian. Readers and writers hold flock on the sidecar, so concurrent writers of one file serialize here.
//
// [Note: damaged sidecar]
// A sidecar that does not parse is never rewritten: a checksummed write fails with EBADMSG naming it and asking
// the user to delete it, and leaves its bytes as they are. Rebuilding it from the one new record would silently
// drop the records of every other range (so their damage would later read as "no record" instead of being seen),
// and the file may not even be ours. A write without checksums leaves it alone and succeeds: readers reject a
// damaged sidecar whole, so it vouches for nothing and there is nothing to drop.
//
// [Note: symlinks and created files]
// The data file and its sidecar sit at predictable paths in directories others may write (a shared /tmp, a
// scratch volume), so a symlink planted there would redirect a write to any file this process may write. Both are
// opened with O_NOFOLLOW and a symlink is refused (ELOOP, reported as such); a missing file is created with
// O_CREAT|O_EXCL, which never follows a link either, and mode 0600 (swap and checkpoint bytes are the owner's
// alone; umask can only narrow that). Existing files keep their mode. Only the last path component is checked:
// directories above it are the caller's to trust.
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
  bool symlink = false;  // the sidecar is a symlink and was refused (err is ELOOP)
};

// Opens path with O_NOFOLLOW | O_CLOEXEC | flags (see [Note: symlinks and created files]). With create, a missing
// file is made with O_CREAT|O_EXCL, mode 0600, and *created set. Returns the descriptor, or -1 with errno set.
int open_no_symlink(const std::string& path, int flags, bool create, bool* created);

// The sentence for a failed open_no_symlink of path: "<what>: <reason>" (what names the path). *symlink is set when
// the reason is that path is a symlink (ELOOP from O_NOFOLLOW), and then the sentence says zerocore refuses them.
std::string open_failure(const std::string& what, const std::string& path, int err, bool* symlink);

// Removes the records overlapping [offset, offset + length) and, when `record` is given, adds it (creating the
// sidecar if needed). Without `record`, a missing or damaged sidecar is left as it is (see [Note: damaged sidecar]).
SidecarResult update_sidecar(const std::string& data_path, uint64_t offset, uint64_t length,
                             const ChecksumRecord* record);

// Finds the record of exactly [offset, offset + length). ENOENT when there is none.
SidecarResult find_record(const std::string& data_path, uint64_t offset, uint64_t length, ChecksumRecord* out);

}  // namespace zerocore::io
