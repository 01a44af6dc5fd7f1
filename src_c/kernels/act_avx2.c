/* act_avx2.c - sigmoid and silu, 8 lanes at a time: the method of act_avx512.c (exp(-|x|) by a
 * degree-7 polynomial and an exponent shift; 0 below 2^-126, so the limits come out right). */
#include <immintrin.h>

#include "../internal.h"

static inline __m256 exp_neg_abs(__m256 x) {
  const __m256 y = _mm256_or_ps(x, _mm256_set1_ps(-0.0f)); /* -|x|, NaN stays */
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), y);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256 keep = _mm256_cmp_ps(n, _mm256_set1_ps(-126.0f), _CMP_NLT_UQ); /* NaN kept */
  const __m256i ni = _mm256_cvtps_epi32(_mm256_max_ps(n, _mm256_set1_ps(-126.0f)));
  const __m256 scale =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
  return _mm256_and_ps(keep, _mm256_mul_ps(p, scale));
}

static inline __m256 sigmoid8(__m256 x) {
  const __m256 e = exp_neg_abs(x), one = _mm256_set1_ps(1.0f);
  const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_div_ps(_mm256_blendv_ps(one, e, neg), _mm256_add_ps(one, e));
}

/* The tail goes through a zero-padded copy: AVX2 has no masked float loads of 4-byte lanes
 * that leave the rest untouched cheaply. */
void kt_act_avx2_sigmoid(const float *x, float *y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, sigmoid8(_mm256_loadu_ps(x + i)));
  if (i == n) return;
  float t[8] = {0};
  memcpy(t, x + i, (size_t)(n - i) * sizeof(float));
  _mm256_storeu_ps(t, sigmoid8(_mm256_loadu_ps(t)));
  memcpy(y + i, t, (size_t)(n - i) * sizeof(float));
}

void kt_act_avx2_silu(const float *x, float *y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(v, sigmoid8(v)));
  }
  if (i == n) return;
  float t[8] = {0};
  memcpy(t, x + i, (size_t)(n - i) * sizeof(float));
  const __m256 v = _mm256_loadu_ps(t);
  _mm256_storeu_ps(t, _mm256_mul_ps(v, sigmoid8(v)));
  memcpy(y + i, t, (size_t)(n - i) * sizeof(float));
}
