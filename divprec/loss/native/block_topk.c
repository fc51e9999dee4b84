/*
 * The shaped loss's step 1 on CPU: per row, the max and the k largest logits (any order), exactly,
 * by blocks. The algorithm of divprec.loss.block_topk.local_top (torch ops):
 *
 *   1. the maxima of blocks of logits (one read of the row) give the row max;
 *   2. t = the k-th largest block maximum. At least k logits are >= t (one per top block), so the
 *      k-th largest logit tau >= t, and every logit >= t lies in a block whose maximum is >= t;
 *   3. the logits >= t (a few more than k) are collected from those blocks while the row is still
 *      in cache, and narrowed to the k largest.
 *
 * Any partition of the row into blocks gives the same exact result. Here a block is one SIMD lane
 * of a segment: segment s holds the `width` consecutive vectors of LANES logits from
 * s * LANES * width, and block (s, l) is lane l of them, so the 16 block maxima of a segment are
 * `width` elementwise vector maxima, with no horizontal reduction. Logits past the last whole
 * segment form one more block. Selections are radix selects on order-preserving 32-bit keys:
 * branch-free passes, so their cost does not depend on the data (ties, bf16) or the branch
 * predictor.
 *
 * Plain C, no OpenMP: the caller runs disjoint chunks of rows in threads (ctypes releases the
 * GIL). Built at first use by divprec/loss/native_select.py (cc -O3 -march=native).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define MAX_WIDTH 32 /* vectors per segment: blocks of up to 32 logits */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Order-preserving map of floats to unsigned keys: larger float, larger key, and equal floats
 * equal keys. -0.0 is mapped as +0.0: the loss decides K_t by z >= tau (IEEE, where -0.0 equals
 * +0.0), so the ties counted here must count both zeros alike. */
static inline uint32_t key_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u = (u == 0x80000000u) ? 0u : u; /* -0.0 -> +0.0 */
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float float_of(uint32_t key) {
    uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The k-th largest of keys[0..n-1] (1 <= k <= n), by 8-bit digits from the top; keys is used as
 * scratch. Four histograms break the store-to-load chains of equal digits. */
static uint32_t kth_largest_key(uint32_t *keys, int64_t n, int64_t k) {
    for (int shift = 24; shift >= 0; shift -= 8) {
        int32_t hist[4][256];
        memset(hist, 0, sizeof hist);
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) {
            hist[0][(keys[i] >> shift) & 255]++;
            hist[1][(keys[i + 1] >> shift) & 255]++;
            hist[2][(keys[i + 2] >> shift) & 255]++;
            hist[3][(keys[i + 3] >> shift) & 255]++;
        }
        for (; i < n; i++) hist[0][(keys[i] >> shift) & 255]++;
        int64_t above = 0;
        int digit = 255;
        for (; digit > 0; digit--) {
            int64_t here = hist[0][digit] + hist[1][digit] + hist[2][digit] + hist[3][digit];
            if (above + here >= k) break;
            above += here;
        }
        k -= above;
        int64_t m = 0;
        for (i = 0; i < n; i++) { /* keep the keys with this digit, in place, branch-free */
            uint32_t x = keys[i];
            keys[m] = x;
            m += (int64_t)(((x >> shift) & 255) == (uint32_t)digit);
        }
        n = m;
        if (n == k) { /* the k-th largest of the rest is its minimum */
            uint32_t low = keys[0];
            for (i = 1; i < n; i++) low = keys[i] < low ? keys[i] : low;
            return low;
        }
    }
    return keys[0]; /* every bit fixed: the remaining keys are equal */
}

/* LANES-wide vectors (GCC/Clang vector extensions: split into the machine's own width). */
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef uint16_t vhalf __attribute__((vector_size(LANES * sizeof(uint16_t))));
typedef uint32_t vword __attribute__((vector_size(LANES * sizeof(uint32_t))));

static inline vfloat vmax(vfloat a, vfloat b) { /* a > b ? a : b per lane */
    vint keep = (vint)(a > b);
    return (vfloat)(((vint)a & keep) | ((vint)b & ~keep));
}

static inline vfloat load_f32(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vfloat load_bf16(const uint16_t *p) {
    vhalf h;
    memcpy(&h, p, sizeof h);
    return (vfloat)(__builtin_convertvector(h, vword) << 16);
}

/* Segment maxima: out[l] = max over the segment's `width` vectors of lane l. */
#define DEFINE_SEGMENT_MAX(NAME, T, VLOAD)                                                         \
    static inline void NAME(const T *p, int64_t width, float *out) {                               \
        vfloat acc = VLOAD(p);                                                                     \
        for (int64_t j = 1; j < width; j++) acc = vmax(VLOAD(p + j * LANES), acc);                 \
        memcpy(out, &acc, sizeof acc);                                                             \
    }

/* Appends the keys of p[0], p[stride], ... (len of them) that are >= t_key to keys (branch-free);
 * returns the count. */
#define DEFINE_COLLECT(NAME, T, LOAD)                                                              \
    static inline int64_t NAME(const T *p, int64_t len, int64_t stride, uint32_t t_key,           \
                               uint32_t *keys) {                                                   \
        int64_t m = 0;                                                                             \
        for (int64_t j = 0; j < len; j++) {                                                        \
            uint32_t x = key_of(LOAD(p[j * stride]));                                              \
            keys[m] = x;                                                                           \
            m += (int64_t)(x >= t_key);                                                            \
        }                                                                                          \
        return m;                                                                                  \
    }

/* #{j < len: p[j] > threshold} (vectorised: an integer sum of comparisons). */
#define DEFINE_COUNT_ABOVE(NAME, T, LOAD)                                                          \
    static inline int64_t NAME(const T *p, int64_t len, float threshold) {                         \
        int32_t n = 0;                                                                             \
        for (int64_t j = 0; j < len; j++) n += LOAD(p[j]) > threshold;                             \
        return n;                                                                                  \
    }

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
DEFINE_SEGMENT_MAX(segment_max_f32, float, load_f32)
DEFINE_SEGMENT_MAX(segment_max_bf16, uint16_t, load_bf16)
DEFINE_COLLECT(collect_f32, float, LOAD_F32)
DEFINE_COLLECT(collect_bf16, uint16_t, LOAD_BF16)
DEFINE_COUNT_ABOVE(count_above_f32, float, LOAD_F32)
DEFINE_COUNT_ABOVE(count_above_bf16, uint16_t, LOAD_BF16)

/* Vectors per segment: the widest (up to MAX_WIDTH) that leaves at least 2k blocks. */
static int64_t segment_width(int64_t cols, int64_t k) {
    int64_t width = MAX_WIDTH;
    while (width > 1 && (cols / (LANES * width)) * LANES < 2 * k) width /= 2;
    return width;
}

/* One row: its max, its k largest values into out[0..k-1], and in excess the number of logits
 * >= the k-th largest beyond k (ties); with above != NULL, also *above_count = #{z > *above},
 * counted only in the segments whose maximum exceeds it, while the row is in cache.
 * scratch: blocks + 2 * cols keys. */
#define DEFINE_ROW_TOP(NAME, T, SEGMENT_MAX, COLLECT, LOAD, COUNT_ABOVE)                           \
    static void NAME(const T *row, int64_t cols, int64_t k, float *row_max, float *out,           \
                     float *excess, const float *above, float *above_count, float *block_max,      \
                     uint32_t *keys) {                                                             \
        int64_t width = segment_width(cols, k), span = LANES * width;                              \
        int64_t segments = cols / span, tail = segments * span, nb = segments * LANES;             \
        float lane_max[LANES];                                                                     \
        for (int l = 0; l < LANES; l++) lane_max[l] = -INFINITY;                                   \
        for (int64_t s = 0; s < segments; s++) {                                                   \
            float *bm = block_max + s * LANES;                                                     \
            SEGMENT_MAX(row + s * span, width, bm);                                                \
            for (int l = 0; l < LANES; l++) lane_max[l] = bm[l] > lane_max[l] ? bm[l] : lane_max[l]; \
        }                                                                                          \
        float m = -INFINITY;                                                                       \
        for (int l = 0; l < LANES; l++) m = lane_max[l] > m ? lane_max[l] : m;                     \
        if (tail < cols) { /* the rest of the row: one more block */                               \
            float r = -INFINITY;                                                                   \
            for (int64_t j = tail; j < cols; j++) {                                                \
                float v = LOAD(row[j]);                                                            \
                r = v > r ? v : r;                                                                 \
            }                                                                                      \
            block_max[nb++] = r;                                                                   \
            m = r > m ? r : m;                                                                     \
        }                                                                                          \
        *row_max = m;                                                                              \
        if (above != NULL) {                                                                       \
            float threshold = *above;                                                              \
            int64_t count = 0;                                                                     \
            for (int64_t s = 0; s < segments; s++) {                                               \
                float top = -INFINITY;                                                             \
                for (int l = 0; l < LANES; l++)                                                    \
                    top = block_max[s * LANES + l] > top ? block_max[s * LANES + l] : top;         \
                if (top > threshold) count += COUNT_ABOVE(row + s * span, span, threshold);        \
            }                                                                                      \
            if (tail < cols) count += COUNT_ABOVE(row + tail, cols - tail, threshold);             \
            *above_count = (float)count;                                                           \
        }                                                                                          \
        uint32_t *work = keys + cols;                                                              \
        uint32_t t_key = 0; /* fewer blocks than k (a tiny row): every logit is a candidate */     \
        if (nb >= k) {                                                                             \
            for (int64_t b = 0; b < nb; b++) work[b] = key_of(block_max[b]);                       \
            t_key = kth_largest_key(work, nb, k);                                                  \
        }                                                                                          \
        /* The logits >= t: only in the blocks (and the tail) whose maximum is >= t. */           \
        int64_t found = 0;                                                                         \
        for (int64_t b = 0; b < segments * LANES; b++)                                             \
            if (key_of(block_max[b]) >= t_key)                                                     \
                found += COLLECT(row + (b / LANES) * span + b % LANES, width, LANES, t_key,        \
                                 keys + found);                                                    \
        if (tail < cols) found += COLLECT(row + tail, cols - tail, 1, t_key, keys + found);           \
        /* found >= k (one logit per top block); fewer only with NaN logits, unordered. */         \
        if (found < k) {                                                                           \
            for (int64_t i = 0; i < k; i++) out[i] = NAN;                                          \
            *excess = 0.0f;                                                                        \
            return;                                                                                \
        }                                                                                          \
        memcpy(work, keys, (size_t)found * sizeof(uint32_t));                                      \
        uint32_t tau_key = kth_largest_key(work, found, k);                                        \
        int64_t j = 0, at_least = 0;                                                               \
        for (int64_t i = 0; i < found; i++) { /* the values > tau (fewer than k), then tau */     \
            out[j] = float_of(keys[i]);                                                            \
            j += (int64_t)(keys[i] > tau_key);                                                     \
            at_least += (int64_t)(keys[i] >= tau_key);                                             \
        }                                                                                          \
        *excess = (float)(at_least - k); /* logits equal to tau beyond the k: all in K_t */       \
        float tau = float_of(tau_key);                                                             \
        for (; j < k; j++) out[j] = tau;                                                           \
    }

DEFINE_ROW_TOP(row_top_f32, float, segment_max_f32, collect_f32, LOAD_F32, count_above_f32)
DEFINE_ROW_TOP(row_top_bf16, uint16_t, segment_max_bf16, collect_bf16, LOAD_BF16, count_above_bf16)

/* rows x cols logits (fp32, or bf16 as raw 16-bit words), row_stride elements apart.
 * Writes row_max[rows], topk[rows, k] (fp32, exact, any order) and excess[rows] (#{z >= the
 * k-th largest} - k, as float); with above != NULL (a threshold per row), also
 * above_count[rows] = #{z > above} (as float). Returns 0, 1 on bad arguments, 2 when the
 * scratch cannot be allocated. */
int divprec_block_topk(const void *z, int is_bf16, int64_t rows, int64_t cols, int64_t row_stride,
                       int64_t k, float *row_max, float *topk, float *excess, const float *above,
                       float *above_count) {
    if (rows < 0 || cols < 1 || k < 1 || k > cols || row_stride < cols) return 1;
    float *block_max = (float *)malloc((size_t)(cols + 1) * sizeof(float));
    uint32_t *keys = (uint32_t *)malloc((size_t)(2 * cols + 1) * sizeof(uint32_t));
    if (block_max == NULL || keys == NULL) {
        free(block_max);
        free(keys);
        return 2;
    }
    for (int64_t r = 0; r < rows; r++) {
        if (is_bf16)
            row_top_bf16((const uint16_t *)z + r * row_stride, cols, k, row_max + r, topk + r * k,
                         excess + r, above ? above + r : NULL, above ? above_count + r : NULL, block_max, keys);
        else
            row_top_f32((const float *)z + r * row_stride, cols, k, row_max + r, topk + r * k,
                        excess + r, above ? above + r : NULL, above ? above_count + r : NULL, block_max, keys);
    }
    free(block_max);
    free(keys);
    return 0;
}
