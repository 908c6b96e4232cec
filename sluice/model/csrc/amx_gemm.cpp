// A bf16 GEMM on AMX tiles for weights that are dequantized on the fly (quant_linear.cpp's
// batched path for GGUF blocks and int8 weights):
//
//   amx::bf16_linear(out, m, n, k, x, ldx, bias, dequant):
//       out[i, j] = sum_c bf16(x[i, c]) * bf16(W[j, c]) (+ bias[j])   for i < m, j < n
//
// where dequant(j, y, step) writes weight row j rounded to bf16 (as uint16 bits), values
// 32c..32c+31 at y + c * step. Products are exact in float32
// (bf16 x bf16) and summed in float32; the only roundings are x and W to bf16 (round to
// nearest even), the same as oneDNN's bf16 GEMM on a bf16 weight.
//
// Layout (Intel AMX: 8 tile registers of up to 16 rows x 64 bytes). The weight is the A operand,
// so it needs no transposition: a panel of kPanelRows = 32 weight rows is dequantized once into
// bf16 [k / 32][32 rows][32 values] (A tile t of K chunk c = rows 16t..16t+15 of chunk c: 1 KiB,
// contiguous). The activations are the B operand in the pair-interleaved (VNNI) layout built
// once per call: for each 16-row group g of x and K chunk c, a 1 KiB tile whose row p holds, for
// the 16 x rows i, the pair (x[16g + i, 32c + 2p], x[16g + i, 32c + 2p + 1]) (zero rows pad m
// to a multiple of 16). TDPBF16PS then accumulates C[j][i] += sum_p A[j][2p..2p+1] . B[p][i],
// i.e. C = W_panel x^T: two weight tiles x up to two x tiles = four float32 C tiles, stored
// and written to out transposed. A panel's dequantization serves every row of x; panels are
// spread over the threads in dynamic chunks.
//
// Only the x86-64-v4 build holds the kernel, and it runs only where `available()`: the CPU
// reports AMX-TILE, AMX-BF16 and AVX512-BF16 and Linux granted this process the tile state
// (arch_prctl ARCH_REQ_XCOMP_PERM, asked once per process). Everywhere else callers keep their
// float32 path.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace amx {

constexpr int64_t kTileK = 32;      // bf16 values of K per tile product
constexpr int64_t kTileRows = 16;   // rows of a weight (A) or C tile; x rows of a B tile
constexpr int64_t kPanelRows = 32;  // weight rows per work item: two A tiles

#if defined(__AVX512F__) && defined(__AVX512BW__)

// AMX tile configuration (palette 1): bytes per row and rows of each of the 8 tiles.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0..3 C (C[t][u]: weight tile t, x tile u at 2u + t), 4..5 A (weight), 6..7 B (x).
__attribute__((target("amx-tile"))) inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTileRows;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

inline bool cpu_reports_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1, amx_bf16 = (d >> 22) & 1;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool avx512_bf16 = (a >> 5) & 1;
  return tile && amx_bf16 && avx512_bf16;
}

inline bool available() {
  static const bool ok = [] {
    if (!cpu_reports_amx_bf16()) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtileData) == 0;
  }();
  return ok;
}

// 32 floats -> 32 bf16 (round to nearest even) at dst.
__attribute__((target("avx512bf16,avx512f,avx512bw"))) inline void store_bf16x32(
    uint16_t* dst, const float* src) {
  const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
  _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(v));
}

// x [m, k] -> the B tiles (file comment): tiles [m_groups][k / 32][16 pairs][16 rows][2].
__attribute__((target("avx512bf16,avx512f,avx512bw"))) inline void pack_x(
    const float* x, int64_t ldx, int64_t m, int64_t k, uint16_t* tiles) {
  const int64_t chunks = k / kTileK, groups = (m + kTileRows - 1) / kTileRows;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = 0; c < chunks; ++c) {
      alignas(64) uint16_t row[kTileK];
      uint32_t* tile = reinterpret_cast<uint32_t*>(tiles + (g * chunks + c) * kTileK * kTileRows);
      for (int64_t i = 0; i < kTileRows; ++i) {
        const int64_t r = g * kTileRows + i;
        if (r < m)
          store_bf16x32(row, x + r * ldx + c * kTileK);
        else
          std::fill(row, row + kTileK, uint16_t{0});
        const uint32_t* pairs = reinterpret_cast<const uint32_t*>(row);
        for (int64_t p = 0; p < kTileK / 2; ++p) tile[p * kTileRows + i] = pairs[p];
      }
    }
}

// C tiles of one (weight panel, x tile pair): C[t][u] += A_t . B_u over every K chunk, then
// stored into c_out[32 weight rows][32 x rows] (float32, 128 bytes per row).
template <int U>
__attribute__((target("amx-tile,amx-bf16"))) inline void panel_product(
    const uint16_t* a, const uint16_t* b0, const uint16_t* b1, int64_t chunks, float* c_out) {
  constexpr int64_t kTile = kTileK * kTileRows;  // bf16 values per A or B tile
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (U == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, a + c * 2 * kTile, 64);
    _tile_loadd(5, a + c * 2 * kTile + kTile, 64);
    _tile_loadd(6, b0 + c * kTile, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if constexpr (U == 2) {
      _tile_loadd(7, b1 + c * kTile, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  constexpr int64_t ld = 2 * kTileRows * sizeof(float);
  _tile_stored(0, c_out, ld);
  _tile_stored(1, c_out + kTileRows * 2 * kTileRows, ld);
  if constexpr (U == 2) {
    _tile_stored(2, c_out + kTileRows, ld);
    _tile_stored(3, c_out + kTileRows * 2 * kTileRows + kTileRows, ld);
  }
}

// out[i * ldo + j] = c[j][i] (+ bias[j]) for i < xs, j < ws: c = float32 [32][32] (C tiles
// as panel_product stores them), gathered a column at a time (16 weight rows per gather).
inline void write_transposed(const float* c, int64_t xs, int64_t ws, const float* bias,
                             float* out, int64_t ldo) {
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                             5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(2 * kTileRows));
  for (int64_t h = 0; h < 2 && h * kTileRows < ws; ++h) {
    const int64_t cols = std::min(kTileRows, ws - h * kTileRows);
    const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + h * kTileRows)
                                     : _mm512_setzero_ps();
    const float* ch = c + h * kTileRows * 2 * kTileRows;
    for (int64_t i = 0; i < xs; ++i)
      _mm512_mask_storeu_ps(out + i * ldo + h * kTileRows, mask,
                            _mm512_add_ps(_mm512_i32gather_ps(column, ch + i, 4), b));
  }
}

template <typename Dequant>
__attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512f,avx512bw"))) void bf16_linear(
    float* out, int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx, const float* bias,
    Dequant&& dequant) {
  const int64_t chunks = k / kTileK, groups = (m + kTileRows - 1) / kTileRows;
  const int64_t panels = (n + kPanelRows - 1) / kPanelRows;
  std::vector<uint16_t> xt(groups * chunks * kTileK * kTileRows);
  pack_x(x, ldx, m, k, xt.data());
  const int64_t x_tile_stride = chunks * kTileK * kTileRows;  // bf16 values per x row group
#pragma omp parallel
  {
    configure_tiles();
    std::vector<uint16_t> wt(kPanelRows * k);  // [chunk][32 rows][32 values]
    alignas(64) float c_out[kPanelRows * 2 * kTileRows];
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * kPanelRows, rows = std::min(kPanelRows, n - n0);
      for (int64_t j = 0; j < kPanelRows; ++j) {
        if (j < rows) {
          dequant(n0 + j, wt.data() + j * kTileK, kPanelRows * kTileK);
        } else {
          for (int64_t c = 0; c < chunks; ++c)
            std::fill_n(wt.data() + (c * kPanelRows + j) * kTileK, kTileK, uint16_t{0});
        }
      }
      for (int64_t g = 0; g < groups; g += 2) {
        const uint16_t* b0 = xt.data() + g * x_tile_stride;
        const int64_t u = std::min<int64_t>(2, groups - g);
        if (u == 2)
          panel_product<2>(wt.data(), b0, b0 + x_tile_stride, chunks, c_out);
        else
          panel_product<1>(wt.data(), b0, nullptr, chunks, c_out);
        const int64_t i0 = g * kTileRows, i_end = std::min(m, (g + u) * kTileRows);
        write_transposed(c_out, i_end - i0, rows, bias != nullptr ? bias + n0 : nullptr,
                         out + i0 * n + n0, n);
      }
    }
    _tile_release();
  }
}

#else

inline bool available() { return false; }

template <typename Dequant>
void bf16_linear(float*, int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                 Dequant&&) {}

#endif

}  // namespace amx

bool amx_bf16_available() { return amx::available(); }
