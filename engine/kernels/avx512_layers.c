// The small per-layer operations of a decode step, one call each instead of 6–14 torch ops (see
// engine/decode_kernels.py): at one row a torch op costs a few µs whatever its size, and a SmolLM2
// step ran ~60 RMSNorms and 30 rotary embeddings of 7 and ~14 ops.
#include <immintrin.h>
#include <math.h>

#include "avx512_exp.h"

// out[r] = weight · (x[r] · 1/√(mean(x[r]²) + eps)), float32, rows `row_stride` floats apart (out dense).
void millm_rms_norm(const float *x, long rows, long row_stride, long dim, const float *weight, float eps,
                    float *out) {
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * row_stride;
        float *target = out + r * dim;
        __m512 squares = _mm512_setzero_ps();
        long d = 0;
        for (; d + 16 <= dim; d += 16) {
            const __m512 v = _mm512_loadu_ps(row + d);
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        float total = _mm512_reduce_add_ps(squares);
        for (; d < dim; d++) total += row[d] * row[d];
        const float inverse = 1.0f / sqrtf(total / (float)dim + eps);
        const __m512 scale = _mm512_set1_ps(inverse);
        for (d = 0; d + 16 <= dim; d += 16)
            _mm512_storeu_ps(target + d,
                             _mm512_mul_ps(_mm512_loadu_ps(weight + d), _mm512_mul_ps(_mm512_loadu_ps(row + d), scale)));
        for (; d < dim; d++) target[d] = weight[d] * (row[d] * inverse);
    }
}

static inline __m512 negated(__m512 v) {  // −v, the sign bit flipped (0 − v would turn −0 into +0)
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32((int)0x80000000u)));
}

// Rotary embedding of one token per row, as transformers' apply_rotary_pos_emb computes it:
// out = x · cos + rotate_half(x) · sin with rotate_half(x) = (−x[half:], x[:half]); the same float32
// multiplications and addition (no fused multiply-add: -ffp-contract=off), so the same bits.
// x [B, H, D] at (batch_stride, head_stride), cos/sin [B, D] dense, out [B, H, D] dense; D even.
void millm_rotary(const float *x, long batch, long heads, long batch_stride, long head_stride, long dim,
                  const float *cos, const float *sin, float *out) {
    const long half = dim / 2;
    for (long b = 0; b < batch; b++) {
        const float *c = cos + b * dim, *s = sin + b * dim;
        for (long h = 0; h < heads; h++) {
            const float *v = x + b * batch_stride + h * head_stride;
            float *target = out + (b * heads + h) * dim;
            long d = 0;
            for (; d + 16 <= half; d += 16) {  // first half: x·cos + (−x[d + half])·sin
                const __m512 rotated = negated(_mm512_loadu_ps(v + half + d));
                _mm512_storeu_ps(target + d, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(v + d), _mm512_loadu_ps(c + d)),
                                                           _mm512_mul_ps(rotated, _mm512_loadu_ps(s + d))));
            }
            for (; d < half; d++) target[d] = v[d] * c[d] + (-v[half + d]) * s[d];
            for (d = half; d + 16 <= dim; d += 16) {  // second half: x·cos + x[d − half]·sin
                _mm512_storeu_ps(target + d, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(v + d), _mm512_loadu_ps(c + d)),
                                                           _mm512_mul_ps(_mm512_loadu_ps(v + d - half), _mm512_loadu_ps(s + d))));
            }
            for (; d < dim; d++) target[d] = v[d] * c[d] + v[d - half] * s[d];
        }
    }
}

// out[r] = the index of row r's largest value, the first of several equal ones: torch.argmax's answer
// (−0 and +0 are equal there too). Rows `row_stride` floats apart, dim ≥ 1. Greedy sampling's argmax over a
// 49k vocabulary took torch ~75 µs a row, one pass and a scan here. Returns 1, with `out` unset, when
// a row holds a NaN (torch takes a NaN as the largest value; the caller runs torch.argmax), else 0.
int millm_argmax(const float *x, long rows, long row_stride, long dim, long *out) {
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * row_stride;
        __m512 top = minus_inf;
        __mmask16 nan = 0;
        for (long d = 0; d < dim; d += 16) {
            const __mmask16 lanes = dim - d >= 16 ? 0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
            const __m512 v = _mm512_mask_loadu_ps(minus_inf, lanes, row + d);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            top = _mm512_max_ps(top, v);
        }
        if (nan) return 1;
        const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        for (long d = 0; d < dim; d += 16) {
            const __mmask16 lanes = dim - d >= 16 ? 0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
            const __mmask16 hit = _mm512_mask_cmp_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, row + d), best, _CMP_EQ_OQ);
            if (hit) {
                out[r] = d + __builtin_ctz(hit);
                break;
            }
        }
    }
    return 0;
}

// A gated MLP's activation: out[r, i] = silu(x[r, gate + i]) · x[r, up + i] for i < width, with
// silu(g) = g / (1 + e^−g); rows of x `row_stride` floats apart, out dense. One call instead of two
// slices, a SiLU and a product, 30 times a SmolLM2 decode step.
void millm_silu_mul(const float *x, long rows, long row_stride, long gate, long up, long width, float *out) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (long r = 0; r < rows; r++) {
        const float *g = x + r * row_stride + gate, *u = x + r * row_stride + up;
        float *target = out + r * width;
        for (long i = 0; i < width; i += 16) {
            const __mmask16 lanes = width - i >= 16 ? 0xFFFF : (__mmask16)((1u << (width - i)) - 1);
            const __m512 gv = _mm512_maskz_loadu_ps(lanes, g + i);
            const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, exp_ps(negated(gv))));
            _mm512_mask_storeu_ps(target + i, lanes, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(lanes, u + i)));
        }
    }
}
