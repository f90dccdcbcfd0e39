// Where a process's GPU time goes, kernel by kernel: a CUPTI activity tracer loaded with
// LD_PRELOAD into any CUDA program (our MLX binary, PyTorch+PEFT), for a GPU machine that has no
// profiler. It writes KERNEL_TRACE (a TSV: per kernel name its launches and total ns; the GPU's
// busy time, the union of every kernel's and copy's interval, and its span; and the busy time in
// each 10 ms from the first kernel, so the steady state of a run's last steps can be read apart
// from its load) whenever CUPTI hands back a buffer and at exit, so a run cut short still leaves
// what it saw. scripts/gpu/kernel_report.py reads it.
//
// Kernels' own times overlap where a program runs them concurrently (MLX runs a CUDA graph's
// independent kernels side by side): their sum can exceed the busy time.
//
//   gcc -shared -fPIC -O2 -I$CUPTI/include kernel_trace.c -L$CUPTI/lib -l:libcupti.so.13 -o kt.so
//   KERNEL_TRACE=out.tsv LD_PRELOAD=kt.so LD_LIBRARY_PATH=$CUPTI/lib program ...
#include <cupti.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUFFER_BYTES (4u << 20)
#define SLOTS 8192
#define BUCKET_NS 10000000ull
#define MAX_INTERVALS (8u << 20)

// One row per kernel name; CUPTI shares a name's string across its records, so the pointer is
// the key (equal names behind different pointers are merged by the report).
typedef struct {
  const char *name;
  unsigned long long launches, ns;
} Slot;

static Slot slots[SLOTS];
static unsigned long long memcpy_ns, memcpy_bytes, memcpy_n, memset_ns, memset_n;
static unsigned long long first_start = ~0ull, last_end;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

// Every interval seen (up to MAX_INTERVALS), for the exact union at each report.
typedef struct {
  unsigned long long start, end;
} Interval;
static Interval *intervals;
static size_t n_intervals, cap_intervals;

static void add_kernel(const char *name, unsigned long long start, unsigned long long end) {
  size_t h = ((size_t)name >> 4) % SLOTS;
  for (size_t i = 0; i < SLOTS; i++) {
    Slot *s = &slots[(h + i) % SLOTS];
    if (s->name == name || s->name == NULL) {
      s->name = name;
      s->launches++;
      s->ns += end - start;
      break;
    }
  }
}

static void add_interval(unsigned long long start, unsigned long long end) {
  if (start < first_start) first_start = start;
  if (end > last_end) last_end = end;
  if (n_intervals == cap_intervals) {
    size_t cap = cap_intervals ? 2 * cap_intervals : 65536;
    Interval *grown = cap <= MAX_INTERVALS ? realloc(intervals, cap * sizeof *grown) : NULL;
    if (!grown) return;
    intervals = grown, cap_intervals = cap;
  }
  intervals[n_intervals++] = (Interval){start, end};
}

static int by_start(const void *a, const void *b) {
  unsigned long long x = ((const Interval *)a)->start, y = ((const Interval *)b)->start;
  return (x > y) - (x < y);
}

// Adds [start, end) to the busy time of the 10 ms buckets it spans.
static void to_buckets(unsigned long long *buckets, size_t n, unsigned long long start,
                       unsigned long long end) {
  for (unsigned long long t = start; t < end;) {
    size_t i = (t - first_start) / BUCKET_NS;
    unsigned long long edge = first_start + (i + 1) * BUCKET_NS, stop = end < edge ? end : edge;
    if (i < n) buckets[i] += stop - t;
    t = stop;
  }
}

static void write_report(void) {
  // A process that ran nothing on the GPU (a wrapper the preload also entered) writes nothing.
  const char *path = getenv("KERNEL_TRACE");
  if (!path || last_end == 0) return;
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  FILE *f = fopen(tmp, "w");
  if (!f) return;
  // The union of the intervals, and its share of each 10 ms.
  qsort(intervals, n_intervals, sizeof *intervals, by_start);
  size_t n_buckets = (last_end - first_start) / BUCKET_NS + 1;
  unsigned long long *buckets = calloc(n_buckets, sizeof *buckets), busy = 0, open_end = 0;
  for (size_t i = 0; i < n_intervals; i++) {
    unsigned long long a = intervals[i].start, b = intervals[i].end;
    if (b <= open_end) continue;
    if (a < open_end) a = open_end;
    busy += b - a;
    if (buckets) to_buckets(buckets, n_buckets, a, b);
    open_end = b;
  }
  fprintf(f, "#busy_ns\t%llu\n#span_ns\t%llu\n#intervals\t%zu\n", busy,
          last_end - first_start, n_intervals);
  fprintf(f, "#memcpy\t%llu\t%llu\t%llu\n#memset\t%llu\t%llu\n", memcpy_n, memcpy_ns,
          memcpy_bytes, memset_n, memset_ns);
  if (buckets) {
    fprintf(f, "#bucket_busy_ns\t%llu", BUCKET_NS);
    for (size_t i = 0; i < n_buckets; i++) fprintf(f, "\t%llu", buckets[i]);
    fputc('\n', f);
    free(buckets);
  }
  for (size_t i = 0; i < SLOTS; i++)
    if (slots[i].name) fprintf(f, "%llu\t%llu\t%s\n", slots[i].launches, slots[i].ns, slots[i].name);
  fclose(f);
  rename(tmp, path);
}

static void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *buffer = aligned_alloc(8, BUFFER_BYTES);
  *size = *buffer ? BUFFER_BYTES : 0;
  *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size,
                               size_t valid) {
  (void)ctx, (void)stream, (void)size;
  CUpti_Activity *r = NULL;
  pthread_mutex_lock(&lock);
  while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
    if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || r->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)r;
      add_kernel(k->name, k->start, k->end);
      add_interval(k->start, k->end);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)r;
      memcpy_n++, memcpy_ns += m->end - m->start, memcpy_bytes += m->bytes;
      add_interval(m->start, m->end);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)r;
      memset_n++, memset_ns += m->end - m->start;
      add_interval(m->start, m->end);
    }
  }
  write_report();
  pthread_mutex_unlock(&lock);
  free(buffer);
}

static void at_exit(void) {
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  pthread_mutex_lock(&lock);
  write_report();
  pthread_mutex_unlock(&lock);
}

__attribute__((constructor)) static void start(void) {
  if (!getenv("KERNEL_TRACE")) return;
  if (cuptiActivityRegisterCallbacks(requested, completed) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
    fprintf(stderr, "kernel_trace: CUPTI did not start; nothing is traced\n");
    return;
  }
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  atexit(at_exit);
}
