/* gemm_avx512_vnni.c - int8 x W^T on vpdpbusd (built with -mavx512vnni; called only where cpuid
 * reports AVX512_VNNI). vpdpbusd multiplies unsigned by signed bytes, so A goes in as a + 128
 * and the packed row sums take 128 * sum(w) back out: exact, in int32. */
#include "avx512_layout.h"

static inline __attribute__((always_inline)) void q8_tile(const int mr, const int nb,
                                                          const uint8_t *ab, int64_t len,
                                                          const char *p0, int64_t bstride,
                                                          int64_t used, __m512i acc[][2]) {
  for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  for (int64_t u = 0; u < used; u++) {
    const __m512i w0 = _mm512_loadu_si512(p0 + u * KT_Z_UNIT);
    const __m512i w1 = nb > 1 ? _mm512_loadu_si512(p0 + bstride + u * KT_Z_UNIT) : w0;
    for (int m = 0; m < mr; m++) {
      int32_t quad;
      memcpy(&quad, ab + m * len + 4 * u, sizeof quad);
      const __m512i av = _mm512_set1_epi32(quad);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], av, w0);
      if (nb > 1) acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], av, w1);
    }
  }
}

#define Q8_CASE(MR)                                    \
  case MR:                                             \
    if (nb > 1)                                        \
      q8_tile(MR, 2, ab, len, p0, bstride, used, acc); \
    else                                               \
      q8_tile(MR, 1, ab, len, p0, bstride, used, acc); \
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

/* ---- int4 x W^T (W4A8) ------------------------------------------------------------------------
 * The nibbles are vpdpbusd's unsigned operand as they are stored (q + 8): masking the low nibbles
 * of a unit gives the int8 unit of its first 4 columns, shifting by 4 first the next 4, and the
 * broadcast quads of A are 4 consecutive int8 columns. Each group's int32 sum starts at
 * -8 sum(a) over the group (which takes the + 8 back out, exactly), then is converted and
 * multiplied by the group scales of its 16 rows into an fp32 sum. */

enum { Q4_MR = 6 /* rows of A per register tile (6 x 32 outputs) */ };

static inline __attribute__((always_inline)) void q4_group(const int mr, const int nb,
                                                           const int8_t *ab, int64_t len,
                                                           const int32_t *asum, int64_t ng,
                                                           int64_t g, const char *p0,
                                                           int64_t bstride, int64_t u0, int64_t u1,
                                                           const float *sc, __m512 tot[][2]) {
  const __m512i low = _mm512_set1_epi8(0x0f);
  __m512i acc[Q4_MR][2];
  for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm512_set1_epi32(-8 * asum[m * ng + g]);
  for (int64_t u = u0; u < u1; u++) {
    const __m512i w0 = _mm512_loadu_si512(p0 + u * KT_Z_UNIT);
    const __m512i w1 = nb > 1 ? _mm512_loadu_si512(p0 + bstride + u * KT_Z_UNIT) : w0;
    const __m512i l0 = _mm512_and_si512(w0, low);
    const __m512i h0 = _mm512_and_si512(_mm512_srli_epi32(w0, 4), low);
    const __m512i l1 = _mm512_and_si512(w1, low);
    const __m512i h1 = _mm512_and_si512(_mm512_srli_epi32(w1, 4), low);
    for (int m = 0; m < mr; m++) {
      int32_t quad[2];
      memcpy(quad, ab + m * len + 8 * u, sizeof quad);
      const __m512i alo = _mm512_set1_epi32(quad[0]), ahi = _mm512_set1_epi32(quad[1]);
      acc[m][0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[m][0], l0, alo), h0, ahi);
      if (nb > 1) acc[m][1] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[m][1], l1, alo), h1, ahi);
    }
  }
  const __m512 s0 = _mm512_loadu_ps(sc), s1 = _mm512_loadu_ps(sc + 16);
  for (int m = 0; m < mr; m++) {
    tot[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][0]), s0, tot[m][0]);
    if (nb > 1) tot[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][1]), s1, tot[m][1]);
  }
}

static inline __attribute__((always_inline)) void q4_tile(const int mr, const int nb,
                                                          const int8_t *ab, int64_t len,
                                                          const int32_t *asum, const kt_packed *w,
                                                          const char *p0, int64_t bstride,
                                                          const float *sct, __m512 tot[][2]) {
  const int64_t G = w->group, ng = kt_int4_groups(w->cols, G), used = (w->cols + 7) / 8;
  for (int m = 0; m < mr; m++) tot[m][0] = tot[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    const int64_t u0 = g * G / 8, u1 = (g + 1) * G / 8 < used ? (g + 1) * G / 8 : used;
    q4_group(mr, nb, ab, len, asum, ng, g, p0, bstride, u0, u1, sct + 32 * g, tot);
  }
}

#define Q4_CASE(MR)                                            \
  case MR:                                                     \
    if (nb > 1)                                                \
      q4_tile(MR, 2, ab, len, asum, w, p0, bstride, sct, tot); \
    else                                                       \
      q4_tile(MR, 1, ab, len, asum, w, p0, bstride, sct, tot); \
    break;

size_t kt_avx512_nt_q4_vnni_scratch(int64_t k) {
  const int64_t len = kt_z_units(k, KT_WTYPE_INT4) * 8, ng = (k + 31) / 32;
  return (size_t)(Q4_MR * len + Q4_MR * ng * 4 + 32 * ng * 4) + KT_CACHE_LINE;
}

void kt_avx512_nt_q4_vnni(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                          int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_INT4), len = 8 * units;
  const int64_t G = w->group, ng = kt_int4_groups(k, G), bstride = units * KT_Z_UNIT;
  int8_t *ab = scratch;                                           /* [Q4_MR, len] */
  int32_t *asum = (int32_t *)(void *)(ab + Q4_MR * len);          /* [Q4_MR, ng] */
  float *sct = (float *)(void *)(asum + Q4_MR * ((k + 31) / 32)); /* [ng, 32] */
  __m512 tot[Q4_MR][2];
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const int64_t ncols = n - j0, nb = ncols > 16 ? 2 : 1;
    for (int64_t g = 0; g < ng; g++) /* the group scales of the 32 rows, transposed */
      for (int64_t j = 0; j < 32; j++)
        sct[32 * g + j] = n0 + j0 + j < w->rows ? w->scale[(n0 + j0 + j) * ng + g] : 0.0f;
    const char *p0 = kt_z_unit_ptr(w->data, units, (n0 + j0) / 16, 0);
    for (int64_t m0 = 0; m0 < a->count; m0 += Q4_MR) {
      const int64_t mr = a->count - m0 < Q4_MR ? a->count - m0 : Q4_MR;
      for (int64_t i = 0; i < mr; i++) {
        const int64_t src = a->index ? (int64_t)a->index[m0 + i] : m0 + i;
        const int8_t *row = a->base + src * a->ld;
        memcpy(ab + i * len, row, (size_t)k);
        memset(ab + i * len + k, 0, (size_t)(len - k));
        for (int64_t g = 0; g < ng; g++) {
          int32_t s = 0;
          for (int64_t q = g * G; q < k && q < (g + 1) * G; q++) s += row[q];
          asum[i * ng + g] = s;
        }
      }
      switch (mr) {
        Q4_CASE(1)
        Q4_CASE(2)
        Q4_CASE(3)
        Q4_CASE(4)
        Q4_CASE(5)
        Q4_CASE(6)
      }
      for (int64_t i = 0; i < mr; i++) {
        const int64_t src = a->index ? (int64_t)a->index[m0 + i] : m0 + i;
        const __m512 sa = _mm512_set1_ps(a->scale[src]);
        for (int v = 0; v < nb; v++)
          kt_z_store(c + (m0 + i) * ldc + j0 + 16 * v, _mm512_mul_ps(sa, tot[i][v]),
                     ncols - 16 * v);
      }
    }
  }
}
