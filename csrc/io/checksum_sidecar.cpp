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

// Opens the sidecar (see [Note: symlinks and created files]) and makes sure it is a regular file. O_NONBLOCK: a
// FIFO planted there would otherwise block a read-only open forever; it changes nothing for regular files.
SidecarResult open_sidecar(const std::string& path, int flags, bool create, Fd* f) {
  bool created = false;
  f->fd = open_no_symlink(path, flags | O_NONBLOCK, create, &created);
  if (f->fd < 0) {
    SidecarResult r;
    r.err = errno;
    r.message = open_failure("cannot open checksum sidecar '" + path + "'", path, r.err, &r.symlink);
    return r;
  }
  struct stat st;
  if (::fstat(f->fd, &st) != 0) return os_error("cannot stat checksum sidecar", path, errno);
  if (!S_ISREG(st.st_mode))
    return {EINVAL, "checksum sidecar '" + path + "' is not a regular file, so zerocore will not use it: remove it "
                    "(errno " + std::to_string(EINVAL) + ")"};
  return {};
}

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

int open_no_symlink(const std::string& path, int flags, bool create, bool* created) {
  if (created) *created = false;
  flags |= O_NOFOLLOW | O_CLOEXEC;
  // Open first, create only when missing: another process may create or remove the file in between, hence rounds.
  for (int round = 0;; ++round) {
    const int fd = ::open(path.c_str(), flags);
    if (fd >= 0 || errno != ENOENT || !create) return fd;
    const int made = ::open(path.c_str(), flags | O_CREAT | O_EXCL, 0600);
    if (made >= 0) {
      *created = true;
      return made;
    }
    if (errno != EEXIST || round == 2) return -1;  // EEXIST: someone else created it (or planted a link): reopen
  }
}

std::string open_failure(const std::string& what, const std::string& path, int err, bool* symlink) {
  // O_NOFOLLOW reports a symlink as ELOOP, which also means a loop in the directories above: lstat tells them apart.
  struct stat st;
  *symlink = err == ELOOP && ::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode);
  if (*symlink)
    return what + ": '" + path + "' is a symlink, and zerocore refuses symlinks for swap/checkpoint files (a link "
           "there could redirect the I/O to any file this process may write); use the real path (errno " +
           std::to_string(err) + ")";
  return what + ": " + std::strerror(err) + " (errno " + std::to_string(err) + ")";
}

std::string sidecar_path(const std::string& data_path) { return data_path + ".crc32c"; }

SidecarResult update_sidecar(const std::string& data_path, uint64_t offset, uint64_t length,
                             const ChecksumRecord* record) {
  const std::string path = sidecar_path(data_path);
  Fd f;
  if (SidecarResult r = open_sidecar(path, O_RDWR, record != nullptr, &f); r.err) {
    if (!record && r.err == ENOENT) return {};
    return r;
  }
  while (::flock(f.fd, LOCK_EX) != 0) {
    if (errno != EINTR) return os_error("cannot lock checksum sidecar", path, errno);
  }
  std::string bytes;
  if (auto r = read_all(f.fd, path, &bytes); r.err) return r;
  std::vector<ChecksumRecord> records;
  std::string why;
  if (!decode(bytes, &records, &why)) {
    if (!record) return {};  // see [Note: damaged sidecar]
    return {EBADMSG, "checksum sidecar '" + path + "' " + why + ", so the checksums of this write to '" + data_path +
                         "' cannot be recorded; zerocore does not rewrite a damaged sidecar: delete '" + path +
                         "' (its records are unreadable anyway) and write again (errno " + std::to_string(EBADMSG) +
                         ")"};
  }
  std::string out(kMagic, sizeof(kMagic));
  for (const auto& r : records)
    if (!overlaps(r, offset, length)) out += encode(r);
  if (record) out += encode(*record);
  SidecarResult w = write_all(f.fd, path, out);
  // A rewrite cut short (ENOSPC while it grows) would leave a damaged sidecar, which blocks every later checksummed
  // write (see [Note: damaged sidecar]). Putting the old bytes back only rewrites blocks the file already had.
  if (w.err) w.message += write_all(f.fd, path, bytes).err ? "; it may be damaged now" : "; its old bytes are restored";
  return w;
}

SidecarResult find_record(const std::string& data_path, uint64_t offset, uint64_t length, ChecksumRecord* out) {
  const std::string path = sidecar_path(data_path);
  const std::string range = "bytes [" + std::to_string(offset) + ", " + std::to_string(offset + length) + ")";
  Fd f;
  if (SidecarResult r = open_sidecar(path, O_RDONLY, false, &f); r.err) {
    if (r.err == ENOENT)
      return {ENOENT, "no checksum sidecar '" + path + "' for " + range + " of '" + data_path +
                          "': write the data with checksum=True first, or read without verify"};
    return r;
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
