// Top-k by magnitude with a radix select over the float bits, and the fused error-feedback step.
//
// Loaded at run time by ec_hooks.kernels.cuda (cupy.RawModule, NVRTC); also compiles with nvcc.
// No header is included so that the same text builds under NVRTC and nvcc, CUDA 12 and 13.
//
// Order.  Every entry gets a 31-bit key that orders magnitudes:
//     key(v) = 0                             if v is NaN
//            = (bits(v) & 0x7fffffff) + 1    otherwise
// For non-negative floats the bit pattern is ordered like the value, so keys order |v| with NaN
// below every number (zero included) and inf above every finite value.  The k entries of largest
// key are selected; among equal keys the lower index wins.  This is the total order of
// ec_hooks.kernels.reference.topk_magnitude_reference, so every backend returns the same set.
//
// Radix select in three digits of the key: D1 = key[30:20] (2048 bins), D2 = key[19:9] (2048),
// D3 = key[8:0] (512).  Entries are processed in tiles of 4096; a tile's candidates (index and
// value, in ascending index order) go to the tile's own slice of two scratch arrays, so
// compaction needs no global offsets, and later stages read candidates sequentially instead of
// gathering them from x.  The pipeline, all on one stream, with no host synchronization:
//
//   0. ec_sample_*       16K entries at fixed pseudo-random positions: histogram of their D1.
//   1. ec_accumulate_*   full pass: acc = m + g written back (ec_histogram_*: x read only);
//      ec_histogram_*    histogram of D1; the entries whose D1 is at least the sample's bucket of
//                        rank ~k (a few standard deviations low) are compacted as candidates.
//   2. ec_filter_*       finds the D1 bucket b1 that holds the k-th key.  If the sample was not
//                        too high (b1 >= its bucket, the usual case), the candidates hold every
//                        entry with D1 >= b1: histogram of D2 over them.  Otherwise one more full
//                        pass rebuilds the candidates (D1 >= b1) and the D2 histogram.
//   3. ec_refine         the D2 bucket; histogram of D3 over the candidates.
//   4. ec_count          the k-th key T and `need`, the number of entries with key == T taken
//                        (those of lowest index); per tile, entries with key > T and key == T.
//   5. ec_emit_*         exactly k (int32 index, value) pairs in ascending index order;
//                        optionally m[i] -= (value rounded to the wire dtype).  Clears the
//                        workspace header for the next call and reports whether g was finite.
//
// Stages 2-4 each find their bucket in every block from the histogram (2048 words from L2),
// cheaper than a separate launch; stages 2 (fast path) to 5 touch only the candidates, one warp
// per tile.  Bytes moved per entry: 12 in stage 1 (fp32 m and g), plus 4 when stage 2 falls back.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define EC_THREADS 256
#define EC_WARPS (EC_THREADS / 32)
#define EC_VEC 4
#define EC_VECS_PER_THREAD 4
#define EC_TILE (EC_THREADS * EC_VEC * EC_VECS_PER_THREAD)  // 4096 entries per tile
#define EC_SAMPLE_BLOCKS 64                                 // 64 * 256 = 16384 samples
#define EC_BATCH 4                                          // candidates per lane in flight
#define EC_NO_BUCKET 2048u                                  // above every D1 bucket

// Layout of the uint32 workspace header (zero between calls).
#define EC_HIST1 0
#define EC_HIST2 2048
#define EC_HIST3 4096
#define EC_HISTS 4608  // the sample's D1 histogram
#define EC_STATE 6656
#define EC_BLOCK_SUMS 6672  // per block of stages 4-5: (above, tied) of its tiles, as u64
#define EC_MAX_BLOCKS 4096
#define EC_HEADER (EC_BLOCK_SUMS + 2 * EC_MAX_BLOCKS)
// state words
#define ST_NONFINITE 0  // set when some gradient entry was not finite
#define ST_BS 1         // the sample's bucket: candidates of stage 1 have D1 >= it
#define ST_B1 2         // boundary D1 bucket
#define ST_K1 3         // rank still to find inside it
#define ST_B2 4
#define ST_K2 5
#define ST_T 6          // the k-th largest key
#define ST_NEED 7       // entries with key == T that are taken

// ---------------------------------------------------------------------------------------------
// Conversions (bit-exact with torch: round to nearest even, NaN -> quiet NaN)

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)0x7fc0u;
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ bool is_finite(float v) {
    return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

__device__ __forceinline__ u32 mag_key(float v) {
    u32 b = __float_as_uint(v) & 0x7fffffffu;
    return b > 0x7f800000u ? 0u : b + 1u;
}

// Element types: fp32 is read as float4, the 16-bit types as four u16 in one 8-byte load.
struct F32 {
    typedef float T;
    static __device__ __forceinline__ float to_f32(float v) { return v; }
};
struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float to_f32(u16 v) { return bf16_to_f32(v); }
};
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float to_f32(u16 v) { return f16_to_f32(v); }
};

template <typename E>
__device__ __forceinline__ void load4(const typename E::T* p, float v[4]);

template <>
__device__ __forceinline__ void load4<F32>(const float* p, float v[4]) {
    float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
template <>
__device__ __forceinline__ void load4<BF16>(const u16* p, float v[4]) {
    uint2 q = *reinterpret_cast<const uint2*>(p);
    v[0] = bf16_to_f32((u16)(q.x & 0xffffu)); v[1] = bf16_to_f32((u16)(q.x >> 16));
    v[2] = bf16_to_f32((u16)(q.y & 0xffffu)); v[3] = bf16_to_f32((u16)(q.y >> 16));
}
template <>
__device__ __forceinline__ void load4<F16>(const u16* p, float v[4]) {
    uint2 q = *reinterpret_cast<const uint2*>(p);
    v[0] = f16_to_f32((u16)(q.x & 0xffffu)); v[1] = f16_to_f32((u16)(q.x >> 16));
    v[2] = f16_to_f32((u16)(q.y & 0xffffu)); v[3] = f16_to_f32((u16)(q.y >> 16));
}

// Streaming (evict-first) loads for the gradient: it is read once, and keeping it out of L2
// leaves room for the memory that pass 3 reads again.
template <typename E>
__device__ __forceinline__ void load4_stream(const typename E::T* p, float v[4]);

template <>
__device__ __forceinline__ void load4_stream<F32>(const float* p, float v[4]) {
    asm("ld.global.cs.v4.f32 {%0, %1, %2, %3}, [%4];"
        : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3]) : "l"(p));
}
template <>
__device__ __forceinline__ void load4_stream<BF16>(const u16* p, float v[4]) {
    u32 a, b;
    asm("ld.global.cs.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
    v[0] = bf16_to_f32((u16)(a & 0xffffu)); v[1] = bf16_to_f32((u16)(a >> 16));
    v[2] = bf16_to_f32((u16)(b & 0xffffu)); v[3] = bf16_to_f32((u16)(b >> 16));
}
template <>
__device__ __forceinline__ void load4_stream<F16>(const u16* p, float v[4]) {
    u32 a, b;
    asm("ld.global.cs.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
    v[0] = f16_to_f32((u16)(a & 0xffffu)); v[1] = f16_to_f32((u16)(a >> 16));
    v[2] = f16_to_f32((u16)(b & 0xffffu)); v[3] = f16_to_f32((u16)(b >> 16));
}

// Loads four consecutive entries starting at i (a multiple of 4); entries at or past n read as
// NaN (key 0) and are flagged invalid.
template <typename E, bool STREAM>
__device__ __forceinline__ void load_group(const typename E::T* x, long long i, long long n, float v[4]) {
    if (i + EC_VEC <= n) {
        if (STREAM) load4_stream<E>(x + i, v);
        else load4<E>(x + i, v);
    } else {
#pragma unroll
        for (int e = 0; e < EC_VEC; ++e) v[e] = (i + e < n) ? E::to_f32(x[i + e]) : __uint_as_float(0x7fffffffu);
    }
}

// ---------------------------------------------------------------------------------------------
// Block-wide scans (any blockDim that is a multiple of 32, up to 1024)

template <typename V>
__device__ __forceinline__ V warp_inclusive_scan(V v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        V y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += y;
    }
    return v;
}

// Exclusive prefix of v over the block in thread order; *total gets the block's sum.
// `shared` holds 33 words.  Every thread of the block must call it.
template <typename V>
__device__ __forceinline__ V block_exclusive_scan(V v, V* shared, V* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    V inclusive = warp_inclusive_scan(v);
    if (lane == 31) shared[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        V w = lane < nwarps ? shared[lane] : (V)0;
        V wi = warp_inclusive_scan(w);
        if (lane < nwarps) shared[lane] = wi - w;
        if (lane == 31) shared[32] = wi;
    }
    __syncthreads();
    V result = shared[warp] + inclusive - v;
    *total = shared[32];
    __syncthreads();  // the caller may scan again with the same buffer
    return result;
}

// ---------------------------------------------------------------------------------------------
// Bucket selection, done redundantly by every block of the kernel that needs it

#define EC_BINS_PER_THREAD (2048 / EC_THREADS)

struct Bucket {
    u32 bucket;  // the bin holding the entry of rank kleft, counted from the top
    u32 rest;    // its rank inside that bin: kleft - (entries in higher bins)
};

// Finds the bin b with count(> b) < kleft <= count(>= b) among the first `nbins` bins of `hist`.
// Every thread of the block (EC_THREADS of them) must call it; all get the same answer.
__device__ __forceinline__ Bucket find_bucket(const u32* __restrict__ hist, int nbins, u32 kleft) {
    __shared__ u32 scan_buf[33];
    __shared__ Bucket result;
    // thread t owns bins top, top-1, ..., top-7: thread order is descending bin order
    const int top = 2047 - (int)threadIdx.x * EC_BINS_PER_THREAD;
    u32 h[EC_BINS_PER_THREAD];
    u32 s = 0;
#pragma unroll
    for (int j = 0; j < EC_BINS_PER_THREAD; ++j) {
        h[j] = top - j < nbins ? hist[top - j] : 0u;
        s += h[j];
    }
    if (threadIdx.x == 0) result = Bucket{0u, 0u};
    u32 total;
    const u32 above = block_exclusive_scan<u32>(s, scan_buf, &total);
    if (above < kleft && above + s >= kleft) {
        u32 acc = above;
        bool found = false;
#pragma unroll
        for (int j = 0; j < EC_BINS_PER_THREAD; ++j) {
            if (!found && acc + h[j] >= kleft) {
                result = Bucket{(u32)(top - j), kleft - acc};
                found = true;
            }
            acc += h[j];
        }
    }
    __syncthreads();
    const Bucket out = result;
    __syncthreads();
    return out;
}

// ---------------------------------------------------------------------------------------------
// Shared-memory histograms

template <int BINS>
__device__ __forceinline__ void zero_shared(u32* h) {
    for (int i = threadIdx.x; i < BINS; i += blockDim.x) h[i] = 0;
    __syncthreads();
}

template <int BINS>
__device__ __forceinline__ void flush_shared(const u32* h, u32* global) {
    __syncthreads();
    for (int i = threadIdx.x; i < BINS; i += blockDim.x) {
        u32 c = h[i];
        if (c) atomicAdd(global + i, c);
    }
}

// The value stage 1 produces at index i: m + g (g finite) for the fused step, x otherwise.
template <typename E, typename G, bool ACC>
__device__ __forceinline__ float value_at(const typename E::T* x, const typename G::T* g, long long i) {
    const float v = E::to_f32(x[i]);
    if (!ACC) return v;
    const float gv = G::to_f32(g[i]);
    return v + (is_finite(gv) ? gv : 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Stage 0: the sample

template <typename E, typename G, bool ACC>
__device__ __forceinline__ void sample(const typename E::T* __restrict__ x, const typename G::T* __restrict__ g,
                                       long long n, u32* __restrict__ ws) {
    __shared__ u32 hist[2048];
    zero_shared<2048>(hist);
    // splitmix64 of the sample number: fixed, well spread positions
    u64 z = (u64)(blockIdx.x * blockDim.x + threadIdx.x) + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const long long i = (long long)(z % (u64)n);
    atomicAdd(&hist[mag_key(value_at<E, G, ACC>(x, g, i)) >> 20], 1u);
    flush_shared<2048>(hist, ws + EC_HISTS);
}

// ---------------------------------------------------------------------------------------------
// Stage 1: one pass over everything

// Writes the tile's flagged entries (keep[j] bit e: entry base + (j * EC_THREADS + tid) * 4 + e)
// to seg_index / seg_value [base ...] in index order, and their number to tile_count[tile].
// Keeping the value beside the index lets the later stages read candidates sequentially instead
// of gathering them from scattered places of x (random 4-byte reads run at a fraction of the
// bandwidth).
__device__ __forceinline__ void compact_tile(const u32 keep[EC_VECS_PER_THREAD], const float v[EC_VECS_PER_THREAD][EC_VEC],
                                             long long tile, u64* scan_buf, u32* __restrict__ seg_index,
                                             float* __restrict__ seg_value, u32* __restrict__ tile_count) {
    const long long base = tile * EC_TILE;
    u64 packed = 0;
#pragma unroll
    for (int j = 0; j < EC_VECS_PER_THREAD; ++j) packed |= (u64)__popc(keep[j]) << (16 * j);
    u64 total;
    const u64 before = block_exclusive_scan<u64>(packed, scan_buf, &total);
    u32 offset = 0;
#pragma unroll
    for (int j = 0; j < EC_VECS_PER_THREAD; ++j) {
        u32 pos = offset + (u32)((before >> (16 * j)) & 0xffffu);
        const u32 first = (u32)(j * EC_THREADS + threadIdx.x) * EC_VEC;
#pragma unroll
        for (int e = 0; e < EC_VEC; ++e)
            if (keep[j] & (1u << e)) {
                seg_index[base + pos] = (u32)(base + first + e);
                seg_value[base + pos] = v[j][e];
                ++pos;
            }
        offset += (u32)((total >> (16 * j)) & 0xffffu);
    }
    if (threadIdx.x == 0) tile_count[tile] = offset;
}

// ACC: m += g where g is finite (the arithmetic of torch's m.add_(torch.where(isfinite(g), g, 0)))
// and flags a non-finite g.  Otherwise x (= m) is only read.  sample_rank: the rank in the sample
// whose D1 bucket bounds the candidates from below; 0: no sample, no candidates here.
template <typename E, typename G, bool ACC>
__device__ __forceinline__ void stage1(typename E::T* __restrict__ x, const typename G::T* __restrict__ g,
                                       long long n, u32 sample_rank, u32* __restrict__ ws,
                                       u32* __restrict__ seg_index, float* __restrict__ seg_value,
                                       u32* __restrict__ tile_count) {
    __shared__ u32 hist[2048];
    __shared__ u64 scan_buf[33];
    u32 bs = EC_NO_BUCKET;
    if (sample_rank) bs = find_bucket(ws + EC_HISTS, 2048, sample_rank).bucket;
    if (blockIdx.x == 0 && threadIdx.x == 0) ws[EC_STATE + ST_BS] = bs;
    zero_shared<2048>(hist);
    int nonfinite = 0;
    const long long ntiles = (n + EC_TILE - 1) / EC_TILE;
    for (long long tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const long long base = tile * EC_TILE;
        float v[EC_VECS_PER_THREAD][EC_VEC], gv[EC_VECS_PER_THREAD][EC_VEC];
#pragma unroll
        for (int j = 0; j < EC_VECS_PER_THREAD; ++j) {
            const long long i = base + (long long)(j * EC_THREADS + threadIdx.x) * EC_VEC;
            load_group<E, !ACC>(x, i, n, v[j]);
            if (ACC) load_group<G, true>(g, i, n, gv[j]);
        }
        u32 keep[EC_VECS_PER_THREAD];
#pragma unroll
        for (int j = 0; j < EC_VECS_PER_THREAD; ++j) {
            const long long i = base + (long long)(j * EC_THREADS + threadIdx.x) * EC_VEC;
            keep[j] = 0;
            if (ACC) {
#pragma unroll
                for (int e = 0; e < EC_VEC; ++e) {
                    const bool ok = is_finite(gv[j][e]);
                    if (i + e < n) nonfinite |= !ok;
                    v[j][e] = v[j][e] + (ok ? gv[j][e] : 0.0f);
                }
                float* m = reinterpret_cast<float*>(x);
                if (i + EC_VEC <= n) {
                    *reinterpret_cast<float4*>(m + i) = make_float4(v[j][0], v[j][1], v[j][2], v[j][3]);
                } else {
#pragma unroll
                    for (int e = 0; e < EC_VEC; ++e)
                        if (i + e < n) m[i + e] = v[j][e];
                }
            }
#pragma unroll
            for (int e = 0; e < EC_VEC; ++e) {
                if (i + e < n) {
                    const u32 d1 = mag_key(v[j][e]) >> 20;
                    atomicAdd(&hist[d1], 1u);
                    if (d1 >= bs) keep[j] |= 1u << e;
                }
            }
        }
        if (bs != EC_NO_BUCKET) compact_tile(keep, v, tile, scan_buf, seg_index, seg_value, tile_count);
    }
    if (ACC) {
        nonfinite = __syncthreads_or(nonfinite);
        if (nonfinite && threadIdx.x == 0) atomicOr(ws + EC_STATE + ST_NONFINITE, 1u);
    }
    flush_shared<2048>(hist, ws + EC_HIST1);
}

// ---------------------------------------------------------------------------------------------
// Stages 2-5

// Loads a batch of up to 32 * EC_BATCH candidates of a tile (entry c + q * 32 + lane in slot q),
// all loads in flight together.  Empty slots get index ~0u and a NaN value (key 0).
__device__ __forceinline__ void load_batch(const u32* __restrict__ si, const float* __restrict__ sv, u32 cnt, u32 c,
                                           u32 idx[EC_BATCH], float v[EC_BATCH]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int q = 0; q < EC_BATCH; ++q) {
        const u32 j = c + q * 32 + lane;
        const bool ok = j < cnt;
        idx[q] = ok ? si[j] : ~0u;
        v[q] = ok ? sv[j] : __uint_as_float(0x7fffffffu);
    }
}

// Calls f(key) for every candidate of every tile, one warp per tile.
template <typename F>
__device__ __forceinline__ void for_candidates(long long n, const float* __restrict__ seg_value,
                                               const u32* __restrict__ tile_count, F f) {
    const long long ntiles = (n + EC_TILE - 1) / EC_TILE;
    const int lane = threadIdx.x & 31;
    for (long long tile = (long long)blockIdx.x * EC_WARPS + (threadIdx.x >> 5); tile < ntiles;
         tile += (long long)gridDim.x * EC_WARPS) {
        const u32 cnt = tile_count[tile];
        const float* sv = seg_value + tile * EC_TILE;
        for (u32 j = lane; j < cnt; j += 32) f(mag_key(sv[j]));
    }
}

template <typename E>
__device__ __forceinline__ void filter(const typename E::T* __restrict__ x, long long n, u32 k, u32* __restrict__ ws,
                                       u32* __restrict__ seg_index, float* __restrict__ seg_value,
                                       u32* __restrict__ tile_count) {
    __shared__ u32 hist[2048];
    __shared__ u64 scan_buf[33];
    const Bucket sel = find_bucket(ws + EC_HIST1, 2048, k);
    const u32 b1 = sel.bucket;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        ws[EC_STATE + ST_B1] = b1;
        ws[EC_STATE + ST_K1] = sel.rest;
    }
    zero_shared<2048>(hist);
    if (b1 >= ws[EC_STATE + ST_BS]) {
        // The candidates of stage 1 include every entry with D1 >= b1.
        for_candidates(n, seg_value, tile_count, [&](u32 key) {
            if ((key >> 20) == b1) atomicAdd(&hist[(key >> 9) & 2047u], 1u);
        });
    } else {
        const long long ntiles = (n + EC_TILE - 1) / EC_TILE;
        for (long long tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
            const long long base = tile * EC_TILE;
            float v[EC_VECS_PER_THREAD][EC_VEC];
#pragma unroll
            for (int j = 0; j < EC_VECS_PER_THREAD; ++j)
                load_group<E, false>(x, base + (long long)(j * EC_THREADS + threadIdx.x) * EC_VEC, n, v[j]);
            u32 keep[EC_VECS_PER_THREAD];
#pragma unroll
            for (int j = 0; j < EC_VECS_PER_THREAD; ++j) {
                const long long i = base + (long long)(j * EC_THREADS + threadIdx.x) * EC_VEC;
                keep[j] = 0;
#pragma unroll
                for (int e = 0; e < EC_VEC; ++e) {
                    const u32 key = mag_key(v[j][e]);
                    const u32 d1 = key >> 20;
                    if (i + e < n && d1 >= b1) {
                        keep[j] |= 1u << e;
                        if (d1 == b1) atomicAdd(&hist[(key >> 9) & 2047u], 1u);
                    }
                }
            }
            compact_tile(keep, v, tile, scan_buf, seg_index, seg_value, tile_count);
        }
    }
    flush_shared<2048>(hist, ws + EC_HIST2);
}

__device__ __forceinline__ void refine(long long n, u32* __restrict__ ws, const float* __restrict__ seg_value,
                                       const u32* __restrict__ tile_count) {
    __shared__ u32 hist[512];
    const Bucket sel = find_bucket(ws + EC_HIST2, 2048, ws[EC_STATE + ST_K1]);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        ws[EC_STATE + ST_B2] = sel.bucket;
        ws[EC_STATE + ST_K2] = sel.rest;
    }
    zero_shared<512>(hist);
    const u32 prefix = (ws[EC_STATE + ST_B1] << 11) | sel.bucket;
    for_candidates(n, seg_value, tile_count, [&](u32 key) {
        if ((key >> 9) == prefix) atomicAdd(&hist[key & 511u], 1u);
    });
    flush_shared<512>(hist, ws + EC_HIST3);
}

// Stages 4 and 5 give each block the same contiguous range of tiles.
__device__ __forceinline__ void tile_range(long long n, long long* first, long long* last) {
    const long long ntiles = (n + EC_TILE - 1) / EC_TILE;
    const long long per_block = (ntiles + gridDim.x - 1) / gridDim.x;
    *first = blockIdx.x * per_block < ntiles ? blockIdx.x * per_block : ntiles;
    *last = *first + per_block < ntiles ? *first + per_block : ntiles;
}

__device__ __forceinline__ void count_tiles(long long n, u32* __restrict__ ws, const float* __restrict__ seg_value,
                                            const u32* __restrict__ tile_count, u32* __restrict__ tile_above,
                                            u32* __restrict__ tile_tied) {
    __shared__ u64 scan_buf[33];
    const Bucket sel = find_bucket(ws + EC_HIST3, 512, ws[EC_STATE + ST_K2]);
    const u32 threshold = (ws[EC_STATE + ST_B1] << 20) | (ws[EC_STATE + ST_B2] << 9) | sel.bucket;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        ws[EC_STATE + ST_T] = threshold;
        ws[EC_STATE + ST_NEED] = sel.rest;
    }
    long long first, last;
    tile_range(n, &first, &last);
    const int lane = threadIdx.x & 31;
    u64 block_total = 0;  // above in the low word, tied in the high word (each < 2^31: no carry)
    for (long long tile = first + (threadIdx.x >> 5); tile < last; tile += EC_WARPS) {
        const u32 cnt = tile_count[tile];
        const float* sv = seg_value + tile * EC_TILE;
        u32 above = 0, tied = 0;
        for (u32 j = lane; j < cnt; j += 32) {
            const u32 key = mag_key(sv[j]);
            above += key > threshold;
            tied += key == threshold;
        }
#pragma unroll
        for (int o = 16; o; o >>= 1) {
            above += __shfl_xor_sync(0xffffffffu, above, o);
            tied += __shfl_xor_sync(0xffffffffu, tied, o);
        }
        if (lane == 0) {
            tile_above[tile] = above;
            tile_tied[tile] = tied;
            block_total += (u64)above | ((u64)tied << 32);
        }
    }
    u64 total;
    block_exclusive_scan<u64>(block_total, scan_buf, &total);
    if (threadIdx.x == 0) reinterpret_cast<u64*>(ws + EC_BLOCK_SUMS)[blockIdx.x] = total;
}

// Each block emits its range of tiles (the one of stage 4): the entries before the range come
// from the block sums of stage 4, a scan runs over its own tiles, 256 at a time, and each warp
// writes one tile's selected entries in order.
// WIRE: 0 = indices only, 1 = fp32 values, 2 = bf16, 3 = fp16.  SUBTRACT: m[i] -= (wire value),
// so that with a 16-bit wire the rounding error stays in memory.
template <int WIRE, bool SUBTRACT>
__device__ __forceinline__ void emit(float* __restrict__ m, long long n, u32* __restrict__ ws,
                                     const u32* __restrict__ seg_index, const float* __restrict__ seg_value,
                                     const u32* __restrict__ tile_count, const u32* __restrict__ tile_above,
                                     const u32* __restrict__ tile_tied, int* __restrict__ out_index,
                                     void* __restrict__ out_value, u32 k, unsigned char* __restrict__ grad_finite) {
    __shared__ u64 scan_buf[33];
    __shared__ u64 prefix[EC_THREADS];
    const u32 threshold = ws[EC_STATE + ST_T];
    const u32 need = ws[EC_STATE + ST_NEED];
    long long first, last;
    tile_range(n, &first, &last);
    // above in the low word, tied in the high word
    const u64* block_sums = reinterpret_cast<const u64*>(ws + EC_BLOCK_SUMS);
    u64 running = 0;
    for (unsigned b = threadIdx.x; b < blockIdx.x; b += blockDim.x) running += block_sums[b];
    u64 total;
    block_exclusive_scan<u64>(running, scan_buf, &total);
    running = total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 lower = (1u << lane) - 1u;
    for (long long chunk = first; chunk < last; chunk += EC_THREADS) {
        const long long t = chunk + threadIdx.x;
        const u64 mine = t < last ? ((u64)tile_above[t] | ((u64)tile_tied[t] << 32)) : 0ull;
        prefix[threadIdx.x] = running + block_exclusive_scan<u64>(mine, scan_buf, &total);
        __syncthreads();
        for (int w = warp; w < EC_THREADS && chunk + w < last; w += EC_WARPS) {
            const long long tile = chunk + w;
            const u32 cnt = tile_count[tile];
            const u32* si = seg_index + tile * EC_TILE;
            const float* sv = seg_value + tile * EC_TILE;
            u32 above_before = (u32)prefix[w], tied_before = (u32)(prefix[w] >> 32);
            for (u32 c = 0; c < cnt; c += 32 * EC_BATCH) {
                u32 idx[EC_BATCH];
                float v[EC_BATCH];
                load_batch(si, sv, cnt, c, idx, v);
#pragma unroll
                for (int q = 0; q < EC_BATCH; ++q) {
                    const u32 key = mag_key(v[q]);
                    const bool above = key > threshold, tied = key == threshold && idx[q] != ~0u;
                    const u32 above_mask = __ballot_sync(0xffffffffu, above);
                    const u32 tied_mask = __ballot_sync(0xffffffffu, tied);
                    const u32 a = above_before + __popc(above_mask & lower);
                    const u32 r = tied_before + __popc(tied_mask & lower);
                    if (above || (tied && r < need)) {
                        const u32 pos = a + (r < need ? r : need);
                        const u32 i = idx[q];
                        const float value = v[q];
                        if (pos < k) {
                            out_index[pos] = (int)i;
                            if (WIRE == 1) {
                                reinterpret_cast<float*>(out_value)[pos] = value;
                                if (SUBTRACT) m[i] = value - value;
                            } else if (WIRE == 2) {
                                const u16 wv = f32_to_bf16(value);
                                reinterpret_cast<u16*>(out_value)[pos] = wv;
                                if (SUBTRACT) m[i] = value - bf16_to_f32(wv);
                            } else if (WIRE == 3) {
                                // Clamped: an fp32 memory beyond fp16's range must not travel as inf.
                                const u16 wv = f32_to_f16(value != value ? value : fminf(fmaxf(value, -65504.0f), 65504.0f));
                                reinterpret_cast<u16*>(out_value)[pos] = wv;
                                if (SUBTRACT) m[i] = value - f16_to_f32(wv);
                            }
                        }
                    }
                    above_before += __popc(above_mask);
                    tied_before += __popc(tied_mask);
                }
            }
        }
        running += total;
        __syncthreads();
    }
    if (blockIdx.x == 0) {
        // Every reader of the histograms has finished: leave them zeroed for the next call.
        for (int i = threadIdx.x; i < EC_STATE; i += blockDim.x) ws[i] = 0u;
        if (threadIdx.x == 0) {
            if (grad_finite) *grad_finite = ws[EC_STATE + ST_NONFINITE] == 0u;
            ws[EC_STATE + ST_NONFINITE] = 0u;
        }
    }
}

// Undo of the accumulation for a step that all workers void: m -= g where g is finite, unless
// *keep (a torch.bool on the device) is true.  Reads the flag on the device: no host sync.
template <typename G>
__device__ __forceinline__ void undo_accumulate(float* __restrict__ m, const typename G::T* __restrict__ g,
                                                long long n, const unsigned char* __restrict__ keep) {
    if (*keep) return;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float gv = G::to_f32(g[i]);
        if (is_finite(gv)) m[i] -= gv;
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points.  x: the input (E entries); m: fp32 memory; g: gradient (E entries).

#define EC_BOUNDS __launch_bounds__(EC_THREADS)
#define EC_SEG u32 *seg_index, float *seg_value, u32 *tile_count

#define EC_DEFINE_FOR(E, NAME)                                                                                  \
    extern "C" __global__ void EC_BOUNDS ec_sample_acc_##NAME(const float* m, const E::T* g, long long n,     \
                                                              u32* ws) {                                      \
        sample<F32, E, true>(m, g, n, ws);                                                                    \
    }                                                                                                         \
    extern "C" __global__ void EC_BOUNDS ec_sample_##NAME(const E::T* x, long long n, u32* ws) {              \
        sample<E, E, false>(x, x, n, ws);                                                                     \
    }                                                                                                         \
    extern "C" __global__ void EC_BOUNDS ec_accumulate_##NAME(float* m, const E::T* g, long long n,           \
                                                              u32 sample_rank, u32* ws, EC_SEG) {             \
        stage1<F32, E, true>(m, g, n, sample_rank, ws, seg_index, seg_value, tile_count);                     \
    }                                                                                                         \
    extern "C" __global__ void EC_BOUNDS ec_histogram_##NAME(E::T* x, long long n, u32 sample_rank, u32* ws,  \
                                                             EC_SEG) {                                        \
        stage1<E, E, false>(x, x, n, sample_rank, ws, seg_index, seg_value, tile_count);                      \
    }                                                                                                         \
    extern "C" __global__ void EC_BOUNDS ec_filter_##NAME(const E::T* x, long long n, u32 k, u32* ws,         \
                                                          EC_SEG) {                                           \
        filter<E>(x, n, k, ws, seg_index, seg_value, tile_count);                                             \
    }                                                                                                         \
    extern "C" __global__ void EC_BOUNDS ec_undo_accumulate_##NAME(float* m, const E::T* g, long long n,      \
                                                                   const unsigned char* keep) {               \
        undo_accumulate<E>(m, g, n, keep);                                                                    \
    }

EC_DEFINE_FOR(F32, f32)
EC_DEFINE_FOR(BF16, bf16)
EC_DEFINE_FOR(F16, f16)

extern "C" __global__ void EC_BOUNDS ec_refine(long long n, u32* ws, const float* seg_value, const u32* tile_count) {
    refine(n, ws, seg_value, tile_count);
}

extern "C" __global__ void EC_BOUNDS ec_count(long long n, u32* ws, const float* seg_value, const u32* tile_count,
                                              u32* tile_above, u32* tile_tied) {
    count_tiles(n, ws, seg_value, tile_count, tile_above, tile_tied);
}

// Stage 5 variants: indices only (plain top-k), or the error-feedback emit with values in the
// wire dtype, with or without the subtraction from the fp32 memory m.
#define EC_DEFINE_EMIT(WIRE, WNAME, SUB, SNAME)                                                                  \
    extern "C" __global__ void EC_BOUNDS ec_emit_##WNAME##_##SNAME(                                            \
        float* m, long long n, u32* ws, const u32* seg_index, const float* seg_value, const u32* tile_count,    \
        const u32* tile_above, const u32* tile_tied, int* out_index, void* out_value, u32 k,                  \
        unsigned char* grad_finite) {                                                                          \
        emit<WIRE, SUB>(m, n, ws, seg_index, seg_value, tile_count, tile_above, tile_tied, out_index,          \
                        out_value, k, grad_finite);                                                            \
    }

EC_DEFINE_EMIT(0, index, false, only)
EC_DEFINE_EMIT(1, f32, false, keep)
EC_DEFINE_EMIT(1, f32, true, subtract)
EC_DEFINE_EMIT(2, bf16, false, keep)
EC_DEFINE_EMIT(2, bf16, true, subtract)
EC_DEFINE_EMIT(3, f16, false, keep)
EC_DEFINE_EMIT(3, f16, true, subtract)
