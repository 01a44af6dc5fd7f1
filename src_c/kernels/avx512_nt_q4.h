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
 * scales once per tile of A, 4 blocks side by side for 1 or 2 rows of A (more lines in flight
 * per instruction: one thread read 1.5x the bytes per second so), A's quads broadcast from
 * memory. Software prefetches only slowed it down: the hardware's follow these streams. */
#include "avx512_layout.h"

#ifndef KTSFT_AVX512_NT_Q4_H
#define KTSFT_AVX512_NT_Q4_H

enum { KT_Z4_NT_MR = 6 /* the largest KT_Q4_MR */ };

/* The int8 rows of A (zero padded to len, a multiple of 64), the group sums and the 8-byte sums
 * of a row. */
static inline size_t kt_z4_nt_scratch_bytes(int64_t k) {
  const int64_t len = kt_z_units(k, KT_WTYPE_INT4) * 8, ng = (k + 31) / 32;
  return (size_t)(KT_Z4_NT_MR * len + KT_Z4_NT_MR * ng * 4 + len) + 3 * KT_CACHE_LINE;
}

static inline __mmask64 kt_z4_mask64(int64_t n) {
  return n >= 64 ? ~(__mmask64)0 : n <= 0 ? (__mmask64)0 : ((__mmask64)1 << n) - 1;
}

/* Rows m0 .. m0 + mr of A into ab (len bytes each, zeros past k) and nsum[i * ng + g] =
 * -8 * (the sum of row i over group g of G columns). vpsadbw sums 8 unsigned bytes: each byte
 * enters as a + 128, and each 8-byte sum gives 8 * 128 back. part: len / 8 int64 of scratch. */
static inline void kt_z4_rows(const kt_rows_q8 *a, int64_t m0, int64_t mr, int64_t k, int64_t G,
                              int64_t ng, int8_t *ab, int64_t len, int32_t *nsum, int64_t *part) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int64_t i = 0; i < mr; i++) {
    const int64_t src = a->index ? (int64_t)a->index[m0 + i] : m0 + i;
    const int8_t *row = a->base + src * a->ld;
    for (int64_t c = 0; c < len; c += 64) {
      const __m512i v = _mm512_maskz_loadu_epi8(kt_z4_mask64(k - c), row + c);
      _mm512_storeu_si512(ab + i * len + c, v);
      _mm512_storeu_si512(part + c / 8,
                          _mm512_sad_epu8(_mm512_xor_si512(v, flip), _mm512_setzero_si512()));
    }
    for (int64_t g = 0; g < ng; g++) { /* G / 8 parts per group; the padding's are 0 here */
      int64_t sum = 0;
      for (int64_t t = g * G / 8; t < (g + 1) * G / 8 && t < len / 8; t++) sum += part[t] - 8 * 128;
      nsum[i * ng + g] = -8 * (int32_t)sum;
    }
  }
}

#endif /* KTSFT_AVX512_NT_Q4_H */

#ifdef KT_NT_Q4_NAME

/* mr rows of A x 16 nb rows of W (nb <= 4 blocks, their streams side by side: more lines in
 * flight per instruction): c[m, 0 .. ncols) = sa[m] * sum over the groups. sct: the first
 * block's scales (the next block's follow at 16 ng). */
static inline __attribute__((always_inline)) void q4_nt_tile(
    const int mr, const int nb, const int8_t *ab, int64_t len, const int32_t *nsum, int64_t ng,
    int64_t G, int64_t used, const char *p0, int64_t bstride, const float *sct, const float *sa,
    float *c, int64_t ldc, int64_t ncols) {
  const __m512i low = _mm512_set1_epi8(0x0f);
  __m512 tot[KT_Q4_MR][4];
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int v = 0; v < nb; v++) tot[m][v] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < ng; g++) {
    const int64_t u0 = g * G / 8, u1 = (g + 1) * G / 8 < used ? (g + 1) * G / 8 : used;
    __m512i acc[KT_Q4_MR][4];
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      KT_UNROLL
      for (int v = 0; v < nb; v++) acc[m][v] = _mm512_set1_epi32(nsum[m * ng + g]);
    }
    for (int64_t u = u0; u < u1; u++) {
      __m512i lo[4], hi[4];
      KT_UNROLL
      for (int v = 0; v < nb; v++) {
        const char *unit = p0 + v * bstride + u * KT_Z_UNIT;
        const __m512i x = _mm512_loadu_si512(unit);
        lo[v] = _mm512_and_si512(x, low);
        hi[v] = _mm512_and_si512(_mm512_srli_epi32(x, 4), low);
      }
      KT_UNROLL
      for (int m = 0; m < mr; m++) {
        /* broadcast from memory (a load-port operation, unlike from a general register) */
        const __m512i alo = _mm512_broadcastd_epi32(_mm_loadu_si32(ab + m * len + 8 * u));
        const __m512i ahi = _mm512_broadcastd_epi32(_mm_loadu_si32(ab + m * len + 8 * u + 4));
        KT_UNROLL
        for (int v = 0; v < nb; v++) acc[m][v] = KT_Q4_DOT(acc[m][v], lo[v], hi[v], alo, ahi);
      }
    }
    KT_UNROLL
    for (int v = 0; v < nb; v++) {
      const float *sv = sct + (v * ng + g) * 16;
      const __m512 scale = _mm512_loadu_ps(sv);
      KT_UNROLL
      for (int m = 0; m < mr; m++)
        tot[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][v]), scale, tot[m][v]);
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int v = 0; v < nb; v++)
      kt_z_store(c + m * ldc + 16 * v, _mm512_mul_ps(_mm512_set1_ps(sa[m]), tot[m][v]),
                 ncols - 16 * v);
  }
}

void KT_NT_Q4_NAME(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                   int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_INT4), len = 8 * units;
  const int64_t G = w->group, ng = kt_int4_groups(k, G), used = (k + 7) / 8;
  const int64_t bstride = units * KT_Z_UNIT;
  int8_t *ab = scratch;                                     /* [KT_Q4_MR, len] */
  int32_t *nsum = (int32_t *)(void *)(ab + KT_Q4_MR * len); /* [KT_Q4_MR, ng] */
  /* [len / 8], on its own line: the scratch itself may be only 4-byte aligned */
  const uintptr_t after = (uintptr_t)(nsum + KT_Q4_MR * ng);
  int64_t *part = (int64_t *)((after + KT_CACHE_LINE - 1) & ~(uintptr_t)(KT_CACHE_LINE - 1));
  float sa[KT_Q4_MR];
  for (int64_t m0 = 0; m0 < a->count; m0 += KT_Q4_MR) {
    const int64_t mr = a->count - m0 < KT_Q4_MR ? a->count - m0 : KT_Q4_MR;
    kt_z4_rows(a, m0, mr, k, G, ng, ab, len, nsum, part);
    for (int64_t i = 0; i < mr; i++)
      sa[i] = a->scale[a->index ? (int64_t)a->index[m0 + i] : m0 + i];
    const int64_t span = mr <= 2 ? 64 : 32; /* columns per tile: 4 or 2 blocks */
    for (int64_t j0 = 0; j0 < n; j0 += span) {
      const char *p0 = kt_z_unit_ptr(w->data, units, (n0 + j0) / 16, 0);
      const int64_t ncols = n - j0, nb = (span < ncols + 15 ? span : ncols + 15) / 16;
      const float *st = w->scale + kt_int4_scale_index(n0 + j0, 0, ng);
      float *cc = c + m0 * ldc + j0;
#define KT_Q4_TILE(MR, NB) \
  q4_nt_tile(MR, NB, ab, len, nsum, ng, G, used, p0, bstride, st, sa, cc, ldc, ncols)
#define KT_Q4_CASE(MR)   \
  case MR:               \
    if (nb > 1)          \
      KT_Q4_TILE(MR, 2); \
    else                 \
      KT_Q4_TILE(MR, 1); \
    break;
#define KT_Q4_CASE_WIDE(MR) \
  case MR:                  \
    if (nb > 3)             \
      KT_Q4_TILE(MR, 4);    \
    else if (nb > 2)        \
      KT_Q4_TILE(MR, 3);    \
    else if (nb > 1)        \
      KT_Q4_TILE(MR, 2);    \
    else                    \
      KT_Q4_TILE(MR, 1);    \
    break;
      switch (mr) {
        KT_Q4_CASE_WIDE(1)
        KT_Q4_CASE_WIDE(2)
        KT_Q4_CASE(3)
        KT_Q4_CASE(4)
#if KT_Q4_MR > 4
        KT_Q4_CASE(5)
        KT_Q4_CASE(6)
#endif
      }
#undef KT_Q4_CASE_WIDE
#undef KT_Q4_TILE
#undef KT_Q4_CASE
    }
  }
}
#endif /* KT_NT_Q4_NAME */
