/* gemm_test.c - one kernel GEMM of a family on caller arrays, for tests of the kernels against
 * each other and against float64 (the engine rounds most GEMM results to bf16, which would hide
 * fp32-level differences). */
#include <inttypes.h>

#include "internal.h"

static kt_status run(kt_isa isa, kt_gemm_op op, const void *a, const float *a_scale, int64_t m,
                     const void *w, const float *w_scale, int64_t rows, int64_t cols,
                     kt_dtype w_dtype, int64_t group, int64_t n0, int64_t n, float *c,
                     kt_error *err) {
  const kt_kernels *kern = kt_kernels_for(isa);
  if (!kern)
    return kt_fail(err, KT_ERR_ISA_UNAVAILABLE, "kernel family '%s' is not available here",
                   kt_isa_name(isa));
  const int64_t out_cols = op == KT_GEMM_NN ? cols : rows;
  const int64_t max_n = op == KT_GEMM_NN && m <= KT_FEW_ROWS ? KT_WIDE_N : KT_BLOCK_N;
  if (m < 1 || rows < 1 || cols < 1 || n < 1 || n > max_n || n0 < 0 || n0 % KT_BLOCK_N ||
      n0 + n > out_cols)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                   "bad sizes: m %" PRId64 ", W [%" PRId64 ", %" PRId64 "], columns [%" PRId64
                   ", %" PRId64 ") (at most %" PRId64 " of them)",
                   m, rows, cols, n0, n0 + n, max_n);
  const kt_wtype wt = w_dtype == KT_DTYPE_INT8       ? KT_WTYPE_INT8
                      : w_dtype == KT_DTYPE_FP8_E4M3 ? KT_WTYPE_FP8
                      : w_dtype == KT_DTYPE_INT4     ? KT_WTYPE_INT4
                                                     : KT_WTYPE_BF16;
  const int q8 = wt == KT_WTYPE_INT8 || wt == KT_WTYPE_INT4;
  if ((w_dtype != KT_DTYPE_BF16 && wt == KT_WTYPE_BF16) ||
      (op == KT_GEMM_NT_Q8 && (!q8 || !a_scale)) || (op == KT_GEMM_NT && q8) ||
      (wt != KT_WTYPE_BF16 && !w_scale) || (wt == KT_WTYPE_INT4 && !kt_int4_group_valid(group)))
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "operation and weight type do not match");
  const int64_t k = op == KT_GEMM_NN ? rows : cols;
  void *packed = kt_alloc(kern->packed_bytes(rows, cols, wt));
  void *scratch = kt_alloc(
      kt_max_size(kern->gemm_scratch_bytes(n, k), kt_base_gemm_scratch_bytes(kern, wt, n, k)));
  const int64_t ng = wt == KT_WTYPE_INT4 ? kt_int4_groups(cols, group) : 0;
  float *blocks = ng ? kt_alloc((size_t)kt_int4_scales_stored(rows, ng) * sizeof(float)) : NULL;
  if (!packed || !scratch || (ng && !blocks)) {
    kt_free(packed);
    kt_free(scratch);
    kt_free(blocks);
    return kt_fail(err, KT_ERR_OUT_OF_MEMORY, "out of memory");
  }
  kern->pack(packed, w, rows, cols, wt);
  if (blocks) kt_int4_scales_to_blocks(w_scale, rows, ng, blocks); /* as the engine holds them */
  const kt_packed pw = {
      packed, rows, cols, wt, blocks ? blocks : wt == KT_WTYPE_BF16 ? NULL : w_scale, group};
  if (op == KT_GEMM_NT_Q8) {
    const kt_rows_q8 aq = {a, k, NULL, m, a_scale};
    kt_base_gemm_nt_q8(kern, &aq, &pw, n0, n, c, n, scratch);
  } else {
    const kt_rows ar = {a, k, NULL, m};
    (op == KT_GEMM_NN ? kt_base_gemm_nn : kt_base_gemm_nt)(kern, &ar, &pw, n0, n, c, n, scratch);
  }
  kt_free(packed);
  kt_free(scratch);
  kt_free(blocks);
  return KT_OK;
}

kt_status kt_gemm_test(kt_isa isa, kt_gemm_op op, const void *a, const float *a_scale, int64_t m,
                       const void *w, const float *w_scale, int64_t rows, int64_t cols,
                       kt_dtype w_dtype, int64_t n0, int64_t n, float *c, kt_error *err) {
  if (w_dtype == KT_DTYPE_INT4)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "int4 weights go to kt_gemm_test_int4");
  return run(isa, op, a, a_scale, m, w, w_scale, rows, cols, w_dtype, 0, n0, n, c, err);
}

kt_status kt_gemm_test_int4(kt_isa isa, kt_gemm_op op, const void *a, const float *a_scale,
                            int64_t m, const uint8_t *w, const float *w_scale, int64_t rows,
                            int64_t cols, int64_t group, int64_t n0, int64_t n, float *c,
                            kt_error *err) {
  return run(isa, op, a, a_scale, m, w, w_scale, rows, cols, KT_DTYPE_INT4, group, n0, n, c, err);
}

kt_status kt_store_bf16_test(kt_isa isa, uint16_t *dst, const float *v, int64_t n, int accumulate,
                             kt_error *err) {
  const kt_kernels *kern = kt_kernels_for(isa);
  if (!kern)
    return kt_fail(err, KT_ERR_ISA_UNAVAILABLE, "kernel family '%s' is not available here",
                   kt_isa_name(isa));
  if (n < 0) return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "n must be >= 0, got %" PRId64, n);
  kern->store_bf16(dst, v, n, accumulate);
  return KT_OK;
}
