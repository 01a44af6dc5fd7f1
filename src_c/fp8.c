/* fp8.c - e4m3 base weights (spec section 5.1): the quantizer of bf16 weights, and the fp8 GEMMs
 * that every family runs on its own bf16 kernels.
 *
 * x W (the backward) is the int8 scheme with e4m3 values: the family's gemm_nn decodes the bytes
 * (exactly: e4m3 is a subset of bf16 and fp32) and folds the block scale of each row into A in
 * fp32. x W^T (the forward) sums each 128-column block in fp32 and multiplies the sum by the
 * block's scale: for a few rows of A (a few tokens per expert, where the step streams the
 * weights) the family decodes in registers (gemm_nt_fp8_few); for more, each block's panel of at
 * most 64 x 128 weights is decoded (decode_fp8) into the family's packed bf16 layout in the
 * per-thread scratch, where it stays in L1 while the family's bf16 GEMM (vdpbf16ps, AMX tiles)
 * runs every row of A over it. The weights are never re-quantized and no second copy exists. */
#include "internal.h"

enum {
  FP8_M_BLOCK = 64, /* rows of A per call of the bf16 GEMM on one decoded panel */
};

uint8_t kt_f32_to_e4m3(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  const uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
  const float a = fabsf(v);
  if (a != a) return (uint8_t)(sign | 0x7fu);
  if (a >= 448.0f) return (uint8_t)(sign | 0x7eu); /* saturate (Inf included) */
  if (a < 0.015625f) /* below 2^-6: subnormals, steps of 2^-9 (8 steps round up to 2^-6) */
    return (uint8_t)(sign | (uint8_t)rintf(a * 512.0f));
  /* round the fp32 mantissa to 3 bits, ties to even (a carry moves into the exponent), then
   * rebias the exponent from 127 to 7: exponent and mantissa are the top bits of the result */
  uint32_t ua;
  memcpy(&ua, &a, sizeof ua);
  const uint32_t rounded = (ua + 0x7ffffu + ((ua >> 20) & 1u)) >> 20;
  const uint32_t bits = rounded - ((127u - 7u) << 3); /* <= 0x7e: a < 448 */
  return (uint8_t)(sign | bits);
}

void kt_quantize_fp8_bf16(const uint16_t *w, int64_t rows, int64_t cols, uint8_t *q, float *scale) {
  const int64_t nbc = (cols + KT_FP8_BLOCK - 1) / KT_FP8_BLOCK;
  for (int64_t r0 = 0; r0 < rows; r0 += KT_FP8_BLOCK) {
    const int64_t r1 = rows - r0 < KT_FP8_BLOCK ? rows : r0 + KT_FP8_BLOCK;
    for (int64_t c0 = 0; c0 < cols; c0 += KT_FP8_BLOCK) {
      const int64_t c1 = cols - c0 < KT_FP8_BLOCK ? cols : c0 + KT_FP8_BLOCK;
      float amax = 0.0f;
      int finite = 1;
      for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0; c < c1; c++) {
          const float a = fabsf(kt_bf16_to_f32(w[r * cols + c]));
          finite &= a <= 3.4028234663852886e38f; /* false for Inf and NaN */
          amax = a > amax ? a : amax;
        }
      const float s = !finite ? NAN : amax / 448.0f;
      scale[(r0 / KT_FP8_BLOCK) * nbc + c0 / KT_FP8_BLOCK] = s;
      for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0; c < c1; c++)
          q[r * cols + c] =
              !finite || amax == 0.0f ? 0 : kt_f32_to_e4m3(kt_bf16_to_f32(w[r * cols + c]) / s);
    }
  }
}

void kt_fp8_decode(const uint8_t *q, float *out, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = kt_bf16_to_f32(kt_e4m3_to_bf16(q[i]));
}

void kt_fp8_quantize(const uint16_t *w, int64_t rows, int64_t cols, uint8_t *q, float *scale) {
  kt_quantize_fp8_bf16(w, rows, cols, q, scale);
}

/* x W^T on panels: the decoded panel, the partial products of one block, and the bf16 GEMM's
 * own scratch. */
static size_t panel_bytes(const kt_kernels *kern) {
  return kt_align_up(kern->packed_bytes(KT_BLOCK_N, KT_FP8_BLOCK, KT_WTYPE_BF16));
}
static const size_t part_bytes = (size_t)FP8_M_BLOCK * KT_BLOCK_N * sizeof(float);

size_t kt_fp8_scratch_bytes(const kt_kernels *kern, int64_t n, int64_t k) {
  const size_t panels =
      panel_bytes(kern) + part_bytes + kern->gemm_scratch_bytes(KT_BLOCK_N, KT_FP8_BLOCK);
  /* x W: the factors of each row, then the kernel's scratch */
  const size_t nn = kt_align_up((size_t)k * sizeof(float)) + kern->gemm_scratch_bytes(n, k);
  /* x W^T of a few rows: the rows in fp32 (k padded to 64) and 64 totals */
  const size_t few = (size_t)(KT_FP8_FEW_M * (k + 64) + 64) * sizeof(float) + KT_CACHE_LINE;
  return kt_max_size(panels, kt_max_size(nn, few));
}

/* Rows m0 .. m0 + count of A, from column c0 on. */
static kt_rows rows_from(const kt_rows *a, int64_t m0, int64_t count, int64_t c0) {
  const kt_rows r = {a->index ? a->base + c0 : a->base + m0 * a->ld + c0, a->ld,
                     a->index ? a->index + m0 : NULL, count};
  return r;
}

/* c[m, 0:n) = part[m, 0:n) * s, or += it (m < mb). */
static void add_part(float *c, int64_t ldc, const float *part, int64_t mb, int64_t n, float s,
                     int first) {
  for (int64_t i = 0; i < mb; i++)
    for (int64_t j = 0; j < n; j++)
      c[i * ldc + j] = first ? s * part[i * n + j] : c[i * ldc + j] + s * part[i * n + j];
}

void kt_fp8_gemm_nt(const kt_kernels *kern, const kt_rows *a, const kt_packed *w, int64_t n0,
                    int64_t n, float *c, int64_t ldc, void *scratch) {
  if (kern->gemm_nt_fp8_few && a->count <= KT_FP8_FEW_M) {
    kern->gemm_nt_fp8_few(a, w, n0, n, c, ldc, scratch);
    return;
  }
  const int64_t K = w->cols, nbc = (K + KT_FP8_BLOCK - 1) / KT_FP8_BLOCK;
  const float *block_scale = w->scale + (n0 / KT_FP8_BLOCK) * nbc;
  char *panel = scratch;
  float *part = (float *)(void *)(panel + panel_bytes(kern));
  void *inner = (char *)part + part_bytes;
  for (int64_t cb = 0; cb < nbc; cb++) {
    const int64_t c0 = cb * KT_FP8_BLOCK, kc = K - c0 < KT_FP8_BLOCK ? K - c0 : KT_FP8_BLOCK;
    kern->decode_fp8(w, n0, n, c0, kc, KT_SWEEP_COLS, panel);
    const kt_packed pw = {panel, n, kc, KT_WTYPE_BF16, NULL, 0};
    for (int64_t m0 = 0; m0 < a->count; m0 += FP8_M_BLOCK) {
      const int64_t mb = a->count - m0 < FP8_M_BLOCK ? a->count - m0 : FP8_M_BLOCK;
      const kt_rows ab = rows_from(a, m0, mb, c0);
      kern->gemm_nt(&ab, &pw, 0, n, part, n, inner);
      add_part(c + m0 * ldc, ldc, part, mb, n, block_scale[cb], cb == 0);
    }
  }
}

void kt_fp8_gemm_nn(const kt_kernels *kern, const kt_rows *a, const kt_packed *w, int64_t n0,
                    int64_t n, float *c, int64_t ldc, void *scratch) {
  const int64_t K = w->rows, nbc = (w->cols + KT_FP8_BLOCK - 1) / KT_FP8_BLOCK;
  float *fold = scratch;
  /* each 128-column block of the call (a wide span of a few rows has several) with its scales */
  for (int64_t j0 = n0; j0 < n0 + n;) {
    const int64_t j1 = (j0 / KT_FP8_BLOCK + 1) * KT_FP8_BLOCK < n0 + n
                           ? (j0 / KT_FP8_BLOCK + 1) * KT_FP8_BLOCK
                           : n0 + n;
    const float *block_scale = w->scale + j0 / KT_FP8_BLOCK; /* column block j0 / 128 */
    for (int64_t r = 0; r < K; r++) fold[r] = block_scale[(r / KT_FP8_BLOCK) * nbc];
    const kt_packed rows = {w->data, w->rows, w->cols, KT_WTYPE_FP8, fold, 0};
    kern->gemm_nn(a, &rows, j0, j1 - j0, c + (j0 - n0), ldc,
                  (char *)scratch + kt_align_up((size_t)K * sizeof(float)));
    j0 = j1;
  }
}
