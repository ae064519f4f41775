/* How fast a hand-written int4 GEMV can read its weights on this CPU, beside a plain read.

   gcc -O3 -mavx2 -mfma -pthread scripts/kernel_ceiling/int4_gemv.c -o /tmp/int4_gemv -lm
   /tmp/int4_gemv [MB] [threads]

   Weights in blocks of 32 along K: 16 bytes of nibbles (weight j low, j + 16 high: llama.cpp's
   Q4_0 order; MatMulNBits' int4 at block 32 has the same bytes a block) and a float scale.
   Activations rounded to int8 per block (MatMulNBits' accuracy level 4). One token (M = 1) through
   MB megabytes of weights (default 88, the small preset's int4 decoder), rows split over the
   threads; median of 21 passes; row 0 checked against plain C. Prints GB/s of weights and scales
   read by the GEMV, and of a plain AVX2 read of the nibbles alone. Not part of vsal: the evidence
   behind docs/performance.md's "why decode stops at about half the roofline". */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <time.h>

enum { K = 2048, BLOCKS = K / 32, RUNS = 21 };

typedef struct { const uint8_t *q; const float *s; const int8_t *a; const float *as; const int *asum;
                 float *y; size_t lo, hi; int read_only; double sink; } Job;

/* One row at a time: each block's nibbles widened to 32 unsigned bytes (0..15), multiplied with the
   int8 activations by maddubs, scaled, accumulated; the weights' offset of 8 comes off once a block. */
static void *gemv(void *arg) {
  Job *j = arg;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (size_t n = j->lo; n < j->hi; n++) {
    const uint8_t *q = j->q + n * (K / 2);
    const float *s = j->s + n * BLOCKS;
    __m256 acc = _mm256_setzero_ps();
    float offset = 0.f;
    for (int b = 0; b < BLOCKS; b++) {
      __m128i packed = _mm_loadu_si128((const __m128i *)(q + b * 16));
      __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
      __m256i a = _mm256_loadu_si256((const __m256i *)(j->a + b * 32));
      __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones);  /* sum w * a, per 4 lanes */
      float scale = s[b] * j->as[b];
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc);
      offset += scale * 8.f * (float)j->asum[b];  /* w - 8: the signed weight */
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_hadd_ps(h, h); h = _mm_hadd_ps(h, h);
    j->y[n] = _mm_cvtss_f32(h) - offset;
  }
  return NULL;
}

static void *plain_read(void *arg) {
  Job *j = arg;
  __m256i acc = _mm256_setzero_si256();
  const uint8_t *p = j->q + j->lo * (K / 2), *end = j->q + j->hi * (K / 2);
  for (; p < end; p += 32) acc = _mm256_add_epi8(acc, _mm256_loadu_si256((const __m256i *)p));
  uint8_t out[32]; _mm256_storeu_si256((__m256i *)out, acc);
  j->sink = out[0];
  return NULL;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median_pass(Job *jobs, int threads, void *(*fn)(void *)) {
  double t[RUNS];
  for (int r = 0; r < RUNS; r++) {
    pthread_t th[64];
    double start = now();
    for (int i = 1; i < threads; i++) pthread_create(&th[i], NULL, fn, &jobs[i]);
    fn(&jobs[0]);
    for (int i = 1; i < threads; i++) pthread_join(th[i], NULL);
    t[r] = now() - start;
  }
  qsort(t, RUNS, sizeof t[0], by_value);
  return t[RUNS / 2];
}

int main(int argc, char **argv) {
  double mb = argc > 1 ? atof(argv[1]) : 88.0;
  int threads = argc > 2 ? atoi(argv[2]) : 2;
  if (threads < 1 || threads > 64 || mb <= 0) {
    fprintf(stderr, "usage: int4_gemv [MB > 0] [threads 1-64]\n");
    return 2;
  }
  size_t rows = (size_t)(mb * 1e6 / (K / 2 + BLOCKS * sizeof(float)));
  rows -= rows % 64;  /* aligned_alloc wants a multiple of the alignment */
  if (rows < 64) {
    fprintf(stderr, "int4_gemv: %g MB is less than 64 rows of %d weights\n", mb, K);
    return 2;
  }
  uint8_t *q = aligned_alloc(64, rows * (K / 2));
  float *s = aligned_alloc(64, rows * BLOCKS * sizeof(float)), *y = calloc(rows, sizeof(float));
  if (!q || !s || !y) { fprintf(stderr, "int4_gemv: out of memory for %g MB\n", mb); return 1; }
  int8_t a[K]; float as[BLOCKS]; int asum[BLOCKS];
  srand(1);
  for (size_t i = 0; i < rows * (K / 2); i++) q[i] = (uint8_t)rand();
  for (size_t i = 0; i < rows * BLOCKS; i++) s[i] = 0.01f;
  for (int b = 0; b < BLOCKS; b++) {
    as[b] = 0.02f; asum[b] = 0;
    for (int i = 0; i < 32; i++) { a[b * 32 + i] = (int8_t)(rand() % 255 - 127); asum[b] += a[b * 32 + i]; }
  }
  Job jobs[64];
  for (int i = 0; i < threads; i++)
    jobs[i] = (Job){q, s, a, as, asum, y, rows * i / threads, rows * (i + 1) / threads, 0, 0};
  double bytes = (double)rows * (K / 2 + BLOCKS * sizeof(float));
  double g = median_pass(jobs, threads, gemv), r = median_pass(jobs, threads, plain_read);
  double want = 0;  /* row 0 in plain C: sum over blocks of scale * as * sum((w - 8) * a) */
  for (int b = 0; b < BLOCKS; b++) {
    long dot = 0;
    for (int i = 0; i < 16; i++) {
      uint8_t byte = q[b * 16 + i];
      dot += ((byte & 15) - 8) * a[b * 32 + i] + ((byte >> 4) - 8) * a[b * 32 + 16 + i];
    }
    want += (double)s[b] * as[b] * dot;
  }
  if (fabs(y[0] - want) > 1e-3 * (fabs(want) + 1)) {
    fprintf(stderr, "int4_gemv: row 0 is %g, plain C says %g\n", y[0], want);
    return 1;
  }
  printf("%.1f MB of int4 weights, %d threads: GEMV %.2f ms = %.1f GB/s; ", bytes / 1e6, threads, g * 1e3,
         bytes / g / 1e9);
  printf("plain read of the nibbles %.1f GB/s\n", rows * (K / 2) / r / 1e9);
  return 0;
}
