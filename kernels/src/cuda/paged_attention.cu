// Salus paged-attention kernels (CUDA), compiled at run time with NVRTC.
//
// The host defines HEAD_DIM (-DHEAD_DIM=128) when compiling, so every per-lane
// array below has a compile-time size. No CUDA headers are included: f16/bf16
// values are handled as raw 16-bit words, so NVRTC needs no include path on the
// serving machine.
//
// Cache layout (one layer's K or V): [block][kv_head][slot][HEAD_DIM]. A key or
// value row is HEAD_DIM contiguous elements; a warp reads it with lane l owning
// dims l, l+32, l+64, ... (coalesced). Position p of a sequence lives in block
// block_table[p / block_size], slot p % block_size.
//
// Arithmetic is f32 throughout (scores, online softmax, accumulators); the
// query arrives as f32 and the output is written as f32.
//
// The "plan" is one int32 buffer the host uploads once per step (see
// paged_plan.rs): slot of every new row, decode items, prefill tiles and the
// flattened block tables.

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif

#define WARP 32
#define NWARPS 4
#define NTHREADS (WARP * NWARPS)
// Elements of a head row owned by one lane.
#define EPL ((HEAD_DIM + WARP - 1) / WARP)
// Query heads (of one GQA group) handled by one decode block.
#define MAXG 8
// Query rows per prefill tile and per warp.
#define QTILE 16
#define RPW (QTILE / NWARPS)
// Keys staged in shared memory per prefill iteration.
#define KTILE (HEAD_DIM <= 128 ? 32 : 16)

#define NEG_INF __int_as_float(0xff800000)

typedef unsigned short u16;
struct f16_t { u16 v; };
struct bf16_t { u16 v; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(f16_t x) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(x.v));
    return f;
}
__device__ __forceinline__ float to_f32(bf16_t x) {
    return __uint_as_float(((unsigned int)x.v) << 16);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// ---------------------------------------------------------------------------
// write_kv: copies the new K/V rows ([rows, kv_heads, HEAD_DIM], already in the
// cache dtype) into their slots. slots[row] = block * block_size + slot, or -1.
// grid (rows), block NTHREADS.
template <typename T>
__device__ void write_kv_impl(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ kc,
                              T* __restrict__ vc, const int* __restrict__ slots, int kv_heads,
                              int block_size) {
    const int row = blockIdx.x;
    const int slot = slots[row];
    if (slot < 0) return;
    const long long block = slot / block_size;
    const int off = slot % block_size;
    const int n = kv_heads * HEAD_DIM;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int h = i / HEAD_DIM;
        const int d = i - h * HEAD_DIM;
        const long long dst = ((block * kv_heads + h) * block_size + off) * HEAD_DIM + d;
        const long long src = (long long)row * n + i;
        kc[dst] = k[src];
        vc[dst] = v[src];
    }
}

// ---------------------------------------------------------------------------
// decode: one query row per item, split over (kv head, group chunk) and over
// partitions of the visible keys. Each warp takes every NWARPS-th key of the
// partition and keeps an online softmax per query head; the warps are merged
// in shared memory. With one partition the result is written to `out`; with
// several, the unnormalized partial (acc, max, sum) goes to the part buffers
// and `reduce_partitions` merges them.
// grid (items, kv_heads * chunks, max_parts), block NTHREADS.
template <typename T>
__device__ void decode_impl(float* __restrict__ out, float* __restrict__ part_acc,
                            float* __restrict__ part_max, float* __restrict__ part_sum,
                            const float* __restrict__ q, const T* __restrict__ kc,
                            const T* __restrict__ vc, const int* __restrict__ item_row,
                            const int* __restrict__ item_pos, const int* __restrict__ item_bt,
                            const int* __restrict__ block_tables, int num_heads, int kv_heads,
                            int block_size, int max_parts, int part_size, float scale, int window) {
    __shared__ float s_max[NWARPS][MAXG];
    __shared__ float s_sum[NWARPS][MAXG];
    __shared__ float s_acc[NWARPS][MAXG][HEAD_DIM];

    const int item = blockIdx.x;
    const int group = num_heads / kv_heads;
    const int chunks = (group + MAXG - 1) / MAXG;
    const int kvh = blockIdx.y / chunks;
    const int chunk = blockIdx.y - kvh * chunks;
    const int h0 = kvh * group + chunk * MAXG;
    const int ng = min(MAXG, group - chunk * MAXG);
    const int part = blockIdx.z;
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;

    const int row = item_row[item];
    const int ctx = item_pos[item] + 1;
    const int kstart = window > 0 ? max(0, ctx - window) : 0;
    const int nparts = (ctx - kstart + part_size - 1) / part_size;
    if (part >= nparts) return;
    const int p0 = kstart + part * part_size;
    const int p1 = min(ctx, p0 + part_size);
    const int* bt = block_tables + item_bt[item];

    float qr[MAXG][EPL];
    float acc[MAXG][EPL];
    float m[MAXG], l[MAXG];
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
        m[g] = NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
            const int d = lane + i * WARP;
            qr[g][i] = (g < ng && d < HEAD_DIM)
                           ? q[((long long)row * num_heads + h0 + g) * HEAD_DIM + d] * scale
                           : 0.f;
            acc[g][i] = 0.f;
        }
    }

    for (int p = p0 + warp; p < p1; p += NWARPS) {
        const long long base =
            (((long long)bt[p / block_size] * kv_heads + kvh) * block_size + (p % block_size)) * HEAD_DIM;
        float kr[EPL], vr[EPL];
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
            const int d = lane + i * WARP;
            kr[i] = d < HEAD_DIM ? to_f32(kc[base + d]) : 0.f;
            vr[i] = d < HEAD_DIM ? to_f32(vc[base + d]) : 0.f;
        }
#pragma unroll
        for (int g = 0; g < MAXG; ++g) {
            if (g < ng) {
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < EPL; ++i) s += qr[g][i] * kr[i];
                s = warp_sum(s);
                const float mn = fmaxf(m[g], s);
                const float c = __expf(m[g] - mn);
                const float e = __expf(s - mn);
                l[g] = l[g] * c + e;
#pragma unroll
                for (int i = 0; i < EPL; ++i) acc[g][i] = acc[g][i] * c + e * vr[i];
                m[g] = mn;
            }
        }
    }

#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
        if (g < ng) {
            if (lane == 0) {
                s_max[warp][g] = m[g];
                s_sum[warp][g] = l[g];
            }
#pragma unroll
            for (int i = 0; i < EPL; ++i) {
                const int d = lane + i * WARP;
                if (d < HEAD_DIM) s_acc[warp][g][d] = acc[g][i];
            }
        }
    }
    __syncthreads();

    for (int idx = threadIdx.x; idx < ng * HEAD_DIM; idx += blockDim.x) {
        const int g = idx / HEAD_DIM;
        const int d = idx - g * HEAD_DIM;
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, s_max[w][g]);
        float sum = 0.f, a = 0.f;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) {
            const float c = s_max[w][g] == NEG_INF ? 0.f : __expf(s_max[w][g] - mx);
            sum += s_sum[w][g] * c;
            a += s_acc[w][g][d] * c;
        }
        const int h = h0 + g;
        if (nparts == 1) {
            out[((long long)row * num_heads + h) * HEAD_DIM + d] = a / sum;
        } else {
            const long long pi = ((long long)item * num_heads + h) * max_parts + part;
            part_acc[pi * HEAD_DIM + d] = a;
            if (d == 0) {
                part_max[pi] = mx;
                part_sum[pi] = sum;
            }
        }
    }
}

// Merges the partitions of items that had more than one.
// grid (items, num_heads), block NTHREADS.
extern "C" __global__ void reduce_partitions(float* __restrict__ out, const float* __restrict__ part_acc,
                                             const float* __restrict__ part_max,
                                             const float* __restrict__ part_sum,
                                             const int* __restrict__ item_row,
                                             const int* __restrict__ item_pos, int num_heads,
                                             int max_parts, int part_size, int window) {
    const int item = blockIdx.x;
    const int h = blockIdx.y;
    const int ctx = item_pos[item] + 1;
    const int kstart = window > 0 ? max(0, ctx - window) : 0;
    const int nparts = (ctx - kstart + part_size - 1) / part_size;
    if (nparts <= 1) return;
    const long long p0 = ((long long)item * num_heads + h) * max_parts;
    float mx = NEG_INF;
    for (int p = 0; p < nparts; ++p) mx = fmaxf(mx, part_max[p0 + p]);
    float sum = 0.f;
    for (int p = 0; p < nparts; ++p) sum += part_sum[p0 + p] * __expf(part_max[p0 + p] - mx);
    const int row = item_row[item];
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float a = 0.f;
        for (int p = 0; p < nparts; ++p) a += part_acc[(p0 + p) * HEAD_DIM + d] * __expf(part_max[p0 + p] - mx);
        out[((long long)row * num_heads + h) * HEAD_DIM + d] = a / sum;
    }
}

// ---------------------------------------------------------------------------
// prefill: a tile of up to QTILE consecutive query rows of one sequence and one
// query head. Keys (the cached prefix and the chunk itself) are staged KTILE at
// a time in shared memory, read through the block table, and shared by the
// tile's rows; each warp owns RPW rows, causal per row. Key tiles start at
// multiples of KTILE, so a row's result does not depend on how the prompt was
// chunked.
// grid (tiles, num_heads), block NTHREADS.
template <typename T>
__device__ void prefill_impl(float* __restrict__ out, const float* __restrict__ q,
                             const T* __restrict__ kc, const T* __restrict__ vc,
                             const int* __restrict__ tile_row, const int* __restrict__ tile_pos,
                             const int* __restrict__ tile_len, const int* __restrict__ tile_bt,
                             const int* __restrict__ block_tables, int num_heads, int kv_heads,
                             int block_size, float scale, int window) {
    __shared__ float s_k[KTILE][HEAD_DIM];
    __shared__ float s_v[KTILE][HEAD_DIM];

    const int tile = blockIdx.x;
    const int h = blockIdx.y;
    const int kvh = h / (num_heads / kv_heads);
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    const int row0 = tile_row[tile];
    const int pos0 = tile_pos[tile];
    const int n = tile_len[tile];
    const int last = pos0 + n - 1;
    const int* bt = block_tables + tile_bt[tile];

    float qr[RPW][EPL];
    float acc[RPW][EPL];
    float m[RPW], l[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int qi = warp * RPW + r;
        m[r] = NEG_INF;
        l[r] = 0.f;
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
            const int d = lane + i * WARP;
            qr[r][i] = (qi < n && d < HEAD_DIM)
                           ? q[((long long)(row0 + qi) * num_heads + h) * HEAD_DIM + d] * scale
                           : 0.f;
            acc[r][i] = 0.f;
        }
    }

    const int first = window > 0 ? max(0, pos0 + 1 - window) : 0;
    for (int t0 = (first / KTILE) * KTILE; t0 <= last; t0 += KTILE) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < KTILE * HEAD_DIM; idx += blockDim.x) {
            const int t = idx / HEAD_DIM;
            const int d = idx - t * HEAD_DIM;
            const int p = t0 + t;
            float kv = 0.f, vv = 0.f;
            if (p <= last) {
                const long long base =
                    (((long long)bt[p / block_size] * kv_heads + kvh) * block_size + (p % block_size)) * HEAD_DIM;
                kv = to_f32(kc[base + d]);
                vv = to_f32(vc[base + d]);
            }
            s_k[t][d] = kv;
            s_v[t][d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const int qi = warp * RPW + r;
            if (qi >= n) continue;
            const int qpos = pos0 + qi;
            const int lo = window > 0 ? qpos + 1 - window : 0;
            for (int t = 0; t < KTILE; ++t) {
                const int p = t0 + t;
                if (p > qpos) break;
                if (p < lo) continue;
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < EPL; ++i) {
                    const int d = lane + i * WARP;
                    s += d < HEAD_DIM ? qr[r][i] * s_k[t][d] : 0.f;
                }
                s = warp_sum(s);
                const float mn = fmaxf(m[r], s);
                const float c = __expf(m[r] - mn);
                const float e = __expf(s - mn);
                l[r] = l[r] * c + e;
#pragma unroll
                for (int i = 0; i < EPL; ++i) {
                    const int d = lane + i * WARP;
                    acc[r][i] = acc[r][i] * c + (d < HEAD_DIM ? e * s_v[t][d] : 0.f);
                }
                m[r] = mn;
            }
        }
    }

#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int qi = warp * RPW + r;
        if (qi >= n) continue;
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
            const int d = lane + i * WARP;
            if (d < HEAD_DIM) out[((long long)(row0 + qi) * num_heads + h) * HEAD_DIM + d] = acc[r][i] / l[r];
        }
    }
}

// ---------------------------------------------------------------------------
// Entry points, one per cache element type.
#define SALUS_KERNELS(T, SUFFIX)                                                                    \
    extern "C" __global__ void write_kv_##SUFFIX(const T* k, const T* v, T* kc, T* vc,              \
                                                 const int* slots, int kv_heads, int block_size) {   \
        write_kv_impl<T>(k, v, kc, vc, slots, kv_heads, block_size);                                 \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(NTHREADS) decode_##SUFFIX(                         \
        float* out, float* part_acc, float* part_max, float* part_sum, const float* q, const T* kc, \
        const T* vc, const int* item_row, const int* item_pos, const int* item_bt,                  \
        const int* block_tables, int num_heads, int kv_heads, int block_size, int max_parts,        \
        int part_size, float scale, int window) {                                                    \
        decode_impl<T>(out, part_acc, part_max, part_sum, q, kc, vc, item_row, item_pos, item_bt,  \
                       block_tables, num_heads, kv_heads, block_size, max_parts, part_size, scale,  \
                       window);                                                                      \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(NTHREADS) prefill_##SUFFIX(                        \
        float* out, const float* q, const T* kc, const T* vc, const int* tile_row,                  \
        const int* tile_pos, const int* tile_len, const int* tile_bt, const int* block_tables,      \
        int num_heads, int kv_heads, int block_size, float scale, int window) {                     \
        prefill_impl<T>(out, q, kc, vc, tile_row, tile_pos, tile_len, tile_bt, block_tables,        \
                        num_heads, kv_heads, block_size, scale, window);                            \
    }

SALUS_KERNELS(float, f32)
SALUS_KERNELS(f16_t, f16)
SALUS_KERNELS(bf16_t, bf16)
