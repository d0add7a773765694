// The io_uring backend: one ring and one thread that keeps up to queue_depth blocks in flight, so a 1 GiB
// transfer costs a few hundred syscalls instead of one per block per thread. Bounce blocks (for callers whose
// memory is not aligned for O_DIRECT) are registered with the ring as fixed buffers, which saves the kernel
// pinning those pages again on every block. Compiled to a clear failure when zerocore was built without liburing.
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "aio_engine.h"

#ifdef ZEROCORE_HAVE_URING
#include <liburing.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "aligned_buffer.h"
#endif

namespace zerocore::io {

#ifndef ZEROCORE_HAVE_URING

std::pair<bool, std::string> uring_available() {
  return {false, "zerocore was not built with liburing (install liburing-dev, then rebuild the aio op: "
                 "zerocore.ops.build('aio', force=True))"};
}

std::unique_ptr<Backend> make_uring_backend(const EngineOptions&) {
  throw std::runtime_error("io_uring backend requested but " + uring_available().second);
}

#else

std::pair<bool, std::string> uring_available() {
  // Probed once per process: a seccomp profile (Docker's default) or io_uring_disabled makes this fail with
  // EPERM or ENOSYS, and then it fails the same way every time.
  static const std::pair<bool, std::string> probe = [] {
    struct io_uring ring;
    const int ret = io_uring_queue_init(4, &ring, 0);
    if (ret < 0) {
      return std::make_pair(false, std::string("io_uring_queue_init failed: ") + std::strerror(-ret) + " (errno " +
                                       std::to_string(-ret) +
                                       "); the kernel, /proc/sys/kernel/io_uring_disabled or a seccomp profile "
                                       "blocks io_uring");
    }
    io_uring_queue_exit(&ring);
    return std::make_pair(true, std::string("built with liburing and io_uring_queue_init succeeds here"));
  }();
  return probe;
}

namespace {

class UringBackend final : public Backend {
 public:
  explicit UringBackend(const EngineOptions& options)
      : block_size_(options.block_size), depth_(static_cast<unsigned>(options.queue_depth)), slots_(depth_) {
    // One extra entry for the eventfd read that wakes the loop when work arrives.
    const int ret = io_uring_queue_init(depth_ + 1, &ring_, 0);
    if (ret < 0)
      throw std::runtime_error(std::string("io_uring_queue_init(") + std::to_string(depth_ + 1) +
                               ") failed: " + std::strerror(-ret) + " (errno " + std::to_string(-ret) + ")");
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC);
    if (wake_fd_ < 0) {
      const int err = errno;
      io_uring_queue_exit(&ring_);
      throw std::runtime_error(std::string("eventfd failed: ") + std::strerror(err));
    }
    for (unsigned i = 0; i < depth_; ++i) free_slots_.push_back(depth_ - 1 - i);
    loop_ = std::thread([this] { run(); });
  }

  ~UringBackend() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake();
    loop_.join();
    if (registered_) io_uring_unregister_buffers(&ring_);
    io_uring_queue_exit(&ring_);  // cancels the last eventfd read
    ::close(wake_fd_);
  }

  void enqueue(const std::vector<Piece*>& pieces) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_.insert(pending_.end(), pieces.begin(), pieces.end());
    }
    wake();
  }

 private:
  struct Slot {
    Piece* piece = nullptr;
    uint64_t done = 0;  // bytes already transferred
    int fd = -1;
  };

  void wake() {
    const uint64_t one = 1;
    // eventfd writes of 8 bytes only fail when the counter would overflow, and then the loop is awake anyway.
    while (::write(wake_fd_, &one, sizeof(one)) < 0 && errno == EINTR) {
    }
  }

  io_uring_sqe* next_sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    while (sqe == nullptr) {  // cannot happen with depth_ + 1 entries, but submitting frees the queue if it does
      io_uring_submit(&ring_);
      sqe = io_uring_get_sqe(&ring_);
    }
    return sqe;
  }

  void arm_wake_read() {
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_read(sqe, wake_fd_, &wake_value_, sizeof(wake_value_), 0);
    io_uring_sqe_set_data64(sqe, 0);
  }

  char* bounce_of(unsigned slot) { return bounce_.data() + uint64_t{slot} * block_size_; }

  void ensure_bounce() {
    if (bounce_.size() != 0) return;
    bounce_ = AlignedBuffer(uint64_t{depth_} * block_size_, page_size());
    std::vector<iovec> iov(depth_);
    for (unsigned i = 0; i < depth_; ++i) iov[i] = {bounce_of(i), block_size_};
    // Registered while blocks and the wake read are in flight, so the BUFFERS2 opcode (behind the _tags call),
    // which never waits for the ring to go idle; plain IORING_REGISTER_BUFFERS did on older kernels, and the
    // wake read never completes on its own. Registration pins the pages (RLIMIT_MEMLOCK) and needs Linux 5.13;
    // where it fails, the plain read/write ops work as well.
    registered_ = io_uring_register_buffers_tags(&ring_, iov.data(), nullptr, depth_) == 0;
  }

  void prep(unsigned index) {
    Slot& s = slots_[index];
    Piece& p = *s.piece;
    char* mem = (p.bounce ? bounce_of(index) : p.user) + s.done;
    const unsigned len = static_cast<unsigned>(p.length - s.done);
    const uint64_t off = p.file_offset + s.done;
    io_uring_sqe* sqe = next_sqe();
    if (p.bounce && registered_) {
      if (p.op == Op::kRead)
        io_uring_prep_read_fixed(sqe, s.fd, mem, len, off, static_cast<int>(index));
      else
        io_uring_prep_write_fixed(sqe, s.fd, mem, len, off, static_cast<int>(index));
    } else if (p.op == Op::kRead) {
      io_uring_prep_read(sqe, s.fd, mem, len, off);
    } else {
      io_uring_prep_write(sqe, s.fd, mem, len, off);
    }
    io_uring_sqe_set_data64(sqe, uint64_t{index} + 1);
    ++in_flight_;
  }

  void start(Piece* p) {
    if (piece_cancelled(*p)) {
      complete_piece(*p, ECANCELED, 0);
      return;
    }
    if (p->bounce) ensure_bounce();
    const unsigned index = free_slots_.back();
    free_slots_.pop_back();
    slots_[index] = Slot{p, 0, p->fd};
    if (p->bounce && p->op == Op::kWrite) std::memcpy(bounce_of(index), p->user, p->length);
    prep(index);
  }

  void finish(unsigned index, int err) {
    Slot s = slots_[index];
    free_slots_.push_back(index);
    if (err == 0 && s.piece->bounce && s.piece->op == Op::kRead) std::memcpy(s.piece->user, bounce_of(index), s.done);
    complete_piece(*s.piece, err, s.done);
  }

  void on_completion(unsigned index, int res) {
    --in_flight_;
    Slot& s = slots_[index];
    Piece& p = *s.piece;
    if (res == -EINTR || res == -EAGAIN) return prep(index);
    if (res == -EINVAL && s.fd != p.fallback_fd) {  // O_DIRECT refused this block after all: go buffered
      s.fd = p.fallback_fd;
      return prep(index);
    }
    if (res < 0) return finish(index, -res);
    if (res == 0) return finish(index, p.op == Op::kRead ? ENODATA : EIO);
    s.done += static_cast<uint64_t>(res);
    if (s.done < p.length) {
      s.fd = p.fallback_fd;  // a partial O_DIRECT transfer leaves an unaligned remainder: finish it buffered
      return prep(index);
    }
    finish(index, 0);
  }

  void run() {
    arm_wake_read();
    std::vector<Piece*> batch;
    for (;;) {
      bool stopping;
      {
        std::lock_guard<std::mutex> lock(mu_);
        while (batch.size() < free_slots_.size() && !pending_.empty()) {
          batch.push_back(pending_.front());
          pending_.pop_front();
        }
        stopping = stop_ && pending_.empty();
      }
      for (Piece* p : batch) start(p);  // outside the lock: completing a cancelled piece may do file I/O
      batch.clear();
      if (stopping && in_flight_ == 0) return;
      const int ret = io_uring_submit_and_wait(&ring_, 1);
      if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
        // The ring itself broke: fail everything in flight rather than hang the waiters.
        fail_all(-ret);
        continue;
      }
      unsigned head, seen = 0;
      io_uring_cqe* cqe;
      std::vector<std::pair<uint64_t, int>> done;
      io_uring_for_each_cqe(&ring_, head, cqe) {
        done.emplace_back(io_uring_cqe_get_data64(cqe), cqe->res);
        ++seen;
      }
      io_uring_cq_advance(&ring_, seen);
      for (auto [tag, res] : done) {
        if (tag == 0) {
          arm_wake_read();  // the ring is torn down with one read left armed
        } else {
          on_completion(static_cast<unsigned>(tag - 1), res);
        }
      }
    }
  }

  void fail_all(int err) {
    for (unsigned i = 0; i < depth_; ++i) {
      bool busy = true;
      for (unsigned f : free_slots_) busy = busy && f != i;
      if (busy) finish(i, err);
    }
    in_flight_ = 0;
  }

  const uint64_t block_size_;
  const unsigned depth_;
  io_uring ring_{};
  int wake_fd_ = -1;
  uint64_t wake_value_ = 0;
  std::vector<Slot> slots_;
  std::vector<unsigned> free_slots_;  // touched only by the loop thread
  unsigned in_flight_ = 0;
  AlignedBuffer bounce_;
  bool registered_ = false;
  std::mutex mu_;
  std::deque<Piece*> pending_;
  bool stop_ = false;
  std::thread loop_;
};

}  // namespace

std::unique_ptr<Backend> make_uring_backend(const EngineOptions& options) {
  const auto [ok, why] = uring_available();
  if (!ok) throw std::runtime_error("io_uring backend requested but unavailable: " + why);
  return std::make_unique<UringBackend>(options);
}

#endif  // ZEROCORE_HAVE_URING

}  // namespace zerocore::io
