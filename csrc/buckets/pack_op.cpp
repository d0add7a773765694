// Torch glue of the bucket ops: defines the schemas of zerocore::pack / zerocore::unpack (the CUDA library adds
// its kernels to them) and registers the CPU kernels, which validate and then hand raw pointers to
// pack_kernels.cpp. Semantics and schemas are documented in zerocore/ops/buckets.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "pack_checks.h"
#include "pack_kernels.h"
#include "cpu_features.h"

namespace zerocore {
namespace {

FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kHalf: return FloatType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, "zerocore bucket ops: unsupported dtype ", t);  // the checks reject it first
}

void run(const std::vector<CopySegment>& segments, double scale, bool accumulate) {
  // at::get_num_threads() honours torch.set_num_threads (our OpenMP runtime may not be torch's).
  convert_segments(segments, static_cast<float>(scale), accumulate, at::get_num_threads(), selected_simd());
}

void pack_cpu(at::TensorList srcs, const at::Tensor& dst, at::IntArrayRef offsets, double scale, bool accumulate) {
  pack_checks::check_pack(srcs, dst, offsets);
  TORCH_CHECK(dst.device().is_cpu(), "zerocore::pack (CPU kernel) got dst on ", dst.device());
  std::vector<CopySegment> segments;
  segments.reserve(srcs.size());
  char* base = static_cast<char*>(dst.data_ptr());
  for (std::size_t i = 0; i < srcs.size(); ++i) {
    if (srcs[i].numel() == 0) continue;
    segments.push_back({srcs[i].data_ptr(), float_type(srcs[i].scalar_type()),
                        base + offsets[i] * dst.element_size(), float_type(dst.scalar_type()), srcs[i].numel()});
  }
  run(segments, scale, accumulate);
}

void unpack_cpu(const at::Tensor& src, at::TensorList dsts, at::IntArrayRef offsets, double scale) {
  pack_checks::check_unpack(src, dsts, offsets);
  TORCH_CHECK(src.device().is_cpu(), "zerocore::unpack (CPU kernel) got src on ", src.device());
  std::vector<CopySegment> segments;
  segments.reserve(dsts.size());
  const char* base = static_cast<const char*>(src.data_ptr());
  for (std::size_t i = 0; i < dsts.size(); ++i) {
    if (dsts[i].numel() == 0) continue;
    segments.push_back({base + offsets[i] * src.element_size(), float_type(src.scalar_type()), dsts[i].data_ptr(),
                        float_type(dsts[i].scalar_type()), dsts[i].numel()});
  }
  run(segments, scale, /*accumulate=*/false);
}

}  // namespace
}  // namespace zerocore

TORCH_LIBRARY_FRAGMENT(zerocore, m) {
  m.def("pack(Tensor[] srcs, Tensor(a!) dst, int[] offsets, float scale, bool accumulate) -> ()");
  m.def("unpack(Tensor src, Tensor(a!)[] dsts, int[] offsets, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(zerocore, CPU, m) {
  m.impl("pack", &zerocore::pack_cpu);
  m.impl("unpack", &zerocore::unpack_cpu);
}
