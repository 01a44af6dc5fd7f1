/* gemm_avx512_vnni.c - int8 x W^T on vpdpbusd (built with -mavx512vnni; called only where cpuid
 * reports AVX512_VNNI). vpdpbusd multiplies unsigned by signed bytes, so A goes in as a + 128
 * and the packed row sums take 128 * sum(w) back out: exact, in int32. */
#include "avx512_layout.h"

static inline __attribute__((always_inline)) void q8_tile(const int mr, const int nb,
                                                          const uint8_t *ab, int64_t len,
                                                          const char *p0, int64_t bstride,
                                                          int64_t used, __m512i out[][2],
                                                          int fetch) {
  __m512i acc[KT_Z_NT_MR][2]; /* in registers; copied out once, at the end */
  KT_UNROLL
  for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  for (int64_t u = 0; u < used; u++) {
    if (fetch && mr >= KT_Z_PREFETCH_MR) { /* the first row tile: the rest find W in L2 */
      _mm_prefetch(p0 + (u + KT_Z_PREFETCH_UNITS) * KT_Z_UNIT, _MM_HINT_T1);
      if (nb > 1) _mm_prefetch(p0 + bstride + (u + KT_Z_PREFETCH_UNITS) * KT_Z_UNIT, _MM_HINT_T1);
    }
    const __m512i w0 = _mm512_loadu_si512(p0 + u * KT_Z_UNIT);
    const __m512i w1 = nb > 1 ? _mm512_loadu_si512(p0 + bstride + u * KT_Z_UNIT) : w0;
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      int32_t quad;
      memcpy(&quad, ab + m * len + 4 * u, sizeof quad);
      const __m512i av = _mm512_set1_epi32(quad);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], av, w0);
      if (nb > 1) acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], av, w1);
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) out[m][0] = acc[m][0], out[m][1] = acc[m][1];
}

#define Q8_CASE(MR)                                             \
  case MR:                                                      \
    if (nb > 1)                                                 \
      q8_tile(MR, 2, ab, len, p0, bstride, used, acc, m0 == 0); \
    else                                                        \
      q8_tile(MR, 1, ab, len, p0, bstride, used, acc, m0 == 0); \
    break;

void kt_avx512_nt_q8_vnni(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                          int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_INT8), len = 4 * units;
  const int64_t used = (k + 3) / 4, bstride = units * KT_Z_UNIT;
  const int32_t *rowsum = kt_z_rowsum(w);
  uint8_t *ab = scratch;
  __m512i acc[KT_Z_NT_MR][2];
  for (int64_t m0 = 0; m0 < a->count; m0 += KT_Z_NT_MR) {
    const int64_t mr = a->count - m0 < KT_Z_NT_MR ? a->count - m0 : KT_Z_NT_MR;
    for (int64_t i = 0; i < mr; i++) {
      const int64_t src = a->index ? (int64_t)a->index[m0 + i] : m0 + i;
      const int8_t *row = a->base + src * a->ld;
      for (int64_t q = 0; q < k; q++) ab[i * len + q] = (uint8_t)(row[q] + 128);
      memset(ab + i * len + k, 128, (size_t)(len - k));
    }
    for (int64_t j0 = 0; j0 < n; j0 += 32) {
      const char *p0 = kt_z_unit_ptr(w->data, units, (n0 + j0) / 16, 0);
      const int64_t ncols = n - j0, nb = ncols > 16 ? 2 : 1;
      switch (mr) {
        Q8_CASE(1)
        Q8_CASE(2)
        Q8_CASE(3)
        Q8_CASE(4)
        Q8_CASE(5)
        Q8_CASE(6)
        Q8_CASE(7)
        Q8_CASE(8)
        Q8_CASE(9)
        Q8_CASE(10)
        Q8_CASE(11)
        Q8_CASE(12)
      }
      for (int64_t i = 0; i < mr; i++) {
        const int64_t src = a->index ? (int64_t)a->index[m0 + i] : m0 + i;
        const float sa = a->scale[src];
        KT_UNROLL
        for (int v = 0; v < nb; v++) {
          const int64_t j = n0 + j0 + 16 * v;
          const __m512i off = _mm512_slli_epi32(_mm512_loadu_si512(rowsum + j), 7);
          kt_z_store_scaled(c + (m0 + i) * ldc + j0 + 16 * v, _mm512_sub_epi32(acc[i][v], off), sa,
                            w->scale + j, ncols - 16 * v);
        }
      }
    }
  }
}

/* ---- int4 x W^T (W4A8) ---------------------------------------------------------------------- */

#define KT_NT_Q4_NAME kt_avx512_nt_q4_vnni
#define KT_Q4_MR 6 /* 6 x 32 outputs: 12 int32 and 12 fp32 accumulators */
#define KT_Q4_DOT(acc, lo, hi, alo, ahi) \
  _mm512_dpbusd_epi32(_mm512_dpbusd_epi32((acc), (lo), (alo)), (hi), (ahi))
#include "avx512_nt_q4.h"
