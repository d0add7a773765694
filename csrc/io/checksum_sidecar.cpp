#include "checksum_sidecar.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "crc32c.h"

namespace zerocore::io {
namespace {

constexpr char kMagic[8] = {'Z', 'C', 'C', 'R', 'C', '3', '2', 'C'};

SidecarResult os_error(const std::string& what, const std::string& path, int err) {
  return {err, what + " '" + path + "': " + std::strerror(err) + " (errno " + std::to_string(err) + ")"};
}

// Closes the descriptor (and with it the flock) on every return path.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

template <typename T>
void put(std::string& out, T value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(value));
}

template <typename T>
bool take(const std::string& in, size_t& pos, T* value) {
  if (in.size() - pos < sizeof(T)) return false;
  std::memcpy(value, in.data() + pos, sizeof(T));
  pos += sizeof(T);
  return true;
}

std::string encode(const ChecksumRecord& r) {
  std::string out;
  put(out, r.offset);
  put(out, r.length);
  put(out, r.extent_size);
  put(out, static_cast<uint32_t>(r.crcs.size()));
  for (uint32_t c : r.crcs) put(out, c);
  put(out, crc32c(0, out.data(), out.size()));
  return out;
}

// Parses the whole sidecar; false (with a reason) when it is damaged.
bool decode(const std::string& bytes, std::vector<ChecksumRecord>* records, std::string* why) {
  if (bytes.empty()) return true;
  if (bytes.size() < sizeof(kMagic) || std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    *why = "does not start with the zerocore checksum magic";
    return false;
  }
  size_t pos = sizeof(kMagic);
  while (pos < bytes.size()) {
    const size_t start = pos;
    ChecksumRecord r;
    uint32_t count = 0, stored = 0;
    if (!take(bytes, pos, &r.offset) || !take(bytes, pos, &r.length) || !take(bytes, pos, &r.extent_size) ||
        !take(bytes, pos, &count) || bytes.size() - pos < uint64_t{count} * 4 + 4) {
      *why = "ends inside a record (truncated)";
      return false;
    }
    r.crcs.resize(count);
    for (uint32_t i = 0; i < count; ++i) take(bytes, pos, &r.crcs[i]);
    const uint32_t computed = crc32c(0, bytes.data() + start, pos - start);
    take(bytes, pos, &stored);
    if (stored != computed) {
      *why = "has a damaged record at byte " + std::to_string(start);
      return false;
    }
    records->push_back(std::move(r));
  }
  return true;
}

SidecarResult read_all(int fd, const std::string& path, std::string* out) {
  char chunk[1 << 14];
  for (;;) {
    const ssize_t n = ::read(fd, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return os_error("cannot read checksum sidecar", path, errno);
    if (n == 0) return {};
    out->append(chunk, static_cast<size_t>(n));
  }
}

SidecarResult write_all(int fd, const std::string& path, const std::string& bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return os_error("cannot write checksum sidecar", path, errno);
    done += static_cast<size_t>(n);
  }
  if (::ftruncate(fd, static_cast<off_t>(bytes.size())) != 0)
    return os_error("cannot truncate checksum sidecar", path, errno);
  return {};
}

bool overlaps(const ChecksumRecord& r, uint64_t offset, uint64_t length) {
  if (length == 0 || r.length == 0) return r.offset == offset;  // empty ranges collide only at the same offset
  return r.offset < offset + length && offset < r.offset + r.length;
}

}  // namespace

std::string sidecar_path(const std::string& data_path) { return data_path + ".crc32c"; }

SidecarResult update_sidecar(const std::string& data_path, uint64_t offset, uint64_t length,
                             const ChecksumRecord* record) {
  const std::string path = sidecar_path(data_path);
  Fd f;
  f.fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC | (record ? O_CREAT : 0), 0644);
  if (f.fd < 0) {
    if (!record && errno == ENOENT) return {};
    return os_error("cannot open checksum sidecar", path, errno);
  }
  while (::flock(f.fd, LOCK_EX) != 0) {
    if (errno != EINTR) return os_error("cannot lock checksum sidecar", path, errno);
  }
  std::string bytes;
  if (auto r = read_all(f.fd, path, &bytes); r.err) return r;
  std::vector<ChecksumRecord> records;
  std::string why;
  if (!decode(bytes, &records, &why)) {
    // A damaged sidecar cannot vouch for anything; it is rebuilt from this write's record alone.
    records.clear();
  }
  std::string out(kMagic, sizeof(kMagic));
  for (const auto& r : records)
    if (!overlaps(r, offset, length)) out += encode(r);
  if (record) out += encode(*record);
  return write_all(f.fd, path, out);
}

SidecarResult find_record(const std::string& data_path, uint64_t offset, uint64_t length, ChecksumRecord* out) {
  const std::string path = sidecar_path(data_path);
  const std::string range = "bytes [" + std::to_string(offset) + ", " + std::to_string(offset + length) + ")";
  Fd f;
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) {
    if (errno == ENOENT)
      return {ENOENT, "no checksum sidecar '" + path + "' for " + range + " of '" + data_path +
                          "': write the data with checksum=True first, or read without verify"};
    return os_error("cannot open checksum sidecar", path, errno);
  }
  while (::flock(f.fd, LOCK_SH) != 0) {
    if (errno != EINTR) return os_error("cannot lock checksum sidecar", path, errno);
  }
  std::string bytes;
  if (auto r = read_all(f.fd, path, &bytes); r.err) return r;
  std::vector<ChecksumRecord> records;
  std::string why;
  if (!decode(bytes, &records, &why)) return {EBADMSG, "checksum sidecar '" + path + "' " + why};
  for (auto& r : records) {
    if (r.offset == offset && r.length == length) {
      *out = std::move(r);
      return {};
    }
  }
  return {ENOENT, "checksum sidecar '" + path + "' holds no record for exactly " + range + " of '" + data_path +
                      "': verify reads must use the offset and length of a write made with checksum=True"};
}

}  // namespace zerocore::io
