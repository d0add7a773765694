// zerocore's asynchronous file I/O engine: many (buffer, path, offset, length) requests per handle, split into
// blocks kept in flight up to a queue depth, run by one of two backends (io_uring, or a pread/pwrite thread pool)
// chosen at run time. Torch-free: raw pointers and std types, so it builds standalone for sanitizer runs.
//
// [Note: O_DIRECT and alignment]
// Each file is opened twice: with O_DIRECT (when the file system accepts it) and buffered. The bytes of a request
// lie in whole pages (and whole units of the file's direct-I/O offset alignment, statx STATX_DIOALIGN, else 4096)
// go through the O_DIRECT descriptor in blocks; the partial pages at the head and tail go through the buffered
// one (a page is never written both ways: its write-back could land over the direct bytes), so any offset and any length work and writes never need read-modify-write or
// ftruncate. When the caller's memory is not aligned for O_DIRECT, each block is staged through an aligned
// bounce block owned by the backend. A file system that refuses O_DIRECT (EINVAL at open, or statx reporting no
// direct I/O) gets buffered I/O for that file; Handle::used_direct() and ZEROCORE_AIO_DEBUG=1 say so.
//
// [Note: errors]
// Nothing is returned partially: a request fails as a whole with the first error of any of its blocks (later
// blocks are skipped), and Handle::wait() reports the path, the file offset and the errno. A read that meets
// end-of-file before its last byte fails with ENODATA ("file shorter than asked"). A data file or sidecar that is a
// symlink is refused with ELOOP (ErrorKind::kSymlink; see [Note: symlinks and created files] in checksum_sidecar.h).
//
// [Note: failed writes]
// A write that fails (ENOSPC, EIO, ...) after its file was opened may have put some of its bytes there. So that a
// later verified read fails instead of returning them, the sidecar records overlapping its range are dropped; and
// a file the write itself created (O_CREAT|O_EXCL) is unlinked, unless the path names another file by then. The
// error message ends with what was cleaned up. A write to a file that another request is creating at the same time
// loses its bytes with that unlink: create a file before writing it from several places at once.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace zerocore::io {

enum class Op : uint8_t { kRead, kWrite };

// One transfer between a host buffer and the bytes [offset, offset + nbytes) of a file.
struct Request {
  Op op = Op::kRead;
  void* buffer = nullptr;
  uint64_t nbytes = 0;
  std::string path;
  uint64_t offset = 0;
  // write: record a crc32c per extent in the sidecar (see checksum_sidecar.h); read: verify against it.
  bool checksum = false;
};

enum class ErrorKind : int { kNone = 0, kOs = 1, kShortFile = 2, kChecksum = 3, kSymlink = 4 };

struct Status {
  ErrorKind kind = ErrorKind::kNone;
  int err = 0;           // errno; ENODATA for a short file, EBADMSG for a checksum mismatch, ELOOP for a symlink
  std::string path;
  uint64_t offset = 0;   // the file offset where it failed
  std::string message;   // a full sentence naming op, path, offset and errno
  bool ok() const { return kind == ErrorKind::kNone; }
};

struct EngineOptions {
  uint64_t block_size = 1 << 20;  // requests are split into blocks of at most this many bytes
  int queue_depth = 32;           // blocks in flight per engine
  int threads = 0;                // thread-pool backend workers; 0: min(queue_depth, 8)
  std::string backend;            // "", "auto", "io_uring" or "threads"; "" reads env ZEROCORE_AIO_BACKEND
  bool direct = true;             // try O_DIRECT (false: always buffered)
};

struct BackendChoice {
  std::string name;    // "io_uring" or "threads"
  std::string reason;  // why this one
};

// Which backend `requested` ("", "auto", "io_uring", "threads"; "" consults ZEROCORE_AIO_BACKEND) resolves to
// here. Throws std::runtime_error naming the reason when io_uring is forced but unavailable, or the name is bad.
BackendChoice choose_backend(const std::string& requested);

// Whether io_uring works in this process: built with liburing and io_uring_queue_init succeeds (probed once).
std::pair<bool, std::string> uring_available();

struct RequestState;
struct HandleState;

// One block of a request, as the backends see it.
struct Piece {
  RequestState* req = nullptr;
  int fd = -1;            // descriptor to use (the O_DIRECT one for aligned blocks)
  int fallback_fd = -1;   // buffered descriptor that finishes a partial O_DIRECT transfer
  char* user = nullptr;   // the bytes in the caller's buffer
  uint64_t file_offset = 0;
  uint32_t length = 0;
  uint32_t extent = 0;    // index of the checksum extent within the request
  bool bounce = false;    // caller memory is not aligned for O_DIRECT: stage through an aligned block
  Op op = Op::kRead;
};

// Backends call this exactly once per piece. err: 0 or an errno; transferred: bytes moved before the failure or
// end-of-file (== length on success). ECANCELED means the piece was skipped because its request already failed.
void complete_piece(Piece& piece, int err, uint64_t transferred);
// True when the piece's request already failed, so the backend can skip it (then complete with ECANCELED).
bool piece_cancelled(const Piece& piece);
// Runs one piece with blocking pread/pwrite (bounce: an aligned block of at least piece.length bytes, used when
// piece.bounce). Returns the errno (0 on success, ENODATA at end-of-file); *transferred gets the bytes moved.
int run_piece_blocking(Piece& piece, char* bounce, uint64_t* transferred);

class Backend {
 public:
  virtual ~Backend() = default;  // implementations finish every enqueued piece before returning
  virtual void enqueue(const std::vector<Piece*>& pieces) = 0;
};

std::unique_ptr<Backend> make_thread_pool_backend(const EngineOptions& options, int threads);
// Throws std::runtime_error ("not built with liburing" or the io_uring_queue_init failure) when unavailable.
std::unique_ptr<Backend> make_uring_backend(const EngineOptions& options);

// What the caller holds for a submitted batch; wait() from any thread, any number of times.
class Handle {
 public:
  explicit Handle(std::shared_ptr<HandleState> state) : state_(std::move(state)) {}
  // Blocks until every request finished; returns the failure of the first failed request (ok() when none),
  // at the lowest file offset that failed in it.
  const Status& wait();
  bool done() const;
  // False when some request fell back to buffered I/O although O_DIRECT was asked for (valid after wait()).
  bool used_direct() const;
  std::string notes() const;  // why buffered I/O was used, one line per file (valid after wait())

 private:
  std::shared_ptr<HandleState> state_;
};

class Engine {
 public:
  explicit Engine(EngineOptions options);
  ~Engine();  // waits for every submitted request
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Starts all requests and returns at once; errors surface from Handle::wait(). The buffers must stay alive
  // and untouched until then. Throws std::invalid_argument only for a malformed request (null buffer).
  Handle submit(std::vector<Request> requests);
  const std::string& backend_name() const { return choice_.name; }
  const std::string& backend_reason() const { return choice_.reason; }
  const EngineOptions& options() const { return options_; }

 private:
  EngineOptions options_;
  BackendChoice choice_;
  std::unique_ptr<Backend> backend_;
};

// ---- engine internals shared by the backends ----

struct RequestState {
  Request req;
  HandleState* handle = nullptr;
  int fd_direct = -1;
  int fd_buffered = -1;
  bool created = false;  // a write that made its file: removed again if it fails (see [Note: failed writes])
  bool direct = false;
  std::string direct_note;  // why O_DIRECT was not used
  uint64_t offset_align = 4096;  // direct I/O alignment of file offsets and lengths (statx STATX_DIOALIGN)
  uint64_t mem_align = 4096;     // direct I/O alignment of memory addresses
  uint64_t extent_size = 0;
  uint64_t first_extent = 0;
  std::vector<Piece> pieces;
  std::unique_ptr<std::atomic<uint32_t>[]> extent_remaining;
  std::vector<uint32_t> crcs;      // write: computed per extent; read: expected
  std::atomic<uint64_t> remaining{0};
  std::atomic<bool> failed{false};
  std::mutex error_mu;
  Status error;

  void fail(ErrorKind kind, int err, uint64_t offset, const std::string& message);
};

struct HandleState {
  std::vector<std::unique_ptr<RequestState>> requests;
  std::atomic<size_t> remaining{0};
  std::shared_ptr<HandleState> self;  // keeps the state alive while blocks are in flight
  mutable std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  Status status;
};

}  // namespace zerocore::io
