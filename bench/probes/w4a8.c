// A probe, not part of the product (bench/w4a8_probe.py builds and times it): Q4 weights × int8 activations
// (W4A8) on AVX-512 VNNI, the next lever measured for Q4's 8-row decode step (docs/benchmarks.md).
//
// Activations are quantized per row as engine/quantization.py's Q8 does (inverse = 127 / max|x|,
// q = round-half-even(x · inverse)); per block of 16 output columns and group of 32 inputs, the weights'
// nibbles lie in 4 chunks of 64 bytes: byte 4c + e of chunk t holds q[c][8t + e] in its low nibble and
// q[c][8t + 4 + e] in its high one, so one load, an AND and a shift-and-AND give two vpdpbusd operands
// (per 32-bit lane c, 4 consecutive inputs of column c). Per group, with s and zero its bfloat16 scale
// and zero point and Σq the group's sum of quantized activations:
//     y = (1 / inverse) · Σ_groups [ s · Σ_k q_k w_k + (zero − 8 · s) · Σq ]      (ŵ = (w − 8) · s + zero)
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#define GROUP 32  // inputs per scale
#define COLS 16
#define TILE 8

static __thread int8_t *xq_buf = 0;
static __thread float *inv_buf = 0;
static __thread float *gsum_buf = 0;
static __thread long xq_rows = 0, xq_k = 0;

static inline __attribute__((always_inline)) __m512i dot_quad(__m512i acc, __m512i w, const int8_t *quad) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const uint32_t *)quad));
    return acc;
}
static inline __m512 bf16_to_ps(__m256i halves) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

static inline __attribute__((always_inline)) void tile(
    const int rows, const int8_t *xq, long k, const float *gsums, long groups, const float *inverse,
    const uint8_t *w, const uint16_t *sz, const uint8_t *next_w, float *y, long ldy) {
    __m512 acc[TILE];
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512 eight = _mm512_set1_ps(8.0f);
#pragma GCC unroll 8
    for (int m = 0; m < rows; m++) acc[m] = _mm512_setzero_ps();
    for (long g = 0; g < groups; g++) {
        _mm_prefetch((const char *)(next_w + g * 256), _MM_HINT_T0);
        _mm_prefetch((const char *)(next_w + g * 256 + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(next_w + g * 256 + 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(next_w + g * 256 + 192), _MM_HINT_T0);
        __m512i part[TILE];
#pragma GCC unroll 8
        for (int m = 0; m < rows; m++) part[m] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) {
            const __m512i bytes = _mm512_loadu_si512((const void *)(w + g * 256 + t * 64));
            const __m512i lo = _mm512_and_si512(bytes, low);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
            const long kk = g * GROUP + t * 8;
#pragma GCC unroll 8
            for (int m = 0; m < rows; m++) {
                part[m] = dot_quad(part[m], lo, xq + m * k + kk);
                part[m] = dot_quad(part[m], hi, xq + m * k + kk + 4);
            }
        }
        const __m512 s = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(sz + g * 2 * COLS)));
        const __m512 z = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(sz + g * 2 * COLS + COLS)));
        const __m512 offset = _mm512_fnmadd_ps(eight, s, z);  // zero − 8 · s
#pragma GCC unroll 8
        for (int m = 0; m < rows; m++) {
            acc[m] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(part[m]), acc[m]);
            acc[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(gsums[m * groups + g]), acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < rows; m++) _mm512_storeu_ps(y + m * ldy, _mm512_div_ps(acc[m], _mm512_set1_ps(inverse[m])));
}

int millm_w4a8_matmul(const float *x, long rows, long k, const uint8_t *w, const uint16_t *sz, long n, float *y) {
    const long groups = k / GROUP;
    if (rows > xq_rows || k > xq_k) {
        free(xq_buf); free(inv_buf); free(gsum_buf);
        xq_rows = rows > xq_rows ? rows : xq_rows; xq_k = k > xq_k ? k : xq_k;
        xq_buf = malloc(xq_rows * xq_k); inv_buf = malloc(sizeof(float) * xq_rows);
        gsum_buf = malloc(sizeof(float) * xq_rows * (xq_k / GROUP));
        if (!xq_buf || !inv_buf || !gsum_buf) {
            free(xq_buf); free(inv_buf); free(gsum_buf);
            xq_buf = 0; inv_buf = 0; gsum_buf = 0;
            xq_rows = xq_k = 0;
            return -1;
        }
    }
    for (long m = 0; m < rows; m++) {
        const float *row = x + m * k;
        float amax = 0.0f;
        for (long i = 0; i < k; i++) amax = fmaxf(amax, fabsf(row[i]));
        const float inverse = (1.0f / fmaxf(amax, 1e-30f)) * 127.0f;
        for (long g = 0; g < groups; g++) {
            int32_t sum = 0;
            for (long i = g * GROUP; i < (g + 1) * GROUP; i++) {
                const int q = (int)nearbyintf(row[i] * inverse);
                xq_buf[m * k + i] = (int8_t)q;
                sum += q;
            }
            gsum_buf[m * groups + g] = (float)sum;
        }
        inv_buf[m] = inverse;
    }
    const long blocks = n / COLS, block_bytes = groups * 256, block_halves = groups * 2 * COLS;
    for (long b = 0; b < blocks; b++) {
        const uint8_t *wb = w + b * block_bytes, *nw = w + (b + 1 < blocks ? b + 1 : b) * block_bytes;
        const uint16_t *s = sz + b * block_halves;
        long m = 0;
        for (; m + TILE <= rows; m += TILE)
            tile(TILE, xq_buf + m * k, k, gsum_buf + m * groups, groups, inv_buf + m, wb, s, nw, y + m * n + b * COLS, n);
        switch (rows - m) {
#define REST(r) case r: tile(r, xq_buf + m * k, k, gsum_buf + m * groups, groups, inv_buf + m, wb, s, nw, y + m * n + b * COLS, n); break;
            REST(1) REST(2) REST(3) REST(4) REST(5) REST(6) REST(7)
#undef REST
            default: break;
        }
    }
    return 0;
}
