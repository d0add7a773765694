// pybind11 glue for the I/O engine: the only file of the aio library that sees torch. It turns tensors into
// (pointer, byte count) requests, releases the GIL while the engine works, and wraps aligned (optionally
// page-locked) host memory in tensors that free it when their storage dies.
#include <dlfcn.h>
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

#include "aio_engine.h"
#include "aligned_buffer.h"
#include "crc32c.h"
#include "zc_check.h"

namespace py = pybind11;
using namespace zerocore::io;

namespace {

// cudaHostRegister / cudaHostUnregister from the CUDA runtime torch already loaded: found with dlsym, so this
// CPU library never links CUDA and loads on machines without it.
using HostRegisterFn = int (*)(void*, size_t, unsigned int);
using HostUnregisterFn = int (*)(void*);

void* cuda_runtime_symbol(const char* name) {
  if (void* sym = dlsym(RTLD_DEFAULT, name)) return sym;
  for (const char* lib : {"libcudart.so.13", "libcudart.so.12", "libcudart.so"}) {
    if (void* handle = dlopen(lib, RTLD_LAZY | RTLD_NOLOAD)) {
      if (void* sym = dlsym(handle, name)) return sym;
    }
  }
  return nullptr;
}

constexpr unsigned kCudaHostRegisterPortable = 1;  // pinned for every CUDA context, not just the current one

at::Tensor aligned_bytes(int64_t nbytes, bool pin) {
  ZC_CHECK(nbytes >= 0, "nbytes must be >= 0, got ", nbytes);
  void* ptr = alloc_aligned(static_cast<size_t>(nbytes), page_size());
  HostUnregisterFn unregister = nullptr;
  if (pin && nbytes > 0) {
    auto reg = reinterpret_cast<HostRegisterFn>(cuda_runtime_symbol("cudaHostRegister"));
    unregister = reinterpret_cast<HostUnregisterFn>(cuda_runtime_symbol("cudaHostUnregister"));
    if (!reg || !unregister) {
      free_aligned(ptr);
      ZC_CHECK(false, "pin=True needs the CUDA runtime (libcudart) that a CUDA build of torch loads; none is "
                      "loaded in this process: use pin=False or a CUDA build of torch");
    }
    const size_t registered = static_cast<size_t>(round_up(static_cast<uint64_t>(nbytes), page_size()));
    const int err = reg(ptr, registered, kCudaHostRegisterPortable);
    if (err != 0) {
      free_aligned(ptr);
      ZC_CHECK(false, "cudaHostRegister of ", nbytes, " bytes failed with cudaError ", err,
               " (page-locked memory is limited by host RAM and RLIMIT_MEMLOCK): use smaller buffers or pin=False");
    }
  }
  auto deleter = [unregister](void* p) {
    if (unregister) unregister(p);  // an error here cannot be reported from a deleter; the memory is freed anyway
    free_aligned(p);
  };
  return torch::from_blob(ptr, {nbytes}, deleter, torch::TensorOptions().dtype(torch::kUInt8));
}

void check_tensor(const at::Tensor& t, const std::string& path) {
  TORCH_CHECK(t.device().is_cpu(), "zerocore.io: tensor for '", path, "' is on ", t.device(),
              "; file I/O needs a CPU tensor (copy it to a pinned host buffer first)");
  TORCH_CHECK(t.is_contiguous(), "zerocore.io: tensor for '", path,
              "' is not contiguous; call .contiguous() first");
}

// A Python-side request: (op "read"/"write", tensor, path, offset, checksum).
using PyRequest = std::tuple<std::string, at::Tensor, std::string, int64_t, bool>;

Handle submit(Engine& engine, const std::vector<PyRequest>& py_requests) {
  std::vector<Request> requests;
  requests.reserve(py_requests.size());
  for (const auto& [op, tensor, path, offset, checksum] : py_requests) {
    TORCH_CHECK(op == "read" || op == "write", "zerocore.io: op must be 'read' or 'write', got '", op, "'");
    TORCH_CHECK(offset >= 0, "zerocore.io: offset for '", path, "' must be >= 0, got ", offset);
    check_tensor(tensor, path);
    Request r;
    r.op = op == "read" ? Op::kRead : Op::kWrite;
    r.buffer = tensor.numel() ? tensor.data_ptr() : nullptr;
    r.nbytes = static_cast<uint64_t>(tensor.numel()) * tensor.element_size();
    r.path = path;
    r.offset = static_cast<uint64_t>(offset);
    r.checksum = checksum;
    requests.push_back(std::move(r));
  }
  py::gil_scoped_release no_gil;  // opening files and reading checksum sidecars may block
  return engine.submit(std::move(requests));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zerocore async file I/O engine (io_uring or thread pool), aligned pinned host buffers, crc32c";

  m.def("backend_info", [](const std::string& requested) {
          const BackendChoice c = choose_backend(requested);
          return std::make_pair(c.name, c.reason);
        },
        py::arg("requested") = "",
        "(backend name, reason) that an engine created with backend=`requested` would use; raises when forced "
        "to an unavailable backend");
  m.def("uring_available", &uring_available, "(usable, reason) for io_uring in this process");
  m.def("aligned_bytes", &aligned_bytes, py::arg("nbytes"), py::arg("pin"),
        "page-aligned uint8 CPU tensor of nbytes; pin page-locks it with cudaHostRegister (CUDA must be usable)");
  m.def("page_size", &page_size);
  m.def("crc32c",
        [](const at::Tensor& t, uint32_t crc, bool software) {
          check_tensor(t, "<crc32c>");
          const size_t n = static_cast<size_t>(t.numel()) * t.element_size();
          const void* p = n ? t.data_ptr() : nullptr;
          return software ? crc32c_software(crc, p, n) : crc32c(crc, p, n);
        },
        py::arg("tensor"), py::arg("crc") = 0, py::arg("software") = false,
        "CRC-32C of a contiguous CPU tensor's bytes (hardware path when the CPU has SSE4.2)");
  m.def("crc32c_hardware_available", &crc32c_hardware_available);

  py::class_<Handle>(m, "Handle")
      .def("wait",
           [](Handle& h) {
             Status s;
             {
               py::gil_scoped_release no_gil;
               s = h.wait();
             }
             return py::make_tuple(static_cast<int>(s.kind), s.err, s.path, s.offset, s.message);
           },
           "blocks (GIL released) until done; returns (kind, errno, path, offset, message), kind 0 when ok")
      .def("done", &Handle::done)
      .def("used_direct", &Handle::used_direct)
      .def("notes", &Handle::notes);

  py::class_<Engine>(m, "Engine")
      .def(py::init([](uint64_t block_size, int queue_depth, int threads, const std::string& backend, bool direct) {
             EngineOptions o;
             o.block_size = block_size;
             o.queue_depth = queue_depth;
             o.threads = threads;
             o.backend = backend;
             o.direct = direct;
             return std::make_unique<Engine>(o);
           }),
           py::arg("block_size"), py::arg("queue_depth"), py::arg("threads"), py::arg("backend"), py::arg("direct"))
      .def("submit", &submit, py::arg("requests"))
      .def_property_readonly("backend", &Engine::backend_name)
      .def_property_readonly("backend_reason", &Engine::backend_reason);
}
