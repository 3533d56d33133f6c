// kvstore copy ops: paged KV chunk movement between a device pool and a host pool.
//
// Plain C ABI (no torch headers) so the library builds in seconds with nvcc
// and is called through ctypes; every entry point returns a cudaError_t.
//
// A *chunk* is one page of one layer's K (or V, or MLA latent): chunk_bytes
// contiguous bytes. A copy moves, for each page pair i and each selected layer
// l and kv k, the chunk (l, k, src_pages[i]) of src to (l, k, dst_pages[i]) of
// dst. A chunk's start (in chunks) in a pool is l*s_layer + k*s_kv + page*s_page,
// so one kernel serves both arrangements and a compact staging buffer.
//
//   work item w  ->  i = w / (num_layers * num_kv), l = (w / num_kv) % num_layers, k = w % num_kv
//   one warp per work item, lanes stride over the chunk in VecT units, UNROLL loads in flight.

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

struct PoolDesc {
  char* base;           // device-visible address of chunk (layer0, 0, page 0)
  const int64_t* pages; // device array of page ids, or nullptr for the identity (page = i)
  int64_t s_layer, s_kv, s_page;  // strides in chunks
};

template <typename VecT, int UNROLL>
__global__ void __launch_bounds__(512) copy_chunks_kernel(PoolDesc src, PoolDesc dst, int64_t num_pages,
                                                          int num_layers, int num_kv, int64_t chunk_vecs) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t num_warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t per_page = int64_t(num_layers) * num_kv;
  const int64_t num_items = num_pages * per_page;
  for (int64_t w = warp; w < num_items; w += num_warps) {
    const int64_t i = w / per_page;
    const int64_t l = (w / num_kv) % num_layers;
    const int64_t k = w % num_kv;
    const int64_t sp = src.pages ? src.pages[i] : i;
    const int64_t dp = dst.pages ? dst.pages[i] : i;
    const VecT* s = reinterpret_cast<const VecT*>(src.base) + (l * src.s_layer + k * src.s_kv + sp * src.s_page) * chunk_vecs;
    VecT* d = reinterpret_cast<VecT*>(dst.base) + (l * dst.s_layer + k * dst.s_kv + dp * dst.s_page) * chunk_vecs;
    int64_t v = lane;
    for (; v + 32 * (UNROLL - 1) < chunk_vecs; v += 32 * UNROLL) {
      VecT r[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) r[u] = s[v + 32 * u];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) d[v + 32 * u] = r[u];
    }
    for (; v < chunk_vecs; v += 32) d[v] = s[v];
  }
}

template <typename VecT>
cudaError_t launch(PoolDesc src, PoolDesc dst, int64_t num_pages, int num_layers, int num_kv,
                   int64_t chunk_bytes, int num_blocks, int num_threads, cudaStream_t stream) {
  const int64_t chunk_vecs = chunk_bytes / int64_t(sizeof(VecT));
  copy_chunks_kernel<VecT, 8><<<num_blocks, num_threads, 0, stream>>>(src, dst, num_pages, num_layers, num_kv,
                                                                       chunk_vecs);
  return cudaGetLastError();
}

// Device-visible address of p: itself for device memory, the mapped address for
// pinned / registered host memory; an error for pageable host memory.
cudaError_t device_address(void* p, char** out) {
  cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) return err;
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) {
    *out = static_cast<char*>(p);
    return cudaSuccess;
  }
  if (attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr) {
    *out = static_cast<char*>(attr.devicePointer);
    return cudaSuccess;
  }
  return cudaErrorInvalidHostPointer;
}

}  // namespace

extern "C" {

// 1 if p is device memory or pinned/registered (device-mapped) host memory, else 0.
int kv_is_device_visible(void* p) {
  char* out = nullptr;
  cudaError_t err = device_address(p, &out);
  if (err != cudaSuccess) cudaGetLastError();  // clear the sticky-free error state
  return err == cudaSuccess ? 1 : 0;
}

// A failed runtime call also leaves the runtime's last-error set; clear it so the next
// launch check (ours or torch's) does not report this error again.
static cudaError_t cleared(cudaError_t err) {
  if (err != cudaSuccess) cudaGetLastError();
  return err;
}

// The SM path: one launch of a bounded grid. strides = {src s_layer, s_kv, s_page, dst s_layer, s_kv, s_page}.
int kv_copy_chunks(void* src_base, const int64_t* src_pages, void* dst_base, const int64_t* dst_pages,
                   const int64_t* strides, int64_t num_pages, int num_layers, int num_kv, int64_t chunk_bytes,
                   int vec_bytes, int num_blocks, int num_threads, cudaStream_t stream) {
  if (num_pages == 0) return cudaSuccess;
  PoolDesc src{nullptr, src_pages, strides[0], strides[1], strides[2]};
  PoolDesc dst{nullptr, dst_pages, strides[3], strides[4], strides[5]};
  cudaError_t err = device_address(src_base, &src.base);
  if (err != cudaSuccess) return cleared(err);
  err = device_address(dst_base, &dst.base);
  if (err != cudaSuccess) return cleared(err);
  switch (vec_bytes) {
    case 16: return launch<uint4>(src, dst, num_pages, num_layers, num_kv, chunk_bytes, num_blocks, num_threads, stream);
    case 8: return launch<uint2>(src, dst, num_pages, num_layers, num_kv, chunk_bytes, num_blocks, num_threads, stream);
    case 4: return launch<uint32_t>(src, dst, num_pages, num_layers, num_kv, chunk_bytes, num_blocks, num_threads, stream);
    case 2: return launch<uint16_t>(src, dst, num_pages, num_layers, num_kv, chunk_bytes, num_blocks, num_threads, stream);
    case 1: return launch<uint8_t>(src, dst, num_pages, num_layers, num_kv, chunk_bytes, num_blocks, num_threads, stream);
    default: return cudaErrorInvalidValue;
  }
}

// The DMA path: copy-engine copies of `count` runs, dst[i] <- src[i] (sizes[i] bytes), enqueued
// on `stream`. mode 0: one cudaMemcpyAsync per run; 1: one cudaMemcpyBatchAsync; 2: the batch
// with the PreferOverlapWithCompute hint. The batch API refuses the legacy default stream.
int kv_memcpy_runs(void** dsts, void** srcs, size_t* sizes, size_t count, int mode, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
#if CUDART_VERSION >= 12080
  if (mode != 0) {
    cudaMemcpyAttributes attr = {};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = mode == 2 ? cudaMemcpyFlagPreferOverlapWithCompute : cudaMemcpyFlagDefault;
    size_t attr_idx = 0;
#if CUDART_VERSION >= 13000
    return cleared(cudaMemcpyBatchAsync((const void**)dsts, (const void**)srcs, sizes, count, &attr, &attr_idx, 1, stream));
#else
    size_t fail_idx = 0;
    return cleared(cudaMemcpyBatchAsync(dsts, srcs, sizes, count, &attr, &attr_idx, 1, &fail_idx, stream));
#endif
  }
#endif
  for (size_t i = 0; i < count; ++i) {
    cudaError_t err = cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream);
    if (err != cudaSuccess) return cleared(err);
  }
  return cudaSuccess;
}

int kv_has_batch_memcpy(void) {
#if CUDART_VERSION >= 12080
  return 1;
#else
  return 0;
#endif
}

int kv_runtime_version(void) { return CUDART_VERSION; }

const char* kv_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
