// Argument checks shared by the CPU (pack_op.cpp) and CUDA (cuda_pack.cu) kernels of zerocore::pack / unpack,
// so both devices reject the same bad input with the same message. Header-only torch glue.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace zerocore {
namespace pack_checks {

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_flat(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.defined(), op, ": ", what, " is undefined");
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", what, " has dtype ", t.scalar_type(),
              "; supported are float32, bfloat16 and float16: cast it first (.float())");
  TORCH_CHECK(t.dim() == 1, op, ": ", what, " must be a flat 1-D tensor, got shape ", t.sizes(),
              ": pass t.view(-1)");
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous: pass .contiguous()");
}

inline void check_member(const at::Tensor& t, const at::Tensor& flat, const char* op, const char* list,
                         std::size_t i) {
  TORCH_CHECK(t.defined(), op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
              "; supported are float32, bfloat16 and float16: cast it first (.float())");
  TORCH_CHECK(t.is_contiguous(), op, ": ", list, "[", i, "] (shape ", t.sizes(), ", strides ", t.strides(),
              ") is not contiguous: pass .contiguous() (and copy back for unpack)");
  TORCH_CHECK(t.device() == flat.device(), op, ": ", list, "[", i, "] is on ", t.device(),
              " but the flat tensor is on ", flat.device(), ": every tensor must be on one device (.to(",
              flat.device(), "))");
}

inline void check_range(std::int64_t offset, std::int64_t numel, std::int64_t flat_numel, const char* op,
                        const char* list, std::size_t i) {
  TORCH_CHECK(offset >= 0 && offset <= flat_numel && numel <= flat_numel - offset, op, ": ", list, "[", i,
              "] needs elements [", offset, ", ", offset + numel, ") of the flat tensor, which has ", flat_numel,
              ": fix offsets[", i, "] or make the flat tensor larger");
}

// Byte ranges [begin, end) of memory; two non-empty ranges that share a byte overlap.
using ByteRange = std::pair<std::uintptr_t, std::uintptr_t>;

inline ByteRange bytes_of(const void* ptr, std::int64_t numel, std::size_t element_size) {
  const auto begin = reinterpret_cast<std::uintptr_t>(ptr);
  return {begin, begin + static_cast<std::uintptr_t>(numel) * element_size};
}

inline bool overlap(const ByteRange& a, const ByteRange& b) {
  return a.first < b.second && b.first < a.second;
}

// Threads (or CUDA blocks) write the destinations in parallel, so no two may share memory. `ranges` holds
// (byte range, list index) of every non-empty destination.
inline void check_disjoint(std::vector<std::pair<ByteRange, std::size_t>> ranges, const char* op,
                           const char* what) {
  std::sort(ranges.begin(), ranges.end());
  for (std::size_t k = 1; k < ranges.size(); ++k) {
    TORCH_CHECK(!overlap(ranges[k - 1].first, ranges[k].first), op, ": the destinations of ", what, "[",
                ranges[k - 1].second, "] and ", what, "[", ranges[k].second,
                "] overlap in memory; they are written in parallel, so give each its own range");
  }
}

// A source may alias its own destination exactly (in place: same address and dtype, e.g. a gradient that is
// already a view of its bucket slot); any other overlap between a list member and the flat tensor is a race
// with the parallel writes. Called only when the member's memory overlaps the flat tensor.
inline void check_exact_alias(const void* member_ptr, at::ScalarType member_type, const void* slot_ptr,
                              at::ScalarType flat_type, const char* op, const char* list, std::size_t i) {
  TORCH_CHECK(member_ptr == slot_ptr && member_type == flat_type, op, ": ", list, "[", i,
              "] shares memory with the flat tensor but is not exactly its own slot (only an in-place alias with "
              "the same dtype is allowed): clone it first");
}

// Validates pack(srcs, dst, offsets, ...): returns nothing, throws with a fix on bad input.
inline void check_pack(at::TensorList srcs, const at::Tensor& dst, at::IntArrayRef offsets) {
  const char* op = "zerocore::pack";
  check_flat(dst, op, "dst");
  TORCH_CHECK(offsets.size() == srcs.size(), op, ": got ", srcs.size(), " srcs but ", offsets.size(),
              " offsets: pass one offset per source");
  const std::size_t dst_size = dst.element_size();
  const ByteRange whole_dst = bytes_of(dst.data_ptr(), dst.numel(), dst_size);
  std::vector<std::pair<ByteRange, std::size_t>> written;
  for (std::size_t i = 0; i < srcs.size(); ++i) {
    check_member(srcs[i], dst, op, "srcs", i);
    check_range(offsets[i], srcs[i].numel(), dst.numel(), op, "srcs", i);
    if (srcs[i].numel() == 0) continue;
    const void* slot = static_cast<const char*>(dst.data_ptr()) + offsets[i] * dst_size;
    written.push_back({bytes_of(slot, srcs[i].numel(), dst_size), i});
    const ByteRange read = bytes_of(srcs[i].data_ptr(), srcs[i].numel(), srcs[i].element_size());
    if (overlap(read, whole_dst)) check_exact_alias(srcs[i].data_ptr(), srcs[i].scalar_type(), slot,
                                                    dst.scalar_type(), op, "srcs", i);
  }
  check_disjoint(std::move(written), op, "srcs");
}

inline void check_unpack(const at::Tensor& src, at::TensorList dsts, at::IntArrayRef offsets) {
  const char* op = "zerocore::unpack";
  check_flat(src, op, "src");
  TORCH_CHECK(offsets.size() == dsts.size(), op, ": got ", dsts.size(), " dsts but ", offsets.size(),
              " offsets: pass one offset per destination");
  const std::size_t src_size = src.element_size();
  const ByteRange whole_src = bytes_of(src.data_ptr(), src.numel(), src_size);
  std::vector<std::pair<ByteRange, std::size_t>> written;
  for (std::size_t i = 0; i < dsts.size(); ++i) {
    check_member(dsts[i], src, op, "dsts", i);
    check_range(offsets[i], dsts[i].numel(), src.numel(), op, "dsts", i);
    if (dsts[i].numel() == 0) continue;
    written.push_back({bytes_of(dsts[i].data_ptr(), dsts[i].numel(), dsts[i].element_size()), i});
    const void* slot = static_cast<const char*>(src.data_ptr()) + offsets[i] * src_size;
    if (overlap(written.back().first, whole_src)) check_exact_alias(dsts[i].data_ptr(), dsts[i].scalar_type(),
                                                                    slot, src.scalar_type(), op, "dsts", i);
  }
  check_disjoint(std::move(written), op, "dsts");
}

}  // namespace pack_checks
}  // namespace zerocore
