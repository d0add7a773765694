// zerocore::ownership: who else uses a tensor's memory, for zerocore.ops.buckets.is_sole_owner.
//
// Stage 2's direct reduction (zerocore/zero/reductions.py) sums autograd's gradient tensor in place and then
// frees its memory. Autograd may hand a parameter a gradient that is a view of another node's gradient (a
// parameter that reaches the loss through view/reshape/narrow), which other backward nodes still read; a hook
// registered before ours may keep the very same tensor; a custom backward may return memory torch does not own
// (from_numpy, from_blob). Python cannot see reference counts, so this reports them from c10.
#include <torch/library.h>

#include <ATen/ATen.h>

namespace zerocore {
namespace {

// [references to this tensor object, references to its storage, 1 if the tensor is contiguous and covers all
// of a resizable storage (memory torch allocated and may free) else 0]. The first count includes the
// references the op call itself holds, so callers compare it with the count of a fresh tensor.
std::vector<int64_t> ownership(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return {0, 0, 0};
  const c10::Storage& storage = t.storage();
  const bool whole = t.is_contiguous() && t.storage_offset() == 0 && storage.nbytes() == t.nbytes() &&
                     storage.resizable();
  return {static_cast<int64_t>(c10::raw::intrusive_ptr::use_count(t.unsafeGetTensorImpl())),
          static_cast<int64_t>(storage.use_count()), whole ? 1 : 0};
}

}  // namespace
}  // namespace zerocore

TORCH_LIBRARY_FRAGMENT(zerocore, m) {
  // A catch-all kernel: the answer does not depend on the device.
  m.def("ownership(Tensor t) -> int[]", &zerocore::ownership);
}
