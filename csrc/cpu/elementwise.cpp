// Activations, losses and optimizer steps: plain loops the compiler can vectorize, OpenMP above
// kParallelMin elements. Loss reductions accumulate in double, sequentially, in index order
// (deterministic; losses are small next to the convolutions).
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace pycnn {

namespace {

std::vector<py::ssize_t> shape_of(const py::array& a) {
    return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim());
}

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) s += std::to_string(a.shape(d)) + (a.ndim() == 1 || d + 1 < a.ndim() ? "," : "");
    return s + ")";
}

void require_same_shape(const char* op, const char* name, const py::array& a, const char* ref_name,
                        const py::array& ref) {
    if (shape_of(a) != shape_of(ref))
        throw py::value_error(std::string(op) + ": " + name + " must have the shape of " + ref_name +
                              " " + shape_str(ref) + ", got " + shape_str(a));
}

double reduction_norm(const char* op, const std::string& reduction, double count) {
    if (reduction == "mean") return count;
    if (reduction == "sum") return 1.0;
    throw py::value_error(std::string(op) + ": reduction must be 'mean' or 'sum', got '" + reduction + "'");
}

template <typename T>
py::array scalar_array(double v) {
    py::array_t<T> out(std::vector<py::ssize_t>{});
    *out.mutable_data() = T(v);
    return out;
}

// ---------------------------------------------------------------------------- activations

// out[i] = f(a[i]) or f(a[i], b[i]) over same-shape contiguous arrays.
template <typename T, typename F>
py::array unary(const char* op, py::array a, F f) {
    require<T>(a, op, "x");
    py::array_t<T> out = new_array<T>(shape_of(a));
    const T* ap = cptr<T>(a);
    T* op_ = out.mutable_data();
    const long n = long(a.size());
    {
        py::gil_scoped_release release;
#pragma omp parallel for simd schedule(static) num_threads(num_threads()) if (n > kParallelMin)
        for (long i = 0; i < n; ++i) op_[i] = f(ap[i]);
    }
    return out;
}

template <typename T, typename F>
py::array binary(const char* op, const char* an, py::array a, const char* bn, py::array b, F f) {
    require<T>(a, op, an);
    require<T>(b, op, bn);
    require_same_shape(op, bn, b, an, a);
    py::array_t<T> out = new_array<T>(shape_of(a));
    const T* ap = cptr<T>(a);
    const T* bp = cptr<T>(b);
    T* op_ = out.mutable_data();
    const long n = long(a.size());
    {
        py::gil_scoped_release release;
#pragma omp parallel for simd schedule(static) num_threads(num_threads()) if (n > kParallelMin)
        for (long i = 0; i < n; ++i) op_[i] = f(ap[i], bp[i]);
    }
    return out;
}

template <typename T>
T sigmoid(T x) {
    // exp is only ever taken of a non-positive number: no overflow in either tail
    T e = std::exp(-std::fabs(x));
    return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

template <typename T>
T softplus(T x) {  // log(1 + exp(x)) without overflow
    return std::max(x, T(0)) + std::log1p(std::exp(-std::fabs(x)));
}

// Dispatch helpers: the dtype of the first array picks the instantiation.
#define PYCNN_DISPATCH(op, name, arr, call_f32, call_f64) \
    if (has_dtype<float>(arr)) return call_f32;           \
    if (has_dtype<double>(arr)) return call_f64;          \
    bad_float(op, name, arr)

// ---------------------------------------------------------------------------- losses

template <typename I>
bool is_index(const py::array& a) { return has_dtype<I>(a); }

// Class indices as int64, checked against [0, C). Accepts int32 and int64 arrays without copying
// the logits; the index vector itself is small (one entry per sample).
std::vector<int64_t> class_indices(const char* op, const py::array& target, long n, long classes) {
    if (target.ndim() != 1 || target.shape(0) != n)
        throw py::value_error(std::string(op) + ": target must have shape (" + std::to_string(n) + ",), got ndim " +
                              std::to_string(target.ndim()));
    if (!(target.flags() & py::array::c_style))
        throw py::type_error(std::string(op) + ": target must be C-contiguous");
    std::vector<int64_t> t(n);
    if (is_index<int64_t>(target)) {
        const int64_t* p = static_cast<const int64_t*>(target.data());
        for (long i = 0; i < n; ++i) t[i] = p[i];
    } else if (is_index<int32_t>(target)) {
        const int32_t* p = static_cast<const int32_t*>(target.data());
        for (long i = 0; i < n; ++i) t[i] = p[i];
    } else {
        throw py::type_error(std::string(op) + ": target must be an int32 or int64 array, got " +
                             std::string(py::str(target.dtype())));
    }
    for (long i = 0; i < n; ++i)
        if (t[i] < 0 || t[i] >= classes)
            throw py::value_error(std::string(op) + ": target holds class " + std::to_string(t[i]) +
                                  ", outside [0, " + std::to_string(classes) + ")");
    return t;
}

template <typename T>
const T* class_weights(const char* op, const py::object& weight, long classes, py::array& keep) {
    if (weight.is_none()) return nullptr;
    keep = py::reinterpret_borrow<py::array>(weight);
    require<T>(keep, op, "weight", 1);
    if (keep.shape(0) != classes)
        throw py::value_error(std::string(op) + ": weight must have shape (" + std::to_string(classes) +
                              ",), got (" + std::to_string(keep.shape(0)) + ",)");
    return cptr<T>(keep);
}

template <typename T>
py::tuple softmax_ce_forward_t(py::array logits, py::array target, py::object weight, double eps,
                               const std::string& reduction) {
    const char* op = "softmax_cross_entropy_forward";
    require<T>(logits, op, "logits", 2);
    const long n = logits.shape(0), classes = logits.shape(1);
    reduction_norm(op, reduction, 1.0);
    std::vector<int64_t> t = class_indices(op, target, n, classes);
    py::array wkeep;
    const T* w = class_weights<T>(op, weight, classes, wkeep);
    py::array_t<T> probs = new_array<T>({n, classes});
    const T* z = cptr<T>(logits);
    T* pr = probs.mutable_data();
    double total = 0.0, wsum = 0.0;
    {
        py::gil_scoped_release release;
        std::vector<T> lp(classes);
        for (long i = 0; i < n; ++i) {
            const T* zi = z + i * classes;
            T m = zi[0];
            for (long c = 1; c < classes; ++c) m = std::max(m, zi[c]);
            T se = T(0);
            for (long c = 0; c < classes; ++c) se += std::exp(zi[c] - m);
            const T lse = std::log(se);
            double smooth = 0.0;
            for (long c = 0; c < classes; ++c) {
                lp[c] = (zi[c] - m) - lse;
                pr[i * classes + c] = std::exp(lp[c]);
                smooth += double(w ? w[c] : T(1)) * double(lp[c]);
            }
            const double wt = w ? double(w[t[i]]) : 1.0;
            wsum += wt;
            total += -(1.0 - eps) * wt * double(lp[t[i]]);
            if (eps != 0.0) total -= eps / double(classes) * smooth;
        }
    }
    const double norm = reduction_norm(op, reduction, w ? wsum : double(n));
    return py::make_tuple(scalar_array<T>(total / norm), probs);
}

template <typename T>
py::array softmax_ce_backward_t(double dloss, py::array probs, py::array target, py::object weight,
                                double eps, const std::string& reduction) {
    const char* op = "softmax_cross_entropy_backward";
    require<T>(probs, op, "probs", 2);
    const long n = probs.shape(0), classes = probs.shape(1);
    reduction_norm(op, reduction, 1.0);
    std::vector<int64_t> t = class_indices(op, target, n, classes);
    py::array wkeep;
    const T* w = class_weights<T>(op, weight, classes, wkeep);
    double wsum = 0.0, wall = 0.0;
    for (long i = 0; i < n; ++i) wsum += w ? double(w[t[i]]) : 1.0;
    for (long c = 0; c < classes; ++c) wall += w ? double(w[c]) : 1.0;
    const double scale = dloss / reduction_norm(op, reduction, w ? wsum : double(n));
    py::array_t<T> grad = new_array<T>({n, classes});
    const T* p = cptr<T>(probs);
    T* g = grad.mutable_data();
    {
        py::gil_scoped_release release;
        for (long i = 0; i < n; ++i) {
            const double wt = w ? double(w[t[i]]) : 1.0;
            for (long c = 0; c < classes; ++c) {
                const double pc = double(p[i * classes + c]);
                double v = (1.0 - eps) * wt * (pc - (c == t[i] ? 1.0 : 0.0));
                if (eps != 0.0) v += eps / double(classes) * (wall * pc - (w ? double(w[c]) : 1.0));
                g[i * classes + c] = T(v * scale);
            }
        }
    }
    return grad;
}

// pos_weight: None, or an array of size 1 or of the logits' last dimension (it broadcasts
// against the LAST dim). Returns its data and the modulus used to index it (0 = no pos_weight).
template <typename T>
const T* pos_weights(const char* op, const py::object& pos_weight, const py::array& logits, long& period,
                     py::array& keep) {
    period = 0;
    if (pos_weight.is_none()) return nullptr;
    keep = py::reinterpret_borrow<py::array>(pos_weight);
    require<T>(keep, op, "pos_weight");
    const long last = logits.ndim() ? long(logits.shape(logits.ndim() - 1)) : 1;
    bool ok = keep.ndim() <= std::max<long>(logits.ndim(), 1);
    for (long d = 0; ok && d + 1 < keep.ndim(); ++d) ok = keep.shape(d) == 1;
    if (ok && keep.size() != 1 && keep.size() != last) ok = false;
    if (!ok)
        throw py::value_error(std::string(op) + ": pos_weight must broadcast against the last dimension of logits (" +
                              std::to_string(last) + "), got shape " +
                              shape_str(keep));
    period = long(keep.size());
    return cptr<T>(keep);
}

template <typename T>
py::array bce_forward_t(py::array logits, py::array target, py::object pos_weight, const std::string& reduction) {
    const char* op = "bce_with_logits_forward";
    require<T>(logits, op, "logits");
    require<T>(target, op, "target");
    require_same_shape(op, "target", target, "logits", logits);
    const double norm = reduction_norm(op, reduction, double(logits.size()));
    long period;
    py::array keep;
    const T* pw = pos_weights<T>(op, pos_weight, logits, period, keep);
    const T* x = cptr<T>(logits);
    const T* t = cptr<T>(target);
    const long n = long(logits.size());
    double total = 0.0;
    {
        py::gil_scoped_release release;
        for (long i = 0; i < n; ++i) {
            const double p = pw ? double(pw[i % period]) : 1.0;
            total += p * double(t[i]) * double(softplus(-x[i])) + (1.0 - double(t[i])) * double(softplus(x[i]));
        }
    }
    return scalar_array<T>(total / norm);
}

template <typename T>
py::array bce_backward_t(double dloss, py::array logits, py::array target, py::object pos_weight,
                         const std::string& reduction) {
    const char* op = "bce_with_logits_backward";
    require<T>(logits, op, "logits");
    require<T>(target, op, "target");
    require_same_shape(op, "target", target, "logits", logits);
    const double scale = dloss / reduction_norm(op, reduction, double(logits.size()));
    long period;
    py::array keep;
    const T* pw = pos_weights<T>(op, pos_weight, logits, period, keep);
    py::array_t<T> grad = new_array<T>(shape_of(logits));
    const T* x = cptr<T>(logits);
    const T* t = cptr<T>(target);
    T* g = grad.mutable_data();
    const long n = long(logits.size());
    {
        py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (n > kParallelMin)
        for (long i = 0; i < n; ++i) {
            const double p = pw ? double(pw[i % period]) : 1.0;
            const double s = double(sigmoid(x[i])), ti = double(t[i]);
            g[i] = T((-p * ti * (1.0 - s) + (1.0 - ti) * s) * scale);
        }
    }
    return grad;
}

template <typename T>
py::array mse_forward_t(py::array pred, py::array target, const std::string& reduction) {
    const char* op = "mse_forward";
    require<T>(pred, op, "pred");
    require<T>(target, op, "target");
    require_same_shape(op, "target", target, "pred", pred);
    const double norm = reduction_norm(op, reduction, double(pred.size()));
    const T* p = cptr<T>(pred);
    const T* t = cptr<T>(target);
    double total = 0.0;
    for (long i = 0, n = long(pred.size()); i < n; ++i) {
        const double d = double(p[i] - t[i]);
        total += d * d;
    }
    return scalar_array<T>(total / norm);
}

template <typename T>
py::array mse_backward_t(double dloss, py::array pred, py::array target, const std::string& reduction) {
    const char* op = "mse_backward";
    require<T>(pred, op, "pred");
    require<T>(target, op, "target");
    require_same_shape(op, "target", target, "pred", pred);
    const T scale = T(2.0 * dloss / reduction_norm(op, reduction, double(pred.size())));
    return binary<T>(op, "pred", pred, "target", target, [scale](T p, T t) { return (p - t) * scale; });
}

template <typename T>
py::array smooth_l1_forward_t(py::array pred, py::array target, double beta, const std::string& reduction) {
    const char* op = "smooth_l1_forward";
    require<T>(pred, op, "pred");
    require<T>(target, op, "target");
    require_same_shape(op, "target", target, "pred", pred);
    if (beta < 0) throw py::value_error("smooth_l1_forward: beta must be >= 0, got " + std::to_string(beta));
    const double norm = reduction_norm(op, reduction, double(pred.size()));
    const T* p = cptr<T>(pred);
    const T* t = cptr<T>(target);
    double total = 0.0;
    for (long i = 0, n = long(pred.size()); i < n; ++i) {
        const double d = std::fabs(double(p[i] - t[i]));
        total += (beta > 0 && d < beta) ? 0.5 * d * d / beta : (beta > 0 ? d - 0.5 * beta : d);
    }
    return scalar_array<T>(total / norm);
}

template <typename T>
py::array smooth_l1_backward_t(double dloss, py::array pred, py::array target, double beta,
                               const std::string& reduction) {
    const char* op = "smooth_l1_backward";
    require<T>(pred, op, "pred");
    require<T>(target, op, "target");
    if (beta < 0) throw py::value_error("smooth_l1_backward: beta must be >= 0, got " + std::to_string(beta));
    const double scale = dloss / reduction_norm(op, reduction, double(pred.size()));
    return binary<T>(op, "pred", pred, "target", target, [beta, scale](T p, T t) {
        const double d = double(p - t);
        // sign(d), with NumPy's sign(NaN) = NaN: a NaN difference gives a NaN gradient (the
        // reference's, and PyTorch's for beta > 0), not a silent 0.
        const double sign = d > 0 ? 1.0 : (d < 0 ? -1.0 : d);
        return T(((beta > 0 && std::fabs(d) < beta) ? d / beta : sign) * scale);
    });
}

// ---------------------------------------------------------------------------- optimizers

// The arrays of one parameter, checked: same dtype T, C-contiguous, writeable, same size.
template <typename T>
std::vector<T*> state_pointers(const char* op, const char* name, const py::list& arrays,
                               const std::vector<long>& sizes, bool writeable) {
    if (long(arrays.size()) != long(sizes.size()))
        throw py::value_error(std::string(op) + ": " + name + " has " + std::to_string(arrays.size()) +
                              " arrays but params has " + std::to_string(sizes.size()));
    std::vector<T*> out;
    for (size_t i = 0; i < sizes.size(); ++i) {
        py::object o = arrays[i];
        if (!py::isinstance<py::array>(o))
            throw py::type_error(std::string(op) + ": " + name + "[" + std::to_string(i) + "] must be a NumPy array");
        py::array a = py::reinterpret_borrow<py::array>(o);
        std::string item = std::string(name) + "[" + std::to_string(i) + "]";
        require<T>(a, op, item.c_str());
        if (long(a.size()) != sizes[i])
            throw py::value_error(std::string(op) + ": " + item + " has " + std::to_string(a.size()) +
                                  " elements, params[" + std::to_string(i) + "] has " + std::to_string(sizes[i]));
        if (writeable && !a.writeable())
            throw py::value_error(std::string(op) + ": " + item + " must be writeable");
        out.push_back(static_cast<T*>(writeable ? a.mutable_data() : const_cast<void*>(a.data())));
    }
    return out;
}

template <typename T>
std::vector<long> param_sizes(const py::list& params) {
    std::vector<long> sizes;
    for (size_t i = 0; i < params.size(); ++i) {
        py::object o = params[i];
        if (!py::isinstance<py::array>(o))
            throw py::type_error("optimizer step: params[" + std::to_string(i) + "] must be a NumPy array");
        sizes.push_back(long(py::reinterpret_borrow<py::array>(o).size()));
    }
    return sizes;
}

// One parameter's SGD update; the options are template flags (Flags & 1: weight decay, 2: momentum,
// 4: Nesterov, 8: the first step, whose buffer is the gradient itself), so that every combination
// is its own branch-free loop that vectorizes (as run-time branches only some of GCC's per-option
// copies of the loop did).
template <typename T>
using SgdUpdate = void (*)(long, T*, const T*, T*, T, T, T, T);

template <typename T, int Flags>
void sgd_update(long n, T* pk, const T* gk, T* bk, T lr, T momentum, T damp, T wd) {
    constexpr bool decay = Flags & 1, with_momentum = Flags & 2, nesterov = Flags & 4, first = Flags & 8;
#pragma omp parallel for simd schedule(static) num_threads(num_threads()) if (n > kParallelMin)
    for (long i = 0; i < n; ++i) {
        T gi = gk[i];
        if constexpr (decay) gi = gi + wd * pk[i];
        if constexpr (with_momentum) {
            T buf;
            if constexpr (first) buf = gi;
            else buf = momentum * bk[i] + damp * gi;
            bk[i] = buf;
            if constexpr (nesterov) gi = gi + momentum * buf;
            else gi = buf;
        }
        pk[i] -= lr * gi;
    }
}

template <typename T, int... Flags>
SgdUpdate<T> sgd_update_for(int flags, std::integer_sequence<int, Flags...>) {
    static const SgdUpdate<T> table[] = {&sgd_update<T, Flags>...};
    return table[flags];
}

template <typename T>
void sgd_step_t(py::list params, py::list grads, py::object bufs, double lr, double momentum,
                double dampening, double weight_decay, bool nesterov, bool first_step) {
    const char* op = "sgd_step";
    std::vector<long> sizes = param_sizes<T>(params);
    std::vector<T*> p = state_pointers<T>(op, "params", params, sizes, true);
    std::vector<T*> g = state_pointers<T>(op, "grads", grads, sizes, false);
    std::vector<T*> b;
    if (momentum != 0.0) {
        if (bufs.is_none()) throw py::value_error("sgd_step: momentum_buffers is required when momentum != 0");
        b = state_pointers<T>(op, "momentum_buffers", py::reinterpret_borrow<py::list>(bufs), sizes, true);
    }
    const T tlr = T(lr), tm = T(momentum), tdamp = T(1.0 - dampening), twd = T(weight_decay);
    const int flags = (weight_decay != 0.0 ? 1 : 0) |
                      (momentum != 0.0 ? 2 | (nesterov ? 4 : 0) | (first_step ? 8 : 0) : 0);
    const SgdUpdate<T> update = sgd_update_for<T>(flags, std::make_integer_sequence<int, 16>());
    py::gil_scoped_release release;
    for (size_t k = 0; k < sizes.size(); ++k)
        update(sizes[k], p[k], g[k], b.empty() ? nullptr : b[k], tlr, tm, tdamp, twd);
}

// One parameter's Adam update. The weight-decay mode is a template argument: as run-time branches
// inside the loop GCC split it into one copy per mode and vectorized only one of them (the plain
// Adam of every model here ran scalar, 0.38 ms for FastMNIST's 215k parameters).
enum AdamDecay { adam_no_decay = 0, adam_l2 = 1, adam_decoupled = 2 };

template <typename T, int Decay>
void adam_update(long n, T* pk, const T* gk, T* mk, T* vk, T b1, T b2, T c1, T c2, T step_size, T tb2, T teps,
                 T twd, T shrink) {
#pragma omp parallel for simd schedule(static) num_threads(num_threads()) if (n > kParallelMin)
    for (long i = 0; i < n; ++i) {
        T gi = gk[i], pi = pk[i];
        if constexpr (Decay == adam_l2) gi = gi + twd * pi;
        if constexpr (Decay == adam_decoupled) pi *= shrink;
        const T mi = b1 * mk[i] + c1 * gi;
        const T vi = b2 * vk[i] + c2 * gi * gi;
        mk[i] = mi;
        vk[i] = vi;
        pk[i] = pi - step_size * mi / (std::sqrt(vi) / tb2 + teps);
    }
}

template <typename T>
void adam_step_t(py::list params, py::list grads, py::list exp_avgs, py::list exp_avg_sqs, long step,
                 double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled) {
    const char* op = "adam_step";
    if (step < 1) throw py::value_error("adam_step: step must be >= 1 (1-based, after incrementing), got " + std::to_string(step));
    std::vector<long> sizes = param_sizes<T>(params);
    std::vector<T*> p = state_pointers<T>(op, "params", params, sizes, true);
    std::vector<T*> g = state_pointers<T>(op, "grads", grads, sizes, false);
    std::vector<T*> m = state_pointers<T>(op, "exp_avgs", exp_avgs, sizes, true);
    std::vector<T*> v = state_pointers<T>(op, "exp_avg_sqs", exp_avg_sqs, sizes, true);
    const double bias1 = 1.0 - std::pow(beta1, double(step));
    const double bias2_sqrt = std::sqrt(1.0 - std::pow(beta2, double(step)));
    const T step_size = T(lr / bias1), tb2 = T(bias2_sqrt), teps = T(eps);
    const T b1 = T(beta1), b2 = T(beta2), c1 = T(1.0 - beta1), c2 = T(1.0 - beta2);
    const T twd = T(weight_decay), shrink = T(1.0 - lr * weight_decay);
    const auto update = weight_decay == 0.0 ? &adam_update<T, adam_no_decay>
                        : decoupled          ? &adam_update<T, adam_decoupled>
                                             : &adam_update<T, adam_l2>;
    py::gil_scoped_release release;
    for (size_t k = 0; k < sizes.size(); ++k)
        update(sizes[k], p[k], g[k], m[k], v[k], b1, b2, c1, c2, step_size, tb2, teps, twd, shrink);
}

// The dtype of the first parameter picks the instantiation.
py::array first_array(const char* op, const py::list& params) {
    if (params.size() == 0) return py::array_t<float>(0);
    py::object o = params[0];
    if (!py::isinstance<py::array>(o))
        throw py::type_error(std::string(op) + ": params[0] must be a NumPy array");
    return py::reinterpret_borrow<py::array>(o);
}

}  // namespace

void register_elementwise(py::module_& m) {
    m.def("relu_forward", [](py::array x) {
        PYCNN_DISPATCH("relu_forward", "x", x,
            unary<float>("relu_forward", x, [](float v) { return v < 0.f ? 0.f : v; }),
            unary<double>("relu_forward", x, [](double v) { return v < 0.0 ? 0.0 : v; }));
    });
    m.def("relu_backward", [](py::array dy, py::array y) {
        PYCNN_DISPATCH("relu_backward", "dy", dy,
            binary<float>("relu_backward", "dy", dy, "y", y, [](float d, float o) { return o > 0.f ? d : 0.f; }),
            binary<double>("relu_backward", "dy", dy, "y", y, [](double d, double o) { return o > 0.0 ? d : 0.0; }));
    });
    m.def("leaky_relu_forward", [](py::array x, double slope) {
        const float sf = float(slope);
        PYCNN_DISPATCH("leaky_relu_forward", "x", x,
            unary<float>("leaky_relu_forward", x, [sf](float v) { return v > 0.f ? v : v * sf; }),
            unary<double>("leaky_relu_forward", x, [slope](double v) { return v > 0.0 ? v : v * slope; }));
    });
    m.def("leaky_relu_backward", [](py::array dy, py::array x, double slope) {
        const float sf = float(slope);
        PYCNN_DISPATCH("leaky_relu_backward", "dy", dy,
            binary<float>("leaky_relu_backward", "dy", dy, "x", x, [sf](float d, float v) { return v > 0.f ? d : d * sf; }),
            binary<double>("leaky_relu_backward", "dy", dy, "x", x, [slope](double d, double v) { return v > 0.0 ? d : d * slope; }));
    });
    m.def("sigmoid_forward", [](py::array x) {
        PYCNN_DISPATCH("sigmoid_forward", "x", x, unary<float>("sigmoid_forward", x, sigmoid<float>),
                       unary<double>("sigmoid_forward", x, sigmoid<double>));
    });
    m.def("sigmoid_backward", [](py::array dy, py::array y) {
        PYCNN_DISPATCH("sigmoid_backward", "dy", dy,
            binary<float>("sigmoid_backward", "dy", dy, "y", y, [](float d, float o) { return d * o * (1.f - o); }),
            binary<double>("sigmoid_backward", "dy", dy, "y", y, [](double d, double o) { return d * o * (1.0 - o); }));
    });
    m.def("tanh_forward", [](py::array x) {
        PYCNN_DISPATCH("tanh_forward", "x", x, unary<float>("tanh_forward", x, [](float v) { return std::tanh(v); }),
                       unary<double>("tanh_forward", x, [](double v) { return std::tanh(v); }));
    });
    m.def("tanh_backward", [](py::array dy, py::array y) {
        PYCNN_DISPATCH("tanh_backward", "dy", dy,
            binary<float>("tanh_backward", "dy", dy, "y", y, [](float d, float o) { return d * (1.f - o * o); }),
            binary<double>("tanh_backward", "dy", dy, "y", y, [](double d, double o) { return d * (1.0 - o * o); }));
    });

    m.def("softmax_cross_entropy_forward", [](py::array logits, py::array target, py::object weight, double eps,
                                              std::string reduction) {
        PYCNN_DISPATCH("softmax_cross_entropy_forward", "logits", logits,
            softmax_ce_forward_t<float>(logits, target, weight, eps, reduction),
            softmax_ce_forward_t<double>(logits, target, weight, eps, reduction));
    });
    m.def("softmax_cross_entropy_backward", [](double dloss, py::array probs, py::array target, py::object weight,
                                               double eps, std::string reduction) {
        PYCNN_DISPATCH("softmax_cross_entropy_backward", "probs", probs,
            softmax_ce_backward_t<float>(dloss, probs, target, weight, eps, reduction),
            softmax_ce_backward_t<double>(dloss, probs, target, weight, eps, reduction));
    });
    m.def("bce_with_logits_forward", [](py::array logits, py::array target, py::object pw, std::string reduction) {
        PYCNN_DISPATCH("bce_with_logits_forward", "logits", logits, bce_forward_t<float>(logits, target, pw, reduction),
                       bce_forward_t<double>(logits, target, pw, reduction));
    });
    m.def("bce_with_logits_backward", [](double dloss, py::array logits, py::array target, py::object pw,
                                         std::string reduction) {
        PYCNN_DISPATCH("bce_with_logits_backward", "logits", logits,
            bce_backward_t<float>(dloss, logits, target, pw, reduction),
            bce_backward_t<double>(dloss, logits, target, pw, reduction));
    });
    m.def("mse_forward", [](py::array pred, py::array target, std::string reduction) {
        PYCNN_DISPATCH("mse_forward", "pred", pred, mse_forward_t<float>(pred, target, reduction),
                       mse_forward_t<double>(pred, target, reduction));
    });
    m.def("mse_backward", [](double dloss, py::array pred, py::array target, std::string reduction) {
        PYCNN_DISPATCH("mse_backward", "pred", pred, mse_backward_t<float>(dloss, pred, target, reduction),
                       mse_backward_t<double>(dloss, pred, target, reduction));
    });
    m.def("smooth_l1_forward", [](py::array pred, py::array target, double beta, std::string reduction) {
        PYCNN_DISPATCH("smooth_l1_forward", "pred", pred, smooth_l1_forward_t<float>(pred, target, beta, reduction),
                       smooth_l1_forward_t<double>(pred, target, beta, reduction));
    });
    m.def("smooth_l1_backward", [](double dloss, py::array pred, py::array target, double beta, std::string reduction) {
        PYCNN_DISPATCH("smooth_l1_backward", "pred", pred,
            smooth_l1_backward_t<float>(dloss, pred, target, beta, reduction),
            smooth_l1_backward_t<double>(dloss, pred, target, beta, reduction));
    });

    m.def("sgd_step", [](py::list params, py::list grads, py::object bufs, double lr, double momentum,
                         double dampening, double weight_decay, bool nesterov, bool first_step) {
        py::array p0 = first_array("sgd_step", params);
        if (params.size() == 0) return;
        if (has_dtype<float>(p0)) return sgd_step_t<float>(params, grads, bufs, lr, momentum, dampening, weight_decay, nesterov, first_step);
        if (has_dtype<double>(p0)) return sgd_step_t<double>(params, grads, bufs, lr, momentum, dampening, weight_decay, nesterov, first_step);
        bad_float("sgd_step", "params[0]", p0);
    });
    m.def("adam_step", [](py::list params, py::list grads, py::list m_, py::list v_, long step, double lr,
                          double beta1, double beta2, double eps, double weight_decay, bool decoupled) {
        py::array p0 = first_array("adam_step", params);
        if (params.size() == 0) return;
        if (has_dtype<float>(p0)) return adam_step_t<float>(params, grads, m_, v_, step, lr, beta1, beta2, eps, weight_decay, decoupled);
        if (has_dtype<double>(p0)) return adam_step_t<double>(params, grads, m_, v_, step, lr, beta1, beta2, eps, weight_decay, decoupled);
        bad_float("adam_step", "params[0]", p0);
    });
}

}  // namespace pycnn
