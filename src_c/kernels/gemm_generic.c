/* gemm_generic.c - the portable GEMMs and packing: the C-level oracle of every faster family.
 *
 * Layout: a packed matrix is plain row-major bf16 (or int8), so caller-owned LoRA tensors are
 * valid operands too. Each call converts its block of W to fp32 once, then reuses it for every row
 * of A; sums use 16 independent partial accumulators, which compilers vectorize without
 * reassociating anything themselves, so results do not depend on the compiler's choices. */
#include "../internal.h"

enum { ROWS_PER_CHUNK = 8, LANES = 16 };

static void to_f32(const uint16_t *src, float *dst, int64_t n) {
  for (int64_t i = 0; i < n; i++) dst[i] = kt_bf16_to_f32(src[i]);
}

static float dot_f32(const float *x, const float *y, int64_t n) {
  float acc[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; l++) acc[l] += x[i + l] * y[i + l];
  for (int l = 0; i < n; i++, l++) acc[l] += x[i] * y[i];
  float s = 0.0f;
  for (int l = 0; l < LANES; l++) s += acc[l];
  return s;
}

static size_t generic_packed_bytes(int64_t rows, int64_t cols, kt_wtype wtype) {
  return kt_wtype_matrix_bytes(wtype, rows, cols);
}

static void generic_pack(void *dst, const void *src, int64_t rows, int64_t cols, kt_wtype wtype) {
  memcpy(dst, src, generic_packed_bytes(rows, cols, wtype));
}

static void generic_unpack(void *dst, const void *packed, int64_t rows, int64_t cols,
                           kt_wtype wtype) {
  memcpy(dst, packed, generic_packed_bytes(rows, cols, wtype));
}

size_t kt_generic_gemm_scratch_bytes(int64_t n, int64_t k) {
  const int64_t nn_cols = n < KT_BLOCK_N ? n : KT_BLOCK_N; /* x W: bands of KT_BLOCK_N columns */
  const int64_t nt = (n + ROWS_PER_CHUNK) * k, nn = nn_cols * k + k;
  return (size_t)(nt > nn ? nt : nn) * sizeof(float);
}

static int32_t dot_i8(const int8_t *x, const int8_t *y, int64_t n) {
  int32_t acc[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; l++) acc[l] += (int32_t)x[i + l] * (int32_t)y[i + l];
  for (int l = 0; i < n; i++, l++) acc[l] += (int32_t)x[i] * (int32_t)y[i];
  int32_t s = 0;
  for (int l = 0; l < LANES; l++) s += acc[l];
  return s;
}

static void generic_gemm_nt(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                            int64_t ldc, void *scratch) {
  const int64_t k = w->cols;
  float *wf = scratch;
  float *af = wf + n * k;
  to_f32((const uint16_t *)w->data + n0 * k, wf, n * k);
  for (int64_t m0 = 0; m0 < a->count; m0 += ROWS_PER_CHUNK) {
    const int64_t mb = a->count - m0 < ROWS_PER_CHUNK ? a->count - m0 : ROWS_PER_CHUNK;
    for (int64_t i = 0; i < mb; i++) to_f32(kt_row(a, m0 + i), af + i * k, k);
    for (int64_t i = 0; i < mb; i++)
      for (int64_t j = 0; j < n; j++) c[(m0 + i) * ldc + j] = dot_f32(af + i * k, wf + j * k, k);
  }
}

static void generic_gemm_nt_q8(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n,
                               float *c, int64_t ldc, void *scratch) {
  (void)scratch;
  const int64_t k = w->cols;
  const int8_t *wq = (const int8_t *)w->data + n0 * k;
  const float *ws = w->scale + n0;
  for (int64_t m = 0; m < a->count; m++) {
    const int64_t i = a->index ? (int64_t)a->index[m] : m;
    const int8_t *arow = a->base + i * a->ld;
    const float sa = a->scale[i];
    for (int64_t j = 0; j < n; j++)
      c[m * ldc + j] = sa * ws[j] * (float)dot_i8(arow, wq + j * k, k);
  }
}

static void generic_gemm_nn_band(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n,
                                 float *c, int64_t ldc, void *scratch) {
  const int64_t k = w->rows, cols = w->cols;
  float *wf = scratch;    /* W[:, n0:n0+n] as [k, n] (int8 and e4m3 values, exact) */
  float *af = wf + n * k; /* one row of A, times the row scales (int8, fp8 panels) */
  if (w->wtype == KT_WTYPE_INT8) {
    const int8_t *wsrc = (const int8_t *)w->data + n0;
    for (int64_t r = 0; r < k; r++)
      for (int64_t j = 0; j < n; j++) wf[r * n + j] = (float)wsrc[r * cols + j];
  } else if (w->wtype == KT_WTYPE_FP8) {
    const uint8_t *wsrc = (const uint8_t *)w->data + n0;
    for (int64_t r = 0; r < k; r++)
      for (int64_t j = 0; j < n; j++)
        wf[r * n + j] = kt_bf16_to_f32(kt_e4m3_to_bf16(wsrc[r * cols + j]));
  } else {
    const uint16_t *wsrc = (const uint16_t *)w->data + n0;
    for (int64_t r = 0; r < k; r++) to_f32(wsrc + r * cols, wf + r * n, n);
  }
  for (int64_t m = 0; m < a->count; m++) {
    to_f32(kt_row(a, m), af, k);
    if (w->scale)
      for (int64_t r = 0; r < k; r++) af[r] *= w->scale[r];
    float *crow = c + m * ldc;
    for (int64_t j = 0; j < n; j++) crow[j] = 0.0f;
    for (int64_t r = 0; r < k; r++) {
      const float av = af[r];
      const float *wrow = wf + r * n;
      for (int64_t j = 0; j < n; j++) crow[j] += av * wrow[j];
    }
  }
}

/* x W in bands of at most KT_BLOCK_N columns (the scratch holds one band of W as fp32). */
static void generic_gemm_nn(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                            int64_t ldc, void *scratch) {
  kt_gemm_in_bands(generic_gemm_nn_band, a, w, n0, n, c, ldc, scratch);
}

/* int4 in the API layout: each row of W and group of columns summed in int32, the groups in
 * fp32 times their scales. */
static void generic_gemm_nt_q4(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n,
                               float *c, int64_t ldc, void *scratch) {
  const int64_t k = w->cols, G = w->group, ng = kt_int4_groups(k, G), row = (k + 1) / 2;
  int8_t *wq = scratch; /* the rows n0 .. n0 + n as int8 [n, k] */
  for (int64_t j = 0; j < n; j++)
    for (int64_t q = 0; q < k; q++)
      wq[j * k + q] = (int8_t)kt_int4_at((const uint8_t *)w->data + (n0 + j) * row, q);
  for (int64_t m = 0; m < a->count; m++) {
    const int64_t i = a->index ? (int64_t)a->index[m] : m;
    const int8_t *arow = a->base + i * a->ld;
    for (int64_t j = 0; j < n; j++) {
      float total = 0.0f;
      for (int64_t g = 0; g < ng; g++) {
        const int64_t len = k - g * G < G ? k - g * G : G;
        total += w->scale[kt_int4_scale_index(n0 + j, g, ng)] *
                 (float)dot_i8(arow + g * G, wq + j * k + g * G, len);
      }
      c[m * ldc + j] = a->scale[i] * total;
    }
  }
}

/* x W on int4: W[:, n0:n0+n] as fp32 [k, n], then per row of A and of W the group scale of
 * each group the columns touch folded into the A value. */
static void generic_gemm_nn_q4_band(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n,
                                    float *c, int64_t ldc, void *scratch) {
  const int64_t k = w->rows, G = w->group, ng = kt_int4_groups(w->cols, G);
  const int64_t row = (w->cols + 1) / 2;
  float *wf = scratch;
  float *af = wf + n * k; /* one row of A */
  for (int64_t r = 0; r < k; r++)
    for (int64_t j = 0; j < n; j++)
      wf[r * n + j] = (float)kt_int4_at((const uint8_t *)w->data + r * row, n0 + j);
  for (int64_t m = 0; m < a->count; m++) {
    to_f32(kt_row(a, m), af, k);
    float *crow = c + m * ldc;
    for (int64_t j = 0; j < n; j++) crow[j] = 0.0f;
    for (int64_t r = 0; r < k; r++) {
      const float *wrow = wf + r * n;
      for (int64_t j0 = 0; j0 < n;) {
        const int64_t g = (n0 + j0) / G, j1 = (g + 1) * G - n0 < n ? (g + 1) * G - n0 : n;
        const float f = af[r] * w->scale[kt_int4_scale_index(r, g, ng)];
        for (int64_t j = j0; j < j1; j++) crow[j] += f * wrow[j];
        j0 = j1;
      }
    }
  }
}

static void generic_gemm_nn_q4(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n,
                               float *c, int64_t ldc, void *scratch) {
  kt_gemm_in_bands(generic_gemm_nn_q4_band, a, w, n0, n, c, ldc, scratch);
}

/* The packed layout is row-major: the panel is row-major bf16 [nr, nc]. */
static void generic_decode_fp8(const kt_packed *w, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                               kt_sweep sweep, void *dst) {
  (void)sweep;
  uint16_t table[256];
  for (int i = 0; i < 256; i++) table[i] = kt_e4m3_to_bf16((uint8_t)i);
  const uint8_t *src = (const uint8_t *)w->data + r0 * w->cols + c0;
  uint16_t *d = dst;
  for (int64_t r = 0; r < nr; r++)
    for (int64_t c = 0; c < nc; c++) d[r * nc + c] = table[src[r * w->cols + c]];
}

void kt_lora_generic_nt(const kt_rows *a, const uint16_t *b, int64_t n, int64_t k, float *c,
                        int64_t ldc, void *scratch) {
  const kt_packed w = kt_bf16_matrix(b, n, k);
  generic_gemm_nt(a, &w, 0, n, c, ldc, scratch);
}

void kt_lora_generic_nn(const kt_rows *a, const uint16_t *b, int64_t k, int64_t n, float *c,
                        int64_t ldc, void *scratch) {
  const kt_packed w = kt_bf16_matrix(b, k, n);
  generic_gemm_nn(a, &w, 0, n, c, ldc, scratch);
}

const kt_kernels kt_kernels_generic = {
    .isa = KT_ISA_GENERIC,
    .variant = "generic",
    .packed_bytes = generic_packed_bytes,
    .pack = generic_pack,
    .unpack = generic_unpack,
    .gemm_scratch_bytes = kt_generic_gemm_scratch_bytes,
    .gemm_nt = generic_gemm_nt,
    .decode_fp8 = generic_decode_fp8,
    .gemm_nt_q8 = generic_gemm_nt_q8,
    .gemm_nn = generic_gemm_nn,
    .gemm_nt_q4 = generic_gemm_nt_q4,
    .gemm_nn_q4 = generic_gemm_nn_q4,
    .sigmoid = kt_act_generic_sigmoid,
    .silu = kt_act_generic_silu,
    .store_bf16 = kt_store_bf16,
    .lora_nt = kt_lora_generic_nt,
    .lora_nn = kt_lora_generic_nn,
    .lora_add_nt = kt_lora_add_nt,
    .lora_add_nn = kt_lora_add_nn,
    .outer_rn = kt_outer_rn,
    .outer_nr = kt_outer_nr,
};
