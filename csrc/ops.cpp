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
  // Its backward: grad[r, :] *= scale[r] in place, computed in fp32 (fp64 for fp64); scale [N] in that dtype.
  m.def("generalized_jsd_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");

  // Top-k renormalized KL (csrc/include/opdx/topk_math.h). Student logits only at the teacher's ids, from hidden
  // states: z[n,k] = (hidden[n]·weight[ids[n,k]] + bias[ids[n,k]])·inv_temperature (acc dtype [N, K]).
  m.def(
      "topk_gather_dot(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, float inv_temperature, "
      "bool deterministic) -> Tensor");
  // deterministic only selects the backward's grad_weight reduction (False: atomics, CUDA only).
  // Backward returns (grad_hidden [N, d], grad_weight [V, d], grad_bias [V] or [0]) in the input dtype, or with
  // acc_out in the accumulation dtype (for callers that add several contributions before one rounding).
  m.def(
      "topk_gather_dot_bwd(Tensor grad_z, Tensor hidden, Tensor weight, Tensor ids, float inv_temperature, "
      "bool has_bias, bool deterministic, bool acc_out) -> (Tensor, Tensor, Tensor)");
  // GJSD(beta) over K renormalized buckets (or K+1 with a tail bucket when student_lse is given).
  // Returns (loss [N], dloss/dz [N, K], dloss/dstudent_lse [N] or [0]).
  m.def(
      "topk_gjsd(Tensor z, Tensor teacher_logprobs, Tensor? student_lse, float beta) -> (Tensor, Tensor, Tensor)");
  // Student full-vocab logsumexp of (hidden·weightᵀ + bias)·inv_temperature, streamed over vocab tiles.
  m.def(
      "topk_vocab_lse(Tensor hidden, Tensor weight, Tensor? bias, float inv_temperature, int vocab_tile) -> Tensor");
  m.def(
      "topk_vocab_lse_bwd(Tensor grad_lse, Tensor hidden, Tensor weight, Tensor? bias, Tensor lse, "
      "float inv_temperature, int vocab_tile, bool acc_out) -> (Tensor, Tensor, Tensor)");
  // With tail: the student logits at the ids and the full-vocab lse in one op, so that backward adds both gradient
  // contributions in the accumulation dtype before rounding to bf16/fp16 once (they largely cancel).
  m.def(
      "topk_logits_tail(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, float inv_temperature, "
      "int vocab_tile, bool deterministic) -> (Tensor, Tensor)");
  // Fused per-row top-k + logsumexp of logits·inv_temperature: (ids [N, k] int64 sorted by value desc, full-vocab
  // log-probs [N, k], lse [N]).
  m.def("teacher_topk(Tensor logits, int k, float inv_temperature) -> (Tensor, Tensor, Tensor)");

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
