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

  // Fused lm_head + log-softmax gather: log softmax((hidden·weightᵀ + bias) / T)[targets] without forming [N, V]
  // (the vocabulary is swept in tiles of `tile` weight rows; tile <= 0 picks one). hidden [N, d], weight [V, d]
  // (contiguous, same dtype), bias [V] or None, targets [N] int64. Returns (logp [N], lse [N]) in fp32 (fp64 for fp64).
  m.def(
      "linear_token_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float inv_temperature, "
      "int ignore_index, int tile) -> (Tensor, Tensor)");
  // Recomputes the logits tile by tile from the saved lse. Returns (grad_hidden, grad_weight, grad_bias or [0]);
  // weight_grad = false (frozen lm_head) skips grad_weight / grad_bias (returned as [0]).
  m.def(
      "linear_token_logprobs_bwd(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor lse, float inv_temperature, int ignore_index, int tile, bool weight_grad) -> (Tensor, Tensor, Tensor)");

  // Fused lm_head + generalized JSD(beta) (see generalized_jsd): per-token loss between softmax((h_s·W_sᵀ + b_s) / T)
  // and softmax((h_t·W_tᵀ + b_t) / T) over the first vocab_size columns, without forming [N, V]. Student and teacher
  // have their own hidden sizes; mask [N] bool (False rows give 0) or None. Returns (loss [N], stats [4, N]) in fp32
  // (fp64 for fp64); stats = (lse_s, lse_t, gradient anchor, row total) is what the backward needs.
  m.def(
      "linear_generalized_jsd_fwd(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
      "Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor? mask, int vocab_size, float beta, "
      "float inv_temperature, int tile) -> (Tensor, Tensor)");
  // Student gradients only: (grad_student_hidden, grad_student_weight, grad_student_bias or [0]); weight_grad as above.
  m.def(
      "linear_generalized_jsd_bwd(Tensor grad_loss, Tensor student_hidden, Tensor student_weight, "
      "Tensor? student_bias, Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor? mask, "
      "Tensor stats, int vocab_size, float beta, float inv_temperature, int tile, bool weight_grad) "
      "-> (Tensor, Tensor, Tensor)");
}
