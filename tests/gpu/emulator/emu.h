// CPU emulation of the CUDA features the pycnn kernels use: thread/block indices, __syncthreads
// (a std::barrier per block), warp shuffles (a barrier and an exchange buffer per warp), static and
// dynamic shared memory. Each CUDA thread of a block that synchronizes is one std::thread; blocks run
// one after another. Verification only (tests/gpu/test_kernels_emulated.py): slow, but it runs the
// real kernel source on machines without a GPU.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 blockDim, gridDim;
inline float* emu_dynamic_smem = nullptr;
inline std::barrier<>* emu_block_barrier = nullptr;
struct EmuWarp { std::barrier<>* bar; double buf[32]; };
inline std::vector<EmuWarp>* emu_warps = nullptr;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline int emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
template <class T> inline T emu_shfl(T v, int src) {
    int tid = emu_tid();
    EmuWarp& w = (*emu_warps)[tid / 32];
    int lane = tid % 32;
    w.bar->arrive_and_wait();
    w.buf[lane] = (double)v;
    w.bar->arrive_and_wait();
    return (T)w.buf[src];
}
template <class T> inline T __shfl_down_sync(unsigned, T v, int off) {
    int lane = emu_tid() % 32;
    int src = lane + off < 32 ? lane + off : lane;
    return emu_shfl(v, src);
}
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return emu_shfl(v, src); }
inline float __int_as_float(unsigned int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float __fmul_rn(float a, float b) { return a * b; }

inline void emu_run(int gx, int gy, int gz, int bx, int by, int bz, long long smem, bool threaded,
                    const std::function<void()>& body) {
    gridDim = {(unsigned)gx, (unsigned)gy, (unsigned)gz};
    blockDim = {(unsigned)bx, (unsigned)by, (unsigned)bz};
    const int nt = bx * by * bz;
    std::vector<float> dyn(smem / 4 + 16, __int_as_float(0x7fc00000u));  // NaN-filled: reads of unwritten smem show
    emu_dynamic_smem = dyn.data();
    for (int z = 0; z < gz; ++z)
        for (int y = 0; y < gy; ++y)
            for (int x = 0; x < gx; ++x) {
                if (!threaded) {
                    for (int t = 0; t < nt; ++t) {
                        blockIdx = {(unsigned)x, (unsigned)y, (unsigned)z};
                        threadIdx = {(unsigned)(t % bx), (unsigned)((t / bx) % by), (unsigned)(t / (bx * by))};
                        body();
                    }
                    continue;
                }
                std::barrier<> bar(nt);
                emu_block_barrier = &bar;
                int nw = (nt + 31) / 32;
                std::vector<std::unique_ptr<std::barrier<>>> wb;
                std::vector<EmuWarp> warps(nw);
                for (int w = 0; w < nw; ++w) {
                    wb.emplace_back(new std::barrier<>(std::min(32, nt - 32 * w)));
                    warps[w].bar = wb.back().get();
                }
                emu_warps = &warps;
                std::vector<std::thread> ts;
                ts.reserve(nt);
                for (int t = 0; t < nt; ++t)
                    ts.emplace_back([&, t] {
                        blockIdx = {(unsigned)x, (unsigned)y, (unsigned)z};
                        threadIdx = {(unsigned)(t % bx), (unsigned)((t / bx) % by), (unsigned)(t / (bx * by))};
                        body();
                    });
                for (auto& th : ts) th.join();
            }
}
// Added for loss.cu's last-block ticket (ce_fwd_f32): blocks run one after another here, so a
// fence has nothing to order; the atomic keeps the ticket right when threads of a block race.
#include <atomic>
inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }
inline void __threadfence() {}
