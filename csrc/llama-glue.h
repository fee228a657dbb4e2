// llama-glue.h — the expert cache attached to llama.cpp (the only file that sees ggml/llama).
//
// Three jobs:
//   1. Discovery (expert_layout_discover): reads the GGUF header with ggml's own gguf reader
//      and finds every expert's byte ranges: each tensor `blk.<il>.*_exps.*` whose outermost
//      dimension is the expert count (separate ffn_gate/up/down_exps, merged ffn_gate_up_exps,
//      their biases and scales alike) is cut into n_expert equal, contiguous slices
//      (DESIGN.md: expert e is data + e*nb[2] .. + nb[2]). Boundary pages shared with a
//      neighbour are recorded so that dropping one expert never drops its neighbour's bytes.
//   2. The eval callback (expert_cache::eval_callback), installed as
//      llama_context_params.cb_eval. It answers "yes" only to `ffn_moe_topk-<il>` nodes,
//      after a cheap name check, and reads the ids only in the ask=false call (after the
//      node was computed), through the view's nb[] strides. Then: the policy decides hits,
//      misses and victims; victims are dropped; misses are read with large parallel reads
//      before the layer's expert matmuls run.
//   3. Prediction and prefetch: the router input of layer il (the `ffn_moe_logits-<il>`
//      mat-mul's src[1], still alive because the expert mat-muls consume it next) is
//      multiplied by the routers (`ffn_gate_inp`) of layers il+1 .. il+predict_layers_ahead;
//      each top-k is the prediction for that layer, and the predicted missing experts are read
//      on the I/O pool while layer il computes. A layer's latest prediction is the one scored
//      (precision / recall) against its access.
// What it drives lives in the core below: the policy (cache-core.h), the units' residency in the
// page cache — reads, drops, folio repair, reconcile — (residency.h, unit_residency) and the
// per-sequence accounting of batched steps (sequence-steps.h).
// Hot path rules: no allocation once scratch buffers have grown, no Python, no logging, no
// exceptions; the only lock is the I/O pool's queue, taken only when there is I/O to do.
#pragma once

#include "cache-core.h"
#include "io-pool.h"
#include "residency.h"
#include "routing-trace.h"
#include "sequence-steps.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct ggml_tensor;

// A layer's router matrix (ffn_gate_inp), used to predict that layer's experts.
struct router_tensor {
    uint64_t offset = 0;  // file offset of the data; 0 = the layer has no router
    int32_t  type   = 0;  // ggml_type
    int64_t  n_embd = 0;  // ne[0]
    int64_t  n_rows = 0;  // ne[1] = n_expert
};

// A model's experts in its file: the page geometry the residency layer needs (expert_file_map:
// path, page_size, slices, unit_bytes, extents) and the hyper-parameters and routers of the rest.
struct expert_layout : expert_file_map {
    std::string arch;
    int n_layers       = 0;   // {arch}.block_count
    int n_experts      = 0;   // {arch}.expert_count
    int n_experts_used = 0;   // {arch}.expert_used_count (top-k)
    int64_t n_embd     = 0;   // {arch}.embedding_length
    uint64_t file_size        = 0;
    uint64_t expert_bytes     = 0;  // bytes of all expert slices
    uint64_t non_expert_bytes = 0;  // bytes of the file's pages that hold no expert slice
    std::vector<std::string> expert_tensors;         // names of the tensors cut per expert
    std::vector<router_tensor> routers;              // [layer]
    // Why the predictor is off for this file, or "" (on). The predictor ranks the next layers'
    // experts by their router logits (the top-k of softmax, of sigmoid, or of the logits alike);
    // a file whose top-k also adds a selection bias (blk.*.exp_probs_b), a router bias
    // (blk.*.ffn_gate_inp.bias) or picks expert groups first would be predicted wrongly.
    std::string predictor_off;
};

// Reads the GGUF header of `path` and returns its expert layout. Throws std::runtime_error
// with a specific message for: a missing file, a file llama.cpp's gguf reader rejects, a
// truncated file (a tensor ending past the end), a dense model (no expert_count / no expert
// tensors), inconsistent expert tensors.
expert_layout expert_layout_discover(const std::string & path);

struct expert_cache_params {
    cache_config cache;
    int    n_io_threads     = 2;        // I/O pool threads, [0, 64]; 0 disables prefetch
    bool   predict          = true;     // score (and, with cache.prefetch, act on) predictions
    int    predict_max_rows = 32;       // rows of a prefill ubatch the predictor samples, [1, 4096]
    int    predict_layers_ahead = 3;    // layers predicted (and read ahead) from each top-k, [1, 8]
    bool   predict_resident_layers = false;  // also predict layers whose experts are all resident
                                             // (nothing to read: only scores and PREDICT trace events,
                                             // for traces recorded to be replayed at smaller budgets)
    bool   record_trace     = true;     // keep a routing trace (see take_trace)
    size_t trace_max_events = 1 << 20;  // reservation of the trace (events)
    size_t trace_max_ids    = 1 << 24;  // reservation of the trace (ids)

    // Throws std::invalid_argument naming the first bad field.
    void validate() const;
};

class expert_cache {
public:
    // Builds the policy for `layout`; nothing is touched until attach(). Throws
    // std::invalid_argument for bad params or a budget below one decode step's experts.
    expert_cache(expert_layout layout, const expert_cache_params & params);
    ~expert_cache();
    expert_cache(const expert_cache &) = delete;
    expert_cache & operator=(const expert_cache &) = delete;

    // Call just before llama.cpp loads the model: remembers the mappings of the file this process
    // already has (another engine's), so that attach() manages only the one this load makes. With
    // `preload` (experts will be dropped: a budget below the model's experts), also puts the whole
    // file in the page cache as small folios (see residency_preload), which llama.cpp's load then
    // finds there instead of reading it in large folios; every later drop is then exact. Without
    // it, attach() and drops split large folios where they must (a block dropped whole and the
    // pages still needed read back).
    void before_load(bool preload);

    // Call once llama.cpp has mapped the model: finds the mapping, keeps the experts already
    // resident up to the budget (spread over layers) and drops the rest from the page cache —
    // splitting the large folios llama.cpp's load read them into where a drop needs it, so the
    // page cache really holds budget + non-expert pages afterwards —, prepares the routers for
    // prediction and starts the I/O threads.
    void attach();
    bool attached() const { return residency_ != nullptr; }
    const std::string & predictor_off() const { return layout_.predictor_off; }  // "" when predicting

    // ggml_backend_sched_eval_callback; user_data is the expert_cache. Must outlive the context.
    static bool eval_callback(ggml_tensor * t, bool ask, void * user_data);

    // Before each llama_decode of a batch: which sequence each of its n_rows tokens belongs to (a
    // tag >= 0 chosen by the caller, one tag's rows contiguous) and which rows have logits (the
    // last layer sees only those). A tag with one row decodes; more rows are prompt tokens. Every
    // access of the step is then also recorded per sequence (sequence-steps.h).
    // Throws std::invalid_argument if a tag is negative or its rows are not contiguous.
    void begin_step(const int32_t * row_tags, const uint8_t * row_outputs, int n_rows);
    // Moves a sequence's record out (an empty one if the tag was never in a step).
    sequence_record take_sequence(int32_t tag);
    // A copy of a sequence's routing trace so far (empty if the tag was never in a step).
    routing_trace sequence_trace(int32_t tag) const;

    // Waits for reads in flight, ends the access in progress, trims to the budget and
    // reconciles the policy with the kernel (see reconcile).
    void settle();

    // Changes the budget (e.g. one derived from the memory the node has, before attach); drops
    // units at once if it shrank. Throws std::invalid_argument as the constructor does.
    void set_budget(uint64_t budget_bytes);

    const cache_policy & policy() const { return policy_; }
    cache_policy & policy() { return policy_; }
    // Moves the routing trace recorded so far out (the cache keeps recording into a new one).
    routing_trace take_trace();
    // Bytes of pages holding only expert data resident in memory now (mincore, each page once).
    uint64_t measured_resident_bytes() const;
    // Units the policy believes resident of which the kernel took more than one page (memory
    // pressure, another process): the policy forgets them and what is left of their pages is
    // dropped, so that the policy's view (cache stats, warmth report) agrees with mincore within
    // one page per unit. Runs between steps only (no access in progress). Returns how many.
    int reconcile();
    // The residency layer's counters and the eval callback's timings (zeros before attach).
    residency_counters io_counters() const;

private:
    void on_topk(const ggml_tensor * t, int layer);
    void predict_layer(const ggml_tensor * router_input, int layer, int target_layer);
    // Unpins the units read ahead whose reads ended.
    void reap_reads();

    expert_layout layout_;
    expert_cache_params params_;
    cache_policy policy_;
    routing_trace trace_;
    sequence_steps steps_;
    std::vector<mapping_segment> mappings_before_load_;  // other engines' mappings of the file
    std::unique_ptr<unit_residency> residency_;       // attach() on; nullptr before
    std::vector<const float *> router_rows_;          // [layer] [n_experts x n_embd] or nullptr
    std::vector<std::vector<float>> router_owned_;    // dequantised routers (non-F32 files)
    residency_counters callback_timing_;              // its ns_* only; the compute thread's

    // scratch, grown outside the steady state only
    cache_plan plan_;
    std::vector<int32_t> ids_;          // [n_tokens x k] of the current top-k node
    std::vector<int32_t> in_flight_;    // units read ahead, pinned until their read ends
    std::vector<int32_t> order_;        // [n_experts]
    std::vector<uint8_t> predicted_mask_;
    std::vector<int32_t> predicted_;
    std::vector<const float *> predict_rows_;  // sampled rows of the router input
    std::vector<float> predict_logits_;        // [rows x n_experts]
};
