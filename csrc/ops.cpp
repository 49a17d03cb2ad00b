// Every opdx op schema, defined once. CPU and CUDA implementations live in csrc/cpu and csrc/cuda; autograd and
// fake (meta) kernels are registered from Python (opdx/ops/), so the ops also work under torch.compile.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing opdx._C from Python runs the static registrations below; it needs no Python symbols of its own.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(opdx, m) {
  // Fused log-softmax gather: log p(targets | logits / T) and optionally the entropy, saving only the row lse.
  // logits [..., V]; targets [N] (N = number of rows). Returns (logp [N], lse [N], entropy [N] or [0]).
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor targets, float inv_temperature, int ignore_index, "
      "bool compute_entropy, bool inplace_backward) -> (Tensor, Tensor, Tensor)");
  m.def(
      "token_logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor targets, Tensor lse, "
      "Tensor? entropy, float inv_temperature, int ignore_index) -> Tensor");
  m.def(
      "token_logprobs_bwd_inplace(Tensor grad_logp, Tensor? grad_entropy, Tensor(a!) logits, Tensor targets, "
      "Tensor lse, Tensor? entropy, float inv_temperature, int ignore_index) -> ()");

  // Generalized JSD(beta) between softmax(student / T) and softmax(teacher / T), row by row (see DESIGN.md).
  // student, teacher [..., V] (same shape and dtype); mask [N] bool (False rows give 0 loss and 0 gradient) or None.
  // Returns (loss [N] fp32 (fp64 for fp64 inputs), grad): grad is d loss_r / d student, contiguous, shaped like
  // student, in the student dtype (fp32 when grad_fp32), or an empty [0] tensor when compute_grad is False.
  m.def(
      "generalized_jsd_fwd(Tensor student, Tensor teacher, Tensor? mask, float beta, float inv_temperature, "
      "bool compute_grad, bool grad_fp32) -> (Tensor, Tensor)");
}
