// Native float32 kernels on AVX2 CPUs: block-quantized linear layers (y[M, N] = x[M, K] W^T for the
// rows of a forward; the q4 one also with AVX-512 VNNI where the CPU has it, same results), attention
// for the rows of many sequences over a shared KV pool, and RMSNorm.
//
// W is stored as llama.cpp stores it: blocks of 32 inputs, each with a scale d (and an offset m), so
// W = d * q + m with 4-bit codes q in [0, 16) (q4), or 8-bit codes q in [-128, 127] (q8; the offset
// optional, and a scale per 16 inputs where the file has one, as Q6_K does). Scales and offsets are
// float16 where the file stores them so (Q4_0, Q4_1, Q8_0), and float32 where the file stores them as
// a product (the K-quants' super-block scale times a 6- or 8-bit sub-block scale): exact either way.
// A decode step multiplies one to a few dozen rows by every weight once, so the cost is reading the
// weights: 4.5 or 8.5 bits each instead of 32 (float32) or 16 (bfloat16).
//
// Every output element is summed in the same order whatever M is and whichever rows share its tile,
// so a row's result never depends on the batch it came in: speculative verification, batching many
// sequences, chunked prompts and recomputation after preemption all rely on this.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <optional>
#include <string>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr int kGroup = 32;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane j of the result is the sum of v[j]'s eight lanes, added in the same order for every j
// ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)), so a value never depends on which lane it lands in.
inline __m256 reduce8(const __m256 v[8]) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Eight (sixteen) floats stored as float32 or float16: block scales and offsets, and the keys and
// values of the q4 path's KV pool. The conversion is exact, so the arithmetic that follows is the same
// whichever the storage.
inline __m256 load_f8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_f8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
__attribute__((target("avx512f"))) inline __m512 load_f16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load_f16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// A [.., 16]-column table of block scales or offsets, float16 or float32 (see the top); p is null
// where a weight has no offsets.
struct Scales {
  const void* p = nullptr;
  bool f32 = false;

  Scales(const torch::Tensor& t, int64_t offset) {
    if (!t.defined()) return;
    f32 = t.scalar_type() == torch::kFloat32;
    p = static_cast<const char*>(t.data_ptr()) + offset * t.element_size();
  }
};

__attribute__((target("avx512f,f16c")))
inline __m512 load16(const Scales& s, int64_t i) {
  return s.f32 ? load_f16(static_cast<const float*>(s.p) + i) : load_f16(static_cast<const at::Half*>(s.p) + i);
}

inline __m256 load8(const Scales& s, int64_t i) {
  return s.f32 ? load_f8(static_cast<const float*>(s.p) + i) : load_f8(static_cast<const at::Half*>(s.p) + i);
}

// x rounded to 8 bits per block of 32 (as llama.cpp's Q8_1): x ~ dx * qx, plus each block's exact sum.
struct Q8Rows {
  std::vector<int8_t> q;  // [M, K]
  std::vector<float> d, sum;  // [M, K / 32]
};

Q8Rows quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t groups = K / kGroup;
  Q8Rows r{std::vector<int8_t>(M * K), std::vector<float>(M * groups), std::vector<float>(M * groups)};
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the lane interleaving of the packs
  for (int64_t i = 0; i < M * groups; ++i) {
    const float* xg = x + i * kGroup;
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(xg + 8 * j);
    const __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                      _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
    const float d = hmax(amax) / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    __m256i q[4];  // round to nearest even, as std::nearbyint does
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.q.data() + i * kGroup), _mm256_permutevar8x32_epi32(bytes, order));
    r.d[i] = d;
    r.sum[i] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
  }
  return r;
}

// ---- q4 x q8 ----------------------------------------------------------------------------------------
//
// One output element of a q4 layer, y[r, n] = sum_k W[n, k] x[r, k], with W = d q + m per block g of 32
// inputs and x ~ dx qx (Q8Rows), is computed as
//
//   acc = 0; for g in order: acc = fma(float(I[g]), d[n, g] * dx[r, g], acc); acc = fma(m[n, g], sum_x[r, g], acc)
//
// where I[g] = sum over the block of q * qx is an exact integer. Every output element is this one chain,
// whichever instructions compute it and whatever the other rows and columns of the call: the AVX-512 VNNI
// kernel and the AVX2 kernel give the same bits, and a row's result never depends on its batch.
//
// The weights are repacked once (PackedQ4) so that the integer dot products run "vertically": a vector
// holds 4 consecutive input bytes of each of 16 output columns, multiplied by the same 4 bytes of x
// broadcast to every lane, so one instruction advances 16 (VNNI) or 8 (AVX2) outputs by 4 inputs and no
// horizontal sum is needed.

// q4 weights in blocks of 16 output columns: per (column block, input block of 32) 256 code bytes, chunk j
// (0..3) holding, for each column c and byte b, input 4j + b in its low nibble and 16 + 4j + b in its high
// nibble (the GGUF pairing of nibbles, the bytes regrouped by column); then 16 scales and mins.
struct PackedQ4 {
  torch::Tensor codes;  // [N16 / 16, K / 32, 4, 16, 4] uint8
  torch::Tensor scales, mins;  // [N16 / 16, K / 32, 16] float16 or float32 (both the same)
  int64_t n, k;  // true output columns (N16 is n rounded up to 16), inputs
};

bool g_avx512 = false;  // AVX-512 VNNI kernels in use (cpu_features() decides, use_avx512() overrides)

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c,fma")))
void q4_tile_avx512(const PackedQ4& w, int64_t block, const Q8Rows& xq, int64_t r0, float* out, int64_t ldo) {
  const int64_t groups = w.k / kGroup;
  const uint8_t* codes = w.codes.data_ptr<uint8_t>() + block * groups * 256;
  const Scales scales(w.scales, block * groups * 16), mins(w.mins, block * groups * 16);
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i wv[8];
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(codes + g * 256 + 64 * j);
      wv[j] = _mm512_and_si512(v, nib);
      wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
    }
    const __m512 d = load16(scales, g * 16), m = load16(mins, g * 16);
    for (int r = 0; r < R; ++r) {
      const int64_t i = (r0 + r) * groups + g;
      const int8_t* qx = xq.q.data() + i * kGroup;
      __m512i dot = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j)
        dot = _mm512_dpbusd_epi32(dot, wv[j], _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(qx + 4 * j)));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(xq.d[i])), acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xq.sum[i]), acc[r]);
    }
  }
  const int64_t live = std::min<int64_t>(16, w.n - block * 16);
  const __mmask16 keep = static_cast<__mmask16>((1u << live) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * ldo + block * 16, keep, acc[r]);
}

// The same chain, 8 columns at a time: maddubs + madd give each lane the same 4-byte integer sums
// (at most 2 * 15 * 127 per pair, far from int16's limit), so every output is bit for bit the VNNI one.
template <int R>
void q4_tile_avx2(const PackedQ4& w, int64_t block, const Q8Rows& xq, int64_t r0, float* out, int64_t ldo) {
  const int64_t groups = w.k / kGroup;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t live = std::min<int64_t>(16, w.n - block * 16);
  for (int half = 0; half < 2 && 8 * half < live; ++half) {
    const uint8_t* codes = w.codes.data_ptr<uint8_t>() + block * groups * 256 + 32 * half;
    const Scales scales(w.scales, block * groups * 16 + 8 * half), mins(w.mins, block * groups * 16 + 8 * half);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256i wv[8];
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * 256 + 64 * j));
        wv[j] = _mm256_and_si256(v, nib);
        wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
      }
      const __m256 d = load8(scales, g * 16), m = load8(mins, g * 16);
      for (int r = 0; r < R; ++r) {
        const int64_t i = (r0 + r) * groups + g;
        const int8_t* qx = xq.q.data() + i * kGroup;
        __m256i dot = _mm256_setzero_si256();
        for (int j = 0; j < 8; ++j) {
          const __m256i x4 = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(qx + 4 * j));
          dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(wv[j], x4), ones));
        }
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(xq.d[i])), acc[r]);
        acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xq.sum[i]), acc[r]);
      }
    }
    const int64_t n = std::min<int64_t>(8, live - 8 * half);
    for (int r = 0; r < R; ++r) {
      float lanes[8];
      _mm256_storeu_ps(lanes, acc[r]);
      std::copy(lanes, lanes + n, out + r * ldo + block * 16 + 8 * half);
    }
  }
}

// Rows per register tile: the VNNI kernel keeps 8 weight vectors and R accumulators in its 32 registers.
constexpr int kRowTile = 8;
// Rows per panel of a long input (a prompt chunk): 64 rows of x (up to 100 KB quantized) stay in L2.
constexpr int64_t kPanel = 64;

template <int R>
void q4_tile(const PackedQ4& w, int64_t block, const Q8Rows& xq, int64_t r0, float* out, int64_t ldo) {
  if (g_avx512) {
    q4_tile_avx512<R>(w, block, xq, r0, out, ldo);
  } else {
    q4_tile_avx2<R>(w, block, xq, r0, out, ldo);
  }
}

// ---- q8 x q8 (the output head, and the 5- and 6-bit K-quants) ------------------------------------------
//
// y[r, n] = acc after, for g in order:
//   S = 1: acc = fma(float(I[g]), d[n, g] * dx[r, g], acc)
//   S = 2: acc = fma(float(I0[g]), d0[n, g] * dx[r, g], acc); acc = fma(float(I1[g]), d1[n, g] * dx[r, g], acc)
//   then, with offsets: acc = fma(m[n, g], sum_x[r, g], acc)
// with I[g] the exact integer dot product of the block's int8 weights and x's int8 codes, I0 and I1 those
// of its two halves of 16 inputs, each with its own scale (Q6_K's scale per 16 weights). Weights repacked
// like PackedQ4's but 8 chunks of (16 columns x 4 signed bytes) per block of 32 inputs: chunks 0-3 are
// the first half, 4-7 the second.

struct PackedQ8 {
  torch::Tensor codes;  // [N16 / 16, K / 32, 8, 16, 4] int8
  torch::Tensor scales;  // [N16 / 16, K / 32, S, 16] float16 or float32: S = 1 scale per 32 inputs, or 2 per 16
  torch::Tensor sums;  // [N16 / 16, K / 32, S, 16] int32: each scale's sum of codes (the VNNI kernel's offset)
  torch::Tensor mins;  // [N16 / 16, K / 32, 16], scales' dtype: the offsets m, or undefined for none
  int64_t n, k;
};

// VNNI multiplies unsigned by signed bytes: x + 128 times w, less 128 times the sum of w.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c,fma")))
void q8_tile_avx512(const PackedQ8& w, int64_t block, const Q8Rows& xq, int64_t r0, float* out, int64_t ldo) {
  const int64_t groups = w.k / kGroup, S = w.scales.size(2);
  const int8_t* codes = w.codes.data_ptr<int8_t>() + block * groups * 512;
  const Scales scales(w.scales, block * groups * S * 16), mins(w.mins, block * groups * 16);
  const int32_t* sums = w.sums.data_ptr<int32_t>() + block * groups * S * 16;
  const __m512i flip = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i wv[8];
    for (int j = 0; j < 8; ++j) wv[j] = _mm512_loadu_si512(codes + g * 512 + 64 * j);
    const __m512 d0 = load16(scales, g * S * 16), d1 = S == 2 ? load16(scales, (g * S + 1) * 16) : d0;
    const __m512i off0 = _mm512_slli_epi32(_mm512_loadu_si512(sums + g * S * 16), 7);
    const __m512i off1 = S == 2 ? _mm512_slli_epi32(_mm512_loadu_si512(sums + (g * S + 1) * 16), 7) : off0;
    const __m512 m = mins.p ? load16(mins, g * 16) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const int64_t i = (r0 + r) * groups + g;
      const int8_t* qx = xq.q.data() + i * kGroup;
      __m512i dot[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
      for (int j = 0; j < 8; ++j) {
        const __m512i x4 = _mm512_xor_si512(_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(qx + 4 * j)), flip);
        dot[j / 4] = _mm512_dpbusd_epi32(dot[j / 4], x4, wv[j]);
      }
      const __m512 dx = _mm512_set1_ps(xq.d[i]);
      if (S == 1) {
        const __m512i all = _mm512_sub_epi32(_mm512_add_epi32(dot[0], dot[1]), off0);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(all), _mm512_mul_ps(d0, dx), acc[r]);
      } else {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[0], off0)), _mm512_mul_ps(d0, dx), acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[1], off1)), _mm512_mul_ps(d1, dx), acc[r]);
      }
      if (mins.p) acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xq.sum[i]), acc[r]);
    }
  }
  const int64_t live = std::min<int64_t>(16, w.n - block * 16);
  const __mmask16 keep = static_cast<__mmask16>((1u << live) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * ldo + block * 16, keep, acc[r]);
}

// AVX2: |w| times x with w's sign, so maddubs' pairs stay within int16 (2 * 128 * 127).
template <int R>
void q8_tile_avx2(const PackedQ8& w, int64_t block, const Q8Rows& xq, int64_t r0, float* out, int64_t ldo) {
  const int64_t groups = w.k / kGroup, S = w.scales.size(2);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t live = std::min<int64_t>(16, w.n - block * 16);
  for (int half = 0; half < 2 && 8 * half < live; ++half) {
    const int8_t* codes = w.codes.data_ptr<int8_t>() + block * groups * 512 + 32 * half;
    const Scales scales(w.scales, block * groups * S * 16 + 8 * half), mins(w.mins, block * groups * 16 + 8 * half);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256i wv[8], aw[8];
      for (int j = 0; j < 8; ++j) {
        wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * 512 + 64 * j));
        aw[j] = _mm256_abs_epi8(wv[j]);
      }
      const __m256 d0 = load8(scales, g * S * 16), d1 = S == 2 ? load8(scales, (g * S + 1) * 16) : d0;
      const __m256 m = mins.p ? load8(mins, g * 16) : _mm256_setzero_ps();
      for (int r = 0; r < R; ++r) {
        const int64_t i = (r0 + r) * groups + g;
        const int8_t* qx = xq.q.data() + i * kGroup;
        __m256i dot[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int j = 0; j < 8; ++j) {
          const __m256i x4 = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(qx + 4 * j));
          const __m256i pairs = _mm256_maddubs_epi16(aw[j], _mm256_sign_epi8(x4, wv[j]));
          dot[j / 4] = _mm256_add_epi32(dot[j / 4], _mm256_madd_epi16(pairs, ones));
        }
        const __m256 dx = _mm256_set1_ps(xq.d[i]);
        if (S == 1) {
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(dot[0], dot[1])), _mm256_mul_ps(d0, dx), acc[r]);
        } else {
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[0]), _mm256_mul_ps(d0, dx), acc[r]);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[1]), _mm256_mul_ps(d1, dx), acc[r]);
        }
        if (mins.p) acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xq.sum[i]), acc[r]);
      }
    }
    const int64_t n = std::min<int64_t>(8, live - 8 * half);
    for (int r = 0; r < R; ++r) {
      float lanes[8];
      _mm256_storeu_ps(lanes, acc[r]);
      std::copy(lanes, lanes + n, out + r * ldo + block * 16 + 8 * half);
    }
  }
}

template <int R>
void q8_tile(const PackedQ8& w, int64_t block, const Q8Rows& xq, int64_t r0, float* out, int64_t ldo) {
  if (g_avx512) {
    q8_tile_avx512<R>(w, block, xq, r0, out, ldo);
  } else {
    q8_tile_avx2<R>(w, block, xq, r0, out, ldo);
  }
}

// Calls tile(R, r) over the M rows in register tiles of kRowTile, then one tile of the rows left; R is
// a std::integral_constant, so each tile size compiles to its own unrolled loop.
template <typename Tile>
inline void register_tiles(int64_t M, Tile tile) {
  int64_t r = 0;
  for (; r + kRowTile <= M; r += kRowTile) tile(std::integral_constant<int, kRowTile>{}, r);
  switch (M - r) {
    case 7: tile(std::integral_constant<int, 7>{}, r); break;
    case 6: tile(std::integral_constant<int, 6>{}, r); break;
    case 5: tile(std::integral_constant<int, 5>{}, r); break;
    case 4: tile(std::integral_constant<int, 4>{}, r); break;
    case 3: tile(std::integral_constant<int, 3>{}, r); break;
    case 2: tile(std::integral_constant<int, 2>{}, r); break;
    case 1: tile(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

}  // namespace

// Q4 weights times x rounded to Q8 blocks, as llama.cpp computes Q4_1 layers: the weights are exact,
// the activations carry 8 bits per block of 32.
torch::Tensor q4_linear(const torch::Tensor& x, const PackedQ4& w) {
  const int64_t M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous [M, K] float32");
  TORCH_CHECK(x.size(1) == w.k, "x has ", x.size(1), " inputs; the weight has ", w.k);
  auto out = torch::empty({M, w.n}, x.options());
  const Q8Rows xq = quantize_rows(x.data_ptr<float>(), M, w.k);
  float* op = out.data_ptr<float>();
  const int64_t blocks = w.codes.size(0);
  // A panel of rows at a time: its quantized x stays in cache while every column block passes over it.
  for (int64_t p0 = 0; p0 < M; p0 += kPanel) {
    const int64_t rows = std::min(kPanel, M - p0);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block)
        register_tiles(rows, [&](auto R, int64_t r) {
          q4_tile<decltype(R)::value>(w, block, xq, p0 + r, op + (p0 + r) * w.n, w.n);
        });
    });
  }
  return out;
}

// 8-bit weights (the output head, Q5_K, Q6_K) times x rounded to Q8 blocks (llama.cpp's Q8_0 x Q8_0).
torch::Tensor q8_linear(const torch::Tensor& x, const PackedQ8& w) {
  const int64_t M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous [M, K] float32");
  TORCH_CHECK(x.size(1) == w.k, "x has ", x.size(1), " inputs; the weight has ", w.k);
  auto out = torch::empty({M, w.n}, x.options());
  const Q8Rows xq = quantize_rows(x.data_ptr<float>(), M, w.k);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.codes.size(0), 4, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block)
      register_tiles(M, [&](auto R, int64_t r) { q8_tile<decltype(R)::value>(w, block, xq, r, op + r * w.n, w.n); });
  });
  return out;
}

// Scales and offsets: float16 or float32 (see the top), contiguous, of the given sizes.
void check_scales(const torch::Tensor& t, at::IntArrayRef sizes, const char* name) {
  TORCH_CHECK((t.scalar_type() == torch::kHalf || t.scalar_type() == torch::kFloat32) && t.is_contiguous() &&
              t.sizes() == sizes, name, ": contiguous float16 or float32 ", sizes, ", not ", t.sizes());
}

PackedQ8 pack_q8(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& sums,
                 const std::optional<torch::Tensor>& mins, int64_t n, int64_t k) {
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.dim() == 5 && codes.size(2) == 8 && codes.size(3) == 16 &&
              codes.size(4) == 4 && codes.is_contiguous(), "codes: contiguous [N16 / 16, K / 32, 8, 16, 4] int8");
  TORCH_CHECK(k % kGroup == 0 && codes.size(1) == k / kGroup && codes.size(0) * 16 >= n && codes.size(0) * 16 < n + 16,
              "codes do not match ", n, " x ", k);
  TORCH_CHECK(scales.dim() == 4 && (scales.size(2) == 1 || scales.size(2) == 2), "scales: [N16 / 16, K / 32, S, 16], S 1 or 2");
  check_scales(scales, {codes.size(0), codes.size(1), scales.size(2), 16}, "scales");
  TORCH_CHECK(sums.scalar_type() == torch::kInt32 && sums.is_contiguous() && sums.sizes() == scales.sizes(),
              "sums: contiguous int32 of the scales' sizes");
  if (mins) {
    check_scales(*mins, {codes.size(0), codes.size(1), 16}, "mins");
    TORCH_CHECK(mins->scalar_type() == scales.scalar_type(), "mins: the scales' dtype");
  }
  return PackedQ8{codes, scales, sums, mins.value_or(torch::Tensor()), n, k};
}

PackedQ4 pack_q4(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& mins, int64_t n,
                 int64_t k) {
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 5 && codes.size(2) == 4 && codes.size(3) == 16 &&
              codes.size(4) == 4 && codes.is_contiguous(), "codes: contiguous [N16 / 16, K / 32, 4, 16, 4] uint8");
  TORCH_CHECK(k % kGroup == 0 && codes.size(1) == k / kGroup && codes.size(0) * 16 >= n && codes.size(0) * 16 < n + 16,
              "codes do not match ", n, " x ", k);
  check_scales(scales, {codes.size(0), codes.size(1), 16}, "scales");
  check_scales(mins, {codes.size(0), codes.size(1), 16}, "mins");
  TORCH_CHECK(mins.scalar_type() == scales.scalar_type(), "mins: the scales' dtype");
  return PackedQ4{codes, scales, mins, n, k};
}

// Which q4 kernels run: "avx512" (VNNI) where the CPU has AVX-512 F/BW/VL/VNNI, else "avx2".
std::string cpu_features() { return g_avx512 ? "avx512" : "avx2"; }

bool use_avx512(bool on) {
  g_avx512 = on && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
             __builtin_cpu_supports("avx512dq");
  return g_avx512;
}

// Decoding-step helpers: one small call each instead of the half-dozen tensor ops PyTorch dispatches,
// which at one token a step cost more than the arithmetic. Rows are independent, as above.

// One row of RMSNorm: out = x * rsqrt(mean(x^2) + eps) * w, D a multiple of 8.
inline void rms_norm_row(const float* x, const float* w, int64_t D, float eps, float* out) {
  __m256 ss = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) ss = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), ss);
  const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(hsum(ss) / D + eps));
  for (int64_t i = 0; i < D; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv), _mm256_loadu_ps(w + i)));
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32, "x: contiguous [T, D] float32");
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(D % 8 == 0 && weight.is_contiguous() && weight.numel() == D, "weight: [D] float32, D a multiple of 8");
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) rms_norm_row(xp + t * D, wp, D, static_cast<float>(eps), op + t * D);
  return out;
}

// exp(x) for 8 lanes (Cephes' single-precision expf: x = n ln2 + r, a degree-7 polynomial in r,
// times 2^n), about 1 ulp; 0 below -87.3, where expf underflows, and so for -inf (masked keys).
inline __m256 exp8(__m256 x) {
  const __m256 valid = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.37f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), valid);
}

// Rotate one head in place, HF's half-split layout: (a, b) -> (a cos - b sin, b cos + a sin).
inline void rotate(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// Scores of one query against eight keys (k[j]: the key of lane j, hd floats): one accumulator per
// key over the head's dims, then reduce8, so a key's score is the same arithmetic in any lane and
// wherever its slot lies in the pool.
template <typename T>
inline __m256 score8(const float* q, const T* const k[8], int64_t hd) {
  __m256 s[8];
  for (int j = 0; j < 8; ++j) s[j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < hd; i += 8) {
    const __m256 qi = _mm256_loadu_ps(q + i);
    for (int j = 0; j < 8; ++j) s[j] = _mm256_fmadd_ps(qi, load_f8(k[j] + i), s[j]);
  }
  return reduce8(s);
}

// acc[0 .. 8W) += sum over keys l in [l0, l1) of p[l] * v[slot[l], 0 .. 8W), in key order, skipping
// zero weights; returns the weights' running sum, also in key order.
template <int W, typename T>
inline float weigh_values(const float* p, const T* v, const int64_t* slot, int64_t hd, int64_t l0, int64_t l1,
                          float* acc, float sum) {
  __m256 a[W];
  for (int j = 0; j < W; ++j) a[j] = _mm256_loadu_ps(acc + 8 * j);
  for (int64_t l = l0; l < l1; ++l) {
    if (p[l] == 0.f) continue;
    sum += p[l];
    const __m256 w = _mm256_set1_ps(p[l]);
    const T* vl = v + slot[l] * hd;
    for (int j = 0; j < W; ++j) a[j] = _mm256_fmadd_ps(w, load_f8(vl + 8 * j), a[j]);
  }
  for (int j = 0; j < W; ++j) _mm256_storeu_ps(acc + 8 * j, a[j]);
  return sum;
}

// weigh_values for a slice of `width` vectors (1 to 8): each width its own unrolled loop.
// The same, 16 dims a register: each dim's lane takes the same fused multiply-adds in the same key
// order as above, so both give the same bits (half the instructions for a 64-dim slice).
template <int W, typename T>
__attribute__((target("avx512f,fma")))
float weigh_values16(const float* p, const T* v, const int64_t* slot, int64_t hd, int64_t l0, int64_t l1,
                     float* acc, float sum) {
  __m512 a[W];
  for (int j = 0; j < W; ++j) a[j] = _mm512_loadu_ps(acc + 16 * j);
  for (int64_t l = l0; l < l1; ++l) {
    if (p[l] == 0.f) continue;
    sum += p[l];
    const __m512 w = _mm512_set1_ps(p[l]);
    const T* vl = v + slot[l] * hd;
    for (int j = 0; j < W; ++j) a[j] = _mm512_fmadd_ps(w, load_f16(vl + 16 * j), a[j]);
  }
  for (int j = 0; j < W; ++j) _mm512_storeu_ps(acc + 16 * j, a[j]);
  return sum;
}

template <typename T>
inline float weigh_slice(int64_t width, const float* p, const T* v, const int64_t* slot, int64_t hd, int64_t l0,
                         int64_t l1, float* acc, float sum) {
  if (g_avx512) {
    switch (width) {  // 8-float units: an even count runs 16 dims a register
      case 8: return weigh_values16<4>(p, v, slot, hd, l0, l1, acc, sum);
      case 6: return weigh_values16<3>(p, v, slot, hd, l0, l1, acc, sum);
      case 4: return weigh_values16<2>(p, v, slot, hd, l0, l1, acc, sum);
      case 2: return weigh_values16<1>(p, v, slot, hd, l0, l1, acc, sum);
      default: break;
    }
  }
  switch (width) {
    case 8: return weigh_values<8>(p, v, slot, hd, l0, l1, acc, sum);
    case 7: return weigh_values<7>(p, v, slot, hd, l0, l1, acc, sum);
    case 6: return weigh_values<6>(p, v, slot, hd, l0, l1, acc, sum);
    case 5: return weigh_values<5>(p, v, slot, hd, l0, l1, acc, sum);
    case 4: return weigh_values<4>(p, v, slot, hd, l0, l1, acc, sum);
    case 3: return weigh_values<3>(p, v, slot, hd, l0, l1, acc, sum);
    case 2: return weigh_values<2>(p, v, slot, hd, l0, l1, acc, sum);
    default: return weigh_values<1>(p, v, slot, hd, l0, l1, acc, sum);
  }
}

// The rows of one forward over many sequences and the keys each row sees, checked and indexed once
// per forward (every layer reuses it). Sequence b owns rows [row_start[b], row_start[b + 1]) and
// keys ctx_slots[ctx_start[b] .. ctx_start[b + 1]): its cached prefix, then its own rows, as pool
// slots. Its mask, if any, is a [T_b, K_b] block of `mask` at mask_start[b] over its last K_b keys
// (earlier keys are visible to all its rows); without one (mask_start[b] < 0) its rows are causal.
struct Batch {
  torch::Tensor write_slots, row_start, ctx_slots, ctx_start, mask, mask_start, mask_cols;
  std::vector<int64_t> row_seq;  // [R]: the sequence of each row
  std::vector<int64_t> row_keys;  // [R]: keys [0, row_keys[r]) of its sequence hold every key row r sees

  Batch(torch::Tensor write_slots_, torch::Tensor row_start_, torch::Tensor ctx_slots_, torch::Tensor ctx_start_,
        torch::Tensor mask_, torch::Tensor mask_start_, torch::Tensor mask_cols_)
      : write_slots(write_slots_.contiguous()), row_start(row_start_.contiguous()), ctx_slots(ctx_slots_.contiguous()),
        ctx_start(ctx_start_.contiguous()), mask(mask_.contiguous()), mask_start(mask_start_.contiguous()),
        mask_cols(mask_cols_.contiguous()) {
    for (const auto* t : {&write_slots, &row_start, &ctx_slots, &ctx_start, &mask_start, &mask_cols})
      TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->dim() == 1 && t->device().is_cpu(), "batch index tensors: 1-D int64 on the CPU");
    TORCH_CHECK(mask.scalar_type() == torch::kBool, "mask: bool");
    const int64_t B = row_start.size(0) - 1, R = write_slots.size(0);
    TORCH_CHECK(B >= 0 && ctx_start.size(0) == B + 1 && mask_start.size(0) == B && mask_cols.size(0) == B, "one entry per sequence");
    const int64_t *rs = row_start.data_ptr<int64_t>(), *cs = ctx_start.data_ptr<int64_t>();
    const int64_t *ms = mask_start.data_ptr<int64_t>(), *mc = mask_cols.data_ptr<int64_t>();
    const bool* mp = mask.data_ptr<bool>();
    TORCH_CHECK(rs[0] == 0 && rs[B] == R && cs[0] == 0 && cs[B] == ctx_slots.size(0), "row and key ranges cover the batch");
    row_seq.resize(R), row_keys.resize(R);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t T = rs[b + 1] - rs[b], L = cs[b + 1] - cs[b], K = mc[b];
      TORCH_CHECK(T >= 1 && L >= T, "sequence ", b, ": ", T, " rows and ", L, " keys");
      TORCH_CHECK(ms[b] < 0 || (K >= 1 && K <= L && ms[b] + T * K <= mask.numel()), "sequence ", b, ": mask out of range");
      for (int64_t t = 0; t < T; ++t) {
        int64_t keys = L - T + t + 1;  // causal: the prefix and rows up to its own
        if (ms[b] >= 0) {
          const bool* row = mp + ms[b] + t * K;
          int64_t last = K - 1;
          while (last >= 0 && !row[last]) --last;
          keys = L - K + last + 1;
        }
        TORCH_CHECK(keys >= 1, "sequence ", b, ", row ", t, " sees no key");
        row_seq[rs[b] + t] = b, row_keys[rs[b] + t] = keys;
      }
    }
  }

  int64_t sequences() const { return row_start.size(0) - 1; }
};

// Attention for every row of a Batch, from the fused projection qkv [R, (H + 2 KV) * hd]: rotate q and
// k (cos, sin: [R, hd]), write each row's k and v into this layer's pool (k_cache, v_cache: [KV, S, hd])
// at its write slot, then attend over its sequence's keys. Returns [R, H * hd].
//
// A row's result is the same arithmetic whatever else is in the batch and wherever its keys lie in
// the pool (keys are summed in key order, masked keys skipped), so batched decoding equals decoding
// alone bit for bit, and a tree node equals the same token decoded plainly.
//
// The pool holds float32 or float16 (E): keys and values are rounded to E when written, and read back
// exactly, so every path that reads the pool (plain steps, trees, prompts in chunks) sees the same keys.
template <typename E>
torch::Tensor attend(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                     torch::Tensor& k_cache, torch::Tensor& v_cache, const Batch& batch, int64_t heads, double scale) {
  const int64_t R = qkv.size(0), KV = k_cache.size(0), S = k_cache.size(1), hd = k_cache.size(2);
  const int64_t width = (heads + 2 * KV) * hd, group = heads / KV;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == R * hd && sin.numel() == R * hd, "cos, sin: [R, hd]");
  TORCH_CHECK(batch.write_slots.size(0) == R, "one write slot per row");
  const int64_t* ws = batch.write_slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(ws[r] >= 0 && ws[r] < S, "write slot ", ws[r], " outside the pool's ", S);
  const int64_t *rs = batch.row_start.data_ptr<int64_t>(), *cs = batch.ctx_start.data_ptr<int64_t>();
  const int64_t *ctx = batch.ctx_slots.data_ptr<int64_t>(), *ms = batch.mask_start.data_ptr<int64_t>();
  const int64_t* mc = batch.mask_cols.data_ptr<int64_t>();
  const bool* mp = batch.mask.data_ptr<bool>();
  const float *in = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  E *kc = k_cache.data_ptr<E>(), *vc = v_cache.data_ptr<E>();
  auto q = torch::empty({R, heads * hd}, qkv.options());
  float* qp = q.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    float k[256];  // one rotated key before it is stored
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * width;
      std::copy(row, row + heads * hd, qp + r * heads * hd);
      for (int64_t h = 0; h < heads; ++h) rotate(qp + (r * heads + h) * hd, cp + r * hd, sp + r * hd, hd);
      for (int64_t h = 0; h < KV; ++h) {
        std::copy(row + (heads + h) * hd, row + (heads + h + 1) * hd, k);
        rotate(k, cp + r * hd, sp + r * hd, hd);
        std::copy(k, k + hd, kc + (h * S + ws[r]) * hd);  // to E: float16 rounds to nearest even
        std::copy(row + (heads + KV + h) * hd, row + (heads + KV + h + 1) * hd, vc + (h * S + ws[r]) * hd);
      }
    }
  });
  // Keys a query of sequence b, token t sees: all but the last K_b to everyone, those by the mask
  // (or causally when there is none).
  auto visible = [&](int64_t b, int64_t t, int64_t l) {
    const int64_t T = rs[b + 1] - rs[b], L = cs[b + 1] - cs[b];
    if (ms[b] < 0) return l <= L - T + t;
    const int64_t first = L - mc[b];
    return l < first || mp[ms[b] + t * mc[b] + (l - first)];
  };
  // Tasks: the queries of one sequence that share a kv head (T_b tokens x `group` heads) go in chunks
  // of up to 8, so each chunk reads that head's keys and values once, not once per query. Tasks run
  // kv head by kv head, sequence after sequence: samples forked from one prompt read the same prefix
  // slots one after another, while they are still in cache.
  constexpr int64_t chunk = 8;
  std::vector<std::array<int64_t, 3>> tasks;  // (sequence, kv head, first query of the chunk)
  for (int64_t h = 0; h < KV; ++h)
    for (int64_t b = 0; b < batch.sequences(); ++b)
      for (int64_t i = 0; i < (rs[b + 1] - rs[b]) * group; i += chunk) tasks.push_back({b, h, i});
  auto out = torch::empty({R, heads * hd}, qkv.options());
  float* op = out.data_ptr<float>();
  constexpr int64_t kBlock = 32;  // keys per pass over the chunk's queries when weighting values
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p, acc(chunk * hd), total(chunk);
    const std::vector<E> zeros(hd, E(0.f));  // the key of a lane past the last key (masked anyway)
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, kvh, q0] = tasks[task];
      const int64_t T = rs[b + 1] - rs[b], nq = std::min(chunk, T * group - q0);
      const int64_t* keys = ctx + cs[b];
      const E *kh = kc + kvh * S * hd, *vh = vc + kvh * S * hd;
      // Query j of the chunk: token t of the sequence, head kvh * group + g; its row of q and of the output.
      auto token = [&](int64_t j) { return (q0 + j) / group; };
      auto row = [&](int64_t j) { return (rs[b] + token(j)) * heads + kvh * group + (q0 + j) % group; };
      int64_t L = 0;  // keys any query of the chunk sees lie below this
      for (int64_t j = 0; j < nq; ++j) L = std::max(L, batch.row_keys[rs[b] + token(j)]);
      const int64_t padded = (L + 7) / 8 * 8;
      if (static_cast<int64_t>(p.size()) < chunk * padded) p.resize(chunk * padded);
      // Scores, eight keys at a time, each key's the same arithmetic wherever its slot lies.
      __m256 top[chunk];
      int64_t seen[chunk];  // keys below seen[j] are visible to query j without a look at the mask
      for (int64_t j = 0; j < nq; ++j) {
        top[j] = _mm256_set1_ps(-INFINITY);
        const int64_t t = token(j), Tb = rs[b + 1] - rs[b], Lb = cs[b + 1] - cs[b];
        seen[j] = std::min(L, ms[b] < 0 ? Lb - Tb + t + 1 : Lb - mc[b]);
      }
      for (int64_t l0 = 0; l0 < padded; l0 += 8) {
        const E* k8[8];
        for (int k = 0; k < 8; ++k) k8[k] = l0 + k < L ? kh + keys[l0 + k] * hd : zeros.data();
        for (int64_t j = 0; j < nq; ++j) {
          const int64_t t = token(j);
          float* pj = p.data() + j * padded + l0;
          _mm256_storeu_ps(pj, _mm256_mul_ps(score8(qp + row(j) * hd, k8, hd), _mm256_set1_ps(static_cast<float>(scale))));
          if (l0 + 8 > seen[j])  // a block past the plainly visible keys: ask key by key
            for (int k = 0; k < 8; ++k)
              if (l0 + k >= L || !visible(b, t, l0 + k)) pj[k] = -INFINITY;
          top[j] = _mm256_max_ps(top[j], _mm256_loadu_ps(pj));
        }
      }
      for (int64_t j = 0; j < nq; ++j) {
        float* pj = p.data() + j * padded;
        const __m256 peak = _mm256_set1_ps(hmax(top[j]));
        for (int64_t l = 0; l < padded; l += 8) _mm256_storeu_ps(pj + l, exp8(_mm256_sub_ps(_mm256_loadu_ps(pj + l), peak)));
      }
      // Values: per query, accumulators over the dims in slices of 64 (eight registers) that take the
      // keys in key order, block after block, with the softmax denominator summed in key order too.
      // Masked keys weigh exactly 0 and are skipped, so a tree node, whose ancestors lie among masked
      // keys, sums exactly what plain decoding sums.
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(total.begin(), total.end(), 0.f);
      for (int64_t b0 = 0; b0 < L; b0 += kBlock) {
        const int64_t b1 = std::min(L, b0 + kBlock);
        for (int64_t j = 0; j < nq; ++j) {
          const float* pj = p.data() + j * padded;
          for (int64_t i0 = 0; i0 < hd; i0 += 64) {
            float* aj = acc.data() + j * hd + i0;
            const float sum = weigh_slice(std::min<int64_t>(64, hd - i0) / 8, pj, vh + i0, keys, hd, b0, b1, aj, total[j]);
            if (i0 == 0) total[j] = sum;
          }
        }
      }
      for (int64_t j = 0; j < nq; ++j) {
        const __m256 inv = _mm256_set1_ps(1.f / total[j]);
        const float* aj = acc.data() + j * hd;
        for (int64_t i = 0; i < hd; i += 8) _mm256_storeu_ps(op + row(j) * hd + i, _mm256_mul_ps(_mm256_loadu_ps(aj + i), inv));
      }
    }
  });
  return out;
}

torch::Tensor batch_attention(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                              torch::Tensor& k_cache, torch::Tensor& v_cache, const Batch& batch, int64_t heads,
                              double scale) {
  const int64_t hd = k_cache.size(2);
  TORCH_CHECK(qkv.is_contiguous() && qkv.scalar_type() == torch::kFloat32 && qkv.dim() == 2 &&
              qkv.size(1) == (heads + 2 * k_cache.size(0)) * hd, "qkv: [R, (H + 2 KV) hd] float32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && hd % 8 == 0 && hd <= 256 &&
              v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "pool: contiguous [KV, S, hd] keys and values of one dtype");
  if (k_cache.scalar_type() == torch::kHalf)
    return attend<at::Half>(qkv, cos, sin, k_cache, v_cache, batch, heads, scale);
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32, "pool: float32 or float16");
  return attend<float>(qkv, cos, sin, k_cache, v_cache, batch, heads, scale);
}

// A q4 layer's two halves as one call each, so a decoding step dispatches 2 calls a layer rather
// than about 20 (the same kernels as above; silu(gate) * up and the residual adds in place).
torch::Tensor q4_attention_block(const torch::Tensor& x, const torch::Tensor& norm, double eps, const PackedQ4& qkv,
                                 const PackedQ4& o, const torch::Tensor& cos, const torch::Tensor& sin,
                                 torch::Tensor& k_cache, torch::Tensor& v_cache, const Batch& batch, int64_t heads,
                                 double scale) {
  const auto h = q4_linear(rms_norm(x, norm, eps), qkv);
  const auto attn = batch_attention(h, cos, sin, k_cache, v_cache, batch, heads, scale);
  return x + q4_linear(attn, o);
}

// silu(gate) * up for rows [gate | up] of the fused projection: [T, 2F] -> [T, F].
torch::Tensor silu_mul(const torch::Tensor& gu) {
  const int64_t T = gu.size(0), F = gu.size(1) / 2;
  auto act = torch::empty({T, F}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* a = act.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float *gate = g + t * 2 * F, *up = gate + F;
    float* at = a + t * F;
    int64_t i = 0;
    for (; i + 8 <= F; i += 8) {  // silu(v) = v / (1 + exp(-v))
      const __m256 v = _mm256_loadu_ps(gate + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
      _mm256_storeu_ps(at + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < F; ++i) at[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  }
  return act;
}

torch::Tensor q4_mlp_block(const torch::Tensor& x, const torch::Tensor& norm, double eps, const PackedQ4& gate_up,
                           const PackedQ4& down) {
  return x + q4_linear(silu_mul(q4_linear(rms_norm(x, norm, eps), gate_up)), down);
}

// ---- an EAGLE-3 draft head's layer in one call -------------------------------------------------------
//
// forerun.heads.eagle3: a drafting step runs one decoder layer over one to a few rows per sequence, and
// its arithmetic (under a tenth of a millisecond of weights on these kernels) was a third of the step:
// the rest was the two dozen tensor ops PyTorch dispatched around it. This is the same layer as
// Eagle3Head.step_batch computes with its packed weights, as one call.

// A projection of the head, on 4- or 8-bit blocks.
struct HeadLinear {
  bool q4 = false;
  PackedQ4 w4;
  PackedQ8 w8;

  torch::Tensor operator()(const torch::Tensor& x) const { return q4 ? q4_linear(x, w4) : q8_linear(x, w8); }
};

struct EagleLayer {
  torch::Tensor embed;  // [V, D] float32: the target's token embedding
  torch::Tensor input_norm, hidden_norm, post_norm, final_norm;  // [D] float32
  torch::Tensor inv_freq;  // [hd / 2] float32
  HeadLinear q, kv, o, gate_up, down, lm_head;  // kv: k and v fused
  int64_t heads, kv_heads, head_dim;
  double eps;
  bool norm_before_residual;
};

// Attention of one query row (row t of a step's T rows of one sequence; q: [heads, hd], rotated) over
// its sequence's cache (rows [first, before + T) of k, v: [cap, KV hd] float32, the step's rows at
// before..before + T - 1). The row sees every row below `visible`; of the later ones, those its mask row
// says (mask: [T, before - visible + T], or null: all committed rows and causal among the step's).
void head_attend_row(const float* q, const float* k, const float* v, int64_t first, int64_t visible, int64_t before,
                     int64_t T, int64_t t, const bool* mask, int64_t heads, int64_t kv_heads, int64_t hd, float* out,
                     std::vector<float>& p) {
  const int64_t group = heads / kv_heads, width = kv_heads * hd, cols = before - visible + T;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  p.resize(before + T - first);
  auto sees = [&](int64_t l) {
    if (l < visible) return true;
    return mask ? mask[t * cols + (l - visible)] : l < before + t + 1;
  };
  for (int64_t h = 0; h < heads; ++h) {
    const float* qh = q + h * hd;
    const int64_t kvh = h / group;
    float top = -INFINITY;
    for (int64_t l = first; l < before + T; ++l) {
      float s = -INFINITY;
      if (sees(l)) {
        const float* kl = k + l * width + kvh * hd;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(kl + i), acc);
        s = hsum(acc) * scale;
      }
      p[l - first] = s;
      top = std::max(top, s);
    }
    float total = 0.f;
    float* oh = out + h * hd;
    std::fill(oh, oh + hd, 0.f);
    for (int64_t l = first; l < before + T; ++l) {
      if (p[l - first] == -INFINITY) continue;
      const float w = std::exp(p[l - first] - top);
      total += w;
      const float* vl = v + l * width + kvh * hd;
      for (int64_t i = 0; i < hd; i += 8)
        _mm256_storeu_ps(oh + i, _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(vl + i), _mm256_loadu_ps(oh + i)));
    }
    const __m256 inv = _mm256_set1_ps(1.f / total);
    for (int64_t i = 0; i < hd; i += 8) _mm256_storeu_ps(oh + i, _mm256_mul_ps(_mm256_loadu_ps(oh + i), inv));
  }
}

// cos and sin of one position's rotary angles, HF's half-split layout: [hd] each.
inline void rope_angles(int64_t position, const float* inv_freq, int64_t hd, float* cs, float* sn) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = static_cast<float>(position) * inv_freq[i];
    cs[i] = cs[i + half] = std::cos(a);
    sn[i] = sn[i + half] = std::sin(a);
  }
}

// The layer over R rows of B sequences: tokens [R] int64, hidden [R, D] (fc of the target's features, or
// the head's own output), positions [R] int64. Sequence b's rows are info[b] = (T, before, visible,
// first, mask offset or -1) (see head_attend_row) against caches[b] = (k, v); every row's rotated key and
// value are written into them. Only out_rows (ascending) go on through attention, o, the MLP and the
// draft logits: the rows a step catches up on need their keys and values alone, but for the last.
// Returns their output hidden states [Q, D] and draft logits [Q, V_draft].
std::vector<torch::Tensor> eagle_layer(const EagleLayer& L, const torch::Tensor& tokens, const torch::Tensor& hidden,
                                       const torch::Tensor& positions, const std::vector<torch::Tensor>& k_caches,
                                       const std::vector<torch::Tensor>& v_caches, const torch::Tensor& info,
                                       const torch::Tensor& mask, const torch::Tensor& out_rows) {
  const int64_t R = tokens.size(0), D = L.embed.size(1), B = info.size(0);
  const int64_t H = L.heads, KV = L.kv_heads, hd = L.head_dim;
  TORCH_CHECK(tokens.scalar_type() == torch::kInt64 && positions.scalar_type() == torch::kInt64 && tokens.is_contiguous() &&
              positions.is_contiguous() && positions.size(0) == R, "tokens, positions: [R] int64");
  TORCH_CHECK(hidden.scalar_type() == torch::kFloat32 && hidden.is_contiguous() && hidden.dim() == 2 &&
              hidden.size(0) == R && hidden.size(1) == D, "hidden: contiguous [R, D] float32");
  TORCH_CHECK(info.scalar_type() == torch::kInt64 && info.is_contiguous() && info.dim() == 2 && info.size(1) == 5 &&
              static_cast<int64_t>(k_caches.size()) == B && static_cast<int64_t>(v_caches.size()) == B,
              "info: [B, 5] int64, one cache per sequence");
  TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.is_contiguous(), "mask: bool");
  TORCH_CHECK(out_rows.scalar_type() == torch::kInt64 && out_rows.is_contiguous() && out_rows.dim() == 1, "out_rows: [Q] int64");
  TORCH_CHECK(hd % 8 == 0 && D % 8 == 0 && hd <= 256, "head_dim and hidden size: multiples of 8");
  const int64_t* in = info.data_ptr<int64_t>();
  std::vector<int64_t> row_seq(R), row_t(R);
  int64_t rows = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t T = in[5 * b], before = in[5 * b + 1], visible = in[5 * b + 2], first = in[5 * b + 3], off = in[5 * b + 4];
    const auto& k = k_caches[b];
    TORCH_CHECK(T >= 1 && rows + T <= R && 0 <= first && first <= visible && visible <= before, "sequence ", b, ": rows out of order");
    TORCH_CHECK(k.scalar_type() == torch::kFloat32 && k.is_contiguous() && k.dim() == 2 && k.size(1) == KV * hd &&
                k.size(0) >= before + T && v_caches[b].sizes() == k.sizes() && v_caches[b].is_contiguous() &&
                v_caches[b].scalar_type() == torch::kFloat32, "sequence ", b, ": caches [capacity >= rows, KV hd] float32");
    TORCH_CHECK(off < 0 || off + T * (before - visible + T) <= mask.numel(), "sequence ", b, ": mask out of range");
    for (int64_t t = 0; t < T; ++t) row_seq[rows + t] = b, row_t[rows + t] = t;
    rows += T;
  }
  TORCH_CHECK(rows == R, "info covers ", rows, " rows of ", R);
  const int64_t Q = out_rows.size(0);
  const int64_t* op = out_rows.data_ptr<int64_t>();
  for (int64_t j = 0; j < Q; ++j) TORCH_CHECK(op[j] >= 0 && op[j] < R && (j == 0 || op[j] > op[j - 1]), "out_rows: ascending rows of the step");
  const int64_t* tp = tokens.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  const int64_t V = L.embed.size(0);
  // [norm(embedding) | norm(hidden)]
  auto x = torch::empty({R, 2 * D}, hidden.options());
  float* xp = x.data_ptr<float>();
  const float *hp = hidden.data_ptr<float>(), *ep = L.embed.data_ptr<float>();
  const float eps = static_cast<float>(L.eps);
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "token ", tp[r], " outside the vocabulary");
    rms_norm_row(ep + tp[r] * D, L.input_norm.data_ptr<float>(), D, eps, xp + r * 2 * D);
    rms_norm_row(hp + r * D, L.hidden_norm.data_ptr<float>(), D, eps, xp + r * 2 * D + D);
  }
  // every row's key and value, rotated, into its sequence's cache
  auto kv = L.kv(x);
  TORCH_CHECK(kv.size(1) == 2 * KV * hd, "kv gives ", kv.size(1), " outputs, not 2 x kv heads x head_dim = ", 2 * KV * hd);
  const float* fp = L.inv_freq.data_ptr<float>();
  std::vector<float> cs(hd), sn(hd);
  float* kvp = kv.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t b = row_seq[r], at = in[5 * b + 1] + row_t[r];
    rope_angles(pp[r], fp, hd, cs.data(), sn.data());
    float* row = kvp + r * 2 * KV * hd;
    for (int64_t h = 0; h < KV; ++h) rotate(row + h * hd, cs.data(), sn.data(), hd);
    std::copy(row, row + KV * hd, k_caches[b].data_ptr<float>() + at * KV * hd);
    std::copy(row + KV * hd, row + 2 * KV * hd, v_caches[b].data_ptr<float>() + at * KV * hd);
  }
  // the output rows: queries, attention, o, the MLP, the draft logits
  auto picked = x.index_select(0, out_rows);
  auto q = L.q(picked);
  TORCH_CHECK(q.size(1) == H * hd, "q gives ", q.size(1), " outputs, not heads x head_dim = ", H * hd);
  auto attn = torch::empty({Q, H * hd}, hidden.options());
  float *qp = q.data_ptr<float>(), *ap = attn.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  std::vector<float> p;
  for (int64_t j = 0; j < Q; ++j) {
    const int64_t r = op[j], b = row_seq[r], off = in[5 * b + 4];
    rope_angles(pp[r], fp, hd, cs.data(), sn.data());
    for (int64_t h = 0; h < H; ++h) rotate(qp + (j * H + h) * hd, cs.data(), sn.data(), hd);
    head_attend_row(qp + j * H * hd, k_caches[b].data_ptr<float>(), v_caches[b].data_ptr<float>(), in[5 * b + 3],
                    in[5 * b + 2], in[5 * b + 1], in[5 * b], row_t[r], off < 0 ? nullptr : mp + off, H, KV, hd,
                    ap + j * H * hd, p);
  }
  auto residual = L.norm_before_residual ? picked.narrow(1, D, D).contiguous() : hidden.index_select(0, out_rows);
  auto h1 = residual + L.o(attn);
  auto out = h1 + L.down(silu_mul(L.gate_up(rms_norm(h1, L.post_norm, L.eps))));
  return {out, L.lm_head(rms_norm(out, L.final_norm, L.eps))};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  use_avx512(std::getenv("FORERUN_NO_AVX512") == nullptr);
  // The compute calls let go of the GIL: a server's event loop (and any other Python thread) runs
  // while the engine thread is inside a kernel, rather than only between kernels.
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  pybind11::class_<PackedQ4>(m, "PackedQ4", pybind11::module_local());
  m.def("pack_q4", &pack_q4, "q4 weights in the kernels' layout (see PackedQ4)");
  m.def("cpu_features", &cpu_features, "which q4 kernels run: avx512 (VNNI) or avx2");
  m.def("use_avx512", &use_avx512, "turn the AVX-512 VNNI kernels on (where the CPU has them) or off; returns the state");
  pybind11::class_<Batch>(m, "Batch", pybind11::module_local())
      .def(pybind11::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                          torch::Tensor>());
  m.def("q4_attention_block", &q4_attention_block, nogil, "x + o(attention(rope(qkv(rms_norm(x))))) for a q4 layer");
  m.def("q4_mlp_block", &q4_mlp_block, nogil, "x + down(silu(gate) * up) of rms_norm(x) for a q4 layer");
  m.def("rms_norm", &rms_norm, nogil, "x * rsqrt(mean(x^2) + eps) * weight over the last dim, float32");
  m.def("batch_attention", &batch_attention, nogil, "rope, pool write and attention for the rows of many sequences (float32; the pool float32 or float16)");
  m.def("q4_linear", &q4_linear, nogil, "x[M, K] @ W^T for 4-bit W (PackedQ4) with a scale and offset per 32 inputs");
  m.def("q8_linear", &q8_linear, nogil, "x[M, K] @ W^T for 8-bit W (PackedQ8) with a scale per 32 or 16 inputs, offsets optional");
  pybind11::class_<PackedQ8>(m, "PackedQ8", pybind11::module_local());
  m.def("pack_q8", &pack_q8, "q8 weights in the kernels' layout (see PackedQ8)");
  pybind11::class_<HeadLinear>(m, "HeadLinear", pybind11::module_local());
  m.def("head_linear", [](const PackedQ4& w) { return HeadLinear{true, w, PackedQ8{}}; });
  m.def("head_linear", [](const PackedQ8& w) { return HeadLinear{false, PackedQ4{}, w}; });
  pybind11::class_<EagleLayer>(m, "EagleLayer", pybind11::module_local())
      .def(pybind11::init([](torch::Tensor embed, torch::Tensor input_norm, torch::Tensor hidden_norm, torch::Tensor post_norm,
                             torch::Tensor final_norm, torch::Tensor inv_freq, HeadLinear q, HeadLinear kv, HeadLinear o,
                             HeadLinear gate_up, HeadLinear down, HeadLinear lm_head, int64_t heads, int64_t kv_heads,
                             int64_t head_dim, double eps, bool norm_before_residual) {
        for (const auto* t : {&embed, &input_norm, &hidden_norm, &post_norm, &final_norm, &inv_freq})
          TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous(), "EagleLayer: contiguous float32 tensors");
        TORCH_CHECK(embed.dim() == 2, "EagleLayer: embed [V, D]");
        for (const auto* t : {&input_norm, &hidden_norm, &post_norm, &final_norm})
          TORCH_CHECK(t->numel() == embed.size(1), "EagleLayer: norms of the embedding's width");
        TORCH_CHECK(heads % kv_heads == 0 && inv_freq.numel() * 2 == head_dim, "EagleLayer: heads and rope do not fit");
        return EagleLayer{embed, input_norm, hidden_norm, post_norm, final_norm, inv_freq, q, kv, o, gate_up, down, lm_head,
                          heads, kv_heads, head_dim, eps, norm_before_residual};
      }));
  m.def("eagle_layer", &eagle_layer, nogil, "an EAGLE-3 head's layer over the rows of many sequences: every row's keys and values, the outputs and draft logits of some");
}
