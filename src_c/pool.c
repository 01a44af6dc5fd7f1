/* pool.c - a fixed set of native worker threads running one parallel loop at a time.
 *
 * kt_pool_parallel publishes a job (fn, ctx, item count) under a new generation number; the
 * calling thread and every worker take items from one atomic counter until none are left. The
 * counter lives on its own cache line: every thread hits it.
 *
 * Waiting spins before it sleeps: the caller watches the count of busy workers, and a worker the
 * generation while a caller holds the pool (kt_pool_hold: between the phases of one forward or
 * backward), for up to spin_ns before blocking on a condition variable. A wake-up through the
 * condition variable costs tens of microseconds (more in a virtual machine), once per phase; a
 * step of a few tokens runs a dozen phases in a few milliseconds. Between calls the workers sleep
 * at once: the caller's own code (Python, PyTorch) gets the cores. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

enum { DEFAULT_SPIN_NS = 100000 }; /* 100 us: see kt_pool_set_spin */

struct kt_pool {
  _Alignas(KT_CACHE_LINE) atomic_int_fast64_t next_item;
  _Alignas(KT_CACHE_LINE) atomic_uint_fast64_t generation; /* watched by spinning workers */
  atomic_int busy_workers;                                 /* watched by a spinning caller */
  atomic_int holds;                                        /* workers spin while > 0 */
  _Alignas(KT_CACHE_LINE) pthread_mutex_t lock;
  pthread_cond_t job_ready, job_done;
  pthread_mutex_t run_lock; /* one parallel loop at a time */
  atomic_llong spin_ns;
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

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* Spins until what a thread waits for has happened (returns 1): for_job, a new generation
 * (seen is the last); else, no busy worker. Returns 0 after spin_ns, or for a job as soon as no
 * caller holds the pool. */
static int spin_wait(kt_pool *p, int for_job, uint64_t seen) {
  const int64_t spin = atomic_load_explicit(&p->spin_ns, memory_order_relaxed);
  if (spin <= 0) return 0;
  const int64_t until = now_ns() + spin;
  for (;;) {
    for (int i = 0; i < 64; i++) {
      if (for_job ? atomic_load_explicit(&p->generation, memory_order_acquire) != seen
                  : atomic_load_explicit(&p->busy_workers, memory_order_acquire) == 0)
        return 1;
      cpu_relax();
    }
    if (for_job && atomic_load_explicit(&p->holds, memory_order_relaxed) <= 0) return 0;
    if (now_ns() > until) return 0;
  }
}

static void *worker_main(void *arg) {
  worker_arg *wa = arg;
  kt_pool *p = wa->pool;
  const int32_t id = wa->id;
  free(wa);
  uint64_t seen = 0;
  for (;;) {
    spin_wait(p, 1, seen);
    pthread_mutex_lock(&p->lock);
    while (!p->stopping && atomic_load(&p->generation) == seen)
      pthread_cond_wait(&p->job_ready, &p->lock);
    if (p->stopping) {
      pthread_mutex_unlock(&p->lock);
      return NULL;
    }
    seen = atomic_load(&p->generation);
    kt_work_fn fn = p->fn;
    void *ctx = p->ctx;
    const int64_t n = p->n_items;
    pthread_mutex_unlock(&p->lock);

    run_items(p, fn, ctx, n, id);

    /* the last worker out wakes a caller that stopped spinning (it checks under the lock) */
    if (atomic_fetch_sub_explicit(&p->busy_workers, 1, memory_order_acq_rel) == 1) {
      pthread_mutex_lock(&p->lock);
      pthread_cond_signal(&p->job_done);
      pthread_mutex_unlock(&p->lock);
    }
  }
}

static void stop_workers(kt_pool *p) {
  pthread_mutex_lock(&p->lock);
  p->stopping = 1;
  atomic_fetch_add(&p->generation, 1); /* spinning workers stop spinning */
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
  atomic_init(&p->generation, 0);
  atomic_init(&p->busy_workers, 0);
  atomic_init(&p->holds, 0);
  atomic_init(&p->spin_ns, DEFAULT_SPIN_NS);
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
  atomic_store(&p->busy_workers, p->started);
  atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
  pthread_cond_broadcast(&p->job_ready);
  pthread_mutex_unlock(&p->lock);

  run_items(p, fn, ctx, n_items, 0);

  if (!spin_wait(p, 0, 0)) {
    pthread_mutex_lock(&p->lock);
    while (atomic_load(&p->busy_workers) > 0) pthread_cond_wait(&p->job_done, &p->lock);
    pthread_mutex_unlock(&p->lock);
  }
  pthread_mutex_unlock(&p->run_lock);
}

void kt_pool_hold(kt_pool *p, int hold) {
  atomic_fetch_add_explicit(&p->holds, hold ? 1 : -1, memory_order_relaxed);
}

void kt_pool_set_spin(kt_pool *p, int64_t spin_ns) {
  atomic_store_explicit(&p->spin_ns, spin_ns > 0 ? spin_ns : 0, memory_order_relaxed);
}
