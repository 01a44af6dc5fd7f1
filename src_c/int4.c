/* int4.c - the int4 quantizer of spec section 5.2 (one scale per row and group of columns), used
 * when bf16 base weights are loaded into an int4 engine. The int4 GEMMs are the families' own
 * (gemm_nt_q4, gemm_nn_q4 of the kernel table). */
#include "internal.h"

void kt_quantize_int4_bf16(const uint16_t *w, int64_t rows, int64_t cols, int64_t group, uint8_t *q,
                           float *scale) {
  const int64_t ng = kt_int4_groups(cols, group), row = (cols + 1) / 2;
  memset(q, 0, kt_wtype_matrix_bytes(KT_WTYPE_INT4, rows, cols));
  for (int64_t r = 0; r < rows; r++) {
    const uint16_t *src = w + r * cols;
    uint8_t *dst = q + r * row;
    for (int64_t g = 0; g < ng; g++) {
      const int64_t c0 = g * group, c1 = cols - c0 < group ? cols : c0 + group;
      float amax = 0.0f;
      int finite = 1;
      for (int64_t c = c0; c < c1; c++) {
        const float a = fabsf(kt_bf16_to_f32(src[c]));
        finite &= a <= 3.4028234663852886e38f; /* false for Inf and NaN */
        amax = a > amax ? a : amax;
      }
      const float s = !finite ? NAN : amax / 7.0f;
      scale[r * ng + g] = s;
      if (!finite || amax == 0.0f) continue;
      for (int64_t c = c0; c < c1; c++) {
        float v = rintf(kt_bf16_to_f32(src[c]) / s); /* the default rounding: half to even */
        v = v > 7.0f ? 7.0f : v < -8.0f ? -8.0f : v;
        dst[c / 2] |= (uint8_t)(((int32_t)v & 15) << (4 * (c & 1)));
      }
    }
  }
}

void kt_int4_scales_to_blocks(const float *src, int64_t rows, int64_t ng, float *dst) {
  const int64_t stored = kt_int4_scales_stored(rows, ng);
  for (int64_t i = 0; i < stored; i++) dst[i] = 0.0f;
  for (int64_t n = 0; n < rows; n++)
    for (int64_t g = 0; g < ng; g++) dst[kt_int4_scale_index(n, g, ng)] = src[n * ng + g];
}

void kt_int4_scales_from_blocks(const float *src, int64_t rows, int64_t ng, float *dst) {
  for (int64_t n = 0; n < rows; n++)
    for (int64_t g = 0; g < ng; g++) dst[n * ng + g] = src[kt_int4_scale_index(n, g, ng)];
}

void kt_int4_quantize(const uint16_t *w, int64_t rows, int64_t cols, int64_t group, uint8_t *q,
                      float *scale) {
  kt_quantize_int4_bf16(w, rows, cols, group, q, scale);
}
