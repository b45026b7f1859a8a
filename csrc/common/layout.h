// Index arithmetic on 4-D tensors, shared by the CPU and CUDA code of every
// op: element offsets from strides, and the (n, c, h, w) of the e-th element
// in memory order (how the CUDA kernels and their CPU emulation map a flat
// thread index to an element).
#pragma once

#include "macros.h"

namespace dip_fast {

// Element offset of (n, c, h, w) in a dense tensor given its four strides.
struct Strides4 {
  long long n, c, h, w;
};

DIP_HD long long offset4(const Strides4& s, long long n, long long c, long long h, long long w) {
  return n * s.n + c * s.c + h * s.h + w * s.w;
}

// (n, c, h, w) of the e-th element of an N x C x H x W tensor, counted in its
// memory order, so that consecutive threads touch consecutive addresses.
DIP_HD void split_nchw(long long e, int C, int H, int W, bool channels_last, long long& n, long long& c, int& h,
                       int& w) {
  if (channels_last) {
    c = e % C;
    long long t = e / C;
    w = static_cast<int>(t % W);
    t /= W;
    h = static_cast<int>(t % H);
    n = t / H;
  } else {
    w = static_cast<int>(e % W);
    long long t = e / W;
    h = static_cast<int>(t % H);
    t /= H;
    c = t % C;
    n = t / C;
  }
}

}  // namespace dip_fast
