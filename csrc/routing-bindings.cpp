// routing-bindings.cpp — pybind11 module cluster._routing: the router's maths (expert demand of
// a prompt, expected loads per node, prefix hashes), for processes that route and never run a
// model: no llama.cpp or ggml inside. Converts types, releases the GIL around long calls,
// decides nothing; the typed surface is cluster/routing/warmth.py.
#include "demand.h"
#include "prefix-hash.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_routing, m) {
    m.doc() = "Native routing maths (private; use cluster.routing.warmth).";
    using f32_in = py::array_t<float, py::array::c_style | py::array::forcecast>;
    using i64_in = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
    using code_table = py::array_t<uint8_t, py::array::c_style>;
    m.def("request_demand",
          [](const code_table & log_miss, const code_table & prob, const i64_in & token_rows, const i64_in & starts,
             size_t max_sampled, size_t decode_context) {
              if (log_miss.ndim() != 2 || prob.ndim() != 2 || log_miss.shape(0) != prob.shape(0) ||
                  log_miss.shape(1) != prob.shape(1) || token_rows.ndim() != 1 || starts.ndim() != 1) {
                  throw py::value_error("expected log_miss and prob [n, width] uint8 of one shape, token_rows [t] "
                                        "and starts [g]");
              }
              affinity_tables tables;
              tables.log_miss = log_miss.data();
              tables.prob = prob.data();
              tables.n_rows = static_cast<size_t>(log_miss.shape(0));
              tables.width = static_cast<size_t>(log_miss.shape(1));
              const int64_t * rows = token_rows.data();
              for (py::ssize_t i = 0; i < token_rows.size(); ++i) {
                  if (rows[i] >= static_cast<int64_t>(tables.n_rows)) {
                      throw py::index_error("token row " + std::to_string(rows[i]) + " is outside the table of " +
                                            std::to_string(tables.n_rows) + " rows");
                  }
              }
              demand_params params;
              params.max_sampled = max_sampled;
              params.decode_context = decode_context;
              const auto n_groups = static_cast<py::ssize_t>(starts.size());
              const auto width = static_cast<py::ssize_t>(tables.width);
              py::array_t<float> prefill({n_groups, width});
              py::array_t<int64_t> known(n_groups);
              py::array_t<float> decode(width);
              demand_out out;
              out.prefill = prefill.mutable_data();
              out.known = known.mutable_data();
              out.decode = decode.mutable_data();
              demand_request request;
              request.token_rows = rows;
              request.n_tokens = static_cast<size_t>(token_rows.size());
              request.starts = starts.data();
              request.n_groups = static_cast<size_t>(n_groups);
              {
                  py::gil_scoped_release release;
                  request_demand(tables, request, params, out);
              }
              return py::make_tuple(prefill, known, decode, out.n_decode_known);
          },
          py::arg("log_miss"), py::arg("prob"), py::arg("token_rows"), py::arg("starts"), py::arg("max_sampled"),
          py::arg("decode_context"),
          "Expert demand of a prompt (demand.h): (prefill float32 [g, width] per start, known int64 [g], "
          "decode float32 [width], distinct known trailing tokens).");
    m.def("expected_loads",
          [](const py::array_t<uint8_t, py::array::c_style> & residency, const i64_in & node_rows,
             const i64_in & node_groups, const f32_in & prefill, const f32_in & decode, float decode_steps) {
              if (residency.ndim() != 2 || prefill.ndim() != 2 || decode.ndim() != 1 || node_rows.ndim() != 1 ||
                  node_rows.size() != node_groups.size() || decode.shape(0) != prefill.shape(1) ||
                  static_cast<size_t>(residency.shape(1)) != residency_row_bytes(static_cast<size_t>(prefill.shape(1)))) {
                  throw py::value_error("expected residency bits uint8 [r, ceil(width / 8)], node_rows and "
                                        "node_groups [n], prefill [g, width] and decode [width]");
              }
              for (py::ssize_t i = 0; i < node_rows.size(); ++i) {
                  if (node_rows.data()[i] < 0 || node_rows.data()[i] >= residency.shape(0) ||
                      node_groups.data()[i] < 0 || node_groups.data()[i] >= prefill.shape(0)) {
                      throw py::index_error("node " + std::to_string(i) + ": row or group out of range");
                  }
              }
              residency_matrix matrix;
              matrix.bits = residency.data();
              matrix.n_rows = static_cast<size_t>(residency.shape(0));
              matrix.width = static_cast<size_t>(prefill.shape(1));
              demand_in demand;
              demand.prefill = prefill.data();
              demand.n_groups = static_cast<size_t>(prefill.shape(0));
              demand.decode = decode.data();
              demand.decode_steps = decode_steps;
              py::array_t<double> out(node_rows.size());
              py::array_t<double> totals(prefill.shape(0));
              {
                  py::gil_scoped_release release;
                  expected_loads(matrix, demand, node_rows.data(), node_groups.data(),
                                 static_cast<size_t>(node_rows.size()), out.mutable_data(), totals.mutable_data());
              }
              return py::make_tuple(out, totals);
          },
          py::arg("residency"), py::arg("node_rows"), py::arg("node_groups"), py::arg("prefill"), py::arg("decode"),
          py::arg("decode_steps"),
          "Expected expert loads (demand.h): (per node float64 [n], per group with nothing resident float64 [g]).");
    m.def("prefix_hashes",
          [](const i64_in & tokens, size_t block, size_t max_blocks) {
              if (tokens.ndim() != 1 || block < 1) {
                  throw py::value_error("expected tokens [n] and block >= 1");
              }
              const size_t n_blocks = prefix_hash_count(static_cast<size_t>(tokens.size()), block, max_blocks);
              py::array_t<uint64_t> out(static_cast<py::ssize_t>(n_blocks));
              prefix_hashes(tokens.data(), static_cast<size_t>(tokens.size()), block, max_blocks, out.mutable_data());
              return out;
          },
          py::arg("tokens"), py::arg("block"), py::arg("max_blocks"),
          "Cumulative hashes of the whole blocks of a token sequence (prefix-hash.h): uint64 [n_blocks].");
    m.def("affinity_encode",
          [](const f32_in & prob) {
              const std::vector<py::ssize_t> shape(prob.shape(), prob.shape() + prob.ndim());
              py::array_t<uint8_t> prob_codes(shape), log_miss_codes(shape);
              affinity_encode(prob.data(), static_cast<size_t>(prob.size()), prob_codes.mutable_data(),
                              log_miss_codes.mutable_data());
              return py::make_tuple(prob_codes, log_miss_codes);
          },
          py::arg("prob"), "Affinity table entries of selection probabilities (demand.h): (prob codes, "
          "log-miss codes), uint8 of prob's shape.");
    m.attr("AFFINITY_CODE_MAX") = AFFINITY_CODE_MAX;
    m.attr("AFFINITY_LOG_MISS_RANGE") = AFFINITY_LOG_MISS_RANGE;
    m.attr("AFFINITY_MAX_PROB") = AFFINITY_MAX_PROB;

}
