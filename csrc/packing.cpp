// sparselayer._C: host-side micro-batch packer.
//
// What: pack_balanced(lengths, max_per_batch) splits sequence indices into
// ceil(n / max_per_batch) micro-batches of at most max_per_batch members each,
// greedily balancing their token sums (LPT: longest first, into the lightest
// non-full micro-batch).
// Why: every micro-batch of a GRPO step costs roughly its token count, so
// balanced sums keep the slowest micro-batch (and padding) small. This runs on
// every step for every rollout group, hence C++; sparselayer/packing.py holds a
// pure-Python twin that must give bit-identical results.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <queue>
#include <stdexcept>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

std::vector<std::vector<int64_t>> pack_balanced(const std::vector<int64_t>& lengths,
                                                int64_t max_per_batch) {
    if (max_per_batch < 1) {
        throw py::value_error("max_per_batch must be >= 1");
    }
    for (int64_t len : lengths) {
        if (len < 0) {
            throw py::value_error("lengths must be >= 0");
        }
    }
    const int64_t n = static_cast<int64_t>(lengths.size());
    const int64_t m = (n + max_per_batch - 1) / max_per_batch;  // 0 when n == 0

    // Indices by length descending; stable sort keeps ties by index ascending.
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });

    // Min-heap of (token sum, micro-batch number) over non-full micro-batches:
    // the top is the lightest one, ties going to the lowest number.
    using Slot = std::pair<int64_t, int64_t>;
    std::priority_queue<Slot, std::vector<Slot>, std::greater<Slot>> open;
    for (int64_t b = 0; b < m; ++b) open.emplace(0, b);

    std::vector<std::vector<int64_t>> batches(static_cast<size_t>(m));
    for (int64_t idx : order) {
        auto [sum, b] = open.top();
        open.pop();
        batches[b].push_back(idx);
        if (static_cast<int64_t>(batches[b].size()) < max_per_batch) {
            open.emplace(sum + lengths[idx], b);
        }
    }

    // Canonical order: members ascending, micro-batches by their first member
    // (every micro-batch is non-empty, see the Python twin).
    for (auto& batch : batches) std::sort(batch.begin(), batch.end());
    std::sort(batches.begin(), batches.end(),
              [](const auto& a, const auto& b) { return a.front() < b.front(); });
    return batches;
}

}  // namespace

void register_delta(py::module_& m);  // csrc/delta.cpp: sparse layer-delta codec

PYBIND11_MODULE(_C, m) {
    m.doc() = "sparselayer host-side helpers (C++)";
    m.def("pack_balanced", &pack_balanced, py::arg("lengths"), py::arg("max_per_batch"),
          "Split indices into ceil(n/max_per_batch) micro-batches of balanced token sums.");
    register_delta(m);
}
