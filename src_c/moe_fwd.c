/* moe_fwd.c - the forward pass (spec section 3) in four parallel phases:
 *
 *   F0  per expert            a_g = x A_g^T, a_u = x A_u^T                    [R_e, r]
 *                             (int8: x quantized per token first, per token block)
 *   F1  per expert, I block   g, u = x W^T + s a B^T (bf16); h = silu(g) u (bf16)
 *   F2  per expert            a_d = h A_d^T                                    [R_e, r]
 *                             (int8: h quantized per route; the scales are saved)
 *   F3  per H block           out[t] = sum over routes of w * (h W_d^T + s a_d B_d^T)
 *       (fewer H blocks than 2 threads each: per expert and H block, each route's part to a
 *       buffer; F4, per token, sums them in the same order)
 *
 * In int8 mode the base-weight GEMMs take the per-row quantized x and h (spec section 5).
 * Every output element is written by exactly one work item, which sums in a fixed order (F3
 * walks the experts in ascending order), so results do not depend on the number of threads. */
#include <inttypes.h>
#include <stdlib.h>

#include "moe_internal.h"

typedef struct fwd_ctx {
  const kt_moe *m;
  const kt_saved *st;
  const kt_lora *lora;
  uint16_t *h;     /* [R, I] */
  int8_t *xq, *hq; /* int8 mode: [T, H] and [R, I], one scale per row in xs, st->h_scale */
  float *xs;
  void *out;
  kt_dtype out_dtype;
  int64_t max_routes; /* largest R_e */
  float *y_route;     /* [R, H] when F3 splits by route (see f3_down_routes), else NULL */
  int64_t n_iblk, n_hblk, n_tblk;
  char *scratch;
  size_t scratch_each;
} fwd_ctx;

static float *worker_scratch(const fwd_ctx *c, int32_t worker) {
  return (float *)(c->scratch + (size_t)worker * c->scratch_each);
}

static void fq_quantize_x(void *vc, int64_t item, int32_t worker) {
  (void)worker;
  const fwd_ctx *c = vc;
  const int64_t H = c->m->cfg.hidden_size, T = c->st->rt.num_tokens;
  const int64_t t0 = item * KT_BLOCK_N, nt = kt_block_len(T, t0);
  for (int64_t t = t0; t < t0 + nt; t++)
    c->xs[t] = kt_quantize_row_bf16(c->st->x + t * H, H, c->xq + t * H);
}

static void f0_lora_a(void *vc, int64_t item, int32_t worker) {
  const fwd_ctx *c = vc;
  const kt_moe *m = c->m;
  const kt_routing *rt = &c->st->rt;
  const int64_t H = m->cfg.hidden_size, r = m->cfg.lora_rank;
  const int32_t e = rt->active[item];
  const int64_t off = rt->offset[e], M = rt->offset[e + 1] - off;
  const kt_rows x = {c->st->x, H, rt->token + off, M};
  float *scratch = worker_scratch(c, worker);
  m->kern->lora_nt(&x, c->lora->gate_a + e * r * H, r, H, c->st->a_g + off * r, r, scratch);
  m->kern->lora_nt(&x, c->lora->up_a + e * r * H, r, H, c->st->a_u + off * r, r, scratch);
}

static void f1_gate_up(void *vc, int64_t item, int32_t worker) {
  const fwd_ctx *c = vc;
  const kt_moe *m = c->m;
  const kt_saved *st = c->st;
  const kt_routing *rt = &st->rt;
  const int64_t H = m->cfg.hidden_size, I = m->cfg.intermediate_size, r = m->cfg.lora_rank;
  const int32_t e = rt->active[item / c->n_iblk];
  const int64_t i0 = (item % c->n_iblk) * KT_BLOCK_N;
  const int64_t nb = kt_block_len(I, i0);
  const int64_t off = rt->offset[e], M = rt->offset[e + 1] - off;
  const kt_rows x = {st->x, H, rt->token + off, M};
  float *gt = worker_scratch(c, worker), *ut = gt + M * nb, *ht = ut + M * nb;
  void *gemm_scratch = ht + M * nb;
  const kt_packed wg = kt_moe_weight(m, KT_GATE, e), wu = kt_moe_weight(m, KT_UP, e);
  kt_moe_prefetch_scales(m, KT_UP, e, i0, nb); /* while the gate GEMM runs */
  if (c->xq) {
    const kt_rows_q8 xq = {c->xq, H, rt->token + off, M, c->xs};
    kt_base_gemm_nt_q8(m->kern, &xq, &wg, i0, nb, gt, nb, gemm_scratch);
    kt_base_gemm_nt_q8(m->kern, &xq, &wu, i0, nb, ut, nb, gemm_scratch);
  } else {
    kt_base_gemm_nt(m->kern, &x, &wg, i0, nb, gt, nb, gemm_scratch);
    kt_base_gemm_nt(m->kern, &x, &wu, i0, nb, ut, nb, gemm_scratch);
  }
  m->kern->lora_add_nt(M, nb, r, st->a_g + off * r, c->lora->gate_b + e * I * r, i0, m->scale, gt,
                       nb);
  m->kern->lora_add_nt(M, nb, r, st->a_u + off * r, c->lora->up_b + e * I * r, i0, m->scale, ut,
                       nb);
  for (int64_t i = 0; i < M * nb; i++) {
    gt[i] = kt_round_bf16(gt[i]);
    ut[i] = kt_round_bf16(ut[i]);
  }
  m->kern->silu(gt, ht, M * nb);
  for (int64_t mm = 0; mm < M; mm++) {
    const int64_t row = (off + mm) * I + i0;
    for (int64_t j = 0; j < nb; j++) {
      const int64_t t = mm * nb + j;
      st->g[row + j] = kt_f32_to_bf16(gt[t]);
      st->u[row + j] = kt_f32_to_bf16(ut[t]);
      c->h[row + j] = kt_f32_to_bf16(ht[t] * ut[t]);
    }
  }
}

static void f2_lora_down_a(void *vc, int64_t item, int32_t worker) {
  const fwd_ctx *c = vc;
  const kt_moe *m = c->m;
  const kt_routing *rt = &c->st->rt;
  const int64_t I = m->cfg.intermediate_size, r = m->cfg.lora_rank;
  const int32_t e = rt->active[item];
  const int64_t off = rt->offset[e], M = rt->offset[e + 1] - off;
  const kt_rows h = {c->h + off * I, I, NULL, M};
  m->kern->lora_nt(&h, c->lora->down_a + e * r * I, r, I, c->st->a_d + off * r, r,
                   worker_scratch(c, worker));
  if (c->hq)
    for (int64_t i = off; i < off + M; i++)
      c->st->h_scale[i] = kt_quantize_row_bf16(c->h + i * I, I, c->hq + i * I);
}

/* The weighted output w (h W_d^T + s a_d B_d^T) of expert e's routes in the H columns h0 ..
 * h0 + nb: y [M, nb] with row stride ldy. */
static void f3_expert_block(const fwd_ctx *c, int32_t e, int64_t h0, int64_t nb, float *y,
                            int64_t ldy, void *gemm_scratch) {
  const kt_moe *m = c->m;
  const kt_saved *st = c->st;
  const kt_routing *rt = &st->rt;
  const int64_t H = m->cfg.hidden_size, I = m->cfg.intermediate_size, r = m->cfg.lora_rank;
  const int64_t off = rt->offset[e], M = rt->offset[e + 1] - off;
  const kt_packed wd = kt_moe_weight(m, KT_DOWN, e);
  if (c->hq) {
    const kt_rows_q8 hq = {c->hq + off * I, I, NULL, M, st->h_scale + off};
    kt_base_gemm_nt_q8(m->kern, &hq, &wd, h0, nb, y, ldy, gemm_scratch);
  } else {
    const kt_rows h = {c->h + off * I, I, NULL, M};
    kt_base_gemm_nt(m->kern, &h, &wd, h0, nb, y, ldy, gemm_scratch);
  }
  m->kern->lora_add_nt(M, nb, r, st->a_d + off * r, c->lora->down_b + e * H * r, h0, m->scale, y,
                       ldy);
  for (int64_t mm = 0; mm < M; mm++)
    for (int64_t j = 0; j < nb; j++) y[mm * ldy + j] *= rt->weight[off + mm];
}

/* out[t, h0 .. h0 + nb) = acc, as fp32 or bf16. */
static void f3_store(const fwd_ctx *c, int64_t t, int64_t h0, int64_t nb, const float *acc) {
  const int64_t H = c->m->cfg.hidden_size;
  if (c->out_dtype == KT_DTYPE_F32) {
    float *o = (float *)c->out + t * H + h0;
    for (int64_t j = 0; j < nb; j++) o[j] = acc[j];
  } else {
    c->m->kern->store_bf16((uint16_t *)c->out + t * H + h0, acc, nb, 0);
  }
}

/* One item per H block (enough blocks for the threads): sums every expert's part in place. */
static void f3_down(void *vc, int64_t item, int32_t worker) {
  const fwd_ctx *c = vc;
  const kt_routing *rt = &c->st->rt;
  const int64_t H = c->m->cfg.hidden_size, T = rt->num_tokens;
  const int64_t h0 = item * KT_BLOCK_N, nb = kt_block_len(H, h0);
  float *acc = worker_scratch(c, worker), *yt = acc + T * nb;
  void *gemm_scratch = yt + c->max_routes * nb;
  for (int64_t i = 0; i < T * nb; i++) acc[i] = 0.0f;
  for (int32_t a = 0; a < rt->n_active; a++) {
    const int32_t e = rt->active[a];
    const int64_t off = rt->offset[e], M = rt->offset[e + 1] - off;
    if (a + 1 < rt->n_active) /* the next expert's, while this one's GEMM runs */
      kt_moe_prefetch_scales(c->m, KT_DOWN, rt->active[a + 1], h0, nb);
    f3_expert_block(c, e, h0, nb, yt, nb, gemm_scratch);
    for (int64_t mm = 0; mm < M; mm++) {
      float *dst = acc + (int64_t)rt->token[off + mm] * nb;
      for (int64_t j = 0; j < nb; j++) dst[j] += yt[mm * nb + j];
    }
  }
  for (int64_t t = 0; t < T; t++) f3_store(c, t, h0, nb, acc + t * nb);
}

/* Too few H blocks for the threads: one item per (expert, H block) writes each route's part to
 * y_route [R, H]; f4_sum_routes then adds a token's parts in the order f3_down does. */
static void f3_down_routes(void *vc, int64_t item, int32_t worker) {
  const fwd_ctx *c = vc;
  const kt_routing *rt = &c->st->rt;
  const int64_t H = c->m->cfg.hidden_size;
  const int32_t e = rt->active[item / c->n_hblk];
  const int64_t h0 = (item % c->n_hblk) * KT_BLOCK_N, nb = kt_block_len(H, h0);
  f3_expert_block(c, e, h0, nb, c->y_route + rt->offset[e] * H + h0, H, worker_scratch(c, worker));
}

static void f4_sum_routes(void *vc, int64_t t, int32_t worker) {
  const fwd_ctx *c = vc;
  const kt_routing *rt = &c->st->rt;
  const int64_t H = c->m->cfg.hidden_size;
  float *acc = worker_scratch(c, worker);
  kt_sum_token_routes(rt, t, c->y_route, H, acc);
  f3_store(c, t, 0, H, acc);
}

kt_status kt_moe_forward(kt_moe *m, const kt_forward_args *args, kt_error *err) {
  const kt_moe_config *cfg = &m->cfg;
  const int64_t T = args->num_tokens, H = cfg->hidden_size, I = cfg->intermediate_size;
  const int64_t r = cfg->lora_rank;
  if (!kt_moe_weights_loaded(m))
    return kt_fail(err, KT_ERR_WEIGHTS_NOT_LOADED,
                   "Weights not loaded: %d of %d experts loaded; load the base weights before "
                   "forward",
                   (int)m->n_loaded, (int)cfg->expert_num);
  if (T < 1 || T > cfg->max_len)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                   "number of tokens must be in 1..max_len (max_len = %d), got %" PRId64,
                   (int)cfg->max_len, T);
  if (args->k != cfg->num_experts_per_tok)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                   "k mismatch: expert_ids has %d columns, expected num_experts_per_tok = %d",
                   (int)args->k, (int)cfg->num_experts_per_tok);
  if (!args->expert_ids || !args->weights || !args->input || !args->output)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "%s is a null pointer",
                   !args->expert_ids ? "expert_ids"
                   : !args->weights  ? "weights"
                   : !args->input    ? "input"
                                     : "output");
  if (args->output_dtype != KT_DTYPE_F32 && args->output_dtype != KT_DTYPE_BF16)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "output dtype must be float32 or bfloat16");
  kt_status s = kt_lora_check(&args->lora, err);
  if (s != KT_OK) return s;

  pthread_mutex_lock(&m->lock);
  const double call_start = m->profiling ? kt_now() : 0.0;
  const int save = args->save_for_backward != 0;
  const int to_stack = save && !args->saved_out;
  if (to_stack && m->depth >= cfg->max_cache_depth) {
    pthread_mutex_unlock(&m->lock);
    return kt_fail(err, KT_ERR_CACHE_FULL,
                   "saved-state stack is full: %d forward(s) saved for backward and "
                   "max_cache_depth = %d; run backward first or raise max_cache_depth",
                   (int)m->depth, (int)cfg->max_cache_depth);
  }
  kt_saved *st = calloc(1, sizeof *st);
  if (st) st->owner = m;
  if (st) st->routing_block = kt_alloc(kt_routing_bytes(T, args->k, cfg->expert_num));
  if (!st || !st->routing_block) {
    kt_saved_release(st);
    pthread_mutex_unlock(&m->lock);
    return kt_fail(err, KT_ERR_OUT_OF_MEMORY, "out of memory routing %" PRId64 " tokens", T);
  }
  s = kt_routing_build(&st->rt, st->routing_block, args->expert_ids, args->weights, T, args->k,
                       cfg->expert_num, err);
  if (s != KT_OK) {
    kt_saved_release(st);
    pthread_mutex_unlock(&m->lock);
    return s;
  }
  const kt_routing *rt = &st->rt;
  const int64_t R = rt->num_routes;
  fwd_ctx c = {.m = m,
               .st = st,
               .lora = &args->lora,
               .out = args->output,
               .out_dtype = args->output_dtype,
               .n_iblk = (I + KT_BLOCK_N - 1) / KT_BLOCK_N,
               .n_hblk = (H + KT_BLOCK_N - 1) / KT_BLOCK_N,
               .n_tblk = (T + KT_BLOCK_N - 1) / KT_BLOCK_N};
  const int q8 = m->wtype == KT_WTYPE_INT8 || m->wtype == KT_WTYPE_INT4; /* int8 x (W4A8) */
  for (int32_t a = 0; a < rt->n_active; a++) {
    const int32_t e = rt->active[a];
    const int64_t n = rt->offset[e + 1] - rt->offset[e];
    if (n > c.max_routes) c.max_routes = n;
  }
  const int64_t K = H > I ? H : I, Mx = c.max_routes;
  size_t each = m->kern->gemm_scratch_bytes(r, K); /* F0, F2 */
  each =
      kt_max_size(each, 3 * (size_t)(Mx * KT_BLOCK_N) * sizeof(float) +
                            kt_base_gemm_scratch_bytes(m->kern, m->wtype, KT_BLOCK_N, H)); /* F1 */
  each =
      kt_max_size(each, (size_t)((T + Mx) * KT_BLOCK_N) * sizeof(float) +
                            kt_base_gemm_scratch_bytes(m->kern, m->wtype, KT_BLOCK_N, I)); /* F3 */
  each = kt_max_size(each, (size_t)H * sizeof(float));                                     /* F4 */
  c.scratch_each = kt_align_up(each);
  const int32_t nthreads = kt_pool_num_threads(m->pool);
  const int split_routes = kt_split_by_route(c.n_hblk, nthreads);

  /* The state block: (x copy when saving), g, u, a_g, a_u, a_d; then a temporary: h, scratch. */
  kt_arena sa = {NULL, 0}, ta = {NULL, 0};
  for (int pass = 0; pass < 2; pass++) {
    uint16_t *x = save ? kt_arena_take(&sa, (size_t)(T * H) * 2) : NULL;
    st->g = kt_arena_take(&sa, (size_t)(R * I) * 2);
    st->u = kt_arena_take(&sa, (size_t)(R * I) * 2);
    st->a_g = kt_arena_take(&sa, (size_t)(R * r) * 4);
    st->a_u = kt_arena_take(&sa, (size_t)(R * r) * 4);
    st->a_d = kt_arena_take(&sa, (size_t)(R * r) * 4);
    st->h_scale = q8 ? kt_arena_take(&sa, (size_t)R * 4) : NULL;
    c.h = kt_arena_take(&ta, (size_t)(R * I) * 2);
    c.xq = q8 ? kt_arena_take(&ta, (size_t)(T * H)) : NULL;
    c.xs = q8 ? kt_arena_take(&ta, (size_t)T * 4) : NULL;
    c.hq = q8 ? kt_arena_take(&ta, (size_t)(R * I)) : NULL;
    c.scratch = kt_arena_take(&ta, c.scratch_each * (size_t)nthreads);
    c.y_route = split_routes ? kt_arena_take(&ta, (size_t)(R * H) * sizeof(float)) : NULL;
    st->x = save ? x : args->input;
    if (pass == 0) {
      st->state_block = sa.base = kt_alloc(sa.used);
      ta.base = kt_alloc(ta.used);
      if ((sa.used && !sa.base) || !ta.base) {
        kt_free(ta.base);
        kt_saved_release(st);
        pthread_mutex_unlock(&m->lock);
        return kt_fail(err, KT_ERR_OUT_OF_MEMORY,
                       "out of memory for the forward of %" PRId64 " tokens (%zu bytes)", T,
                       sa.used + ta.used);
      }
      sa.used = ta.used = 0;
    }
  }
  if (save) memcpy((void *)st->x, args->input, (size_t)(T * H) * 2);

  const int64_t n_active = rt->n_active;
  kt_pool_hold(m->pool, 1);
  if (q8) kt_moe_run_phase(m, KT_PHASE_FQ, c.n_tblk, fq_quantize_x, &c);
  kt_moe_run_phase(m, KT_PHASE_F0, n_active, f0_lora_a, &c);
  kt_moe_run_phase(m, KT_PHASE_F1, n_active * c.n_iblk, f1_gate_up, &c);
  kt_moe_run_phase(m, KT_PHASE_F2, n_active, f2_lora_down_a, &c);
  if (split_routes) {
    kt_moe_run_phase(m, KT_PHASE_F3, n_active * c.n_hblk, f3_down_routes, &c);
    kt_moe_run_phase(m, KT_PHASE_F4, T, f4_sum_routes, &c);
  } else {
    kt_moe_run_phase(m, KT_PHASE_F3, c.n_hblk, f3_down, &c);
  }
  kt_pool_hold(m->pool, 0);

  kt_free(ta.base);
  if (to_stack)
    m->stack[m->depth++] = st;
  else if (save)
    *args->saved_out = st;
  else
    kt_saved_release(st);
  kt_moe_add_phase(m, KT_PHASE_FORWARD, call_start);
  pthread_mutex_unlock(&m->lock);
  return KT_OK;
}
