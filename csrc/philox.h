// Philox4x32-10 keyed by a 64-bit seed with counter (c, 0, 0, 0), as Triton's tl.randint4x(seed, c).
// Decision i takes word i % 4 of counter i / 4, so one Philox evaluation serves four decisions,
// and the C++, CUDA and Triton kernels (and the torch reference) draw identical noise.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SPOTTUNE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPOTTUNE_HOST_DEVICE inline
#endif

namespace spottune_ext {

SPOTTUNE_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

SPOTTUNE_HOST_DEVICE void philox4(int64_t seed, uint32_t counter, uint32_t out[4]) {
  uint32_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffu);
  uint32_t k1 = static_cast<uint32_t>((static_cast<uint64_t>(seed) >> 32) & 0xffffffffu);
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Uniform float in [0, 1) from a Philox word, as Triton's uint_to_uniform_float.
SPOTTUNE_HOST_DEVICE float uint_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

SPOTTUNE_HOST_DEVICE float philox_uniform(int64_t seed, int64_t i) {
  uint32_t words[4];
  philox4(seed, static_cast<uint32_t>(i >> 2), words);
  return uint_to_uniform(words[i & 3]);
}

}  // namespace spottune_ext
