// y = x · ŵᵀ with ŵ stored as 4-bit integers and x quantized to int8 per group of 32 inputs (W4A8), for one
// CPU thread with AVX-512 VNNI (see engine/cpu_kernels.py).
//
// Activations: per row and group of 32 inputs, a = max(max|x|, 1e-30), inverse = 127 / a evaluated as
// (1 / a) · 127, q = round-half-even(x · inverse) in −127..127 and step = a / 127, so x ≈ q · step with an
// error of at most step / 2 (a scale per 32 inputs keeps an outlier from flattening the rest of its row).
// Weights (packed by engine/cpu_kernels.py): the output columns in blocks of 16; per block and group, 4
// chunks of 64 bytes: byte 4c + e of chunk t holds w[c][8t + e] in its low nibble and w[c][8t + 4 + e] in its
// high one, so one load, an AND and a shift-and-AND give two vpdpbusd operands (unsigned nibbles in the
// register × 4 signed activation bytes broadcast from memory: per 32-bit lane c, 4 consecutive inputs of
// column c, summed in int32, exact). Per block and group, (scale[16], zero[16]) as bfloat16, and with
// ŵ = (w − 8) · s + zero:
//     Σ_k x_k ŵ_k ≈ (s · step) · Σ_k q_k w_k + (zero − 8 · s) · (step · Σ_k q_k)
// in float32. The weights of a block are unpacked once for up to 8 rows, and every row goes through the
// same operations whatever the batch, so a row's output does not depend on the other rows (bit for bit).
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#define GROUP 32
#define COLS 16
#define TILE 8

static __thread int8_t *codes_buf = 0;   // per row: the int8 activations
static __thread float *steps_buf = 0;    // per row and group: step
static __thread float *offsets_buf = 0;  // per row and group: step · Σ q (NaN where the group is not finite)
static __thread long codes_rows = 0, codes_k = 0;

static inline __m512 bf16_to_ps(__m256i halves) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

// (Re)allocates three scratch buffers of the given sizes, freeing the old ones; 0, or -1 (all three then
// freed and null) when one could not be allocated.
static int reserve3(void **a, size_t a_bytes, void **b, size_t b_bytes, void **c, size_t c_bytes) {
    free(*a);
    free(*b);
    free(*c);
    *a = malloc(a_bytes);
    *b = malloc(b_bytes);
    *c = malloc(c_bytes);
    if (*a && *b && *c) return 0;
    free(*a);
    free(*b);
    free(*c);
    *a = *b = *c = 0;
    return -1;
}

// vpdpbusd with the 4 activation bytes broadcast straight from memory: compilers emit a separate
// vpbroadcastd for _mm512_set1_epi32, one extra instruction per multiply.
static inline __attribute__((always_inline)) __m512i dot_quad(__m512i acc, __m512i w, const int8_t *quad) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const uint32_t *)quad));
    return acc;
}

// One row's activations: codes [k], steps and offsets [k / 32].
static void quantize_groups(const float *row, long k, int8_t *codes, float *steps, float *offsets) {
    for (long g = 0; g < k / GROUP; g++) {
        const __m512 a = _mm512_loadu_ps(row + g * GROUP), b = _mm512_loadu_ps(row + g * GROUP + 16);
        const __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
        const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const float amax = fmaxf(top, 1e-30f), inverse = (1.0f / amax) * 127.0f;
        // x · inverse rounded half to even (the default rounding mode), as torch.round does
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inverse)));
        const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inverse)));
        _mm_storeu_si128((__m128i *)(codes + g * GROUP), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(codes + g * GROUP + 16), _mm512_cvtepi32_epi8(qb));
        const float step = amax / 127.0f;
        const int finite = !nan && top <= 3.4028235e38f;  // an inf or a NaN input makes the output NaN
        steps[g] = finite ? step : NAN;
        offsets[g] = finite ? step * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)) : NAN;
    }
}

static inline __attribute__((always_inline)) void tile(
    const int rows, const int8_t *codes, long k, const float *steps, const float *offsets, long groups,
    const uint8_t *w, const uint16_t *scales_and_zeros, const uint8_t *next_w, const uint16_t *next_sz, float *y,
    long ldy) {
    __m512 acc[TILE];
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512 eight = _mm512_set1_ps(8.0f);
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
        __m512i part[TILE];
#pragma GCC unroll 8
        for (int m = 0; m < rows; m++) part[m] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) {
            const __m512i bytes = _mm512_loadu_si512((const void *)(w + g * 256 + t * 64));
            const __m512i lo = _mm512_and_si512(bytes, low);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
            const long at = g * GROUP + t * 8;
#pragma GCC unroll 8
            for (int m = 0; m < rows; m++) {
                part[m] = dot_quad(part[m], lo, codes + m * k + at);
                part[m] = dot_quad(part[m], hi, codes + m * k + at + 4);
            }
        }
        const __m512 s = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(scales_and_zeros + g * 2 * COLS)));
        const __m512 z = bf16_to_ps(_mm256_loadu_si256((const __m256i *)(scales_and_zeros + g * 2 * COLS + COLS)));
        const __m512 offset = _mm512_fnmadd_ps(eight, s, z);  // zero − 8 · s
#pragma GCC unroll 8
        for (int m = 0; m < rows; m++) {
            const __m512 scaled = _mm512_mul_ps(s, _mm512_set1_ps(steps[m * groups + g]));
            acc[m] = _mm512_fmadd_ps(scaled, _mm512_cvtepi32_ps(part[m]), acc[m]);
            acc[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(offsets[m * groups + g]), acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < rows; m++) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

// x float32 [rows, k] (k a multiple of 32), y float32 [rows, n] (n a multiple of 16).
// Returns 0, or -1 when the scratch could not be allocated.
int millm_int4_matmul(const float *x, long rows, long k, const uint8_t *w, const uint16_t *scales_and_zeros,
                      long n, float *y) {
    const long groups = k / GROUP;
    if (rows > codes_rows || k > codes_k) {
        codes_rows = rows > codes_rows ? rows : codes_rows;
        codes_k = k > codes_k ? k : codes_k;
        const size_t per_group = sizeof(float) * codes_rows * (codes_k / GROUP);
        if (reserve3((void **)&codes_buf, codes_rows * codes_k, (void **)&steps_buf, per_group,
                     (void **)&offsets_buf, per_group)) {
            codes_rows = codes_k = 0;
            return -1;
        }
    }
    for (long m = 0; m < rows; m++)
        quantize_groups(x + m * k, k, codes_buf + m * k, steps_buf + m * groups, offsets_buf + m * groups);
    const long blocks = n / COLS, block_bytes = groups * 256, block_halves = groups * 2 * COLS;
    for (long b = 0; b < blocks; b++) {
        const uint8_t *wb = w + b * block_bytes;
        const uint16_t *sz = scales_and_zeros + b * block_halves;
        const long next = b + 1 < blocks ? b + 1 : b;
        const uint8_t *nw = w + next * block_bytes;
        const uint16_t *nsz = scales_and_zeros + next * block_halves;
        long m = 0;
        for (; m + TILE <= rows; m += TILE)
            tile(TILE, codes_buf + m * k, k, steps_buf + m * groups, offsets_buf + m * groups, groups, wb, sz, nw,
                 nsz, y + m * n + b * COLS, n);
        switch (rows - m) {
#define REST(r) \
    case r: tile(r, codes_buf + m * k, k, steps_buf + m * groups, offsets_buf + m * groups, groups, wb, sz, nw, \
                 nsz, y + m * n + b * COLS, n); break;
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
        quad_rows = rows > quad_rows ? rows : quad_rows;
        quad_k = k > quad_k ? k : quad_k;
        if (reserve3((void **)&quads_buf, quad_rows * quad_k, (void **)&inverse_buf, sizeof(float) * quad_rows,
                     (void **)&offset_buf, sizeof(int32_t) * quad_rows)) {
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
