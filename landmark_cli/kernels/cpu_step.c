/* One answer token through a LLaMA-family model on the CPU, in one call.
 *
 * A decode step multiplies one row of activations by every matrix of the model once, so
 * its speed is the speed at which the matrices stream from memory. Run as PyTorch
 * operations, each layer is some twenty calls of a few microseconds to a few tens each;
 * here a layer is four matrix-vector products and a little arithmetic between them, and
 * the whole step (every layer, the final norm and the LM head) runs in one OpenMP
 * parallel region: the threads split each product by rows, and the attention by
 * key / value head and range of keys.
 *
 * Each matrix is row-major float32, float16, bfloat16, or packed in groups of 32 weights
 * as GGUF files pack them (q8_0, q4_1: landmark_cli/model/blocks.py), its own `wtype`
 * code below; weights are widened to float32 in registers, and activations, norms, RoPE,
 * attention and accumulation are float32. Keys and values live in the caller's dense
 * buffer (float32, keys RoPE'd): the step writes the new token's key and value at `slot`
 * and attends to slots [0, slot].
 *
 * Built by landmark_cli/kernels/cpu_step.py with the system C compiler for the machine it
 * runs on (-march=native); x86-64 with AVX-512, or AVX2 with F16C and FMA.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { W_F32 = 0, W_F16 = 1, W_BF16 = 2, W_Q8_0 = 3, W_Q4_1 = 4 };
#define GROUP 32     /* weights per packed group */
#define Q8_0_BYTES 34 /* float16 d, 32 int8 codes: w = d q */
#define Q4_1_BYTES 20 /* float16 d, float16 m, 16 bytes of 4-bit codes: w = d q + m */

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vset(float a) { return _mm512_set1_ps(a); }
static inline vf vload_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vf vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
/* 32 int8 codes . x[0:32], as a vector of partial sums */
static inline vf vdot_q8(const int8_t *q, const float *x) {
    vf a = vmul(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), vload(x));
    return vfma(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), vload(x + 16), a);
}
/* 32 4-bit codes (16 bytes: weight j low nibble of byte j, weight j + 16 its high nibble) . x[0:32] */
static inline vf vdot_q4(const uint8_t *q, const float *x) {
    __m128i b = _mm_loadu_si128((const __m128i *)q), low = _mm_set1_epi8(15);
    vf a = vmul(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low))), vload(x));
    return vfma(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low))), vload(x + 16), a);
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vset(float a) { return _mm256_set1_ps(a); }
static inline vf vload_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline vf vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline float vsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vf vcodes(const int8_t *q) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))); }
static inline vf vdot_q8(const int8_t *q, const float *x) {
    vf a = vmul(vcodes(q), vload(x));
    a = vfma(vcodes(q + 8), vload(x + 8), a);
    a = vfma(vcodes(q + 16), vload(x + 16), a);
    return vfma(vcodes(q + 24), vload(x + 24), a);
}
static inline vf vnibbles(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
static inline vf vdot_q4(const uint8_t *q, const float *x) {
    __m128i b = _mm_loadu_si128((const __m128i *)q), low = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    vf a = vmul(vnibbles(lo), vload(x));
    a = vfma(vnibbles(_mm_srli_si128(lo, 8)), vload(x + 8), a);
    a = vfma(vnibbles(hi), vload(x + 16), a);
    return vfma(vnibbles(_mm_srli_si128(hi, 8)), vload(x + 24), a);
}
#else
#error "cpu_step.c needs x86-64 with AVX-512, or AVX2 with F16C and FMA"
#endif

static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

/* w[0:n] . x[0:n] for a row of each weight type: two accumulators, then the tail. */
#define DOT(NAME, T, VLOAD, SCALAR)                                              \
    static float NAME(const T *w, const float *x, int n) {                      \
        vf a0 = vzero(), a1 = vzero();                                           \
        int c = 0;                                                               \
        for (; c + 2 * VW <= n; c += 2 * VW) {                                   \
            a0 = vfma(VLOAD(w + c), vload(x + c), a0);                           \
            a1 = vfma(VLOAD(w + c + VW), vload(x + c + VW), a1);                 \
        }                                                                        \
        for (; c + VW <= n; c += VW) a0 = vfma(VLOAD(w + c), vload(x + c), a0); \
        float s = vsum(vadd(a0, a1));                                            \
        for (; c < n; c++) s += SCALAR(w[c]) * x[c];                             \
        return s;                                                                \
    }
static inline float ident(float a) { return a; }
DOT(dot_f32, float, vload, ident)
DOT(dot_f16, uint16_t, vload_f16, f16_to_f32)
DOT(dot_bf16, uint16_t, vload_bf16, bf16_to_f32)

static inline float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

/* A row of q8_0 groups (n a multiple of GROUP) . x[0:n]. */
static float dot_q8_0(const uint8_t *w, const float *x, int n) {
    vf acc = vzero();
    for (int c = 0; c < n; c += GROUP, w += Q8_0_BYTES)
        acc = vfma(vset(half_at(w)), vdot_q8((const int8_t *)(w + 2), x + c), acc);
    return vsum(acc);
}

/* A row of q4_1 groups . x[0:n]: sum over groups of d (q . x) + m sum(x); xsum[g] holds
 * sum(x) of group g. */
static float dot_q4_1(const uint8_t *w, const float *x, const float *xsum, int n) {
    vf acc = vzero();
    float offsets = 0.f;
    for (int c = 0; c < n; c += GROUP, w += Q4_1_BYTES) {
        acc = vfma(vset(half_at(w)), vdot_q4(w + 4, x + c), acc);
        offsets += half_at(w + 2) * xsum[c / GROUP];
    }
    return vsum(acc) + offsets;
}

/* Bytes of a row of n weights of wtype. */
static inline size_t row_bytes(int wtype, int n) {
    switch (wtype) {
    case W_F32: return 4 * (size_t)n;
    case W_Q8_0: return (size_t)n / GROUP * Q8_0_BYTES;
    case W_Q4_1: return (size_t)n / GROUP * Q4_1_BYTES;
    default: return 2 * (size_t)n;
    }
}

/* y[r] (+)= W[r, :] . x for r in [0, rows), the rows shared among the team's threads.
 * Called inside the parallel region; ends with the team's barrier. */
static void gemv(const void *w, int wtype, const float *x, float *y, int rows, int cols, int accumulate) {
    float xsum[wtype == W_Q4_1 ? cols / GROUP : 1]; /* each thread its own: a few hundred sums */
    if (wtype == W_Q4_1)
        for (int g = 0; g < cols / GROUP; g++) {
            float s = 0.f;
            for (int i = 0; i < GROUP; i++) s += x[g * GROUP + i];
            xsum[g] = s;
        }
#pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) {
        const void *row = (const uint8_t *)w + (size_t)r * row_bytes(wtype, cols);
        float d = wtype == W_F32    ? dot_f32((const float *)row, x, cols)
                  : wtype == W_F16  ? dot_f16((const uint16_t *)row, x, cols)
                  : wtype == W_BF16 ? dot_bf16((const uint16_t *)row, x, cols)
                  : wtype == W_Q8_0 ? dot_q8_0((const uint8_t *)row, x, cols)
                                    : dot_q4_1((const uint8_t *)row, x, xsum, cols);
        y[r] = accumulate ? y[r] + d : d;
    }
}

/* out = x / rms(x) * w (LLaMA's RMSNorm). */
static void rms_norm(const float *x, const float *w, float *out, int n, float eps) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* Rotate each of `heads` vectors of length d by the cos/sin row (the Hugging Face convention:
 * the second half of the dimensions rotates against the first). */
static void rope(float *v, int heads, int d, const float *cos, const float *sin) {
    int half = d / 2;
    for (int h = 0; h < heads; h++, v += d)
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
}

/* The `group` query heads q [group, d] that share one key / value head, over its keys and
 * values [j0, j1) (of [n, d]): per query head, the scores' maximum mx, the sum l of
 * exp(score - mx) and out [d] = sum of exp(score - mx) v, a partial softmax that
 * `combine` merges with the other parts' (each key and value is read once for the group).
 * s: scratch, one row of n per query head. */
static void attend_part(const float *q, int group, const float *keys, const float *values, int j0, int j1, int n,
                        int d, float *s, float *mx, float *l, float *out) {
    float scale = 1.f / sqrtf((float)d);
    int vd = d / VW * VW;
    for (int h = 0; h < group; h++) mx[h] = -FLT_MAX, l[h] = 0.f;
    for (int j = j0; j < j1; j++)
        for (int h = 0; h < group; h++) {
            float v = dot_f32(keys + (size_t)j * d, q + (size_t)h * d, d) * scale;
            s[(size_t)h * n + j] = v;
            mx[h] = v > mx[h] ? v : mx[h];
        }
    for (int h = 0; h < group; h++) {
        float *sh = s + (size_t)h * n, total = 0.f;
        for (int j = j0; j < j1; j++) {
            sh[j] = expf(sh[j] - mx[h]);
            total += sh[j];
        }
        l[h] = total;
    }
    for (int c = 0; c < group * d; c++) out[c] = 0.f;
    for (int j = j0; j < j1; j++) {
        const float *v = values + (size_t)j * d;
        for (int h = 0; h < group; h++) {
            float w = s[(size_t)h * n + j], *o = out + (size_t)h * d;
            vf p = vset(w);
            for (int c = 0; c < vd; c += VW) vstore(o + c, vfma(p, vload(v + c), vload(o + c)));
            for (int c = vd; c < d; c++) o[c] += w * v[c];
        }
    }
}

/* Query head h's attention output [d] from the partial softmaxes of `parts` key ranges. */
static void combine(int h, int H, int parts, int d, const float *mx, const float *l, const float *partial,
                    float *out) {
    float m = -FLT_MAX, total = 0.f;
    for (int p = 0; p < parts; p++) m = mx[p * H + h] > m ? mx[p * H + h] : m;
    for (int c = 0; c < d; c++) out[c] = 0.f;
    for (int p = 0; p < parts; p++) {
        float w = l[p * H + h] > 0.f ? expf(mx[p * H + h] - m) : 0.f;
        total += w * l[p * H + h];
        const float *o = partial + ((size_t)p * H + h) * d;
        for (int c = 0; c < d; c++) out[c] += w * o[c];
    }
    for (int c = 0; c < d; c++) out[c] /= total;
}

/* The model's shape and the dense buffer's layout (element strides of a float32
 * [layers, 2, kv_heads, slots, head_dim] buffer). */
typedef struct {
    int32_t dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab;
    float eps;
    int32_t threads;
    int64_t layer_stride, value_stride, head_stride;
} Shape;

/* Per layer, six pointers: attn_norm (float32), qkv, o, mlp_norm (float32), gate_up, down;
 * and the wtype of each matrix: per layer qkv, o, gate_up, down, then the LM head's. */
enum { P_ATTN_NORM, P_QKV, P_O, P_MLP_NORM, P_GATE_UP, P_DOWN, P_COUNT };
enum { T_QKV, T_O, T_GATE_UP, T_DOWN, T_COUNT };

/* The logits [vocab] of the hidden state x [dim]: the final norm into h [dim], then the
 * LM head (inside a parallel region). */
static void head(const Shape *sh, int wtype, const float *final_norm, const void *lm_head, const float *x, float *h,
                 float *logits) {
#pragma omp single
    rms_norm(x, final_norm, h, sh->dim, sh->eps);
    gemv(lm_head, wtype, h, logits, sh->vocab, sh->dim, 0);
}

/* The logits [vocab] of a hidden state x [dim] (a question's last token); scratch: dim floats. */
void landmark_cpu_logits(const Shape *sh, const int32_t *wtypes, const float *final_norm, const void *lm_head,
                         const float *x, float *scratch, float *logits) {
#pragma omp parallel num_threads(sh->threads)
    head(sh, wtypes[(size_t)sh->n_layers * T_COUNT], final_norm, lm_head, x, scratch, logits);
}

/* x [dim]: the token's embedding, the residual stream in place (changed). kv: the dense
 * buffer; slot: where this token's key and value go, the number of earlier slots it
 * attends to. cos / sin [head_dim]: its RoPE row. scratch: at least
 * dim + (n_heads + 2 n_kv_heads) head_dim + n_heads head_dim + 3 ffn_dim + n_heads (slot + 1)
 * + threads n_heads (head_dim + 2) floats. logits [vocab] out. */
void landmark_cpu_step(const Shape *sh, const void *const *layers, const int32_t *wtypes, const float *final_norm,
                       const void *lm_head,
                       float *x, float *kv, int64_t slot, const float *cos, const float *sin, float *scratch,
                       float *logits) {
    const int dim = sh->dim, H = sh->n_heads, Hkv = sh->n_kv_heads, D = sh->head_dim, F = sh->ffn_dim;
    const int group = H / Hkv, n = (int)slot + 1;
    float *h = scratch, *qkv = h + dim, *attn = qkv + (size_t)(H + 2 * Hkv) * D, *gu = attn + (size_t)H * D;
    float *act = gu + 2 * (size_t)F, *scores = act + F, *partial = scores + (size_t)H * n;
    float *part_max = partial + (size_t)sh->threads * H * D, *part_sum = part_max + (size_t)sh->threads * H;
    const int parts = sh->threads; /* key ranges per key / value head */
#pragma omp parallel num_threads(sh->threads)
    {
        for (int l = 0; l < sh->n_layers; l++) {
            const void *const *p = layers + (size_t)l * P_COUNT;
            const int32_t *t = wtypes + (size_t)l * T_COUNT;
            float *keys = kv + l * sh->layer_stride, *values = keys + sh->value_stride;
#pragma omp single
            rms_norm(x, (const float *)p[P_ATTN_NORM], h, dim, sh->eps);
            gemv(p[P_QKV], t[T_QKV], h, qkv, (H + 2 * Hkv) * D, dim, 0);
#pragma omp single
            {
                rope(qkv, H + Hkv, D, cos, sin); /* the queries, then the keys */
                for (int g = 0; g < Hkv; g++)
                    for (int i = 0; i < D; i++) {
                        keys[g * sh->head_stride + slot * D + i] = qkv[(size_t)(H + g) * D + i];
                        values[g * sh->head_stride + slot * D + i] = qkv[(size_t)(H + Hkv + g) * D + i];
                    }
            }
            /* every key / value head's slots in `parts` ranges, one item each */
#pragma omp for schedule(static)
            for (int item = 0; item < Hkv * parts; item++) {
                int g = item / parts, p = item % parts, h0 = g * group;
                attend_part(qkv + (size_t)h0 * D, group, keys + g * sh->head_stride, values + g * sh->head_stride,
                            (int)((int64_t)n * p / parts), (int)((int64_t)n * (p + 1) / parts), n, D,
                            scores + (size_t)h0 * n, part_max + p * H + h0, part_sum + p * H + h0,
                            partial + ((size_t)p * H + h0) * D);
            }
#pragma omp for schedule(static)
            for (int q = 0; q < H; q++) combine(q, H, parts, D, part_max, part_sum, partial, attn + (size_t)q * D);
            gemv(p[P_O], t[T_O], attn, x, dim, H * D, 1);
#pragma omp single
            rms_norm(x, (const float *)p[P_MLP_NORM], h, dim, sh->eps);
            gemv(p[P_GATE_UP], t[T_GATE_UP], h, gu, 2 * F, dim, 0);
#pragma omp for schedule(static)
            for (int i = 0; i < F; i++) act[i] = gu[i] / (1.f + expf(-gu[i])) * gu[F + i];
            gemv(p[P_DOWN], t[T_DOWN], act, x, dim, F, 1);
        }
        head(sh, wtypes[(size_t)sh->n_layers * T_COUNT], final_norm, lm_head, x, h, logits);
    }
}
