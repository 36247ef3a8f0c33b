/* The thread pool every kernel of this library runs on (see common.h). */
#include "common.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#define MAX_THREADS 256
#define SPIN_NS 200000 /* how long an idle worker spins before it sleeps */

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one kernel call at a time */

void ember_lock(void) { pthread_mutex_lock(&call_lock); }
void ember_unlock(void) { pthread_mutex_unlock(&call_lock); }
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static int pool_size; /* workers started (never stopped) */
static atomic_uint pool_generation;
static atomic_int pool_sleepers, pool_pending;
static atomic_llong pool_next;
static job_fn pool_job;
static void *pool_ctx;
static int64_t pool_chunks;
static int pool_active; /* workers taking part in the current job: ids below it */
static unsigned pool_born[MAX_THREADS]; /* the generation current when each worker was started */

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void run_chunks(void) {
    int64_t c;
    while ((c = atomic_fetch_add(&pool_next, 1)) < pool_chunks) pool_job(pool_ctx, c);
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    unsigned seen = pool_born[id]; /* not a fresh load: the first job may already be published */
    for (;;) {
        unsigned g = atomic_load(&pool_generation);
        if (g == seen) {
            const int64_t until = now_ns() + SPIN_NS;
            for (int i = 0; (g = atomic_load(&pool_generation)) == seen; i++) {
                _mm_pause();
                if ((i & 1023) == 1023) sched_yield();
                if ((i & 255) == 255 && now_ns() > until) {
                    pthread_mutex_lock(&pool_mu);
                    atomic_fetch_add(&pool_sleepers, 1);
                    while ((g = atomic_load(&pool_generation)) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
                    atomic_fetch_sub(&pool_sleepers, 1);
                    pthread_mutex_unlock(&pool_mu);
                    break;
                }
            }
        }
        seen = g;
        /* every worker reports every generation, so none can miss one and act on the next job's fields */
        if (id < pool_active) run_chunks();
        atomic_fetch_sub(&pool_pending, 1);
    }
    return NULL;
}

static void reset_after_fork(void) {
    /* the child has none of the parent's threads */
    pool_size = 0;
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
    atomic_store(&pool_sleepers, 0);
}

void ember_parallel_for(int nthreads, job_fn fn, void *ctx, int64_t chunks) {
    static int atfork_set;
    if (!atfork_set) {
        pthread_atfork(NULL, NULL, reset_after_fork);
        atfork_set = 1;
    }
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > chunks) nthreads = (int)chunks;
    while (pool_size < nthreads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pool_born[pool_size] = atomic_load(&pool_generation);
        const int ok = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)pool_size) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool_size++;
    }
    if (nthreads <= 1 || pool_size == 0) {
        for (int64_t c = 0; c < chunks; c++) fn(ctx, c);
        return;
    }
    pool_job = fn;
    pool_ctx = ctx;
    pool_chunks = chunks;
    pool_active = nthreads - 1;
    atomic_store(&pool_next, 0);
    atomic_store(&pool_pending, pool_size);
    atomic_fetch_add(&pool_generation, 1);
    if (atomic_load(&pool_sleepers) > 0) {
        pthread_mutex_lock(&pool_mu);
        pthread_cond_broadcast(&pool_cv);
        pthread_mutex_unlock(&pool_mu);
    }
    run_chunks();
    /* yield now and then: on an oversubscribed machine the worker we wait for may need this core */
    for (int i = 1; atomic_load(&pool_pending) > 0; i++) {
        _mm_pause();
        if ((i & 1023) == 0) sched_yield();
    }
}

