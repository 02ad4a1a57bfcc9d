// One-warp kernels that run each primitive of common/tile_mma.cuh on a single tile, for tests/test_tile_mma.py:
// cp.async into swizzled shared memory, ldmatrix (plain and .trans), mma.sync; checked against a plain
// matmul and against the PTX ISA's fragment tables, on the emulator in CI and on a GPU when there is one.
#pragma once
#include <cstdint>

#include "common/tile_mma.cuh"

namespace kdk {

struct TileCheckArgs {
  const unsigned char* a;  // 16-bit: (16, 16) row-major; tf32: float32 (16, 8)
  const unsigned char* b;  // 16-bit: B (16, 8) row-major [k][n], or kBT: B^T (8, 16) [n][k]; tf32: (8, 8) [k][n]
  const float* c;          // (16, 8)
  float* d;                // (16, 8): D = A B + C
  uint32_t* regs;          // ldmatrix checks: (32, 4) registers of each lane
  int m_valid;             // rows of A copied; cp.async zero-fills the others
};

enum TileCheck : int { kTileMma = 0, kTileMmaTF32 = 1, kTileLdmatrix = 2 };

// D = A B + C on one m16n8k16 tile. A: 16 rows of 32 B, two 16-byte chunks each, swizzled; B: 16 rows of
// 16 B ([k][n], read with ldmatrix .trans) or B^T: 8 rows of 32 B ([n][k], swizzled, plain ldmatrix).
template <bool kBF16, bool kBT> __global__ void __launch_bounds__(32) tile_mma_check_kernel(TileCheckArgs p) {
#if KDK_TENSOR_CORES
  KDK_STATIC_SMEM(uint4, sa, [32]);
  KDK_STATIC_SMEM(uint4, sb, [16]);
  const int l = threadIdx.x, g = l >> 2, t = l & 3;
  {  // each lane copies one 16-byte chunk of A and (lanes < 16) one of B
    const int row = l >> 1, chunk = l & 1;
    tile::cp_async16(&sa[row * 2 + tile::swizzle<2>(row, chunk)], p.a + row * 32 + chunk * 16, row < p.m_valid);
    if (l < 16) {
      const int br = kBT ? l >> 1 : l, bc = kBT ? tile::swizzle<2>(br, l & 1) : 0;
      tile::cp_async16(&sb[kBT ? br * 2 + bc : br], p.b + l * 16);
    }
    tile::cp_async_commit();
    tile::cp_async_wait<0>();
    __syncwarp();
  }
  uint32_t a[4], b[2];
  {  // lane l addresses row l % 8 of matrix l / 8: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15), the a[] order
    const int i = l >> 3, row = (i & 1) * 8 + (l & 7);
    tile::ldmatrix<4>(a, &sa[row * 2 + tile::swizzle<2>(row, i >> 1)]);
  }
  if (kBT) {  // matrix i: rows n 0-7 at k 8i..8i+7
    const int i = (l >> 3) & 1, n = l & 7;
    tile::ldmatrix<2>(b, &sb[n * 2 + tile::swizzle<2>(n, i)]);
  } else {  // matrix i: rows k 8i..8i+7, transposed into the col-major B fragment
    tile::ldmatrix<2, true>(b, &sb[l & 15]);
  }
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = p.c[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  tile::mma16816<kBF16>(d, a, b, c);
  for (int i = 0; i < 4; ++i) p.d[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
#endif
}

// D = A B + C on one m16n8k8 TF32 tile; operands read from shared memory with plain loads and rounded to TF32.
__global__ void __launch_bounds__(32) tile_mma_tf32_check_kernel(TileCheckArgs p) {
#if KDK_TENSOR_CORES
  KDK_STATIC_SMEM(uint4, sa4, [32]);  // uint4: the 16-byte alignment cp.async needs
  KDK_STATIC_SMEM(uint4, sb4, [16]);
  float* sa = reinterpret_cast<float*>(&sa4[0]);
  float* sb = reinterpret_cast<float*>(&sb4[0]);
  const int l = threadIdx.x, g = l >> 2, t = l & 3;
  tile::cp_async16(&sa[l * 4], p.a + l * 16, l / 2 < p.m_valid);  // 32 chunks: 2 per row of 8 floats
  if (l < 16) tile::cp_async16(&sb[l * 4], p.b + l * 16);
  tile::cp_async_commit();
  tile::cp_async_wait<0>();
  __syncwarp();
  const uint32_t a[4] = {tile::to_tf32(sa[g * 8 + t]), tile::to_tf32(sa[(g + 8) * 8 + t]),
                         tile::to_tf32(sa[g * 8 + t + 4]), tile::to_tf32(sa[(g + 8) * 8 + t + 4])};
  const uint32_t b[2] = {tile::to_tf32(sb[t * 8 + g]), tile::to_tf32(sb[(t + 4) * 8 + g])};
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = p.c[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  tile::mma1688_tf32(d, a, b, c);
  for (int i = 0; i < 4; ++i) p.d[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
#endif
}

// Every lane's registers after ldmatrix .xN (.trans) of the (16, 16) 16-bit input: matrix i is the 8 x 8 block
// at rows (i & 1) * 8, columns (i >> 1) * 8 (unswizzled rows of 32 B here: the layout is what is checked).
template <int N, bool kTrans> __global__ void __launch_bounds__(32) tile_ldmatrix_check_kernel(TileCheckArgs p) {
#if KDK_TENSOR_CORES
  KDK_STATIC_SMEM(uint4, sa, [32]);
  const int l = threadIdx.x;
  tile::cp_async16(&sa[l], p.a + l * 16);
  tile::cp_async_commit();
  tile::cp_async_wait<0>();
  __syncwarp();
  const int i = (l >> 3) % N, row = (i & 1) * 8 + (l & 7);
  uint32_t r[N];
  tile::ldmatrix<N, kTrans>(r, &sa[row * 2 + (i >> 1)]);
  for (int j = 0; j < 4; ++j) p.regs[l * 4 + j] = j < N ? r[j] : 0u;
#endif
}

}  // namespace kdk
