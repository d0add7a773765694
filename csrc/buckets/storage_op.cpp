// zerocore::is_sole_owner: whether a tensor is the only user of all of its storage.
//
// Stage 2's direct reduction (zerocore/zero/grad_reducer.py) sums autograd's gradient tensor in place. Autograd
// may hand a parameter a gradient that is a view of another node's gradient (a parameter that reaches the loss
// through view/reshape/narrow), which other backward nodes still read; writing into it would corrupt their
// results. Python cannot see storage reference counts, so this asks c10 directly.
#include <torch/library.h>

#include <ATen/ATen.h>

namespace zerocore {
namespace {

bool is_sole_owner(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage() || !t.is_contiguous() || t.storage_offset() != 0) return false;
  const c10::Storage& storage = t.storage();
  // One reference: this tensor's own. Other tensors (views included) and Python storage objects add one each.
  return storage.use_count() == 1 && storage.nbytes() == t.nbytes();
}

}  // namespace
}  // namespace zerocore

TORCH_LIBRARY_FRAGMENT(zerocore, m) {
  // A catch-all kernel: the answer does not depend on the device.
  m.def("is_sole_owner(Tensor t) -> bool", &zerocore::is_sole_owner);
}
