// How the element-wise and reduction CUDA kernels cover a 4-D tensor, shared
// by the kernels, their host launch code and their CPU emulation.
//
// A tensor (N, C, rows, cols) is dense in one of two layouts:
// - NCHW: a "span" is one plane (n, c) of rows x cols elements, cut into tiles
//   of kTileThreads * kTileUnroll * V elements; thread t of a tile takes the
//   vector slots t, t + T, ... (V consecutive elements each).
// - channels_last: a span is one image row (n, i) of cols pixels x C
//   channels. Thread (cvl, r) of a block keeps the V channels
//   cv = group * Cb + cvl fixed and takes the pixels r, r + R, ... of a tile of
//   R * kTileUnroll pixels, so a warp reads whole contiguous pixels.
// Every thread so has kTileUnroll independent vector accesses in flight.
// Grids depend on the shape only, never on the device. Indices are 32-bit;
// block and vector-slot decoding goes through FastDivmod (a multiply-high).
#pragma once

#include <cstdint>

#include "fast_divmod.h"
#include "macros.h"

namespace dip_fast {

constexpr int kTileThreads = 256;  // threads per block
constexpr int kTileUnroll = 4;     // independent vector accesses per thread

// V elements loaded or stored as one (16, 8 or sizeof(T)-byte) access. Arrays
// of packs filled by conditional loads are value-initialised ({}): that keeps
// GCC's maybe-uninitialized warning quiet and costs a few register moves.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
DIP_HD Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
DIP_HD void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// The loads-first half of a thread's work: pack u comes from element
// (first + u * step) * elem_stride of ptr, for the slots below limit (NCHW:
// vector slots of a plane, elem_stride 1; channels_last: pixels of a row,
// elem_stride C). All kTileUnroll loads are issued before any is used.
template <typename T, int V, int U>
DIP_HD void load_slot_packs(const T* ptr, int first, int step, int limit, long long elem_stride, Pack<T, V> (&p)[U]) {
  DIP_UNROLL for (int u = 0; u < U; ++u) {
    const int e = first + u * step;
    if (e < limit) p[u] = load_pack<T, V>(ptr + static_cast<long long>(e) * elem_stride);
  }
}

struct Tiling {
  int N, C, rows, cols;
  bool cl;
  int V;        // elements per access
  int threads;  // threads per block
  int tile;     // NCHW: elements of a plane per tile; channels_last: pixels of a row per tile
  int tiles;    // tiles per span (plane or row)
  int spans;    // NCHW: N * C planes; channels_last: N * rows rows
  // channels_last thread shape: Cv = C / V channel vectors, Cb of them per
  // block (groups = ceil(Cv / Cb) blocks along y), R pixel lanes.
  int Cv, Cb, R, groups;
  FastDivmod by_tiles;  // block or work item -> (span, tile)
  FastDivmod by_C;      // NCHW plane -> (n, c)
  FastDivmod by_rows;   // channels_last row -> (n, i)
  FastDivmod by_cols;   // NCHW element of a plane -> (i, j)
  FastDivmod by_Cb;     // channels_last thread -> (r, cvl)
};

inline int ceil_div_int(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

inline uint32_t divisor_or_one(int d) { return d > 0 ? static_cast<uint32_t>(d) : 1u; }

// Host: the tiling of an (N, C, rows, cols) tensor for vector width V (which
// must divide C in channels_last and rows * cols in NCHW).
inline Tiling make_tiling(int N, int C, int rows, int cols, bool cl, int V) {
  Tiling t{};
  t.N = N;
  t.C = C;
  t.rows = rows;
  t.cols = cols;
  t.cl = cl;
  t.V = V;
  if (!cl) {
    t.threads = kTileThreads;
    t.tile = kTileThreads * kTileUnroll * V;
    t.tiles = ceil_div_int(static_cast<long long>(rows) * cols, t.tile);
    t.spans = N * C;
    t.Cv = t.Cb = t.R = t.groups = 1;
  } else {
    t.Cv = C / V;
    t.Cb = t.Cv < kTileThreads ? (t.Cv > 0 ? t.Cv : 1) : kTileThreads;
    t.R = kTileThreads / t.Cb;
    t.groups = ceil_div_int(t.Cv, t.Cb);
    t.threads = t.Cb * t.R;
    t.tile = t.R * kTileUnroll;
    t.tiles = ceil_div_int(cols, t.tile);
    t.spans = N * rows;
  }
  t.by_tiles = FastDivmod(divisor_or_one(t.tiles));
  t.by_C = FastDivmod(divisor_or_one(C));
  t.by_rows = FastDivmod(divisor_or_one(rows));
  t.by_cols = FastDivmod(divisor_or_one(cols));
  t.by_Cb = FastDivmod(divisor_or_one(t.Cb));
  return t;
}

// Blocks of an element-wise kernel over the tiling: (x, y).
inline long long tiling_blocks_x(const Tiling& t) { return static_cast<long long>(t.spans) * t.tiles; }
inline int tiling_blocks_y(const Tiling& t) { return t.cl ? t.groups : 1; }

// Widest V (in elements, V * size of 16 or 8 bytes) that every pointer address
// and every contiguous run length allows; 1 (the scalar path) always does.
// Only V in {16/size, 8/size, 1} are instantiated (with_vector_width).
inline int pick_vector_width(int elem_size, const uintptr_t* ptrs, int nptrs, const long long* runs, int nruns) {
  for (int bytes = 16; bytes >= 8; bytes /= 2) {
    const int V = bytes / elem_size;
    if (V < 2) break;
    bool ok = true;
    for (int i = 0; i < nptrs; ++i) ok = ok && (ptrs[i] % bytes == 0);
    for (int i = 0; i < nruns; ++i) ok = ok && (runs[i] % V == 0);
    if (ok) return V;
  }
  return 1;
}

// The emulation counts every store of an element-wise kernel (exactly-once
// check); the GPU build instantiates kCount = false and the counter vanishes.
template <bool kCount>
DIP_HD void count_stores(int* counts, long long first, int n) {
  if (kCount) {
    for (int l = 0; l < n; ++l) counts[first + l] += 1;
  }
}

}  // namespace dip_fast
