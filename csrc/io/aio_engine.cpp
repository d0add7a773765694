#include "aio_engine.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "aligned_buffer.h"
#include "checksum_sidecar.h"
#include "crc32c.h"
#include "zc_check.h"

namespace zerocore::io {
namespace {

constexpr uint64_t kDefaultDirectAlign = 4096;  // when statx does not report STATX_DIOALIGN

const char* op_name(Op op) { return op == Op::kRead ? "read" : "write"; }

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

bool debug_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("ZEROCORE_AIO_DEBUG");
    return v && *v && std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

// How a file takes O_DIRECT: alignment of file offsets/lengths and of memory, or why not at all.
struct DirectInfo {
  bool ok = false;
  uint64_t offset_align = kDefaultDirectAlign;
  uint64_t mem_align = kDefaultDirectAlign;
  std::string why_not;
};

DirectInfo probe_direct(int fd_direct) {
  DirectInfo info;
#ifdef STATX_DIOALIGN
  struct statx stx;
  std::memset(&stx, 0, sizeof(stx));
  if (::statx(fd_direct, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN)) {
    if (stx.stx_dio_offset_align == 0 || stx.stx_dio_mem_align == 0) {
      info.why_not = "statx reports no direct I/O support for this file";
      return info;
    }
    info.offset_align = stx.stx_dio_offset_align;
    info.mem_align = stx.stx_dio_mem_align;
  }
#endif
  info.ok = true;
  return info;
}

void finish_handle(HandleState& h) {
  Status first;
  for (auto& r : h.requests) {
    std::lock_guard<std::mutex> lock(r->error_mu);
    if (!r->error.ok()) {
      first = r->error;
      break;
    }
  }
  std::shared_ptr<HandleState> keep;
  {
    std::lock_guard<std::mutex> lock(h.mu);
    h.status = std::move(first);
    h.done = true;
    keep = std::move(h.self);  // released after notify: a waiter may drop the last other reference meanwhile
  }
  h.cv.notify_all();
}

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);  // read-only or already-written descriptors: nothing to lose on close errors
  fd = -1;
}

// The end of the error message of a failed write: removes the file it created, when the path still names it.
std::string remove_created_file(const RequestState& r) {
  const std::string& path = r.req.path;
  struct stat ours, now;
  if (::fstat(r.fd_buffered, &ours) != 0)
    return "; could not remove '" + path + "', which this write created: fstat failed: " + errno_text(errno);
  // An lstat-then-unlink window remains; it only matters to someone who can replace entries of this directory.
  if (::lstat(path.c_str(), &now) != 0 || now.st_dev != ours.st_dev || now.st_ino != ours.st_ino)
    return "; did not remove '" + path + "': the path no longer names the file this write created";
  if (::unlink(path.c_str()) != 0)
    return "; could not remove '" + path + "', which this write created: " + errno_text(errno);
  return "; removed '" + path + "', which this write had created";
}

// See [Note: failed writes].
void clean_up_failed_write(RequestState& r) {
  const Request& q = r.req;
  const std::string range =
      "bytes [" + std::to_string(q.offset) + ", " + std::to_string(q.offset + q.nbytes) + ") of '" + q.path + "'";
  const SidecarResult s = update_sidecar(q.path, q.offset, q.nbytes, nullptr);
  // A refused symlinked sidecar vouches for nothing either: readers refuse it too.
  std::string done = s.err == 0 || s.symlink ? "; no checksum record vouches for " + range
                                              : "; could not drop the checksum records of " + range + ": " + s.message;
  if (r.created) done += remove_created_file(r);
  std::lock_guard<std::mutex> lock(r.error_mu);
  r.error.message += done;
}

void finish_request(RequestState& r) {
  if (r.req.op == Op::kWrite && !r.failed.load(std::memory_order_acquire)) {
    ChecksumRecord record;
    if (r.req.checksum) {
      record.offset = r.req.offset;
      record.length = r.req.nbytes;
      record.extent_size = static_cast<uint32_t>(r.extent_size);
      record.crcs = r.crcs;
    }
    // Without checksums a write still drops the records it overwrote (see [Note: sidecar layout]).
    const SidecarResult s = update_sidecar(r.req.path, r.req.offset, r.req.nbytes, r.req.checksum ? &record : nullptr);
    if (s.err)
      r.fail(s.symlink ? ErrorKind::kSymlink : s.err == EBADMSG ? ErrorKind::kChecksum : ErrorKind::kOs, s.err,
             r.req.offset, s.message);
  }
  // Once the file was opened, a failed write may have changed its bytes (a failed open changed nothing).
  if (r.req.op == Op::kWrite && r.failed.load(std::memory_order_acquire) && r.fd_buffered >= 0)
    clean_up_failed_write(r);
  close_fd(r.fd_direct);
  close_fd(r.fd_buffered);
  HandleState& h = *r.handle;
  if (h.remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) finish_handle(h);
}

// A verified read: loads the checksum record of exactly its range; false (with r.error set) when there is none.
bool load_record(RequestState& r) {
  ChecksumRecord record;
  const SidecarResult s = find_record(r.req.path, r.req.offset, r.req.nbytes, &record);
  const uint64_t expected_extents =
      record.extent_size ? (r.req.nbytes == 0 ? 0 : (r.req.offset + r.req.nbytes - 1) / record.extent_size -
                                                        r.req.offset / record.extent_size + 1)
                         : 0;
  if (s.err) {
    r.fail(s.symlink ? ErrorKind::kSymlink : ErrorKind::kChecksum, s.err, r.req.offset, s.message);
    return false;
  }
  if (record.extent_size == 0 || record.extent_size % 4096 != 0 || record.crcs.size() != expected_extents) {
    r.fail(ErrorKind::kChecksum, EBADMSG, r.req.offset,
           "checksum record of '" + r.req.path + "' is inconsistent (extent size " +
               std::to_string(record.extent_size) + ", " + std::to_string(record.crcs.size()) + " crcs)");
    return false;
  }
  r.extent_size = record.extent_size;
  r.crcs = std::move(record.crcs);
  return true;
}

// Opens the descriptors (and, for a verified read, loads the checksum record) and decides O_DIRECT; false (with
// r.error set) when the file cannot be opened.
bool open_request(RequestState& r, const EngineOptions& options) {
  const Request& q = r.req;
  const int flags = q.op == Op::kWrite ? O_WRONLY : O_RDONLY;
  const std::string what =
      std::string("cannot open '") + q.path + "' for " + (q.op == Op::kWrite ? "writing" : "reading");
  bool symlink = false;
  // See [Note: symlinks and created files] in checksum_sidecar.h.
  r.fd_buffered = open_no_symlink(q.path, flags, q.op == Op::kWrite, &r.created);
  if (r.fd_buffered < 0) {
    const int err = errno;
    const std::string message = open_failure(what, q.path, err, &symlink);
    r.fail(symlink ? ErrorKind::kSymlink : ErrorKind::kOs, err, q.offset, message);
    return false;
  }
  // After the data file opened, so that a symlinked data path is reported as such, not as a missing sidecar.
  if (q.op == Op::kRead && q.checksum && !load_record(r)) return false;
  if (!options.direct) {
    r.direct_note = "O_DIRECT turned off (direct=False)";
    return true;
  }
  r.fd_direct = open_no_symlink(q.path, flags | O_DIRECT, false, nullptr);
  if (r.fd_direct < 0) {
    const int err = errno;
    if (err == ELOOP) {  // the path became a symlink since the buffered open: refuse, do not fall back
      const std::string message = open_failure(what + " with O_DIRECT", q.path, err, &symlink);
      r.fail(symlink ? ErrorKind::kSymlink : ErrorKind::kOs, err, q.offset, message);
      return false;
    }
    r.direct_note = "the file system refuses O_DIRECT for '" + q.path + "' (" + errno_text(err) + ")";
    return true;
  }
  // Both descriptors must be the same file: the path may have been replaced between the two opens.
  struct stat st_buffered, st_direct;
  if (::fstat(r.fd_buffered, &st_buffered) != 0 || ::fstat(r.fd_direct, &st_direct) != 0) {
    const int err = errno;
    r.fail(ErrorKind::kOs, err, q.offset, "cannot fstat '" + q.path + "': " + errno_text(err));
    return false;
  }
  if (st_buffered.st_dev != st_direct.st_dev || st_buffered.st_ino != st_direct.st_ino) {
    r.fail(ErrorKind::kOs, EAGAIN, q.offset,
           "'" + q.path + "' was replaced by another file while it was being opened; try again (errno " +
               std::to_string(EAGAIN) + ")");
    return false;
  }
  DirectInfo info = probe_direct(r.fd_direct);
  if (info.ok && (info.offset_align > r.extent_size || r.extent_size % info.offset_align != 0 ||
                  options.block_size % info.offset_align != 0)) {
    info.ok = false;
    info.why_not = "its direct I/O alignment " + std::to_string(info.offset_align) +
                   " does not divide the block size";
  }
  if (!info.ok) {
    r.direct_note = "'" + q.path + "': " + info.why_not;
    close_fd(r.fd_direct);
    return true;
  }
  r.direct = true;
  r.offset_align = info.offset_align;
  r.mem_align = info.mem_align;
  return true;
}

// Adds the pieces of file bytes [start, end), cut at every multiple of the block size and of the extent size.
void add_pieces(RequestState& r, uint64_t start, uint64_t end, bool direct, uint64_t block_size) {
  const uint64_t E = r.extent_size;
  for (uint64_t pos = start; pos < end;) {
    const uint64_t next = std::min({end, round_down(pos, block_size) + block_size, round_down(pos, E) + E});
    Piece p;
    p.req = &r;
    p.op = r.req.op;
    p.fd = direct ? r.fd_direct : r.fd_buffered;
    p.fallback_fd = r.fd_buffered;
    p.user = static_cast<char*>(r.req.buffer) + (pos - r.req.offset);
    p.file_offset = pos;
    p.length = static_cast<uint32_t>(next - pos);
    p.extent = static_cast<uint32_t>(pos / E - r.first_extent);
    p.bounce = direct && !is_aligned(p.user, r.mem_align);
    r.pieces.push_back(p);
    pos = next;
  }
}

// Splits the request into pieces; see [Note: O_DIRECT and alignment].
void plan(RequestState& r, uint64_t block_size) {
  const uint64_t start = r.req.offset, end = r.req.offset + r.req.nbytes;
  if (start == end) return;
  const uint64_t E = r.extent_size;
  r.first_extent = start / E;
  const uint64_t extents = (end - 1) / E - r.first_extent + 1;
  r.extent_remaining = std::make_unique<std::atomic<uint32_t>[]>(extents);
  if (r.req.op == Op::kWrite) r.crcs.assign(extents, 0);
  uint64_t lo = end, hi = end;  // the O_DIRECT range; empty unless some aligned block fits
  if (r.direct) {
    // Whole pages only, even when the device takes 512-byte units: a page written both buffered (a head or tail)
    // and direct could be written back from the page cache over the direct bytes.
    const uint64_t unit = std::max<uint64_t>(r.offset_align, page_size());
    lo = round_up(start, unit);
    hi = round_down(end, unit);
    if (lo >= hi) lo = hi = end;
  }
  add_pieces(r, start, lo, false, block_size);
  add_pieces(r, lo, hi, true, block_size);
  add_pieces(r, hi, end, false, block_size);
  for (const Piece& p : r.pieces) r.extent_remaining[p.extent].fetch_add(1, std::memory_order_relaxed);
}

// The last piece of an extent computes its crc32c: records it (write) or checks it (read).
void finish_extent(RequestState& r, const Piece& p) {
  const uint64_t E = r.extent_size, k = r.first_extent + p.extent;
  const uint64_t lo = std::max(r.req.offset, k * E), hi = std::min(r.req.offset + r.req.nbytes, (k + 1) * E);
  const uint32_t crc = crc32c(0, static_cast<const char*>(r.req.buffer) + (lo - r.req.offset), hi - lo);
  if (r.req.op == Op::kWrite) {
    r.crcs[p.extent] = crc;  // each extent index is written by exactly one thread
  } else if (crc != r.crcs[p.extent]) {
    r.fail(ErrorKind::kChecksum, EBADMSG, lo,
           "checksum mismatch reading '" + r.req.path + "' extent " + std::to_string(p.extent) + " (file bytes [" +
               std::to_string(lo) + ", " + std::to_string(hi) + ")): stored crc32c " + hex32(r.crcs[p.extent]) +
               ", data has " + hex32(crc) + "; the file was changed or damaged after it was written (errno " +
               std::to_string(EBADMSG) + ")");
  }
}

}  // namespace

void RequestState::fail(ErrorKind kind, int err, uint64_t offset, const std::string& message) {
  std::lock_guard<std::mutex> lock(error_mu);
  // Blocks fail in any order; the lowest offset is the one the user can act on (e.g. where the file ends).
  if (error.ok() || offset < error.offset) {
    error.kind = kind;
    error.err = err;
    error.path = req.path;
    error.offset = offset;
    error.message = message;
  }
  failed.store(true, std::memory_order_release);
}

bool piece_cancelled(const Piece& piece) { return piece.req->failed.load(std::memory_order_acquire); }

void complete_piece(Piece& p, int err, uint64_t transferred) {
  RequestState& r = *p.req;
  if (err == ENODATA && p.op == Op::kRead) {
    struct stat st;
    const bool sized = ::fstat(r.fd_buffered, &st) == 0;
    const std::string size = sized ? std::to_string(st.st_size) : "unknown";
    // Where the file ends, whichever piece noticed first: a piece that starts past the end reads nothing at its
    // own offset, and the piece that holds the end may have been cancelled by then.
    const uint64_t end = sized ? static_cast<uint64_t>(st.st_size) : p.file_offset + transferred;
    r.fail(ErrorKind::kShortFile, ENODATA, end,
           "read of '" + r.req.path + "' hit end of file at offset " + std::to_string(end) +
               ": the file is " + size + " bytes, shorter than the " + std::to_string(r.req.nbytes) +
               " bytes asked at offset " + std::to_string(r.req.offset) + " (errno " + std::to_string(ENODATA) + ")");
  } else if (err != 0 && err != ECANCELED) {
    r.fail(ErrorKind::kOs, err, p.file_offset + transferred,
           std::string(op_name(p.op)) + " of '" + r.req.path + "' failed at offset " +
               std::to_string(p.file_offset + transferred) + " (request: " + std::to_string(r.req.nbytes) +
               " bytes at offset " + std::to_string(r.req.offset) + "): " + errno_text(err));
  } else if (err == 0 && r.req.checksum && !r.failed.load(std::memory_order_acquire) &&
             r.extent_remaining[p.extent].fetch_sub(1, std::memory_order_acq_rel) == 1) {
    finish_extent(r, p);
  }
  if (r.remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) finish_request(r);
}

int run_piece_blocking(Piece& p, char* bounce, uint64_t* transferred) {
  char* mem = p.bounce ? bounce : p.user;
  if (p.bounce && p.op == Op::kWrite) std::memcpy(bounce, p.user, p.length);
  uint64_t done = 0;
  int fd = p.fd;
  while (done < p.length) {
    const ssize_t n = p.op == Op::kRead
                          ? ::pread(fd, mem + done, p.length - done, static_cast<off_t>(p.file_offset + done))
                          : ::pwrite(fd, mem + done, p.length - done, static_cast<off_t>(p.file_offset + done));
    if (n < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EINVAL && fd != p.fallback_fd) {  // O_DIRECT refused this block after all: go buffered
        fd = p.fallback_fd;
        continue;
      }
      *transferred = done;
      return err;
    }
    if (n == 0) {
      *transferred = done;
      return p.op == Op::kRead ? ENODATA : EIO;
    }
    done += static_cast<uint64_t>(n);
    fd = p.fallback_fd;  // a partial O_DIRECT transfer leaves an unaligned remainder: finish it buffered
  }
  if (p.bounce && p.op == Op::kRead) std::memcpy(p.user, bounce, p.length);
  *transferred = done;
  return 0;
}

const Status& Handle::wait() {
  std::unique_lock<std::mutex> lock(state_->mu);
  state_->cv.wait(lock, [&] { return state_->done; });
  return state_->status;
}

bool Handle::done() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->done;
}

bool Handle::used_direct() const {
  for (const auto& r : state_->requests)
    if (r->req.nbytes > 0 && !r->direct) return false;
  return true;
}

std::string Handle::notes() const {
  std::string out;
  for (const auto& r : state_->requests)
    if (r->req.nbytes > 0 && !r->direct && !r->direct_note.empty()) out += r->direct_note + "\n";
  return out;
}

BackendChoice choose_backend(const std::string& requested) {
  std::string name = requested, source = "backend=";
  if (name.empty()) {
    const char* env = std::getenv("ZEROCORE_AIO_BACKEND");
    if (env && *env) {
      name = env;
      source = "ZEROCORE_AIO_BACKEND=";
    }
  }
  if (name != "" && name != "auto" && name != "io_uring" && name != "threads")
    throw std::runtime_error("unknown I/O backend '" + name + "' (from " + source + name +
                             "): use 'io_uring', 'threads' or 'auto'");
  if (name == "threads") return {"threads", "forced by " + source + name};
  const auto [uring_ok, uring_why] = uring_available();
  if (name == "io_uring") {
    if (!uring_ok)
      throw std::runtime_error("the io_uring I/O backend was forced by " + source + name +
                               " but is unavailable: " + uring_why + "; use backend='threads' or 'auto'");
    return {"io_uring", "forced by " + source + name};
  }
  if (uring_ok) return {"io_uring", uring_why};
  return {"threads", "io_uring unavailable: " + uring_why};
}

Engine::Engine(EngineOptions options) : options_(std::move(options)) {
  ZC_CHECK(options_.block_size >= 4096 && options_.block_size % 4096 == 0 && options_.block_size <= (1u << 30),
           "block_size must be a multiple of 4096 between 4096 and 1 GiB, got ", options_.block_size);
  ZC_CHECK(options_.queue_depth >= 1 && options_.queue_depth <= 4096, "queue_depth must be in [1, 4096], got ",
           options_.queue_depth);
  ZC_CHECK(options_.threads >= 0 && options_.threads <= 1024, "threads must be in [0, 1024] (0: default), got ",
           options_.threads);
  choice_ = choose_backend(options_.backend);
  if (choice_.name == "io_uring") {
    backend_ = make_uring_backend(options_);
  } else {
    const int threads = options_.threads > 0 ? options_.threads : std::min(options_.queue_depth, 8);
    backend_ = make_thread_pool_backend(options_, threads);
  }
}

Engine::~Engine() { backend_.reset(); }

Handle Engine::submit(std::vector<Request> requests) {
  auto h = std::make_shared<HandleState>();
  for (auto& q : requests) {
    if (q.buffer == nullptr && q.nbytes > 0)
      throw std::invalid_argument("request for '" + q.path + "' has a null buffer but " + std::to_string(q.nbytes) +
                                  " bytes");
    ZC_CHECK(q.offset <= (uint64_t{1} << 62) && q.nbytes <= (uint64_t{1} << 62), "offset ", q.offset,
             " or length ", q.nbytes, " of '", q.path, "' is out of range");
    auto r = std::make_unique<RequestState>();
    r->req = std::move(q);
    r->handle = h.get();
    h->requests.push_back(std::move(r));
  }
  Handle handle(h);
  if (h->requests.empty()) {
    std::lock_guard<std::mutex> lock(h->mu);
    h->done = true;
    return handle;
  }
  h->remaining.store(h->requests.size(), std::memory_order_relaxed);
  h->self = h;
  std::vector<Piece*> pieces;
  // Index loop: a request without pieces finishes at once, and the last one may complete the handle.
  const size_t count = h->requests.size();
  for (size_t i = 0; i < count; ++i) {
    RequestState& r = *h->requests[i];
    r.extent_size = options_.block_size;
    const bool ok = open_request(r, options_);
    if (ok) {
      if (!r.direct && options_.direct && debug_enabled())
        std::fprintf(stderr, "zerocore.io: buffered I/O: %s\n", r.direct_note.c_str());
      plan(r, options_.block_size);
    }
    r.remaining.store(r.pieces.size(), std::memory_order_relaxed);
    if (r.pieces.empty()) {
      finish_request(r);
    } else {
      for (Piece& p : r.pieces) pieces.push_back(&p);
    }
  }
  if (!pieces.empty()) backend_->enqueue(pieces);
  return handle;
}

}  // namespace zerocore::io
