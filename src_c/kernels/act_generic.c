/* act_generic.c - sigmoid and silu from libm's expf (a few ulp: well inside spec 4's 1e-6).
 * Beyond |x| ~ 88 expf saturates to 0 or inf, which gives the right limits without NaN. */
#include <math.h>

#include "../internal.h"

void kt_act_generic_sigmoid(const float *x, float *y, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] = 1.0f / (1.0f + expf(-x[i]));
}

void kt_act_generic_silu(const float *x, float *y, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] = x[i] / (1.0f + expf(-x[i]));
}
