/* moe.c - engine lifetime, base-weight packing and the saved-state stack. */
#include <stdlib.h>

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
  m->stack = stack;
  pthread_mutex_init(&m->lock, NULL);
  *out = m;
  return KT_OK;
}

void kt_moe_destroy(kt_moe *m) {
  if (!m) return;
  drop_saved(m);
  for (int p = 0; p < 3; p++) kt_free(m->packed[p]);
  pthread_mutex_destroy(&m->lock);
  free(m->stack);
  free(m);
}

typedef struct pack_ctx {
  kt_moe *m;
  void *dst[3];
  const uint16_t *src[3];
} pack_ctx;

static void pack_one(void *vctx, int64_t item, int32_t worker) {
  (void)worker;
  pack_ctx *ctx = vctx;
  const kt_moe *m = ctx->m;
  const int p = (int)(item % 3);
  const int64_t e = item / 3;
  const int64_t H = m->cfg.hidden_size, I = m->cfg.intermediate_size;
  const int64_t rows = p == KT_DOWN ? H : I, cols = p == KT_DOWN ? I : H;
  m->kern->pack((char *)ctx->dst[p] + (size_t)e * m->packed_stride[p],
                ctx->src[p] + (size_t)e * (size_t)(rows * cols), rows, cols);
}

kt_status kt_moe_load_weights(kt_moe *m, const uint16_t *gate, const uint16_t *up,
                              const uint16_t *down, kt_error *err) {
  if (!gate || !up || !down)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                   "gate_proj, up_proj and down_proj must all be set (got a null pointer for %s)",
                   !gate ? "gate_proj"
                   : !up ? "up_proj"
                         : "down_proj");
  const int64_t E = m->cfg.expert_num, H = m->cfg.hidden_size, I = m->cfg.intermediate_size;
  pack_ctx ctx = {.m = m, .src = {gate, up, down}};
  size_t stride[3];
  for (int p = 0; p < 3; p++) {
    stride[p] =
        kt_align_up(p == KT_DOWN ? m->kern->packed_bytes(H, I) : m->kern->packed_bytes(I, H));
    ctx.dst[p] = kt_alloc(stride[p] * (size_t)E);
    if (!ctx.dst[p]) {
      for (int q = 0; q < p; q++) kt_free(ctx.dst[q]);
      return kt_fail(err, KT_ERR_OUT_OF_MEMORY,
                     "out of memory packing the base weights: %zu bytes per projection",
                     stride[p] * (size_t)E);
    }
  }
  pthread_mutex_lock(&m->lock);
  for (int p = 0; p < 3; p++) {
    kt_free(m->packed[p]);
    m->packed[p] = ctx.dst[p];
    m->packed_stride[p] = stride[p];
  }
  kt_pool_parallel(m->pool, 3 * E, pack_one, &ctx);
  m->loaded = 1;
  pthread_mutex_unlock(&m->lock);
  return KT_OK;
}

int kt_moe_weights_loaded(const kt_moe *m) { return m->loaded; }

size_t kt_moe_packed_bytes(const kt_moe *m) {
  return m->loaded ? (m->packed_stride[0] + m->packed_stride[1] + m->packed_stride[2]) *
                         (size_t)m->cfg.expert_num
                   : 0;
}

kt_isa kt_moe_isa(const kt_moe *m) { return m->cfg.isa; }

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

void kt_saved_free(kt_saved *s) {
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
  while (m->depth > 0) kt_saved_free(m->stack[--m->depth]);
}

void kt_moe_cache_clear(kt_moe *m) {
  pthread_mutex_lock(&m->lock);
  drop_saved(m);
  pthread_mutex_unlock(&m->lock);
}
