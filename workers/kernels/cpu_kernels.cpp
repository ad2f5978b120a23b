// CPU kernels for the serving hot path, called through ctypes (workers/kernels/cpu.py builds and loads them).
//
// Why: on a CPU a decode step of a small model is dominated by per-call overhead, not arithmetic. One
// torch SDPA call per sequence per layer (the ragged path) costs 50-180 us for a single query over a few hundred
// keys; at batch 64 that is 1,920 calls and 75% of the step. Here one call per layer covers every short query
// run of the batch (decode rows, verify blocks, drafter blocks), each work item (query row x KV head) on its own
// thread, reading its keys straight from the paged cache (no gather, no padding, no mask tensor).
//
// Types: T = float (fp32) or uint16_t holding bf16. Math in fp32; bf16 results rounded to nearest even.
// Built with -O3 -march=native -fopenmp; OpenMP resolves to the libgomp torch already loaded (one thread pool).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float load(float x) { return x; }
inline float load(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, float x) { *p = x; }
inline void store(uint16_t* p, float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    *p = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  *p = static_cast<uint16_t>(u >> 16);
}

// Attention of short query runs over a paged KV cache.
//   q      [N, nh, hd]            this step's queries (RoPE applied), rows of the flat batch
//   kc, vc [S, kvh, hd]           the cache viewed flat by slot (slot = block * block_size + offset)
//   out    [N, nh, hd]            written for the rows of the listed sequences only
//   meta   [nseq, 5] int64        per sequence: row0 (first query row), n (query rows), kv0 (keys before its own
//                                 keys: the cached prefix), slot0 (slot of position 0 when the sequence's blocks
//                                 are one contiguous run, else -1), trow (its row of tables)
//   tables [*, tstride] int64     block tables (read when slot0 < 0)
// Keys of a sequence are positions 0 .. kv0 + n - 1 in the cache (its own n keys already written there).
// causal = 1: query j sees positions < kv0 + j + 1 (target decode / verify); causal = 0: every query sees all
// kv0 + n positions (the DFlash drafter's block: non-causal over context + own block).
//
// One work item = one sequence x one KV head x up to ROWS query rows: its R = rows x group query vectors share
// every key and value row. Keys and values are converted to fp32 one TILE at a time and used by all R vectors:
// scores with the keys transposed ([HD, TILE]: the inner loop runs across keys, 4 query vectors at a time, no
// horizontal sums), values accumulated across head_dim 2 query vectors at a time (accumulators in registers).
constexpr int64_t TILE = 16;
constexpr int64_t ROWS = 8;

template <typename T, int64_t HD>
void attention(const T* q, const T* kc, const T* vc, T* out, int64_t nseq, const int64_t* meta,
               const int64_t* tables, int64_t tstride, int64_t block_size, int64_t nh, int64_t kvh, float scale,
               int causal, int nthreads) {
  const int64_t group = nh / kvh;
  std::vector<int64_t> first(nseq + 1, 0);  // first work item of each sequence
  for (int64_t s = 0; s < nseq; ++s) first[s + 1] = first[s] + ((meta[s * 5 + 1] + ROWS - 1) / ROWS) * kvh;
  const int64_t total = first[nseq];
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> qf, acc, scores;
    alignas(64) float kt[HD * TILE];
    alignas(64) float vt[TILE * HD];
    std::vector<int64_t> slots, lens;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < total; ++item) {
      const int64_t s = std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1;
      const int64_t* m = meta + s * 5;
      const int64_t local = item - first[s];
      const int64_t chunk = local / kvh, g = local % kvh;
      const int64_t n = m[1], kv0 = m[2], slot0 = m[3], trow = m[4];
      const int64_t j0 = chunk * ROWS, rows = std::min(ROWS, n - j0);
      const int64_t nvec = rows * group;  // query vectors of this item: row-major (row, head)
      const int64_t nvec4 = (nvec + 3) / 4 * 4;  // padded to the QK block of 4 (zero vectors)
      const int64_t len = kv0 + (causal ? j0 + rows : n);  // keys any of them sees
      slots.resize(len);
      for (int64_t t = 0; t < len; ++t)
        slots[t] = slot0 >= 0 ? slot0 + t : tables[trow * tstride + t / block_size] * block_size + t % block_size;
      lens.assign(nvec4, 0);
      qf.assign(nvec4 * HD, 0.f);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t h = 0; h < group; ++h) {
          const int64_t vec = r * group + h;
          lens[vec] = kv0 + (causal ? j0 + r + 1 : n);
          const T* qr = q + ((m[0] + j0 + r) * nh + g * group + h) * HD;
          for (int64_t d = 0; d < HD; ++d) qf[vec * HD + d] = load(qr[d]) * scale;
        }
      const int64_t padded = (len + TILE - 1) / TILE * TILE;
      scores.assign(nvec4 * padded, 0.f);
      for (int64_t t0 = 0; t0 < len; t0 += TILE) {
        const int64_t tn = std::min(TILE, len - t0);
        for (int64_t tt = 0; tt < TILE; ++tt) {  // keys transposed to [HD, TILE] fp32 (zeros past the end)
          const T* kr = kc + (slots[t0 + std::min(tt, tn - 1)] * kvh + g) * HD;
          for (int64_t d = 0; d < HD; ++d) kt[d * TILE + tt] = tt < tn ? load(kr[d]) : 0.f;
        }
        for (int64_t v0 = 0; v0 < nvec4; v0 += 4) {
          float s0[TILE] = {0.f}, s1[TILE] = {0.f}, s2[TILE] = {0.f}, s3[TILE] = {0.f};
          const float *q0 = qf.data() + v0 * HD, *q1 = q0 + HD, *q2 = q1 + HD, *q3 = q2 + HD;
          for (int64_t d = 0; d < HD; ++d) {
            const float a0 = q0[d], a1 = q1[d], a2 = q2[d], a3 = q3[d];
            const float* kd = kt + d * TILE;
#pragma omp simd
            for (int64_t tt = 0; tt < TILE; ++tt) {
              s0[tt] += a0 * kd[tt];
              s1[tt] += a1 * kd[tt];
              s2[tt] += a2 * kd[tt];
              s3[tt] += a3 * kd[tt];
            }
          }
          std::memcpy(scores.data() + (v0 + 0) * padded + t0, s0, sizeof(s0));
          std::memcpy(scores.data() + (v0 + 1) * padded + t0, s1, sizeof(s1));
          std::memcpy(scores.data() + (v0 + 2) * padded + t0, s2, sizeof(s2));
          std::memcpy(scores.data() + (v0 + 3) * padded + t0, s3, sizeof(s3));
        }
      }
      for (int64_t vec = 0; vec < nvec; ++vec) {  // softmax over each vector's visible keys; 0 past them
        float* sc = scores.data() + vec * padded;
        const int64_t lv = lens[vec];
        float mx = -INFINITY;
        for (int64_t t = 0; t < lv; ++t) mx = std::max(mx, sc[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < lv; ++t) {
          sc[t] = std::exp(sc[t] - mx);
          sum += sc[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < lv; ++t) sc[t] *= inv;
        for (int64_t t = lv; t < padded; ++t) sc[t] = 0.f;
      }
      const int64_t nvec2 = (nvec + 1) / 2 * 2;
      acc.assign(nvec2 * HD, 0.f);
      for (int64_t t0 = 0; t0 < len; t0 += TILE) {
        const int64_t tn = std::min(TILE, len - t0);
        for (int64_t tt = 0; tt < tn; ++tt) {
          const T* vr = vc + (slots[t0 + tt] * kvh + g) * HD;
          for (int64_t d = 0; d < HD; ++d) vt[tt * HD + d] = load(vr[d]);
        }
        for (int64_t v0 = 0; v0 < nvec2; v0 += 2) {
          alignas(64) float a0[HD], a1[HD];
          std::memcpy(a0, acc.data() + v0 * HD, sizeof(a0));
          std::memcpy(a1, acc.data() + (v0 + 1) * HD, sizeof(a1));
          const float* p0 = scores.data() + v0 * padded + t0;
          const float* p1 = v0 + 1 < nvec4 ? scores.data() + (v0 + 1) * padded + t0 : p0;
          for (int64_t tt = 0; tt < tn; ++tt) {
            const float b0 = p0[tt], b1 = p1[tt];
            const float* vd = vt + tt * HD;
#pragma omp simd
            for (int64_t d = 0; d < HD; ++d) {
              a0[d] += b0 * vd[d];
              a1[d] += b1 * vd[d];
            }
          }
          std::memcpy(acc.data() + v0 * HD, a0, sizeof(a0));
          std::memcpy(acc.data() + (v0 + 1) * HD, a1, sizeof(a1));
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t h = 0; h < group; ++h) {
          T* o = out + ((m[0] + j0 + r) * nh + g * group + h) * HD;
          const float* av = acc.data() + (r * group + h) * HD;
          for (int64_t d = 0; d < HD; ++d) store(o + d, av[d]);
        }
    }
  }
}

template <typename T>
int dispatch(const T* q, const T* kc, const T* vc, T* out, int64_t nseq, const int64_t* meta, const int64_t* tables,
             int64_t tstride, int64_t block_size, int64_t nh, int64_t kvh, int64_t hd, float scale, int causal,
             int nthreads) {
  switch (hd) {
    case 64:
      attention<T, 64>(q, kc, vc, out, nseq, meta, tables, tstride, block_size, nh, kvh, scale, causal, nthreads);
      return 0;
    case 128:
      attention<T, 128>(q, kc, vc, out, nseq, meta, tables, tstride, block_size, nh, kvh, scale, causal, nthreads);
      return 0;
    default:
      return -1;
  }
}

// out [rows] = index of the first maximum of each row of x [rows, n] (torch.argmax's tie rule; a NaN counts as
// the maximum, as in torch). One pass, no fp32 copy of bf16 logits.
template <typename T>
void argmax_rows(const T* x, int64_t* out, int64_t rows, int64_t n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows >= 4)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    int64_t best = 0;
    float bv = load(xr[0]);
    if (!std::isnan(bv)) {
      for (int64_t i = 1; i < n; ++i) {
        const float v = load(xr[i]);
        if (v > bv || std::isnan(v)) {
          best = i;
          bv = v;
          if (std::isnan(v)) break;
        }
      }
    }
    out[r] = best;
  }
}

// ---- small fused ops of a decoder layer (each replaces several torch calls of a few elements each) ----

// out = rmsnorm(s) * w with s = x (+ residual: then s, rounded to T, is also written to res_out). [rows, dim]
template <typename T>
void rmsnorm(const T* x, const T* residual, const T* w, T* out, T* res_out, int64_t rows, int64_t dim, float eps,
             int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows >= 16)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    T* o = out + r * dim;
    std::vector<float> buf(dim);
    float ss = 0.f;
    for (int64_t d = 0; d < dim; ++d) {
      float v = load(xr[d]);
      if (residual) {
        T rounded;
        store(&rounded, v + load(residual[r * dim + d]));
        res_out[r * dim + d] = rounded;
        v = load(rounded);
      }
      buf[d] = v;
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t d = 0; d < dim; ++d) store(o + d, buf[d] * inv * load(w[d]));
  }
}

// out [rows, inter] = silu(gu[:, :inter]) * gu[:, inter:]
template <typename T>
void silu_mul(const T* gu, T* out, int64_t rows, int64_t inter, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows >= 16)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gu + r * 2 * inter;
    const T* u = g + inter;
    T* o = out + r * inter;
    for (int64_t d = 0; d < inter; ++d) {
      const float a = load(g[d]);
      store(o + d, a / (1.f + std::exp(-a)) * load(u[d]));
    }
  }
}

// Llama attention inputs from the fused q/k/v projection: qkv [rows, (nh + 2 kvh) * hd] -> q_out [rows, nh, hd]
// rotated; k rotated and v written to the cache at slots [rows]. cos / sin [rows, hd] fp32 (rotate-half RoPE:
// x * cos + [-x2, x1] * sin).
template <typename T>
void rope_qkv(const T* qkv, const float* cos, const float* sin, const int64_t* slots, T* q_out, T* kc, T* vc,
              int64_t rows, int64_t nh, int64_t kvh, int64_t hd, int nthreads) {
  const int64_t half = hd / 2, width = (nh + 2 * kvh) * hd;
#pragma omp parallel for num_threads(nthreads) if (rows >= 16)
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = qkv + r * width;
    const float* c = cos + r * hd;
    const float* s = sin + r * hd;
    for (int64_t h = 0; h < nh + kvh; ++h) {
      const T* x = src + h * hd;
      T* o = h < nh ? q_out + (r * nh + h) * hd : kc + (slots[r] * kvh + (h - nh)) * hd;
      for (int64_t d = 0; d < half; ++d) {
        const float x1 = load(x[d]), x2 = load(x[d + half]);
        store(o + d, x1 * c[d] - x2 * s[d]);
        store(o + d + half, x2 * c[d + half] + x1 * s[d + half]);
      }
    }
    const T* v = src + (nh + kvh) * hd;
    T* vo = vc + slots[r] * kvh * hd;
    for (int64_t d = 0; d < kvh * hd; ++d) vo[d] = v[d];
  }
}

}  // namespace

extern "C" {

int specfleet_kernels_version() { return 4; }

// head_dim 64 or 128 (returns -1 for any other: the caller checks head_dims() first)
int attention_bf16(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, uint16_t* out, int64_t nseq,
                   const int64_t* meta, const int64_t* tables, int64_t tstride, int64_t block_size, int64_t nh,
                   int64_t kvh, int64_t hd, float scale, int causal, int nthreads) {
  return dispatch(q, kc, vc, out, nseq, meta, tables, tstride, block_size, nh, kvh, hd, scale, causal, nthreads);
}

int attention_f32(const float* q, const float* kc, const float* vc, float* out, int64_t nseq, const int64_t* meta,
                  const int64_t* tables, int64_t tstride, int64_t block_size, int64_t nh, int64_t kvh, int64_t hd,
                  float scale, int causal, int nthreads) {
  return dispatch(q, kc, vc, out, nseq, meta, tables, tstride, block_size, nh, kvh, hd, scale, causal, nthreads);
}

#define SPECFLEET_SMALL_OPS(SUFFIX, T)                                                                          \
  void rmsnorm_##SUFFIX(const T* x, const T* residual, const T* w, T* out, T* res_out, int64_t rows, int64_t dim, \
                        float eps, int nthreads) {                                                               \
    rmsnorm(x, residual, w, out, res_out, rows, dim, eps, nthreads);                                             \
  }                                                                                                              \
  void silu_mul_##SUFFIX(const T* gu, T* out, int64_t rows, int64_t inter, int nthreads) {                       \
    silu_mul(gu, out, rows, inter, nthreads);                                                                    \
  }                                                                                                              \
  void rope_qkv_##SUFFIX(const T* qkv, const float* cos, const float* sin, const int64_t* slots, T* q_out, T* kc, \
                         T* vc, int64_t rows, int64_t nh, int64_t kvh, int64_t hd, int nthreads) {               \
    rope_qkv(qkv, cos, sin, slots, q_out, kc, vc, rows, nh, kvh, hd, nthreads);                                  \
  }
void argmax_bf16(const uint16_t* x, int64_t* out, int64_t rows, int64_t n, int nthreads) {
  argmax_rows(x, out, rows, n, nthreads);
}
void argmax_f32(const float* x, int64_t* out, int64_t rows, int64_t n, int nthreads) {
  argmax_rows(x, out, rows, n, nthreads);
}
SPECFLEET_SMALL_OPS(bf16, uint16_t)
SPECFLEET_SMALL_OPS(f32, float)

}  // extern "C"
