/* Class-blocked sparse convolution kernels for leanconv's structured-sparse layers.
 *
 * A structured-sparse convolution (sliding-channel conv, periodic sparse conv) has output
 * channels ("rows") whose nonzero taps repeat: many rows share exactly the same list of
 * (input channel, dy, dx) taps and differ only in the weight values. Rows with the same tap
 * list form a "class". Within a class every row reads the same input vectors, so a register
 * tile of G rows x V pixel vectors reuses each load G times; this is what makes the nonzero
 * multiply-adds run at dense-GEMM-like speed while only the nonzero MACs are executed.
 *
 * Layout: planes. Sample b of a tensor starts at b * nstride; a tap or a row is an offset
 * into the sample. Pixels are visited in vectors of LANES consecutive elements; vector q sits
 * at offset ob[q] in the output grid and ib[q] in the input grid (precomputed by the caller,
 * which pads buffers so that every vector load and store stays inside them).
 *
 * Compiled once per scalar type: -DLC_REAL=float or -DLC_REAL=double. Python side:
 * leanconv/layers/_kernels/loader.py (build, ctypes binding) and plan.py (the offsets).
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef LC_REAL
#define LC_REAL float
#endif
#if defined(__AVX512F__)
#define LC_VBYTES 64
#elif defined(__AVX__)
#define LC_VBYTES 32
#else
#define LC_VBYTES 16 /* SSE2, NEON, or plain scalar code from the compiler */
#endif
#define LANES ((int)(LC_VBYTES / sizeof(LC_REAL)))

typedef LC_REAL real;
typedef real vec __attribute__((vector_size(LC_VBYTES)));
typedef real vecu __attribute__((vector_size(LC_VBYTES), aligned(sizeof(real))));

/* Rows of a class are taken in groups of 4, then 2, then 1 (the packing in plan.py). A
 * group of 4 rows runs 4 pixel vectors at a time, smaller groups run 8 (4 when the image
 * has fewer than 8 vectors), so that every tile keeps at least 8 independent accumulators. */

int lc_lanes(void) { return LANES; }

/* Keep a loaded vector in a register: stops the compiler from re-reading it from memory as
 * an operand of every multiply-add that uses it. */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__AVX__) || LC_VBYTES == 16)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#elif defined(__aarch64__)
#define IN_REGISTER(v) __asm__("" : "+w"(v))
#else
#define IN_REGISTER(v) (void)0
#endif

static inline int64_t group_size(int64_t left) { return left >= 4 ? 4 : left >= 2 ? 2 : 1; }

/* ---- forward: y[row] = sum_e w[row, e] * x[tap_e], one tile of G rows x V vectors ---- */

#define FWD_TILE(G, V)                                                                        \
  static inline void fwd_tile_##G##_##V(const real *xn, real *yn, const int64_t *nz,          \
                                        int64_t nnz, const real *w, const int64_t *ib,        \
                                        const int64_t *ob, const int64_t *oc) {               \
    vec acc[G][V];                                                                            \
    for (int g = 0; g < G; g++)                                                               \
      for (int v = 0; v < V; v++) acc[g][v] = (vec){0};                                       \
    _Pragma("GCC unroll 2") for (int64_t e = 0; e < nnz; e++) {                               \
      const real *s = xn + nz[e];                                                             \
      vec xv[V];                                                                              \
      for (int v = 0; v < V; v++) xv[v] = *(const vecu *)(s + ib[v]);                         \
      for (int g = 0; g < G; g++) {                                                           \
        real wg = w[e * G + g];                                                               \
        for (int v = 0; v < V; v++) acc[g][v] += wg * xv[v];                                  \
      }                                                                                       \
    }                                                                                         \
    for (int g = 0; g < G; g++)                                                               \
      for (int v = 0; v < V; v++) *(vecu *)(yn + oc[g] + ob[v]) = acc[g][v];                 \
  }                                                                                           \
  static void fwd_rows_##G##_##V(const real *xn, real *yn, const int64_t *nz, int64_t nnz,    \
                                 const real *w, int64_t nvec, const int64_t *ib,              \
                                 const int64_t *ob, const int64_t *oc) {                      \
    for (int64_t q0 = 0; q0 < nvec; q0 += V) {                                                \
      int64_t tib[V], tob[V];                                                                 \
      for (int v = 0; v < V; v++) { /* tail: recompute the last vector */                     \
        int64_t q = q0 + v < nvec ? q0 + v : nvec - 1;                                        \
        tib[v] = ib[q];                                                                       \
        tob[v] = ob[q];                                                                       \
      }                                                                                       \
      fwd_tile_##G##_##V(xn, yn, nz, nnz, w, tib, tob, oc);                                   \
    }                                                                                         \
  }
FWD_TILE(4, 4)
FWD_TILE(2, 8)
FWD_TILE(2, 4)
FWD_TILE(1, 8)
FWD_TILE(1, 4)

/* Class k owns rows mem[mp[k]..mp[k+1]) (row offsets into a sample of y), taps
 * nz[np[k]..np[k+1]) (offsets into a sample of x) and packed weights at wp + wo[k]: each
 * row group stored tap-major ([nnz][group size]). Tasks are (sample, class). */
void lc_forward(const real *x, real *y, int64_t n, int64_t xs, int64_t ys, int64_t ncls,
                const int64_t *mp, const int64_t *mem, const int64_t *np, const int64_t *nz,
                const real *wp, const int64_t *wo, int64_t nvec, const int64_t *ib,
                const int64_t *ob, int nt) {
  int wide = nvec >= 8;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < n * ncls; t++) {
    int64_t b = t / ncls, k = t % ncls;
    const real *xn = x + b * xs;
    real *yn = y + b * ys;
    int64_t nm = mp[k + 1] - mp[k], nnz = np[k + 1] - np[k];
    const int64_t *rows = mem + mp[k], *taps = nz + np[k];
    for (int64_t m = 0; m < nm;) {
      int64_t g = group_size(nm - m);
      const real *w = wp + wo[k] + m * nnz;
      if (g == 4) fwd_rows_4_4(xn, yn, taps, nnz, w, nvec, ib, ob, rows + m);
      else if (g == 2 && wide) fwd_rows_2_8(xn, yn, taps, nnz, w, nvec, ib, ob, rows + m);
      else if (g == 2) fwd_rows_2_4(xn, yn, taps, nnz, w, nvec, ib, ob, rows + m);
      else if (wide) fwd_rows_1_8(xn, yn, taps, nnz, w, nvec, ib, ob, rows + m);
      else fwd_rows_1_4(xn, yn, taps, nnz, w, nvec, ib, ob, rows + m);
      m += g;
    }
  }
}

/* ---- weight gradient: gw[row, e] = sum_b sum_q a[b, row](q) * b[b, tap_e](q) ---- */

static inline real hsum(vec v) {
  real s[LANES];
  __builtin_memcpy(s, &v, sizeof v);
  for (int w = LANES / 2; w > 0; w /= 2)
    for (int l = 0; l < w; l++) s[l] += s[l + w];
  return s[0];
}

/* One register tile of G rows x R taps, summed over `len` (sample, vector) pairs: row g's
 * vector i is a[(g * len + i) * LANES] (packed), tap r's is b[nz[r] + ib[i]]. out[r * G + g]
 * receives the sums (the tap-major packed layout). */
#define WGRAD_TILE(G, R)                                                                      \
  static inline void wgrad_tile_##G##_##R(const real *a, const real *b, const int64_t *nz,    \
                                          int64_t len, const int64_t *ib, real *out) {        \
    vec acc[G][R];                                                                            \
    for (int g = 0; g < G; g++)                                                               \
      for (int r = 0; r < R; r++) acc[g][r] = (vec){0};                                       \
    const int64_t as = len * LANES;                                                           \
    for (int64_t i = 0; i < len; i++) {                                                       \
      vec av[G], bv[R];                                                                       \
      const real *ai = a + i * LANES;                                                         \
      for (int g = 0; g < G; g++) {                                                           \
        av[g] = *(const vec *)(ai + g * as);                                                  \
        IN_REGISTER(av[g]);                                                                   \
      }                                                                                       \
      for (int r = 0; r < R; r++) bv[r] = *(const vecu *)(b + nz[r] + ib[i]);                 \
      for (int g = 0; g < G; g++)                                                             \
        for (int r = 0; r < R; r++) acc[g][r] += av[g] * bv[r];                               \
    }                                                                                         \
    for (int g = 0; g < G; g++)                                                               \
      for (int r = 0; r < R; r++) out[r * G + g] += hsum(acc[g][r]);                          \
  }                                                                                           \
  static void wgrad_taps_##G##_##R(const real *a, const real *b, const int64_t *nz,           \
                                   int64_t nnz, int64_t len, const int64_t *ib, real *out) {  \
    int64_t e = 0;                                                                            \
    for (; e + R <= nnz; e += R) wgrad_tile_##G##_##R(a, b, nz + e, len, ib, out + e * G);    \
    for (; e < nnz; e++) wgrad_tile_##G##_1(a, b, nz + e, len, ib, out + e * G);              \
  }
WGRAD_TILE(4, 1)
WGRAD_TILE(2, 1)
WGRAD_TILE(1, 1)
WGRAD_TILE(4, 4)
WGRAD_TILE(2, 8)
WGRAD_TILE(1, 8)

/* Class gradient over samples [0, ns). Each group of rows is first copied into `apack`
 * (row-major over (sample, vector)) so that it stays in L1, free of cache-set conflicts,
 * while all the class's taps stream past. out: the class's packed block. */
static void wgrad_class(const real *a, const real *b, int64_t ns, int64_t as, const int64_t *rows,
                        int64_t nm, const int64_t *taps, int64_t nnz, int64_t nvec,
                        const int64_t *ob, const int64_t *sib, real *apack, real *out) {
  int64_t len = ns * nvec;
  for (int64_t m = 0; m < nm;) {
    int64_t g = group_size(nm - m);
    for (int64_t j = 0; j < g; j++)
      for (int64_t s = 0; s < ns; s++)
        for (int64_t q = 0; q < nvec; q++)
          *(vec *)(apack + (j * len + s * nvec + q) * LANES) = *(const vecu *)(a + s * as + rows[m + j] + ob[q]);
    real *o = out + m * nnz;
    if (g == 4) wgrad_taps_4_4(apack, b, taps, nnz, len, sib, o);
    else if (g == 2) wgrad_taps_2_8(apack, b, taps, nnz, len, sib, o);
    else wgrad_taps_1_8(apack, b, taps, nnz, len, sib, o);
    m += g;
  }
}
/* a: gradient of the output (rows at mem offsets, vectors at ob), b: the input buffer (taps at
 * nz offsets, vectors at ib). gw has the packed weight layout of lc_forward; scratch holds nt
 * zeroed partial sums of the same size (one per thread), reduced into gw at the end. Tasks
 * are (block of `chunk` samples, class), dealt to the threads in fixed contiguous runs: which
 * thread adds up a task, so the order of every sum, never depends on timing, and the gradient
 * is the same to the bit on every run with the same thread count. Returns 0, or -1 when out
 * of memory. */
int lc_weight_grad(const real *a, const real *b, real *gw, real *scratch, int64_t nw, int64_t n,
                   int64_t as, int64_t bs, int64_t ncls, const int64_t *mp, const int64_t *mem,
                   const int64_t *np, const int64_t *nz, const int64_t *wo, int64_t nvec,
                   const int64_t *ib, const int64_t *ob, int64_t chunk, int nt) {
  int64_t nchunk = (n + chunk - 1) / chunk, len = chunk * nvec;
  int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
  {
#ifdef _OPENMP
    real *part = scratch + (int64_t)omp_get_thread_num() * nw;
#else
    real *part = scratch;
#endif
    int64_t *sib = malloc(sizeof(int64_t) * len);
    real *apack = aligned_alloc(LC_VBYTES, sizeof(real) * 4 * len * LANES);
    failed = !sib || !apack;
#pragma omp for schedule(static) /* a task's thread, so the order of the sums, is fixed: same bits every run */
    for (int64_t t = 0; t < nchunk * ncls; t++) {
      if (failed) continue;
      int64_t b0 = (t / ncls) * chunk, k = t % ncls;
      int64_t ns = n - b0 < chunk ? n - b0 : chunk;
      for (int64_t s = 0; s < ns; s++) /* one long loop over (sample, vector) pairs */
        for (int64_t q = 0; q < nvec; q++) sib[s * nvec + q] = s * bs + ib[q];
      wgrad_class(a + b0 * as, b + b0 * bs, ns, as, mem + mp[k], mp[k + 1] - mp[k], nz + np[k],
                  np[k + 1] - np[k], nvec, ob, sib, apack, part + wo[k]);
    }
    free(sib);
    free(apack);
  }
  if (failed) return -1;
#ifdef _OPENMP
  int used = nt;
#else
  int used = 1;
#endif
  for (int th = 0; th < used; th++)
    for (int64_t i = 0; i < nw; i++) gw[i] += scratch[(int64_t)th * nw + i];
  return 0;
}
