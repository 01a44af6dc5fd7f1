/* avx512_nt_q4.h - int4 x W^T (W4A8) on the packed int4 layout: one source, compiled twice. The
 * including file defines KT_NT_Q4_NAME (the function's name), KT_Q4_MR (rows of A per register
 * tile, at most KT_Z4_NT_MR) and KT_Q4_DOT(acc, lo, hi, alo, ahi): acc plus, per int32 lane, the
 * dot products of the 4 unsigned bytes of lo with the 4 signed bytes of alo and of hi with ahi,
 * exact (vpdpbusd, or vpmaddubsw and vpmaddwd). Included without KT_NT_Q4_NAME, it gives the
 * helpers and the scratch size only.
 *
 * The nibbles are the unsigned operand as they are stored (q + 8): masking the low nibbles of a
 * unit gives the int8 unit of its first 4 columns, shifting by 4 first the next 4, and the
 * broadcast quads of A are 4 consecutive int8 columns. Each group's int32 sum starts at
 * -8 sum(a) over the group (which takes the + 8 back out, exactly), then is converted and
 * multiplied by the group scales of its 16 rows (one vector of the engine's blocked scales,
 * kt_int4_scale_index) into an fp32 sum. Per call, A's rows are copied and their group sums taken
 * once per tile of KT_Q4_MR rows (vpsadbw): the tile then streams each 16-row block of W and its
 * scales once per tile of A, prefetching 4 KB of nibbles and 16 groups of scales ahead (the
 * hardware prefetchers restart at every page). */
#include "avx512_layout.h"

#ifndef KTSFT_AVX512_NT_Q4_H
#define KTSFT_AVX512_NT_Q4_H

enum {
  KT_Z4_NT_MR = 6,         /* the largest KT_Q4_MR */
  KT_Z4_PREFETCH = 64,     /* units ahead of the loads */
  KT_Z4_SCALES_AHEAD = 16, /* groups ahead of the scale loads */
};

/* The int8 rows of A (zero padded to len, a multiple of 64) and the group sums. */
static inline size_t kt_z4_nt_scratch_bytes(int64_t k) {
  const int64_t len = kt_z_units(k, KT_WTYPE_INT4) * 8, ng = (k + 31) / 32;
  return (size_t)(KT_Z4_NT_MR * len + KT_Z4_NT_MR * ng * 4) + 2 * KT_CACHE_LINE;
}

static inline __mmask64 kt_z4_mask64(int64_t n) {
  return n >= 64 ? ~(__mmask64)0 : n <= 0 ? (__mmask64)0 : ((__mmask64)1 << n) - 1;
}

/* Rows m0 .. m0 + mr of A into ab (len bytes each, zeros past k) and nsum[i * ng + g] =
 * -8 * (the sum of row i over group g of G columns). vpsadbw sums 8 unsigned bytes: each byte
 * enters as a + 128, and each 8-byte sum gives 8 * 128 back. */
static inline void kt_z4_rows(const kt_rows_q8 *a, int64_t m0, int64_t mr, int64_t k, int64_t G,
                              int64_t ng, int8_t *ab, int64_t len, int32_t *nsum) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int64_t i = 0; i < mr; i++) {
    const int64_t src = a->index ? (int64_t)a->index[m0 + i] : m0 + i;
    const int8_t *row = a->base + src * a->ld;
    int32_t *sum = nsum + i * ng;
    for (int64_t g = 0; g < ng; g++) sum[g] = 0;
    for (int64_t c = 0; c < len; c += 64) {
      const __m512i v = _mm512_maskz_loadu_epi8(kt_z4_mask64(k - c), row + c);
      _mm512_storeu_si512(ab + i * len + c, v);
      int64_t part[8];
      _mm512_storeu_si512(part, _mm512_sad_epu8(_mm512_xor_si512(v, flip), _mm512_setzero_si512()));
      for (int64_t t = 0; t < 8 && (c + 8 * t) / G < ng; t++)
        sum[(c + 8 * t) / G] += (int32_t)(part[t] - 8 * 128);
    }
    for (int64_t g = 0; g < ng; g++) sum[g] *= -8;
  }
}

#endif /* KTSFT_AVX512_NT_Q4_H */

#ifdef KT_NT_Q4_NAME

/* mr rows of A x 16 nb rows of W: c[m, 0 .. ncols) = sa[m] * sum over the groups. sct: the
 * first block's scales (the second's follow at 16 ng). */
static inline __attribute__((always_inline)) void q4_nt_tile(
    const int mr, const int nb, const int8_t *ab, int64_t len, const int32_t *nsum, int64_t ng,
    int64_t G, int64_t used, const char *p0, int64_t bstride, const float *sct, const float *sa,
    float *c, int64_t ldc, int64_t ncols) {
  const __m512i low = _mm512_set1_epi8(0x0f);
  __m512 tot[KT_Q4_MR][2];
  for (int m = 0; m < mr; m++) tot[m][0] = tot[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    const int64_t u0 = g * G / 8, u1 = (g + 1) * G / 8 < used ? (g + 1) * G / 8 : used;
    __m512i acc[KT_Q4_MR][2];
    for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm512_set1_epi32(nsum[m * ng + g]);
    for (int64_t u = u0; u < u1; u++) {
      _mm_prefetch(p0 + (u + KT_Z4_PREFETCH) * KT_Z_UNIT, _MM_HINT_T0);
      if (nb > 1) _mm_prefetch(p0 + bstride + (u + KT_Z4_PREFETCH) * KT_Z_UNIT, _MM_HINT_T0);
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
        acc[m][0] = KT_Q4_DOT(acc[m][0], l0, h0, alo, ahi);
        if (nb > 1) acc[m][1] = KT_Q4_DOT(acc[m][1], l1, h1, alo, ahi);
      }
    }
    _mm_prefetch((const char *)(sct + (g + KT_Z4_SCALES_AHEAD) * 16), _MM_HINT_T0);
    if (nb > 1) _mm_prefetch((const char *)(sct + (ng + g + KT_Z4_SCALES_AHEAD) * 16), _MM_HINT_T0);
    const __m512 s0 = _mm512_loadu_ps(sct + g * 16);
    const __m512 s1 = nb > 1 ? _mm512_loadu_ps(sct + (ng + g) * 16) : s0;
    for (int m = 0; m < mr; m++) {
      tot[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][0]), s0, tot[m][0]);
      if (nb > 1) tot[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][1]), s1, tot[m][1]);
    }
  }
  for (int m = 0; m < mr; m++)
    for (int v = 0; v < nb; v++)
      kt_z_store(c + m * ldc + 16 * v, _mm512_mul_ps(_mm512_set1_ps(sa[m]), tot[m][v]),
                 ncols - 16 * v);
}

void KT_NT_Q4_NAME(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                   int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_INT4), len = 8 * units;
  const int64_t G = w->group, ng = kt_int4_groups(k, G), used = (k + 7) / 8;
  const int64_t bstride = units * KT_Z_UNIT;
  int8_t *ab = scratch;                                     /* [KT_Q4_MR, len] */
  int32_t *nsum = (int32_t *)(void *)(ab + KT_Q4_MR * len); /* [KT_Q4_MR, ng] */
  float sa[KT_Q4_MR];
  for (int64_t m0 = 0; m0 < a->count; m0 += KT_Q4_MR) {
    const int64_t mr = a->count - m0 < KT_Q4_MR ? a->count - m0 : KT_Q4_MR;
    kt_z4_rows(a, m0, mr, k, G, ng, ab, len, nsum);
    for (int64_t i = 0; i < mr; i++)
      sa[i] = a->scale[a->index ? (int64_t)a->index[m0 + i] : m0 + i];
    for (int64_t j0 = 0; j0 < n; j0 += 32) {
      const char *p0 = kt_z_unit_ptr(w->data, units, (n0 + j0) / 16, 0);
      const int64_t ncols = n - j0, nb = ncols > 16 ? 2 : 1;
      const float *st = w->scale + kt_int4_scale_index(n0 + j0, 0, ng);
      float *cc = c + m0 * ldc + j0;
#define KT_Q4_CASE(MR)                                                                    \
  case MR:                                                                                \
    if (nb > 1)                                                                           \
      q4_nt_tile(MR, 2, ab, len, nsum, ng, G, used, p0, bstride, st, sa, cc, ldc, ncols); \
    else                                                                                  \
      q4_nt_tile(MR, 1, ab, len, nsum, ng, G, used, p0, bstride, st, sa, cc, ldc, ncols); \
    break;
      switch (mr) {
        KT_Q4_CASE(1)
        KT_Q4_CASE(2)
        KT_Q4_CASE(3)
        KT_Q4_CASE(4)
#if KT_Q4_MR > 4
        KT_Q4_CASE(5)
        KT_Q4_CASE(6)
#endif
      }
#undef KT_Q4_CASE
    }
  }
}
#endif /* KT_NT_Q4_NAME */
