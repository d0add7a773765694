// Tests of the I/O engine without Python: round trips of random data at awkward sizes and offsets through both
// backends, aligned and unaligned memory, O_DIRECT and buffered; errors (short file, missing file, file size
// limit, checksum mismatch, symlinks refused, failed writes cleaned up); crc32c against published vectors;
// concurrent submitters (for TSan).
#include <fcntl.h>
#include <ftw.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "io/aio_engine.h"
#include "io/aligned_buffer.h"
#include "io/crc32c.h"

using namespace zerocore::io;

namespace {

int remove_entry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }

// A scratch directory for the whole run, removed with everything in it at exit.
struct ScratchDir {
  std::string path;
  ScratchDir() {
    char tmpl[] = "/tmp/zc_test_aio_XXXXXX";
    if (!mkdtemp(tmpl)) std::abort();
    path = tmpl;
  }
  ~ScratchDir() { nftw(path.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS); }
};

const std::string& temp_dir() {
  static ScratchDir dir;
  return dir.path;
}

std::vector<char> random_bytes(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::vector<char> out(n);
  for (auto& c : out) c = static_cast<char>(gen() & 0xFF);
  return out;
}

std::vector<std::string> backends() {
  std::vector<std::string> names{"threads"};
  if (uring_available().first) names.push_back("io_uring");
  return names;
}

EngineOptions opts(const std::string& backend, bool direct = true) {
  EngineOptions o;
  o.backend = backend;
  o.block_size = 64 * 1024;  // small blocks so modest sizes span many blocks
  o.queue_depth = 8;
  o.direct = direct;
  return o;
}

Status write_read(Engine& e, const std::string& path, const char* src, char* dst, uint64_t n, uint64_t offset) {
  Status s = e.submit({Request{Op::kWrite, const_cast<char*>(src), n, path, offset, false}}).wait();
  if (!s.ok()) return s;
  return e.submit({Request{Op::kRead, dst, n, path, offset, false}}).wait();
}

bool exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

// The whole file ("<missing>" when it cannot be opened).
std::string slurp(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return "<missing>";
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  std::fclose(f);
  return out;
}

void spit(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) std::abort();
  if (std::fclose(f) != 0) std::abort();
}

bool refused_symlink(const Status& s, const std::string& link) {
  if (s.kind == ErrorKind::kSymlink && s.err == ELOOP &&
      s.message.find("'" + link + "' is a symlink") != std::string::npos &&
      s.message.find("refuses symlinks") != std::string::npos)
    return true;
  std::fprintf(stderr, "expected a symlink refusal for '%s', got kind %d errno %d: %s\n", link.c_str(),
               static_cast<int>(s.kind), s.err, s.message.c_str());
  return false;
}

}  // namespace

ZC_TEST(crc32c_matches_published_vectors) {
  const char* digits = "123456789";
  CHECK(crc32c_software(0, digits, 9) == 0xE3069283u);
  std::vector<unsigned char> zeros(32, 0), ones(32, 0xFF), inc(32);
  for (int i = 0; i < 32; ++i) inc[i] = static_cast<unsigned char>(i);
  CHECK(crc32c_software(0, zeros.data(), 32) == 0x8A9136AAu);  // RFC 3720 B.4
  CHECK(crc32c_software(0, ones.data(), 32) == 0x62A8AB43u);
  CHECK(crc32c_software(0, inc.data(), 32) == 0x46DD794Eu);
  if (crc32c_hardware_available()) {
    CHECK(crc32c_hardware(0, digits, 9) == 0xE3069283u);
    CHECK(crc32c_hardware(0, inc.data(), 32) == 0x46DD794Eu);
  }
  const auto data = random_bytes(100003, 7);
  const uint32_t whole = crc32c_software(0, data.data(), data.size());
  CHECK(crc32c(0, data.data(), data.size()) == whole);
  CHECK(crc32c(crc32c(0, data.data(), 1000), data.data() + 1000, data.size() - 1000) == whole);
  for (size_t start = 0; start < 9; ++start)  // every misalignment of the 8-byte loop
    CHECK(crc32c(0, data.data() + start, 77) == crc32c_software(0, data.data() + start, 77));
}

ZC_TEST(aligned_alloc_is_page_aligned) {
  for (size_t n : {size_t{0}, size_t{1}, size_t{4097}, size_t{1} << 20}) {
    AlignedBuffer b(n, page_size());
    CHECK(is_aligned(b.data(), page_size()));
    std::memset(b.data(), 1, n);
  }
  AlignedBuffer big((3u << 20) + 5, page_size());  // large buffers start on a huge-page boundary
  CHECK(is_aligned(big.data(), 2u << 20));
  std::memset(big.data(), 2, big.size());
  CHECK_THROWS(alloc_aligned(10, 3), "power of two");
}

ZC_TEST(round_trips_at_awkward_sizes_and_offsets) {
  const std::vector<uint64_t> sizes{0, 1, 511, 4095, 4096, (1u << 20) + 1, 200000};
  const std::vector<uint64_t> offsets{0, 1, 4096, 12345};
  for (const auto& backend : backends()) {
    for (bool direct : {true, false}) {
      Engine e(opts(backend, direct));
      for (uint64_t n : sizes) {
        for (uint64_t off : offsets) {
          for (int misalign : {0, 1}) {
            const auto src = random_bytes(n + 1, static_cast<unsigned>(n + off + misalign));
            AlignedBuffer dst_block(n + 1, page_size());
            char* dst = dst_block.data() + misalign;
            const std::string path = temp_dir() + "/rt_" + backend + std::to_string(direct);
            const Status s = write_read(e, path, src.data() + misalign, dst, n, off);
            CHECK(s.ok());
            if (!s.ok()) std::fprintf(stderr, "%s\n", s.message.c_str());
            CHECK(std::memcmp(dst, src.data() + misalign, n) == 0);
          }
        }
      }
    }
  }
}

ZC_TEST(many_requests_in_one_handle) {
  for (const auto& backend : backends()) {
    Engine e(opts(backend));
    const uint64_t n = 300000;
    const auto src = random_bytes(n * 6, 11);
    std::vector<char> dst(n * 6);
    std::vector<Request> writes, reads;
    for (int i = 0; i < 6; ++i) {
      // three pieces in one big file at offsets, three in separate files
      const std::string path = temp_dir() + "/many_" + backend + (i < 3 ? std::string("_big") : std::to_string(i));
      const uint64_t off = i < 3 ? uint64_t(i) * n : 0;
      writes.push_back({Op::kWrite, const_cast<char*>(src.data() + i * n), n, path, off, true});
      reads.push_back({Op::kRead, dst.data() + i * n, n, path, off, true});
    }
    Handle w = e.submit(writes);
    CHECK(w.wait().ok());
    CHECK(w.done());
    const Status s = e.submit(reads).wait();
    CHECK(s.ok());
    if (!s.ok()) std::fprintf(stderr, "%s\n", s.message.c_str());
    CHECK(dst == src);
  }
}

ZC_TEST(short_file_and_missing_file_fail_with_errno) {
  for (const auto& backend : backends()) {
    Engine e(opts(backend));
    const std::string path = temp_dir() + "/short_" + backend;
    const auto src = random_bytes(10000, 3);
    CHECK(e.submit({{Op::kWrite, const_cast<char*>(src.data()), 10000, path, 0, false}}).wait().ok());
    std::vector<char> dst(200000, 0);
    Status s = e.submit({{Op::kRead, dst.data(), 200000, path, 0, false}}).wait();
    CHECK(s.kind == ErrorKind::kShortFile);
    CHECK(s.err == ENODATA);
    CHECK(s.offset == 10000);
    CHECK(s.message.find(path) != std::string::npos);
    s = e.submit({{Op::kRead, dst.data(), 10, temp_dir() + "/does_not_exist", 0, false}}).wait();
    CHECK(s.kind == ErrorKind::kOs && s.err == ENOENT);
    CHECK(s.message.find("does_not_exist") != std::string::npos);
  }
}

ZC_TEST(flipped_byte_fails_checksum_and_names_the_extent) {
  for (const auto& backend : backends()) {
    Engine e(opts(backend));
    const std::string path = temp_dir() + "/crc_" + backend;
    const uint64_t n = 300000;  // 5 extents of 64 KiB
    const auto src = random_bytes(n, 5);
    CHECK(e.submit({{Op::kWrite, const_cast<char*>(src.data()), n, path, 0, true}}).wait().ok());
    std::vector<char> dst(n);
    CHECK(e.submit({{Op::kRead, dst.data(), n, path, 0, true}}).wait().ok());
    const int fd = ::open(path.c_str(), O_RDWR);
    CHECK(fd >= 0);
    char byte = 0;
    CHECK(::pread(fd, &byte, 1, 200000) == 1);
    byte = static_cast<char>(byte ^ 0x10);
    CHECK(::pwrite(fd, &byte, 1, 200000) == 1);
    ::close(fd);
    const Status s = e.submit({{Op::kRead, dst.data(), n, path, 0, true}}).wait();
    CHECK(s.kind == ErrorKind::kChecksum && s.err == EBADMSG);
    CHECK(s.message.find("extent 3") != std::string::npos);  // 200000 / 65536 == 3
    // A verified read needs a record of exactly that range.
    const Status missing = e.submit({{Op::kRead, dst.data(), 100, path, 0, true}}).wait();
    CHECK(missing.kind == ErrorKind::kChecksum && missing.err == ENOENT);
  }
}

ZC_TEST(symlinked_data_file_and_sidecar_are_refused) {
  const std::string victim = temp_dir() + "/victim", original = "precious bytes the link points at";
  const auto src = random_bytes(100000, 21);
  std::vector<char> dst(src.size());
  for (const auto& backend : backends()) {
    for (bool direct : {true, false}) {
      Engine e(opts(backend, direct));
      const std::string tag = backend + std::to_string(direct);
      spit(victim, original);
      const std::string link = temp_dir() + "/link_" + tag;
      CHECK(::symlink(victim.c_str(), link.c_str()) == 0);
      for (bool checksum : {false, true}) {
        CHECK(refused_symlink(
            e.submit({{Op::kWrite, const_cast<char*>(src.data()), src.size(), link, 4096, checksum}}).wait(), link));
        CHECK(refused_symlink(e.submit({{Op::kRead, dst.data(), 10, link, 0, checksum}}).wait(), link));
      }
      CHECK(!exists(link + ".crc32c") && !exists(victim + ".crc32c"));
      // A dangling link must not create its target either.
      const std::string dangling = temp_dir() + "/dangling_" + tag, nowhere = temp_dir() + "/nowhere_" + tag;
      CHECK(::symlink(nowhere.c_str(), dangling.c_str()) == 0);
      CHECK(refused_symlink(
          e.submit({{Op::kWrite, const_cast<char*>(src.data()), src.size(), dangling, 0, false}}).wait(), dangling));
      CHECK(!exists(nowhere));
      // A symlinked sidecar: the checksummed write fails, removes the data file it created, and the target of the
      // link keeps its bytes; a verified read refuses it as well.
      const std::string data = temp_dir() + "/sc_" + tag, sidecar = data + ".crc32c";
      CHECK(::symlink(victim.c_str(), sidecar.c_str()) == 0);
      const Status w = e.submit({{Op::kWrite, const_cast<char*>(src.data()), src.size(), data, 0, true}}).wait();
      CHECK(refused_symlink(w, sidecar));
      CHECK(w.message.find("removed '" + data + "'") != std::string::npos);
      CHECK(!exists(data));
      spit(data, std::string(src.begin(), src.end()));
      CHECK(refused_symlink(e.submit({{Op::kRead, dst.data(), src.size(), data, 0, true}}).wait(), sidecar));
      CHECK(slurp(victim) == original);
    }
  }
}

ZC_TEST(file_size_limit_fails_the_write_with_efbig) {
  struct rlimit old_limit;
  CHECK(getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
  std::signal(SIGXFSZ, SIG_IGN);  // then the kernel reports EFBIG instead of killing the process
  for (const auto& backend : backends()) {
    Engine e(opts(backend));
    const auto src = random_bytes(1 << 20, 9);
    struct rlimit small = old_limit;
    small.rlim_cur = 256 * 1024;
    CHECK(setrlimit(RLIMIT_FSIZE, &small) == 0);
    const std::string fresh = temp_dir() + "/big_" + backend, old = temp_dir() + "/big_old_" + backend;
    CHECK(e.submit({{Op::kWrite, const_cast<char*>(src.data()), 4096, old, 0, true}}).wait().ok());
    const Status s = e.submit({{Op::kWrite, const_cast<char*>(src.data()), 1 << 20, fresh, 0, false}}).wait();
    const Status s_old = e.submit({{Op::kWrite, const_cast<char*>(src.data()), 1 << 20, old, 0, true}}).wait();
    CHECK(setrlimit(RLIMIT_FSIZE, &old_limit) == 0);
    CHECK(s.kind == ErrorKind::kOs && s.err == EFBIG);
    CHECK(s.offset >= 256 * 1024 && s.offset < (1 << 20));
    // The failed write created `fresh`, so it is gone; `old` stays, but no record vouches for its bytes any more.
    CHECK(s.message.find("removed '" + fresh + "'") != std::string::npos && !exists(fresh));
    CHECK(s_old.kind == ErrorKind::kOs && s_old.err == EFBIG && exists(old));
    CHECK(s_old.message.find("no checksum record vouches for bytes [0, 1048576)") != std::string::npos);
    CHECK(s_old.message.find("removed") == std::string::npos);
    std::vector<char> dst(4096);
    const Status r = e.submit({{Op::kRead, dst.data(), 4096, old, 0, true}}).wait();
    CHECK(r.kind == ErrorKind::kChecksum && r.err == ENOENT);
  }
}

ZC_TEST(concurrent_submitters_share_one_engine) {
  for (const auto& backend : backends()) {
    Engine e(opts(backend));
    std::vector<std::thread> threads;
    std::vector<int> ok(4, 0);
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        const auto src = random_bytes(150000 + t, 100 + t);
        std::vector<char> dst(src.size());
        const std::string path = temp_dir() + "/conc_" + backend + std::to_string(t);
        bool good = true;
        for (int round = 0; round < 5; ++round) {
          std::fill(dst.begin(), dst.end(), 0);
          const Status s = write_read(e, path, src.data(), dst.data(), src.size(), round * 777);
          if (!s.ok()) std::fprintf(stderr, "thread %d round %d: %s\n", t, round, s.message.c_str());
          if (s.ok() && dst != src) {
            size_t first = 0;
            while (dst[first] == src[first]) ++first;
            std::fprintf(stderr, "thread %d round %d: data differs from byte %zu\n", t, round, first);
          }
          good = good && s.ok() && dst == src;
        }
        ok[t] = good;
      });
    }
    for (auto& th : threads) th.join();
    for (int v : ok) CHECK(v == 1);
  }
}

ZC_TEST(backend_choice_is_explicit) {
  CHECK_THROWS(choose_backend("bogus"), "unknown I/O backend");
  CHECK(choose_backend("threads").name == "threads");
  const auto [ok, why] = uring_available();
  CHECK(!why.empty());
  if (ok) {
    CHECK(choose_backend("io_uring").name == "io_uring");
    CHECK(choose_backend("auto").name == "io_uring");
  } else {
    CHECK_THROWS(choose_backend("io_uring"), "unavailable");
  }
  EngineOptions bad;
  bad.block_size = 1000;
  CHECK_THROWS(Engine{bad}, "block_size");
}

ZC_TEST_MAIN()
