// sparselayer._C: sparse layer-delta encode/decode on raw bfloat16 bits.
//
// What: delta_encode(old, new, wide) finds the elements whose bf16 bits differ
// between the last pushed tensor and the new one and returns their flat indices
// (int32, or int64 when `wide`) and new bits, or None when that sparse form
// (index + value bytes) would not be smaller than the dense tensor.
// delta_apply(base, indices, values) writes the values into `base` in place
// after checking that the indices are strictly increasing and in range.
// Why: after one optimizer step of one layer most bf16 elements are unchanged,
// so only the changed ones travel to the rollout server. The tensors arrive as
// int16 views of bf16 data (no libtorch needed); sparselayer/rollout/delta.py
// holds a torch twin that must give identical bytes.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

namespace {

using Bits = py::array_t<int16_t, py::array::c_style | py::array::forcecast>;

template <typename Index>
py::tuple gather_changed(const int16_t* a, const int16_t* b, int64_t n, int64_t count) {
    py::array_t<Index> indices(count);
    py::array_t<int16_t> values(count);
    Index* idx = indices.mutable_data();
    int16_t* val = values.mutable_data();
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (a[i] != b[i]) {
            idx[k] = static_cast<Index>(i);
            val[k] = b[i];
            ++k;
        }
    }
    return py::make_tuple(indices, values);
}

py::object delta_encode(const Bits& old_bits, const Bits& new_bits, bool wide) {
    const int64_t n = static_cast<int64_t>(old_bits.size());
    if (n != static_cast<int64_t>(new_bits.size())) {
        throw py::value_error("delta_encode: old and new differ in size");
    }
    const int16_t* a = old_bits.data();
    const int16_t* b = new_bits.data();
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) count += (a[i] != b[i]);
    const int64_t index_bytes = wide ? 8 : 4;
    if (count * (index_bytes + 2) >= n * 2) return py::none();  // dense is no larger
    if (wide) return gather_changed<int64_t>(a, b, n, count);
    return gather_changed<int32_t>(a, b, n, count);
}

template <typename Index>
void scatter_checked(py::array_t<int16_t>& base, const py::array& indices, const Bits& values) {
    auto idx = py::array_t<Index, py::array::c_style>::ensure(indices);
    const int64_t n = static_cast<int64_t>(base.size());
    const int64_t k = static_cast<int64_t>(idx.size());
    const Index* ip = idx.data();
    int64_t prev = -1;
    for (int64_t j = 0; j < k; ++j) {  // validate everything before writing anything
        const int64_t i = static_cast<int64_t>(ip[j]);
        if (i <= prev || i >= n) {
            throw py::value_error("sparse index " + std::to_string(i) + " out of range or not increasing (size " +
                                  std::to_string(n) + ")");
        }
        prev = i;
    }
    int16_t* out = base.mutable_data();
    const int16_t* vp = values.data();
    for (int64_t j = 0; j < k; ++j) out[ip[j]] = vp[j];
}

void delta_apply(py::array_t<int16_t> base, const py::array& indices, const Bits& values) {
    if (!(base.flags() & py::array::c_style) || !base.writeable()) {
        throw py::value_error("delta_apply: base must be a writable contiguous int16 array");
    }
    if (indices.ndim() != 1 || values.ndim() != 1 || indices.size() != values.size()) {
        throw py::value_error("delta_apply: indices and values must be 1-D of equal length");
    }
    if (py::isinstance<py::array_t<int32_t>>(indices)) {
        scatter_checked<int32_t>(base, indices, values);
    } else if (py::isinstance<py::array_t<int64_t>>(indices)) {
        scatter_checked<int64_t>(base, indices, values);
    } else {
        throw py::value_error("delta_apply: indices must be int32 or int64");
    }
}

}  // namespace

void register_delta(py::module_& m) {
    m.def("delta_encode", &delta_encode, py::arg("old_bits"), py::arg("new_bits"), py::arg("wide"),
          "Flat indices and new bits of changed bf16 elements, or None when dense is no larger.");
    m.def("delta_apply", &delta_apply, py::arg("base"), py::arg("indices"), py::arg("values"),
          "Write sparse bf16 bits into base in place; indices strictly increasing and in range.");
}
