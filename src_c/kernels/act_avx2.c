/* act_avx2.c - sigmoid and silu, 8 lanes at a time: the method of act_avx512.c (exp(-|x|) by a
 * degree-7 polynomial and an exponent shift; 0 below 2^-126, so the limits come out right); and
 * the bf16 store of kt_f32_to_bf16. */
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

/* kt_f32_to_bf16 on 8 lanes (see act_avx512.c), as 8 words in the low 128 bits. |u| is at most
 * 0x7fffffff, so the signed compare finds the NaNs. */
static inline __m128i f32_to_bf16x8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i w = _mm256_blendv_epi8(rounded, quiet, nan); /* every lane below 2^16 */
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(w, w), 0x08);
  return _mm256_castsi256_si128(packed);
}

void kt_store_bf16_avx2(uint16_t *dst, const float *v, int64_t n, int accumulate) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(v + i);
    if (accumulate) /* bf16 dst widened exactly, the sum in fp32 */
      x = _mm256_add_ps(
          _mm256_castsi256_ps(_mm256_slli_epi32(
              _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(dst + i))), 16)),
          x);
    _mm_storeu_si128((__m128i *)(dst + i), f32_to_bf16x8(x));
  }
  kt_store_bf16(dst + i, v + i, n - i, accumulate); /* the last few, in plain C */
}
