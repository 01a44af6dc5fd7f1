/* quant.c - the int8 quantizer of spec section 5, shared by weight loading and the per-token
 * activation quantization of the int8 forward. */
#include <math.h>

#include "internal.h"

float kt_quantize_row_bf16(const uint16_t *src, int64_t n, int8_t *q) {
  float amax = 0.0f;
  int finite = 1;
  for (int64_t i = 0; i < n; i++) {
    const float a = fabsf(kt_bf16_to_f32(src[i]));
    finite &= a <= 3.4028234663852886e38f; /* false for Inf and NaN */
    amax = a > amax ? a : amax;
  }
  if (!finite || amax == 0.0f) {
    for (int64_t i = 0; i < n; i++) q[i] = 0;
    return finite ? 0.0f : NAN;
  }
  const float scale = amax / 127.0f;
  for (int64_t i = 0; i < n; i++) q[i] = (int8_t)kt_quantize_value(kt_bf16_to_f32(src[i]), scale);
  return scale;
}
