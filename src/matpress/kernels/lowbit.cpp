// Packed low-bit matmul y = x @ W^T on the CPU, for weights stored as unsigned b-bit codes q with a
// scale s and integer zero point z per (row, block): W = (q - z) * s.
//
// Activations are quantized to int8 per block (symmetric, x ~ a * xq, |xq| <= 127), so the inner product
// of a block is an integer dot product sum(q * xq) taken with VNNI (vpdpbusd: u8 x s8 -> s32), and
//   y[n] += s[n, b] * a[b] * (sum_k q[n, k] * xq[k] - z[n, b] * sum_k xq[k]).
// The zero point is corrected once per block from the activation sum, as in the int8 GEMV kernels of
// llama.cpp and in "LUT-GEMM" / "QServe" style mixed-precision kernels.
//
// Weight layout (built once by matpress.kernels.lowbit.pack_layout): rows are grouped in tiles of 4;
// each row's columns in blocks of Bp columns (a multiple of 64), each block in chunks of 64 columns;
// blocks of up to 32 columns have Bp = 32 and share chunks two by two (block_codes). The codes hold the
// blocks that hold columns; the scale arithmetic takes blocks four at a time, so the scales, zero points
// and activations count NB blocks, a multiple of 4 (padded with empty blocks). A chunk of one tile is a
// few 512-bit vectors whose 128-bit lane r holds row r: in "step" s (0..3) byte i of lane r is the code of column 16*s + i. For
//   8 bits: 4 vectors, one per step (256 bytes);
//   4 bits: 2 vectors, vector v holds step 2v in the low and step 2v+1 in the high nibbles (128 bytes);
//   2 bits: 1 vector, step s in bits 2s..2s+1 (64 bytes);
//   3 bits: the 2-bit vector of the low bits, then 4 64-bit masks of the high bit, bit 16*r + i of mask
//           s for column 16*s + i of row r (96 bytes).
// So unpacking is a shift and a mask per step, with no shuffles, and the activations of a step are one
// 16-byte broadcast. Per tile and quad of blocks: 16 fp16 scales and 16 int16 zero points, ordered
// (row, block).
//
// Lookup layouts (codebooks: W = table[q] * s with integer levels in [-127, 127]) keep the codes as they
// are and add 64 bytes per tile (or one 64-byte table for all tiles): lane r holds the 16 bytes
// level + 128 of row r's table, so after unpacking one vpshufb per step turns each code into its byte
// (lane r looks up in lane r, which is row r's table, as in llama.cpp's IQ4_NL kernels), and the zero
// point 128 gives (level + 128 - 128) * s, exactly. From there AVX-512 and the portable path take the
// bytes as 8-bit codes; AVX2 takes them as signed bytes (see its tile kernel).
//
// Non-finite values: int8 activations and integer sums cannot carry a NaN or an infinity, so a block
// whose activations hold one gets the scale NaN in mp_quantize (one compare per 16 values while the
// block maximum is taken), and every output such a block or a weight block with a NaN or infinite scale
// reaches is recomputed in fp32 afterwards (fix_nonfinite): the same NaN and signed infinities as x @ W^T
// of the decoded weights, on every path.
//
// Build: compiled at first use with -O3 -march=native against torch's headers (see
// matpress/kernels/build.py); the AVX-512 VNNI path is used where the compiler targets it, AVX2 where that
// is the widest, a portable C++ path elsewhere (same layout, same results). Python calls the kernels as
// PyTorch custom operators (mp_register_ops, at the end), so a call costs one dispatch, not a ctypes call.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MP_AVX512_VNNI 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MP_AVX2 1
#include <immintrin.h>
#endif

#if defined(MP_AVX512_VNNI) || defined(MP_AVX2)
// Software prefetch of the weight stream, CB bytes (one chunk) at a time: into L1 at PREFETCH_NEAR
// bytes ahead, into L2 at PREFETCH_FAR. The hardware prefetcher alone leaves a core short of its share
// of memory bandwidth; the farther L2 prefetch keeps more lines in flight (cold 4-bit GEMV 7-9 %
// faster on a Sapphire Rapids than with one 2 KB distance; the distances were swept, see docs/kernels.md).
#ifndef MP_PREFETCH_NEAR
#define MP_PREFETCH_NEAR 1024
#endif
#ifndef MP_PREFETCH_FAR
#define MP_PREFETCH_FAR 3072
#endif
template <int CB>
static inline void prefetch_ahead(const uint8_t* p) {
    for (int line = 0; line < CB; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(p + MP_PREFETCH_NEAR + line), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p + MP_PREFETCH_FAR + line), _MM_HINT_T1);
    }
}
#endif

#ifdef MP_AVX512_VNNI
// One activation block: n real values, Bp outputs (zeros past n).
static void quantize_block(const float* x, int n, int8_t* q, int Bp, float* scale, int32_t* sum) {
    const __m512 inf = _mm512_set1_ps(INFINITY);
    __m512 mx = _mm512_setzero_ps();
    __mmask16 nonfinite = 0;
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + i));
        nonfinite |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ);  // NaN or infinite (max would drop a NaN)
        mx = _mm512_max_ps(mx, a);
    }
    const float amax = _mm512_reduce_max_ps(mx);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512i s = _mm512_setzero_si512();
    for (int i = 0; i < Bp; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : n > i ? (__mmask16)((1u << (n - i)) - 1) : (__mmask16)0;
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), inv));
        v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
        s = _mm512_add_epi32(s, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(v));
    }
    *scale = nonfinite ? NAN : amax / 127.f;
    *sum = _mm512_reduce_add_epi32(s);
}
#elif defined(MP_AVX2)
// The portable quantize_block's arithmetic 8 values at a time (vcvtps2dq rounds to nearest even, as
// nearbyintf does), the rest one by one.
static void quantize_block(const float* x, int n, int8_t* q, int Bp, float* scale, int32_t* sum) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)), inf = _mm256_set1_ps(INFINITY);
    __m256 mx = _mm256_setzero_ps(), nonfinite = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), magnitude);
        nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // NaN or infinite
        mx = _mm256_max_ps(mx, a);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
    bool bad = _mm256_movemask_ps(nonfinite) != 0;
    for (int k = i; k < n; ++k) {
        const float a = fabsf(x[k]);
        bad |= !(a < INFINITY);
        amax = a > amax ? a : amax;
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m256 iv = _mm256_set1_ps(inv);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    __m256i s = _mm256_setzero_si256();
    for (i = 0; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv));
        v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
        s = _mm256_add_epi32(s, v);
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(words, words));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    int32_t total = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
    for (; i < n; ++i) {
        const float v = fminf(127.f, fmaxf(-127.f, nearbyintf(x[i] * inv)));
        q[i] = (int8_t)v;
        total += (int32_t)v;
    }
    memset(q + n, 0, Bp - n);
    *scale = bad ? NAN : amax / 127.f;
    *sum = total;
}
#else
static void quantize_block(const float* x, int n, int8_t* q, int Bp, float* scale, int32_t* sum) {
    float amax = 0.f;
    bool nonfinite = false;
    for (int i = 0; i < n; ++i) {
        nonfinite |= !(fabsf(x[i]) < INFINITY);  // NaN or infinite (fmaxf drops a NaN)
        amax = fmaxf(amax, fabsf(x[i]));
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t s = 0;
    for (int i = 0; i < n; ++i) {
        const float v = fminf(127.f, fmaxf(-127.f, nearbyintf(x[i] * inv)));
        q[i] = (int8_t)v;
        s += (int32_t)v;
    }
    memset(q + n, 0, Bp - n);
    *scale = nonfinite ? NAN : amax / 127.f;
    *sum = s;
}
#endif

// Bytes of one chunk (64 columns of a 4-row tile) in the layout of `bits`-bit codes.
static constexpr int chunk_bytes(int bits) {
    return bits == 8 ? 256 : bits == 4 ? 128 : bits == 3 ? 96 : 64;
}

// Columns [start, start + n) of block b: block b is part j of group g (b = g * sub + j), at most Bo
// columns, never past the group's end or K (n is 0 for the empty padding blocks).
static inline void block_columns(int b, int K, int G, int sub, int Bo, int* start, int* n) {
    const int g = b / sub, j = b % sub;
    *start = g * G + j * Bo;
    int end = *start + Bo;
    if (end > (g + 1) * G) end = (g + 1) * G;
    if (end > K) end = K;
    *n = end > *start ? end - *start : 0;
}

// Weight rows in tile t of a matrix of N rows (4, fewer in the last tile).
static inline int tile_rows(int t, int N) { return N - 4 * t < 4 ? N - 4 * t : 4; }
// Blocks that hold columns: the codes store these only; scales and zeros are padded to whole quads of
// NB blocks (their padding is a few bytes, the codes' would be a quarter of a 576-wide matrix at g64).
static inline int code_blocks(int K, int G, int sub) { return (K + G - 1) / G * sub; }

// Where block b's codes lie. Blocks of 32 columns (Bp == 32: groups of 32, such as GGUF's Q4_0 grid)
// share 64-column chunks: block b is steps 2 (b % 2) and 2 (b % 2) + 1 of chunk b / 2, so no column of
// the codes is padding. Wider blocks own Bp / 64 chunks each.
struct BlockCodes {
    long chunk;  // its first chunk
    int chunks, step0, steps;
};
static inline BlockCodes block_codes(int b, int Bp) {
    return Bp == 32 ? BlockCodes{b / 2, 1, 2 * (b % 2), 2} : BlockCodes{(long)b * (Bp / 64), Bp / 64, 0, 4};
}
// Chunks of codes per tile, of `blocks` blocks that hold columns.
static inline long chunks_of(int blocks, int Bp) { return Bp == 32 ? (blocks + 1) / 2 : (long)blocks * (Bp / 64); }
static inline long code_chunks(int K, int G, int sub, int Bp) { return chunks_of(code_blocks(K, G, sub), Bp); }

// body(i) for i in [0, n): spread over `nthreads` OpenMP threads when `parallel`, else in this thread.
// Not a parallel region with an if clause: libgomp closes even a one-thread region with a futex wake,
// a microsecond of a small matrix's call.
template <class Body>
static inline void for_each_index(long n, int nthreads, bool parallel, const Body& body) {
    if (parallel && nthreads > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (long i = 0; i < n; ++i) body(i);
    } else {
        for (long i = 0; i < n; ++i) body(i);
    }
}

extern "C" {

// Which path was compiled in: 1 AVX-512 VNNI, 2 AVX2, 0 portable C++.
int mp_isa(void) {
#if defined(MP_AVX512_VNNI)
    return 1;
#elif defined(MP_AVX2)
    return 2;
#else
    return 0;
#endif
}

// Quantize activations x (M, K) fp32 to int8 per block. Column k lies in group k / G; each group is
// split into `sub` blocks of Bo columns (the last one may be shorter), block b = group * sub + j, padded
// to Bp columns with zeros. Outputs xq (M, NB * Bp), scale a (M, NB) and sum of xq (M, NB); a is NaN for
// a block holding a NaN or an infinity. Rounding is to nearest (ties to even) in both paths, so they give
// the same xq.
void mp_quantize(const float* x, int M, int K, int G, int sub, int Bo, int Bp, int NB, int8_t* xq,
                 float* xscale, int32_t* xsum, int nthreads) {
    const long total = (long)M * NB;
    for_each_index(total, nthreads, total * Bp > (1 << 18), [&](long mb) {
        const int m = (int)(mb / NB), b = (int)(mb % NB);
        int start, n;
        block_columns(b, K, G, sub, Bo, &start, &n);
        quantize_block(x + (long)m * K + start, n, xq + (long)m * NB * Bp + (long)b * Bp, Bp, xscale + mb,
                       xsum + mb);
    });
}

}  // extern "C"

// A layout's zero points: 4 int16 values per tile row and block, ordered as the scales, or, where every
// block of every row shares one zero point (symmetric grids, lookup layouts), 16 copies of it, so that
// a quad's 16 zeros are one load either way and the layout stores 2 bytes per block less.
struct Zeros {
    const int16_t* p;
    bool per_block;
    Zeros tile(int t, int NB) const { return {per_block ? p + (long)t * NB * 4 : p, per_block}; }
    const int16_t* quad(int q) const { return per_block ? p + 16 * q : p; }
    int16_t at(long index) const { return p[per_block ? index : 0]; }
};

// This thread's number in its team and the team's size (0 and 1 in a build without OpenMP).
static inline int thread_slot() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int team_size() {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

// Scalar helpers, shared by the portable path and the decoder.

static inline float half_to_float(uint16_t h) {
#if defined(MP_AVX512_VNNI) || defined(MP_AVX2)
    return _cvtsh_ss(h);  // F16C, exact
#else
    const int exponent = (h >> 10) & 0x1F;
    const int mantissa = h & 0x3FF;
    float v;
    if (exponent == 0) v = ldexpf((float)mantissa, -24);
    else if (exponent == 31) v = mantissa ? NAN : INFINITY;
    else v = ldexpf((float)(mantissa | 0x400), exponent - 25);
    return (h & 0x8000) ? -v : v;
#endif
}

static inline bool half_is_nonfinite(uint16_t h) { return (h & 0x7C00) == 0x7C00; }

// Index of the scale and zero point of row r, block b of tile t: (tile, quad, row, block of the quad).
static inline long scale_index(int t, int NB, int r, int b) { return 4 * ((long)t * NB + b - b % 4) + 4 * r + b % 4; }

// The code in byte k (row k / 16, column 16 * s + k % 16) of step s of the chunk at p.
template <int BITS>
static inline uint8_t code_at(const uint8_t* p, int s, int k) {
    if (BITS == 8) return p[64 * s + k];
    if (BITS == 4) return (p[64 * (s / 2) + k] >> (4 * (s % 2))) & 0x0F;
    uint8_t v = (p[k] >> (2 * s)) & 0x03;
    if (BITS == 3) {
        uint64_t hi;
        memcpy(&hi, p + 64 + 8 * s, 8);
        v |= ((hi >> k) & 1) << 2;
    }
    return v;
}

template <int BITS>
static inline void unpack_chunk_scalar(const uint8_t* p, uint8_t w[4][64]) {
    for (int s = 0; s < 4; ++s)
        for (int k = 0; k < 64; ++k) w[s][k] = code_at<BITS>(p, s, k);
}

// A lookup layout's values: code q of row r becomes the table byte lut[16 r + q] (the tile's table).
static inline void lookup_codes(const uint8_t* lut, uint8_t w[4][64]) {
    for (int s = 0; s < 4; ++s)
        for (int k = 0; k < 64; ++k) w[s][k] = lut[16 * (k / 16) + w[s][k]];
}

#ifdef MP_AVX512_VNNI

template <int BITS>
static inline void unpack_chunk(const uint8_t* p, __m512i w[4]) {
    if constexpr (BITS == 8) {
        for (int s = 0; s < 4; ++s) w[s] = _mm512_loadu_si512(p + 64 * s);
    } else if constexpr (BITS == 4) {
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        const __m512i v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + 64);
        w[0] = _mm512_and_si512(v0, m4);
        w[1] = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4);
        w[2] = _mm512_and_si512(v1, m4);
        w[3] = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
    } else {
        const __m512i m2 = _mm512_set1_epi8(0x03);
        const __m512i v = _mm512_loadu_si512(p);
        w[0] = _mm512_and_si512(v, m2);
        w[1] = _mm512_and_si512(_mm512_srli_epi16(v, 2), m2);
        w[2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m2);
        w[3] = _mm512_and_si512(_mm512_srli_epi16(v, 6), m2);
        if constexpr (BITS == 3) {
            const __m512i four = _mm512_set1_epi8(0x04);
            const uint64_t* hi = reinterpret_cast<const uint64_t*>(p + 64);
            for (int s = 0; s < 4; ++s)
                w[s] = _mm512_or_si512(w[s], _mm512_maskz_mov_epi8(_cvtu64_mask64(hi[s]), four));
        }
    }
}

// One tile of 4 weight rows times MB activation rows, over blocks taken four at a time ("quads").
// Each block accumulates into its own register (independent vpdpbusd chains); at the end of a quad one
// 4x4 transpose-add per 128-bit lane turns the four accumulators into the four block sums of each row,
// so the zero correction, conversion and scaling are one vector operation per quad.
template <int BITS, int MB, bool LUT>
static void tile_kernel(const uint8_t* wt, const uint16_t* wst, Zeros wzt, const uint8_t* lut, int NB,
                        int NBc, int Bp, const int8_t* xq, long xstride, const float* xscale, const int32_t* xsum,
                        float* y, long ystride, int rows) {
    constexpr int CB = chunk_bytes(BITS);
    // lane r of the table: row r's 16 code values (the codes of a lookup layout index it, vpshufb)
    const __m512i tv = LUT ? _mm512_loadu_si512(lut) : _mm512_setzero_si512();
    __m512 yv[MB];
    for (int m = 0; m < MB; ++m) yv[m] = _mm512_setzero_ps();
    for (int q = 0; q < NB / 4; ++q) {
        __m512i acc[MB][4];
        for (int j = 0; j < 4; ++j) {
            const int b = 4 * q + j;
            for (int m = 0; m < MB; ++m) acc[m][j] = _mm512_setzero_si512();
            const BlockCodes bc = block_codes(b, Bp);
            const uint8_t* pb = wt + bc.chunk * CB;
            const int8_t* xb = xq + (long)b * Bp;
            const int chunks = b < NBc ? bc.chunks : 0;  // the quad's empty blocks store no codes
            for (int c = 0; c < chunks; ++c) {
                __m512i w[4];
                prefetch_ahead<CB>(pb + (long)c * CB);
                unpack_chunk<BITS>(pb + (long)c * CB, w);
                if constexpr (LUT)
                    for (int s = 0; s < 4; ++s) w[s] = _mm512_shuffle_epi8(tv, w[s]);
                if (bc.steps == 4) {
#pragma GCC unroll 4
                    for (int s = 0; s < 4; ++s) {
#pragma GCC unroll 4
                        for (int m = 0; m < MB; ++m) {
                            const __m512i xv = _mm512_broadcast_i32x4(
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + m * xstride + c * 64 + s * 16)));
                            acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], w[s], xv);
                        }
                    }
                } else {  // a 32-column block: two steps of its chunk
                    const __m512i step[2] = {bc.step0 ? w[2] : w[0], bc.step0 ? w[3] : w[1]};
#pragma GCC unroll 2
                    for (int s = 0; s < 2; ++s) {
#pragma GCC unroll 4
                        for (int m = 0; m < MB; ++m) {
                            const __m512i xv = _mm512_broadcast_i32x4(
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + m * xstride + s * 16)));
                            acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], step[s], xv);
                        }
                    }
                }
            }
        }
        // Per quad: 16 fp16 scales and 16 int16 zeros, ordered (row, block) = one 128-bit lane per row.
        const __m512i zv = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wzt.quad(q))));
        const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wst + 16 * q)));
        for (int m = 0; m < MB; ++m) {
            const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[m][0], acc[m][1]),
                                                _mm512_unpackhi_epi32(acc[m][0], acc[m][1]));
            const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[m][2], acc[m][3]),
                                                _mm512_unpackhi_epi32(acc[m][2], acc[m][3]));
            // lane r, slot j: the integer sum of block 4q + j for row r, zero point corrected exactly
            __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
            const __m512i xs = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xsum + m * NB + 4 * q)));
            a = _mm512_sub_epi32(a, _mm512_mullo_epi32(zv, xs));
            const __m512 xa = _mm512_broadcast_f32x4(_mm_loadu_ps(xscale + m * NB + 4 * q));
            yv[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(sv, xa), yv[m]);
        }
    }
    for (int m = 0; m < MB; ++m) {
        alignas(64) float t[16];
        _mm512_store_ps(t, yv[m]);
        for (int r = 0; r < rows; ++r) y[m * ystride + r] = (t[4 * r] + t[4 * r + 1]) + (t[4 * r + 2] + t[4 * r + 3]);
    }
}

#elif defined(MP_AVX2)  // AVX2 (e.g. AMD Zen 2/3): the same layout, each 512-bit vector as two halves

// Lookup layouts and 8-bit codes: bytes the AVX2 kernels take as signed values v = value - 128 (see the tile kernel).
template <int BITS, bool LUT>
constexpr bool SIGNED_BYTES = LUT || BITS == 8;

// Half h of a chunk's step s holds rows 2h and 2h+1.
template <int BITS>
static inline void unpack_half(const uint8_t* p, int h, __m256i w[4]) {
    const uint8_t* ph = p + 32 * h;
    if constexpr (BITS == 8) {
        for (int s = 0; s < 4; ++s) w[s] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ph + 64 * s));
    } else if constexpr (BITS == 4) {
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ph));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ph + 64));
        w[0] = _mm256_and_si256(v0, m4);
        w[1] = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
        w[2] = _mm256_and_si256(v1, m4);
        w[3] = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
    } else {
        const __m256i m2 = _mm256_set1_epi8(0x03);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ph));
        for (int s = 0; s < 4; ++s) w[s] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * s), m2);
        if constexpr (BITS == 3) {
            // bit i of the half's 32-bit mask -> byte i: spread mask bytes, test one bit per byte
            const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                    2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
            const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
            const __m256i four = _mm256_set1_epi8(0x04);
            for (int s = 0; s < 4; ++s) {
                uint64_t mask;
                memcpy(&mask, p + 64 + 8 * s, 8);
                const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)(uint32_t)(mask >> (32 * h))), spread);
                const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
                w[s] = _mm256_or_si256(w[s], _mm256_and_si256(set, four));
            }
        }
    }
}

template <int BITS, int MB, bool LUT>
static void tile_kernel(const uint8_t* wt, const uint16_t* wst, Zeros wzt, const uint8_t* lut, int NB,
                        int NBc, int Bp, const int8_t* xq, long xstride, const float* xscale, const int32_t* xsum,
                        float* y, long ystride, int rows) {
    constexpr int CB = chunk_bytes(BITS);
    // Lookup layouts and 8-bit codes take their bytes as signed values v: a lookup layout's table byte
    // level + 128 minus 128, an 8-bit code minus 128. A v meets the activations as
    // vpmaddubsw(|v|, sign(x, v)) = v * x, each pair below 2 * 128 * 127 < 2^15, one step at a time; the
    // zero point is then z - 128 (0 for a codebook's 128). Unsigned codes of up to 4 bits go through
    // vpmaddubsw directly and sum their four steps in 16 bits first (2 * 15 * 127 per pair).
    constexpr bool SIGNED = SIGNED_BYTES<BITS, LUT>;
    const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    // A lookup layout's table as the signed v (half h: rows 2h and 2h+1, one 128-bit lane each, as the
    // halves of a step hold them)
    const __m256i tv[2] = {
        LUT ? _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut)), flip) : _mm256_setzero_si256(),
        LUT ? _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut + 32)), flip) : _mm256_setzero_si256()};
    // half h of the chunk at p, as the arithmetic below takes it (a lookup layout's codes looked up)
    auto unpack_steps = [&](const uint8_t* p, int h, __m256i w[4]) {
        unpack_half<BITS>(p, h, w);
        for (int s = 0; s < 4; ++s) {
            if constexpr (LUT) w[s] = _mm256_shuffle_epi8(tv[h], w[s]);
            if constexpr (BITS == 8) w[s] = _mm256_xor_si256(w[s], flip);
        }
    };
    // STEPS steps of codes w (16 columns each) times the activations from xc on, into acc[m] for row m
    auto accumulate = [&]<int STEPS>(const __m256i* w, const int8_t* xc, __m256i* acc) {
        if constexpr (SIGNED) {
            __m256i magnitude[STEPS];
            for (int s = 0; s < STEPS; ++s) magnitude[s] = _mm256_abs_epi8(w[s]);
#pragma GCC unroll 4
            for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
                for (int s = 0; s < STEPS; ++s) {
                    const __m256i xv = _mm256_broadcastsi128_si256(
                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(xc + m * xstride + s * 16)));
                    const __m256i pairs = _mm256_maddubs_epi16(magnitude[s], _mm256_sign_epi8(xv, w[s]));
                    acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(pairs, ones));
                }
        } else {
#pragma GCC unroll 4
            for (int m = 0; m < MB; ++m) {
                __m256i pairs = _mm256_setzero_si256();
#pragma GCC unroll 4
                for (int s = 0; s < STEPS; ++s) {
                    const __m256i xv = _mm256_broadcastsi128_si256(
                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(xc + m * xstride + s * 16)));
                    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[s], xv));
                }
                acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(pairs, ones));
            }
        }
    };
    // One activation row (GEMV, decode): STEPS steps of both halves' codes w[0], w[1] times the activations
    // from xc on, into acc[h]; each activation step is loaded once for both halves, where a pass per half
    // loads it twice (one row has no other row to share the unpacked codes with, so its cost is the loads).
    auto accumulate_halves = [&]<int STEPS>(const __m256i (*w)[4], const int8_t* xc, __m256i* acc) {
        __m256i pairs[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 4
        for (int s = 0; s < STEPS; ++s) {
            const __m256i xv = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xc + s * 16)));
            for (int h = 0; h < 2; ++h) {
                if constexpr (SIGNED)
                    acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w[h][s]),
                                                                                             _mm256_sign_epi8(xv, w[h][s])),
                                                                        ones));
                else
                    pairs[h] = _mm256_add_epi16(pairs[h], _mm256_maddubs_epi16(w[h][s], xv));
            }
        }
        if constexpr (!SIGNED)
            for (int h = 0; h < 2; ++h) acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(pairs[h], ones));
    };
    __m256 yv[MB][2];
    for (int m = 0; m < MB; ++m) yv[m][0] = yv[m][1] = _mm256_setzero_ps();
    for (int q = 0; q < NB / 4; ++q) {
        // block j's sums of activation row m and half h: lane r, the 8 partial sums of row 2h + r
        alignas(32) __m256i sums[MB][2][4];
        if (Bp == 32) {
            // blocks of 32 (b even): b and b + 1 share chunk b / 2, as its steps 0-1 and 2-3; one unpack
            // serves both, where a pass per block would unpack every chunk twice
            for (int j = 0; j < 4; j += 2) {
                const int b = 4 * q + j;
                const uint8_t* pc = wt + block_codes(b, 32).chunk * CB;
                const int8_t* xb = xq + (long)b * 32;
                for (int h = 0; h < 2; ++h) {
                    __m256i acc[2][MB];
                    for (int m = 0; m < MB; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_si256();
                    if (b < NBc) {  // the quad's empty blocks store no codes
                        if (h == 0) prefetch_ahead<CB>(pc);
                        __m256i w[4];
                        unpack_steps(pc, h, w);
                        accumulate.template operator()<2>(w, xb, acc[0]);
                        if (b + 1 < NBc) accumulate.template operator()<2>(w + 2, xb + 32, acc[1]);
                    }
                    for (int m = 0; m < MB; ++m) {
                        sums[m][h][j] = acc[0][m];
                        sums[m][h][j + 1] = acc[1][m];
                    }
                }
            }
        } else {
            for (int j = 0; j < 4; ++j) {
                const int b = 4 * q + j;
                const BlockCodes bc = block_codes(b, Bp);
                const uint8_t* pb = wt + bc.chunk * CB;
                const int8_t* xb = xq + (long)b * Bp;
                const int chunks = b < NBc ? bc.chunks : 0;  // the quad's empty blocks store no codes
                if constexpr (MB == 1) {
                    __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
                    for (int c = 0; c < chunks; ++c) {
                        prefetch_ahead<CB>(pb + (long)c * CB);
                        __m256i w[2][4];
                        unpack_steps(pb + (long)c * CB, 0, w[0]);
                        unpack_steps(pb + (long)c * CB, 1, w[1]);
                        accumulate_halves.template operator()<4>(w, xb + c * 64, acc);
                    }
                    sums[0][0][j] = acc[0];
                    sums[0][1][j] = acc[1];
                    continue;
                }
                // One half at a time keeps its MB accumulators, its codes and an activation in registers.
                for (int h = 0; h < 2; ++h) {
                    __m256i acc[MB];
                    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_si256();
                    for (int c = 0; c < chunks; ++c) {
                        if (h == 0) prefetch_ahead<CB>(pb + (long)c * CB);
                        __m256i w[4];
                        unpack_steps(pb + (long)c * CB, h, w);
                        accumulate.template operator()<4>(w, xb + c * 64, acc);
                    }
                    for (int m = 0; m < MB; ++m) sums[m][h][j] = acc[m];
                }
            }
        }
        for (int h = 0; h < 2; ++h) {
            __m256i zv = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wzt.quad(q) + 8 * h)));
            if constexpr (SIGNED) zv = _mm256_sub_epi32(zv, _mm256_set1_epi32(128));  // the sums are of v = value - 128
            const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wst + 16 * q + 8 * h)));
            for (int m = 0; m < MB; ++m) {
                // transpose-add: lane r, slot j = the sum of block 4q + j for row 2h + r, as the scales are ordered
                const __m256i* t = sums[m][h];
                const __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(t[0], t[1]), _mm256_unpackhi_epi32(t[0], t[1]));
                const __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(t[2], t[3]), _mm256_unpackhi_epi32(t[2], t[3]));
                __m256i a = _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
                const __m256i xs = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xsum + m * NB + 4 * q)));
                a = _mm256_sub_epi32(a, _mm256_mullo_epi32(zv, xs));
                const __m256 xa = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xscale + m * NB + 4 * q));
                yv[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(sv, xa), yv[m][h]);
            }
        }
    }
    for (int m = 0; m < MB; ++m) {
        alignas(32) float t[16];
        _mm256_store_ps(t, yv[m][0]);
        _mm256_store_ps(t + 8, yv[m][1]);
        for (int r = 0; r < rows; ++r) y[m * ystride + r] = (t[4 * r] + t[4 * r + 1]) + (t[4 * r + 2] + t[4 * r + 3]);
    }
}

#else  // portable path: the same layout and arithmetic, written plainly

template <int BITS, int MB, bool LUT>
static void tile_kernel(const uint8_t* wt, const uint16_t* wst, Zeros wzt, const uint8_t* lut, int NB,
                        int NBc, int Bp, const int8_t* xq, long xstride, const float* xscale, const int32_t* xsum,
                        float* y, long ystride, int rows) {
    const int CB = chunk_bytes(BITS);
    float yv[MB][4] = {};
    for (int b = 0; b < NBc; ++b) {  // the empty blocks after them add nothing
        int32_t acc[MB][4] = {};
        const BlockCodes bc = block_codes(b, Bp);
        for (int c = 0; c < bc.chunks; ++c) {
            uint8_t w[4][64];
            unpack_chunk_scalar<BITS>(wt + (bc.chunk + c) * CB, w);
            if (LUT) lookup_codes(lut, w);
            for (int m = 0; m < MB; ++m) {
                const int8_t* xc = xq + m * xstride + (long)b * Bp + c * 64;
                for (int r = 0; r < 4; ++r) {
                    int32_t s32 = 0;
                    for (int s = 0; s < bc.steps; ++s)
                        for (int i = 0; i < 16; ++i)
                            s32 += (int32_t)w[bc.step0 + s][16 * r + i] * (int32_t)xc[16 * s + i];
                    acc[m][r] += s32;
                }
            }
        }
        const int q = b / 4, j = b % 4;  // scales and zeros of a quad of blocks are ordered (row, block)
        for (int m = 0; m < MB; ++m)
            for (int r = 0; r < 4; ++r)
                yv[m][r] += (float)(acc[m][r] - wzt.quad(q)[4 * r + j] * xsum[m * NB + b]) *
                            (half_to_float(wst[16 * q + 4 * r + j]) * xscale[m * NB + b]);
    }
    for (int m = 0; m < MB; ++m)
        for (int r = 0; r < rows; ++r) y[m * ystride + r] = yv[m][r];
}

#endif

// The codes of one chunk as bytes, codes[s][16 * r + i] for row r, column 16 * s + i (what
// unpack_chunk_scalar gives), unpacked with the widest vectors compiled in; a lookup layout's tile
// table `lut` (or null) turns them into their values, as in the kernels.
template <int BITS>
static inline void unpack_codes(const uint8_t* p, const uint8_t* lut, uint8_t codes[4][64]) {
#if defined(MP_AVX512_VNNI)
    __m512i w[4];
    unpack_chunk<BITS>(p, w);
    const __m512i tv = lut ? _mm512_loadu_si512(lut) : _mm512_setzero_si512();
    for (int s = 0; s < 4; ++s) _mm512_storeu_si512(codes[s], lut ? _mm512_shuffle_epi8(tv, w[s]) : w[s]);
#elif defined(MP_AVX2)
    for (int h = 0; h < 2; ++h) {
        __m256i w[4];
        unpack_half<BITS>(p, h, w);
        const __m256i tv = lut ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut + 32 * h)) : _mm256_setzero_si256();
        for (int s = 0; s < 4; ++s)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes[s] + 32 * h), lut ? _mm256_shuffle_epi8(tv, w[s]) : w[s]);
    }
#else
    unpack_chunk_scalar<BITS>(p, codes);
    if (lut) lookup_codes(lut, codes);
#endif
}

#if defined(MP_AVX512_VNNI) || defined(MP_AVX2)
// Batched paths (many activation rows): the codes of a group of tiles (16 weight rows on AVX-512, 8 on
// AVX2) rearranged once per panel of activation rows so that 32-bit element r of a vector is 4
// consecutive columns of row r. One multiply-add against 4 broadcast activation bytes (vpdpbusd; AVX2:
// vpmaddubsw + vpmaddwd) then gives each row's sum in its own element: no horizontal sums, and the scales
// of the group's rows apply as one vector per block, where the tile layout (one row per 128-bit lane)
// pays a transpose-add per quad and activation row. Rearranging costs a pass over the group's codes,
// which MP_REPACK_MIN_ROWS activation rows and more repay, on groups of up to MP_REPACK_MAX_BYTES of codes.
// Measured on a Zen 3 EPYC (AVX2): about level with the tile kernel at 8 rows and faster from 16 on, for
// rows of up to 2048 columns; slower at 4096 columns (a pair's 32 KB of codes and the rows it meets no
// longer share L1). On a Zen 5 EPYC (AVX-512): 1.1-2.8x the speed of decoding to bf16 and torch's bf16
// matmul at 128 rows, for 576- to 8192-wide rows (a group of 8192 columns, 128 KB, stays in L2).
#ifndef MP_REPACK_MIN_ROWS
#define MP_REPACK_MIN_ROWS 16
#endif
#ifndef MP_REPACK_MAX_BYTES
#ifdef MP_AVX512_VNNI
#define MP_REPACK_MAX_BYTES 131072
#else
#define MP_REPACK_MAX_BYTES 16384
#endif
#endif

// A group's codes as bytes (on AVX2 signed values for lookup layouts and 8-bit codes, as in its tile
// kernel): block b, column quad k, row r at 4 GROUP_ROWS (b Bp / 4 + k) + 4 r; scales and zero points per
// (block, row).
struct RepackedGroup {
    uint8_t* codes;
    float* scales;
    int32_t* zeros;
};
#endif

#ifdef MP_AVX512_VNNI
constexpr int GROUP_TILES = 4, GROUP_RUN = 8;  // tiles per group; activation rows per kernel call
constexpr int GROUP_ROWS = 4 * GROUP_TILES;

template <int BITS, bool LUT>
static void repack_group(const uint8_t* w, const uint16_t* ws, Zeros wz, const uint8_t* lut, long lut_stride,
                         int T, int group, int NB, int NBc, int Bp, long tile_bytes, const RepackedGroup& out) {
    constexpr int CB = chunk_bytes(BITS);
    const long quads = (long)Bp / 4;
    // within one step of a tile: dword 4 r + j (row r, column quad j) to 4 j + r
    const __m512i by_quad = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int b = 0; b < NBc; ++b) {
        const BlockCodes bc = block_codes(b, Bp);
        for (int c = 0; c < bc.chunks; ++c) {
            __m512i v[GROUP_TILES][4];  // [tile][step]; a missing last tile is zeros
            for (int i = 0; i < GROUP_TILES; ++i) {
                const int t = GROUP_TILES * group + i;
                if (t >= T) {
                    for (int st = 0; st < 4; ++st) v[i][st] = _mm512_setzero_si512();
                    continue;
                }
                unpack_chunk<BITS>(w + t * tile_bytes + (bc.chunk + c) * CB, v[i]);
                if constexpr (LUT) {
                    const __m512i tv = _mm512_loadu_si512(lut + t * lut_stride);
                    for (int st = 0; st < 4; ++st) v[i][st] = _mm512_shuffle_epi8(tv, v[i][st]);
                }
            }
            for (int st = 0; st < bc.steps; ++st) {
                const int step = bc.step0 + st;
                // lane j of a[i]: column quad j of tile i's 4 rows; then a 4x4 transpose of 128-bit lanes
                // puts column quad j of all 16 rows in one vector
                __m512i a[GROUP_TILES];
                for (int i = 0; i < GROUP_TILES; ++i) a[i] = _mm512_permutexvar_epi32(by_quad, v[i][step]);
                const __m512i t0 = _mm512_shuffle_i32x4(a[0], a[1], 0x44), t1 = _mm512_shuffle_i32x4(a[0], a[1], 0xEE);
                const __m512i t2 = _mm512_shuffle_i32x4(a[2], a[3], 0x44), t3 = _mm512_shuffle_i32x4(a[2], a[3], 0xEE);
                __m512i* o = reinterpret_cast<__m512i*>(out.codes + 64 * (b * quads + 16 * c + 4 * st));
                _mm512_store_si512(o, _mm512_shuffle_i32x4(t0, t2, 0x88));
                _mm512_store_si512(o + 1, _mm512_shuffle_i32x4(t0, t2, 0xDD));
                _mm512_store_si512(o + 2, _mm512_shuffle_i32x4(t1, t3, 0x88));
                _mm512_store_si512(o + 3, _mm512_shuffle_i32x4(t1, t3, 0xDD));
            }
        }
        for (int i = 0; i < GROUP_TILES; ++i)
            for (int r = 0; r < 4; ++r) {
                const int t = GROUP_TILES * group + i;
                const long at = scale_index(t, NB, r, b);
                out.scales[GROUP_ROWS * b + 4 * i + r] = t < T ? half_to_float(ws[at]) : 0.f;
                out.zeros[GROUP_ROWS * b + 4 * i + r] = t < T ? wz.at(at) : 0;
            }
    }
}

// MB activation rows times a repacked group: y[m * ystride + r] for the group's `rows` rows.
template <int BITS, int MB, bool LUT>
static void group_kernel(const RepackedGroup& wg, int NBc, int Bp, int NB, const int8_t* xq, long xstride,
                         const float* xscale, const int32_t* xsum, float* y, long ystride, int rows) {
    const int quads = Bp / 4;
    __m512 yv[MB];
    for (int m = 0; m < MB; ++m) yv[m] = _mm512_setzero_ps();
    for (int b = 0; b < NBc; ++b) {
        const uint8_t* wb = wg.codes + 64L * b * quads;
        const int8_t* xb = xq + (long)b * Bp;
        __m512i acc[MB];
        for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_si512();
        for (int k = 0; k < quads; ++k) {
            const __m512i wv = _mm512_load_si512(wb + 64 * k);
#pragma GCC unroll 8
            for (int m = 0; m < MB; ++m) {
                int32_t x4;
                memcpy(&x4, xb + m * xstride + 4 * k, 4);
                acc[m] = _mm512_dpbusd_epi32(acc[m], wv, _mm512_set1_epi32(x4));
            }
        }
        const __m512 sv = _mm512_load_ps(wg.scales + GROUP_ROWS * b);
        const __m512i zv = _mm512_load_si512(wg.zeros + GROUP_ROWS * b);
        for (int m = 0; m < MB; ++m) {
            const __m512i a = _mm512_sub_epi32(acc[m], _mm512_mullo_epi32(zv, _mm512_set1_epi32(xsum[m * NB + b])));
            yv[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(sv, _mm512_set1_ps(xscale[m * NB + b])), yv[m]);
        }
    }
    const __mmask16 keep = (__mmask16)((1u << rows) - 1);
    for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(y + m * ystride, keep, yv[m]);
}
#endif

#ifdef MP_AVX2
constexpr int GROUP_TILES = 2, GROUP_RUN = 4;
constexpr int GROUP_ROWS = 4 * GROUP_TILES;

// The 64 columns of one chunk of tile t as rows-in-elements vectors: lo[s] = column quads 4s and 4s + 1
// (one 128-bit lane each, element r of a lane = row r's 4 bytes), hi[s] = quads 4s + 2 and 4s + 3.
template <int BITS, bool LUT>
static inline void chunk_quads(const uint8_t* p, const uint8_t* tile_lut, __m256i lo[4], __m256i hi[4]) {
    constexpr bool SIGNED = SIGNED_BYTES<BITS, LUT>;
    const __m256i flip = _mm256_set1_epi8((char)0x80), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i half[2][4];  // half h: rows 2h (low lane) and 2h + 1 (high lane), 16 columns per step
    for (int h = 0; h < 2; ++h) {
        unpack_half<BITS>(p, h, half[h]);
        const __m256i tv = LUT ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile_lut + 32 * h)) : _mm256_setzero_si256();
        for (int s = 0; s < 4; ++s) {
            if constexpr (LUT) half[h][s] = _mm256_shuffle_epi8(tv, half[h][s]);
            if constexpr (SIGNED) half[h][s] = _mm256_xor_si256(half[h][s], flip);
        }
    }
    for (int s = 0; s < 4; ++s) {
        // words (row, quad): the low lanes hold rows 0 and 2, the high ones rows 1 and 3; the permutation
        // puts rows 0..3 of one quad in one lane
        lo[s] = _mm256_permutevar8x32_epi32(_mm256_unpacklo_epi32(half[0][s], half[1][s]), order);
        hi[s] = _mm256_permutevar8x32_epi32(_mm256_unpackhi_epi32(half[0][s], half[1][s]), order);
    }
}

template <int BITS, bool LUT>
static void repack_group(const uint8_t* w, const uint16_t* ws, Zeros wz, const uint8_t* lut, long lut_stride,
                        int T, int group, int NB, int NBc, int Bp, long tile_bytes, const RepackedGroup& out) {
    constexpr bool SIGNED = SIGNED_BYTES<BITS, LUT>;
    constexpr int CB = chunk_bytes(BITS);
    const long quads = (long)Bp / 4;
    const int ta = 2 * group, tb = 2 * group + 1;  // an odd tile count: the last pair's second tile is empty
    for (int b = 0; b < NBc; ++b) {
        const BlockCodes bc = block_codes(b, Bp);
        for (int c = 0; c < bc.chunks; ++c) {
            __m256i alo[4], ahi[4], blo[4], bhi[4];
            chunk_quads<BITS, LUT>(w + ta * tile_bytes + (bc.chunk + c) * CB, LUT ? lut + ta * lut_stride : nullptr, alo, ahi);
            if (tb < T)
                chunk_quads<BITS, LUT>(w + tb * tile_bytes + (bc.chunk + c) * CB, LUT ? lut + tb * lut_stride : nullptr, blo, bhi);
            else
                for (int s = 0; s < 4; ++s) blo[s] = bhi[s] = _mm256_setzero_si256();
            for (int s = 0; s < bc.steps; ++s) {
                const int step = bc.step0 + s;
                __m256i* o = reinterpret_cast<__m256i*>(out.codes + 32 * (b * quads + 16 * c + 4 * s));
                _mm256_store_si256(o, _mm256_permute2x128_si256(alo[step], blo[step], 0x20));
                _mm256_store_si256(o + 1, _mm256_permute2x128_si256(alo[step], blo[step], 0x31));
                _mm256_store_si256(o + 2, _mm256_permute2x128_si256(ahi[step], bhi[step], 0x20));
                _mm256_store_si256(o + 3, _mm256_permute2x128_si256(ahi[step], bhi[step], 0x31));
            }
        }
        for (int half = 0; half < 2; ++half)
            for (int r = 0; r < 4; ++r) {
                const int t = 2 * group + half;
                const long at = scale_index(t, NB, r, b);
                out.scales[8 * b + 4 * half + r] = t < T ? half_to_float(ws[at]) : 0.f;
                out.zeros[8 * b + 4 * half + r] = t < T ? wz.at(at) - (SIGNED ? 128 : 0) : 0;  // sums of v = value - 128
            }
    }
}

// MB activation rows times a repacked pair of tiles: y[m * ystride + r] for the pair's `rows` rows.
template <int BITS, int MB, bool LUT>
static void group_kernel(const RepackedGroup& wp, int NBc, int Bp, int NB, const int8_t* xq, long xstride,
                        const float* xscale, const int32_t* xsum, float* y, long ystride, int rows) {
    constexpr bool SIGNED = SIGNED_BYTES<BITS, LUT>;
    // column quads whose unsigned 16-bit sums fit in 2^15 (each pair at most 2 * (2^BITS - 1) * 127)
    constexpr int FLUSH = SIGNED ? 1 : 32767 / (2 * ((1 << BITS) - 1) * 127);
    const int quads = Bp / 4;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 yv[MB];
    for (int m = 0; m < MB; ++m) yv[m] = _mm256_setzero_ps();
    for (int b = 0; b < NBc; ++b) {
        const uint8_t* wb = wp.codes + 32L * b * quads;
        const int8_t* xb = xq + (long)b * Bp;
        __m256i acc[MB], pairs[MB];
        for (int m = 0; m < MB; ++m) acc[m] = pairs[m] = _mm256_setzero_si256();
        for (int k = 0; k < quads; ++k) {
            const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + 32 * k));
            if constexpr (SIGNED) {
                const __m256i magnitude = _mm256_abs_epi8(wv);
#pragma GCC unroll 4
                for (int m = 0; m < MB; ++m) {
                    int32_t x4;
                    memcpy(&x4, xb + m * xstride + 4 * k, 4);
                    const __m256i p = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(_mm256_set1_epi32(x4), wv));
                    acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(p, ones));
                }
            } else {
#pragma GCC unroll 4
                for (int m = 0; m < MB; ++m) {
                    int32_t x4;
                    memcpy(&x4, xb + m * xstride + 4 * k, 4);
                    pairs[m] = _mm256_add_epi16(pairs[m], _mm256_maddubs_epi16(wv, _mm256_set1_epi32(x4)));
                }
                if ((k + 1) % FLUSH == 0 || k + 1 == quads)
                    for (int m = 0; m < MB; ++m) {
                        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(pairs[m], ones));
                        pairs[m] = _mm256_setzero_si256();
                    }
            }
        }
        const __m256 sv = _mm256_load_ps(wp.scales + 8 * b);
        const __m256i zv = _mm256_load_si256(reinterpret_cast<const __m256i*>(wp.zeros + 8 * b));
        for (int m = 0; m < MB; ++m) {
            const __m256i a = _mm256_sub_epi32(acc[m], _mm256_mullo_epi32(zv, _mm256_set1_epi32(xsum[m * NB + b])));
            yv[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(sv, _mm256_set1_ps(xscale[m * NB + b])), yv[m]);
        }
    }
    for (int m = 0; m < MB; ++m) {
        alignas(32) float t[8];
        _mm256_store_ps(t, yv[m]);
        for (int r = 0; r < rows; ++r) y[m * ystride + r] = t[r];
    }
}

#endif

#if defined(MP_AVX512_VNNI) || defined(MP_AVX2)
// Returns false, having computed nothing, when the per-thread buffers cannot be had.
template <int BITS, bool LUT>
static bool gemm_repacked(const uint8_t* w, const uint16_t* ws, Zeros wz, const uint8_t* lut, long lut_stride,
                          int T, int NB, int NBc, int Bp, const int8_t* xq, const float* xscale, const int32_t* xsum,
                          int M, float* y, int N, int nthreads, long panel) {
    const long tile_bytes = chunks_of(NBc, Bp) * chunk_bytes(BITS);
    const long xstride = (long)NB * Bp;
    const int groups = (T + GROUP_TILES - 1) / GROUP_TILES;
    const long panels = (M + panel - 1) / panel, work = panels * groups;
    // one group's rearranged codes, scales and zeros per thread (a few KB to tens of KB: L1 / L2), whole
    // cache lines
    const size_t code_bytes = (size_t)NBc * Bp * GROUP_ROWS, side_bytes = (size_t)NBc * GROUP_ROWS * 4,
                 thread_bytes = (code_bytes + 2 * side_bytes + 63) / 64 * 64;
    uint8_t* buffers = static_cast<uint8_t*>(aligned_alloc(64, thread_bytes * nthreads));
    if (!buffers) return false;
#pragma omp parallel num_threads(nthreads)
    {
        uint8_t* buffer = buffers + thread_bytes * thread_slot();
        const RepackedGroup wg{buffer, reinterpret_cast<float*>(buffer + code_bytes),
                               reinterpret_cast<int32_t*>(buffer + code_bytes + side_bytes)};
        int repacked = -1;
#pragma omp for schedule(static)
        for (long i = 0; i < work; ++i) {
            const int group = (int)(i % groups);
            const long m0 = i / groups * panel, m1 = m0 + panel < M ? m0 + panel : M;
            if (group != repacked) {
                repack_group<BITS, LUT>(w, ws, wz, lut, lut_stride, T, group, NB, NBc, Bp, tile_bytes, wg);
                repacked = group;
            }
            const int rows = N - GROUP_ROWS * group < GROUP_ROWS ? N - GROUP_ROWS * group : GROUP_ROWS;
            float* yg = y + GROUP_ROWS * group;
            long m = m0;
            for (; m + GROUP_RUN <= m1; m += GROUP_RUN)
                group_kernel<BITS, GROUP_RUN, LUT>(wg, NBc, Bp, NB, xq + m * xstride, xstride, xscale + m * NB,
                                                   xsum + m * NB, yg + m * N, N, rows);
            for (; m < m1; ++m)
                group_kernel<BITS, 1, LUT>(wg, NBc, Bp, NB, xq + m * xstride, xstride, xscale + m * NB, xsum + m * NB,
                                           yg + m * N, N, rows);
        }
    }
    free(buffers);
    return true;
}
#endif

#ifndef MP_PANEL_BYTES
#define MP_PANEL_BYTES (96 * 1024)
#endif

// Activation rows per panel: as many as `bytes` of int8 activations hold, a multiple of 4, 4 to M.
static inline long panel_rows(long bytes, long xstride, int M) {
    const long rows = bytes / xstride / 4 * 4;
    return rows < 4 ? 4 : rows > M ? M : rows;
}

// Activation rows [m0, m1) times tile t, in runs of 4, then 2, 1: each run reuses the tile's unpacked codes.
template <int BITS, bool LUT>
static inline void tile_times_rows(const uint8_t* w, const uint16_t* ws, Zeros wz, const uint8_t* lut,
                                   long lut_stride, int t, int NB, int NBc, int Bp, const int8_t* xq,
                                   const float* xscale, const int32_t* xsum, long m0, long m1, float* y, int N) {
    const long tile_bytes = chunks_of(NBc, Bp) * chunk_bytes(BITS), xstride = (long)NB * Bp;
    const uint8_t* wt = w + t * tile_bytes;
    const uint16_t* wst = ws + (long)t * NB * 4;
    const Zeros wzt = wz.tile(t, NB);
    const uint8_t* lutt = LUT ? lut + t * lut_stride : nullptr;
    const int rows = tile_rows(t, N);
    long m = m0;
    for (; m + 4 <= m1; m += 4)
        tile_kernel<BITS, 4, LUT>(wt, wst, wzt, lutt, NB, NBc, Bp, xq + m * xstride, xstride, xscale + m * NB,
                                  xsum + m * NB, y + m * N + 4 * t, N, rows);
    for (; m + 2 <= m1; m += 2)
        tile_kernel<BITS, 2, LUT>(wt, wst, wzt, lutt, NB, NBc, Bp, xq + m * xstride, xstride, xscale + m * NB,
                                  xsum + m * NB, y + m * N + 4 * t, N, rows);
    for (; m < m1; ++m)
        tile_kernel<BITS, 1, LUT>(wt, wst, wzt, lutt, NB, NBc, Bp, xq + m * xstride, xstride, xscale + m * NB,
                                  xsum + m * NB, y + m * N + 4 * t, N, rows);
}

template <int BITS, bool LUT>
static void gemm_bits(const uint8_t* w, const uint16_t* ws, Zeros wz, const uint8_t* lut, long lut_stride,
                      int T, int NB, int NBc, int Bp, const int8_t* xq, const float* xscale, const int32_t* xsum,
                      int M, float* y, int N, int nthreads) {
    const long tile_bytes = chunks_of(NBc, Bp) * chunk_bytes(BITS);
    const long xstride = (long)NB * Bp;
    // Activation rows in panels of up to MP_PANEL_BYTES of int8 activations (a multiple of 4 rows), each
    // panel multiplied by every tile before the next: a panel stays in the core's L2 cache while the
    // tiles stream past it, where a pass of every row per tile would read all activations from the last
    // level cache or memory once per 4 weight rows.
#if defined(MP_AVX512_VNNI) || defined(MP_AVX2)
    // panels of up to 2 MP_PANEL_BYTES here: each rearranged group is then reused by more rows
    if (M >= MP_REPACK_MIN_ROWS && (long)NBc * Bp * GROUP_ROWS <= MP_REPACK_MAX_BYTES &&
        gemm_repacked<BITS, LUT>(w, ws, wz, lut, lut_stride, T, NB, NBc, Bp, xq, xscale, xsum, M, y, N, nthreads,
                                 panel_rows(2 * MP_PANEL_BYTES, xstride, M)))
        return;
#endif
    const long panel = panel_rows(MP_PANEL_BYTES, xstride, M);
    const long panels = (M + panel - 1) / panel, work = panels * T;
    // Threads only for more than a few microseconds of work: waking them costs more on small matrices.
    for_each_index(work, nthreads, (long)T * tile_bytes * M > (1 << 15), [&](long i) {
        const long m0 = i / T * panel, m1 = m0 + panel < M ? m0 + panel : M;
        tile_times_rows<BITS, LUT>(w, ws, wz, lut, lut_stride, (int)(i % T), NB, NBc, Bp, xq, xscale, xsum, m0, m1, y, N);
    });
}

// Recompute in fp32 every output y[m, n] that a non-finite value reaches: over the blocks b where the
// activations of row m hold one (xscale NaN) or, when `scales_nonfinite`, where row n's scale is NaN or
// infinite. Such a block's sum is NaN or infinite, and finite blocks cannot change that, so the sum over
// these blocks alone is the NaN or signed infinity of x @ W^T. Over tiles [t0, t1): the decoder's
// threads each fix their own share.
template <int BITS>
static void fix_nonfinite(const uint8_t* w, const uint16_t* ws, Zeros wz, const uint8_t* lut,
                          long lut_stride, int t0, int t1, int NB, int Bp,
                          const float* x, int M, int K, int G, int sub, int Bo, const float* xscale,
                          bool scales_nonfinite, float* y, int N, int nthreads) {
    const long total = (long)M * NB;
    bool any = scales_nonfinite;
    for (long mb = 0; mb < total && !any; ++mb) any = xscale[mb] != xscale[mb];
    if (!any) return;
    const int CB = chunk_bytes(BITS);
    const long tile_bytes = code_chunks(K, G, sub, Bp) * CB;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic)
    for (int t = t0; t < t1; ++t) {
        const int rows = tile_rows(t, N);
        for (int r = 0; r < rows; ++r)
            for (int m = 0; m < M; ++m) {
                float sum = 0.f;
                bool reached = false;
                for (int b = 0; b < code_blocks(K, G, sub); ++b) {
                    const long at = scale_index(t, NB, r, b);
                    const float a = xscale[(long)m * NB + b];
                    if (a == a && !(scales_nonfinite && half_is_nonfinite(ws[at]))) continue;
                    reached = true;
                    int start, cols;
                    block_columns(b, K, G, sub, Bo, &start, &cols);
                    const float scale = half_to_float(ws[at]);
                    const BlockCodes bc = block_codes(b, Bp);
                    const uint8_t* pb = w + t * tile_bytes + bc.chunk * CB;
                    for (int i = 0; i < cols; ++i) {
                        const int k = 16 * bc.step0 + i;  // the column's place in its chunks
                        int code = code_at<BITS>(pb + (k / 64) * CB, (k % 64) / 16, 16 * r + k % 16);
                        if (lut) code = lut[t * lut_stride + 16 * r + code];
                        sum += (float)(code - wz.at(at)) * scale * x[(long)m * K + start + i];
                    }
                }
                if (reached) y[(long)m * N + 4 * t + r] = sum;
            }
    }
}

struct MatmulArgs {
    const uint8_t* w; const uint16_t* ws; Zeros wz; const uint8_t* lut; long lut_stride; int T, NB, Bp;
    const float* x; int M, K, G, sub, Bo;
    const int8_t* xq; const float* xscale; const int32_t* xsum;
    float* y; int N; bool scales_nonfinite; int nthreads;
};

template <int BITS, bool LUT>
static void matmul_bits(const MatmulArgs& a) {
    gemm_bits<BITS, LUT>(a.w, a.ws, a.wz, a.lut, a.lut_stride, a.T, a.NB, code_blocks(a.K, a.G, a.sub), a.Bp, a.xq,
                         a.xscale, a.xsum, a.M, a.y, a.N, a.nthreads);
    fix_nonfinite<BITS>(a.w, a.ws, a.wz, a.lut, a.lut_stride, 0, a.T, a.NB, a.Bp, a.x, a.M, a.K, a.G, a.sub, a.Bo,
                        a.xscale, a.scales_nonfinite, a.y, a.N, a.nthreads);
}

extern "C" {

// y (M, N) = x (M, K) @ W^T for a packed layout of T = ceil(N / 4) tiles, block geometry as in
// mp_quantize; `scales_nonfinite` says whether a scale of the layout is NaN or infinite. A lookup layout
// (codebooks) passes `lut`: per tile, 64 bytes, lane r holding the 16 values that row r's codes of up to
// 4 bits stand for (W = (lut[r][q] - z) * s), `lut_stride` bytes apart (0: one table for every tile);
// otherwise lut is null. Returns 0, -1 when `bits` has no layout, -2 when scratch memory is short.
int mp_matmul(int bits, const uint8_t* w, const uint16_t* ws, Zeros wz, const uint8_t* lut, long lut_stride,
              int T, int NB, int Bp, const float* x, int M, int K, int G, int sub, int Bo, float* y, int N,
              int scales_nonfinite, int nthreads) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return -1;
    if (lut && bits == 8) return -1;
    const size_t nq = (size_t)M * NB * Bp, ns = (size_t)M * NB;
    char* scratch = static_cast<char*>(malloc(nq + 8 * ns + 64));
    if (!scratch) return -2;
    int8_t* xq = reinterpret_cast<int8_t*>(scratch);
    float* xscale = reinterpret_cast<float*>(scratch + ((nq + 63) & ~(size_t)63));
    int32_t* xsum = reinterpret_cast<int32_t*>(xscale + ns);
    mp_quantize(x, M, K, G, sub, Bo, Bp, NB, xq, xscale, xsum, nthreads);
    const MatmulArgs a{w, ws, wz, lut, lut_stride, T, NB, Bp, x, M, K, G, sub, Bo, xq, xscale, xsum, y, N,
                       scales_nonfinite != 0, nthreads};
    switch (bits + (lut ? 100 : 0)) {
        case 2: matmul_bits<2, false>(a); break;
        case 3: matmul_bits<3, false>(a); break;
        case 4: matmul_bits<4, false>(a); break;
        case 8: matmul_bits<8, false>(a); break;
        case 102: matmul_bits<2, true>(a); break;
        case 103: matmul_bits<3, true>(a); break;
        case 104: matmul_bits<4, true>(a); break;
    }
    free(scratch);
    return 0;
}

}  // extern "C"

// Round to nearest even as torch's conversion does; a NaN stays a (quiet) NaN, infinities stay as they are.
static inline uint16_t float_to_bf16(float v) {
    if (v != v) return 0x7FC0;
    uint32_t u;
    memcpy(&u, &v, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// o[i] = bf16((q[i] - zero) * scale) for the n <= 16 codes of one row in one step.
static inline void step_to_bf16(const uint8_t* q, int zero, float scale, uint16_t* o, int n) {
#if defined(MP_AVX512_VNNI)
    if (n == 16) {  // the same products and rounding as float_to_bf16, 16 at a time
        const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(codes, _mm512_set1_epi32(zero))),
                                       _mm512_set1_ps(scale));
        const __m512i u = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtepi32_epi16(r));
        return;
    }
#endif
    for (int i = 0; i < n; ++i) o[i] = float_to_bf16((float)(q[i] - zero) * scale);
}

template <int BITS>
static void decode_bits(const uint8_t* w, const uint16_t* ws, Zeros wz, const uint8_t* lut, long lut_stride,
                        int T, int NB, int Bp, int K, int G, int sub, int Bo, uint16_t* out, int N, int nthreads) {
    const int CB = chunk_bytes(BITS);
    const long tile_bytes = code_chunks(K, G, sub, Bp) * CB;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int t = 0; t < T; ++t) {
        const int rows = tile_rows(t, N);
        for (int b = 0; b < code_blocks(K, G, sub); ++b) {
            int start, cols;
            block_columns(b, K, G, sub, Bo, &start, &cols);
            const BlockCodes bc = block_codes(b, Bp);
            for (int c = 0; c < bc.chunks && 64 * c < cols; ++c) {
                uint8_t codes[4][64];
                unpack_codes<BITS>(w + t * tile_bytes + (bc.chunk + c) * CB, lut ? lut + t * lut_stride : nullptr, codes);
                for (int r = 0; r < rows; ++r) {
                    const long at = scale_index(t, NB, r, b);
                    const float scale = half_to_float(ws[at]);
                    const int zero = wz.at(at);
                    uint16_t* o = out + (long)(4 * t + r) * K + start + 64 * c;
                    const int n = cols - 64 * c < 64 ? cols - 64 * c : 64;
                    for (int s = 0; s < bc.steps && 16 * s < n; ++s)
                        step_to_bf16(codes[bc.step0 + s] + 16 * r, zero, scale, o + 16 * s, n - 16 * s < 16 ? n - 16 * s : 16);
                }
            }
        }
    }
}

extern "C" {

// The weights of a packed layout as a dense (N, K) bf16 matrix (bit patterns), for large batches where
// a bf16 matrix multiply beats the integer kernel; returns -1 when `bits` has no layout.
int mp_decode_bf16(int bits, const uint8_t* w, const uint16_t* ws, Zeros wz, const uint8_t* lut,
                   long lut_stride, int T, int NB, int Bp, int K, int G, int sub, int Bo, uint16_t* out, int N,
                   int nthreads) {
    if (lut && bits == 8) return -1;
    switch (bits) {
        case 2: decode_bits<2>(w, ws, wz, lut, lut_stride, T, NB, Bp, K, G, sub, Bo, out, N, nthreads); return 0;
        case 3: decode_bits<3>(w, ws, wz, lut, lut_stride, T, NB, Bp, K, G, sub, Bo, out, N, nthreads); return 0;
        case 4: decode_bits<4>(w, ws, wz, lut, lut_stride, T, NB, Bp, K, G, sub, Bo, out, N, nthreads); return 0;
        case 8: decode_bits<8>(w, ws, wz, lut, lut_stride, T, NB, Bp, K, G, sub, Bo, out, N, nthreads); return 0;
        default: return -1;
    }
}

}  // extern "C"

// ---- PyTorch custom operators ------------------------------------------------------------------------
// Registered at run time into a namespace Python chooses (mp_register_ops), not by a static initializer:
// several builds of this file (other instruction sets, for tests) can live in one process, each under its
// own namespace, and a registration that fails returns an error instead of terminating the process.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>
#include <string>
#include <utility>

// A layout's geometry as the operators and DecodePlan take it: GEOMETRY_VALUES integers per layout, in
// this order (LowbitLayout.operator_geometry builds them). One list, not a dozen scalar arguments: each
// argument of an operator call costs a fraction of a microsecond to convert.
constexpr int GEOMETRY_VALUES = 9;
struct Geometry {
    int64_t bits, n_blocks, padded, in_features, group, sub, width, out_features, scales_nonfinite;
    static Geometry of(const int64_t* g) { return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8]}; }
};

static Geometry geometry_of(at::IntArrayRef geometry) {
    TORCH_CHECK(geometry.size() == GEOMETRY_VALUES, "low-bit kernel: the geometry is ", GEOMETRY_VALUES,
                " integers (bits, n_blocks, padded, in_features, group, sub, width, out_features, scales_nonfinite), not ",
                geometry.size());
    return Geometry::of(geometry.data());
}

static void check_layout(const Geometry& g, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros) {
    const int64_t bits = g.bits, n_blocks = g.n_blocks, padded = g.padded, in_features = g.in_features,
                  group = g.group, sub = g.sub, out_features = g.out_features;
    TORCH_CHECK(group > 0 && sub > 0 && in_features > 0 && g.width > 0 && out_features > 0 &&
                    (padded == 32 || (padded > 0 && padded % 64 == 0)),
                "low-bit kernel: group, sub, width, in_features and out_features must be positive, padded 32 or a "
                "multiple of 64");
    const int64_t stored = code_blocks((int)in_features, (int)group, (int)sub);
    TORCH_CHECK(stored <= n_blocks && n_blocks % 4 == 0, "low-bit kernel: ", n_blocks,
                " blocks (a multiple of 4) cannot hold the ", stored, " blocks of ", in_features, " columns");
    TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "low-bit kernel: no layout for ", bits,
                " bits (2, 3, 4 or 8)");
    TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                    codes.dim() == 2 && codes.size(0) == (out_features + 3) / 4,
                "low-bit kernel: codes must be a contiguous uint8 CPU tensor of one row per 4-row tile");
    const int64_t needed = code_chunks((int)in_features, (int)group, (int)sub, (int)padded) * chunk_bytes((int)bits);
    TORCH_CHECK(codes.size(1) == needed, "low-bit kernel: codes hold ", codes.size(1), " bytes per tile, the geometry needs ",
                needed);
    TORCH_CHECK(scales.scalar_type() == at::kHalf && zeros.scalar_type() == at::kShort && scales.is_contiguous() &&
                    zeros.is_contiguous() && scales.numel() == codes.size(0) * n_blocks * 4 &&
                    (zeros.numel() == scales.numel() || zeros.numel() == 16),
                "low-bit kernel: scales (float16) must hold 4 contiguous values per tile row and block, zeros "
                "(int16) as many or 16 copies of one shared zero point");
    if (zeros.numel() != scales.numel()) {
        const int16_t* z = zeros.data_ptr<int16_t>();
        TORCH_CHECK(std::all_of(z, z + 16, [z](int16_t v) { return v == z[0]; }),
                    "low-bit kernel: a shared zero point must be 16 copies of one value");
    }
}

// The layout's zero points as the kernels take them (check_layout has checked them).
static Zeros zeros_of(const at::Tensor& zeros, const at::Tensor& scales) {
    return {zeros.data_ptr<int16_t>(), zeros.numel() == scales.numel()};
}

// A lookup layout's tables (uint8, one row of 64 bytes for every tile or one for all), or none (an
// undefined or empty tensor): the pointer and per-tile stride mp_matmul takes.
struct Lookup {
    const uint8_t* lut;
    long stride;
};
static Lookup lookup_of(const at::Tensor& levels, int64_t bits, const at::Tensor& codes) {
    if (!levels.defined() || levels.numel() == 0) return {nullptr, 0};
    TORCH_CHECK(bits <= 4, "low-bit kernel: lookup tables are for codes of up to 4 bits, not ", bits);
    TORCH_CHECK(levels.device().is_cpu() && levels.scalar_type() == at::kByte && levels.is_contiguous() &&
                    levels.dim() == 2 && levels.size(1) == 64 && (levels.size(0) == 1 || levels.size(0) == codes.size(0)),
                "low-bit kernel: levels must be a contiguous uint8 CPU tensor of 64 bytes for one tile or for each of ",
                codes.size(0));
    return {levels.data_ptr<uint8_t>(), levels.size(0) == 1 ? 0L : 64L};
}

static at::Tensor op_matmul(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                            const std::optional<at::Tensor>& levels, const at::Tensor& x, at::IntArrayRef geometry) {
    const Geometry g = geometry_of(geometry);
    TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.size(-1) == g.in_features,
                "low-bit kernel: x must be a CPU tensor of ", g.in_features, " features in its last dimension, not ",
                x.dim() ? x.size(-1) : 0);
    check_layout(g, codes, scales, zeros);
    const Lookup lookup = lookup_of(levels.value_or(at::Tensor()), g.bits, codes);
    // fp32 contiguous input (the common case) goes in as it is: no conversion, no copy
    const bool direct = x.scalar_type() == at::kFloat && x.is_contiguous();
    const at::Tensor xf = direct ? x : x.to(at::kFloat).contiguous();
    const int64_t K = x.size(-1), M = x.numel() / K;
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = g.out_features;
    at::Tensor y = at::empty(sizes, xf.options());
    if (M) {
        const int status = mp_matmul((int)g.bits, codes.data_ptr<uint8_t>(),
                                     reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                                     zeros_of(zeros, scales), lookup.lut, lookup.stride, (int)codes.size(0),
                                     (int)g.n_blocks, (int)g.padded, xf.data_ptr<float>(), (int)M, (int)K, (int)g.group,
                                     (int)g.sub, (int)g.width, y.data_ptr<float>(), (int)g.out_features,
                                     g.scales_nonfinite != 0, at::get_num_threads());
        TORCH_CHECK(status == 0, "low-bit kernel: no scratch memory for ", M, " x ", K, " activations");
    }
    return direct ? y : y.to(x.scalar_type());
}

static at::Tensor op_decode_bf16(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                                 const std::optional<at::Tensor>& levels, at::IntArrayRef geometry) {
    const Geometry g = geometry_of(geometry);
    check_layout(g, codes, scales, zeros);
    const Lookup lookup = lookup_of(levels.value_or(at::Tensor()), g.bits, codes);
    at::Tensor out = at::empty({g.out_features, g.in_features}, codes.options().dtype(at::kBFloat16));
    mp_decode_bf16((int)g.bits, codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                   zeros_of(zeros, scales), lookup.lut, lookup.stride, (int)codes.size(0), (int)g.n_blocks, (int)g.padded,
                   (int)g.in_features, (int)g.group, (int)g.sub, (int)g.width,
                   reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), (int)g.out_features, at::get_num_threads());
    return out;
}

// ---- One decode step of a Llama block ------------------------------------------------------------------
// For one new token in fp32, everything a Llama-family block does, in one call: RMS norm, the stacked
// q/k/v projection, the rotary embedding of q and k (rotate-half form), the key/value cache write,
// attention over the cached positions (grouped-query: query head h reads key/value head h / (heads /
// kv_heads)), the output projection and residual, RMS norm, the stacked gate/up projection, SiLU(gate) *
// up, the down projection and residual. At decode each step of this is a few microseconds of arithmetic
// on 576-wide vectors, where a PyTorch op costs about as much again to dispatch; the projections are the
// kernels of mp_matmul, the same arithmetic as four matmul calls.

namespace {

// One thread's copy of a projection's input: fp32 (for the non-finite fix) and quantized, in buffers
// sized for the block's widest input.
struct ThreadInput {
    float* x; int8_t* xq; float* xscale; int32_t* xsum;
};

struct Projection {
    int bits; const uint8_t* w; const uint16_t* ws; Zeros wz; Lookup lookup; int T, NB, Bp, K, G, sub, Bo, N;
    int nonfinite;
    void quantize(const ThreadInput& in) const { mp_quantize(in.x, 1, K, G, sub, Bo, Bp, NB, in.xq, in.xscale, in.xsum, 1); }
    // This thread's share of the tiles, a contiguous run (each thread streams its own part of the codes):
    // its outputs, non-finite ones fixed. Returns the first and one past the last output row it wrote.
    std::pair<int, int> share(int slot, int team, const ThreadInput& in, float* y) const;
};

template <int BITS, bool LUT>
void share_of(const Projection& p, int t0, int t1, const ThreadInput& in, float* y) {
    const int NBc = code_blocks(p.K, p.G, p.sub);
    for (int t = t0; t < t1; ++t)
        tile_times_rows<BITS, LUT>(p.w, p.ws, p.wz, p.lookup.lut, p.lookup.stride, t, p.NB, NBc, p.Bp, in.xq, in.xscale,
                                   in.xsum, 0, 1, y, p.N);
    fix_nonfinite<BITS>(p.w, p.ws, p.wz, p.lookup.lut, p.lookup.stride, t0, t1, p.NB, p.Bp, in.x, 1, p.K, p.G, p.sub,
                        p.Bo, in.xscale, p.nonfinite != 0, y, p.N, 1);
}

std::pair<int, int> Projection::share(int slot, int team, const ThreadInput& in, float* y) const {
    const int t0 = (int)((long)T * slot / team), t1 = (int)((long)T * (slot + 1) / team);
    switch (bits + (lookup.lut ? 100 : 0)) {
        case 2: share_of<2, false>(*this, t0, t1, in, y); break;
        case 3: share_of<3, false>(*this, t0, t1, in, y); break;
        case 4: share_of<4, false>(*this, t0, t1, in, y); break;
        case 8: share_of<8, false>(*this, t0, t1, in, y); break;
        case 102: share_of<2, true>(*this, t0, t1, in, y); break;
        case 103: share_of<3, true>(*this, t0, t1, in, y); break;
        case 104: share_of<4, true>(*this, t0, t1, in, y); break;
    }
    return {4 * t0, std::min(4 * t1, N)};
}

// The sum of term(i) over i < n in 16 independent partial sums, so that the compiler can keep them in
// vector registers (one running sum is a chain of dependent adds it may not reorder).
template <class Term>
inline float sum_of(int n, Term term) {
    float part[16] = {};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; ++j) part[j] += term(i + j);
    for (int width = 8; width >= 1; width /= 2)
        for (int j = 0; j < width; ++j) part[j] += part[j + width];
    float total = part[0];
    for (; i < n; ++i) total += term(i);
    return total;
}

float dot(const float* a, const float* b, int n) {
    return sum_of(n, [a, b](int i) { return a[i] * b[i]; });
}

// e^x in plain arithmetic the compiler vectorises (glibc's expf is a call per element): x = n ln 2 + r,
// |r| <= ln 2 / 2, e^r by its Taylor polynomial of degree 7 (truncation under 1e-8 relative), 2^n put in
// the exponent bits. Measured within 1 ulp of e^x over [-87.3, 88.3]; 0 below -87.33, where e^x is
// under the smallest normal float, infinity above 88.37; NaN stays NaN.
inline float exp_vectorisable(float x) {
    const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds x log2(e) to the integer n in the low bits
    const float shifted = x * 1.44269504088896341f + magic;
    const float n = shifted - magic;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    // ln 2 in two parts, the first with trailing zero bits so that n times it is exact
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t exponent = (bits - 0x4B400000 + 127) * (1 << 23);  // (n + 127) in the exponent field
    float scale;
    memcpy(&scale, &exponent, sizeof scale);
    return x < -87.33f ? 0.f : x > 88.37f ? INFINITY : p * scale;
}

// HF's LlamaRMSNorm in fp32: weight * (x * rsqrt(mean(x^2) + eps))
void rms_norm(const float* x, const float* weight, int n, float eps, float* out) {
    const float r = 1.f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * r);
}

// x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[d/2:], x[:d/2]), into out
void rotate(const float* x, const float* cos, const float* sin, int d, float* out) {
    const int half = d / 2;
    for (int i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        out[i] = a * cos[i] - b * sin[i];
        out[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

// One head's attention output o (d wide): softmax(q . k_t * scale) over the `cached` positions of k and v
// and the new one (k_new, v_new), times the values; `scores` holds cached + 1 floats.
void attend(const float* q, const float* k, const float* v, const float* k_new, const float* v_new, int64_t cached,
            int64_t d, float scale, float* scores, float* o) {
    for (int64_t t = 0; t < cached; ++t) scores[t] = dot(q, k + t * d, (int)d) * scale;
    scores[cached] = dot(q, k_new, (int)d) * scale;
    float top = -INFINITY;
    for (int64_t t = 0; t <= cached; ++t) top = scores[t] > top ? scores[t] : top;
    for (int64_t t = 0; t <= cached; ++t) scores[t] = exp_vectorisable(scores[t] - top);
    const float total = sum_of((int)cached + 1, [scores](int i) { return scores[i]; });
    for (int64_t i = 0; i < d; ++i) o[i] = 0.f;
    for (int64_t t = 0; t <= cached; ++t) {
        const float p = scores[t] / total;
        const float* vt = t < cached ? v + t * d : v_new;
        for (int64_t i = 0; i < d; ++i) o[i] += p * vt[i];
    }
}

}  // namespace

// The decode steps of a model's Llama blocks, prepared once: the layouts, norms and caches of every block
// checked and held, so that a token costs one call through all blocks (each call of a PyTorch operator
// with the block's 23 tensors cost about 12 us of argument handling, 30 blocks of SmolLM2 a third of a
// millisecond per token) and one parallel region, its threads meeting at barriers between blocks.
class DecodePlan : public torch::CustomClassHolder {
  public:
    // Per block, in order: codes, scales, zeros, levels of its four projections (q/k/v stacked, o,
    // gate/up stacked, down: 4 entries per block; levels empty where a projection has no lookup table),
    // eight geometry values per projection (bits, n_blocks, padded, group, sub, width, out_features,
    // nonfinite), its input and post-attention norm weights (2 per block), its key and value caches
    // (kv_heads, positions, head_dim).
    DecodePlan(std::vector<at::Tensor> codes, std::vector<at::Tensor> scales, std::vector<at::Tensor> zeros,
               std::vector<at::Tensor> levels, std::vector<int64_t> geometry, std::vector<at::Tensor> norms, double eps,
               std::vector<at::Tensor> keys, std::vector<at::Tensor> values, int64_t heads, double scale)
        : eps_((float)eps), scale_((float)scale), heads_(heads) {
        const size_t n = keys.size();
        TORCH_CHECK(n > 0 && codes.size() == 4 * n && scales.size() == 4 * n && zeros.size() == 4 * n &&
                        levels.size() == 4 * n && geometry.size() == 4 * GEOMETRY_VALUES * n &&
                        norms.size() == 2 * n && values.size() == n,
                    "decode plan: per block four projections (q/k/v, o, gate/up, down) with ", GEOMETRY_VALUES,
                    " geometry values each, two norms and a key and a value cache; got ", n, " caches, ", codes.size(), " projections, ",
                    geometry.size(), " geometry values, ", norms.size(), " norms");
        const at::Tensor& first = keys[0];
        TORCH_CHECK(first.dim() == 3, "decode plan: caches must be (kv_heads, positions, head_dim)");
        kv_heads_ = first.size(0), max_len_ = first.size(1), d_ = first.size(2);
        TORCH_CHECK(heads > 0 && heads % kv_heads_ == 0 && d_ % 2 == 0, "decode plan: ", heads, " heads over ", kv_heads_,
                    " key/value heads of width ", d_);
        hidden_ = norms[0].numel();
        inner_ = Geometry::of(geometry.data() + 2 * GEOMETRY_VALUES).out_features / 2;
        for (size_t b = 0; b < n; ++b) {
            Block block;
            for (const at::Tensor* cache : {&keys[b], &values[b]})
                TORCH_CHECK(cache->device().is_cpu() && cache->scalar_type() == at::kFloat && cache->is_contiguous() &&
                                cache->sizes() == first.sizes(),
                            "decode plan: block ", b, "'s caches must be contiguous fp32 CPU tensors of shape ", first.sizes());
            for (int i = 0; i < 2; ++i)
                TORCH_CHECK(norms[2 * b + i].device().is_cpu() && norms[2 * b + i].scalar_type() == at::kFloat &&
                                norms[2 * b + i].is_contiguous() && norms[2 * b + i].dim() == 1 &&
                                norms[2 * b + i].numel() == hidden_,
                            "decode plan: block ", b, "'s norm weights must be contiguous fp32 CPU vectors of ", hidden_);
            const int64_t in_features[4] = {hidden_, heads * d_, hidden_, inner_};
            const int64_t out_features[4] = {(heads + 2 * kv_heads_) * d_, hidden_, 2 * inner_, hidden_};
            for (int i = 0; i < 4; ++i) {
                const size_t at = 4 * b + i;
                const Geometry g = Geometry::of(geometry.data() + GEOMETRY_VALUES * at);
                TORCH_CHECK(g.in_features == in_features[i] && g.out_features == out_features[i], "decode plan: block ",
                            b, "'s projection ", i, " is ", g.out_features, "x", g.in_features, ", the block needs ",
                            out_features[i], "x", in_features[i]);
                check_layout(g, codes[at], scales[at], zeros[at]);
                block.proj[i] = Projection{(int)g.bits, codes[at].data_ptr<uint8_t>(),
                                           reinterpret_cast<const uint16_t*>(scales[at].data_ptr<at::Half>()),
                                           zeros_of(zeros[at], scales[at]), lookup_of(levels[at], g.bits, codes[at]),
                                           (int)codes[at].size(0), (int)g.n_blocks, (int)g.padded, (int)g.in_features,
                                           (int)g.group, (int)g.sub, (int)g.width, (int)g.out_features,
                                           (int)g.scales_nonfinite};
                weight_bytes_ += codes[at].numel();
                widest_ = std::max(widest_, (long)g.n_blocks * g.padded);
                n_blocks_ = std::max(n_blocks_, (long)g.n_blocks);
            }
            block.input_norm = norms[2 * b].data_ptr<float>();
            block.post_norm = norms[2 * b + 1].data_ptr<float>();
            block.keys = keys[b].data_ptr<float>();
            block.values = values[b].data_ptr<float>();
            blocks_.push_back(block);
        }
        // the pointers above point into these
        for (auto* list : {&codes, &scales, &zeros, &levels, &norms, &keys, &values})
            held_.insert(held_.end(), list->begin(), list->end());
    }

    // h (hidden,) through every block for the token at `position`, whose rotary (cos, sin) are (head_dim,);
    // writes each block's key and value there.
    at::Tensor step(const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin, int64_t position) const {
        auto fp32_vector = [](const at::Tensor& t, int64_t n, const char* what) {
            TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 &&
                            t.size(0) == n, "decode plan: ", what, " must be a contiguous fp32 CPU vector of ", n, " values");
        };
        fp32_vector(h, hidden_, "h");
        fp32_vector(cos, d_, "cos");
        fp32_vector(sin, d_, "sin");
        TORCH_CHECK(position >= 0 && position < max_len_, "decode plan: position ", position, " is outside the cache of ",
                    max_len_, " positions");
        // Tiny models (tests) take one thread: waking a second costs more than their arithmetic.
        const int nthreads = weight_bytes_ / (long)blocks_.size() > (1 << 16) ? at::get_num_threads() : 1;
        const int64_t heads = heads_, kv_heads = kv_heads_, d = d_, hidden = hidden_, inner = inner_, max_len = max_len_;
        const int64_t group = heads / kv_heads, widest_input = std::max({hidden, inner, heads * d});
        const long widest = widest_, n_blocks = n_blocks_;
        // per thread: the fp32 input, its int8 rounding's scales, the attention scores, a rotated q and k;
        // whole cache lines apart
        const int64_t floats = (widest_input + n_blocks + (position + 1) + 2 * d + 15) / 16 * 16;
        std::vector<float> thread_floats(nthreads * floats);
        std::vector<int8_t> thread_xq(nthreads * widest);
        std::vector<int32_t> thread_xsum(nthreads * n_blocks);
        std::vector<float> qkv(heads * d + 2 * kv_heads * d), attn(heads * d), gate_up(2 * inner), down(hidden),
            stream(2 * hidden);
        at::Tensor out = at::empty({hidden}, h.options());
        const float* cp = cos.data_ptr<float>();
        const float* sp = sin.data_ptr<float>();
        const int last = (int)blocks_.size() - 1;

        // Each projection's tiles are shared out among the threads, and each thread makes its own copy of
        // the next projection's input (norm, SiLU, int8 rounding: microseconds) rather than waiting for
        // one thread to make it: five barriers per block.
#pragma omp parallel num_threads(nthreads)
        {
            const int slot = thread_slot(), team = team_size();
            float* mine = thread_floats.data() + slot * floats;
            const ThreadInput in{mine, thread_xq.data() + slot * widest, mine + widest_input,
                                 thread_xsum.data() + slot * n_blocks};
            float* scores = in.xscale + n_blocks;
            float* q = scores + position + 1;
            float* k_new = q + d;
            for (int b = 0; b <= last; ++b) {
                const Block& block = blocks_[b];
                const Projection* proj = block.proj;
                // the residual stream: this block's input and output
                const float* hp = b == 0 ? h.data_ptr<float>() : stream.data() + hidden * ((b - 1) % 2);
                float* op = b == last ? out.data_ptr<float>() : stream.data() + hidden * (b % 2);
                float* kc = block.keys;
                float* vc = block.values;

                rms_norm(hp, block.input_norm, (int)hidden, eps_, in.x);
                proj[0].quantize(in);
                proj[0].share(slot, team, in, qkv.data());
#pragma omp barrier
                // The new position's key and value are used from qkv (each thread rotating its own copy of
                // the key) and written into the cache by one thread per key/value head: no thread reads
                // them there in this step.
                for (int64_t g = slot; g < kv_heads; g += team) {
                    rotate(qkv.data() + (heads + g) * d, cp, sp, (int)d, kc + (g * max_len + position) * d);
                    memcpy(vc + (g * max_len + position) * d, qkv.data() + (heads + kv_heads + g) * d, d * sizeof(float));
                }
#pragma omp for schedule(static)
                for (int64_t head = 0; head < heads; ++head) {
                    const int64_t g = head / group;
                    rotate(qkv.data() + head * d, cp, sp, (int)d, q);
                    rotate(qkv.data() + (heads + g) * d, cp, sp, (int)d, k_new);
                    attend(q, kc + g * max_len * d, vc + g * max_len * d, k_new, qkv.data() + (heads + kv_heads + g) * d,
                           position, d, scale_, scores, attn.data() + head * d);
                }
                memcpy(in.x, attn.data(), heads * d * sizeof(float));
                proj[1].quantize(in);
                const auto mixed = proj[1].share(slot, team, in, op);
                for (int r = mixed.first; r < mixed.second; ++r) op[r] += hp[r];
#pragma omp barrier
                rms_norm(op, block.post_norm, (int)hidden, eps_, in.x);
                proj[2].quantize(in);
                proj[2].share(slot, team, in, gate_up.data());
#pragma omp barrier
                for (int64_t i = 0; i < inner; ++i) {
                    const float g = gate_up[i];
                    in.x[i] = g / (1.f + exp_vectorisable(-g)) * gate_up[inner + i];
                }
                proj[3].quantize(in);
                const auto added = proj[3].share(slot, team, in, down.data());
                for (int r = added.first; r < added.second; ++r) op[r] += down[r];
#pragma omp barrier
            }
        }
        return out;
    }

  private:
    struct Block {
        Projection proj[4];
        const float* input_norm; const float* post_norm;
        float* keys; float* values;
    };
    std::vector<at::Tensor> held_;
    std::vector<Block> blocks_;
    float eps_, scale_;
    int64_t heads_, kv_heads_ = 0, max_len_ = 0, d_ = 0, hidden_ = 0, inner_ = 0;
    long weight_bytes_ = 0, widest_ = 0, n_blocks_ = 0;
};

extern "C" {

// Define and implement (CPU) the operators <ns>::matmul and <ns>::decode_bf16 and the class <ns>::DecodePlan. Returns 0, or -1 with
// the reason in `error` (e.g. the namespace is taken).
int mp_register_ops(const char* ns, char* error, int error_len) {
    try {
        // Never freed: the registrations must outlive every call, and the dispatcher may be torn down
        // before this library's static destructors would run.
        auto* def = new torch::Library(torch::Library::DEF, ns, std::nullopt, __FILE__, __LINE__);
        def->def("matmul(Tensor codes, Tensor scales, Tensor zeros, Tensor? levels, Tensor x, int[] geometry) -> Tensor");
        def->def("decode_bf16(Tensor codes, Tensor scales, Tensor zeros, Tensor? levels, int[] geometry) -> Tensor");
        def->class_<DecodePlan>("DecodePlan")
            .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                             std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>, double,
                             std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, double>())
            .def("step", &DecodePlan::step);
        auto* impl = new torch::Library(torch::Library::IMPL, ns, c10::DispatchKey::CPU, __FILE__, __LINE__);
        impl->impl("matmul", TORCH_FN(op_matmul));
        impl->impl("decode_bf16", TORCH_FN(op_decode_bf16));
        return 0;
    } catch (const std::exception& e) {
        snprintf(error, error_len, "%s", e.what());
        return -1;
    }
}

}  // extern "C"
