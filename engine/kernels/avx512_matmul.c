// y = x · ŵᵀ with ŵ stored as 4-bit integers, for one CPU thread with AVX-512 BF16 (see engine/cpu_kernels.py).
//
// Layout (packed by engine/cpu_kernels.py): the output columns in blocks of 16; per block and group of 32
// input columns, 8 "quads" of 32 bytes: byte 2c + e holds q[c][4·quad + e] in its low nibble and
// q[c][4·quad + 2 + e] in its high one, so one zero-extension to 16-bit words gives, per 32-bit lane c,
// the (k, k + 1) pair that vdpbf16ps multiplies by a broadcast (x[k], x[k + 1]) pair. A nibble q
// becomes the bfloat16 128 + q by OR-ing the exponent bits 0x4300 in (128..143 are exact in bfloat16),
// so there is no integer-to-float conversion; the 128 is taken back with the group's sum of x:
//     Σ_k x_k ŵ_k = s · Σ_k x_k (128 + q_k) + (zero − 136 · s) · Σ_k x_k      (ŵ = (q − 8) · s + zero).
// Per block and group, (scale[16], zero[16]) as bfloat16. Activations are rounded to bfloat16 (as the
// torch kernel does); products and sums are float32. The weights of a block are unpacked once for up
// to 8 rows, and every row goes through the same operations whatever the batch, so a row's output does
// not depend on the other rows (bit for bit).
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#define GROUP 32
#define COLS 16
#define TILE 8

static __thread uint32_t *pairs_buf = 0;  // bf16(x) as (k, k + 1) pairs, per row
static __thread float *sums_buf = 0;      // per row and group: the sum of the bf16-rounded x
static __thread long buf_rows = 0, buf_k = 0;

static inline uint32_t bf16_bits(float value) {  // round to nearest even, as torch's .to(bfloat16)
    union { float f; uint32_t u; } v = { value };
    return (v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16;
}

static inline float bf16_value(uint32_t bits) {
    union { uint32_t u; float f; } v = { bits << 16 };
    return v.f;
}

// vdpbf16ps with the (x[k], x[k + 1]) pair broadcast straight from memory: compilers emit a separate
// vpbroadcastd for _mm512_set1_epi32, one extra instruction per multiply.
static inline __attribute__((always_inline)) __m512 dot_pair(__m512 acc, __m512bh w, const uint32_t *pair) {
    __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*pair));
    return acc;
}

static inline __m512 bf16_to_ps(__m256i halves) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

static inline __attribute__((always_inline)) void tile(
    const int rows, const uint32_t *pairs, long pair_stride, const float *sums, long groups,
    const uint8_t *w, const uint16_t *scales_and_zeros, const uint8_t *next_w, const uint16_t *next_sz, float *y,
    long ldy) {
    __m512 acc[TILE], part[TILE];
    const __m512i low = _mm512_set1_epi16(0x0F), exponent = _mm512_set1_epi16(0x4300);
    const __m512 shift = _mm512_set1_ps(136.0f);
#pragma GCC unroll 8
    for (int m = 0; m < rows; m++) acc[m] = _mm512_setzero_ps();
    for (long g = 0; g < groups; g++) {
        // The next block's group g, fetched while this one computes: a decode step streams every layer's
        // weights from memory, and at 8 rows the hardware prefetcher alone left the kernel ~15 % slower.
        _mm_prefetch((const char *)(next_w + g * 256), _MM_HINT_T0);
        _mm_prefetch((const char *)(next_w + g * 256 + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(next_w + g * 256 + 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(next_w + g * 256 + 192), _MM_HINT_T0);
        _mm_prefetch((const char *)(next_sz + g * 2 * COLS), _MM_HINT_T0);
#pragma GCC unroll 8
        for (int m = 0; m < rows; m++) part[m] = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int quad = 0; quad < 8; quad++) {
            __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + (g * 8 + quad) * 32)));
            __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(bytes, low, exponent, 0xEA);  // (b & 0x0F) | 0x4300
            __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(bytes, 4), exponent);
            const long p = g * 16 + quad * 2;
#pragma GCC unroll 8
            for (int m = 0; m < rows; m++) {
                part[m] = dot_pair(part[m], lo, pairs + m * pair_stride + p);
                part[m] = dot_pair(part[m], hi, pairs + m * pair_stride + p + 1);
            }
        }
        const __m512 s = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(scales_and_zeros + g * 2 * COLS)));
        const __m512 z = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(scales_and_zeros + g * 2 * COLS + COLS)));
        const __m512 offset = _mm512_fnmadd_ps(shift, s, z);  // zero − 136 · s
#pragma GCC unroll 8
        for (int m = 0; m < rows; m++) {
            acc[m] = _mm512_fmadd_ps(s, part[m], acc[m]);
            acc[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[m * groups + g]), acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < rows; m++) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

// x float32 [rows, k] (k a multiple of 32), y float32 [rows, n] (n a multiple of 16).
// Returns 0, or -1 when the scratch could not be allocated.
int millm_int4_matmul(const float *x, long rows, long k, const uint8_t *w, const uint16_t *scales_and_zeros,
                      long n, float *y) {
    const long groups = k / GROUP, pair_stride = k / 2;
    if (rows > buf_rows || k > buf_k) {
        free(pairs_buf);
        free(sums_buf);
        buf_rows = rows > buf_rows ? rows : buf_rows;
        buf_k = k > buf_k ? k : buf_k;
        pairs_buf = malloc(sizeof(uint32_t) * buf_rows * (buf_k / 2));
        sums_buf = malloc(sizeof(float) * buf_rows * (buf_k / GROUP));
        if (!pairs_buf || !sums_buf) {
            free(pairs_buf);
            free(sums_buf);
            pairs_buf = 0;
            sums_buf = 0;
            buf_rows = buf_k = 0;
            return -1;
        }
    }
    for (long m = 0; m < rows; m++) {
        const float *row = x + m * k;
        for (long g = 0; g < groups; g++) {
            float sum = 0.0f;
            for (long i = 0; i < GROUP; i += 2) {
                uint32_t a = bf16_bits(row[g * GROUP + i]), b = bf16_bits(row[g * GROUP + i + 1]);
                pairs_buf[m * pair_stride + (g * GROUP + i) / 2] = a | (b << 16);
                sum += bf16_value(a) + bf16_value(b);
            }
            sums_buf[m * groups + g] = sum;
        }
    }
    const long blocks = n / COLS, block_bytes = groups * 8 * 32, block_halves = groups * 2 * COLS;
    for (long b = 0; b < blocks; b++) {
        const uint8_t *wb = w + b * block_bytes;
        const uint16_t *sz = scales_and_zeros + b * block_halves;
        const long next = b + 1 < blocks ? b + 1 : b;
        const uint8_t *nw = w + next * block_bytes;
        const uint16_t *nsz = scales_and_zeros + next * block_halves;
        long m = 0;
        for (; m + TILE <= rows; m += TILE)
            tile(TILE, pairs_buf + m * pair_stride, pair_stride, sums_buf + m * groups, groups, wb, sz, nw, nsz,
                 y + m * n + b * COLS, n);
        switch (rows - m) {
#define REST(r) \
    case r: tile(r, pairs_buf + m * pair_stride, pair_stride, sums_buf + m * groups, groups, wb, sz, nw, nsz, \
                 y + m * n + b * COLS, n); break;
            REST(1) REST(2) REST(3) REST(4) REST(5) REST(6) REST(7)
#undef REST
            default: break;
        }
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------------------
// W8A8 (engine/quantization.py's Q8): int8 weights with a scale per output column, activations quantized per
// row as torch does it there (inverse = 127 / max|x|, q = round-half-even(x · inverse)), integer sums with
// vpdpbusd (AVX-512 VNNI: unsigned bytes in the register × signed bytes broadcast from memory, so the
// weights are stored as w + 128 and 128 · Σ_k q_k of the row is taken back), then
// y = (float)acc / inverse · scale — the same operations in the same order as
// torch._int_mm(...).div(inverse).mul_(scale), so the outputs are the same bits.
// Layout: uint8 w + 128 as [n/16][k/4][16][4] (per lane c, 4 consecutive k of column c).
static __thread int8_t *quads_buf = 0;  // the row's int8 activations
static __thread float *inverse_buf = 0;
static __thread int32_t *offset_buf = 0;  // 128 · Σ_k q_k per row
static __thread long quad_rows = 0, quad_k = 0;

static inline __attribute__((always_inline)) __m512i dot_quad(__m512i acc, __m512i w, const int8_t *quad) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const uint32_t *)quad));
    return acc;
}

static inline __attribute__((always_inline)) void int8_tile(
    const int rows, const int8_t *quads, long k, const float *inverse, const int32_t *offsets,
    const uint8_t *w, const uint16_t *scales, float *y, long ldy) {
    __m512i acc[TILE];
#pragma GCC unroll 8
    for (int m = 0; m < rows; m++) acc[m] = _mm512_setzero_si512();
    for (long i = 0; i < k / 4; i++) {
        const __m512i wv = _mm512_loadu_si512((const void *)(w + i * 64));
#pragma GCC unroll 8
        for (int m = 0; m < rows; m++) acc[m] = dot_quad(acc[m], wv, quads + m * k + i * 4);
    }
    const __m512 scale = bf16_to_ps(_mm256_loadu_si256((const __m256i *)scales));
#pragma GCC unroll 8
    for (int m = 0; m < rows; m++) {
        __m512 sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m], _mm512_set1_epi32(offsets[m])));
        _mm512_storeu_ps(y + m * ldy, _mm512_mul_ps(_mm512_div_ps(sums, _mm512_set1_ps(inverse[m])), scale));
    }
}

// x float32 [rows, k] (k a multiple of 4), y float32 [rows, n] (n a multiple of 16). 0, or -1 without scratch.
int millm_int8_matmul(const float *x, long rows, long k, const uint8_t *w, const uint16_t *scales, long n, float *y) {
    if (rows > quad_rows || k > quad_k) {
        free(quads_buf);
        free(inverse_buf);
        free(offset_buf);
        quad_rows = rows > quad_rows ? rows : quad_rows;
        quad_k = k > quad_k ? k : quad_k;
        quads_buf = malloc(quad_rows * quad_k);
        inverse_buf = malloc(sizeof(float) * quad_rows);
        offset_buf = malloc(sizeof(int32_t) * quad_rows);
        if (!quads_buf || !inverse_buf || !offset_buf) {
            free(quads_buf);
            free(inverse_buf);
            free(offset_buf);
            quads_buf = 0;
            inverse_buf = 0;
            offset_buf = 0;
            quad_rows = quad_k = 0;
            return -1;
        }
    }
    for (long m = 0; m < rows; m++) {
        const float *row = x + m * k;
        float amax = 0.0f;
        for (long i = 0; i < k; i++) amax = fmaxf(amax, fabsf(row[i]));
        const float inverse = (1.0f / fmaxf(amax, 1e-30f)) * 127.0f;  // as torch evaluates 127 / tensor
        int32_t sum = 0;
        for (long i = 0; i < k; i++) {
            const int q = (int)nearbyintf(row[i] * inverse);
            quads_buf[m * k + i] = (int8_t)q;
            sum += q;
        }
        inverse_buf[m] = inverse;
        offset_buf[m] = 128 * sum;
    }
    const long blocks = n / COLS;
    for (long b = 0; b < blocks; b++) {
        const uint8_t *wb = w + b * k * COLS;
        long m = 0;
        for (; m + TILE <= rows; m += TILE)
            int8_tile(TILE, quads_buf + m * k, k, inverse_buf + m, offset_buf + m, wb, scales + b * COLS,
                      y + m * n + b * COLS, n);
        switch (rows - m) {
#define REST8(r) \
    case r: int8_tile(r, quads_buf + m * k, k, inverse_buf + m, offset_buf + m, wb, scales + b * COLS, y + m * n + b * COLS, n); break;
            REST8(1) REST8(2) REST8(3) REST8(4) REST8(5) REST8(6) REST8(7)
#undef REST8
            default: break;
        }
    }
    return 0;
}
