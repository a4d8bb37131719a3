/* One answer token through a LLaMA-family model on the CPU, in one call.
 *
 * A decode step multiplies one row of activations by every matrix of the model once, so
 * its speed is the speed at which the matrices stream from memory. Run as PyTorch
 * operations, each layer is some twenty calls of a few microseconds to a few tens each;
 * here a layer is six matrix-vector products and a little arithmetic between them, and
 * the whole step (every layer, the final norm and the LM head) runs in one OpenMP
 * parallel region: the threads split each product by rows and the attention by heads.
 *
 * Matrices are row-major float32, float16 or bfloat16 (the `wtype` codes below), widened
 * to float32 in registers; activations, norms, RoPE, attention and accumulation are
 * float32. Keys and values live in the caller's dense buffer (float32, RoPE'd keys):
 * the step writes the new token's key and value at `slot` and attends to slots [0, slot].
 *
 * Built by landmark_cli/kernels/cpu_step.py with the system C compiler for the machine it
 * runs on (-march=native); x86-64 with AVX-512, or AVX2 with F16C and FMA.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

enum { W_F32 = 0, W_F16 = 1, W_BF16 = 2 };

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

/* y[r] (+)= W[r, :] . x for r in [0, rows), the rows shared among the team's threads.
 * Called inside the parallel region; ends with the team's barrier. */
static void gemv(const void *w, int wtype, const float *x, float *y, int rows, int cols, int accumulate) {
#pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) {
        size_t at = (size_t)r * cols;
        float d = wtype == W_F32  ? dot_f32((const float *)w + at, x, cols)
                  : wtype == W_F16 ? dot_f16((const uint16_t *)w + at, x, cols)
                                   : dot_bf16((const uint16_t *)w + at, x, cols);
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

/* One query head q [d] over keys / values [n, d]: softmax(q.k / sqrt(d)) . v into out [d];
 * s [n] is scratch. */
static void attend_head(const float *q, const float *keys, const float *values, int n, int d, float *s,
                        float *out) {
    float scale = 1.f / sqrtf((float)d), m = -FLT_MAX, total = 0.f;
    for (int j = 0; j < n; j++) {
        s[j] = dot_f32(keys + (size_t)j * d, q, d) * scale;
        m = s[j] > m ? s[j] : m;
    }
    for (int j = 0; j < n; j++) {
        s[j] = expf(s[j] - m);
        total += s[j];
    }
    int c = 0;
    for (; c + VW <= d; c += VW) {
        vf acc = vzero();
        for (int j = 0; j < n; j++) acc = vfma(vset(s[j]), vload(values + (size_t)j * d + c), acc);
        vstore(out + c, vmul(acc, vset(1.f / total)));
    }
    for (; c < d; c++) {
        float acc = 0.f;
        for (int j = 0; j < n; j++) acc += s[j] * values[(size_t)j * d + c];
        out[c] = acc / total;
    }
}

/* The model's shape and the dense buffer's layout (element strides of a float32
 * [layers, 2, kv_heads, slots, head_dim] buffer). */
typedef struct {
    int32_t dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab, wtype;
    float eps;
    int32_t threads;
    int64_t layer_stride, value_stride, head_stride;
} Shape;

/* Per layer, six pointers: attn_norm (float32), qkv, o, mlp_norm (float32), gate_up, down. */
enum { P_ATTN_NORM, P_QKV, P_O, P_MLP_NORM, P_GATE_UP, P_DOWN, P_COUNT };

/* x [dim]: the token's embedding, the residual stream in place (changed). kv: the dense
 * buffer; slot: where this token's key and value go, the number of earlier slots it
 * attends to. cos / sin [head_dim]: its RoPE row. scratch: at least
 * dim + (n_heads + 2 n_kv_heads) head_dim + n_heads head_dim + 3 ffn_dim + n_heads (slot + 1)
 * floats. logits [vocab] out. */
void landmark_cpu_step(const Shape *sh, const void *const *layers, const float *final_norm, const void *lm_head,
                       float *x, float *kv, int64_t slot, const float *cos, const float *sin, float *scratch,
                       float *logits) {
    const int dim = sh->dim, H = sh->n_heads, Hkv = sh->n_kv_heads, D = sh->head_dim, F = sh->ffn_dim;
    const int group = H / Hkv, n = (int)slot + 1;
    float *h = scratch, *qkv = h + dim, *attn = qkv + (size_t)(H + 2 * Hkv) * D, *gu = attn + (size_t)H * D;
    float *act = gu + 2 * (size_t)F, *scores = act + F;
#pragma omp parallel num_threads(sh->threads)
    {
        for (int l = 0; l < sh->n_layers; l++) {
            const void *const *p = layers + (size_t)l * P_COUNT;
            float *keys = kv + l * sh->layer_stride, *values = keys + sh->value_stride;
#pragma omp single
            rms_norm(x, (const float *)p[P_ATTN_NORM], h, dim, sh->eps);
            gemv(p[P_QKV], sh->wtype, h, qkv, (H + 2 * Hkv) * D, dim, 0);
#pragma omp single
            {
                rope(qkv, H + Hkv, D, cos, sin); /* the queries, then the keys */
                for (int g = 0; g < Hkv; g++)
                    for (int i = 0; i < D; i++) {
                        keys[g * sh->head_stride + slot * D + i] = qkv[(size_t)(H + g) * D + i];
                        values[g * sh->head_stride + slot * D + i] = qkv[(size_t)(H + Hkv + g) * D + i];
                    }
            }
#pragma omp for schedule(static)
            for (int q = 0; q < H; q++)
                attend_head(qkv + (size_t)q * D, keys + (q / group) * sh->head_stride,
                            values + (q / group) * sh->head_stride, n, D, scores + (size_t)q * n,
                            attn + (size_t)q * D);
            gemv(p[P_O], sh->wtype, attn, x, dim, H * D, 1);
#pragma omp single
            rms_norm(x, (const float *)p[P_MLP_NORM], h, dim, sh->eps);
            gemv(p[P_GATE_UP], sh->wtype, h, gu, 2 * F, dim, 0);
#pragma omp for schedule(static)
            for (int i = 0; i < F; i++) act[i] = gu[i] / (1.f + expf(-gu[i])) * gu[F + i];
            gemv(p[P_DOWN], sh->wtype, act, x, dim, F, 1);
        }
#pragma omp single
        rms_norm(x, final_norm, h, dim, sh->eps);
        gemv(lm_head, sh->wtype, h, logits, sh->vocab, dim, 0);
    }
}
