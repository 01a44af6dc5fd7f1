/* lora_generic.c - the small products around the rank-r LoRA factors, in portable C: the twin of
 * every family's LoRA kernels. They cost about r / H of the base GEMMs; every sum runs over its
 * index in one fixed order. */
#include "../internal.h"

void kt_lora_add_nt(int64_t M, int64_t n, int64_t r, const float *a, const uint16_t *b, int64_t n0,
                    float s, float *c, int64_t ldc) {
  for (int64_t m = 0; m < M; m++) {
    const float *am = a + m * r;
    for (int64_t j = 0; j < n; j++) {
      const uint16_t *bj = b + (n0 + j) * r;
      float acc = 0.0f;
      for (int64_t q = 0; q < r; q++) acc += am[q] * kt_bf16_to_f32(bj[q]);
      c[m * ldc + j] += s * acc;
    }
  }
}

void kt_lora_add_nn(int64_t M, int64_t n, int64_t r, const float *a, const uint16_t *b, int64_t ldb,
                    int64_t n0, float s, float *c, int64_t ldc) {
  for (int64_t m = 0; m < M; m++) {
    const float *am = a + m * r;
    float *cm = c + m * ldc;
    for (int64_t j = 0; j < n; j++) {
      float acc = 0.0f;
      for (int64_t q = 0; q < r; q++) acc += am[q] * kt_bf16_to_f32(b[q * ldb + n0 + j]);
      cm[j] += s * acc;
    }
  }
}

void kt_outer_rn(int64_t M, int64_t r, int64_t n, const float *coef, const float *rowscale,
                 const float *x, int64_t ldx, float s, float *out) {
  for (int64_t i = 0; i < r * n; i++) out[i] = 0.0f;
  for (int64_t m = 0; m < M; m++) {
    const float *xm = x + m * ldx;
    const float w = rowscale ? rowscale[m] : 1.0f;
    for (int64_t q = 0; q < r; q++) {
      const float cq = coef[m * r + q] * w;
      float *oq = out + q * n;
      for (int64_t j = 0; j < n; j++) oq[j] += cq * xm[j];
    }
  }
  for (int64_t i = 0; i < r * n; i++) out[i] *= s;
}

void kt_outer_nr(int64_t M, int64_t n, int64_t r, const float *d, int64_t ldd, const float *coef,
                 float s, float *out) {
  for (int64_t i = 0; i < n * r; i++) out[i] = 0.0f;
  for (int64_t m = 0; m < M; m++) {
    const float *dm = d + m * ldd, *cm = coef + m * r;
    for (int64_t j = 0; j < n; j++) {
      float *oj = out + j * r;
      for (int64_t q = 0; q < r; q++) oj[q] += dm[j] * cm[q];
    }
  }
  for (int64_t i = 0; i < n * r; i++) out[i] *= s;
}
