/*
 * native.c: minisd's native code for x86 CPUs. Two parts:
 *   - its own fused attention: bf16 on AMX (Intel Sapphire Rapids and later), fp32 on AVX-512;
 *   - the fp32 3x3 convolution's Winograd transforms (at the end), plain C that the compiler vectorises, built for
 *     AVX2 CPUs too (without the attention, which needs AVX-512).
 *
 * The attention:
 *
 *     O = softmax(Q K^T / sqrt(d)) V        for every (batch, head), never building the Lq x Lk matrix
 *
 * Both kernels are unet.py's tiled_attention() written as one pass: for a block of 32 queries, walk over the keys
 * 256 at a time, keeping each query's running max m and rescaling what came before by exp(m_old - m_new) when it
 * grows (the "online softmax" of Milakov & Gimelshein 2018, as in FlashAttention, Dao et al. 2022). Per block:
 *   1. S = Q K^T          (bf16: AMX tiles; fp32: a register tile of fused multiply-adds)
 *   2. the new running max of each query, and corr = exp(m_old - m_new)
 *   3. P = exp(S - m), the running sums times corr
 *   4. O += P V           (as 1.)
 * and at the end 5. O / sum_j P_ij. The scores stay in L1 (32 x 256 fp32) between the products; torch's SDPA and
 * the compiled tiled_attention() both spend their time elsewhere (BENCHMARKS.md, "Our attention, native").
 *
 * Layouts: q, o (B, Lq, H*d) and k, v (B, Lk, H*d), row-major, as the U-Net's projections make them.
 *
 * Built by unet.py at first use (cc -O3 -fopenmp and the instruction-set flags in unet.CFLAGS), called through
 * ctypes.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef __AVX512F__  /* the attention: AVX-512, and AMX for bf16 */
typedef uint16_t bf16;
#define QB 32   /* queries per block: two 16-row tiles share every key tile loaded */
#define KB 256  /* keys per block: 32 x 256 fp32 scores (32 KB) stay in L1 */
#define ONE 0x3f80  /* 1.0 in bf16 */

static inline __mmask16 first(int n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : (1u << n) - 1; }  /* n lanes on */

/* ---------------------------------------------------------------------------------------------------------------
 * bf16 on AMX: the products on the tile unit, which multiplies a 16 x 32 bf16 tile by a 32 x 16 one into a 16 x 16
 * fp32 accumulator in one instruction; the softmax in AVX-512 between them, in fp32 */

/* 2^x by 2^round(x) * p(f), f = x - round(x) in [-1/2, 1/2], p a cubic fitted to 2^f (relative error 7.7e-5,
   below the bf16 rounding of the result, 3.9e-3). x <= 0 here: the scores minus their running max. */
static inline __m512 exp2_bf16(__m512 x) {
    __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.055088684f), f, _mm512_set1_ps(0.24260405f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69327623f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99992895f));
    return _mm512_scalef_ps(p, _mm512_sub_ps(x, f));
}

/* Linux hands a process the AMX registers only when it asks, once (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA). */
int attention_init(void) { return (int)syscall(SYS_arch_prctl, 0x1023, 18); }

/* AMX multiplies A (16 x 32 bf16) by B given in "VNNI" order: row r of a B tile holds rows 2r and 2r+1 of the
   32 x 16 matrix, interleaved. So K is packed as B tiles of K^T (row p: dims 2p, 2p+1 of 16 keys), and V as B tiles
   (row r: keys 2r, 2r+1 of 16 dims), zero beyond Lk and d. V gets one more column, of ones: then P V also gives
   sum_j P_ij, the softmax's denominator, rescaled with the rest and from the same bf16 P as the numerator. */
static void pack(const bf16* k, const bf16* v, bf16* kp, bf16* vp, int Lk, int Lkp, int D, int d, int dp, int dv) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(D * 2));
    for (int n = 0; n < Lkp; n += 16)
        for (int p = 0; p < dp / 2; p++) {
            __m512i x = 2 * p < d ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), first(Lk - n), rows,
                                                                k + (long)n * D + 2 * p, 1) : _mm512_setzero_si512();
            _mm512_store_si512(kp + ((long)(p / 16) * (Lkp / 16) + n / 16) * 512 + (p % 16) * 32, x);
        }
    short idx[32];  /* a0 b0 a1 b1 ... */
    for (int i = 0; i < 32; i++) idx[i] = i % 2 ? 32 + i / 2 : i / 2;
    const __m512i interleave = _mm512_loadu_si512(idx);
    for (int n = 0; n < Lkp; n += 2)
        for (int e = 0; e < dv; e += 16) {
            __mmask16 one = d >= e && d < e + 16 ? 1u << (d - e) : 0;
            __m256i a = _mm256_setzero_si256(), b = a;
            if (n < Lk)
                a = _mm256_mask_set1_epi16(_mm256_maskz_loadu_epi16(first(d - e), v + (long)n * D + e), one, ONE);
            if (n + 1 < Lk)
                b = _mm256_mask_set1_epi16(_mm256_maskz_loadu_epi16(first(d - e), v + (long)(n + 1) * D + e), one, ONE);
            __m512i ab = _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), interleave, _mm512_castsi256_si512(b));
            _mm512_store_si512(vp + ((long)(n / 32) * (dv / 16) + e / 16) * 512 + (n % 32 / 2) * 32, ab);
        }
}

struct tilecfg { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };

/* Attention for (B, Lq, H*d) queries against (B, Lk, H*d) keys and values; d even. */
int attention_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* o, int B, int H, int Lq, int Lk, int d,
                   int threads) {
    const int D = H * d, dp = (d + 31) / 32 * 32, dv = (d + 16) / 16 * 16, Lkp = (Lk + 31) / 32 * 32;
    const long kpn = (long)dp / 32 * (Lkp / 16) * 512, vpn = (long)(Lkp / 32) * (dv / 16) * 512;
    const long mine = QB * KB * 4 + QB * KB * 2 + QB * dp * 2 + QB * dv * 4;  /* bytes a thread */
    bf16* kp = aligned_alloc(64, B * H * kpn * 2);
    bf16* vp = aligned_alloc(64, B * H * vpn * 2);
    char* scratch = aligned_alloc(64, threads * mine);
    if (!kp || !vp || !scratch) { free(kp); free(vp); free(scratch); return -1; }
    #pragma omp parallel for num_threads(threads)
    for (int bh = 0; bh < B * H; bh++) {
        long at = (long)(bh / H) * Lk * D + (bh % H) * d;
        pack(k + at, v + at, kp + bh * kpn, vp + bh * vpn, Lk, Lkp, D, d, dp, dv);
    }
    const int blocks = (Lq + QB - 1) / QB;
    const float c = 1.44269504f / sqrtf(d);  /* exp(s / sqrt(d)) = 2^(s c) */
    #pragma omp parallel num_threads(threads)
    {
        struct tilecfg cfg = {.palette = 1};  /* all 8 tiles 16 rows x 64 bytes */
        for (int t = 0; t < 8; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
        _tile_loadconfig(&cfg);
        unsigned csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);  /* denormals to zero: the smallest probabilities are 0 in bf16 anyway */
        float* S = (float*)(scratch + omp_get_thread_num() * mine);  /* scores, then ... */
        bf16* P = (bf16*)(S + QB * KB);     /* ... probabilities of one block of keys */
        bf16* Q = P + QB * KB;              /* the query block, zero padded */
        float* O = (float*)(Q + QB * dp);  /* running sum_j P_ij V_j, and sum_j P_ij in column d */
        float m[QB] __attribute__((aligned(64))), mnew[QB] __attribute__((aligned(64)));
        float corr[QB] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (long w = 0; w < (long)B * H * blocks; w++) {
            const int bh = w / blocks, q0 = (w % blocks) * QB, rows = Lq - q0 < QB ? Lq - q0 : QB;
            const long at = (long)(bh / H) * Lq * D + (bh % H) * d;
            const bf16* K = kp + bh * kpn;
            const bf16* V = vp + bh * vpn;
            for (int r = 0; r < QB; r++)
                for (int e = 0; e < dp; e += 32) {
                    __mmask32 in = r >= rows ? 0 : d - e >= 32 ? 0xffffffffu : (1u << (d - e)) - 1;
                    _mm512_store_si512(Q + r * dp + e, _mm512_maskz_loadu_epi16(in, q + at + (long)(q0 + r) * D + e));
                }
            for (int i = 0; i < QB * dv; i += 16) _mm512_store_ps(O + i, _mm512_setzero_ps());
            for (int r = 0; r < QB; r++) m[r] = -INFINITY;
            for (int k0 = 0; k0 < Lkp; k0 += KB) {
                const int kn = Lkp - k0 < KB ? Lkp - k0 : KB, valid = Lk - k0 < kn ? Lk - k0 : kn;
                /* 1. S = Q K^T: 32 queries x 32 keys in four accumulator tiles (0-3), d in steps of 32 */
                for (int j = 0; j < kn; j += 32) {
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    for (int e = 0; e < dp; e += 32) {
                        const bf16* kt = K + ((long)(e / 32) * (Lkp / 16) + (k0 + j) / 16) * 512;
                        _tile_loadd(4, Q + e, dp * 2); _tile_loadd(5, Q + 16 * dp + e, dp * 2);
                        _tile_loadd(6, kt, 64); _tile_loadd(7, kt + 512, 64);
                        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
                    }
                    _tile_stored(0, S + j, KB * 4); _tile_stored(1, S + j + 16, KB * 4);
                    _tile_stored(2, S + 16 * KB + j, KB * 4); _tile_stored(3, S + 16 * KB + j + 16, KB * 4);
                }
                /* 2. the new running max of each query; four accumulators hide max's latency */
                for (int r = 0; r < QB; r++) {
                    const float* s = S + r * KB;
                    __m512 m0 = _mm512_set1_ps(m[r]), m1 = m0, m2 = m0, m3 = m0;
                    int j = 0;
                    for (; j + 64 <= valid; j += 64) {
                        m0 = _mm512_max_ps(m0, _mm512_load_ps(s + j));
                        m1 = _mm512_max_ps(m1, _mm512_load_ps(s + j + 16));
                        m2 = _mm512_max_ps(m2, _mm512_load_ps(s + j + 32));
                        m3 = _mm512_max_ps(m3, _mm512_load_ps(s + j + 48));
                    }
                    for (; j < valid; j += 16) m0 = _mm512_max_ps(m0, _mm512_mask_load_ps(m0, first(valid - j), s + j));
                    mnew[r] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
                }
                for (int r = 0; r < QB; r += 16) {  /* corr = 2^((m_old - m_new) c): 0 on the first block, 1 exactly
                                                       while the max stands (the cubic's 1 - 7e-5 would compound) */
                    __m512 mo = _mm512_load_ps(m + r), mn = _mm512_load_ps(mnew + r);
                    __m512 x = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(mo, mn), _mm512_set1_ps(c)),
                                             _mm512_set1_ps(-200.f));
                    __mmask16 same = _mm512_cmp_ps_mask(mo, mn, _CMP_EQ_OQ);
                    _mm512_store_ps(corr + r, _mm512_mask_blend_ps(same, exp2_bf16(x), _mm512_set1_ps(1.f)));
                    _mm512_store_ps(m + r, mn);
                }
                /* 3. P = 2^((S - m) c) in bf16 (zero beyond Lk), and the running sums rescaled by corr */
                for (int r = 0; r < QB; r++) {
                    const float* s = S + r * KB;
                    bf16* p = P + r * KB;
                    const __m512 cc = _mm512_set1_ps(c), mc = _mm512_set1_ps(-m[r] * c);
                    int j = 0;
                    for (; j + 32 <= valid; j += 32) {
                        __m512 p0 = exp2_bf16(_mm512_fmadd_ps(_mm512_load_ps(s + j), cc, mc));
                        __m512 p1 = exp2_bf16(_mm512_fmadd_ps(_mm512_load_ps(s + j + 16), cc, mc));
                        _mm512_store_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
                    }
                    for (; j < kn; j += 16) {
                        __m512 p0 = exp2_bf16(_mm512_fmadd_ps(_mm512_load_ps(s + j), cc, mc));
                        p0 = _mm512_maskz_mov_ps(first(valid - j), p0);
                        _mm256_store_si256((__m256i*)(p + j), (__m256i)_mm512_cvtneps_pbh(p0));
                    }
                    for (int e = 0; e < dv; e += 16)
                        _mm512_store_ps(O + r * dv + e, _mm512_mul_ps(_mm512_load_ps(O + r * dv + e),
                                                                      _mm512_set1_ps(corr[r])));
                }
                /* 4. O += P V: 32 queries x 32 dims in tiles 0-3, over this block's keys 32 at a time */
                for (int e = 0; e < dv; e += 32) {
                    const int two = dv - e >= 32;
                    _tile_loadd(0, O + e, dv * 4); _tile_loadd(2, O + 16 * dv + e, dv * 4);
                    if (two) { _tile_loadd(1, O + e + 16, dv * 4); _tile_loadd(3, O + 16 * dv + e + 16, dv * 4); }
                    for (int j = 0; j < kn; j += 32) {
                        const bf16* vt = V + ((long)((k0 + j) / 32) * (dv / 16) + e / 16) * 512;
                        _tile_loadd(4, P + j, KB * 2); _tile_loadd(5, P + 16 * KB + j, KB * 2);
                        _tile_loadd(6, vt, 64); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 5, 6);
                        if (two) { _tile_loadd(7, vt + 512, 64); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(3, 5, 7); }
                    }
                    _tile_stored(0, O + e, dv * 4); _tile_stored(2, O + 16 * dv + e, dv * 4);
                    if (two) { _tile_stored(1, O + e + 16, dv * 4); _tile_stored(3, O + 16 * dv + e + 16, dv * 4); }
                }
            }
            /* 5. divide by the softmax's denominator, column d, and write bf16 */
            for (int r = 0; r < rows; r++)
                for (int e = 0; e < d; e += 16) {
                    __m512 x = _mm512_mul_ps(_mm512_load_ps(O + r * dv + e), _mm512_set1_ps(1.f / O[r * dv + d]));
                    _mm256_mask_storeu_epi16(o + at + (long)(q0 + r) * D + e, first(d - e),
                                             (__m256i)_mm512_cvtneps_pbh(x));
                }
        }
        _mm_setcsr(csr);
        _tile_release();
    }
    free(kp); free(vp); free(scratch);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * fp32 on AVX-512: the same blocks; the products as register tiles of fused multiply-adds, which keep all of
 * fp32's precision (1.9e-6 from float64 where SDPA has 8.9e-7), and the sum of P kept beside O */

/* 2^x to 1.4e-7 (fp32's own rounding is 6e-8): a quintic in f = x - round(x) */
static inline __m512 exp2_fp32(__m512 x) {
    __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.0013266971f), f, _mm512_set1_ps(0.0096754599f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.055507425f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022122f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314694f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001f));
    return _mm512_scalef_ps(p, _mm512_sub_ps(x, f));
}

/* S[8 rows][32 keys] = Q[8][d] K^T: 16 accumulators; K^T row e holds dim e of every key */
static inline void s_tile(const float* Q, int d, const float* KT, int ldk, float* S) {
    __m512 a[8][2];
    for (int r = 0; r < 8; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int e = 0; e < d; e++) {
        __m512 k0 = _mm512_load_ps(KT + (long)e * ldk), k1 = _mm512_load_ps(KT + (long)e * ldk + 16);
        for (int r = 0; r < 8; r++) {
            __m512 qv = _mm512_set1_ps(Q[r * d + e]);
            a[r][0] = _mm512_fmadd_ps(qv, k0, a[r][0]); a[r][1] = _mm512_fmadd_ps(qv, k1, a[r][1]);
        }
    }
    for (int r = 0; r < 8; r++) { _mm512_store_ps(S + r * KB, a[r][0]); _mm512_store_ps(S + r * KB + 16, a[r][1]); }
}

/* O[4 rows][NV x 16 dims] += P[4][kn] V[kn][..]: 4 x NV accumulators */
#define PV(NV) \
static inline void pv##NV(const float* P, const float* V, int ldv, int kn, float* O, int ldo) { \
    __m512 a[4][NV]; \
    for (int r = 0; r < 4; r++) for (int c = 0; c < NV; c++) a[r][c] = _mm512_load_ps(O + r * ldo + 16 * c); \
    for (int j = 0; j < kn; j++) { \
        __m512 v[NV]; \
        for (int c = 0; c < NV; c++) v[c] = _mm512_load_ps(V + (long)j * ldv + 16 * c); \
        for (int r = 0; r < 4; r++) { \
            __m512 p = _mm512_set1_ps(P[r * KB + j]); \
            for (int c = 0; c < NV; c++) a[r][c] = _mm512_fmadd_ps(p, v[c], a[r][c]); \
        } \
    } \
    for (int r = 0; r < 4; r++) for (int c = 0; c < NV; c++) _mm512_store_ps(O + r * ldo + 16 * c, a[r][c]); \
}
PV(1) PV(2) PV(3) PV(4) PV(5)

int attention_fp32(const float* q, const float* k, const float* v, float* o, int B, int H, int Lq, int Lk, int d,
                   int threads) {
    const int D = H * d, dv = (d + 15) / 16 * 16, Lkp = (Lk + 31) / 32 * 32, nvec = dv / 16;
    const long ktn = (long)d * Lkp, vpn = (long)Lkp * dv, mine = QB * KB + QB * d + QB * dv;  /* floats a thread */
    float* kt = aligned_alloc(64, B * H * ktn * 4);
    float* vp = aligned_alloc(64, B * H * vpn * 4);
    float* scratch = aligned_alloc(64, threads * mine * 4);
    if (!kt || !vp || !scratch) { free(kt); free(vp); free(scratch); return -1; }
    #pragma omp parallel for num_threads(threads)
    for (int bh = 0; bh < B * H; bh++) {  /* K transposed (row e: dim e of every key), V's rows padded to dv */
        const long at = (long)(bh / H) * Lk * D + (bh % H) * d;
        float* KT = kt + bh * ktn;
        float* V = vp + bh * vpn;
        for (int e = 0; e < d; e++)
            for (int n = 0; n < Lkp; n++) KT[(long)e * Lkp + n] = n < Lk ? k[at + (long)n * D + e] : 0.f;
        for (int n = 0; n < Lkp; n++)
            for (int e = 0; e < dv; e += 16)
                _mm512_store_ps(V + (long)n * dv + e, _mm512_maskz_loadu_ps(n < Lk ? first(d - e) : 0,
                                                                            v + at + (long)n * D + e));
    }
    const int blocks = (Lq + QB - 1) / QB, passes = (nvec + 4) / 5;  /* P V: up to 5 vectors of V a pass */
    const float c = 1.44269504f / sqrtf(d);
    #pragma omp parallel num_threads(threads)
    {
        unsigned csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);  /* denormals to zero: below 2^-126 of the largest term, nothing a sum keeps */
        float* S = scratch + omp_get_thread_num() * mine;  /* scores, then probabilities, of one block of keys */
        float* Q = S + QB * KB;                             /* the query block, zero padded */
        float* O = Q + QB * d;                              /* running sum_j P_ij V_j */
        float m[QB], l[QB];                                 /* running max and sum_j P_ij */
        #pragma omp for schedule(static)
        for (long w = 0; w < (long)B * H * blocks; w++) {
            const int bh = w / blocks, q0 = (w % blocks) * QB, rows = Lq - q0 < QB ? Lq - q0 : QB;
            const long at = (long)(bh / H) * Lq * D + (bh % H) * d;
            const float* KT = kt + bh * ktn;
            const float* V = vp + bh * vpn;
            for (int r = 0; r < QB; r++)
                for (int e = 0; e < d; e++) Q[r * d + e] = r < rows ? q[at + (long)(q0 + r) * D + e] : 0.f;
            memset(O, 0, QB * dv * 4);
            for (int r = 0; r < QB; r++) { m[r] = -INFINITY; l[r] = 0.f; }
            for (int k0 = 0; k0 < Lkp; k0 += KB) {
                const int kn = Lkp - k0 < KB ? Lkp - k0 : KB, valid = Lk - k0 < kn ? Lk - k0 : kn;
                /* 1. S = Q K^T, 8 queries x 32 keys at a time */
                for (int r = 0; r < QB; r += 8)
                    for (int j = 0; j < kn; j += 32) s_tile(Q + r * d, d, KT + k0 + j, Lkp, S + r * KB + j);
                /* 2-3. the running max, P = 2^((S - m) c) in place, the running sums rescaled by corr */
                for (int r = 0; r < QB; r++) {
                    float* s = S + r * KB;
                    __m512 m0 = _mm512_set1_ps(m[r]), m1 = m0;
                    int j = 0;
                    for (; j + 32 <= valid; j += 32) {
                        m0 = _mm512_max_ps(m0, _mm512_load_ps(s + j));
                        m1 = _mm512_max_ps(m1, _mm512_load_ps(s + j + 16));
                    }
                    for (; j < valid; j += 16) m0 = _mm512_max_ps(m0, _mm512_mask_load_ps(m0, first(valid - j), s + j));
                    const float mnew = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
                    const float corr = mnew == m[r] ? 1.f : exp2f((m[r] - mnew) * c);
                    const __m512 cc = _mm512_set1_ps(c), mc = _mm512_set1_ps(-mnew * c);
                    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
                    for (j = 0; j + 32 <= valid; j += 32) {
                        __m512 p0 = exp2_fp32(_mm512_fmadd_ps(_mm512_load_ps(s + j), cc, mc));
                        __m512 p1 = exp2_fp32(_mm512_fmadd_ps(_mm512_load_ps(s + j + 16), cc, mc));
                        s0 = _mm512_add_ps(s0, p0);
                        s1 = _mm512_add_ps(s1, p1);
                        _mm512_store_ps(s + j, p0);
                        _mm512_store_ps(s + j + 16, p1);
                    }
                    for (; j < kn; j += 16) {
                        __m512 p0 = exp2_fp32(_mm512_fmadd_ps(_mm512_load_ps(s + j), cc, mc));
                        p0 = _mm512_maskz_mov_ps(first(valid - j), p0);
                        s0 = _mm512_add_ps(s0, p0);
                        _mm512_store_ps(s + j, p0);
                    }
                    l[r] = l[r] * corr + _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
                    m[r] = mnew;
                    for (int e = 0; e < dv; e += 16)
                        _mm512_store_ps(O + r * dv + e, _mm512_mul_ps(_mm512_load_ps(O + r * dv + e),
                                                                      _mm512_set1_ps(corr)));
                }
                /* 4. O += P V, 4 queries x up to 80 dims at a time, split as evenly as can be */
                for (int r = 0; r < QB; r += 4)
                    for (int i = 0, e = 0; i < passes; i++) {
                        const int nv = nvec / passes + (i < nvec % passes);
                        const float* Vb = V + (long)k0 * dv + e;
                        float* Ob = O + r * dv + e;
                        switch (nv) {
                            case 5: pv5(S + r * KB, Vb, dv, kn, Ob, dv); break;
                            case 4: pv4(S + r * KB, Vb, dv, kn, Ob, dv); break;
                            case 3: pv3(S + r * KB, Vb, dv, kn, Ob, dv); break;
                            case 2: pv2(S + r * KB, Vb, dv, kn, Ob, dv); break;
                            default: pv1(S + r * KB, Vb, dv, kn, Ob, dv);
                        }
                        e += 16 * nv;
                    }
            }
            /* 5. divide by the softmax's denominator */
            for (int r = 0; r < rows; r++)
                for (int e = 0; e < d; e += 16)
                    _mm512_mask_storeu_ps(o + at + (long)(q0 + r) * D + e, first(d - e),
                                          _mm512_mul_ps(_mm512_load_ps(O + r * dv + e), _mm512_set1_ps(1.f / l[r])));
        }
        _mm_setcsr(csr);
    }
    free(kt); free(vp); free(scratch);
    return 0;
}
#endif

/* ---------------------------------------------------------------------------------------------------------------
 * The 3x3 convolution, fp32, by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for
 * Convolutional Neural Networks"): each 2x2 block of outputs ("tile") from its 4x4 patch d of the zero-padded input,
 *
 *     Y = A^T [ (G g G^T) . (B^T d B) ] A           . elementwise, over 4 x 4 = 16 positions,
 *
 * with g the 3x3 filter. Summed over the input channels, the elementwise products become 16 matrix products,
 * M_q = V_q U_q (tiles x C_in times C_in x C_out), 16 multiplies where the direct convolution does 36: 2.25x fewer.
 * unet.py keeps the transformed filters U = G g G^T and does the products (torch.bmm); here are the three
 * transforms, the filters' once and the two around the products at every call, on channels-last tensors:
 *
 *     G = |  1    0    0  |     B^T = | 1  0 -1  0 |     A^T = | 1  1  1  0 |
 *         | 1/2  1/2  1/2 |           | 0  1  1  0 |           | 0  1 -1 -1 |
 *         | 1/2 -1/2  1/2 |           | 0 -1  1  0 |
 *         |  0    0    1  |           | 0  1  0 -1 |
 *
 * Tiles are numbered p = (n * th + i) * tw + j, th x tw tiles an image, and each call takes np of them from p0, so
 * that unet.py bounds its scratch. Odd sizes: the last row or column of tiles reads zeros and writes half. */

/* u (16, C, K) = G g G^T for the filters g (K, C, 3, 3): position q of every filter, C_in x C_out, as bmm takes it */
void winograd_filter(const float* g, float* u, int C, int K, int threads) {
    const long plane = (long)C * K;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int c = 0; c < C; c++) {
        #pragma omp simd
        for (int k = 0; k < K; k++) {  /* along the output channels: u's rows are written whole */
            const float* f = g + ((long)k * C + c) * 9;
            float a[4][3];  /* G g: its rows from the filter's rows f[0..2], f[3..5], f[6..8] */
            for (int j = 0; j < 3; j++) {
                a[0][j] = f[j];
                a[1][j] = 0.5f * (f[j] + f[3 + j] + f[6 + j]);
                a[2][j] = 0.5f * (f[j] - f[3 + j] + f[6 + j]);
                a[3][j] = f[6 + j];
            }
            float* uk = u + (long)c * K + k;
            for (int i = 0; i < 4; i++) {  /* (G g) G^T, row i */
                uk[(4 * i) * plane] = a[i][0];
                uk[(4 * i + 1) * plane] = 0.5f * (a[i][0] + a[i][1] + a[i][2]);
                uk[(4 * i + 2) * plane] = 0.5f * (a[i][0] - a[i][1] + a[i][2]);
                uk[(4 * i + 3) * plane] = a[i][2];
            }
        }
    }
}

/* v (16, np, C) = B^T d B for the tiles p0 ... p0 + np - 1 of x (N, H, W, C); -1 where it cannot allocate */
int winograd_input(const float* x, float* v, int N, int H, int W, int C, long p0, long np, int threads) {
    const int th = (H + 1) / 2, tw = (W + 1) / 2;
    const long ld = ((long)C + 15) / 16 * 16;
    float* zero = calloc(C, sizeof(float));                          /* the padding */
    float* scratch = aligned_alloc(64, threads * 16 * ld * sizeof(float));  /* B^T d, a C-vector a position */
    if (!zero || !scratch) { free(zero); free(scratch); return -1; }
    #pragma omp parallel num_threads(threads)
    {
        float* t = scratch + omp_get_thread_num() * 16 * ld;
        #pragma omp for schedule(static)
        for (long p = p0; p < p0 + np; p++) {
            const int n = p / ((long)th * tw), i = p / tw % th, j = p % tw;
            const float* d[4][4];
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++) {
                    const int r = 2 * i - 1 + a, c = 2 * j - 1 + b;
                    d[a][b] = r < 0 || r >= H || c < 0 || c >= W ? zero : x + (((long)n * H + r) * W + c) * C;
                }
            for (int b = 0; b < 4; b++) {  /* t = B^T d, a column of the patch at a time */
                const float *d0 = d[0][b], *d1 = d[1][b], *d2 = d[2][b], *d3 = d[3][b];
                float *t0 = t + b * ld, *t1 = t + (4 + b) * ld, *t2 = t + (8 + b) * ld, *t3 = t + (12 + b) * ld;
                #pragma omp simd
                for (int k = 0; k < C; k++) {
                    t0[k] = d0[k] - d2[k];
                    t1[k] = d1[k] + d2[k];
                    t2[k] = d2[k] - d1[k];
                    t3[k] = d1[k] - d3[k];
                }
            }
            for (int a = 0; a < 4; a++) {  /* v = t B, a row at a time, into position q = 4 a + b of tile p */
                const float *s0 = t + 4 * a * ld, *s1 = s0 + ld, *s2 = s1 + ld, *s3 = s2 + ld;
                float* v0 = v + ((4 * a) * np + p - p0) * C;
                float *v1 = v0 + np * C, *v2 = v1 + np * C, *v3 = v2 + np * C;
                #pragma omp simd
                for (int k = 0; k < C; k++) {
                    v0[k] = s0[k] - s2[k];
                    v1[k] = s1[k] + s2[k];
                    v2[k] = s2[k] - s1[k];
                    v3[k] = s1[k] - s3[k];
                }
            }
        }
    }
    free(zero);
    free(scratch);
    return 0;
}

/* y (N, H, W, C) = A^T m A + bias for the tiles p0 ... p0 + np - 1, from m (16, np, C); bias may be NULL */
void winograd_output(const float* m, const float* bias, float* y, int N, int H, int W, int C, long p0, long np,
                     int threads) {
    const int th = (H + 1) / 2, tw = (W + 1) / 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long p = p0; p < p0 + np; p++) {
        const int n = p / ((long)th * tw), i = p / tw % th, j = p % tw;
        const float* mq[16];
        for (int q = 0; q < 16; q++) mq[q] = m + (q * np + p - p0) * C;
        float* y00 = y + (((long)n * H + 2 * i) * W + 2 * j) * C;  /* the tile's four outputs, those inside y */
        float* y01 = 2 * j + 1 < W ? y00 + C : NULL;
        float* y10 = 2 * i + 1 < H ? y00 + (long)W * C : NULL;
        float* y11 = y01 && y10 ? y10 + C : NULL;
        #pragma omp simd
        for (int k = 0; k < C; k++) {
            float s0[4], s1[4];  /* A^T m: the four columns of its two rows */
            for (int b = 0; b < 4; b++) {
                s0[b] = mq[b][k] + mq[4 + b][k] + mq[8 + b][k];
                s1[b] = mq[4 + b][k] - mq[8 + b][k] - mq[12 + b][k];
            }
            const float bk = bias ? bias[k] : 0.f;
            y00[k] = s0[0] + s0[1] + s0[2] + bk;
            if (y01) y01[k] = s0[1] - s0[2] - s0[3] + bk;
            if (y10) y10[k] = s1[0] + s1[1] + s1[2] + bk;
            if (y11) y11[k] = s1[1] - s1[2] - s1[3] + bk;
        }
    }
}
