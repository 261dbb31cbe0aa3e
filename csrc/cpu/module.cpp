// pybind11 entry point of pycnn._native: the backend function table (registered by the op
// files), plus run-time controls: the instruction set of the GEMM micro-kernel, the OpenMP
// thread count, and a pure-FMA peak measurement for the benchmarks.
#include <omp.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common.h"

namespace pycnn {

namespace {

bool cpu_has_avx512() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
}

bool cpu_has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

Isa best_isa() {
    if (cpu_has_avx512()) return Isa::avx512;
    if (cpu_has_avx2()) return Isa::avx2;
    return Isa::scalar;
}

Isa parse_isa(const std::string& name) {
    if (name == "avx512") return Isa::avx512;
    if (name == "avx2") return Isa::avx2;
    if (name == "scalar") return Isa::scalar;
    throw py::value_error("isa must be 'avx512', 'avx2' or 'scalar', got '" + name + "'");
}

// Chosen once at import: PYCNN_NATIVE_ISA when set (and supported), else the best the CPU has.
Isa g_isa = Isa::scalar;
int g_threads = 1;

}  // namespace

bool isa_supported(Isa isa) {
    switch (isa) {
        case Isa::avx512: return cpu_has_avx512();
        case Isa::avx2: return cpu_has_avx2();
        default: return true;
    }
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::avx512: return "avx512";
        case Isa::avx2: return "avx2";
        default: return "scalar";
    }
}

Isa current_isa() { return g_isa; }

void set_isa(Isa isa) {
    if (!isa_supported(isa))
        throw py::value_error(std::string("isa '") + isa_name(isa) + "' is not supported by this CPU");
    g_isa = isa;
}

template <>
MicroKernel<float> current_ukernel<float>() {
    switch (g_isa) {
        case Isa::avx512: return ukernel_avx512_f32();
        case Isa::avx2: return ukernel_avx2_f32();
        default: return ukernel_scalar_f32();
    }
}

template <>
MicroKernel<double> current_ukernel<double>() {
    switch (g_isa) {
        case Isa::avx512: return ukernel_avx512_f64();
        case Isa::avx2: return ukernel_avx2_f64();
        default: return ukernel_scalar_f64();
    }
}

// ---- the output-array cache (common.h: new_array)
namespace {
struct ArrayCache {
    std::mutex mutex;
    std::unordered_map<size_t, std::vector<void*>> free_lists;  // by exact size in bytes
    size_t cached_bytes = 0;
};
// never destroyed: arrays may die during interpreter shutdown, after static destructors ran
ArrayCache& array_cache() {
    static ArrayCache* cache = new ArrayCache();
    return *cache;
}
constexpr size_t kCacheMaxBytes = size_t(512) << 20;  // beyond this, freed buffers are released
constexpr size_t kHeader = 64;                         // keeps the size; keeps data 64-byte aligned
}  // namespace

void* cached_alloc(size_t bytes) {
    ArrayCache& c = array_cache();
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        auto it = c.free_lists.find(bytes);
        if (it != c.free_lists.end() && !it->second.empty()) {
            void* p = it->second.back();
            it->second.pop_back();
            c.cached_bytes -= bytes;
            return p;
        }
    }
    char* base = static_cast<char*>(std::aligned_alloc(64, (bytes + kHeader + 63) / 64 * 64));
    if (!base) throw std::bad_alloc();
    *reinterpret_cast<size_t*>(base) = bytes;
    return base + kHeader;
}

void cached_free(void* p) {
    char* base = static_cast<char*>(p) - kHeader;
    const size_t bytes = *reinterpret_cast<size_t*>(base);
    ArrayCache& c = array_cache();
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        if (c.cached_bytes + bytes <= kCacheMaxBytes) {
            c.free_lists[bytes].push_back(p);
            c.cached_bytes += bytes;
            return;
        }
    }
    std::free(base);
}

int num_threads() { return g_threads; }

void set_num_threads(int n) {
    if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
    g_threads = n;
}

}  // namespace pycnn

PYBIND11_MODULE(_native, m) {
    using namespace pycnn;
    m.doc() = "pycnn native CPU backend: C++17 kernels, one packed AVX-512/AVX2 GEMM for conv and linear";

    g_isa = best_isa();
    if (const char* env = std::getenv("PYCNN_NATIVE_ISA")) {
        if (*env) {
            Isa want;
            try {
                want = parse_isa(env);
            } catch (const py::value_error& e) {  // (name the variable: the import fails far from it)
                throw py::value_error(std::string("PYCNN_NATIVE_ISA=") + env + ": " + e.what());
            }
            if (!isa_supported(want))
                throw py::value_error(std::string("PYCNN_NATIVE_ISA=") + env + " is not supported by this CPU");
            g_isa = want;
        }
    }
    g_threads = std::max(1, omp_get_max_threads());

    register_conv_linear(m);
    register_pool(m);
    register_elementwise(m);

    m.def("isa", []() { return std::string(isa_name(current_isa())); },
          "The instruction set of the GEMM micro-kernel in use: 'avx512', 'avx2' or 'scalar'.");
    m.def("set_isa", [](const std::string& name) { set_isa(parse_isa(name)); },
          "Switch the micro-kernel ISA ('avx512', 'avx2', 'scalar'); ValueError if the CPU lacks it.");
    m.def("isa_supported", [](const std::string& name) { return isa_supported(parse_isa(name)); });
    m.def("micro_tile", [](const std::string& dtype) {
        if (dtype == "float32") { auto k = current_ukernel<float>(); return py::make_tuple(k.mr, k.nr); }
        if (dtype == "float64") { auto k = current_ukernel<double>(); return py::make_tuple(k.mr, k.nr); }
        throw py::value_error("micro_tile: dtype must be 'float32' or 'float64', got '" + dtype + "'");
    }, "(MR, NR) of the register tile of the current micro-kernel for a dtype.");
    m.def("get_num_threads", &num_threads, "OpenMP threads the kernels use.");
    m.def("set_num_threads", &set_num_threads, py::arg("n"), "Set the OpenMP threads the kernels use (>= 1).");
    m.def("fma_peak_gflops", [](const std::string& isa, long iterations) {
        Isa which = parse_isa(isa);
        if (which == Isa::scalar || !isa_supported(which))
            throw py::value_error("fma_peak_gflops: isa must be a supported 'avx512' or 'avx2'");
        py::gil_scoped_release release;
        auto t0 = std::chrono::steady_clock::now();
        double flops = which == Isa::avx512 ? fma_peak_avx512(iterations) : fma_peak_avx2(iterations);
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        return flops / s * 1e-9;
    }, py::arg("isa"), py::arg("iterations") = 200000000L,
       "fp32 GFLOP/s of a pure-FMA register loop on the calling thread (one core's peak).");
}
