/* nn_drive.h - x W and the LoRA products around one register tile, shared by the avx512 and
 * avx2 families (static inline code; each family file includes it once, compiled with its own
 * flags). W is bf16, int8 or fp8 (x W: with its row scales folded into A, w->scale). The including
 * file defines NN_MR, NN_CH and WT_LD and:
 *   row_to_f32(src, n, dst, len, scale)  bf16 to fp32 (times scale[i] when not NULL), n values
 *                                        zero padded to len (a multiple of 16)
 *   nn_rows(count, af, ldaf, wt, cnt, c, ldc, ncols, add, s)
 *        c[m, 0:ncols] (+)= s * sum_cc af[m, cc] * wt[cc, 0:ncols], m < count, ncols <= WT_LD
 *   transpose_bf16(src, ld, rows, cols, dst)
 *        dst[i * WT_LD + j] = src[j * ld + i] as fp32, i < rows <= NN_CH, j < cols <= WT_LD
 *        (the LoRA operands stored [n, k])
 *   transpose_block(w, c0, cnt, n0, n, wt)  wt[cc, 0:64) = W[c0 + cc, n0 : n0 + 64), in fp32
 *                                           (or in the family's own panel form, for which
 *   nn_rows_w(count, af, ldaf, wt, cnt, c, ldc, ncols, add, wtype)  is nn_rows with s = 1)
 * and, for x W of at most NN_FEW_M rows without a transpose, FEW_LANES (fp32 lanes of one
 * accumulator), FEW_ACC (accumulators of the register tile), FEW_CHUNK_BYTES and:
 *   nn_few_tile(mr, slots, t, af, ldaf, w, units, b0, b1, u0, acc_mem, ld_acc, first,
 *               prefetch_lines, nblocks)
 *        mr rows of A (1 or 2) x `slots` accumulators over the blocks b0 .. b1 of the units from
 *        u0 on, loaded from (unless first) and stored to acc_mem; prefetches prefetch_lines
 *        units of the blocks ahead
 *   few_sum_lanes(acc, t, n, c)  c[0 .. n) = one row's accumulators summed across their lanes */
#ifndef KTSFT_NN_DRIVE_H
#define KTSFT_NN_DRIVE_H

static inline void nn_gemm(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                           int64_t ldc, void *scratch) {
  const int64_t k = w->rows;
  float *wt = scratch, *af = wt + NN_CH * WT_LD;
  const float *scale = w->scale; /* int8, or a bf16 panel of fp8 */
  for (int64_t c0 = 0; c0 < k; c0 += NN_CH) {
    const int64_t cnt = k - c0 < NN_CH ? k - c0 : NN_CH;
    transpose_block(w, c0, cnt, n0, n, wt);
    for (int64_t m0 = 0; m0 < a->count; m0 += NN_MR) {
      const int64_t mr = a->count - m0 < NN_MR ? a->count - m0 : NN_MR;
      for (int64_t i = 0; i < mr; i++)
        row_to_f32(kt_row(a, m0 + i) + c0, cnt, af + i * NN_CH, (cnt + 15) & ~(int64_t)15,
                   scale ? scale + c0 : NULL);
      nn_rows_w(mr, af, NN_CH, wt, cnt, c + m0 * ldc, ldc, n, c0 > 0, w->wtype);
    }
  }
}

/* ---- the LoRA products ------------------------------------------------------------------- */

/* The LoRA operands are small (one side is the rank): they are staged as fp32 into a stack block
 * in the tile's layout (stage_bf16, transposing in registers where the operand is [n, k]). */
typedef struct lora_block {
  _Alignas(KT_CACHE_LINE) float wt[NN_CH * WT_LD];
  _Alignas(KT_CACHE_LINE) float af[NN_MR * NN_CH];
} lora_block;

/* dst[i * WT_LD + j] = src[i * ld + j] (trans: src[j * ld + i]) as fp32, i < rows, j < cols. */
static inline void stage_bf16(const uint16_t *src, int64_t ld, int trans, int64_t rows,
                              int64_t cols, float *dst) {
  if (trans) {
    transpose_bf16(src, ld, rows, cols, dst);
    return;
  }
  for (int64_t i = 0; i < rows; i++)
    row_to_f32(src + i * ld, cols, dst + i * WT_LD, (cols + 15) & ~(int64_t)15, NULL);
}

/* C[m, q] = sum_c A[m, c] B[q, c] (transposed) or B[c, q]: A bf16 rows, B [n, k] or [k, n]. */
static inline void lora_product(const kt_rows *a, const uint16_t *b, int64_t n, int64_t k,
                                int trans, float *c, int64_t ldc) {
  lora_block blk;
  for (int64_t q0 = 0; q0 < n; q0 += WT_LD) {
    const int64_t nq = n - q0 < WT_LD ? n - q0 : WT_LD;
    for (int64_t c0 = 0; c0 < k; c0 += NN_CH) {
      const int64_t cnt = k - c0 < NN_CH ? k - c0 : NN_CH;
      if (trans)
        stage_bf16(b + q0 * k + c0, k, 1, cnt, nq, blk.wt);
      else
        stage_bf16(b + c0 * n + q0, n, 0, cnt, nq, blk.wt);
      for (int64_t m0 = 0; m0 < a->count; m0 += NN_MR) {
        const int64_t mr = a->count - m0 < NN_MR ? a->count - m0 : NN_MR;
        for (int64_t i = 0; i < mr; i++)
          row_to_f32(kt_row(a, m0 + i) + c0, cnt, blk.af + i * NN_CH, (cnt + 15) & ~(int64_t)15,
                     NULL);
        nn_rows(mr, blk.af, NN_CH, blk.wt, cnt, c + m0 * ldc + q0, ldc, nq, c0 > 0, 1.0f);
      }
    }
  }
}

static inline void lora_nt(const kt_rows *a, const uint16_t *b, int64_t n, int64_t k, float *c,
                           int64_t ldc, void *scratch) {
  (void)scratch;
  lora_product(a, b, n, k, 1, c, ldc);
}

static inline void lora_nn(const kt_rows *a, const uint16_t *b, int64_t k, int64_t n, float *c,
                           int64_t ldc, void *scratch) {
  (void)scratch;
  lora_product(a, b, n, k, 0, c, ldc);
}

/* C[m, j] += s * sum_q a[m, q] * B[n0 + j, q] (trans) or B[q, n0 + j] (B: [r, ldb]). */
static inline void lora_add(int64_t M, int64_t n, int64_t r, const float *a, const uint16_t *b,
                            int64_t ldb, int trans, int64_t n0, float s, float *c, int64_t ldc) {
  lora_block blk;
  for (int64_t j0 = 0; j0 < n; j0 += WT_LD) {
    const int64_t nj = n - j0 < WT_LD ? n - j0 : WT_LD;
    for (int64_t q0 = 0; q0 < r; q0 += NN_CH) {
      const int64_t cnt = r - q0 < NN_CH ? r - q0 : NN_CH;
      if (trans)
        stage_bf16(b + (n0 + j0) * r + q0, r, 1, cnt, nj, blk.wt);
      else
        stage_bf16(b + q0 * ldb + n0 + j0, ldb, 0, cnt, nj, blk.wt);
      nn_rows(M, a + q0, r, blk.wt, cnt, c + j0, ldc, nj, 1, s);
    }
  }
}

static inline void lora_add_nt(int64_t M, int64_t n, int64_t r, const float *a, const uint16_t *b,
                               int64_t n0, float s, float *c, int64_t ldc) {
  lora_add(M, n, r, a, b, r, 1, n0, s, c, ldc);
}

static inline void lora_add_nn(int64_t M, int64_t n, int64_t r, const float *a, const uint16_t *b,
                               int64_t ldb, int64_t n0, float s, float *c, int64_t ldc) {
  lora_add(M, n, r, a, b, ldb, 0, n0, s, c, ldc);
}

/* out[i, j] = s * sum_m P[m, i] * rowscale[m] * Q[m, j]  ->  [ni, nj] (ld nj): P [M, ldp],
 * Q [M, ldq], both fp32; the sum over m runs in chunks of NN_CH. */
static inline void outer(int64_t M, int64_t ni, int64_t nj, const float *p, int64_t ldp,
                         const float *rowscale, const float *qm, int64_t ldq, float s, float *out) {
  lora_block blk;
  for (int64_t j0 = 0; j0 < nj; j0 += WT_LD) {
    const int64_t w = nj - j0 < WT_LD ? nj - j0 : WT_LD;
    for (int64_t m0 = 0; m0 < M; m0 += NN_CH) {
      const int64_t cnt = M - m0 < NN_CH ? M - m0 : NN_CH;
      for (int64_t mm = 0; mm < cnt; mm++)
        for (int64_t j = 0; j < w; j++) blk.wt[mm * WT_LD + j] = qm[(m0 + mm) * ldq + j0 + j];
      for (int64_t i0 = 0; i0 < ni; i0 += NN_MR) {
        const int64_t mr = ni - i0 < NN_MR ? ni - i0 : NN_MR;
        for (int64_t i = 0; i < mr; i++)
          for (int64_t mm = 0; mm < cnt; mm++)
            blk.af[i * NN_CH + mm] =
                p[(m0 + mm) * ldp + i0 + i] * (rowscale ? rowscale[m0 + mm] : 1.0f);
        nn_rows(mr, blk.af, NN_CH, blk.wt, cnt, out + i0 * nj + j0, nj, w, m0 > 0, s);
      }
    }
  }
}

static inline void outer_rn(int64_t M, int64_t r, int64_t n, const float *coef,
                            const float *rowscale, const float *x, int64_t ldx, float s,
                            float *out) {
  outer(M, r, n, coef, r, rowscale, x, ldx, s, out);
}

static inline void outer_nr(int64_t M, int64_t n, int64_t r, const float *d, int64_t ldd,
                            const float *coef, float s, float *out) {
  outer(M, n, r, d, ldd, NULL, coef, r, s, out);
}

/* ---- x W of a few rows ------------------------------------------------------------------ */

/* Columns per accumulator: bf16, one column (lanes: rows of W); int8 and fp8, one unit of 4
 * columns. */
static inline int64_t few_slot_cols(kt_wtype t) { return t == KT_WTYPE_BF16 ? 1 : 4; }

/* x W for at most NN_FEW_M rows around nn_few_tile: the blocks of W in chunks of about
 * FEW_CHUNK_BYTES of the band, each chunk walked by column group (the chunk stays in L1), the
 * first group of a chunk prefetching ahead; the accumulators kept in the scratch between
 * chunks and summed across lanes at the end. */
static void nn_gemm_few(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                        int64_t ldc, void *scratch) {
  const kt_wtype t = w->wtype;
  const int64_t k = w->rows, nblocks = (k + 15) / 16, len = 16 * nblocks;
  const int64_t units = kt_z_units(w->cols, t), per = kt_z_per_unit(t);
  const float *scale = w->scale; /* int8, or a bf16 panel of fp8 */
  const int64_t slot_cols = few_slot_cols(t), lines = (n + per - 1) / per;
  /* accumulators per row: whole groups of one row of A, the widest */
  const int64_t ld_acc = (n + FEW_ACC * slot_cols - 1) / (FEW_ACC * slot_cols) * FEW_ACC;
  const int64_t chunk = kt_max_size(1, FEW_CHUNK_BYTES / (size_t)(lines * KT_Z_UNIT));
  float *af = scratch, *acc = af + a->count * len;
  for (int64_t m = 0; m < a->count; m++) row_to_f32(kt_row(a, m), k, af + m * len, len, scale);
  if (t == KT_WTYPE_FP8) /* nn_few_tile decodes e4m3 / 256 (one multiply fewer per weight) */
    for (int64_t i = 0; i < a->count * len; i++) af[i] *= 256.0f;
  for (int64_t b0 = 0; b0 < nblocks; b0 += chunk) {
    const int64_t b1 = nblocks - b0 < chunk ? nblocks : b0 + chunk;
    for (int64_t m0 = 0; m0 < a->count; m0 += 2) {
      const int two = a->count - m0 > 1;
      const int64_t group = (two ? FEW_ACC / 2 : FEW_ACC) * slot_cols;
      for (int64_t j0 = 0; j0 < n; j0 += group) {
        const float *am = af + m0 * len;
        float *accm = acc + (m0 * ld_acc + j0 / slot_cols) * FEW_LANES;
        const int64_t u0 = (n0 + j0) / per, ahead = m0 == 0 ? b1 - b0 : 0;
#define FEW_CALL(MR, T)                                                                         \
  nn_few_tile(MR, FEW_ACC / MR, T, am, len, w, units, b0, b1, u0, accm, ld_acc, b0 == 0, ahead, \
              nblocks)
        if (t == KT_WTYPE_INT8) {
          if (two)
            FEW_CALL(2, KT_WTYPE_INT8);
          else
            FEW_CALL(1, KT_WTYPE_INT8);
        } else if (t == KT_WTYPE_FP8) {
          if (two)
            FEW_CALL(2, KT_WTYPE_FP8);
          else
            FEW_CALL(1, KT_WTYPE_FP8);
        } else {
          if (two)
            FEW_CALL(2, KT_WTYPE_BF16);
          else
            FEW_CALL(1, KT_WTYPE_BF16);
        }
#undef FEW_CALL
      }
    }
  }
  for (int64_t m = 0; m < a->count; m++)
    few_sum_lanes(acc + m * ld_acc * FEW_LANES, t, n, c + m * ldc);
}

/* The kernel table's gemm_nn: a few rows without a transpose, more through the transposed tile. */
static void gemm_nn(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                    int64_t ldc, void *scratch) {
  if (a->count > NN_FEW_M)
    nn_gemm(a, w, n0, n, c, ldc, scratch);
  else
    nn_gemm_few(a, w, n0, n, c, ldc, scratch);
}

#endif /* KTSFT_NN_DRIVE_H */
