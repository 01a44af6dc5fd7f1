/* avx512_nt_dp.h - x W^T and x W for bf16 W on the vdpbf16ps instruction: one source, compiled
 * twice. The including file defines KT_DPBF16(acc, a, b) (the instruction, or its software
 * model) and KT_NT_DP_NAME, KT_NN_DP_NAME (the functions' names). A's rows are copied, zero
 * padded, into the scratch so that every pair of A is broadcast whole; each W unit (16 rows x 2
 * columns) feeds 12 rows. x W runs the same tile over the column-pair panel of its columns
 * (kt_z_panel_bf16), whose units are 16 columns x 2 rows of W. */
#include "avx512_layout.h"

static inline __attribute__((always_inline)) void kt_nt_dp_tile(const int mr, const int nb,
                                                                const uint16_t *ab, int64_t len,
                                                                const char *p0, int64_t bstride,
                                                                int64_t used, float *c, int64_t ldc,
                                                                int64_t ncols, int fetch) {
  __m512 acc[KT_Z_NT_MR][2];
  KT_UNROLL
  for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t u = 0; u < used; u++) {
    if (fetch && mr >= KT_Z_PREFETCH_MR) {
      _mm_prefetch(p0 + (u + KT_Z_PREFETCH_UNITS) * KT_Z_UNIT, _MM_HINT_T1);
      if (nb > 1) _mm_prefetch(p0 + bstride + (u + KT_Z_PREFETCH_UNITS) * KT_Z_UNIT, _MM_HINT_T1);
    }
    const __m512i w0 = _mm512_loadu_si512(p0 + u * KT_Z_UNIT);
    const __m512i w1 = nb > 1 ? _mm512_loadu_si512(p0 + bstride + u * KT_Z_UNIT) : w0;
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      int32_t pair;
      memcpy(&pair, ab + m * len + 2 * u, sizeof pair);
      const __m512i av = _mm512_set1_epi32(pair);
      acc[m][0] = KT_DPBF16(acc[m][0], av, w0);
      if (nb > 1) acc[m][1] = KT_DPBF16(acc[m][1], av, w1);
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    kt_z_store(c + m * ldc, acc[m][0], ncols);
    if (nb > 1) kt_z_store(c + m * ldc + 16, acc[m][1], ncols - 16);
  }
}

#define KT_NT_DP_CASE(MR)                                                      \
  case MR:                                                                     \
    if (nb > 1)                                                                \
      kt_nt_dp_tile(MR, 2, ab, len, p0, bstride, used, cc, ldc, ncols, fetch); \
    else                                                                       \
      kt_nt_dp_tile(MR, 1, ab, len, p0, bstride, used, cc, ldc, ncols, fetch); \
    break;

/* c[0 .. mr, 0 .. n) for the rows of A in ab: the 16-row blocks of the packed operand from p,
 * bstride bytes apart, two at a time; `fetch`: the first pass over blocks in memory (the later
 * row tiles find them in L2, the panel is in cache), which fetches ahead. */
static void kt_dp_rows(int64_t mr, const uint16_t *ab, int64_t len, const char *p, int64_t bstride,
                       int64_t used, int64_t n, float *c, int64_t ldc, int fetch) {
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const char *p0 = p + (j0 / 16) * bstride;
    const int64_t ncols = n - j0, nb = ncols > 16 ? 2 : 1;
    float *cc = c + j0;
    switch (mr) {
      KT_NT_DP_CASE(1)
      KT_NT_DP_CASE(2)
      KT_NT_DP_CASE(3)
      KT_NT_DP_CASE(4)
      KT_NT_DP_CASE(5)
      KT_NT_DP_CASE(6)
      KT_NT_DP_CASE(7)
      KT_NT_DP_CASE(8)
      KT_NT_DP_CASE(9)
      KT_NT_DP_CASE(10)
      KT_NT_DP_CASE(11)
      KT_NT_DP_CASE(12)
    }
  }
}

void KT_NT_DP_NAME(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                   int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_BF16), len = 2 * units;
  const int64_t used = (k + 1) / 2, bstride = units * KT_Z_UNIT;
  uint16_t *ab = scratch;
  for (int64_t m0 = 0; m0 < a->count; m0 += KT_Z_NT_MR) {
    const int64_t mr = a->count - m0 < KT_Z_NT_MR ? a->count - m0 : KT_Z_NT_MR;
    kt_z_copy_rows_bf16(a, m0, mr, k, ab, len);
    kt_dp_rows(mr, ab, len, kt_z_unit_ptr(w->data, units, n0 / 16, 0), bstride, used, n,
               c + m0 * ldc, ldc, m0 == 0);
  }
}

/* x W, W bf16 without row scales, n <= KT_BLOCK_N: C[m, j] = sum_c A[m, c] W[c, n0 + j], the
 * pairs of rows c of W summed by the instruction. */
void KT_NN_DP_NAME(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                   int64_t ldc, void *scratch) {
  const int64_t k = w->rows, ncb = (k + 31) / 32, len = 32 * ncb, used = (k + 1) / 2;
  const int64_t t_first = n0 / 16, t_last = (n0 + n - 1) / 16, bstride = ncb * KT_Z_PANEL_TILE;
  const uintptr_t at = ((uintptr_t)scratch + KT_CACHE_LINE - 1) & ~(uintptr_t)(KT_CACHE_LINE - 1);
  char *panel = (char *)at;
  uint16_t *ab = (uint16_t *)(void *)(panel + (t_last - t_first + 1) * bstride);
  kt_z_panel_bf16(w, t_first, t_last, ncb, panel);
  for (int64_t m0 = 0; m0 < a->count; m0 += KT_Z_NT_MR) {
    const int64_t mr = a->count - m0 < KT_Z_NT_MR ? a->count - m0 : KT_Z_NT_MR;
    kt_z_copy_rows_bf16(a, m0, mr, k, ab, len);
    kt_dp_rows(mr, ab, len, panel, bstride, used, n, c + m0 * ldc, ldc, 0);
  }
}
