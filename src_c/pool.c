/* pool.c - a fixed set of native worker threads running one parallel loop at a time.
 *
 * kt_pool_parallel publishes a job (fn, ctx, item count) under a new generation number; the
 * calling thread and every worker take items from one atomic counter until none are left. The
 * counter lives on its own cache line: every thread hits it. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct kt_pool {
  _Alignas(KT_CACHE_LINE) atomic_int_fast64_t next_item;
  _Alignas(KT_CACHE_LINE) pthread_mutex_t lock;
  pthread_cond_t job_ready, job_done;
  pthread_mutex_t run_lock; /* one parallel loop at a time */
  uint64_t generation;
  int32_t busy_workers;
  int stopping;
  kt_work_fn fn;
  void *ctx;
  int64_t n_items;
  int32_t num_threads;
  int32_t started;
  pthread_t *threads;
};

typedef struct worker_arg {
  kt_pool *pool;
  int32_t id;
} worker_arg;

static void run_items(kt_pool *p, kt_work_fn fn, void *ctx, int64_t n, int32_t worker) {
  for (;;) {
    const int64_t item = atomic_fetch_add_explicit(&p->next_item, 1, memory_order_relaxed);
    if (item >= n) return;
    fn(ctx, item, worker);
  }
}

static void *worker_main(void *arg) {
  worker_arg *wa = arg;
  kt_pool *p = wa->pool;
  const int32_t id = wa->id;
  free(wa);
  uint64_t seen = 0;
  for (;;) {
    pthread_mutex_lock(&p->lock);
    while (!p->stopping && p->generation == seen) pthread_cond_wait(&p->job_ready, &p->lock);
    if (p->stopping) {
      pthread_mutex_unlock(&p->lock);
      return NULL;
    }
    seen = p->generation;
    kt_work_fn fn = p->fn;
    void *ctx = p->ctx;
    const int64_t n = p->n_items;
    pthread_mutex_unlock(&p->lock);

    run_items(p, fn, ctx, n, id);

    pthread_mutex_lock(&p->lock);
    if (--p->busy_workers == 0) pthread_cond_signal(&p->job_done);
    pthread_mutex_unlock(&p->lock);
  }
}

static void stop_workers(kt_pool *p) {
  pthread_mutex_lock(&p->lock);
  p->stopping = 1;
  pthread_cond_broadcast(&p->job_ready);
  pthread_mutex_unlock(&p->lock);
  for (int32_t i = 0; i < p->started; i++) pthread_join(p->threads[i], NULL);
}

kt_status kt_pool_create(int32_t num_threads, kt_pool **out, kt_error *err) {
  *out = NULL;
  if (num_threads < 1)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "num_threads must be >= 1, got %d",
                   (int)num_threads);
  kt_pool *p = kt_alloc(sizeof *p);
  pthread_t *threads = calloc((size_t)num_threads, sizeof *threads);
  if (!p || !threads) {
    kt_free(p);
    free(threads);
    return kt_fail(err, KT_ERR_OUT_OF_MEMORY, "out of memory creating a pool of %d threads",
                   (int)num_threads);
  }
  memset(p, 0, sizeof *p);
  atomic_init(&p->next_item, 0);
  pthread_mutex_init(&p->lock, NULL);
  pthread_mutex_init(&p->run_lock, NULL);
  pthread_cond_init(&p->job_ready, NULL);
  pthread_cond_init(&p->job_done, NULL);
  p->num_threads = num_threads;
  p->threads = threads;
  for (int32_t i = 1; i < num_threads; i++) {
    worker_arg *wa = malloc(sizeof *wa);
    int rc = wa ? 0 : -1;
    if (wa) {
      wa->pool = p;
      wa->id = i;
      rc = pthread_create(&threads[p->started], NULL, worker_main, wa);
      if (rc != 0) free(wa);
    }
    if (rc != 0) {
      stop_workers(p);
      kt_pool_destroy(p);
      return kt_fail(err, KT_ERR_THREADS, "could not start worker thread %d of %d", (int)i,
                     (int)num_threads);
    }
    p->started++;
  }
  *out = p;
  return KT_OK;
}

void kt_pool_destroy(kt_pool *p) {
  if (!p) return;
  if (!p->stopping) stop_workers(p);
  pthread_mutex_destroy(&p->lock);
  pthread_mutex_destroy(&p->run_lock);
  pthread_cond_destroy(&p->job_ready);
  pthread_cond_destroy(&p->job_done);
  free(p->threads);
  kt_free(p);
}

int32_t kt_pool_num_threads(const kt_pool *p) { return p->num_threads; }

void kt_pool_parallel(kt_pool *p, int64_t n_items, kt_work_fn fn, void *ctx) {
  if (n_items <= 0) return;
  pthread_mutex_lock(&p->run_lock);
  atomic_store_explicit(&p->next_item, 0, memory_order_relaxed);
  if (p->started == 0 || n_items == 1) {
    run_items(p, fn, ctx, n_items, 0);
    pthread_mutex_unlock(&p->run_lock);
    return;
  }
  pthread_mutex_lock(&p->lock);
  p->fn = fn;
  p->ctx = ctx;
  p->n_items = n_items;
  p->busy_workers = p->started;
  p->generation++;
  pthread_cond_broadcast(&p->job_ready);
  pthread_mutex_unlock(&p->lock);

  run_items(p, fn, ctx, n_items, 0);

  pthread_mutex_lock(&p->lock);
  while (p->busy_workers > 0) pthread_cond_wait(&p->job_done, &p->lock);
  pthread_mutex_unlock(&p->lock);
  pthread_mutex_unlock(&p->run_lock);
}
