// bindings.cpp — pybind11 module cluster._native: converts types, releases the GIL around
// long calls, documents every def, and decides nothing. The typed public surface is
// cluster/engine/cache.py; this module is private.
#include "cache-core.h"
#include "llama-glue.h"
#include "routing-trace.h"
#include "telemetry.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace {

template <typename T>
py::array_t<T> to_array(const std::vector<T> & values, std::vector<py::ssize_t> shape) {
    py::array_t<T> out(shape);
    std::copy(values.begin(), values.end(), out.mutable_data());
    return out;
}

py::dict counters_dict(const cache_counters & counters) {
    py::dict out;
    for (const auto & field : cache_counters_fields()) { out[py::str(field.first)] = counters.*(field.second); }
    return out;
}

py::tuple warmth_arrays(const cache_policy & policy) {
    std::vector<uint8_t> resident;
    std::vector<float> heat;
    policy.warmth(resident, heat);
    const std::vector<py::ssize_t> shape{policy.n_layers(), policy.n_experts()};
    return py::make_tuple(to_array(resident, shape), to_array(heat, shape));
}

py::array_t<uint64_t> counts_array(const cache_policy & policy) {
    return to_array(policy.expert_counts(), {policy.n_layers(), policy.n_experts()});
}

template <typename T>
std::vector<T> from_array(const py::array_t<T, py::array::c_style | py::array::forcecast> & a) {
    return std::vector<T>(a.data(), a.data() + a.size());
}

template <typename T>
py::array_t<T> vector_array(const std::vector<T> & values) { return to_array(values, {py::ssize_t(values.size())}); }

using u8_in = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using i32_in = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

} // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native expert cache (private; use cluster.engine.cache).";
    m.attr("__version__") = SNIPER_VERSION;
    m.attr("PAGE_SIZE") = residency_page_size();

    py::class_<cache_config>(m, "CacheConfig", "Knobs of the cache policy (see csrc/cache-core.h).")
        .def(py::init<>())
        .def_readwrite("budget_bytes", &cache_config::budget_bytes)
        .def_readwrite("probation_fraction", &cache_config::probation_fraction)
        .def_readwrite("heat_half_life_steps", &cache_config::heat_half_life_steps)
        .def_readwrite("prefill_weight", &cache_config::prefill_weight)
        .def_readwrite("layer_floor_fraction", &cache_config::layer_floor_fraction)
        .def_property("eviction",
            [](const cache_config & c) { return std::string(cache_eviction_name(c.eviction)); },
            [](cache_config & c, const std::string & name) { c.eviction = cache_eviction_from_name(name); })
        .def_readwrite("prefetch", &cache_config::prefetch)
        .def_readwrite("prefetch_min_use", &cache_config::prefetch_min_use)
        .def_readwrite("prefetch_min_precision", &cache_config::prefetch_min_precision)
        .def("validate", &cache_config::validate, "Raises ValueError naming the first bad field.");

    py::class_<selection_config>(m, "SelectionConfig", "Exact or cache-aware expert selection (see csrc/expert-selection.h).")
        .def(py::init<>())
        .def_property("mode",
            [](const selection_config & c) { return std::string(c.mode == SELECTION_CACHE_AWARE ? "cache-aware" : "exact"); },
            [](selection_config & c, const std::string & name) {
                if (name != "exact" && name != "cache-aware") {
                    throw std::invalid_argument("selection mode must be exact or cache-aware, got '" + name + "'");
                }
                c.mode = name == "exact" ? SELECTION_EXACT : SELECTION_CACHE_AWARE;
            })
        .def_readwrite("max_changed_weight", &selection_config::max_changed_weight)
        .def_readwrite("min_score_ratio", &selection_config::min_score_ratio)
        .def("validate", &selection_config::validate, "Raises ValueError naming the first bad field.");

    m.def("cache_aware_select",
        [](const selection_config & config, const py::array_t<float, py::array::c_style | py::array::forcecast> & gate,
           const i32_in & ids, const u8_in & available) {
            if (gate.ndim() != 2 || ids.ndim() != 2 || available.ndim() != 1 || gate.shape(0) != ids.shape(0) ||
                gate.shape(1) != available.shape(0)) {
                throw std::invalid_argument("expected gate [n_tokens, n_experts], ids [n_tokens, k], available [n_experts]");
            }
            const int n_tokens = int(ids.shape(0)), k = int(ids.shape(1)), n_experts = int(gate.shape(1));
            std::vector<int32_t> out = from_array<int32_t>(ids);
            std::vector<uint8_t> skipped(out.size(), 0);
            expert_selector selector(n_experts);
            selector.begin(available.data());
            int replaced = 0, n_skipped = 0;
            for (int i = 0; i < n_tokens; ++i) {
                const selection_change c = selector.select(config, gate.data() + size_t(i) * size_t(n_experts),
                                                           out.data() + size_t(i) * size_t(k), k,
                                                           skipped.data() + size_t(i) * size_t(k));
                replaced += c.replaced;
                n_skipped += c.skipped;
            }
            return py::make_tuple(to_array(out, {py::ssize_t(n_tokens), py::ssize_t(k)}),
                                  to_array(skipped, {py::ssize_t(n_tokens), py::ssize_t(k)}), replaced, n_skipped);
        },
        py::arg("config"), py::arg("gate"), py::arg("ids"), py::arg("available"),
        "One access's rows through the cache-aware rule: (ids [n_tokens, k], skipped uint8 [n_tokens, k], "
        "n_replaced, n_skipped); rows in order, experts kept by a row available to the rows after it.");

    py::class_<expert_cache_params>(m, "ExpertCacheParams", "Knobs of the attached cache (see csrc/llama-glue.h).")
        .def(py::init<>())
        .def_readwrite("selection", &expert_cache_params::selection)
        .def_readwrite("cache", &expert_cache_params::cache)
        .def_readwrite("n_io_threads", &expert_cache_params::n_io_threads)
        .def_readwrite("predict", &expert_cache_params::predict)
        .def_readwrite("predict_max_rows", &expert_cache_params::predict_max_rows)
        .def_readwrite("predict_layers_ahead", &expert_cache_params::predict_layers_ahead)
        .def_readwrite("predict_resident_layers", &expert_cache_params::predict_resident_layers)
        .def_readwrite("record_trace", &expert_cache_params::record_trace)
        .def_readwrite("trace_max_events", &expert_cache_params::trace_max_events)
        .def_readwrite("trace_max_ids", &expert_cache_params::trace_max_ids)
        .def("validate", &expert_cache_params::validate, "Raises ValueError naming the first bad field.");

    py::class_<expert_layout>(m, "ExpertLayout", "Where every expert's bytes are in a GGUF file.")
        .def_readonly("path", &expert_layout::path)
        .def_readonly("arch", &expert_layout::arch)
        .def_readonly("n_layers", &expert_layout::n_layers)
        .def_readonly("n_experts", &expert_layout::n_experts)
        .def_readonly("n_experts_used", &expert_layout::n_experts_used)
        .def_readonly("n_embd", &expert_layout::n_embd)
        .def_readonly("file_size", &expert_layout::file_size)
        .def_readonly("expert_bytes", &expert_layout::expert_bytes)
        .def_readonly("non_expert_bytes", &expert_layout::non_expert_bytes)
        .def_readonly("page_size", &expert_layout::page_size)
        .def_readonly("expert_tensors", &expert_layout::expert_tensors)
        .def_readonly("predictor_off", &expert_layout::predictor_off,
                      "Why the next-layer predictor is off for this file (a selection rule it does not implement), or ''.")
        .def_readonly("selection_off", &expert_layout::selection_off,
                      "Why cache-aware expert selection cannot run on this file, or ''.")
        .def_property_readonly("unit_bytes",
            [](const expert_layout & l) { return to_array(l.unit_bytes, {l.n_layers, l.n_experts}); },
            "Page-rounded footprint of every (layer, expert), shape [n_layers, n_experts].")
        .def("unit_slices",
            [](const expert_layout & l, int layer, int expert) {
                if (layer < 0 || layer >= l.n_layers || expert < 0 || expert >= l.n_experts) {
                    throw py::index_error("no unit (" + std::to_string(layer) + ", " + std::to_string(expert) + ")");
                }
                py::list out;
                for (const expert_slice & s : l.slices[size_t(layer) * size_t(l.n_experts) + size_t(expert)]) {
                    out.append(py::make_tuple(s.range.offset, s.range.size, s.head_owner, s.tail_owner));
                }
                return out;
            },
            py::arg("layer"), py::arg("expert"),
            "[(file_offset, size, head_owner, tail_owner)] of one expert; owners: unit id, -1 none, -2 non-expert data.")
        .def_property_readonly("selection_rule",
            [](const expert_layout & l) {
                static const char * names[] = {"logits", "softmax", "sigmoid", "?", "sqrt_softplus"};
                const selection_rule & r = l.selection;
                py::dict out;
                out["gating"] = r.gating >= 0 && r.gating <= 4 ? names[r.gating] : "?";
                out["router_bias"] = r.router_bias;
                out["selection_bias"] = r.selection_bias;
                out["expert_groups"] = py::make_tuple(r.n_groups, r.n_groups_used);
                return out;
            },
            "How the file's MoE blocks pick experts, as the predictor repeats it: gating ('logits', 'softmax', "
            "'sigmoid', 'sqrt_softplus'), router_bias, selection_bias, expert_groups (groups, used).")
        .def("select_experts",
            [](const expert_layout & l, int layer, const py::array_t<float, py::array::c_style | py::array::forcecast> & logits) {
                if (logits.ndim() != 2 || logits.shape(1) != l.n_experts) {
                    throw py::value_error("logits must be [n_rows, " + std::to_string(l.n_experts) + "]");
                }
                const int n_rows = int(logits.shape(0));
                py::array_t<int32_t> out(std::vector<py::ssize_t>{n_rows, l.n_experts_used});
                expert_layout_select(l, layer, logits.data(), n_rows, out.mutable_data());
                return out;
            },
            py::arg("layer"), py::arg("logits"),
            "The experts layer `layer` picks (best first) for router logits [n_rows, n_experts], by the predictor's "
            "arithmetic with the layer's biases read from the file: int32 [n_rows, expert_used_count].")
        .def("route",
            [](const expert_layout & l, int layer, const py::array_t<float, py::array::c_style | py::array::forcecast> & x) {
                if (x.ndim() != 2 || x.shape(1) != l.n_embd) {
                    throw py::value_error("router inputs must be [n_rows, " + std::to_string(l.n_embd) + "]");
                }
                const int n_rows = int(x.shape(0));
                py::array_t<int32_t> out(std::vector<py::ssize_t>{n_rows, l.n_experts_used});
                expert_layout_route(l, layer, x.data(), n_rows, out.mutable_data());
                return out;
            },
            py::arg("layer"), py::arg("x"),
            "The same from router inputs [n_rows, n_embd] through the layer's router read from the file.");

    m.def("min_budget",
          [](const expert_layout & layout) {
              return cache_min_budget(layout.unit_bytes, layout.n_layers, layout.n_experts, layout.n_experts_used);
          },
          py::arg("layout"), "The least expert-cache budget for this model: one decode step's largest top-k of a layer.");
    m.def("discover_layout", &expert_layout_discover, py::arg("path"), py::call_guard<py::gil_scoped_release>(),
          "Reads a GGUF header and returns its ExpertLayout; RuntimeError says what is wrong with the file.");

    py::class_<cache_plan>(m, "CachePlan",
        "What to do after an access or a prediction, in this order: drop `evict`, then read `load` "
        "(unit ids: layer * n_experts + expert).")
        .def_property_readonly("evict", [](const cache_plan & p) { return vector_array(p.evict); }, "Units to drop, int32 [n].")
        .def_property_readonly("load", [](const cache_plan & p) { return vector_array(p.load); }, "Units to read, int32 [n].");

    py::class_<routing_trace>(m, "RoutingTrace",
        "What every MoE layer selected, in evaluation order (see csrc/routing-trace.h); arrays are copies.")
        .def(py::init([](const u8_in & kind, const i32_in & layer, const i32_in & n_tokens, const i32_in & n_ids,
                         const i32_in & ids, uint64_t n_dropped) {
                 routing_trace trace;
                 trace.kind = from_array(kind);
                 trace.layer = from_array(layer);
                 trace.n_tokens = from_array(n_tokens);
                 trace.n_ids = from_array(n_ids);
                 trace.ids = from_array(ids);
                 trace.n_dropped = n_dropped;
                 return trace;
             }),
             py::arg("kind"), py::arg("layer"), py::arg("n_tokens"), py::arg("n_ids"), py::arg("ids"),
             py::arg("n_dropped") = 0, "A trace from its arrays (replay checks that they agree).")
        .def_property_readonly("kind", [](const routing_trace & t) { return vector_array(t.kind); },
             "Per event, its trace_event_kind (0 ACCESS, 1 PREDICT, 2 STEP), uint8 [events].")
        .def_property_readonly("layer", [](const routing_trace & t) { return vector_array(t.layer); },
             "Per event, its layer (-1 for a step), int32 [events].")
        .def_property_readonly("n_tokens", [](const routing_trace & t) { return vector_array(t.n_tokens); },
             "Per event, tokens of the ubatch (1 for a prediction), int32 [events].")
        .def_property_readonly("n_ids", [](const routing_trace & t) { return vector_array(t.n_ids); },
             "Per event, ids stored, int32 [events].")
        .def_property_readonly("ids", [](const routing_trace & t) { return vector_array(t.ids); },
             "Expert ids, events back to back, int32 [sum n_ids].")
        .def_readonly("n_dropped", &routing_trace::n_dropped, "Events lost because the reservation was full.");

    py::class_<sequence_record>(m, "SequenceRecord", "What one sequence of a batch did to the cache (ExpertCache.take_sequence).")
        .def_readonly("trace", &sequence_record::trace, "Its rows' ACCESS events, its steps and their PREDICT events.")
        .def_property_readonly("counters", [](const sequence_record & r) { return counters_dict(r.counters); },
             "Its counters by name (telemetry.h): hits and misses of its own selections, bytes as its shares of the "
             "steps it was in.");

    py::class_<cache_policy>(m, "CachePolicy", "The policy core alone, for trace replay and simulation.")
        .def(py::init([](int n_layers, int n_experts,
                         py::array_t<uint64_t, py::array::c_style | py::array::forcecast> unit_bytes,
                         const cache_config & config, int min_units_resident) {
                 return new cache_policy(n_layers, n_experts, from_array(unit_bytes), config, min_units_resident);
             }),
             py::arg("n_layers"), py::arg("n_experts"), py::arg("unit_bytes"), py::arg("config"),
             py::arg("min_units_resident"))
        .def("access",
            [](cache_policy & p, int layer, py::array_t<int32_t, py::array::c_style | py::array::forcecast> ids) {
                if (ids.ndim() != 2) { throw py::value_error("ids must be 2-D [n_tokens, k]"); }
                cache_plan plan;
                p.access(layer, ids.data(), int(ids.shape(0)), int(ids.shape(1)), plan);
                return plan;
            },
            py::arg("layer"), py::arg("ids"), "One layer's top-k ids [n_tokens, k]; returns the CachePlan.")
        .def("predict",
            [](cache_policy & p, int layer, py::array_t<int32_t, py::array::c_style | py::array::forcecast> experts,
               int distance) {
                cache_plan plan;
                p.predict(layer, experts.data(), int(experts.size()), plan, distance);
                return plan;
            },
            py::arg("layer"), py::arg("experts"), py::arg("distance") = 1,
            "Predicted experts of layer's next access, made `distance` layers before it; returns the prefetch plan.")
        .def("settle", [](cache_policy & p) { cache_plan plan; p.settle(plan); return plan; },
             "Ends the access in progress and trims to the budget; returns the CachePlan.")
        .def("is_resident", &cache_policy::is_resident, py::arg("unit"))
        .def_property_readonly("resident_bytes", &cache_policy::resident_bytes)
        .def("counters", [](const cache_policy & p) { return counters_dict(p.counters()); })
        .def("reset_counters", &cache_policy::reset_counters)
        .def("warmth", &warmth_arrays, "(resident uint8 [L, E], heat float32 [L, E]).")
        .def("expert_counts", &counts_array, "Selections per (layer, expert), uint64 [L, E].");

    m.def("replay",
          [](cache_policy & policy, const routing_trace & trace) {
              py::gil_scoped_release release;
              routing_trace_replay(trace, policy);
          },
          py::arg("policy"), py::arg("trace"),
          "Feeds a RoutingTrace through a CachePolicy, then settles it; ValueError if its arrays disagree.");

    py::class_<expert_cache>(m, "ExpertCache", "The cache attached to a llama.cpp context through cb_eval.")
        .def(py::init<expert_layout, const expert_cache_params &>(), py::arg("layout"), py::arg("params"))
        .def("before_load", &expert_cache::before_load, py::arg("preload"), py::call_guard<py::gil_scoped_release>(),
             "Just before llama.cpp loads the model: notes other mappings of the file; preload (a budget below the "
             "experts): a lean load (llama.cpp maps the file without reading it) and the non-expert pages read now.")
        .def_property_readonly("preloaded_bytes", &expert_cache::preloaded_bytes,
             "Bytes before_load read: the non-expert pages (0 without preload).")
        .def_property_readonly_static("lean_load_unavailable", [](py::object) { return lean_load::unavailable_reason(); },
             "'' when a load can go without llama.cpp reading the whole file (lean-load.h), else why not.")
        .def("attach", &expert_cache::attach, py::call_guard<py::gil_scoped_release>(),
             "Finds llama.cpp's mapping of the model and establishes the budget; call after the model loaded.")
        .def_property_readonly("attached", &expert_cache::attached)
        .def_property_readonly("predictor_off", &expert_cache::predictor_off,
             "Why the next-layer predictor is off for this model (ExpertLayout.predictor_off), or ''.")
        .def_property_readonly("callback_address",
            [](const expert_cache &) { return reinterpret_cast<uintptr_t>(&expert_cache::eval_callback); },
            "Address of the ggml_backend_sched_eval_callback to put in llama_context_params.cb_eval.")
        .def_property_readonly("user_data_address",
            [](expert_cache & c) { return reinterpret_cast<uintptr_t>(&c); },
            "Value for llama_context_params.cb_eval_user_data (this cache; must outlive the context).")
        .def("settle", &expert_cache::settle, py::call_guard<py::gil_scoped_release>(),
             "Waits for reads in flight and trims to the budget.")
        .def("counters",
             [](const expert_cache & c) {
                 py::dict out = counters_dict(c.policy().counters());
                 const residency_counters io = c.io_counters();
                 for (const auto & field : residency_counters_fields()) { out[py::str(field.first)] = io.*(field.second); }
                 return out;
             },
             "Policy counters and residency counters (folio splits, units the kernel reclaimed), one dict.")
        .def("set_budget", &expert_cache::set_budget, py::arg("budget_bytes"), py::call_guard<py::gil_scoped_release>(),
             "Changes the budget (drops units at once if it shrank); ValueError if it cannot hold one decode step.")
        .def("reset_counters", [](expert_cache & c) { c.policy().reset_counters(); })
        .def("warmth", [](const expert_cache & c) { return warmth_arrays(c.policy()); })
        .def("expert_counts", [](const expert_cache & c) { return counts_array(c.policy()); })
        .def_property_readonly("resident_bytes", [](const expert_cache & c) { return c.policy().resident_bytes(); },
             "Footprint the policy holds resident.")
        .def_property_readonly("budget_bytes", [](const expert_cache & c) { return c.policy().config().budget_bytes; })
        .def("measured_resident_bytes", &expert_cache::measured_resident_bytes, py::call_guard<py::gil_scoped_release>(),
             "Expert bytes actually in memory (mincore).")
        .def("reconcile", &expert_cache::reconcile, py::call_guard<py::gil_scoped_release>(),
             "Forgets units of which the kernel reclaimed more than a page (and drops the rest of them); returns how many.")
        .def("begin_step",
             [](expert_cache & c, const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & tags,
                const py::array_t<uint8_t, py::array::c_style | py::array::forcecast> & outputs) {
                 if (tags.ndim() != 1 || outputs.ndim() != 1 || tags.size() != outputs.size()) {
                     throw std::invalid_argument("begin_step: tags and outputs must be 1-D arrays of one length");
                 }
                 c.begin_step(tags.data(), outputs.data(), int(tags.size()));
             },
             py::arg("tags"), py::arg("outputs"),
             "Before a batch's llama_decode: each row's sequence tag (int32, a tag's rows contiguous) and "
             "whether llama.cpp computes its logits (uint8); the step's accesses are then recorded per sequence.")
        .def("take_sequence", &expert_cache::take_sequence, py::arg("tag"),
             "Moves a sequence's SequenceRecord out (an empty one if the tag was never in a step).")
        .def("sequence_trace", &expert_cache::sequence_trace, py::arg("tag"),
             "A copy of a sequence's RoutingTrace so far (its record stays).")
        .def("take_trace", &expert_cache::take_trace, "Moves the RoutingTrace recorded so far out.");
}
