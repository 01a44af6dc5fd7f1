/* gemm_avx512.c - the avx512 family (AVX-512 F/BW/VL + FMA): packing, the GEMMs without the
 * optional instructions, the LoRA products, and the choice among the family's variants.
 *
 *   x W^T, bf16   fp32 FMA: each W unit is split into its even and odd columns (shift, and)
 *                 and feeds a 12 x 32 register tile; vdpbf16ps where the CPU has it
 *                 (gemm_avx512_bf16.c)
 *   x W^T, int8   vpmaddwd on sign-extended byte pairs (exact in int32); vpdpbusd where the CPU
 *                 has it (gemm_avx512_vnni.c)
 *   x W^T, int4   nibbles masked and shifted into int8 units, vpmaddubsw (vpdpbusd where the CPU
 *                 has it) per group in int32 (avx512_nt_q4.h)
 *   x W           W is transposed, 16 x 16 units at a time in registers, into a per-thread fp32
 *                 scratch of NN_CH rows x 64 columns; a 6 x 64 register tile of fp32 FMAs then
 *                 runs over it. The LoRA products use the same tile.
 * Every sum runs over its index in ascending order within one fp32 (or int32) lane. */
#include "avx512_layout.h"
#include "avx512_nt_q4.h"

void kt_avx512_nt_bf16_dp(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                          int64_t ldc, void *scratch);
void kt_avx512_nn_bf16_dp(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                          int64_t ldc, void *scratch);
void kt_avx512_nn_bf16_dp_model(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n,
                                float *c, int64_t ldc, void *scratch);
void kt_avx512_nt_bf16_dp_model(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n,
                                float *c, int64_t ldc, void *scratch);
void kt_avx512_nt_q8_vnni(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                          int64_t ldc, void *scratch);
void kt_avx512_nt_q4_vnni(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                          int64_t ldc, void *scratch);
void kt_avx512_nt_q4_madd(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                          int64_t ldc, void *scratch);
void kt_act_avx512_sigmoid(const float *x, float *y, int64_t n);
void kt_act_avx512_silu(const float *x, float *y, int64_t n);
void kt_store_bf16_avx512(uint16_t *dst, const float *v, int64_t n, int accumulate);

enum {
  NN_MR = 6,   /* rows of A per x W register tile */
  NN_CH = 128, /* rows of W transposed into the scratch at a time */
  WT_LD = 64,  /* columns of the transposed scratch */
  Z_PREFETCH_BLOCKS = 4,
  Z_PREFETCH_UNITS = 64,      /* x W^T: how far ahead each stream of units is fetched */
  FEW_LANES = 16,             /* fp32 lanes of one accumulator */
  NN_FEW_M = KT_FEW_ROWS,     /* x W of at most this many rows: lane accumulators, no transpose */
  FEW_ACC = 16,               /* ... in a register tile of 16 accumulators */
  FEW_CHUNK_BYTES = 131072,   /* ... over chunks of this many bytes of W */
  Q4_RUNS = 2,                /* int4 x W: runs of 32 columns in a call (one group each) */
  Q4_FEW_CHUNK_BYTES = 65536, /* ... a few rows: bytes of W per chunk */
};

static size_t q4_few_scratch_bytes(int64_t n);

/* x W^T: A rows as fp32 (or int16 pairs), 12 rows x (cols rounded up to 64); int4: A's int8 rows
 * with their group sums (avx512_nt_q4.h);
 * x W: the transposed block and a 6-row slice of A; int4: the slice folded with two groups and
 * their scales. */
static size_t z_scratch_bytes(int64_t n, int64_t k) {
  const size_t nt = (size_t)KT_Z_NT_MR * (size_t)(kt_z_units(k, KT_WTYPE_BF16) * 2) * 4;
  const size_t nn = (size_t)(NN_CH * WT_LD + NN_MR * NN_CH) * 4;
  const size_t nn_q4 = (size_t)(NN_CH * WT_LD + Q4_RUNS * (NN_MR + 1) * NN_CH) * 4;
  /* x W of a few rows: the rows (k padded to 16) and 16 lanes per output; int4: a chunk of the
   * rows folded with each group's scales, and 16 lanes per output */
  const int64_t kp = (k + 15) & ~(int64_t)15;
  const size_t few = (size_t)NN_FEW_M * (size_t)(kp + ((n + 15) & ~(int64_t)15) * 16) * 4;
  const size_t few_q4 = q4_few_scratch_bytes(n);
  const size_t most = kt_max_size(kt_max_size(nt + nn, nn_q4), kt_max_size(few, few_q4));
  const size_t nn_dp = kt_nn_dp_scratch_bytes(k); /* the variants with vdpbf16ps */
  return kt_max_size(kt_max_size(most + KT_CACHE_LINE, nn_dp), kt_z4_nt_scratch_bytes(k));
}

/* ---- x W^T, bf16, fp32 FMA ------------------------------------------------------------------ */

/* bf16 to fp32, n values, zero padded to len. */
static inline void row_to_f32(const uint16_t *src, int64_t n, float *dst, int64_t len,
                              const float *scale) {
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = kt_z_mask(n - i > 0 ? n - i : 0);
    const __m256i h = _mm256_maskz_loadu_epi16(m, src + i);
    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, scale + i));
    _mm512_storeu_ps(dst + i, v);
  }
}

static inline __attribute__((always_inline)) void nt_fma_tile(const int mr, const int nb,
                                                              const float *af, int64_t len,
                                                              const char *p0, int64_t bstride,
                                                              int64_t used, float *c, int64_t ldc,
                                                              int64_t ncols) {
  const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
  __m512 acc[KT_Z_NT_MR][2];
  KT_UNROLL
  for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t u = 0; u < used; u++) {
    /* The hardware prefetchers restart at every 4 KB page: keep DRAM busy from here. */
    _mm_prefetch(p0 + (u + Z_PREFETCH_UNITS) * KT_Z_UNIT, _MM_HINT_T0);
    if (nb > 1) _mm_prefetch(p0 + bstride + (u + Z_PREFETCH_UNITS) * KT_Z_UNIT, _MM_HINT_T0);
    const __m512i w0 = _mm512_loadu_si512(p0 + u * KT_Z_UNIT);
    const __m512 e0 = _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16));
    const __m512 o0 = _mm512_castsi512_ps(_mm512_and_si512(w0, hi));
    __m512 e1 = e0, o1 = o0;
    if (nb > 1) {
      const __m512i w1 = _mm512_loadu_si512(p0 + bstride + u * KT_Z_UNIT);
      e1 = _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16));
      o1 = _mm512_castsi512_ps(_mm512_and_si512(w1, hi));
    }
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      const __m512 ae = _mm512_set1_ps(af[m * len + 2 * u]);
      const __m512 ao = _mm512_set1_ps(af[m * len + 2 * u + 1]);
      acc[m][0] = _mm512_fmadd_ps(ao, o0, _mm512_fmadd_ps(ae, e0, acc[m][0]));
      if (nb > 1) acc[m][1] = _mm512_fmadd_ps(ao, o1, _mm512_fmadd_ps(ae, e1, acc[m][1]));
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    kt_z_store(c + m * ldc, acc[m][0], ncols);
    if (nb > 1) kt_z_store(c + m * ldc + 16, acc[m][1], ncols - 16);
  }
}

#define NT_FMA_CASE(MR)                                               \
  case MR:                                                            \
    if (nb > 1)                                                       \
      nt_fma_tile(MR, 2, af, len, p0, bstride, used, cc, ldc, ncols); \
    else                                                              \
      nt_fma_tile(MR, 1, af, len, p0, bstride, used, cc, ldc, ncols); \
    break;

static void z_gemm_nt_fma(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                          int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_BF16), len = 2 * units;
  const int64_t used = (k + 1) / 2, bstride = units * KT_Z_UNIT;
  float *af = scratch;
  for (int64_t m0 = 0; m0 < a->count; m0 += KT_Z_NT_MR) {
    const int64_t mr = a->count - m0 < KT_Z_NT_MR ? a->count - m0 : KT_Z_NT_MR;
    for (int64_t i = 0; i < mr; i++) row_to_f32(kt_row(a, m0 + i), k, af + i * len, len, NULL);
    for (int64_t j0 = 0; j0 < n; j0 += 32) {
      const char *p0 = kt_z_unit_ptr(w->data, units, (n0 + j0) / 16, 0);
      const int64_t ncols = n - j0, nb = ncols > 16 ? 2 : 1;
      float *cc = c + m0 * ldc + j0;
      switch (mr) {
        NT_FMA_CASE(1)
        NT_FMA_CASE(2)
        NT_FMA_CASE(3)
        NT_FMA_CASE(4)
        NT_FMA_CASE(5)
        NT_FMA_CASE(6)
        NT_FMA_CASE(7)
        NT_FMA_CASE(8)
        NT_FMA_CASE(9)
        NT_FMA_CASE(10)
        NT_FMA_CASE(11)
        NT_FMA_CASE(12)
      }
    }
  }
}

/* ---- x W^T, int8, vpmaddwd ------------------------------------------------------------------- */

/* Each W unit holds 4 bytes per row: k0 k1 k2 k3. Shifts split it into the int16 pairs (k0, k2)
 * and (k1, k3); A is stored as the matching pairs, so two vpmaddwd give the exact 4-term sum. */
static inline __attribute__((always_inline)) void q8_madd_tile(const int mr, const int nb,
                                                               const int32_t *ap, int64_t len,
                                                               const char *p0, int64_t bstride,
                                                               int64_t used, __m512i out[][2]) {
  __m512i acc[KT_Z_NT_MR][2]; /* in registers; copied out once, at the end */
  KT_UNROLL
  for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  for (int64_t u = 0; u < used; u++) {
    const __m512i w0 = _mm512_loadu_si512(p0 + u * KT_Z_UNIT);
    const __m512i l0 = _mm512_srai_epi16(_mm512_slli_epi16(w0, 8), 8),
                  h0 = _mm512_srai_epi16(w0, 8);
    __m512i l1 = l0, h1 = h0;
    if (nb > 1) {
      const __m512i w1 = _mm512_loadu_si512(p0 + bstride + u * KT_Z_UNIT);
      l1 = _mm512_srai_epi16(_mm512_slli_epi16(w1, 8), 8);
      h1 = _mm512_srai_epi16(w1, 8);
    }
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      const __m512i al = _mm512_set1_epi32(ap[m * len + 2 * u]);
      const __m512i ah = _mm512_set1_epi32(ap[m * len + 2 * u + 1]);
      acc[m][0] = _mm512_add_epi32(
          acc[m][0], _mm512_add_epi32(_mm512_madd_epi16(l0, al), _mm512_madd_epi16(h0, ah)));
      if (nb > 1)
        acc[m][1] = _mm512_add_epi32(
            acc[m][1], _mm512_add_epi32(_mm512_madd_epi16(l1, al), _mm512_madd_epi16(h1, ah)));
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) out[m][0] = acc[m][0], out[m][1] = acc[m][1];
}

#define Q8_MADD_CASE(MR)                                    \
  case MR:                                                  \
    if (nb > 1)                                             \
      q8_madd_tile(MR, 2, ap, len, p0, bstride, used, acc); \
    else                                                    \
      q8_madd_tile(MR, 1, ap, len, p0, bstride, used, acc); \
    break;

static void z_gemm_nt_q8_madd(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n,
                              float *c, int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_INT8), len = 2 * units;
  const int64_t used = (k + 3) / 4, bstride = units * KT_Z_UNIT;
  int32_t *ap = scratch;
  __m512i acc[KT_Z_NT_MR][2];
  for (int64_t m0 = 0; m0 < a->count; m0 += KT_Z_NT_MR) {
    const int64_t mr = a->count - m0 < KT_Z_NT_MR ? a->count - m0 : KT_Z_NT_MR;
    kt_z_q8_pairs(a, m0, mr, k, units, ap, len);
    for (int64_t j0 = 0; j0 < n; j0 += 32) {
      const char *p0 = kt_z_unit_ptr(w->data, units, (n0 + j0) / 16, 0);
      const int64_t ncols = n - j0, nb = ncols > 16 ? 2 : 1;
      switch (mr) {
        Q8_MADD_CASE(1)
        Q8_MADD_CASE(2)
        Q8_MADD_CASE(3)
        Q8_MADD_CASE(4)
        Q8_MADD_CASE(5)
        Q8_MADD_CASE(6)
        Q8_MADD_CASE(7)
        Q8_MADD_CASE(8)
        Q8_MADD_CASE(9)
        Q8_MADD_CASE(10)
        Q8_MADD_CASE(11)
        Q8_MADD_CASE(12)
      }
      for (int64_t i = 0; i < mr; i++) {
        const int64_t src = a->index ? (int64_t)a->index[m0 + i] : m0 + i;
        const float sa = a->scale[src];
        KT_UNROLL
        for (int v = 0; v < nb; v++) {
          kt_z_store_scaled(c + (m0 + i) * ldc + j0 + 16 * v, acc[i][v], sa,
                            w->scale + n0 + j0 + 16 * v, ncols - 16 * v);
        }
      }
    }
  }
}

/* ---- x W^T, int4, vpmaddubsw ---------------------------------------------------------------
 * avx512_nt_q4.h without vpdpbusd: vpmaddubsw multiplies the unsigned nibble bytes by A's signed
 * bytes into pairs of int16 (at most 2 * 15 * 128 each, no saturation), the two halves of a unit
 * are added (at most 8 * 15 * 128) and vpmaddwd by ones widens each lane's pair to int32. */
#define KT_NT_Q4_NAME kt_avx512_nt_q4_madd
#define KT_Q4_MR 4 /* 4 x 32 outputs: the products take registers of their own */
#define KT_Q4_DOT(acc, lo, hi, alo, ahi)                                                         \
  _mm512_add_epi32((acc), _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16((lo), (alo)),  \
                                                             _mm512_maddubs_epi16((hi), (ahi))), \
                                            _mm512_set1_epi16(1)))
#include "avx512_nt_q4.h"

/* ---- e4m3 to fp32 --------------------------------------------------------------------------- */

/* 32 e4m3 bytes as fp32 in two vectors (bytes 0-15, 16-31), exactly, divided by 256 unless
 * `exact` (one multiply fewer per vector; the caller folds the 256 into a scale): each byte,
 * sign-extended to 16 bits and shifted, is the fp16 of its value / 256 (subnormals included),
 * which vcvtph2ps widens; the NaN bytes 0x7f and 0xff become an fp16 NaN first. */
static inline void e4m3x32_to_f32(__m256i bytes, int exact, __m512 out[2]) {
  const __m512i h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(bytes), 7),
                                     _mm512_set1_epi16((short)0xbf80));
  const __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(h, _mm512_set1_epi16(0x3f80)),
                                                _mm512_set1_epi16(0x3f80));
  const __m512i v = _mm512_mask_mov_epi16(h, nan, _mm512_set1_epi16(0x7e00));
  out[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
  out[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
  if (exact)
    for (int i = 0; i < 2; i++) out[i] = _mm512_mul_ps(out[i], _mm512_set1_ps(256.0f));
}

/* ---- x W^T, fp8, a few rows: e4m3 decoded in registers ------------------------------------ */

/* Each unit's 4 quarters (16 bytes: 4 rows of W x its 4 columns) are decoded to fp32 (/ 256,
 * undone in the block scale) and multiplied by A[m, 4u .. 4u + 4) repeated 4 times, into one
 * accumulator per quarter: lane 4i + j of quarter q sums row 4q + i, columns 4u + j. At the end
 * of each 128-column block the accumulators are added to the totals times 256 * its scale; the
 * totals are summed over j at the end. 2 rows of A at a time (16 accumulators); one 16-row
 * block of W at a time, streamed (prefetched 4 KB ahead) and kept in L1 for the next 2 rows. */
static inline __attribute__((always_inline)) void nt_fp8_tile(const int mr, const float *af,
                                                              int64_t len, const char *p,
                                                              int64_t used, const float *scale,
                                                              float *c, int64_t ldc,
                                                              int64_t nrows) {
  __m512 tot[2][4], acc[2][4];
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int q = 0; q < 4; q++) tot[m][q] = _mm512_setzero_ps();
  }
  for (int64_t u0 = 0; u0 < used; u0 += KT_FP8_BLOCK / 4) {
    const int64_t u1 = used - u0 < KT_FP8_BLOCK / 4 ? used : u0 + KT_FP8_BLOCK / 4;
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      KT_UNROLL
      for (int q = 0; q < 4; q++) acc[m][q] = _mm512_setzero_ps();
    }
    for (int64_t u = u0; u < u1; u++) {
      _mm_prefetch(p + (u + Z_PREFETCH_UNITS) * KT_Z_UNIT, _MM_HINT_T0);
      __m512 wq[4];
      e4m3x32_to_f32(_mm256_loadu_si256((const __m256i *)(p + u * KT_Z_UNIT)), 0, wq);
      e4m3x32_to_f32(_mm256_loadu_si256((const __m256i *)(p + u * KT_Z_UNIT + 32)), 0, wq + 2);
      KT_UNROLL
      for (int m = 0; m < mr; m++) {
        const __m512 ap = _mm512_broadcast_f32x4(_mm_loadu_ps(af + m * len + 4 * u));
        KT_UNROLL
        for (int q = 0; q < 4; q++) acc[m][q] = _mm512_fmadd_ps(ap, wq[q], acc[m][q]);
      }
    }
    const __m512 s = _mm512_set1_ps(256.0f * scale[u0 / (KT_FP8_BLOCK / 4)]);
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      KT_UNROLL
      for (int q = 0; q < 4; q++) tot[m][q] = _mm512_fmadd_ps(s, acc[m][q], tot[m][q]);
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int q = 0; q < 4; q++) {
      float lanes[16];
      _mm512_storeu_ps(lanes, tot[m][q]);
      for (int i = 0; i < 4 && 4 * q + i < nrows; i++)
        c[m * ldc + 4 * q + i] =
            (lanes[4 * i] + lanes[4 * i + 1]) + (lanes[4 * i + 2] + lanes[4 * i + 3]);
    }
  }
}

static void z_gemm_nt_fp8_few(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                              int64_t ldc, void *scratch) {
  const int64_t k = w->cols, units = kt_z_units(k, KT_WTYPE_FP8), len = 4 * units;
  const int64_t used = (k + 3) / 4, nbc = (k + KT_FP8_BLOCK - 1) / KT_FP8_BLOCK;
  const float *scale = w->scale + (n0 / KT_FP8_BLOCK) * nbc;
  float *af = scratch;
  for (int64_t m = 0; m < a->count; m++) row_to_f32(kt_row(a, m), k, af + m * len, len, NULL);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const char *p = kt_z_unit_ptr(w->data, units, (n0 + j0) / 16, 0);
    const int64_t nrows = n - j0 < 16 ? n - j0 : 16;
    for (int64_t m0 = 0; m0 < a->count; m0 += 2) {
      float *cc = c + m0 * ldc + j0;
      if (a->count - m0 > 1)
        nt_fp8_tile(2, af + m0 * len, len, p, used, scale, cc, ldc, nrows);
      else
        nt_fp8_tile(1, af + m0 * len, len, p, used, scale, cc, ldc, nrows);
    }
  }
}

/* ---- x W and the LoRA products: one register tile over a row-major fp32 block ------------- */

/* c[m, 0:ncols] (+)= s * sum_cc af[m, cc] * wt[cc, 0:ncols], m < mr, ncols <= 16 nv. */
static inline __attribute__((always_inline)) void nn_tile(const int mr, const int nv,
                                                          const float *af, int64_t ldaf,
                                                          const float *wt, int64_t cnt, float *c,
                                                          int64_t ldc, int64_t ncols, int add,
                                                          float s) {
  __m512 acc[NN_MR][4];
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int v = 0; v < nv; v++) acc[m][v] = _mm512_setzero_ps();
  }
  for (int64_t cc = 0; cc < cnt; cc++) {
    __m512 wv[4];
    KT_UNROLL
    for (int v = 0; v < nv; v++) wv[v] = _mm512_loadu_ps(wt + cc * WT_LD + 16 * v);
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      const __m512 av = _mm512_set1_ps(af[m * ldaf + cc]);
      KT_UNROLL
      for (int v = 0; v < nv; v++) acc[m][v] = _mm512_fmadd_ps(av, wv[v], acc[m][v]);
    }
  }
  const __m512 sv = _mm512_set1_ps(s);
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int v = 0; v < nv; v++) {
      const __mmask16 k = kt_z_mask(ncols - 16 * v);
      float *p = c + m * ldc + 16 * v;
      __m512 r = _mm512_mul_ps(sv, acc[m][v]);
      if (add) r = _mm512_add_ps(_mm512_maskz_loadu_ps(k, p), r);
      _mm512_mask_storeu_ps(p, k, r);
    }
  }
}

#define NN_CASE(MR, NV) \
  case MR * 8 + NV: nn_tile(MR, NV, af, ldaf, wt, cnt, c, ldc, ncols, add, s); break;
#define NN_CASES(MR) NN_CASE(MR, 1) NN_CASE(MR, 2) NN_CASE(MR, 3) NN_CASE(MR, 4)

/* All rows of af (count of them) against wt: the tile over rows of 6. */
static void nn_rows(int64_t count, const float *a0, int64_t ldaf, const float *wt, int64_t cnt,
                    float *c0, int64_t ldc, int64_t ncols, int add, float s) {
  const int nv = (int)((ncols + 15) / 16);
  for (int64_t m0 = 0; m0 < count; m0 += NN_MR) {
    const int mr = (int)(count - m0 < NN_MR ? count - m0 : NN_MR);
    const float *af = a0 + m0 * ldaf;
    float *c = c0 + m0 * ldc;
    switch (mr * 8 + nv) {
      NN_CASES(1)
      NN_CASES(2)
      NN_CASES(3)
      NN_CASES(4)
      NN_CASES(5)
      NN_CASES(6)
    }
  }
}

/* x W's panel is fp32 for every weight type. */
static inline void nn_rows_w(int64_t count, const float *a0, int64_t ldaf, const float *wt,
                             int64_t cnt, float *c0, int64_t ldc, int64_t ncols, int add,
                             kt_wtype t) {
  (void)t;
  nn_rows(count, a0, ldaf, wt, cnt, c0, ldc, ncols, add, 1.0f);
}

/* wt[cc, 0:64) = W[c0 + cc, n0 : n0 + 64) as fp32 for cc < cnt (rounded up to the block; columns
 * past W's are zero). c0 is a multiple of 16. */
static void transpose_block(const kt_packed *w, int64_t c0, int64_t cnt, int64_t n0, int64_t n,
                            float *wt) {
  const int64_t units = kt_z_units(w->cols, w->wtype);
  const int64_t lines = (n + kt_z_per_unit(w->wtype) - 1) / kt_z_per_unit(w->wtype);
  const int64_t u0 = n0 / kt_z_per_unit(w->wtype), nblocks = kt_z_rows_padded(w->rows) / 16;
  for (int64_t b = c0 / 16; b * 16 < c0 + cnt; b++) {
    float *dst = wt + (b * 16 - c0) * WT_LD;
    __m512i r[16];
    /* Each block contributes one short run (2 KB for 64 bf16 columns) far from the next: too
     * short for the hardware prefetchers, so ask for the runs a few blocks ahead. */
    if (b + Z_PREFETCH_BLOCKS < nblocks)
      for (int64_t l = 0; l < lines; l++)
        _mm_prefetch(kt_z_unit_ptr(w->data, units, b + Z_PREFETCH_BLOCKS, u0 + l), _MM_HINT_T1);
    if (w->wtype != KT_WTYPE_BF16) {
      KT_UNROLL
      for (int i = 0; i < 16; i++)
        r[i] = _mm512_loadu_si512(kt_z_unit_ptr(w->data, units, b, n0 / 4 + i));
      kt_z_transpose16(r);
      KT_UNROLL
      for (int i = 0; i < 16; i++) {
        float *d = dst + i * WT_LD;
        if (w->wtype == KT_WTYPE_FP8) {
          __m512 v[4];
          e4m3x32_to_f32(_mm512_castsi512_si256(r[i]), 1, v);
          e4m3x32_to_f32(_mm512_extracti64x4_epi64(r[i], 1), 1, v + 2);
          KT_UNROLL
          for (int j = 0; j < 4; j++) _mm512_storeu_ps(d + 16 * j, v[j]);
          continue;
        }
        const __m128i q[4] = {
            _mm512_extracti32x4_epi32(r[i], 0), _mm512_extracti32x4_epi32(r[i], 1),
            _mm512_extracti32x4_epi32(r[i], 2), _mm512_extracti32x4_epi32(r[i], 3)};
        KT_UNROLL
        for (int j = 0; j < 4; j++)
          _mm512_storeu_ps(d + 16 * j, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q[j])));
      }
      continue;
    }
    for (int64_t g = 0; g * 32 < n; g++) {
      KT_UNROLL
      for (int i = 0; i < 16; i++)
        r[i] = _mm512_loadu_si512(kt_z_unit_ptr(w->data, units, b, n0 / 2 + 16 * g + i));
      kt_z_transpose16(r);
      KT_UNROLL
      for (int i = 0; i < 16; i++) {
        float *d = dst + i * WT_LD + 32 * g;
        const __m512i lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(r[i]));
        const __m512i hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r[i], 1));
        _mm512_storeu_ps(d, _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)));
        _mm512_storeu_ps(d + 16, _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)));
      }
    }
  }
}

/* x W for at most NN_FEW_M rows (a few tokens per expert): no transpose. A unit's 16 lanes are
 * 16 rows c of W; they are multiplied lane by lane by A[m, c] and summed over the blocks in
 * accumulators that are summed across their lanes only at the end:
 *   bf16  one accumulator per column: per unit 2 shifts and 2 FMAs per row of A;
 *   int8  one accumulator per unit (4 columns): each 16-byte quarter (4 rows x 4 columns) is
 *         sign-extended and converted to fp32 and multiplied by A[m, c] spread to match, so a
 *         unit costs 4 extensions, 4 conversions and 4 FMAs per row of A;
 *   fp8   the same with the quarters decoded from e4m3 (e4m3x32_to_f32, 2 per unit);
 * where a transpose costs about 10 operations per unit. The register tile holds FEW_ACC
 * accumulators (1 or 2 rows of A). The blocks are taken in chunks of FEW_CHUNK_BYTES of the
 * item's columns (up to KT_WIDE_N of them: long runs of memory): within a chunk the tile walks
 * the columns in groups, so the chunk is read from DRAM once, and each tile of the first row
 * fetches its units of the next chunk (`ahead` blocks on) into L2: into L1 they would evict the
 * chunk and the accumulators before their turn. The accumulators live in the scratch between
 * chunks. */
static inline __attribute__((always_inline)) void nn_few_tile(
    const int mr, const int slots, kt_wtype t, const float *af, int64_t ldaf, const kt_packed *w,
    int64_t units, int64_t b0, int64_t b1, int64_t u0, float *acc_mem, int64_t ld_acc, int first,
    int64_t ahead, int64_t nblocks) {
  const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
  __m512 acc[FEW_ACC];
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int j = 0; j < slots; j++)
      acc[m * slots + j] =
          first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_mem + (m * ld_acc + j) * 16);
  }
  for (int64_t b = b0; b < b1; b++) {
    const char *p = kt_z_unit_ptr(w->data, units, b, u0);
    if (ahead && b + ahead < nblocks) /* this tile's units of the block `ahead` blocks on */
      for (int l = 0; l < (t == KT_WTYPE_BF16 ? slots / 2 : slots); l++)
        _mm_prefetch(kt_z_unit_ptr(w->data, units, b + ahead, u0 + l), _MM_HINT_T1);
    if (t != KT_WTYPE_BF16) {
      /* lane 4i + q of quarter p is row 4p + i, column q of the unit */
      __m512 aq[2][4];
      KT_UNROLL
      for (int m = 0; m < mr; m++) {
        const __m512 av = _mm512_loadu_ps(af + m * ldaf + 16 * b);
        KT_UNROLL
        for (int q = 0; q < 4; q++)
          aq[m][q] = _mm512_permutexvar_ps(
              _mm512_set_epi32(4 * q + 3, 4 * q + 3, 4 * q + 3, 4 * q + 3, 4 * q + 2, 4 * q + 2,
                               4 * q + 2, 4 * q + 2, 4 * q + 1, 4 * q + 1, 4 * q + 1, 4 * q + 1,
                               4 * q, 4 * q, 4 * q, 4 * q),
              av);
      }
      KT_UNROLL
      for (int i = 0; i < slots; i++) {
        __m512 wq[4];
        if (t == KT_WTYPE_FP8) { /* / 256: nn_gemm_few folded the 256 into A */
          e4m3x32_to_f32(_mm256_loadu_si256((const __m256i *)(p + i * KT_Z_UNIT)), 0, wq);
          e4m3x32_to_f32(_mm256_loadu_si256((const __m256i *)(p + i * KT_Z_UNIT + 32)), 0, wq + 2);
        } else {
          KT_UNROLL
          for (int q = 0; q < 4; q++)
            wq[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(p + i * KT_Z_UNIT + 16 * q))));
        }
        KT_UNROLL
        for (int q = 0; q < 4; q++) {
          KT_UNROLL
          for (int m = 0; m < mr; m++)
            acc[m * slots + i] = _mm512_fmadd_ps(aq[m][q], wq[q], acc[m * slots + i]);
        }
      }
    } else {
      __m512 av[2];
      KT_UNROLL
      for (int m = 0; m < mr; m++) av[m] = _mm512_loadu_ps(af + m * ldaf + 16 * b);
      KT_UNROLL
      for (int i = 0; i < slots / 2; i++) {
        const __m512i v = _mm512_loadu_si512(p + i * KT_Z_UNIT);
        const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
        KT_UNROLL
        for (int m = 0; m < mr; m++) {
          acc[m * slots + 2 * i] = _mm512_fmadd_ps(av[m], even, acc[m * slots + 2 * i]);
          acc[m * slots + 2 * i + 1] = _mm512_fmadd_ps(av[m], odd, acc[m * slots + 2 * i + 1]);
        }
      }
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int j = 0; j < slots; j++)
      _mm512_storeu_ps(acc_mem + (m * ld_acc + j) * 16, acc[m * slots + j]);
  }
}

/* c[t] = v[t] + v[4 + t] + v[8 + t] + v[12 + t] (its 128-bit quarters added) for t < min(4, n). */
static inline void z_store_quarter_sums(__m512 v, float *c, int64_t n) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  float four[4];
  _mm_storeu_ps(four, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  for (int64_t t = 0; t < 4 && t < n; t++) c[t] = four[t];
}

/* c[0 .. n) = one row's accumulators summed across their lanes (the x W driver of nn_drive.h
 * calls it at the end). */
static inline void few_sum_lanes(const float *acc, kt_wtype t, int64_t n, float *c) {
  if (t == KT_WTYPE_BF16) {
    for (int64_t j = 0; j < n; j++) c[j] = _mm512_reduce_add_ps(_mm512_loadu_ps(acc + j * 16));
    return;
  }
  for (int64_t u = 0; 4 * u < n; u++) /* the 4 quarters of a unit's accumulator are 4 rows */
    z_store_quarter_sums(_mm512_loadu_ps(acc + u * 16), c + 4 * u, n - 4 * u);
}

/* 16 bf16 at src (the first n of them; zeros after) as fp32. */
static inline __m512 load_bf16x16(const uint16_t *src, int64_t n) {
  const __m256i h = _mm256_maskz_loadu_epi16(kt_z_mask(n), src);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* In-register transpose of 16 x 16 floats. */
static inline void transpose16_ps(__m512 v[16]) {
  __m512i r[16];
  KT_UNROLL
  for (int i = 0; i < 16; i++) r[i] = _mm512_castps_si512(v[i]);
  kt_z_transpose16(r);
  KT_UNROLL
  for (int i = 0; i < 16; i++) v[i] = _mm512_castsi512_ps(r[i]);
}

/* nn_drive.h's transpose_bf16: 16 x 16 at a time in registers, the edges masked. */
static void transpose_bf16(const uint16_t *src, int64_t ld, int64_t rows, int64_t cols,
                           float *dst) {
  for (int64_t j0 = 0; j0 < cols; j0 += 16)
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {
      const int64_t nj = cols - j0 < 16 ? cols - j0 : 16, ni = rows - i0 < 16 ? rows - i0 : 16;
      __m512 v[16];
      KT_UNROLL
      for (int j = 0; j < 16; j++)
        v[j] = j < nj ? load_bf16x16(src + (j0 + j) * ld + i0, ni) : _mm512_setzero_ps();
      transpose16_ps(v);
      for (int64_t i = 0; i < ni; i++)
        _mm512_mask_storeu_ps(dst + (i0 + i) * WT_LD + j0, kt_z_mask(nj), v[i]);
    }
}

#include "nn_drive.h"

/* ---- int4 x W ------------------------------------------------------------------------------
 * The group scale of each output column's group folds into A in fp32. A band of 64 columns (a
 * call of more than a few rows; the few-row path takes a wide span band by band, see
 * z_nn_q4_few) is one or two runs of 32 columns, each inside one group: with
 * G = 32 the two runs take the rows of A folded with two groups, otherwise both the same. The
 * scales of a run are one per row of W, a vector per 16 rows in the engine's blocked layout
 * (kt_int4_scale_index): A is folded with them once per chunk of rows of W, run and row, never in
 * the inner loops. A 16-byte quarter of a unit (4 rows x 8 columns), widened
 * to 16 int32 lanes (lane 4i + t: row i, byte t), holds column t in the low nibble and column
 * 4 + t in the high one; vpermps with the table -8 .. 7 gives a nibble's value (it reads only the
 * low 4 bits of each lane). */

static inline __m512 q4_values(__m512i lanes) {
  const __m512 table = _mm512_setr_ps(-8.0f, -7.0f, -6.0f, -5.0f, -4.0f, -3.0f, -2.0f, -1.0f, 0.0f,
                                      1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f);
  return _mm512_permutexvar_ps(lanes, table);
}

/* The quarter q of the unit at p: columns 0 .. 3 (lo) and 4 .. 7 (hi) of its 4 rows. */
static inline void q4_quarter(const char *p, int q, __m512 *lo, __m512 *hi) {
  const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16 * q)));
  *lo = q4_values(x);
  *hi = q4_values(_mm512_srli_epi32(x, 4));
}

/* The groups of the runs of the columns n0 .. n0 + n: run 1 repeats run 0's where there is no
 * second run or it lies in the same group. */
static inline void q4_run_groups(const kt_packed *w, int64_t n0, int64_t n, int64_t g[Q4_RUNS]) {
  g[0] = n0 / w->group;
  g[1] = n > 32 ? (n0 + 32) / w->group : g[0];
}

/* sc[r] = scale[c0 + r, g] for r < len (c0 and len multiples of 16; zero past W's rows). */
static void q4_group_scales(const kt_packed *w, int64_t c0, int64_t g, float *sc, int64_t len) {
  const int64_t ng = kt_int4_groups(w->cols, w->group);
  for (int64_t r = 0; r < len; r += 16)
    _mm512_storeu_ps(sc + r, _mm512_loadu_ps(w->scale + kt_int4_scale_index(c0 + r, g, ng)));
}

/* The rows m0 .. m0 + mr of A (columns c0 .. c0 + cnt) folded with the scales of the runs'
 * groups (sc [nf][ldsc]) into af [nf][ldrun] (row i at i * ldaf, zero padded to len). */
static void q4_fold_rows(const kt_rows *a, int64_t m0, int64_t mr, int64_t c0, int64_t cnt,
                         int64_t len, int64_t nf, const float *sc, int64_t ldsc, float *af,
                         int64_t ldrun, int64_t ldaf) {
  for (int64_t s = 0; s < nf; s++)
    for (int64_t i = 0; i < mr; i++)
      row_to_f32(kt_row(a, m0 + i) + c0, cnt, af + s * ldrun + i * ldaf, len, sc + s * ldsc);
}

/* The few-row tile reads a unit as 16 lanes, one row of W each: the lane's 4 bytes hold the
 * row's 8 columns, column t (t < 4) at bit 8 t and column 4 + t at bit 8 t + 4, so column t of
 * all 16 rows is one shift and one vpermps (q4_values reads the low 4 bits) away, and A's 16
 * folded values of the block multiply it as they are. Each column's accumulator sums its rows
 * lane by lane (row 16 b + i in lane i); the lanes are added at the end. */
static inline __m512 q4_column(__m512i x, int t) {
  const int shift = t < 4 ? 8 * t : 8 * (t - 4) + 4;
  return q4_values(shift ? _mm512_srli_epi32(x, shift) : x);
}

/* mr rows of A (folded with the group of these columns: row m's block b at am + m ldm +
 * 16 (b - bb)) x the nu units from u0 (8 nu columns) over the blocks b0 .. b1: 8 nu accumulators
 * per row, kept in acc_mem (row m's at m ld_acc, 16 floats per column) between chunks. The
 * tile's units of the block `ahead` blocks on are fetched into L2. */
static inline __attribute__((always_inline)) void q4_few_tile(
    const int mr, const int nu, const float *am, int64_t ldm, int64_t bb, const kt_packed *w,
    int64_t units, int64_t u0, int64_t b0, int64_t b1, int64_t nblocks, int64_t ahead, int first,
    float *acc_mem, int64_t ld_acc) {
  __m512 acc[2][16];
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int j = 0; j < 8 * nu; j++)
      acc[m][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_mem + m * ld_acc + 16 * j);
  }
  for (int64_t b = b0; b < b1; b++) {
    const char *p = kt_z_unit_ptr(w->data, units, b, u0);
    if (ahead && b + ahead < nblocks)
      for (int v = 0; v < nu; v++)
        _mm_prefetch(kt_z_unit_ptr(w->data, units, b + ahead, u0 + v), _MM_HINT_T1);
    __m512 av[2];
    KT_UNROLL
    for (int m = 0; m < mr; m++) av[m] = _mm512_loadu_ps(am + m * ldm + 16 * (b - bb));
    KT_UNROLL
    for (int v = 0; v < nu; v++) {
      const __m512i x = _mm512_loadu_si512(p + v * KT_Z_UNIT);
      KT_UNROLL
      for (int t = 0; t < 8; t++) {
        const __m512 q = q4_column(x, t);
        KT_UNROLL
        for (int m = 0; m < mr; m++)
          acc[m][8 * v + t] = _mm512_fmadd_ps(av[m], q, acc[m][8 * v + t]);
      }
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int j = 0; j < 8 * nu; j++) _mm512_storeu_ps(acc_mem + m * ld_acc + 16 * j, acc[m][j]);
  }
}

/* Blocks of W per chunk of a few-row int4 x W of n columns: about Q4_FEW_CHUNK_BYTES of its
 * bands of 64 columns. */
static int64_t q4_few_chunk(int64_t n) {
  return kt_max_size(1, Q4_FEW_CHUNK_BYTES / (size_t)(((n + 63) / 64) * 8 * KT_Z_UNIT));
}

/* Scratch of z_nn_q4_few for calls of up to n columns: the folded rows of a chunk
 * [count][groups][rows] (the chunk grows as n shrinks: the most over the narrower calls) and 16
 * lanes per row of A and column. */
static size_t q4_few_scratch_bytes(int64_t n) {
  int64_t folded = 0;
  for (int64_t w = 64; w < n + 64; w += 64) {
    const int64_t f = (w / 32 + 1) * 16 * q4_few_chunk(w);
    folded = f > folded ? f : folded;
  }
  return (size_t)(NN_FEW_M * (folded + (n + 15) / 16 * 16 * 16)) * 4;
}

/* At most NN_FEW_M rows of A, n <= KT_WIDE_N columns: W in chunks of whole rows of the span
 * (one run of memory each). Per chunk, each row of A is folded with every group's scales of its
 * rows (a vector per 16 rows and group), then the tile runs over the chunk 16 columns (one row
 * of A) or 8 (two rows) at a time, the first rows' tiles fetching the next chunk into L2. Each
 * column's lanes are summed at the end, in the same order in any span and chunk. */
static void z_nn_q4_few(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                        int64_t ldc, void *scratch) {
  const int64_t k = w->rows, nblocks = (k + 15) / 16, G = w->group;
  const int64_t units = kt_z_units(w->cols, KT_WTYPE_INT4), ng = kt_int4_groups(w->cols, G);
  const int64_t chunk = q4_few_chunk(n), rows = 16 * chunk, nu = (n + 7) / 8;
  const int64_t g0 = n0 / G, ngs = (n0 + n - 1) / G - g0 + 1, ldm = ngs * rows;
  const int64_t ld_acc = (n + 15) / 16 * 16 * 16;
  float *af = scratch, *acc = af + a->count * ldm; /* [count][ngs][rows], [count][cols][16] */
  for (int64_t b0 = 0; b0 < nblocks; b0 += chunk) {
    const int64_t b1 = nblocks - b0 < chunk ? nblocks : b0 + chunk;
    const int64_t c0 = 16 * b0, cnt = (k < 16 * b1 ? k : 16 * b1) - c0;
    for (int64_t m = 0; m < a->count; m++) { /* a vector of 16 rows times each group's */
      const uint16_t *arow = kt_row(a, m) + c0;
      float *am = af + m * ldm;
      for (int64_t r = 0; r < 16 * (b1 - b0); r += 16) {
        const __m256i h = _mm256_maskz_loadu_epi16(kt_z_mask(cnt - r), arow + r);
        const __m512 av = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        const float *sr = w->scale + kt_int4_scale_index(c0 + r, g0, ng);
        for (int64_t g = 0; g < ngs; g++)
          _mm512_storeu_ps(am + g * rows + r, _mm512_mul_ps(av, _mm512_loadu_ps(sr + 16 * g)));
      }
    }
    /* the next chunk's scales of the span's groups (a line per block and group), fetched into L2
     * a slice per pair of units */
    const int64_t b2 = nblocks < 2 * b1 - b0 ? nblocks : 2 * b1 - b0, scale_lines = (b2 - b1) * ngs;
    const int64_t pairs = (nu + 1) / 2;
    for (int64_t u = 0; u < nu; u += 2) {
      for (int64_t l = u / 2 * scale_lines / pairs; l < (u / 2 + 1) * scale_lines / pairs; l++)
        _mm_prefetch(
            (const char *)(w->scale + kt_int4_scale_index(16 * (b1 + l / ngs), g0 + l % ngs, ng)),
            _MM_HINT_T1);
      const int64_t g = (n0 + 8 * u) / G - g0, two = nu - u > 1; /* 16 columns: one group */
      const float *am = af + g * rows;
      float *accu = acc + 8 * u * 16;
      const int64_t ahead = b1 - b0;
#define Q4_FEW_CALL(MR, NU, M, UU, AHEAD)                                                   \
  q4_few_tile(MR, NU, am + (M) * ldm, ldm, b0, w, units, (n0 + 8 * (u + (UU))) / 8, b0, b1, \
              nblocks, AHEAD, b0 == 0, accu + (M) * ld_acc + 8 * (UU) * 16, ld_acc)
      if (a->count == 1) {
        if (two)
          Q4_FEW_CALL(1, 2, 0, 0, ahead);
        else
          Q4_FEW_CALL(1, 1, 0, 0, ahead);
      } else {
        for (int64_t uu = 0; uu <= two; uu++)
          for (int64_t m = 0; m < a->count; m += 2) {
            const int64_t pre = m == 0 ? ahead : 0;
            if (a->count - m > 1)
              Q4_FEW_CALL(2, 1, m, uu, pre);
            else
              Q4_FEW_CALL(1, 1, m, uu, pre);
          }
      }
#undef Q4_FEW_CALL
    }
  }
  for (int64_t m = 0; m < a->count; m++)
    for (int64_t j = 0; j < n; j++)
      c[m * ldc + j] = _mm512_reduce_add_ps(_mm512_loadu_ps(acc + m * ld_acc + 16 * j));
}

/* wt[cc, 0 .. 32 ns) = W[c0 + cc, n0 .. n0 + 32 ns) as fp32 (the blocks from c0, c0 a multiple
 * of 16). */
static void q4_transpose_block(const kt_packed *w, int64_t c0, int64_t cnt, int64_t n0, int64_t ns,
                               float *wt) {
  const int64_t units = kt_z_units(w->cols, KT_WTYPE_INT4), u0 = n0 / 8;
  const int64_t nblocks = kt_z_rows_padded(w->rows) / 16;
  const __m512i rows01 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i rows23 =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t b = c0 / 16; b * 16 < c0 + cnt; b++) {
    if (b + Z_PREFETCH_BLOCKS < nblocks)
      for (int64_t l = 0; l < 4 * ns; l++)
        _mm_prefetch(kt_z_unit_ptr(w->data, units, b + Z_PREFETCH_BLOCKS, u0 + l), _MM_HINT_T1);
    const char *p = kt_z_unit_ptr(w->data, units, b, u0);
    float *dst = wt + (b * 16 - c0) * WT_LD;
    for (int64_t u = 0; u < 4 * ns; u++) {
      KT_UNROLL
      for (int q = 0; q < 4; q++) {
        __m512 lo, hi;
        q4_quarter(p + u * KT_Z_UNIT, q, &lo, &hi);
        const __m512 r01 = _mm512_permutex2var_ps(lo, rows01, hi);
        const __m512 r23 = _mm512_permutex2var_ps(lo, rows23, hi);
        float *d = dst + 4 * q * WT_LD + 8 * u;
        _mm256_storeu_ps(d, _mm512_castps512_ps256(r01));
        _mm256_storeu_ps(d + WT_LD,
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r01), 1)));
        _mm256_storeu_ps(d + 2 * WT_LD, _mm512_castps512_ps256(r23));
        _mm256_storeu_ps(d + 3 * WT_LD,
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r23), 1)));
      }
    }
  }
}

/* nn_tile with the columns 32 .. 63 (vectors 2 and 3) taking the rows of A folded with the second
 * run's group (af1). */
static inline __attribute__((always_inline)) void nn_q4_tile(const int mr, const int nv,
                                                             const float *af0, const float *af1,
                                                             int64_t ldaf, const float *wt,
                                                             int64_t cnt, float *c, int64_t ldc,
                                                             int64_t ncols, int add) {
  __m512 acc[NN_MR][4];
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int v = 0; v < nv; v++) acc[m][v] = _mm512_setzero_ps();
  }
  for (int64_t cc = 0; cc < cnt; cc++) {
    __m512 wv[4];
    KT_UNROLL
    for (int v = 0; v < nv; v++) wv[v] = _mm512_loadu_ps(wt + cc * WT_LD + 16 * v);
    KT_UNROLL
    for (int m = 0; m < mr; m++) {
      const __m512 a0 = _mm512_set1_ps(af0[m * ldaf + cc]);
      const __m512 a1 = nv > 2 ? _mm512_set1_ps(af1[m * ldaf + cc]) : a0;
      KT_UNROLL
      for (int v = 0; v < nv; v++) acc[m][v] = _mm512_fmadd_ps(v < 2 ? a0 : a1, wv[v], acc[m][v]);
    }
  }
  KT_UNROLL
  for (int m = 0; m < mr; m++) {
    KT_UNROLL
    for (int v = 0; v < nv; v++) {
      const __mmask16 k = kt_z_mask(ncols - 16 * v);
      float *p = c + m * ldc + 16 * v;
      __m512 r = acc[m][v];
      if (add) r = _mm512_add_ps(_mm512_maskz_loadu_ps(k, p), r);
      _mm512_mask_storeu_ps(p, k, r);
    }
  }
}

#define NN_Q4_CASE(MR, NV) \
  case MR * 8 + NV: nn_q4_tile(MR, NV, af0, af1, ldaf, wt, cnt, out, ldc, n, add); break;
#define NN_Q4_CASES(MR) NN_Q4_CASE(MR, 1) NN_Q4_CASE(MR, 2) NN_Q4_CASE(MR, 3) NN_Q4_CASE(MR, 4)

/* The table's gemm_nn_q4: a few rows on z_nn_q4_few; more through the transposed fp32 block of
 * NN_CH rows of W and the register tile, each tile of rows of A folded with the runs' groups
 * once per block (the scales of the block copied once for all rows). */
static void z_gemm_nn_q4(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                         int64_t ldc, void *scratch) {
  if (a->count <= NN_FEW_M) {
    z_nn_q4_few(a, w, n0, n, c, ldc, scratch);
    return;
  }
  const int64_t k = w->rows, ns = (n + 31) / 32, ldaf = NN_CH, nv = (n + 15) / 16;
  int64_t g[Q4_RUNS];
  q4_run_groups(w, n0, n, g);
  const int64_t nf = g[1] != g[0] ? 2 : 1; /* folds per row */
  /* wt [NN_CH][WT_LD], af [Q4_RUNS][NN_MR][NN_CH], sc [Q4_RUNS][NN_CH] */
  float *wt = scratch, *af = wt + NN_CH * WT_LD, *sc = af + Q4_RUNS * NN_MR * NN_CH;
  for (int64_t c0 = 0; c0 < k; c0 += NN_CH) {
    const int64_t cnt = k - c0 < NN_CH ? k - c0 : NN_CH, len = (cnt + 15) & ~(int64_t)15;
    q4_transpose_block(w, c0, cnt, n0, ns, wt);
    for (int64_t s = 0; s < nf; s++) q4_group_scales(w, c0, g[s], sc + s * NN_CH, len);
    for (int64_t m0 = 0; m0 < a->count; m0 += NN_MR) {
      const int mr = (int)(a->count - m0 < NN_MR ? a->count - m0 : NN_MR);
      q4_fold_rows(a, m0, mr, c0, cnt, len, nf, sc, NN_CH, af, NN_MR * ldaf, ldaf);
      const float *af0 = af, *af1 = af + (nf - 1) * NN_MR * ldaf;
      float *out = c + m0 * ldc;
      const int add = c0 > 0;
      switch (mr * 8 + (int)nv) {
        NN_Q4_CASES(1)
        NN_Q4_CASES(2)
        NN_Q4_CASES(3)
        NN_Q4_CASES(4)
        NN_Q4_CASES(5)
        NN_Q4_CASES(6)
      }
    }
  }
}

/* ---- the LoRA products of a few rows --------------------------------------------------------- */

/* C[m, q] = sum_c A[m, c] B[q, c] (B: [n, k] row-major bf16). At most NN_FEW_M rows of A: one
 * dot product per output along the rows of B, 4 rows of B at a time, with no rearranging of B
 * (the tile of nn_drive.h would transpose all of it for a single row of A). */
static void z_lora_nt(const kt_rows *a, const uint16_t *b, int64_t n, int64_t k, float *c,
                      int64_t ldc, void *scratch) {
  if (a->count > NN_FEW_M) {
    lora_nt(a, b, n, k, c, ldc, scratch);
    return;
  }
  const int64_t M = a->count, len = (k + 15) & ~(int64_t)15;
  float *af = scratch;
  for (int64_t m = 0; m < M; m++) row_to_f32(kt_row(a, m), k, af + m * len, len, NULL);
  for (int64_t q0 = 0; q0 < n; q0 += 4) {
    const int nq = (int)(n - q0 < 4 ? n - q0 : 4);
    __m512 acc[NN_FEW_M][4];
    for (int64_t m = 0; m < M; m++) {
      KT_UNROLL
      for (int q = 0; q < 4; q++) acc[m][q] = _mm512_setzero_ps();
    }
    for (int64_t c0 = 0; c0 < k; c0 += 16) {
      KT_UNROLL
      for (int q = 0; q < nq; q++) {
        const __m512 bv = load_bf16x16(b + (q0 + q) * k + c0, k - c0);
        for (int64_t m = 0; m < M; m++)
          acc[m][q] = _mm512_fmadd_ps(_mm512_loadu_ps(af + m * len + c0), bv, acc[m][q]);
      }
    }
    for (int64_t m = 0; m < M; m++) {
      KT_UNROLL
      for (int q = 0; q < nq; q++) c[m * ldc + q0 + q] = _mm512_reduce_add_ps(acc[m][q]);
    }
  }
}

/* C[m, j] += s * sum_q a[m, q] * B[n0 + j, q] (a: [M, r] fp32, B: [*, r] bf16): 16 rows of B
 * (16 values of j) are transposed in registers once, so that for every row of a the sum over q
 * is a chain of FMAs with a[m, q] broadcast, in ascending q like nn_drive.h's tile. */
enum { ADD_NT_MAX_R = 128 /* larger ranks take nn_drive.h's lora_add_nt */ };

static void z_lora_add_nt(int64_t M, int64_t n, int64_t r, const float *a, const uint16_t *b,
                          int64_t n0, float s, float *c, int64_t ldc) {
  if (r > ADD_NT_MAX_R) {
    lora_add_nt(M, n, r, a, b, n0, s, c, ldc);
    return;
  }
  const __m512 sv = _mm512_set1_ps(s);
  __m512 bt[ADD_NT_MAX_R]; /* bt[q] lane j = B[n0 + j0 + j, q] */
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nj = n - j0 < 16 ? n - j0 : 16;
    const __mmask16 mask = kt_z_mask(nj);
    for (int64_t q0 = 0; q0 < r; q0 += 16) {
      __m512 *t = bt + q0;
      KT_UNROLL
      for (int j = 0; j < 16; j++)
        t[j] = j < nj ? load_bf16x16(b + (n0 + j0 + j) * r + q0, r - q0) : _mm512_setzero_ps();
      transpose16_ps(t);
    }
    for (int64_t m = 0; m < M; m++) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t q = 0; q < r; q++)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(a[m * r + q]), bt[q], acc);
      float *p = c + m * ldc + j0;
      _mm512_mask_storeu_ps(p, mask,
                            _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), _mm512_mul_ps(sv, acc)));
    }
  }
}

/* ---- fp8: e4m3 units to bf16 units ------------------------------------------------------------
 */

/* 32 words holding e4m3 bytes (0 .. 255) as bf16: normal values by shifting the exponent and
 * mantissa into place, the 7 subnormals from a table (vpermw), NaN (0x7f, 0xff) by compare. */
static inline __m512i e4m3_words_to_bf16(__m512i w) {
  const __m512i sub =
      _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                       0x3c60, 0x3c40, 0x3c20, 0x3c00, 0x3bc0, 0x3b80, 0x3b00, 0);
  const __m512i mag = _mm512_and_si512(w, _mm512_set1_epi16(0x7f));
  const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x80)), 8);
  __m512i v = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(120 << 7));
  v = _mm512_mask_blend_epi16(_mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), v,
                              _mm512_permutexvar_epi16(mag, sub));
  v = _mm512_mask_blend_epi16(_mm512_cmpeq_epi16_mask(mag, _mm512_set1_epi16(0x7f)), v,
                              _mm512_set1_epi16(0x7fc0));
  return _mm512_or_si512(v, sign);
}

/* decode_fp8 of the table: each fp8 unit (row i: bytes k0 k1 k2 k3) gives two bf16 units (row
 * i: k0 k1, and k2 k3), the bytes spread to words by one in-lane shuffle each. */
static void z_decode_fp8(const kt_packed *w, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                         kt_sweep sweep, void *dst) {
  const __m512i lo = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1));
  const __m512i hi = _mm512_broadcast_i32x4(
      _mm_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1));
  const int64_t su = kt_z_units(w->cols, KT_WTYPE_FP8), du = kt_z_units(nc, KT_WTYPE_BF16);
  for (int64_t b = 0; b < kt_z_rows_padded(nr) / 16; b++) {
    const char *s = kt_z_unit_ptr(w->data, su, r0 / 16 + b, c0 / 4);
    char *d = (char *)dst + b * du * KT_Z_UNIT;
    for (int64_t u = 0; u < du / 2; u++) {
      /* the source runs are short (2 KB or 1 KB): fetch the next panel's while this one decodes */
      const char *next = kt_z_fp8_next_unit(w, r0, nr, c0, nc, sweep, b, u);
      if (next) _mm_prefetch(next, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(s + u * KT_Z_UNIT);
      _mm512_storeu_si512(d + 2 * u * KT_Z_UNIT, e4m3_words_to_bf16(_mm512_shuffle_epi8(v, lo)));
      _mm512_storeu_si512(d + (2 * u + 1) * KT_Z_UNIT,
                          e4m3_words_to_bf16(_mm512_shuffle_epi8(v, hi)));
    }
  }
}

/* ---- the variants ---------------------------------------------------------------------------- */

/* x W of the vdpbf16ps variants: more than a few rows of A against a bf16 W without row scales
 * on the instruction (over the column-pair panel), the rest as in the other variants. */
static void z_gemm_nn_dp(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                         int64_t ldc, void *scratch) {
  if (a->count > NN_FEW_M && w->wtype == KT_WTYPE_BF16 && !w->scale)
    kt_avx512_nn_bf16_dp(a, w, n0, n, c, ldc, scratch);
  else
    gemm_nn(a, w, n0, n, c, ldc, scratch);
}

static void z_gemm_nn_dp_model(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n,
                               float *c, int64_t ldc, void *scratch) {
  if (a->count > NN_FEW_M && w->wtype == KT_WTYPE_BF16 && !w->scale)
    kt_avx512_nn_bf16_dp_model(a, w, n0, n, c, ldc, scratch);
  else
    gemm_nn(a, w, n0, n, c, ldc, scratch);
}

#define Z_TABLE(NAME, VARIANT, NT, NN, NT_Q8, NT_Q4) \
  static const kt_kernels NAME = {                   \
      .isa = KT_ISA_AVX512,                          \
      .variant = VARIANT,                            \
      .packed_bytes = kt_z_packed_bytes,             \
      .pack = kt_z_pack,                             \
      .unpack = kt_z_unpack,                         \
      .gemm_scratch_bytes = z_scratch_bytes,         \
      .gemm_nt = NT,                                 \
      .gemm_nt_fp8_few = z_gemm_nt_fp8_few,          \
      .decode_fp8 = z_decode_fp8,                    \
      .gemm_nt_q8 = NT_Q8,                           \
      .gemm_nn = NN,                                 \
      .gemm_nt_q4 = NT_Q4,                           \
      .gemm_nn_q4 = z_gemm_nn_q4,                    \
      .sigmoid = kt_act_avx512_sigmoid,              \
      .silu = kt_act_avx512_silu,                    \
      .store_bf16 = kt_store_bf16_avx512,            \
      .lora_nt = z_lora_nt,                          \
      .lora_nn = lora_nn,                            \
      .lora_add_nt = z_lora_add_nt,                  \
      .lora_add_nn = lora_add_nn,                    \
      .outer_rn = outer_rn,                          \
      .outer_nr = outer_nr,                          \
  };

/* int4 x W^T: vpdpbusd where the CPU has it, vpmaddubsw elsewhere (the vpmaddwd variants). */
Z_TABLE(fma_madd, "avx512-fma+vpmaddwd", z_gemm_nt_fma, gemm_nn, z_gemm_nt_q8_madd,
        kt_avx512_nt_q4_madd)
Z_TABLE(fma_vnni, "avx512-fma+vnni", z_gemm_nt_fma, gemm_nn, kt_avx512_nt_q8_vnni,
        kt_avx512_nt_q4_vnni)
Z_TABLE(bf16_madd, "avx512-bf16+vpmaddwd", kt_avx512_nt_bf16_dp, z_gemm_nn_dp, z_gemm_nt_q8_madd,
        kt_avx512_nt_q4_madd)
Z_TABLE(bf16_vnni, "avx512-bf16+vnni", kt_avx512_nt_bf16_dp, z_gemm_nn_dp, kt_avx512_nt_q8_vnni,
        kt_avx512_nt_q4_vnni)
Z_TABLE(emu_madd, "avx512-bf16emu+vpmaddwd", kt_avx512_nt_bf16_dp_model, z_gemm_nn_dp_model,
        z_gemm_nt_q8_madd, kt_avx512_nt_q4_madd)
Z_TABLE(emu_vnni, "avx512-bf16emu+vnni", kt_avx512_nt_bf16_dp_model, z_gemm_nn_dp_model,
        kt_avx512_nt_q8_vnni, kt_avx512_nt_q4_vnni)

const kt_kernels *kt_kernels_avx512(uint32_t f) {
  const int vnni = (f & KT_CPU_AVX512_VNNI) != 0;
  if (f & KT_CPU_TEST_EMULATE_BF16) return vnni ? &emu_vnni : &emu_madd;
  if (f & KT_CPU_AVX512_BF16) return vnni ? &bf16_vnni : &bf16_madd;
  return vnni ? &fma_vnni : &fma_madd;
}
