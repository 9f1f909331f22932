// One decode step of attention (one query token per row) for one CPU thread with AVX-512F
// (see engine/attention.py).
//
// q [B, H, D] and out [B, H, D] contiguous float32; k and v [B, KVH, L, D] float32 with any batch and
// head strides (views of the preallocated KV cache) and rows of D contiguous floats; H = G · KVH (grouped
// query attention: query head h reads KV head h / G). mask, when given, is [B, L] bytes with any batch
// stride: 0 = this column is not attended (padding, outside a sliding window). D is a multiple of 16, at
// most 256.
//
// torch's CPU scaled_dot_product_attention runs a blocked flash-attention kernel built for many query
// tokens; with one it spent ~300 µs a layer on 8 SmolLM2 rows of 160 tokens (a fifth of a Q4 decode
// step), against ~25 µs here. Per query head: scores s_j = scale · q·k_j (float32 dot products),
// p_j = exp(s_j − max) (a polynomial exp, ≤ 2 ulp), out = Σ p_j v_j / Σ p_j. Every sum runs in column
// order from the row's first attended column, so a row's result does not depend on how much padding its
// batch gives it (bit for bit).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "avx512_exp.h"

// The next (row, KV head)'s keys and values, fetched into L2 a few cache lines at a time while this one
// computes. A decode step reads every layer's cache from memory, in blocks of one row and head (~19 KB
// each at 76 columns of SmolLM2); the hardware prefetcher restarts at each block, and without this 8 rows
// read the cache at ~7 GB/s (30 % less time a layer at 76 columns with it, docs/benchmarks.md). L2, not
// L1: the block being computed is L1's.
typedef struct {
    const char *k, *v;
    long left, step;  // lines still to fetch of each; lines per call
} ahead_t;

static inline __attribute__((always_inline)) void fetch_ahead(ahead_t *a) {
    for (long i = 0; i < a->step && a->left > 0; i++, a->left--) {
        _mm_prefetch(a->k, _MM_HINT_T1);
        _mm_prefetch(a->v, _MM_HINT_T1);
        a->k += 64;
        a->v += 64;
    }
}

static __thread float *scores_buf = 0;
static __thread long scores_len = 0;

// The 16 horizontal sums of a[0..15], in order, in one vector (a transpose-and-add tree: ~3
// instructions a vector where a reduction each would take ~10).
static inline __attribute__((always_inline)) __m512 sums16(const __m512 *a) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++)  // quarters 0,1: a[2i]'s halves added; 2,3: a[2i + 1]'s
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)  // quarter q: a[4i + q]'s four partial sums
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    const __m512 d0 = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    const __m512 d1 = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
    const __m512 e = _mm512_add_ps(  // element 4q + m: the sum of a[4m + q]
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(d0), _mm512_castps_pd(d1))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(d0), _mm512_castps_pd(d1))));
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(order, e);
}

// One row's query heads h0..h0+group−1 against their KV head: keys/values [L, D] from column `first`
// on, scores [group, L] scratch. `chunks` = D / 16 is a constant in each instantiation, and every loop
// over registers is unrolled, so the accumulators stay in registers.
static inline __attribute__((always_inline)) void kv_head(
    const float *q, long group, const float *k, const float *v, const uint8_t *mask, long first, long length,
    const int chunks, float scale, float *scores, float *out, ahead_t *ahead) {
    const long dim = chunks * 16;
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY), scaling = _mm512_set1_ps(scale);
    for (long g = 0; g < group; g++) {
        float *sg = scores + g * length;
        __m512 query[16];
#pragma GCC unroll 16
        for (int c = 0; c < chunks; c++) query[c] = _mm512_loadu_ps(q + g * dim + 16 * c);
        __m512 top = minus_inf;
        for (long j = first; j < length; j += 16) {  // 16 columns at a time, counted from `first`
            const long count = length - j < 16 ? length - j : 16;
            const __mmask16 lanes = count == 16 ? 0xFFFF : (__mmask16)((1u << count) - 1);
            __m512 acc[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) {  // past the end: the last column again, masked out below
                const float *key = k + (j + (i < count ? i : count - 1)) * dim;
                acc[i] = _mm512_mul_ps(query[0], _mm512_loadu_ps(key));
#pragma GCC unroll 16
                for (int c = 1; c < chunks; c++) acc[i] = _mm512_fmadd_ps(query[c], _mm512_loadu_ps(key + 16 * c), acc[i]);
            }
            fetch_ahead(ahead);
            const __mmask16 attended =
                mask ? _mm_mask_cmpneq_epi8_mask(lanes, _mm_maskz_loadu_epi8(lanes, mask + j), _mm_setzero_si128())
                     : lanes;
            const __m512 s = _mm512_mask_mov_ps(minus_inf, attended, _mm512_mul_ps(sums16(acc), scaling));
            top = _mm512_max_ps(top, s);
            _mm512_mask_storeu_ps(sg + j, lanes, s);
        }
        // p_j = exp(s_j − max) in place (masked columns: 0), and their sum, in the same column order
        const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        __m512 total = _mm512_setzero_ps();
        for (long j = first; j < length; j += 16) {
            const __mmask16 lanes = length - j >= 16 ? 0xFFFF : (__mmask16)((1u << (length - j)) - 1);
            const __m512 s = _mm512_maskz_loadu_ps(lanes, sg + j);
            const __mmask16 kept = _mm512_mask_cmp_ps_mask(lanes, s, minus_inf, _CMP_NEQ_OQ);
            const __m512 p = _mm512_maskz_mov_ps(kept, exp_ps(_mm512_sub_ps(s, shift)));
            _mm512_mask_storeu_ps(sg + j, lanes, p);
            total = _mm512_add_ps(total, p);
        }
        const __m512 norm = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
        // out = Σ p_j v_j, even and odd columns (from `first`) in two accumulators, added at the end
        __m512 even[16], odd[16];
#pragma GCC unroll 16
        for (int c = 0; c < chunks; c++) even[c] = odd[c] = _mm512_setzero_ps();
        long j = first;
        for (; j + 1 < length; j += 2) {
            fetch_ahead(ahead);
            const __m512 p0 = _mm512_set1_ps(sg[j]), p1 = _mm512_set1_ps(sg[j + 1]);
            const float *v0 = v + j * dim, *v1 = v0 + dim;
#pragma GCC unroll 16
            for (int c = 0; c < chunks; c++) {
                even[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * c), even[c]);
                odd[c] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1 + 16 * c), odd[c]);
            }
        }
        if (j < length) {
            const __m512 p0 = _mm512_set1_ps(sg[j]);
#pragma GCC unroll 16
            for (int c = 0; c < chunks; c++) even[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v + j * dim + 16 * c), even[c]);
        }
        __m512 acc[16];
#pragma GCC unroll 16
        for (int c = 0; c < chunks; c++) acc[c] = _mm512_add_ps(even[c], odd[c]);
#pragma GCC unroll 16
        for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + g * dim + 16 * c, _mm512_mul_ps(acc[c], norm));
    }
}

#define KV_HEAD(n) \
    case n: kv_head(q, group, k, v, mask, first, length, n, scale, scores, out, ahead); break;

static void kv_head_any(const float *q, long group, const float *k, const float *v, const uint8_t *mask,
                        long first, long length, long dim, float scale, float *scores, float *out, ahead_t *ahead) {
    switch (dim / 16) {
        KV_HEAD(1) KV_HEAD(2) KV_HEAD(3) KV_HEAD(4) KV_HEAD(5) KV_HEAD(6) KV_HEAD(7) KV_HEAD(8)
        KV_HEAD(9) KV_HEAD(10) KV_HEAD(11) KV_HEAD(12) KV_HEAD(13) KV_HEAD(14) KV_HEAD(15) KV_HEAD(16)
    }
}

// A row's first attended column (its left padding ends there); 0 without a mask.
static long first_attended(const uint8_t *row_mask, long length) {
    long first = 0;
    if (row_mask)
        while (first < length && !row_mask[first]) first++;
    return first;
}

int millm_decode_attention(const float *q, long batch, long heads, long kv_heads, long length, long dim,
                           const float *k, long k_batch, long k_head, const float *v, long v_batch, long v_head,
                           const uint8_t *mask, long mask_batch, float scale, float *out) {
    if (dim % 16 || dim > 256 || heads % kv_heads) return 2;
    const long group = heads / kv_heads;
    if (scores_len < group * length) {
        free(scores_buf);
        scores_buf = malloc(sizeof(float) * group * length);
        scores_len = scores_buf ? group * length : 0;
        if (!scores_buf) return 1;
    }
    long next_first = first_attended(mask, length);
    for (long b = 0; b < batch; b++) {
        const uint8_t *row_mask = mask ? mask + b * mask_batch : 0;
        const long first = next_first;
        if (b + 1 < batch)  // the next row's first attended column: where its fetch starts
            next_first = first_attended(mask ? mask + (b + 1) * mask_batch : 0, length);
        for (long kv = 0; kv < kv_heads; kv++) {
            float *target = out + (b * heads + kv * group) * dim;
            if (first == length) {  // nothing attended: zeros (no real row asks for that)
                for (long d = 0; d < group * dim; d++) target[d] = 0.0f;
                continue;
            }
            ahead_t ahead = {0, 0, 0, 1};
            const long nb = kv + 1 < kv_heads ? b : b + 1, nkv = kv + 1 < kv_heads ? kv + 1 : 0;
            const long nfirst = nb == b ? first : next_first;
            if (nb < batch && nfirst < length) {
                ahead.k = (const char *)(k + nb * k_batch + nkv * k_head + nfirst * dim);
                ahead.v = (const char *)(v + nb * v_batch + nkv * v_head + nfirst * dim);
                ahead.left = ((length - nfirst) * dim * 4 + 63) / 64;
                const long calls = group * ((length - first + 15) / 16 + (length - first) / 2);
                ahead.step = (ahead.left + calls - 1) / (calls > 0 ? calls : 1);  // done by this block's end
            }
            kv_head_any(q + (b * heads + kv * group) * dim, group, k + b * k_batch + kv * k_head,
                        v + b * v_batch + kv * v_head, row_mask, first, length, dim, scale, scores_buf, target,
                        &ahead);
        }
    }
    return 0;
}
