/* lora.c - bf16 stores and row conversions around the LoRA products (the products themselves are
 * kernels: kernels/lora_generic.c and each family's own). */
#include "moe_internal.h"

void kt_store_bf16(uint16_t *dst, const float *v, int64_t n, int accumulate) {
  if (accumulate)
    for (int64_t i = 0; i < n; i++) dst[i] = kt_f32_to_bf16(kt_bf16_to_f32(dst[i]) + v[i]);
  else
    for (int64_t i = 0; i < n; i++) dst[i] = kt_f32_to_bf16(v[i]);
}

void kt_rows_to_f32(const kt_rows *a, int64_t c0, int64_t n, float *out, int64_t ldo) {
  for (int64_t m = 0; m < a->count; m++) {
    const uint16_t *row = kt_row(a, m) + c0;
    for (int64_t j = 0; j < n; j++) out[m * ldo + j] = kt_bf16_to_f32(row[j]);
  }
}
