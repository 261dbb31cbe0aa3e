// CPU emulation of the CUDA features the pycnn kernels use: thread/block indices, __syncthreads
// (a std::barrier per block), warp shuffles (a barrier and an exchange buffer per warp), static and
// dynamic shared memory. Each CUDA thread of a block that synchronizes is one std::thread; blocks run
// one after another. Verification only (tests/gpu/test_kernels_emulated.py): slow, but it runs the
// real kernel source on machines without a GPU.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <vector>
struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 blockDim, gridDim;
inline float* emu_dynamic_smem = nullptr;
inline std::barrier<>* emu_block_barrier = nullptr;
// mma_a/mma_b: the operand registers of the 32 lanes during one emulated mma.sync.
// rows: the row addresses the 32 lanes give one emulated ldmatrix.
struct EmuWarp { std::barrier<>* bar; double buf[32]; unsigned mma_a[32][4]; unsigned mma_b[32][2]; const float* rows[32]; };
inline std::vector<EmuWarp>* emu_warps = nullptr;
#define __global__
#define __launch_bounds__(...)
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
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
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
// CUDA's vector types have the alignment of their size (float4, int4: 16 bytes), which is what the
// alignment checks below hold a kernel's float4 / int4 / float2 accesses to.
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };

// ---- Alignment: what a GPU faults on and a CPU does not. An access of 8 or 16 bytes (a float2 or
// float4 load or store, cp.async of 16 bytes, the row addresses of ldmatrix, st.global.v4) at an
// address that is not a multiple of its size is a "misaligned address" error on the GPU: the launch
// fails, and with it the CUDA context (every later call of the process fails too). x86 does not
// care, so the emulator checks: the PTX helpers below test their addresses, and the kernels' own
// vector loads and stores are instrumented by g++'s -fsanitize=alignment, whose reports come here
// (the __ubsan_handle_* functions at the end of this file; no sanitizer runtime is linked). The
// harness reads the count and the first report after every launch (emu_alignment_errors) and fails
// the launch with it: file and line of the kernel source (kernel_source's #line directives).
inline std::atomic<int> emu_align_errors{0};
inline std::mutex emu_align_mutex;
inline std::string emu_align_first;  // the first report since the harness last read them
inline void emu_misaligned(const char* what, const void* address, unsigned alignment, const char* file, unsigned line) {
    if (emu_align_errors.fetch_add(1) != 0) return;
    char text[512];
    std::snprintf(text, sizeof text, "%s:%u: %s at %p, which is not a multiple of %u bytes (a misaligned "
                  "address on the GPU)", file, line, what, address, alignment);
    std::lock_guard<std::mutex> lock(emu_align_mutex);
    emu_align_first = text;
}
inline void emu_check_align(const void* address, unsigned alignment, const char* what, const std::source_location& at) {
    if (reinterpret_cast<std::uintptr_t>(address) % alignment != 0)
        emu_misaligned(what, address, alignment, at.file_name(), at.line());
}

// ---- TF32 tensor-core emulation (conv2d_igemm.cu v4). The kernels call these two functions; under
// nvcc/NVRTC they are the PTX instructions cvt.rn.tf32.f32 (sm_90; cvt.rna.tf32.f32 on sm_80) and
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32.
#define PYCNN_EMULATED 1
// cvt.rn.tf32.f32, the H100/H200's rounding: to the nearest TF32 (10 explicit mantissa bits), ties
// to even; the result is a 32-bit pattern with the low 13 bits zero. Adding just under half an ulp
// (0xfff) plus the kept mantissa's lowest bit (bit 13) to the magnitude and truncating does exactly
// that: a tie (low 13 bits 0x1000) carries only when bit 13 is odd, overflowing into the exponent
// (or to inf) where due. (sm_80's cvt.rna rounds ties away from zero instead, adding 0x1000: the same
// bound of 2^-11, different bits on ties.)
inline unsigned pycnn_tf32(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf and NaN pass through
    return (u + 0xfffu + ((u >> 13) & 1u)) & 0xffffe000u;
}
// One warp-wide D = A (16x8) . B (8x8) + C, all 32 lanes of the warp taking part (as on the GPU).
// Fragment layout of the PTX ISA for m16n8k8 .tf32, lane l, g = l/4, t = l%4:
//   a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]; b0 = B[t][g], b1 = B[t+4][g];
//   c0/d0 = D[g][2t], c1 = D[g][2t+1], c2 = D[g+8][2t], c3 = D[g+8][2t+1].
// The tensor core reads only the TF32 bits of each operand (the low 13 bits are ignored); the
// products of two TF32 values are exact in double, and their sum is rounded to fp32 once here.
// The hardware's internal accumulation order and rounding are not specified by PTX, so the tests
// hold v4 to an error bound (conv2d_igemm.cu header), never to this emulation's exact bits.
inline void pycnn_mma_tf32_m16n8k8(float d[4], const unsigned a[4], const unsigned b[2]) {
    const int tid = emu_tid();
    EmuWarp& w = (*emu_warps)[tid / 32];
    const int lane = tid % 32;
    w.bar->arrive_and_wait();  // the previous mma's readers are done with the buffers
    for (int i = 0; i < 4; ++i) w.mma_a[lane][i] = a[i];
    w.mma_b[lane][0] = b[0];
    w.mma_b[lane][1] = b[1];
    w.bar->arrive_and_wait();
    double A[16][8], B[8][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const unsigned* al = w.mma_a[l];
        A[g][t] = __uint_as_float(al[0] & 0xffffe000u);
        A[g + 8][t] = __uint_as_float(al[1] & 0xffffe000u);
        A[g][t + 4] = __uint_as_float(al[2] & 0xffffe000u);
        A[g + 8][t + 4] = __uint_as_float(al[3] & 0xffffe000u);
        B[t][g] = __uint_as_float(w.mma_b[l][0] & 0xffffe000u);
        B[t + 4][g] = __uint_as_float(w.mma_b[l][1] & 0xffffe000u);
    }
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r / 2), col = 2 * t + (r % 2);
        double s = d[r];
        for (int k = 0; k < 8; ++k) s += A[row][k] * B[k][col];
        d[r] = (float)s;
    }
}

// ---- cp.async emulation (conv2d_igemm.cuh's pipelined v3/v4 main loop). On the GPU a copy lands at
// some time between its issue and the wait that covers its group; the emulator takes either end:
//   late (default): a copy is queued when issued (its source value read then: no kernel writes
//     what it copies), its group closes at commit, and it lands only when a wait covers it. A
//     kernel that computes on a buffer before waiting for it reads the old contents.
//   eager (emu_cp_async_eager = 1): a copy lands at once. A kernel that copies into a buffer
//     other threads may still be reading (a missing barrier) corrupts their operands.
// The tests run the pipelined kernels both ways.
struct EmuCopy { float* dst; float value; };
inline std::atomic<int> emu_cp_async_eager{0};
inline thread_local std::vector<EmuCopy> emu_open_group;
inline thread_local std::vector<std::vector<EmuCopy>> emu_committed_groups;
inline void pycnn_cp_async_f32(float* dst, const float* src, bool valid) {
    const float value = valid ? *src : 0.0f;
    if (emu_cp_async_eager.load()) {
        *dst = value;
        return;
    }
    emu_open_group.push_back({dst, value});
}
inline void pycnn_cp_async_commit() {
    emu_committed_groups.push_back(std::move(emu_open_group));
    emu_open_group.clear();
}
template <int PENDING> inline void pycnn_cp_async_wait() {
    while (emu_committed_groups.size() > (size_t)PENDING) {
        for (const EmuCopy& c : emu_committed_groups.front()) *c.dst = c.value;
        emu_committed_groups.erase(emu_committed_groups.begin());
    }
}
// 16-byte cp.async (conv2d_nhwc.cu): four 4-byte copies in one group, landing as those do. Both
// addresses must be multiples of 16, the source too where it is not read (src-size 0: zero fill).
inline void pycnn_cp_async_f32x4(float* dst, const float* src, bool valid,
                                 std::source_location at = std::source_location::current()) {
    emu_check_align(dst, 16, "a 16-byte cp.async into shared memory", at);
    emu_check_align(src, 16, "a 16-byte cp.async from global memory", at);
    for (int i = 0; i < 4; ++i) pycnn_cp_async_f32(dst + i, valid ? src + i : src, valid);
}
// ldmatrix.sync.aligned.m8n8.x4.shared.b16 read as 32-bit elements (conv2d_nhwc.cu): lane l gives
// the address of row l%8 of matrix l/8 (four floats) and receives element l%4 of row l/4 of matrix
// i in r[i]. A warp-wide exchange of the row addresses, as on the GPU every lane takes part.
inline void pycnn_ldmatrix_x4(unsigned r[4], const float* row,
                              std::source_location at = std::source_location::current()) {
    emu_check_align(row, 16, "an ldmatrix row address", at);
    EmuWarp& w = (*emu_warps)[emu_tid() / 32];
    const int lane = emu_tid() % 32;
    w.bar->arrive_and_wait();  // the previous exchange's readers are done with rows
    w.rows[lane] = row;
    w.bar->arrive_and_wait();
    for (int i = 0; i < 4; ++i) r[i] = __float_as_uint(w.rows[8 * i + lane / 4][lane % 4]);
}
// conv2d_igemm.cuh's vector store (st.global.v4.f32 on the GPU).
inline void pycnn_store_f32x4(float* dst, float a, float b, float c, float d,
                              std::source_location at = std::source_location::current()) {
    emu_check_align(dst, 16, "st.global.v4.f32", at);
    dst[0] = a; dst[1] = b; dst[2] = c; dst[3] = d;
}

// At a thread's exit: copies never waited for are an error (the kernel would read or leave
// unfinished data); counted in emu_copy_errors, which the test harness checks after each launch.
inline std::atomic<int> emu_copy_errors{0};
inline void emu_check_copies_done() {
    bool pending = !emu_open_group.empty();
    for (const auto& g : emu_committed_groups) pending = pending || !g.empty();
    emu_open_group.clear();
    emu_committed_groups.clear();
    if (pending) emu_copy_errors.fetch_add(1);
}

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
                        emu_check_copies_done();
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
                        emu_check_copies_done();
                    });
                for (auto& th : ts) th.join();
            }
}
// Added for loss.cu's last-block ticket (ce_fwd_f32): blocks run one after another here, so a
// fence has nothing to order; the atomic keeps the ticket right when threads of a block race.
#include <atomic>
inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }
inline void __threadfence() {}

// -fsanitize=alignment's reports (g++ calls these where a load, store or member access goes through
// a pointer that is not a multiple of its type's alignment): into emu_misaligned. The layout of the
// report is the sanitizer ABI's (a source location, the type's descriptor, log2 of the alignment).
// Weak: every kernel file's object defines them, the library keeps one.
struct EmuUbsanLocation { const char* file; unsigned line, column; };
struct EmuUbsanType { unsigned short kind, info; char name[1]; };
struct EmuUbsanMismatch { EmuUbsanLocation at; const EmuUbsanType* type; unsigned char log_alignment, check_kind; };
extern "C" __attribute__((weak)) void __ubsan_handle_type_mismatch_v1(EmuUbsanMismatch* report, void* address) {
    char what[160];
    std::snprintf(what, sizeof what, "an access of %s", report->type->name);
    emu_misaligned(what, address, 1u << report->log_alignment, report->at.file, report->at.line);
}
extern "C" __attribute__((weak)) void __ubsan_handle_type_mismatch_v1_abort(EmuUbsanMismatch* report, void* address) {
    __ubsan_handle_type_mismatch_v1(report, address);
}
// The harness's read of the reports since its last one: their count (0: none), the first into text.
extern "C" __attribute__((weak)) int emu_alignment_errors(char* text, int size) {
    std::lock_guard<std::mutex> lock(emu_align_mutex);
    const int count = emu_align_errors.exchange(0);
    std::snprintf(text, size, "%s", emu_align_first.c_str());
    emu_align_first.clear();
    return count;
}
