// The portable backend: worker threads running blocking pread/pwrite, one block each, so `threads` blocks are in
// flight. Works wherever files work (no io_uring, seccomp-restricted containers, old kernels).
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "aio_engine.h"
#include "aligned_buffer.h"

namespace zerocore::io {
namespace {

class ThreadPoolBackend final : public Backend {
 public:
  ThreadPoolBackend(const EngineOptions& options, int threads) : block_size_(options.block_size) {
    workers_.reserve(static_cast<size_t>(threads));
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { run(); });
  }

  ~ThreadPoolBackend() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();  // workers drain the queue before they see stop_
  }

  void enqueue(const std::vector<Piece*>& pieces) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.insert(queue_.end(), pieces.begin(), pieces.end());
    }
    if (pieces.size() == 1) cv_.notify_one(); else cv_.notify_all();
  }

 private:
  void run() {
    AlignedBuffer bounce;  // allocated on first use: aligned callers never need it
    for (;;) {
      Piece* piece = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        piece = queue_.front();
        queue_.pop_front();
      }
      if (piece_cancelled(*piece)) {
        complete_piece(*piece, ECANCELED, 0);
        continue;
      }
      if (piece->bounce && bounce.size() == 0) bounce = AlignedBuffer(block_size_, page_size());
      uint64_t transferred = 0;
      const int err = run_piece_blocking(*piece, bounce.data(), &transferred);
      complete_piece(*piece, err, transferred);
    }
  }

  const uint64_t block_size_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Piece*> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<Backend> make_thread_pool_backend(const EngineOptions& options, int threads) {
  return std::make_unique<ThreadPoolBackend>(options, threads);
}

}  // namespace zerocore::io
