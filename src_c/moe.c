/* moe.c - engine lifetime, base-weight packing and the saved-state stack. */
#include <stdlib.h>
#include <time.h>

#include "moe_internal.h"

static void drop_saved(kt_moe *m);

kt_status kt_moe_create(const kt_moe_config *c, kt_pool *pool, kt_moe **out, kt_error *err) {
  *out = NULL;
  if (!c || !pool) return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "config and pool are required");
  const struct {
    const char *name;
    int32_t value;
  } sizes[] = {{"expert_num", c->expert_num},
               {"num_experts_per_tok", c->num_experts_per_tok},
               {"hidden_size", c->hidden_size},
               {"intermediate_size", c->intermediate_size},
               {"lora_rank", c->lora_rank},
               {"max_len", c->max_len},
               {"max_cache_depth", c->max_cache_depth}};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
    if (sizes[i].value <= 0)
      return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "%s must be > 0, got %d", sizes[i].name,
                     (int)sizes[i].value);
  if (c->quant != KT_QUANT_BF16 && c->quant != KT_QUANT_INT8 && c->quant != KT_QUANT_FP8 &&
      c->quant != KT_QUANT_INT4)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                   "quant must be bf16, int8, fp8 or int4, got code %d", (int)c->quant);
  const int64_t group = c->quant != KT_QUANT_INT4 ? 0 : c->group_size ? c->group_size : 32;
  if (c->quant == KT_QUANT_INT4 && !kt_int4_group_valid(group))
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "group_size must be 32, 64 or 128, got %d",
                   (int)c->group_size);
  if (!(c->lora_alpha == c->lora_alpha))
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "lora_alpha must be a number, got NaN");
  /* Route and token indices are int32 in the engine. */
  if ((int64_t)c->max_len * c->num_experts_per_tok > INT32_MAX)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                   "max_len * num_experts_per_tok must be < 2^31, got %d * %d", (int)c->max_len,
                   (int)c->num_experts_per_tok);
  const kt_kernels *kern = kt_kernels_for(c->isa);
  if (!kern)
    return kt_fail(err, KT_ERR_ISA_UNAVAILABLE, "kernel family '%s' is not available here",
                   kt_isa_name(c->isa));
  kt_moe *m = calloc(1, sizeof *m);
  kt_saved **stack = calloc((size_t)c->max_cache_depth, sizeof *stack);
  if (!m || !stack) {
    free(m);
    free(stack);
    return kt_fail(err, KT_ERR_OUT_OF_MEMORY, "out of memory creating the engine");
  }
  m->cfg = *c;
  m->scale = c->lora_alpha / (float)c->lora_rank;
  m->pool = pool;
  m->kern = kern;
  m->wtype = c->quant == KT_QUANT_INT8   ? KT_WTYPE_INT8
             : c->quant == KT_QUANT_FP8  ? KT_WTYPE_FP8
             : c->quant == KT_QUANT_INT4 ? KT_WTYPE_INT4
                                         : KT_WTYPE_BF16;
  m->group = group;
  m->cfg.group_size = (int32_t)group;
  m->stack = stack;
  pthread_mutex_init(&m->lock, NULL);
  *out = m;
  return KT_OK;
}

void kt_moe_destroy(kt_moe *m) {
  if (!m) return;
  drop_saved(m);
  for (int p = 0; p < 3; p++) {
    kt_free(m->packed[p]);
    kt_free(m->scales[p]);
  }
  free(m->expert_loaded);
  pthread_mutex_destroy(&m->lock);
  free(m->stack);
  free(m);
}

static int64_t proj_rows(const kt_moe *m, int p) {
  return p == KT_DOWN ? m->cfg.hidden_size : m->cfg.intermediate_size;
}
static int64_t proj_cols(const kt_moe *m, int p) {
  return p == KT_DOWN ? m->cfg.intermediate_size : m->cfg.hidden_size;
}
static const char *const proj_name[3] = {"gate_proj", "up_proj", "down_proj"};
static const char *const scale_name[3] = {"gate_scale", "up_scale", "down_scale"};
static const char *const scale_inv_name[3] = {"gate_scale_inv", "up_scale_inv", "down_scale_inv"};
/* Scales of one expert's matrix of projection p (0 in bf16 mode). */
static size_t proj_scales(const kt_moe *m, int p) {
  return (size_t)kt_scale_count(m->wtype, proj_rows(m, p), proj_cols(m, p), m->group);
}
/* Floats the engine keeps for them (int4: in blocks of 16 rows). */
static size_t proj_scales_stored(const kt_moe *m, int p) {
  return (size_t)kt_scale_stored(m->wtype, proj_rows(m, p), proj_cols(m, p), m->group);
}

/* The packed storage of all E experts, made at the first load. */
static kt_status alloc_packed(kt_moe *m, kt_error *err) {
  const size_t E = (size_t)m->cfg.expert_num;
  size_t total = E;
  for (int p = 0; p < 3; p++) {
    m->packed_stride[p] =
        kt_align_up(m->kern->packed_bytes(proj_rows(m, p), proj_cols(m, p), m->wtype));
    m->packed[p] = kt_alloc_huge(m->packed_stride[p] * E);
    total += m->packed_stride[p] * E;
    if (proj_scales(m, p)) {
      m->scales[p] = kt_alloc(E * proj_scales_stored(m, p) * sizeof(float));
      total += E * proj_scales_stored(m, p) * sizeof(float);
    }
  }
  m->expert_loaded = calloc(E, 1);
  int ok = m->expert_loaded != NULL;
  for (int p = 0; p < 3; p++) ok &= m->packed[p] && (!proj_scales(m, p) || m->scales[p]);
  if (ok) return KT_OK;
  for (int p = 0; p < 3; p++) {
    kt_free(m->packed[p]);
    kt_free(m->scales[p]);
    m->packed[p] = NULL;
    m->scales[p] = NULL;
  }
  free(m->expert_loaded);
  m->expert_loaded = NULL;
  return kt_fail(err, KT_ERR_OUT_OF_MEMORY,
                 "out of memory packing the base weights of %zu experts (%zu bytes)", E, total);
}

/* Experts [first, first + count) must be a non-empty part of [0, E). */
static kt_status check_experts(const kt_moe *m, int32_t first, int32_t count, kt_error *err) {
  const int32_t E = m->cfg.expert_num;
  if (first < 0 || count < 1 || first > E - count)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                   "experts [%d, %d) are outside [0, expert_num = %d) or empty", (int)first,
                   (int)first + (int)count, (int)E);
  return KT_OK;
}

typedef struct pack_ctx {
  kt_moe *m;
  int32_t first;
  const kt_expert_weights *w;
  void *q8; /* bf16 into int8 or fp8: one matrix per worker */
  size_t q8_each;
} pack_ctx;

static void pack_one(void *vctx, int64_t item, int32_t worker) {
  pack_ctx *ctx = vctx;
  kt_moe *m = ctx->m;
  const int p = (int)(item % 3);
  const int64_t i = item / 3, e = ctx->first + i;
  const int64_t rows = proj_rows(m, p), cols = proj_cols(m, p);
  const size_t n = (size_t)(rows * cols);
  void *dst = (char *)m->packed[p] + (size_t)e * m->packed_stride[p];
  const void *src[3] = {ctx->w->gate_proj, ctx->w->up_proj, ctx->w->down_proj};
  if (m->wtype == KT_WTYPE_BF16) {
    m->kern->pack(dst, (const uint16_t *)src[p] + (size_t)i * n, rows, cols, KT_WTYPE_BF16);
    return;
  }
  const size_t ns = proj_scales(m, p);
  const int64_t ng = m->wtype == KT_WTYPE_INT4 ? kt_int4_groups(cols, m->group) : 0;
  float *scale = m->scales[p] + (size_t)e * proj_scales_stored(m, p);
  if (ctx->w->dtype != KT_DTYPE_BF16) { /* int8, e4m3 or int4 bytes with their scales */
    const float *s[3] = {ctx->w->gate_scale, ctx->w->up_scale, ctx->w->down_scale};
    if (m->wtype == KT_WTYPE_INT4)
      kt_int4_scales_to_blocks(s[p] + (size_t)i * ns, rows, ng, scale);
    else
      memcpy(scale, s[p] + (size_t)i * ns, ns * sizeof(float));
    const size_t bytes = kt_wtype_matrix_bytes(m->wtype, rows, cols);
    m->kern->pack(dst, (const char *)src[p] + (size_t)i * bytes, rows, cols, m->wtype);
    return;
  }
  char *q = (char *)ctx->q8 + (size_t)worker * ctx->q8_each;
  const uint16_t *w = (const uint16_t *)src[p] + (size_t)i * n;
  if (m->wtype == KT_WTYPE_FP8)
    kt_quantize_fp8_bf16(w, rows, cols, (uint8_t *)q, scale);
  else if (m->wtype == KT_WTYPE_INT4) { /* the scales in API layout after the nibbles */
    float *api = (float *)(void *)(q + kt_align_up(kt_wtype_matrix_bytes(m->wtype, rows, cols)));
    kt_quantize_int4_bf16(w, rows, cols, m->group, (uint8_t *)q, api);
    kt_int4_scales_to_blocks(api, rows, ng, scale);
  } else
    for (int64_t r = 0; r < rows; r++)
      scale[r] = kt_quantize_row_bf16(w + r * cols, cols, (int8_t *)q + r * cols);
  m->kern->pack(dst, q, rows, cols, m->wtype);
}

kt_status kt_moe_load_experts(kt_moe *m, int32_t first, int32_t count, const kt_expert_weights *w,
                              kt_error *err) {
  if (!w) return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "weights must be set");
  kt_status s = check_experts(m, first, count, err);
  if (s != KT_OK) return s;
  const void *src[3] = {w->gate_proj, w->up_proj, w->down_proj};
  for (int p = 0; p < 3; p++)
    if (!src[p])
      return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                     "gate_proj, up_proj and down_proj must all be set (got a null pointer for %s)",
                     proj_name[p]);
  if (w->dtype == KT_DTYPE_INT8 || w->dtype == KT_DTYPE_FP8_E4M3 || w->dtype == KT_DTYPE_INT4) {
    const int fp8 = w->dtype == KT_DTYPE_FP8_E4M3, int4 = w->dtype == KT_DTYPE_INT4;
    const char *what = fp8 ? "e4m3" : int4 ? "int4" : "int8";
    const kt_wtype needs = fp8 ? KT_WTYPE_FP8 : int4 ? KT_WTYPE_INT4 : KT_WTYPE_INT8;
    static const char *const stores[4] = {"bf16", "int8", "fp8", "int4"};
    if (m->wtype != needs)
      return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                     "%s base weights need quant = %s; this engine stores %s", what,
                     fp8 ? "fp8" : what, stores[m->wtype]);
    const float *sc[3] = {w->gate_scale, w->up_scale, w->down_scale};
    for (int p = 0; p < 3; p++) {
      if (!sc[p])
        return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                       "%s %s needs its %s scales (got a null pointer)", what, proj_name[p],
                       fp8    ? "block"
                       : int4 ? "group"
                              : "per-row");
      const size_t ns = proj_scales(m, p) * (size_t)count;
      for (size_t j = 0; (fp8 || int4) && j < ns; j++)
        if (!isfinite(sc[p][j]))
          return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                         "%s of expert %d, %s %zu is %g: the %s scales of %s weights must be "
                         "finite",
                         fp8 ? scale_inv_name[p] : scale_name[p],
                         (int)(first + (int32_t)(j / proj_scales(m, p))), fp8 ? "block" : "scale",
                         j % proj_scales(m, p), (double)sc[p][j], fp8 ? "block" : "group", what);
    }
  } else if (w->dtype != KT_DTYPE_BF16) {
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                   "base weights must be bfloat16, int8, e4m3 or int4");
  }
  pack_ctx ctx = {.m = m, .first = first, .w = w};
  if (m->wtype != KT_WTYPE_BF16 && w->dtype == KT_DTYPE_BF16) {
    const int64_t H = m->cfg.hidden_size, I = m->cfg.intermediate_size;
    ctx.q8_each = kt_align_up((size_t)(H * I));
    if (m->wtype == KT_WTYPE_INT4) /* and the API layout's group scales */
      ctx.q8_each += sizeof(float) * kt_max_size((size_t)(I * kt_int4_groups(H, m->group)),
                                                 (size_t)(H * kt_int4_groups(I, m->group)));
    ctx.q8 = kt_alloc(ctx.q8_each * (size_t)kt_pool_num_threads(m->pool));
    if (!ctx.q8)
      return kt_fail(err, KT_ERR_OUT_OF_MEMORY, "out of memory quantizing the base weights");
  }
  pthread_mutex_lock(&m->lock);
  s = m->packed[0] ? KT_OK : alloc_packed(m, err);
  if (s == KT_OK) {
    kt_pool_parallel(m->pool, 3 * (int64_t)count, pack_one, &ctx);
    for (int32_t e = first; e < first + count; e++) {
      m->n_loaded += !m->expert_loaded[e];
      m->expert_loaded[e] = 1;
    }
  }
  pthread_mutex_unlock(&m->lock);
  kt_free(ctx.q8);
  return s;
}

kt_status kt_moe_load_weights(kt_moe *m, const uint16_t *gate, const uint16_t *up,
                              const uint16_t *down, kt_error *err) {
  const kt_expert_weights w = {
      .dtype = KT_DTYPE_BF16, .gate_proj = gate, .up_proj = up, .down_proj = down};
  return kt_moe_load_experts(m, 0, m->cfg.expert_num, &w, err);
}

kt_status kt_moe_read_experts(kt_moe *m, int32_t first, int32_t count, const kt_expert_buffers *out,
                              kt_error *err) {
  if (!out) return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "output buffers must be set");
  const kt_status s = check_experts(m, first, count, err);
  if (s != KT_OK) return s;
  void *dst[3] = {out->gate_proj, out->up_proj, out->down_proj};
  float *sc[3] = {out->gate_scale, out->up_scale, out->down_scale};
  for (int p = 0; p < 3; p++)
    if (!dst[p] || (proj_scales(m, p) && !sc[p]))
      return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "the buffer for %s%s is a null pointer",
                     proj_name[p], dst[p] ? " scales" : "");
  pthread_mutex_lock(&m->lock);
  for (int32_t e = first; e < first + count; e++) {
    if (m->expert_loaded && m->expert_loaded[e]) continue;
    pthread_mutex_unlock(&m->lock);
    return kt_fail(err, KT_ERR_WEIGHTS_NOT_LOADED, "Weights not loaded: expert %d has no weights",
                   (int)e);
  }
  for (int p = 0; p < 3; p++) {
    const int64_t rows = proj_rows(m, p), cols = proj_cols(m, p);
    const size_t bytes = kt_wtype_matrix_bytes(m->wtype, rows, cols);
    for (int32_t i = 0; i < count; i++) {
      const size_t e = (size_t)(first + i);
      m->kern->unpack((char *)dst[p] + (size_t)i * bytes,
                      (const char *)m->packed[p] + e * m->packed_stride[p], rows, cols, m->wtype);
      const size_t ns = proj_scales(m, p);
      const float *held = m->scales[p] + e * proj_scales_stored(m, p);
      if (m->wtype == KT_WTYPE_INT4)
        kt_int4_scales_from_blocks(held, rows, kt_int4_groups(cols, m->group), sc[p] + i * ns);
      else if (ns)
        memcpy(sc[p] + (size_t)i * ns, held, ns * sizeof(float));
    }
  }
  pthread_mutex_unlock(&m->lock);
  return KT_OK;
}

int kt_moe_weights_loaded(const kt_moe *m) { return m->n_loaded == m->cfg.expert_num; }

int32_t kt_moe_experts_loaded(const kt_moe *m) { return m->n_loaded; }

size_t kt_moe_packed_bytes(const kt_moe *m) {
  if (!m->packed[0]) return 0;
  const size_t E = (size_t)m->cfg.expert_num;
  size_t bytes = 0;
  for (int p = 0; p < 3; p++) {
    bytes += m->packed_stride[p] * E;
    if (m->scales[p]) bytes += E * proj_scales_stored(m, p) * sizeof(float);
  }
  return bytes;
}

kt_isa kt_moe_isa(const kt_moe *m) { return m->cfg.isa; }

const char *kt_moe_kernel_variant(const kt_moe *m) { return m->kern->variant; }

kt_status kt_lora_check(const kt_lora *l, kt_error *err) {
  const struct {
    const char *name;
    const void *ptr;
  } f[] = {{"gate_lora_a", l->gate_a}, {"gate_lora_b", l->gate_b}, {"up_lora_a", l->up_a},
           {"up_lora_b", l->up_b},     {"down_lora_a", l->down_a}, {"down_lora_b", l->down_b}};
  for (size_t i = 0; i < 6; i++)
    if (!f[i].ptr)
      return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "LoRA tensor %s is not set (null pointer)",
                     f[i].name);
  return KT_OK;
}

int64_t kt_saved_num_tokens(const kt_saved *s) { return s ? s->rt.num_tokens : 0; }

void kt_saved_release(kt_saved *s) {
  if (!s) return;
  kt_free(s->routing_block);
  kt_free(s->state_block);
  free(s);
}

int32_t kt_moe_cache_depth(const kt_moe *m) { return m->depth; }

int64_t kt_moe_cache_top_tokens(const kt_moe *m) {
  return m->depth ? m->stack[m->depth - 1]->rt.num_tokens : 0;
}

static void drop_saved(kt_moe *m) {
  while (m->depth > 0) kt_saved_release(m->stack[--m->depth]);
}

void kt_moe_cache_clear(kt_moe *m) {
  pthread_mutex_lock(&m->lock);
  drop_saved(m);
  pthread_mutex_unlock(&m->lock);
}

double kt_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void kt_moe_run_phase(kt_moe *m, kt_phase phase, int64_t n_items, kt_work_fn fn, void *ctx) {
  const double start = m->profiling ? kt_now() : 0.0;
  kt_pool_parallel(m->pool, n_items, fn, ctx);
  kt_moe_add_phase(m, phase, start);
}

void kt_moe_add_phase(kt_moe *m, kt_phase phase, double start) {
  if (!m->profiling) return;
  m->phase_seconds[phase] += kt_now() - start;
  m->phase_runs[phase]++;
}

const char *kt_phase_name(kt_phase phase) {
  static const char *const names[KT_PHASE_COUNT] = {"forward", "FQ", "F0",       "F1", "F2",
                                                    "F3",      "F4", "backward", "BZ", "B0",
                                                    "B1",      "B2", "B3",       "B4", "B5"};
  return (int)phase >= 0 && phase < KT_PHASE_COUNT ? names[phase] : "unknown";
}

void kt_moe_set_profiling(kt_moe *m, int on) {
  pthread_mutex_lock(&m->lock);
  m->profiling = on != 0;
  memset(m->phase_seconds, 0, sizeof m->phase_seconds);
  memset(m->phase_runs, 0, sizeof m->phase_runs);
  pthread_mutex_unlock(&m->lock);
}

void kt_moe_phase_times(kt_moe *m, double seconds[KT_PHASE_COUNT], int64_t runs[KT_PHASE_COUNT]) {
  pthread_mutex_lock(&m->lock);
  memcpy(seconds, m->phase_seconds, sizeof m->phase_seconds);
  memcpy(runs, m->phase_runs, sizeof m->phase_runs);
  pthread_mutex_unlock(&m->lock);
}
