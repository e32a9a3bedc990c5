// The cllm_rt operator library: schemas of the ops and the Python module cllm_rt._C.
//
// Kernels register themselves per device (TORCH_LIBRARY_IMPL in csrc/cpu and
// csrc/cuda); Python reaches them as torch.ops.cllm_rt.<op> once cllm_rt._C is
// imported. The module holds constants: WITH_CUDA, BF16_PAIR_DOT and AVX512 telling which build
// it is, and the kernels' limits (common.h), which cllm_rt/ops.py checks against; and one
// function, set_linear_tuning (cpu/linear.h), the CPU linear's tile and prefetch choices that
// cllm_rt/ops.py measures.
#include <Python.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/linear.h"

TORCH_LIBRARY(cllm_rt, m) {
  // Greedy tokens argmax(logits, -1) [B, n] and accepted block length [B] (int64).
  m.def("jacobi_verify(Tensor logits, Tensor block) -> (Tensor, Tensor)");
  // Softmax attention of q [B, Hq, n, D] against k/v caches [B, Hkv, S_max, D], query i
  // of row b seeing key positions 0 .. cache_lens[b] + i. With page_table [B, pages],
  // the caches are pages [num_pages, Hkv, page_size, D] and row b's position s lies in
  // page page_table[b, s / page_size].
  m.def("block_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, "
        "float scale, Tensor? page_table=None) -> Tensor");
  // argmax(hidden @ weight.T, -1) [B, n] without materializing the logits.
  m.def("lm_head_argmax(Tensor hidden, Tensor weight) -> Tensor");
  // block_attention for a token tree: node i of row b (parents[b, i] its parent, -1 for
  // a root) sees cache positions 0 .. cache_lens[b] - 1 and the block positions of
  // itself and its ancestors.
  m.def("tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, "
        "Tensor parents, float scale, Tensor? page_table=None) -> Tensor");
  // The deepest node the greedy tokens confirm: (accepted [B], node [B], path [B, n]).
  // [input @ weights[i].T + biases[i]]: the linear layers of one input [..., K], each weight
  // [N_i, K] read once for all rows; a row's values do not depend on the other rows.
  m.def("linear(Tensor input, Tensor[] weights, Tensor?[] biases) -> Tensor[]");
  // linear with int8 weights [N_i, K] and per-row scales [N_i] (float32/float64 input, scales and
  // biases): [(input @ weights[i].T) * scales[i] + biases[i]], the same row invariance.
  m.def("linear_int8(Tensor input, Tensor[] weights, Tensor[] scales, Tensor?[] biases) -> Tensor[]");
  m.def("tree_verify(Tensor greedy, Tensor tokens, Tensor parents) -> (Tensor, Tensor, Tensor)");
  // The llama family's decoder layers for one decoding step (decoder_layers.cpp; the reference is
  // cllm_rt/runtime/compact.py's loop): hidden states x [B, n, d] after every layer, the block's
  // keys/values written into the paged pools keys[i]/values[i] at write_slice [page, start] (one
  // row) or at (write_pages, write_offsets) [B, n], attention as block/tree_attention, linears on
  // cllm_rt::linear where `ours`, cllm_rt::linear_int8 for int8 weights, else torch's.
  m.def("decoder_layers(Tensor x, Tensor cos, Tensor signed_sin, Tensor?[] params, Tensor(a!)[] keys, "
        "Tensor(b!)[] values, int[] write_slice, Tensor? write_pages, Tensor? write_offsets, Tensor lengths, "
        "Tensor? page_table, Tensor? parents, int head_dim, float scale, float eps, bool ours) -> Tensor");
  // Sampled tokens argmax(logits / T + Gumbel noise) [B, n] (gumbel_noise.h), seeds [B],
  // positions [B, n] of the predicted tokens, temperature [B] float64 (0: argmax).
  m.def("gumbel_argmax(Tensor logits, Tensor seeds, Tensor positions, Tensor temperature) -> Tensor");
  // The noise's uniforms [B, n, vocab] float64, for tests of the generator.
  m.def("gumbel_uniform(Tensor seeds, Tensor positions, int vocab) -> Tensor");
}

static PyObject* set_linear_tuning(PyObject*, PyObject* args) {
  const char* dtype = nullptr;
  long long one_row = 0, two_rows = 0;
  int one_row_to_l2 = 0, two_rows_to_l2 = 0, more_rows_to_l2 = 0;
  if (!PyArg_ParseTuple(args, "sLL(ppp)", &dtype, &one_row, &two_rows, &one_row_to_l2, &two_rows_to_l2,
                        &more_rows_to_l2)) {
    return nullptr;
  }
  if (one_row < 0 || one_row > 3 || two_rows < 0 || two_rows > 2) {
    PyErr_Format(PyExc_ValueError,
                 "set_linear_tuning: tile shapes are 0 (wide), 1 (tall), 2 (streamed) or, for one row, 3 (paired); "
                 "got %lld and %lld", one_row, two_rows);
    return nullptr;
  }
  const bool to_l2[3] = {one_row_to_l2 != 0, two_rows_to_l2 != 0, more_rows_to_l2 != 0};
  if (!cllm_rt::set_linear_tuning(dtype, static_cast<cllm_rt::FewRowTiles>(one_row),
                                  static_cast<cllm_rt::FewRowTiles>(two_rows), to_l2)) {
    PyErr_Format(PyExc_ValueError, "set_linear_tuning: no linear kernel for dtype %s", dtype);
    return nullptr;
  }
  Py_RETURN_NONE;
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"set_linear_tuning", set_linear_tuning, METH_VARARGS,
       "set_linear_tuning(dtype_name, one_row_tiles, two_row_tiles, (one_row_l2, two_rows_l2, more_rows_l2)): the "
       "tile shape of CPU linear calls of one and of two rows (0 wide, 1 tall, 2 streamed rows, 3 paired: one row "
       "only); whether calls of one row, of two and of more prefetch the next weight tile into L2, else "
       "non-temporally"},
      {nullptr, nullptr, 0, nullptr}};
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* m = PyModule_Create(&module);
#ifdef CLLM_RT_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
#ifdef __AVX512BF16__
  const long bf16_pair_dot = 1;  // linear's bf16 kernel (cpu/linear.cpp) is compiled in
#else
  const long bf16_pair_dot = 0;
#endif
#ifdef __AVX512F__
  const long avx512 = 1;  // the CPU kernels use zmm registers (cpu/linear.cpp: 8-row tiles, not 4)
#else
  const long avx512 = 0;
#endif
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) < 0 ||
      PyModule_AddIntConstant(m, "MAX_HEAD_DIM", cllm_rt::kMaxHeadDim) < 0 ||
      PyModule_AddIntConstant(m, "MAX_TREE_NODES", cllm_rt::kMaxTreeNodes) < 0 ||
      PyModule_AddIntConstant(m, "PAGE_SIZE_MULTIPLE", cllm_rt::kPageSizeMultiple) < 0 ||
      PyModule_AddIntConstant(m, "BF16_PAIR_DOT", bf16_pair_dot) < 0 ||
      PyModule_AddIntConstant(m, "AVX512", avx512) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
