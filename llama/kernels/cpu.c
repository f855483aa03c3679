/* CPU kernels for llama's linear layers at decode and prefill (built and loaded by llama/kernels/__init__.py).

   Row-major everywhere: x (M, K) activations, w (N, K) weights as nn.Linear stores them, y (M, N) = x w^T.

   f32_mm   fp32 x fp32 for small M (decode, speculative verification). A decode step is bound by reading the
            weights, so each thread streams its own rows of w once and multiplies every activation row while the
            weight row is in L1.
   bf16_mm  bf16 x bf16 with fp32 accumulation for small M (vdpbf16ps where the CPU has avx512_bf16).
   q8_linear
            int8 weights (one fp scale per output row) x int8 activations (one fp scale per block of QBLOCK inputs,
            quantized on the fly as llama.cpp's q8_0 and llama2.c's runq.c do). The inner product is integer
            (AVX-512 VNNI / AVX-VNNI vpdpbusd, else AVX2 maddubs), scaled per block in fp32.

   The instruction set is chosen when the file is compiled (-march=native, once per machine: the kernel cache keys
   the build by the CPU's flags); llama_kernel_isa() names the path that was compiled. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#define QBLOCK 64 /* activation quantization block: one vpdpbusd of 64 int8 lanes per block and row */
#define NR 4 /* most weight rows per tile (arrays are sized for it; see each kernel for how many it uses) */
#define MR 4 /* activation rows per tile */

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_AVX512 1
#endif

const char* llama_kernel_isa(void) {
#if defined(HAVE_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
  return "avx512_vnni_bf16";
#elif defined(HAVE_AVX512) && defined(__AVX512VNNI__)
  return "avx512_vnni";
#elif defined(HAVE_AVX512)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__AVXVNNI__)
  return "avx2_vnni";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

int llama_kernel_qblock(void) { return QBLOCK; }

/* ---------------------------------------------------------------- fp32 ---------------------------------------- */

/* out[j][i] = sum_k x[i, k] * w[j, k] for j < nr weight rows (w_rows[j]) and i < mr activation rows. */
static inline __attribute__((always_inline)) void f32_tile(const float* x, int64_t K, int nr, int mr,
                                                           const float* const* w_rows, float out[NR][MR]) {
  int64_t k = 0;
#if defined(HAVE_AVX512)
  __m512 acc[NR][MR];
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < MR; i++) acc[j][i] = _mm512_setzero_ps();
  if (nr == 1) { /* one weight row: a second set of accumulators keeps two FMA chains in flight */
    __m512 acc2[MR];
    for (int i = 0; i < MR; i++) acc2[i] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
      __m512 w0 = _mm512_loadu_ps(w_rows[0] + k), w1 = _mm512_loadu_ps(w_rows[0] + k + 16);
      for (int i = 0; i < mr; i++) {
        acc[0][i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * K + k), acc[0][i]);
        acc2[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * K + k + 16), acc2[i]);
      }
    }
    for (int i = 0; i < mr; i++) acc[0][i] = _mm512_add_ps(acc[0][i], acc2[i]);
  }
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
    for (int j = 0; j < nr; j++) wv[j] = _mm512_loadu_ps(w_rows[j] + k);
    for (int i = 0; i < mr; i++) {
      __m512 xv = _mm512_loadu_ps(x + i * K + k);
      for (int j = 0; j < nr; j++) acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
    }
  }
  if (k < K) { /* the tail as one masked step, so K need not be a multiple of 16 */
    __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
    __m512 wv[NR];
    for (int j = 0; j < nr; j++) wv[j] = _mm512_maskz_loadu_ps(m, w_rows[j] + k);
    for (int i = 0; i < mr; i++) {
      __m512 xv = _mm512_maskz_loadu_ps(m, x + i * K + k);
      for (int j = 0; j < nr; j++) acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
    }
    k = K;
  }
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < mr; i++) out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[NR][MR];
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < MR; i++) acc[j][i] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < nr; j++) wv[j] = _mm256_loadu_ps(w_rows[j] + k);
    for (int i = 0; i < mr; i++) {
      __m256 xv = _mm256_loadu_ps(x + i * K + k);
      for (int j = 0; j < nr; j++) acc[j][i] = _mm256_fmadd_ps(wv[j], xv, acc[j][i]);
    }
  }
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < mr; i++) {
      float t[8];
      _mm256_storeu_ps(t, acc[j][i]);
      out[j][i] = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
    }
#else
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < mr; i++) out[j][i] = 0.f;
#endif
  for (; k < K; k++)
    for (int j = 0; j < nr; j++)
      for (int i = 0; i < mr; i++) out[j][i] += x[i * K + k] * w_rows[j][k];
}

/* Runs `body` with compile-time constants NR_ (weight rows) and MR_ (activation rows) equal to nr and mr, so each
   combination is its own unrolled code with its accumulators in registers. */
#define WITH_TILE(nr, mr, body)                                                    \
  do {                                                                             \
    if ((nr) == 1) {                                                               \
      switch (mr) {                                                                \
        case 1: { enum { NR_ = 1, MR_ = 1 }; body; } break;                        \
        case 2: { enum { NR_ = 1, MR_ = 2 }; body; } break;                        \
        case 3: { enum { NR_ = 1, MR_ = 3 }; body; } break;                        \
        default: { enum { NR_ = 1, MR_ = 4 }; body; } break;                       \
      }                                                                            \
    } else {                                                                       \
      switch (mr) {                                                                \
        case 1: { enum { NR_ = 4, MR_ = 1 }; body; } break;                        \
        case 2: { enum { NR_ = 4, MR_ = 2 }; body; } break;                        \
        case 3: { enum { NR_ = 4, MR_ = 3 }; body; } break;                        \
        default: { enum { NR_ = 4, MR_ = 4 }; body; } break;                       \
      }                                                                            \
    }                                                                              \
  } while (0)

/* Weight rows per tile. For one activation row, one weight row at a time streams the weights in order, which the
   hardware prefetcher follows best (measured: 4 interleaved rows of 1-8 KB in 4 KB pages ran at about half the
   bandwidth); rows shorter than 512 bytes are taken 4 at a time, where the per-row overhead would dominate. For
   several activation rows (speculative verification, small batches) 4 weight rows share each activation load:
   5 rows then cost 1.4x one row instead of 2.1-2.4x (measured on 1.1B-shaped products). */
static inline int rows_per_tile(int64_t M, int64_t row_bytes) { return M == 1 && row_bytes > 512 ? 1 : 4; }

/* y (M, N) = x (M, K) w (N, K)^T, for small M. Tiles of weight rows are split over `threads` OpenMP threads in
   contiguous ranges (a static schedule: each core streams one region in order; interleaved dynamic chunks measured
   35-60 % slower on 2 cores); a tile past the last row repeats row N-1 and its results are dropped. */
void f32_mm(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K, int threads) {
  int nr = rows_per_tile(M, K * 4);
  int64_t tiles = (N + nr - 1) / nr;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; t++) {
    int64_t n0 = t * nr;
    const float* rows[NR];
    for (int j = 0; j < NR; j++) rows[j] = w + (n0 + j < N ? n0 + j : N - 1) * K;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      int mr = M - m0 < MR ? (int)(M - m0) : MR;
      float out[NR][MR];
      WITH_TILE(nr, mr, f32_tile(x + m0 * K, K, NR_, MR_, rows, out));
      for (int j = 0; j < nr && n0 + j < N; j++)
        for (int i = 0; i < mr; i++) y[(m0 + i) * N + n0 + j] = out[j][i];
    }
  }
}

/* ---------------------------------------------------------------- bf16 ---------------------------------------- */

/* bf16 is the top half of an fp32: widening is a 16-bit shift; narrowing rounds to nearest even (as torch). */
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

#if defined(HAVE_AVX512)
static inline __m512 load_bf16x16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
#endif

/* out[j][i] = sum_k x[i, k] * w[j, k] in fp32, x and w bf16 (avx512_bf16: vdpbf16ps on pairs). */
static inline __attribute__((always_inline)) void bf16_tile(const uint16_t* x, int64_t K, int nr, int mr,
                                                            const uint16_t* const* w_rows, float out[NR][MR]) {
  int64_t k = 0;
#if defined(HAVE_AVX512)
  __m512 acc[NR][MR];
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < MR; i++) acc[j][i] = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NR];
    for (int j = 0; j < nr; j++) wv[j] = (__m512bh)_mm512_loadu_si512((const void*)(w_rows[j] + k));
    for (int i = 0; i < mr; i++) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + i * K + k));
      for (int j = 0; j < nr; j++) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv[j], xv);
    }
  }
#endif
  for (; k < K; k += 16) {
    __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
    __m512 wv[NR];
    for (int j = 0; j < nr; j++) wv[j] = load_bf16x16(w_rows[j] + k, m);
    for (int i = 0; i < mr; i++) {
      __m512 xv = load_bf16x16(x + i * K + k, m);
      for (int j = 0; j < nr; j++) acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
    }
  }
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < mr; i++) out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
#else
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < mr; i++) {
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t kk = 0; kk < K; kk++) a += from_bf16(x[i * K + kk]) * from_bf16(w_rows[j][kk]);
      out[j][i] = a;
    }
  (void)k;
#endif
}

/* y (M, N) bf16 = x (M, K) bf16 w (N, K)^T bf16, accumulated in fp32, for small M (decode): half the bytes of
   fp32 to stream. */
void bf16_mm(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t M, int64_t N, int64_t K, int threads) {
  int nr = rows_per_tile(M, K * 2);
  int64_t tiles = (N + nr - 1) / nr;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; t++) {
    int64_t n0 = t * nr;
    const uint16_t* rows[NR];
    for (int j = 0; j < NR; j++) rows[j] = w + (n0 + j < N ? n0 + j : N - 1) * K;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      int mr = M - m0 < MR ? (int)(M - m0) : MR;
      float out[NR][MR];
      WITH_TILE(nr, mr, bf16_tile(x + m0 * K, K, NR_, MR_, rows, out));
      for (int j = 0; j < nr && n0 + j < N; j++)
        for (int i = 0; i < mr; i++) y[(m0 + i) * N + n0 + j] = to_bf16(out[j][i]);
    }
  }
}

/* ---------------------------------------------------------------- int8 ---------------------------------------- */

/* Quantize x (M, K) per block of QBLOCK inputs: s = max|x| / 127, q = round(x / s) (ties to even), into
   xq (M, Kp) with Kp = K rounded up to QBLOCK (zero padded), xs (M, Kp / QBLOCK) scales, and corr (M) =
   128 * sum_b s_b * sum(q in block b): the VNNI product reads the weights offset by +128 (unsigned) and subtracts
   this afterwards. */
static void q8_quantize(const float* x, int8_t* xq, float* xs, float* corr, int64_t M, int64_t K, int64_t Kp,
                        int threads) {
  int64_t nb = Kp / QBLOCK;
#pragma omp parallel for if (M >= 8) num_threads(threads)
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * K;
    int8_t* qr = xq + m * Kp;
    double c = 0.0;
    for (int64_t b = 0; b < nb; b++) {
      int64_t k0 = b * QBLOCK, k1 = k0 + QBLOCK < K ? k0 + QBLOCK : K;
      float amax = 0.f;
      for (int64_t k = k0; k < k1; k++) amax = fmaxf(amax, fabsf(xr[k]));
      float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; k++) {
        int32_t q = (int32_t)nearbyintf(xr[k] * inv);
        q = q > 127 ? 127 : (q < -127 ? -127 : q);
        qr[k] = (int8_t)q;
        sum += q;
      }
      for (int64_t k = k1; k < k0 + QBLOCK; k++) qr[k] = 0;
      xs[m * nb + b] = s;
      c += (double)s * 128.0 * sum;
    }
    corr[m] = (float)c;
  }
}

/* out[j][i] = sum_b xs[i, b] * sum_{k in b} xq[i, k] * w[j, k] (before the row scale), for nr weight rows and mr
   activation rows. The weights' last block is read with a mask (rows are K long, not padded). */
static inline __attribute__((always_inline)) void q8_tile(const int8_t* xq, const float* xs, int64_t Kp, int64_t K,
                                                          int nr, int mr, const int8_t* const* w_rows,
                                                          float out[NR][MR], const float* corr) {
  int64_t nb = Kp / QBLOCK;
#if defined(HAVE_AVX512)
  __m512 acc[NR][MR];
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < MR; i++) acc[j][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    int64_t k = b * QBLOCK;
    __mmask64 mask = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
    __m512i wv[NR];
    for (int j = 0; j < nr; j++) wv[j] = _mm512_maskz_loadu_epi8(mask, w_rows[j] + k);
#if defined(__AVX512VNNI__)
    /* vpdpbusd multiplies unsigned by signed bytes: w + 128 is unsigned; corr removes 128 * sum(x) afterwards. */
    for (int j = 0; j < nr; j++) wv[j] = _mm512_xor_si512(wv[j], _mm512_set1_epi8((char)0x80));
    for (int i = 0; i < mr; i++) {
      __m512i xv = _mm512_loadu_si512((const void*)(xq + i * Kp + k));
      __m512 s = _mm512_set1_ps(xs[i * nb + b]);
      for (int j = 0; j < nr; j++) {
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[j], xv);
        acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[j][i]);
      }
    }
#else
    /* maddubs (unsigned x signed, int16 pairs) on |w| and x * sign(w): pairs stay below 2 * 127 * 127. */
    __m512i wa[NR];
    __mmask64 neg[NR];
    for (int j = 0; j < nr; j++) {
      wa[j] = _mm512_abs_epi8(wv[j]);
      neg[j] = _mm512_movepi8_mask(wv[j]);
    }
    for (int i = 0; i < mr; i++) {
      __m512i xv = _mm512_loadu_si512((const void*)(xq + i * Kp + k));
      __m512 s = _mm512_set1_ps(xs[i * nb + b]);
      for (int j = 0; j < nr; j++) {
        __m512i xs_ = _mm512_mask_sub_epi8(xv, neg[j], _mm512_setzero_si512(), xv);
        __m512i d = _mm512_madd_epi16(_mm512_maddubs_epi16(wa[j], xs_), _mm512_set1_epi16(1));
        acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[j][i]);
      }
    }
#endif
  }
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < mr; i++) out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
#if defined(__AVX512VNNI__)
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < mr; i++) out[j][i] -= corr[i];
#endif
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[NR][MR];
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < MR; i++) acc[j][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    int64_t k = b * QBLOCK;
    for (int h = 0; h < QBLOCK; h += 32) {
      __m256i wv[NR];
      if (K - k - h >= 32) {
        for (int j = 0; j < nr; j++) wv[j] = _mm256_loadu_si256((const __m256i*)(w_rows[j] + k + h));
      } else { /* the rows' last partial block: copy what there is, zeros after */
        for (int j = 0; j < nr; j++) {
          int8_t tmp[32] = {0};
          if (K - k - h > 0) memcpy(tmp, w_rows[j] + k + h, (size_t)(K - k - h));
          wv[j] = _mm256_loadu_si256((const __m256i*)tmp);
        }
      }
      __m256i wa[NR];
      for (int j = 0; j < nr; j++) wa[j] = _mm256_sign_epi8(wv[j], wv[j]);
      for (int i = 0; i < mr; i++) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + i * Kp + k + h));
        __m256 s = _mm256_set1_ps(xs[i * nb + b]);
        for (int j = 0; j < nr; j++) {
#if defined(__AVXVNNI__)
          __m256i d = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wa[j], _mm256_sign_epi8(xv, wv[j]));
#else
          __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(wa[j], _mm256_sign_epi8(xv, wv[j])),
                                        _mm256_set1_epi16(1));
#endif
          acc[j][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[j][i]);
        }
      }
    }
  }
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < mr; i++) {
      float t[8];
      _mm256_storeu_ps(t, acc[j][i]);
      out[j][i] = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
    }
#else
  for (int j = 0; j < nr; j++)
    for (int i = 0; i < mr; i++) {
      float a = 0.f;
      for (int64_t b = 0; b < nb; b++) {
        int32_t d = 0;
        for (int64_t k = b * QBLOCK; k < (b + 1) * QBLOCK && k < K; k++) d += (int32_t)xq[i * Kp + k] * w_rows[j][k];
        a += (float)d * xs[i * nb + b];
      }
      out[j][i] = a;
    }
#endif
  (void)corr;
}

/* y (M, N) = (xq, xs) (w (N, K) int8 * w_scale (N,))^T, from q8_quantize's output. */
static void q8_mm(const int8_t* xq, const float* xs, const float* corr, const int8_t* w, const float* w_scale, float* y,
                  int64_t M, int64_t N, int64_t K, int64_t Kp, int threads) {
  int nr = rows_per_tile(M, K);
  int64_t tiles = (N + nr - 1) / nr, nb = Kp / QBLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; t++) {
    int64_t n0 = t * nr;
    const int8_t* rows[NR];
    for (int j = 0; j < NR; j++) rows[j] = w + (n0 + j < N ? n0 + j : N - 1) * K;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      int mr = M - m0 < MR ? (int)(M - m0) : MR;
      float out[NR][MR];
      WITH_TILE(nr, mr, q8_tile(xq + m0 * Kp, xs + m0 * nb, Kp, K, NR_, MR_, rows, out, corr + m0));
      for (int j = 0; j < nr && n0 + j < N; j++)
        for (int i = 0; i < mr; i++) y[(m0 + i) * N + n0 + j] = out[j][i] * w_scale[n0 + j];
    }
  }
}

/* y (M, N) = x (M, K) fp32 (w (N, K) int8 * w_scale (N,))^T: quantize x, then multiply. The quantized activations
   live in a per-thread buffer that grows to the largest call (a few MB for a long prefill) and is reused. */
int q8_linear(const float* x, const int8_t* w, const float* w_scale, float* y, int64_t M, int64_t N, int64_t K,
              int threads) {
  static __thread char* buf = NULL;
  static __thread size_t cap = 0;
  int64_t Kp = (K + QBLOCK - 1) / QBLOCK * QBLOCK, nb = Kp / QBLOCK;
  size_t need = (size_t)M * Kp + sizeof(float) * (size_t)(M * nb + M) + 64;
  if (need > cap) {
    char* grown = realloc(buf, need);
    if (!grown) return -1;
    buf = grown;
    cap = need;
  }
  float* xs = (float*)buf;
  float* corr = xs + M * nb;
  int8_t* xq = (int8_t*)(corr + M);
  q8_quantize(x, xq, xs, corr, M, K, Kp, threads);
  q8_mm(xq, xs, corr, w, w_scale, y, M, N, K, Kp, threads);
  return 0;
}

/* ------------------------------------------------ the rest of a decode step ------------------------------------ */
/* Small steps that torch runs as several ops each (a few microseconds per op and call, which add up to a large
   share of a small model's decode step). Each is the formula of llama/model.py, in fp32. */

/* y = x / sqrt(mean(x^2) + eps) * w, per row of D. */
void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t D, float eps) {
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * D;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; d++) ss += xr[d] * xr[d];
    float inv = 1.f / sqrtf(ss / (float)D + eps);
#pragma omp simd
    for (int64_t d = 0; d < D; d++) y[r * D + d] = xr[d] * inv * w[d];
  }
}

/* Rotary embedding, Meta's interleaved pairs: (x[2i], x[2i+1]) rotated by the angle of position s.
   x: B * S rows of H * D values, row r at x + r * x_stride (a view into a stacked q|k|v product is fine), the
   position of row r is r % S; y (B, S, H, D) contiguous; rope (S, D / 2, 2) holding (cos, sin) of the positions. */
void rope(const float* x, int64_t x_stride, const float* rope_table, float* y, int64_t B, int64_t S, int64_t H,
          int64_t D) {
  for (int64_t r = 0; r < B * S; r++) {
    const float* cs = rope_table + (r % S) * D;
    for (int64_t h = 0; h < H; h++) {
      const float* xr = x + r * x_stride + h * D;
      float* yr = y + (r * H + h) * D;
      for (int64_t i = 0; i < D; i += 2) {
        float x0 = xr[i], x1 = xr[i + 1], c = cs[i], sn = cs[i + 1];
        yr[i] = x0 * c - x1 * sn;
        yr[i + 1] = x0 * sn + x1 * c;
      }
    }
  }
}

/* y = silu(g) * u elementwise, for the SwiGLU feed-forward: rows of n values, g and u rows at their own strides
   (views into a stacked w1|w3 product), y contiguous. */
void silu_mul(const float* g, int64_t g_stride, const float* u, int64_t u_stride, float* y, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; r++) {
    const float *gr = g + r * g_stride, *ur = u + r * u_stride;
    float* yr = y + r * n;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) yr[i] = gr[i] / (1.f + expf(-gr[i])) * ur[i];
  }
}

/* Causal attention of S new queries over a KV cache: query s of row b sits at position P + s and sees keys
   0..P+s. q, out (B, S, H, D); k, v the caches (B_max, T_max, KVH, D) of which rows < B and positions <= P+S-1
   are read; query head h reads kv head h / (H / KVH) (grouped-query attention, as Meta's repeat_kv). One (row,
   query, head) per task over `threads` threads; scores in a per-thread buffer of T_max floats. */
int attention(const float* q, const float* k, const float* v, float* out, int64_t B, int64_t S, int64_t H,
              int64_t KVH, int64_t D, int64_t P, int64_t T_max, int threads) {
  int failed = 0;
  float scale = 1.f / sqrtf((float)D);
  int64_t rep = H / KVH, tasks = B * S * H;
#pragma omp parallel num_threads(threads)
  {
    float* sc = malloc(sizeof(float) * (size_t)(P + S));
    if (!sc) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
      if (!sc) continue;
      int64_t h = t % H, s = (t / H) % S, b = t / (H * S), kvh = h / rep, n = P + s + 1;
      const float* qr = q + t * D;
      const float* kb = k + (b * T_max * KVH + kvh) * D;
      const float* vb = v + (b * T_max * KVH + kvh) * D;
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; j++) {
        const float* kr = kb + j * KVH * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; d++) dot += qr[d] * kr[d];
        sc[j] = dot * scale;
        mx = fmaxf(mx, sc[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; j++) {
        sc[j] = expf(sc[j] - mx);
        sum += sc[j];
      }
      float* o = out + t * D;
      for (int64_t d = 0; d < D; d++) o[d] = 0.f;
      for (int64_t j = 0; j < n; j++) {
        const float* vr = vb + j * KVH * D;
        float p = sc[j] / sum;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) o[d] += p * vr[d];
      }
    }
    free(sc);
  }
  return failed ? -1 : 0;
}

/* ------------------------------------------------------ one decode step through every layer ------------------- */
/* llama2.c's forward, over llama's own tensors: batch 1, one new token, fp32 or int8 weights, with q|k|v and
   w1|w3 stacked (llama/fusion.py). The same kernels as the per-op path, in the same order, so the result is the
   same bits; what it saves is the Python and torch dispatch around ~20 small calls per layer. */
typedef struct {
  const void *wqkv, *wo, *w13, *w2;    /* (out, in) row-major: fp32, or int8 with one scale per output row */
  const float *sqkv, *so, *s13, *s2;   /* the int8 scales (unused for fp32) */
  const float *attn_norm, *ffn_norm;
  float *k_cache, *v_cache;            /* batch row 0 of this layer's cache: (t_max, n_kv_heads, head_dim) */
} layer_t;

typedef struct {
  int64_t dim, hidden, n_heads, n_kv_heads, head_dim, t_max;
  float eps;
  int int8;    /* 1: int8 weights (q8_linear); 0: fp32 (f32_mm) */
  int threads;
} dims_t;

/* Multiply-adds below which a product runs on one thread: the same bound as kernels.SMALL_PRODUCT, so this path
   splits work exactly as the per-op path does. */
#define SMALL_PRODUCT (1 << 16)

static int product(const dims_t* d, const void* w, const float* scale, const float* x, float* y, int64_t N,
                   int64_t K) {
  int threads = N * K >= SMALL_PRODUCT ? d->threads : 1;
  if (d->int8) return q8_linear(x, (const int8_t*)w, scale, y, 1, N, K, threads);
  f32_mm(x, (const float*)w, y, 1, N, K, threads);
  return 0;
}

/* x (dim): the hidden state of the token at position pos, updated in place through every layer; rope_pos: the
   (head_dim / 2, 2) cos/sin of pos; scratch: 4 * dim + 2 * kv_dim + 3 * hidden floats. */
int decode_layers(const dims_t* d, const layer_t* layers, int64_t n_layers, float* x, const float* rope_pos,
                  int64_t pos, float* scratch) {
  int64_t dim = d->dim, kv_dim = d->n_kv_heads * d->head_dim, hidden = d->hidden;
  float *xb = scratch, *qkv = xb + dim, *att = qkv + dim + 2 * kv_dim, *h13 = att + dim, *hb = h13 + 2 * hidden,
        *out = hb + hidden;
  for (int64_t l = 0; l < n_layers; l++) {
    const layer_t* L = &layers[l];
    float *q = qkv, *k = qkv + dim, *v = qkv + dim + kv_dim;
    rmsnorm(x, L->attn_norm, xb, 1, dim, d->eps);
    if (product(d, L->wqkv, L->sqkv, xb, qkv, dim + 2 * kv_dim, dim)) return -1;
    rope(q, dim, rope_pos, q, 1, 1, d->n_heads, d->head_dim);
    rope(k, kv_dim, rope_pos, L->k_cache + pos * kv_dim, 1, 1, d->n_kv_heads, d->head_dim);
    memcpy(L->v_cache + pos * kv_dim, v, sizeof(float) * (size_t)kv_dim);
    int threads = d->n_heads * (pos + 1) * d->head_dim >= SMALL_PRODUCT ? d->threads : 1;
    if (attention(q, L->k_cache, L->v_cache, att, 1, 1, d->n_heads, d->n_kv_heads, d->head_dim, pos, d->t_max,
                  threads))
      return -1;
    if (product(d, L->wo, L->so, att, out, dim, dim)) return -1;
    for (int64_t i = 0; i < dim; i++) x[i] += out[i];
    rmsnorm(x, L->ffn_norm, xb, 1, dim, d->eps);
    if (product(d, L->w13, L->s13, xb, h13, 2 * hidden, dim)) return -1;
    silu_mul(h13, 0, h13 + hidden, 0, hb, 1, hidden);
    if (product(d, L->w2, L->s2, hb, out, dim, hidden)) return -1;
    for (int64_t i = 0; i < dim; i++) x[i] += out[i];
  }
  return 0;
}
