/* gemm_avx2.c - the avx2 family (AVX2 + FMA): the layout of vnni_layout.h read as two ymm
 * halves per unit (rows 0-7, rows 8-15 of a block).
 *
 *   x W^T, bf16   fp32 FMA: the even and odd columns of a unit (shift, and) feed a 4 x 16 tile
 *   x W^T, int8   vpmaddwd on sign-extended byte pairs, exact in int32
 *   x W^T, int4   vpmaddubsw on the nibbles as stored against int8 A (W4A8), int16 runs of 32
 *                 columns widened into exact int32 group sums, the groups summed in fp32
 *   x W           at most 4 rows of A: no transpose, the lanes of a half unit (8 rows of W) are
 *                 multiplied by A lane by lane into accumulators summed across lanes at the end;
 *                 more rows: 8 x 8 in-register transposes into a per-thread panel (bf16 and
 *                 int8 W stay as they are there, widened by the tile as it reads them; fp8 is
 *                 decoded to fp32), then a 6 x 16 tile of fp32 FMAs (nn_drive.h, shared with
 *                 avx512); the LoRA products likewise. int4: the same two paths, the nibbles
 *                 widened to fp32 by unpacks (no transpose), each group's scale folded into A
 * Every sum runs over its index in ascending order within one fp32 (or int32) lane. */
#include <immintrin.h>

#include "vnni_layout.h"

void kt_act_avx2_sigmoid(const float *x, float *y, int64_t n);
void kt_act_avx2_silu(const float *x, float *y, int64_t n);
void kt_store_bf16_avx2(uint16_t *dst, const float *v, int64_t n, int accumulate);

enum {
  NT_MR = 4,   /* rows of A per x W^T tile (4 x 16 outputs) */
  NN_MR = 6,   /* rows of A per x W tile (6 x 16 outputs) */
  NN_CH = 128, /* rows of W transposed into the scratch at a time */
  WT_LD = 64,  /* columns of the transposed scratch */
  Y_PREFETCH_BLOCKS = 4,
  Y_PREFETCH_UNITS = 256,     /* x W^T: how far ahead the stream of units is fetched */
  FEW_LANES = 8,              /* fp32 lanes of one accumulator */
  NN_FEW_M = KT_FEW_ROWS,     /* x W of at most this many rows: lane accumulators, no transpose */
  FEW_ACC = 8,                /* ... in a register tile of 8 accumulators */
  FEW_CHUNK_BYTES = 131072,   /* ... over chunks of this many bytes of W */
  Q4_FEW_CHUNK_BYTES = 65536, /* ... int4: over chunks of this many bytes of W */
};

static size_t q4_nt_scratch_bytes(int64_t k);
static size_t q4_nn_scratch_bytes(int64_t n, int64_t k);

/* x W^T: A rows as fp32 (or int16 pairs); x W: the transposed block and a 6-row slice of A, or
 * for a few rows, the rows (k padded to 16) and 8 lanes per accumulator. */
static size_t y_scratch_bytes(int64_t n, int64_t k) {
  const size_t nt = (size_t)NT_MR * (size_t)(kt_z_units(k, KT_WTYPE_BF16) * 2) * 4;
  const size_t nn = (size_t)(NN_CH * WT_LD + NN_MR * NN_CH) * 4;
  const size_t few =
      (size_t)NN_FEW_M *
      (size_t)(((k + 15) & ~(int64_t)15) + (n + FEW_ACC - 1) / FEW_ACC * FEW_ACC * 8) * 4;
  return kt_max_size(kt_max_size(nt + nn, few) + KT_CACHE_LINE,
                     kt_max_size(q4_nt_scratch_bytes(k), q4_nn_scratch_bytes(n, k)));
}

static inline __m256 bf16x8_to_f32(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline void row_to_f32(const uint16_t *src, int64_t n, float *dst, int64_t len,
                              const float *scale) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = bf16x8_to_f32(_mm_loadu_si128((const __m128i *)(src + i)));
    if (scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(scale + i));
    _mm256_storeu_ps(dst + i, v);
  }
  for (; i < n; i++) dst[i] = kt_bf16_to_f32(src[i]) * (scale ? scale[i] : 1.0f);
  for (; i < len; i++) dst[i] = 0.0f;
}

/* 16 e4m3 bytes as fp32 in two vectors (bytes 0-7, 8-15), exactly, divided by 256 unless
 * `exact` (one multiply fewer per vector; the caller folds the 256 into a scale): each byte,
 * sign-extended to 16 bits and shifted, is the fp16 of its value / 256 (subnormals included),
 * which vcvtph2ps widens; the NaN bytes 0x7f and 0xff become an fp16 NaN first. */
static inline void e4m3x16_to_f32(__m128i bytes, int exact, __m256 out[2]) {
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7),
                                     _mm256_set1_epi16((short)0xbf80));
  const __m256i nan =
      _mm256_cmpeq_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x3f80)), _mm256_set1_epi16(0x3f80));
  const __m256i v = _mm256_blendv_epi8(h, _mm256_set1_epi16(0x7e00), nan);
  out[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
  out[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
  if (exact)
    for (int i = 0; i < 2; i++) out[i] = _mm256_mul_ps(out[i], _mm256_set1_ps(256.0f));
}

/* c[0 .. n) = v, n <= 8 */
static inline void store8(float *c, __m256 v, int64_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(c, v);
    return;
  }
  float t[8];
  _mm256_storeu_ps(t, v);
  for (int64_t i = 0; i < n; i++) c[i] = t[i];
}

/* ---- x W^T, fp8, a few rows: e4m3 decoded in registers ------------------------------------ */

/* As avx512's: each 8-byte group of a half unit (2 rows of W x its 4 columns) is decoded to fp32
 * (/ 256, undone in the block scale) and multiplied by A[m, 4u .. 4u + 4) repeated twice, into
 * one accumulator per group: lane 4i + j of group g sums row 8h + 2g + i, columns 4u + j. The
 * totals of each 128-column block are kept in `tot` (memory: 16 ymm registers hold only the
 * accumulators); one half unit (8 rows) and 2 rows of A at a time. */
static inline __attribute__((always_inline)) void nt_fp8_tile(const int mr, const float *af,
                                                              int64_t len, const char *p,
                                                              int64_t used, const float *scale,
                                                              float *tot) {
  __m256 acc[2][4];
  for (int64_t u0 = 0; u0 < used; u0 += KT_FP8_BLOCK / 4) {
    const int64_t u1 = used - u0 < KT_FP8_BLOCK / 4 ? used : u0 + KT_FP8_BLOCK / 4;
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      KT_UNROLL
      for (int g = 0; g < 4; g++) acc[m][g] = _mm256_setzero_ps();
    }
    for (int64_t u = u0; u < u1; u++) {
      _mm_prefetch(p + (u + Y_PREFETCH_UNITS) * KT_Z_UNIT, _MM_HINT_T1);
      __m256 wg[4];
      e4m3x16_to_f32(_mm_loadu_si128((const __m128i *)(p + u * KT_Z_UNIT)), 0, wg);
      e4m3x16_to_f32(_mm_loadu_si128((const __m128i *)(p + u * KT_Z_UNIT + 16)), 0, wg + 2);
      KT_UNROLL
      for (int m = 0; m < mr; m++) {
        const __m256 ap = _mm256_broadcast_ps((const __m128 *)(af + m * len + 4 * u));
        KT_UNROLL
        for (int g = 0; g < 4; g++) acc[m][g] = _mm256_fmadd_ps(ap, wg[g], acc[m][g]);
      }
    }
    const __m256 s = _mm256_set1_ps(256.0f * scale[u0 / (KT_FP8_BLOCK / 4)]);
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      KT_UNROLL
      for (int g = 0; g < 4; g++) {
        float *t = tot + (m * 4 + g) * 8;
        _mm256_storeu_ps(t, _mm256_fmadd_ps(s, acc[m][g], _mm256_loadu_ps(t)));
      }
    }
  }
}

static void y_gemm_nt_fp8_few(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                              int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_FP8), len = 4 * units;
  const int64_t used = (k + 3) / 4, nbc = (k + KT_FP8_BLOCK - 1) / KT_FP8_BLOCK;
  const float *scale = w->scale + (n0 / KT_FP8_BLOCK) * nbc;
  float *af = scratch, *tot = af + a->count * len;
  for (int64_t m = 0; m < a->count; m++) row_to_f32(kt_row(a, m), k, af + m * len, len, NULL);
  for (int64_t j0 = 0; j0 < n; j0 += 8) { /* 8 rows of W: half h of block j0 / 16 */
    const char *p = kt_z_unit_ptr(w->data, units, (n0 + j0) / 16, 0) + 32 * ((j0 / 8) % 2);
    for (int64_t m0 = 0; m0 < a->count; m0 += 2) {
      const int mr = a->count - m0 > 1 ? 2 : 1;
      memset(tot, 0, sizeof(float) * 64);
      if (mr == 2)
        nt_fp8_tile(2, af + m0 * len, len, p, used, scale, tot);
      else
        nt_fp8_tile(1, af + m0 * len, len, p, used, scale, tot);
      KT_UNROLL
      for (int m = 0; m < mr; m++)
        for (int64_t i = 0; i < 8 && j0 + i < n; i++) {
          const float *t = tot + (m * 4 + i / 2) * 8 + 4 * (i % 2);
          c[(m0 + m) * ldc + j0 + i] = (t[0] + t[1]) + (t[2] + t[3]);
        }
    }
  }
}

/* ---- x W^T, bf16 --------------------------------------------------------------------------- */

/* mr rows of A x nb blocks of 16 rows of W (bstride bytes apart): 2 nb accumulators per row of A,
 * each taking the unit's even and odd column in turn, so a tile of 1 row takes 4 blocks to keep
 * 8 chains of FMAs in flight (2 rows x 2 blocks would need 17 registers). */
static inline __attribute__((always_inline)) void nt_fma_tile(const int mr, const int nb,
                                                              const float *af, int64_t len,
                                                              const char *p, int64_t bstride,
                                                              int64_t used, float *c, int64_t ldc,
                                                              int64_t ncols, int fetch) {
  const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
  __m256 acc[NT_MR][4][2];
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int b = 0; b < nb; b++) acc[m][b][0] = acc[m][b][1] = _mm256_setzero_ps();
  }
  for (int64_t u = 0; u < used; u++) {
    KT_UNROLL
    for (int b = 0; b < nb; b++) {
      const char *q = p + b * bstride + u * KT_Z_UNIT;
      if (fetch) _mm_prefetch(q + Y_PREFETCH_UNITS * KT_Z_UNIT, _MM_HINT_T1);
      const __m256i w0 = _mm256_loadu_si256((const __m256i *)q);
      const __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + 32));
      const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
      const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, hi));
      const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
      const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, hi));
      KT_UNROLL
      for (int m = 0; m < mr; m++) {
        const __m256 ae = _mm256_broadcast_ss(af + m * len + 2 * u);
        const __m256 ao = _mm256_broadcast_ss(af + m * len + 2 * u + 1);
        acc[m][b][0] = _mm256_fmadd_ps(ao, o0, _mm256_fmadd_ps(ae, e0, acc[m][b][0]));
        acc[m][b][1] = _mm256_fmadd_ps(ao, o1, _mm256_fmadd_ps(ae, e1, acc[m][b][1]));
      }
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int b = 0; b < nb; b++) {
      store8(c + m * ldc + 16 * b, acc[m][b][0], ncols - 16 * b);
      if (ncols - 16 * b > 8) store8(c + m * ldc + 16 * b + 8, acc[m][b][1], ncols - 16 * b - 8);
    }
  }
}

static void y_gemm_nt_fma(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                          int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_BF16), len = 2 * units;
  const int64_t used = (k + 1) / 2, bstride = units * KT_Z_UNIT;
  float *af = scratch;
  for (int64_t m0 = 0; m0 < a->count; m0 += NT_MR) {
    const int64_t mr = a->count - m0 < NT_MR ? a->count - m0 : NT_MR;
    for (int64_t i = 0; i < mr; i++) row_to_f32(kt_row(a, m0 + i), k, af + i * len, len, NULL);
    for (int64_t j0 = 0; j0 < n;) {
      const char *p = kt_z_unit_ptr(w->data, units, (n0 + j0) / 16, 0);
      float *cc = c + m0 * ldc + j0;
      const int64_t left = n - j0, blocks = (left + 15) / 16;
      /* a tile of 1 row takes up to 4 blocks (n0 is a multiple of 16) */
      const int nb = mr > 1 ? 1 : blocks >= 4 ? 4 : blocks >= 2 ? 2 : 1;
      switch (mr * 4 + nb) {
        case 4 + 4: nt_fma_tile(1, 4, af, len, p, bstride, used, cc, ldc, left, m0 == 0); break;
        case 4 + 2: nt_fma_tile(1, 2, af, len, p, bstride, used, cc, ldc, left, m0 == 0); break;
        case 4 + 1: nt_fma_tile(1, 1, af, len, p, bstride, used, cc, ldc, left, m0 == 0); break;
        case 8 + 1: nt_fma_tile(2, 1, af, len, p, bstride, used, cc, ldc, left, m0 == 0); break;
        case 12 + 1: nt_fma_tile(3, 1, af, len, p, bstride, used, cc, ldc, left, m0 == 0); break;
        default: nt_fma_tile(4, 1, af, len, p, bstride, used, cc, ldc, left, m0 == 0); break;
      }
      j0 += 16 * nb;
    }
  }
}

/* ---- x W^T, int8 (see gemm_avx512.c: byte pairs (k0, k2), (k1, k3) into vpmaddwd) ---------- */

static inline __attribute__((always_inline)) void q8_tile(const int mr, const int32_t *ap,
                                                          int64_t len, const char *p, int64_t used,
                                                          __m256i out[][2], int fetch) {
  __m256i acc[NT_MR][2]; /* in registers; copied out once, at the end */
  KT_UNROLL
  for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (int64_t u = 0; u < used; u++) {
    if (fetch) _mm_prefetch(p + (u + Y_PREFETCH_UNITS) * KT_Z_UNIT, _MM_HINT_T1);
    const __m256i w0 = _mm256_loadu_si256((const __m256i *)(p + u * KT_Z_UNIT));
    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(p + u * KT_Z_UNIT + 32));
    const __m256i l0 = _mm256_srai_epi16(_mm256_slli_epi16(w0, 8), 8),
                  h0 = _mm256_srai_epi16(w0, 8);
    const __m256i l1 = _mm256_srai_epi16(_mm256_slli_epi16(w1, 8), 8),
                  h1 = _mm256_srai_epi16(w1, 8);
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      const __m256i al = _mm256_set1_epi32(ap[m * len + 2 * u]);
      const __m256i ah = _mm256_set1_epi32(ap[m * len + 2 * u + 1]);
      acc[m][0] = _mm256_add_epi32(
          acc[m][0], _mm256_add_epi32(_mm256_madd_epi16(l0, al), _mm256_madd_epi16(h0, ah)));
      acc[m][1] = _mm256_add_epi32(
          acc[m][1], _mm256_add_epi32(_mm256_madd_epi16(l1, al), _mm256_madd_epi16(h1, ah)));
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) out[m][0] = acc[m][0], out[m][1] = acc[m][1];
}

static void y_gemm_nt_q8(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                         int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_INT8), len = 2 * units;
  const int64_t used = (k + 3) / 4;
  int32_t *ap = scratch;
  __m256i acc[NT_MR][2];
  for (int64_t m0 = 0; m0 < a->count; m0 += NT_MR) {
    const int64_t mr = a->count - m0 < NT_MR ? a->count - m0 : NT_MR;
    kt_z_q8_pairs(a, m0, mr, k, units, ap, len);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const char *p = kt_z_unit_ptr(w->data, units, (n0 + j0) / 16, 0);
      switch (mr) {
        case 1: q8_tile(1, ap, len, p, used, acc, m0 == 0); break;
        case 2: q8_tile(2, ap, len, p, used, acc, m0 == 0); break;
        case 3: q8_tile(3, ap, len, p, used, acc, m0 == 0); break;
        default: q8_tile(4, ap, len, p, used, acc, m0 == 0); break;
      }
      for (int64_t i = 0; i < mr; i++) {
        const int64_t src = a->index ? (int64_t)a->index[m0 + i] : m0 + i;
        int32_t dot[16];
        _mm256_storeu_si256((__m256i *)dot, acc[i][0]);
        _mm256_storeu_si256((__m256i *)(dot + 8), acc[i][1]);
        for (int64_t j = 0; j < 16 && j0 + j < n; j++)
          c[(m0 + i) * ldc + j0 + j] = a->scale[src] * w->scale[n0 + j0 + j] * (float)dot[j];
      }
    }
  }
}

/* ---- x W and the LoRA products ------------------------------------------------------------- */

/* p[0 .. min(ncols, 16)) (+)= the 16 values r0, r1 (the row of a x W register tile). */
static inline void store_row16(float *p, __m256 r0, __m256 r1, int64_t ncols, int add) {
  if (ncols >= 16) {
    if (add) {
      r0 = _mm256_add_ps(_mm256_loadu_ps(p), r0);
      r1 = _mm256_add_ps(_mm256_loadu_ps(p + 8), r1);
    }
    _mm256_storeu_ps(p, r0);
    _mm256_storeu_ps(p + 8, r1);
    return;
  }
  float r[16];
  _mm256_storeu_ps(r, r0);
  _mm256_storeu_ps(r + 8, r1);
  for (int64_t j = 0; j < ncols; j++) p[j] = add ? p[j] + r[j] : r[j];
}

static inline __attribute__((always_inline)) void nn_tile(const int mr, const float *af,
                                                          int64_t ldaf, const float *wt,
                                                          int64_t cnt, float *c, int64_t ldc,
                                                          int64_t ncols, int add, float s) {
  __m256 acc[NN_MR][2];
  KT_UNROLL
  for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t cc = 0; cc < cnt; cc++) {
    const __m256 w0 = _mm256_loadu_ps(wt + cc * WT_LD), w1 = _mm256_loadu_ps(wt + cc * WT_LD + 8);
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      const __m256 av = _mm256_broadcast_ss(af + m * ldaf + cc);
      acc[m][0] = _mm256_fmadd_ps(av, w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(av, w1, acc[m][1]);
    }
  }
  const __m256 sv = _mm256_set1_ps(s);
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    store_row16(c + m * ldc, _mm256_mul_ps(sv, acc[m][0]), _mm256_mul_ps(sv, acc[m][1]), ncols,
                add);
  }
}

static void nn_rows(int64_t count, const float *a0, int64_t ldaf, const float *wt, int64_t cnt,
                    float *c0, int64_t ldc, int64_t ncols, int add, float s) {
  for (int64_t j0 = 0; j0 < ncols; j0 += 16)
    for (int64_t m0 = 0; m0 < count; m0 += NN_MR) {
      const float *af = a0 + m0 * ldaf;
      float *c = c0 + m0 * ldc + j0;
      const int64_t nc = ncols - j0;
      switch (count - m0 < NN_MR ? count - m0 : NN_MR) {
        case 1: nn_tile(1, af, ldaf, wt + j0, cnt, c, ldc, nc, add, s); break;
        case 2: nn_tile(2, af, ldaf, wt + j0, cnt, c, ldc, nc, add, s); break;
        case 3: nn_tile(3, af, ldaf, wt + j0, cnt, c, ldc, nc, add, s); break;
        case 4: nn_tile(4, af, ldaf, wt + j0, cnt, c, ldc, nc, add, s); break;
        case 5: nn_tile(5, af, ldaf, wt + j0, cnt, c, ldc, nc, add, s); break;
        default: nn_tile(6, af, ldaf, wt + j0, cnt, c, ldc, nc, add, s); break;
      }
    }
}

/* As nn_tile over the panel transpose_block builds for bf16 or int8 W (t; int8 with its row
 * scales folded into A): each 16-column strip of a panel row is widened in registers as the tile
 * reads it. bf16: its even and odd columns (a shift, an and) into accumulators of their own,
 * interleaved at the store; int8: sign-extended and converted. Each output sums the same
 * products in the same order as nn_tile over the fp32 panel, from a panel a half or a quarter
 * the size that costs no conversions to build. nv strips of 16 columns (1, or 2 and 4 for the
 * tiles of 2 and 1 rows, so that 8 accumulators hide the FMA latency). */
static inline __attribute__((always_inline)) void nn_tile_panel(const int mr, const int nv,
                                                                const kt_wtype t, const float *af,
                                                                int64_t ldaf, const char *wt,
                                                                int64_t cnt, float *c, int64_t ldc,
                                                                int64_t ncols, int add) {
  const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
  const int64_t row_bytes = WT_LD * kt_wtype_size(t), strip_bytes = 16 * kt_wtype_size(t);
  __m256 acc[NN_MR][4][2]; /* row, strip, two vectors (bf16: even / odd columns) */
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int v = 0; v < nv; v++) acc[m][v][0] = acc[m][v][1] = _mm256_setzero_ps();
  }
  for (int64_t cc = 0; cc < cnt; cc++) {
    KT_UNROLL
    for (int v = 0; v < nv; v++) {
      const char *row = wt + cc * row_bytes + v * strip_bytes;
      __m256 w0, w1;
      if (t == KT_WTYPE_BF16) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)row);
        w0 = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        w1 = _mm256_castsi256_ps(_mm256_and_si256(w, hi));
      } else {
        w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)row)));
        w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + 8))));
      }
      KT_UNROLL
      for (int m = 0; m < mr; m++) {
        const __m256 av = _mm256_broadcast_ss(af + m * ldaf + cc);
        acc[m][v][0] = _mm256_fmadd_ps(av, w0, acc[m][v][0]);
        acc[m][v][1] = _mm256_fmadd_ps(av, w1, acc[m][v][1]);
      }
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int v = 0; v < nv; v++) {
      if (16 * v >= ncols) break;
      __m256 r0 = acc[m][v][0], r1 = acc[m][v][1];
      if (t == KT_WTYPE_BF16) {
        const __m256 lo = _mm256_unpacklo_ps(r0, r1); /* columns 0-3 | 8-11 */
        const __m256 up = _mm256_unpackhi_ps(r0, r1); /* columns 4-7 | 12-15 */
        r0 = _mm256_permute2f128_ps(lo, up, 0x20);
        r1 = _mm256_permute2f128_ps(lo, up, 0x31);
      }
      store_row16(c + m * ldc + 16 * v, r0, r1, ncols - 16 * v, add);
    }
  }
}

/* The rows of A over a panel in register tiles of up to NN_MR rows and 16 columns; a last tile
 * of 2 rows takes 32 columns at a time, of 1 row 64. */
#define NN_PANEL_ROWS(T)                                                           \
  for (int64_t m0 = 0; m0 < count; m0 += NN_MR) {                                  \
    const int64_t mr = count - m0 < NN_MR ? count - m0 : NN_MR;                    \
    const int64_t step = mr == 1 ? 64 : mr == 2 ? 32 : 16;                         \
    const float *af = a0 + m0 * ldaf;                                              \
    for (int64_t j0 = 0; j0 < ncols; j0 += step) {                                 \
      const char *p = (const char *)(const void *)wt + j0 * kt_wtype_size(T);      \
      float *c = c0 + m0 * ldc + j0;                                               \
      const int64_t nc = ncols - j0;                                               \
      switch (mr) {                                                                \
        case 1: nn_tile_panel(1, 4, T, af, ldaf, p, cnt, c, ldc, nc, add); break;  \
        case 2: nn_tile_panel(2, 2, T, af, ldaf, p, cnt, c, ldc, nc, add); break;  \
        case 3: nn_tile_panel(3, 1, T, af, ldaf, p, cnt, c, ldc, nc, add); break;  \
        case 4: nn_tile_panel(4, 1, T, af, ldaf, p, cnt, c, ldc, nc, add); break;  \
        case 5: nn_tile_panel(5, 1, T, af, ldaf, p, cnt, c, ldc, nc, add); break;  \
        default: nn_tile_panel(6, 1, T, af, ldaf, p, cnt, c, ldc, nc, add); break; \
      }                                                                            \
    }                                                                              \
  }

/* nn_rows with s = 1 over the panel transpose_block builds: bf16 for bf16 W, int8 for int8 W,
 * fp32 otherwise. */
static void nn_rows_w(int64_t count, const float *a0, int64_t ldaf, const float *wt, int64_t cnt,
                      float *c0, int64_t ldc, int64_t ncols, int add, kt_wtype t) {
  if (t == KT_WTYPE_INT8)
    NN_PANEL_ROWS(KT_WTYPE_INT8)
  else if (t == KT_WTYPE_BF16)
    NN_PANEL_ROWS(KT_WTYPE_BF16)
  else
    nn_rows(count, a0, ldaf, wt, cnt, c0, ldc, ncols, add, 1.0f);
}
#undef NN_PANEL_ROWS

/* In-register transpose of 8 x 8 dwords. */
static inline void transpose8(__m256i r[8]) {
  __m256i t[8];
  KT_UNROLL
  for (int i = 0; i < 4; i++) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  KT_UNROLL
  for (int i = 0; i < 2; i++) { /* r[4i + c]: rows 4i..4i+3, column c of each 128-bit lane */
    r[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  KT_UNROLL
  for (int c = 0; c < 4; c++) {
    t[c] = _mm256_permute2x128_si256(r[c], r[4 + c], 0x20);
    t[4 + c] = _mm256_permute2x128_si256(r[c], r[4 + c], 0x31);
  }
  KT_UNROLL
  for (int i = 0; i < 8; i++) r[i] = t[i];
}

static inline void transpose_block(const kt_packed *w, int64_t c0, int64_t cnt, int64_t n0,
                                   int64_t n, float *wt) {
  const int64_t per = kt_z_per_unit(w->wtype), units = kt_z_units(w->cols, w->wtype);
  const int64_t lines = (n + per - 1) / per, u0 = n0 / per;
  const int64_t nblocks = kt_z_rows_padded(w->rows) / 16;
  for (int64_t b = c0 / 16; b * 16 < c0 + cnt; b++) {
    if (b + Y_PREFETCH_BLOCKS < nblocks) /* short runs far apart: see gemm_avx512.c */
      for (int64_t l = 0; l < lines; l++)
        _mm_prefetch(kt_z_unit_ptr(w->data, units, b + Y_PREFETCH_BLOCKS, u0 + l), _MM_HINT_T1);
    for (int64_t half = 0; half < 2; half++) { /* rows 8 half .. 8 half + 7 of the block */
      const int64_t row0 = (b * 16 + 8 * half - c0) * WT_LD;
      for (int64_t g = 0; g * 8 < lines; g++) { /* 8 units: 16 bf16 or 32 int8 columns */
        __m256i r[8];
        KT_UNROLL
        for (int i = 0; i < 8; i++)
          r[i] = _mm256_loadu_si256(
              (const __m256i *)(kt_z_unit_ptr(w->data, units, b, u0 + 8 * g + i) + 32 * half));
        transpose8(r);
        KT_UNROLL
        for (int i = 0; i < 8; i++) {
          const int64_t at = row0 + i * WT_LD + 8 * per * g; /* the panel element of r[i] */
          float *d = wt + at;
          if (w->wtype == KT_WTYPE_FP8) {
            __m256 v[4];
            e4m3x16_to_f32(_mm256_castsi256_si128(r[i]), 1, v);
            e4m3x16_to_f32(_mm256_extracti128_si256(r[i], 1), 1, v + 2);
            KT_UNROLL
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(d + 8 * j, v[j]);
          } else if (w->wtype == KT_WTYPE_INT8) { /* the panel of int8 W stays int8 */
            _mm256_storeu_si256((__m256i *)((int8_t *)(void *)wt + at), r[i]);
          } else { /* the panel of bf16 W stays bf16 (nn_rows_w) */
            _mm256_storeu_si256((__m256i *)((uint16_t *)(void *)wt + at), r[i]);
          }
        }
      }
    }
  }
}

/* x W for at most NN_FEW_M rows (a few tokens per expert): no transpose. The 8 lanes of a half
 * unit are 8 rows c of W; they are multiplied lane by lane by A[m, c] and summed over the blocks
 * in accumulators that are summed across their lanes only at the end:
 *   bf16  one accumulator per column (lanes: rows 8h + i of every block): a half unit costs a
 *         shift and an and, and 2 FMAs per row of A;
 *   int8  one accumulator per unit (4 columns): each 8-byte group (2 rows x 4 columns) is
 *         sign-extended and converted to fp32 and multiplied by A[m, c] spread to match (one
 *         permute per group and row of A, shared by the tile's units), so a half unit costs 4
 *         extensions and 4 conversions, and 4 FMAs per row of A;
 * where a transpose costs about 10 operations per half unit. The register tile holds FEW_ACC
 * accumulators (1 or 2 rows of A), which leaves registers for A and W: its column groups (8 or 4
 * columns of bf16, 8 or 4 units of int8) tile the units W is padded to, so no load passes them.
 * The blocks are taken in chunks of FEW_CHUNK_BYTES of the item's columns (up to KT_WIDE_N of
 * them): within a chunk the tile walks the columns in groups, so the chunk is read from DRAM
 * once, and each tile of the first row fetches its units of the next chunk into L2. The
 * accumulators live in the scratch between chunks. */
static inline __attribute__((always_inline)) void nn_few_tile(
    const int mr, const int slots, kt_wtype t, const float *af, int64_t ldaf, const kt_packed *w,
    int64_t units, int64_t b0, int64_t b1, int64_t u0, float *acc_mem, int64_t ld_acc, int first,
    int64_t ahead, int64_t nblocks) {
  const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
  __m256 acc[FEW_ACC];
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int j = 0; j < slots; j++)
      acc[m * slots + j] =
          first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_mem + (m * ld_acc + j) * 8);
  }
  for (int64_t b = b0; b < b1; b++) {
    const char *p = kt_z_unit_ptr(w->data, units, b, u0);
    if (ahead && b + ahead < nblocks) /* this tile's units of the block `ahead` blocks on */
      for (int l = 0; l < (t == KT_WTYPE_BF16 ? slots / 2 : slots); l++)
        _mm_prefetch(kt_z_unit_ptr(w->data, units, b + ahead, u0 + l), _MM_HINT_T1);
    KT_UNROLL
    for (int h = 0; h < 2; h++) { /* rows 8h .. 8h + 7 of the block */
      __m256 av[2];
      KT_UNROLL
      for (int m = 0; m < mr; m++) av[m] = _mm256_loadu_ps(af + m * ldaf + 16 * b + 8 * h);
      if (t != KT_WTYPE_BF16) {
        KT_UNROLL
        for (int g = 0; g < 4; g += 2) { /* lane 4i + q of group g: row 8h + 2g + i, column q */
          __m256 ag[2][2];
          KT_UNROLL
          for (int d = 0; d < 2; d++) {
            const int gg = g + d;
            const __m256i spread = _mm256_setr_epi32(2 * gg, 2 * gg, 2 * gg, 2 * gg, 2 * gg + 1,
                                                     2 * gg + 1, 2 * gg + 1, 2 * gg + 1);
            KT_UNROLL
            for (int m = 0; m < mr; m++) ag[m][d] = _mm256_permutevar8x32_ps(av[m], spread);
          }
          KT_UNROLL
          for (int i = 0; i < slots; i++) {
            const char *q = p + i * KT_Z_UNIT + 32 * h + 8 * g; /* groups g and g + 1 */
            __m256 wg[2];
            if (t == KT_WTYPE_FP8) { /* / 256: nn_gemm_few folded the 256 into A */
              e4m3x16_to_f32(_mm_loadu_si128((const __m128i *)q), 0, wg);
            } else {
              const __m128i bytes = _mm_loadu_si128((const __m128i *)q);
              wg[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
              wg[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
            }
            KT_UNROLL
            for (int d = 0; d < 2; d++) {
              KT_UNROLL
              for (int m = 0; m < mr; m++)
                acc[m * slots + i] = _mm256_fmadd_ps(ag[m][d], wg[d], acc[m * slots + i]);
            }
          }
        }
      } else {
        KT_UNROLL
        for (int i = 0; i < slots / 2; i++) {
          const __m256i v = _mm256_loadu_si256((const __m256i *)(p + i * KT_Z_UNIT + 32 * h));
          const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
          const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
          KT_UNROLL
          for (int m = 0; m < mr; m++) {
            acc[m * slots + 2 * i] = _mm256_fmadd_ps(av[m], even, acc[m * slots + 2 * i]);
            acc[m * slots + 2 * i + 1] = _mm256_fmadd_ps(av[m], odd, acc[m * slots + 2 * i + 1]);
          }
        }
      }
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int j = 0; j < slots; j++)
      _mm256_storeu_ps(acc_mem + (m * ld_acc + j) * 8, acc[m * slots + j]);
  }
}

/* The two 128-bit halves of v added: lanes i and 4 + i. */
static inline __m128 fold_halves(__m256 v) {
  return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

/* c[0 .. n) = one row's accumulators summed across their lanes (the x W driver of nn_drive.h
 * calls it at the end). */
static inline void few_sum_lanes(const float *acc, kt_wtype t, int64_t n, float *c) {
  if (t == KT_WTYPE_BF16) {
    for (int64_t j = 0; j < n; j++) {
      const __m128 q = fold_halves(_mm256_loadu_ps(acc + j * 8));
      const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
      c[j] = _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
    }
    return;
  }
  for (int64_t u = 0; 4 * u < n; u++) { /* the two halves of a unit's accumulator: 2 rows */
    float four[4];
    _mm_storeu_ps(four, fold_halves(_mm256_loadu_ps(acc + u * 8)));
    for (int64_t j = 4 * u; j < n && j < 4 * u + 4; j++) c[j] = four[j - 4 * u];
  }
}

/* nn_drive.h's transpose_bf16: 8 x 8 at a time in registers, the edges one by one. */
static void transpose_bf16(const uint16_t *src, int64_t ld, int64_t rows, int64_t cols,
                           float *dst) {
  const int64_t rows8 = rows & ~(int64_t)7, cols8 = cols & ~(int64_t)7;
  for (int64_t j0 = 0; j0 < cols8; j0 += 8)
    for (int64_t i0 = 0; i0 < rows8; i0 += 8) {
      __m256i r[8];
      KT_UNROLL
      for (int j = 0; j < 8; j++)
        r[j] = _mm256_castps_si256(
            bf16x8_to_f32(_mm_loadu_si128((const __m128i *)(src + (j0 + j) * ld + i0))));
      transpose8(r);
      KT_UNROLL
      for (int i = 0; i < 8; i++)
        _mm256_storeu_ps(dst + (i0 + i) * WT_LD + j0, _mm256_castsi256_ps(r[i]));
    }
  for (int64_t i = 0; i < rows; i++) /* the edges */
    for (int64_t j = i < rows8 ? cols8 : 0; j < cols; j++)
      dst[i * WT_LD + j] = kt_bf16_to_f32(src[j * ld + i]);
}

#include "nn_drive.h"

/* C[m, q] = sum_c A[m, c] B[q, c] (B: [n, k] row-major bf16) for at most NN_FEW_M rows of A:
 * dot products along the rows of B with 8 fp32 lanes each, summed across the lanes at the end, as
 * avx512's z_lora_nt does (staging B for the tile would cost more than the product of a row). */
static inline __attribute__((always_inline)) void lora_nt_few_tile(const int mr, const int nq,
                                                                   const float *af, int64_t len,
                                                                   const uint16_t *b, int64_t k,
                                                                   float *c, int64_t ldc) {
  __m256 acc[4][4];
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int q = 0; q < nq; q++) acc[m][q] = _mm256_setzero_ps();
  }
  const int64_t k8 = k & ~(int64_t)7;
  for (int64_t c0 = 0; c0 < k8; c0 += 8) {
    KT_UNROLL
    for (int q = 0; q < nq; q++) {
      const __m256 bv = bf16x8_to_f32(_mm_loadu_si128((const __m128i *)(b + q * k + c0)));
      KT_UNROLL
      for (int m = 0; m < mr; m++)
        acc[m][q] = _mm256_fmadd_ps(_mm256_loadu_ps(af + m * len + c0), bv, acc[m][q]);
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int q = 0; q < nq; q++) {
      const __m128 h = fold_halves(acc[m][q]);
      const __m128 d = _mm_add_ps(h, _mm_movehl_ps(h, h));
      float sum = _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
      for (int64_t cc = k8; cc < k; cc++) sum += af[m * len + cc] * kt_bf16_to_f32(b[q * k + cc]);
      c[m * ldc + q] = sum;
    }
  }
}

static void y_lora_nt(const kt_rows *a, const uint16_t *b, int64_t n, int64_t k, float *c,
                      int64_t ldc, void *scratch) {
  if (a->count > NN_FEW_M) {
    lora_nt(a, b, n, k, c, ldc, scratch);
    return;
  }
  const int64_t M = a->count, len = (k + 15) & ~(int64_t)15;
  float *af = scratch;
  for (int64_t m = 0; m < M; m++) row_to_f32(kt_row(a, m), k, af + m * len, len, NULL);
  /* rows of A x rows of B per tile: at most 8 accumulators of the 16 ymm registers */
  const int64_t mr = M > 2 ? 2 : M, step = M > 2 ? 2 : 4;
  for (int64_t m0 = 0; m0 < M; m0 += mr) {
    const int two = M - m0 > 1 && mr > 1;
    for (int64_t q0 = 0; q0 < n; q0 += step) {
      const int64_t nq = n - q0 < step ? n - q0 : step;
      const float *am = af + m0 * len;
      const uint16_t *bq = b + q0 * k;
      float *cq = c + m0 * ldc + q0;
#define LORA_FEW_CASE(MR)                                             \
  switch (nq) {                                                       \
    case 4: lora_nt_few_tile(MR, 4, am, len, bq, k, cq, ldc); break;  \
    case 3: lora_nt_few_tile(MR, 3, am, len, bq, k, cq, ldc); break;  \
    case 2: lora_nt_few_tile(MR, 2, am, len, bq, k, cq, ldc); break;  \
    default: lora_nt_few_tile(MR, 1, am, len, bq, k, cq, ldc); break; \
  }
      if (two)
        LORA_FEW_CASE(2)
      else
        LORA_FEW_CASE(1)
#undef LORA_FEW_CASE
    }
  }
}

/* ---- int4 x W^T (W4A8): vpmaddubsw on the nibbles as stored -------------------------------
 * vpmaddubsw multiplies the unsigned nibbles (q + 8: 0 .. 15; the low ones of a unit are its
 * columns 0 .. 3 in VNNI order, the high ones 4 .. 7) by the int8 activations (|a| <= 128)
 * in pairs, each pair at most 2 * 15 * 128 = 3840: no saturation. 4 units (32 columns, 8 pairs
 * per int16 lane) stay below 2^15, so each run of 32 columns is summed in int16, widened by
 * vpmaddwd and added to its group's int32 sum, which starts at -8 sum(a) over the group: the
 * + 8 comes back out exactly. The group's sum, converted, times the group scales of its 8 rows
 * of W (one vector of the engine's blocked scales, kt_int4_scale_index), adds to an fp32 total in
 * ascending groups. */

enum {
  Q4_MR = 4,   /* x W^T: rows of A per register tile (x 8 rows of W: one half unit) */
  Q4_RUN = 32, /* columns of one int16 run (x W^T) or of one run of a group (x W) */
};

/* mr rows of A x nh half units of W (8 rows each, side by side: half h of block h / 2 from p,
 * bstride between blocks; more lines in flight per instruction for 1 or 2 rows of A), all
 * groups: tot[m nh + h] = the fp32 sum over the groups (sct: the first block's scales). A's
 * quads are broadcast from memory (a load-port operation, unlike from a general register). */
static inline __attribute__((always_inline)) void q4_nt_tile(
    const int mr, const int sub, const int nh, const int8_t *ab, int64_t len, const int32_t *asum,
    int64_t ng, const char *p, int64_t bstride, int64_t used, const float *sct, __m256 out[]) {
  __m256 tot[Q4_MR * 2]; /* in registers; copied out once, at the end */
  const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  KT_UNROLL
  for (int m = 0; m < mr * nh; m++) tot[m] = _mm256_setzero_ps();
  int64_t u = 0;
  for (int64_t g = 0; g < ng; g++) {
    __m256i grp[Q4_MR * 2];
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      KT_UNROLL
      for (int h = 0; h < nh; h++) grp[m * nh + h] = _mm256_set1_epi32(-8 * asum[m * ng + g]);
    }
    KT_UNROLL
    for (int s = 0; s < sub && u < used; s++) { /* the group's runs (the last may be short) */
      __m256i acc[Q4_MR * 2];
      KT_UNROLL
      for (int m = 0; m < mr * nh; m++) acc[m] = _mm256_setzero_si256();
      KT_UNROLL
      for (int i = 0; i < Q4_RUN / 8; i++, u++) {
        __m256i lo[4], hi[4];
        KT_UNROLL
        for (int h = 0; h < nh; h++) {
          if (h % 2 == 0) /* a block's line, 4 KB ahead */
            _mm_prefetch(p + (h / 2) * bstride + (u + Y_PREFETCH_UNITS) * KT_Z_UNIT, _MM_HINT_T1);
          const __m256i v = _mm256_loadu_si256(
              (const __m256i *)(p + (h / 2) * bstride + 32 * (h % 2) + u * KT_Z_UNIT));
          lo[h] = _mm256_and_si256(v, low);
          hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
        KT_UNROLL
        for (int m = 0; m < mr; m++) {
          const __m256i al = _mm256_broadcastd_epi32(_mm_loadu_si32(ab + m * len + 8 * u));
          const __m256i ah = _mm256_broadcastd_epi32(_mm_loadu_si32(ab + m * len + 8 * u + 4));
          KT_UNROLL
          for (int h = 0; h < nh; h++)
            acc[m * nh + h] = _mm256_add_epi16(
                acc[m * nh + h],
                _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], al), _mm256_maddubs_epi16(hi[h], ah)));
        }
      }
      KT_UNROLL
      for (int m = 0; m < mr * nh; m++)
        grp[m] = _mm256_add_epi32(grp[m], _mm256_madd_epi16(acc[m], ones));
    }
    KT_UNROLL
    for (int h = 0; h < nh; h++) {
      const __m256 sc = _mm256_loadu_ps(sct + ((h / 2) * ng + g) * 16 + 8 * (h % 2));
      KT_UNROLL
      for (int m = 0; m < mr; m++)
        tot[m * nh + h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(grp[m * nh + h]), sc, tot[m * nh + h]);
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr * nh; m++) out[m] = tot[m];
}

/* Rows m0 .. m0 + mr of A zero padded to len bytes, and their sums per group (vpsadbw of
 * a + 128 over 32 bytes at a time; the padding adds 128 each, taken back out). */
static void q4_rows_q8(const kt_rows_q8 *a, int64_t m0, int64_t mr, int64_t k, int64_t G,
                       int64_t ng, int8_t *ab, int64_t len, int32_t *asum) {
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  for (int64_t i = 0; i < mr; i++) {
    const int64_t src = a->index ? (int64_t)a->index[m0 + i] : m0 + i;
    int8_t *d = ab + i * len;
    memcpy(d, a->base + src * a->ld, (size_t)k);
    memset(d + k, 0, (size_t)(len - k));
    for (int64_t g = 0; g < ng; g++) {
      const int64_t c0 = g * G, c1 = ((k < c0 + G ? k : c0 + G) + 31) & ~(int64_t)31;
      __m256i s = _mm256_setzero_si256();
      for (int64_t q = c0; q < c1; q += 32)
        s = _mm256_add_epi64(
            s, _mm256_sad_epu8(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(d + q)), flip),
                               _mm256_setzero_si256()));
      int64_t four[4];
      _mm256_storeu_si256((__m256i *)four, s);
      asum[i * ng + g] = (int32_t)(four[0] + four[1] + four[2] + four[3] - 128 * (c1 - c0));
    }
  }
}

static size_t q4_nt_scratch_bytes(int64_t k) {
  const int64_t len = kt_z_units(k, KT_WTYPE_INT4) * 8, ng = (k + 31) / 32;
  return (size_t)(Q4_MR * len + Q4_MR * ng * 4) + KT_CACHE_LINE;
}

#define Q4_NT_TILE(MR, NH)                                                \
  do {                                                                    \
    if (sub == 1)                                                         \
      q4_nt_tile(MR, 1, NH, ab, len, asum, ng, p, bstride, used, s, tot); \
    else if (sub == 2)                                                    \
      q4_nt_tile(MR, 2, NH, ab, len, asum, ng, p, bstride, used, s, tot); \
    else                                                                  \
      q4_nt_tile(MR, 4, NH, ab, len, asum, ng, p, bstride, used, s, tot); \
  } while (0)

/* The table's gemm_nt_q4: tiles of 1 row of A x 32 rows of W, 2 x 16 or up to Q4_MR x 8. */
static void y_gemm_nt_q4(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                         int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_INT4), len = 8 * units;
  const int64_t G = w->group, ng = kt_int4_groups(k, G), used = (k + 7) / 8, sub = G / Q4_RUN;
  const int64_t bstride = units * KT_Z_UNIT;
  int8_t *ab = scratch;                                         /* [Q4_MR, len] */
  int32_t *asum = (int32_t *)(void *)(ab + Q4_MR * len);        /* [Q4_MR, ng] */
  const float *sct = w->scale + kt_int4_scale_index(n0, 0, ng); /* [n / 16, ng, 16] */
  for (int64_t m0 = 0; m0 < a->count; m0 += Q4_MR) {
    const int64_t mr = a->count - m0 < Q4_MR ? a->count - m0 : Q4_MR;
    q4_rows_q8(a, m0, mr, k, G, ng, ab, len, asum);
    int64_t nh = 1;
    for (int64_t j0 = 0; j0 < n;
         j0 += 8 * nh) {                     /* from half (j0 / 8) % 2 of block (n0 + j0) / 16 */
      const int64_t left = (n - j0 + 7) / 8; /* half units: 4, then 2, then 1 (from even halves) */
      nh = mr == 1 && left >= 4 ? 4 : mr <= 2 && left >= 2 ? 2 : 1;
      const char *p = kt_z_unit_ptr(w->data, units, (n0 + j0) / 16, 0) + 32 * ((j0 / 8) % 2);
      const float *s = sct + (j0 / 16) * ng * 16 + j0 % 16;
      __m256 tot[Q4_MR * 2];
      if (nh == 4)
        Q4_NT_TILE(1, 4);
      else if (mr == 1 && nh == 2)
        Q4_NT_TILE(1, 2);
      else if (mr == 1)
        Q4_NT_TILE(1, 1);
      else if (mr == 2 && nh == 2)
        Q4_NT_TILE(2, 2);
      else if (mr == 2)
        Q4_NT_TILE(2, 1);
      else if (mr == 3)
        Q4_NT_TILE(3, 1);
      else
        Q4_NT_TILE(4, 1);
      for (int64_t i = 0; i < mr; i++) {
        const int64_t src = a->index ? (int64_t)a->index[m0 + i] : m0 + i;
        for (int64_t h = 0; h < nh && 8 * h < n - j0; h++)
          store8(c + (m0 + i) * ldc + j0 + 8 * h,
                 _mm256_mul_ps(_mm256_set1_ps(a->scale[src]), tot[i * nh + h]), n - j0 - 8 * h);
      }
    }
  }
}

/* ---- int4 x W -------------------------------------------------------------------------------
 * The group scale of each output column's group folds into A in fp32: the columns n0 .. n0 + n
 * (n <= 64, n0 a multiple of 64) are one or two runs of 32 columns inside one group each, and
 * each run has its own folded copy of A. A half unit (8 rows of W) becomes fp32 without a
 * shuffle per value: two unpacks, with zeros and then with the exponent word 0x4b00, widen its
 * bytes to the floats 2^23 + byte; masking keeps 2^23 + lo (minus 2^23 + 8: q, exactly) or
 * 2^23 + 16 hi (minus 2^23 + 128: 16 q, exactly; the 16 comes back out by a multiply, exact
 * in every fp32 sum, at the end). */

/* v[r] lane 4i + t: byte t of row r + 4i of the half unit at p (columns t and 4 + t). */
static inline void q4_half_words(const char *p, __m256i v[4]) {
  const __m256i y = _mm256_loadu_si256((const __m256i *)p), e = _mm256_set1_epi16(0x4b00);
  const __m256i rows01 = _mm256_unpacklo_epi8(y, _mm256_setzero_si256()); /* rows 0 1 | 4 5 */
  const __m256i rows23 = _mm256_unpackhi_epi8(y, _mm256_setzero_si256()); /* rows 2 3 | 6 7 */
  v[0] = _mm256_unpacklo_epi16(rows01, e);
  v[1] = _mm256_unpackhi_epi16(rows01, e);
  v[2] = _mm256_unpacklo_epi16(rows23, e);
  v[3] = _mm256_unpackhi_epi16(rows23, e);
}

static inline __m256 q4_lo(__m256i v) {
  const __m256 f = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x4b00000f)));
  return _mm256_sub_ps(f, _mm256_set1_ps(8388616.0f)); /* 2^23 + 8 */
}

/* 16 q, exactly (callers take the 16 back out: a power of two, exact in every sum). */
static inline __m256 q4_hi16(__m256i v) {
  const __m256 f = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x4b0000f0)));
  return _mm256_sub_ps(f, _mm256_set1_ps(8388736.0f)); /* 2^23 + 128 */
}

/* At most NN_FEW_M rows of A: no transpose. Each v[r] of a half unit is multiplied by the
 * folded A of rows r and r + 4, spread to match (per chunk of W, into the scratch), into two
 * accumulators per unit (low nibbles, and high ones as 16 q); lane 4i + t sums column t (or 4 + t)
 * over rows = 4i + r mod 8, the two halves added at the end. A register tile of 8 accumulators (1
 * row of A x 4 units or 2 x 2: one run of 32 columns) walks the blocks b0 .. b1 of a chunk (the
 * spread from block b0 on); the accumulators live in the scratch between chunks. The tile's units
 * of the block `ahead` blocks on are fetched into L2. */
static inline __attribute__((always_inline)) void q4_few_tile(
    const int mr, const int slots, const float *spread, int64_t ld_spread, const kt_packed *w,
    int64_t units, int64_t b0, int64_t b1, int64_t u0, float *acc_mem, int64_t ld_acc, int first,
    int64_t ahead, int64_t nblocks) {
  __m256 acc[FEW_ACC];
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int j = 0; j < 2 * slots; j++)
      acc[m * 2 * slots + j] =
          first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_mem + m * ld_acc + 8 * j);
  }
  for (int64_t b = b0; b < b1; b++) {
    const char *p = kt_z_unit_ptr(w->data, units, b, u0);
    if (ahead && b + ahead < nblocks)
      for (int i = 0; i < slots; i++)
        _mm_prefetch(kt_z_unit_ptr(w->data, units, b + ahead, u0 + i), _MM_HINT_T1);
    KT_UNROLL
    for (int h = 0; h < 2; h++) {
      const float *sp = spread + ((b - b0) * 2 + h) * 32;
      KT_UNROLL
      for (int i = 0; i < slots; i++) {
        __m256i v[4];
        q4_half_words(p + i * KT_Z_UNIT + 32 * h, v);
        KT_UNROLL
        for (int r = 0; r < 4; r++) {
          const __m256 lo = q4_lo(v[r]), hi = q4_hi16(v[r]);
          KT_UNROLL
          for (int m = 0; m < mr; m++) {
            const __m256 av = _mm256_loadu_ps(sp + m * ld_spread + 8 * r);
            __m256 *x = acc + m * 2 * slots + 2 * i;
            x[0] = _mm256_fmadd_ps(av, lo, x[0]);
            x[1] = _mm256_fmadd_ps(av, hi, x[1]);
          }
        }
      }
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int j = 0; j < 2 * slots; j++)
      _mm256_storeu_ps(acc_mem + m * ld_acc + 8 * j, acc[m * 2 * slots + j]);
  }
}

/* dst[s ld + r] = the scale of row r0 + r of W in the group of run s (ns <= 2 runs from column
 * n0), r < k rounded up to 16 (r0 a multiple of 16; 0 past W's rows): a vector of the blocked
 * scales per 16 rows and run. */
static void q4_run_scales(const kt_packed *w, int64_t r0, int64_t k, int64_t n0, int64_t ns,
                          float *dst, int64_t ld) {
  const int64_t ng = kt_int4_groups(w->cols, w->group);
  for (int64_t s = 0; s < ns; s++) {
    const int64_t g = (n0 + Q4_RUN * s) / w->group;
    for (int64_t r = 0; r < k; r += 16) {
      const float *src = w->scale + kt_int4_scale_index(r0 + r, g, ng);
      _mm256_storeu_ps(dst + s * ld + r, _mm256_loadu_ps(src));
      _mm256_storeu_ps(dst + s * ld + r + 8, _mm256_loadu_ps(src + 8));
    }
  }
}

/* Blocks of W per chunk of a few-row int4 x W of n columns: about Q4_FEW_CHUNK_BYTES of its runs
 * of 32 columns (4 units each), so that runs x blocks, and with it the spread A, is bounded. */
static int64_t q4_few_chunk(int64_t n) {
  const int64_t nruns = (n + Q4_RUN - 1) / Q4_RUN;
  return kt_max_size(1, Q4_FEW_CHUNK_BYTES / (size_t)(nruns * 4 * KT_Z_UNIT));
}

/* Floats of one row's spread A in a chunk of q4_nn_few of n columns: 32 per half block and run,
 * at most 64 Q4_FEW_CHUNK_BYTES / 256 whatever n (up to 256 runs). */
static int64_t q4_few_spread_floats(int64_t n) {
  return (n + Q4_RUN - 1) / Q4_RUN * 2 * q4_few_chunk(n) * 32;
}

/* x W of a few rows (calls of up to n columns: a narrower call's spread is no larger, see
 * q4_few_spread_floats) and of more (the transposed block, A's slice and two runs' scales). */
static size_t q4_nn_scratch_bytes(int64_t n, int64_t k) {
  (void)k;
  const int64_t nruns = (n + Q4_RUN - 1) / Q4_RUN;
  const int64_t spread = 64 * kt_max_size(Q4_FEW_CHUNK_BYTES / (4 * KT_Z_UNIT), nruns);
  const size_t few = (size_t)(NN_FEW_M * (spread + 64 * nruns)) * 4;
  const size_t many = (size_t)(NN_CH * WT_LD + NN_MR * NN_CH + 2 * NN_CH) * 4;
  return kt_max_size(few, many) + KT_CACHE_LINE;
}

/* At most NN_FEW_M rows of A, n <= KT_WIDE_N columns (n0 a multiple of 64): W in chunks of whole
 * rows of the span (one run of memory per block). Per chunk each row of A is folded with the
 * scales of each run's group (one fp32 multiply per value, as the transposed path does) and
 * spread for the tile; then the tile walks the chunk run by run, the first row's tiles fetching
 * the next chunk into L2. The lanes are summed at the end, in the same order in any span and
 * chunk. */
static void q4_nn_few(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                      int64_t ldc, void *scratch) {
  const int64_t k = w->rows, nblocks = (k + 15) / 16, ng = kt_int4_groups(w->cols, w->group);
  const int64_t units = kt_z_units(w->cols, KT_WTYPE_INT4), u0 = n0 / 8, lines = (n + 7) / 8;
  const int64_t nruns = (n + Q4_RUN - 1) / Q4_RUN, chunk = q4_few_chunk(n);
  /* accumulators: 16 floats per unit, the units rounded up to whole runs (a tile's 4 units) */
  const int64_t ld_spread = q4_few_spread_floats(n), ld_run = 2 * chunk * 32, ld_acc = 64 * nruns;
  float *spread = scratch, *acc = spread + a->count * ld_spread; /* [count][run][2 chunk][4][8] */
  for (int64_t b0 = 0; b0 < nblocks; b0 += chunk) {
    const int64_t b1 = nblocks - b0 < chunk ? nblocks : b0 + chunk;
    for (int64_t m = 0; m < a->count; m++) {
      const uint16_t *arow = kt_row(a, m);
      for (int64_t hb = 0; hb < 2 * (b1 - b0); hb++) { /* rows r0 .. r0 + 7 of W */
        const int64_t r0 = 16 * b0 + 8 * hb;
        __m256 av = _mm256_setzero_ps();
        if (r0 + 8 <= k) {
          av = bf16x8_to_f32(_mm_loadu_si128((const __m128i *)(arow + r0)));
        } else if (r0 < k) {
          float part[8] = {0};
          for (int64_t i = 0; i < k - r0; i++) part[i] = kt_bf16_to_f32(arow[r0 + i]);
          av = _mm256_loadu_ps(part);
        }
        for (int64_t s = 0; s < nruns; s++) { /* rows r, r + 4 of the half, 4 times */
          const int64_t g = (n0 + Q4_RUN * s) / w->group;
          const __m256 v = _mm256_mul_ps(
              av, _mm256_loadu_ps(w->scale + kt_int4_scale_index(r0 - r0 % 16, g, ng) + r0 % 16));
          float *d = spread + m * ld_spread + s * ld_run + hb * 32;
          KT_UNROLL
          for (int r = 0; r < 4; r++)
            _mm256_storeu_ps(d + 8 * r,
                             _mm256_permutevar8x32_ps(
                                 v, _mm256_setr_epi32(r, r, r, r, r + 4, r + 4, r + 4, r + 4)));
        }
      }
    }
    for (int64_t m0 = 0; m0 < a->count; m0 += 2) {
      const int two = a->count - m0 > 1;
      for (int64_t j = 0; j < lines; j += two ? 2 : 4) { /* units j ..: run j / 4 */
        const float *sp = spread + m0 * ld_spread + (j / 4) * ld_run;
        float *am = acc + m0 * ld_acc + j * 16;
        const int64_t ahead = m0 == 0 ? b1 - b0 : 0;
        if (two)
          q4_few_tile(2, 2, sp, ld_spread, w, units, b0, b1, u0 + j, am, ld_acc, b0 == 0, ahead,
                      nblocks);
        else
          q4_few_tile(1, 4, sp, ld_spread, w, units, b0, b1, u0 + j, am, ld_acc, b0 == 0, ahead,
                      nblocks);
      }
    }
  }
  for (int64_t m = 0; m < a->count; m++)
    for (int64_t j = 0; j < 2 * lines; j++) { /* columns 4j .. 4j + 3; odd j: 16 q */
      float four[4];
      const __m128 f = fold_halves(_mm256_loadu_ps(acc + m * ld_acc + 8 * j));
      _mm_storeu_ps(four, j % 2 ? _mm_mul_ps(f, _mm_set1_ps(0.0625f)) : f);
      for (int64_t t = 0; t < 4 && 4 * j + t < n; t++) c[m * ldc + 4 * j + t] = four[t];
    }
}

/* wt[cc, 0 .. 8 lines) = W[c0 + cc, n0 .. n0 + 8 lines) as fp32 (c0 a multiple of 16): each
 * v[r] gives rows r and r + 4 of the half unit, its low and high values paired by 128-bit
 * lanes. */
static void q4_transpose_block(const kt_packed *w, int64_t c0, int64_t cnt, int64_t n0,
                               int64_t lines, float *wt) {
  const int64_t units = kt_z_units(w->cols, KT_WTYPE_INT4), u0 = n0 / 8;
  const int64_t nblocks = kt_z_rows_padded(w->rows) / 16;
  for (int64_t b = c0 / 16; b * 16 < c0 + cnt; b++) {
    if (b + Y_PREFETCH_BLOCKS < nblocks)
      for (int64_t l = 0; l < lines; l++)
        _mm_prefetch(kt_z_unit_ptr(w->data, units, b + Y_PREFETCH_BLOCKS, u0 + l), _MM_HINT_T1);
    const char *p = kt_z_unit_ptr(w->data, units, b, u0);
    KT_UNROLL
    for (int h = 0; h < 2; h++) {
      float *dst = wt + (b * 16 + 8 * h - c0) * WT_LD;
      for (int64_t u = 0; u < lines; u++) {
        __m256i v[4];
        q4_half_words(p + u * KT_Z_UNIT + 32 * h, v);
        KT_UNROLL
        for (int r = 0; r < 4; r++) {
          const __m256 lo = q4_lo(v[r]), hi = _mm256_mul_ps(q4_hi16(v[r]), _mm256_set1_ps(0.0625f));
          _mm256_storeu_ps(dst + r * WT_LD + 8 * u, _mm256_permute2f128_ps(lo, hi, 0x20));
          _mm256_storeu_ps(dst + (r + 4) * WT_LD + 8 * u, _mm256_permute2f128_ps(lo, hi, 0x31));
        }
      }
    }
  }
}

/* The table's gemm_nn_q4: a few rows on q4_nn_few (up to KT_WIDE_N columns in one call); more
 * through the transposed fp32 block and the register tile of nn_drive.h, a band of 64 columns at
 * a time, each run of 32 columns with its rows of A folded by its group. */
static void y_gemm_nn_q4(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                         int64_t ldc, void *scratch) {
  if (a->count <= NN_FEW_M) {
    q4_nn_few(a, w, n0, n, c, ldc, scratch);
    return;
  }
  const int64_t k = w->rows, ns = (n + Q4_RUN - 1) / Q4_RUN;
  float *wt = scratch, *af = wt + NN_CH * WT_LD, *sc = af + NN_MR * NN_CH; /* sc [ns, NN_CH] */
  for (int64_t c0 = 0; c0 < k; c0 += NN_CH) {
    const int64_t cnt = k - c0 < NN_CH ? k - c0 : NN_CH, len = (cnt + 15) & ~(int64_t)15;
    q4_transpose_block(w, c0, cnt, n0, (n + 7) / 8, wt);
    q4_run_scales(w, c0, cnt, n0, ns, sc, NN_CH);
    for (int64_t s = 0; s < ns; s++) {
      const int64_t ncols = n - Q4_RUN * s < Q4_RUN ? n - Q4_RUN * s : Q4_RUN;
      for (int64_t m0 = 0; m0 < a->count; m0 += NN_MR) {
        const int64_t mr = a->count - m0 < NN_MR ? a->count - m0 : NN_MR;
        for (int64_t i = 0; i < mr; i++)
          row_to_f32(kt_row(a, m0 + i) + c0, cnt, af + i * NN_CH, len, sc + s * NN_CH);
        nn_rows(mr, af, NN_CH, wt + Q4_RUN * s, cnt, c + m0 * ldc + Q4_RUN * s, ldc, ncols, c0 > 0,
                1.0f);
      }
    }
  }
}

/* ---- fp8: e4m3 units to bf16 units ------------------------------------------------------------
 */

/* 16 words holding e4m3 bytes (0 .. 255) as bf16: normal values by shifting the exponent and
 * mantissa into place, the 7 subnormals from byte tables (vpshufb), NaN (0x7f, 0xff) by
 * compare. */
static inline __m256i e4m3_words_to_bf16(__m256i w) {
  const __m128i lo =
      _mm_setr_epi8(0, 0, (char)0x80, (char)0xc0, 0, 0x20, 0x40, 0x60, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m128i hi =
      _mm_setr_epi8(0, 0x3b, 0x3b, 0x3b, 0x3c, 0x3c, 0x3c, 0x3c, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m256i mag = _mm256_and_si256(w, _mm256_set1_epi16(0x7f));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8);
  const __m256i norm = _mm256_add_epi16(_mm256_slli_epi16(mag, 4), _mm256_set1_epi16(120 << 7));
  /* a word's high byte is 0, so it looks up entry 0 (zero) of each table */
  const __m256i sub = _mm256_or_si256(
      _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(lo), mag),
      _mm256_slli_epi16(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(hi), mag), 8));
  __m256i v = _mm256_blendv_epi8(norm, sub, _mm256_cmpgt_epi16(_mm256_set1_epi16(8), mag));
  v = _mm256_blendv_epi8(v, _mm256_set1_epi16(0x7fc0),
                         _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7f)));
  return _mm256_or_si256(v, sign);
}

/* decode_fp8 of the table: each half of an fp8 unit (8 rows: bytes k0 k1 k2 k3) gives the
 * halves of two bf16 units (k0 k1, and k2 k3), the bytes spread to words by one in-lane shuffle
 * each. */
static void y_decode_fp8(const kt_packed *w, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                         kt_sweep sweep, void *dst) {
  const __m256i lo = _mm256_broadcastsi128_si256(
      _mm_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1));
  const __m256i hi = _mm256_broadcastsi128_si256(
      _mm_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1));
  const int64_t su = kt_z_units(w->cols, KT_WTYPE_FP8), du = kt_z_units(nc, KT_WTYPE_BF16);
  for (int64_t b = 0; b < kt_z_rows_padded(nr) / 16; b++) {
    const char *s = kt_z_unit_ptr(w->data, su, r0 / 16 + b, c0 / 4);
    char *d = (char *)dst + b * du * KT_Z_UNIT;
    for (int64_t u = 0; u < du / 2; u++) {
      /* the source runs are short (2 KB or 1 KB): fetch the next panel's while this one decodes */
      const char *next = kt_z_fp8_next_unit(w, r0, nr, c0, nc, sweep, b, u);
      if (next) _mm_prefetch(next, _MM_HINT_T0);
      KT_UNROLL
      for (int half = 0; half < 2; half++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(s + u * KT_Z_UNIT + 32 * half));
        _mm256_storeu_si256((__m256i *)(d + 2 * u * KT_Z_UNIT + 32 * half),
                            e4m3_words_to_bf16(_mm256_shuffle_epi8(v, lo)));
        _mm256_storeu_si256((__m256i *)(d + (2 * u + 1) * KT_Z_UNIT + 32 * half),
                            e4m3_words_to_bf16(_mm256_shuffle_epi8(v, hi)));
      }
    }
  }
}

static const kt_kernels y_table = {
    .isa = KT_ISA_AVX2,
    .variant = "avx2-fma+vpmaddwd",
    .packed_bytes = kt_z_packed_bytes,
    .pack = kt_z_pack,
    .unpack = kt_z_unpack,
    .gemm_scratch_bytes = y_scratch_bytes,
    .gemm_nt = y_gemm_nt_fma,
    .gemm_nt_fp8_few = y_gemm_nt_fp8_few,
    .decode_fp8 = y_decode_fp8,
    .gemm_nt_q8 = y_gemm_nt_q8,
    .gemm_nn = gemm_nn,
    .gemm_nt_q4 = y_gemm_nt_q4,
    .gemm_nn_q4 = y_gemm_nn_q4,
    .sigmoid = kt_act_avx2_sigmoid,
    .silu = kt_act_avx2_silu,
    .store_bf16 = kt_store_bf16_avx2,
    .lora_nt = y_lora_nt,
    .lora_nn = lora_nn,
    .lora_add_nt = lora_add_nt,
    .lora_add_nn = lora_add_nn,
    .outer_rn = outer_rn,
    .outer_nr = outer_nr,
};

const kt_kernels *kt_kernels_avx2(uint32_t features) {
  (void)features;
  return &y_table;
}
