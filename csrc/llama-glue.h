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
#include "expert-selection.h"
#include "io-pool.h"
#include "lean-load.h"
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

// A 1-D per-layer vector of the file (a bias over the experts); offset 0 = the layer has none.
struct vector_tensor {
    uint64_t offset = 0;
    int32_t  type   = 0;  // ggml_type
    int64_t  n      = 0;  // ne[0]
};

// How the file's MoE blocks pick their experts from the router logits (llama-graph.cpp build_moe_ffn in the
// pinned llama.cpp), as the predictor repeats it on the CPU for one token's logits l[n_experts]:
//   s = l + router_bias (blk.*.ffn_gate_inp.bias, gpt-oss); p = gating(s); q = p + selection_bias
//   (blk.*.exp_probs_b.bias: chooses only); with expert groups, a group's score is the sum of its two best
//   q, the best n_groups_used groups are kept and the others masked out; the experts are the top-k of q.
// Without a selection bias or groups the gating (monotonic) does not change the top-k and is skipped.
enum selection_gating : int32_t {
    GATING_LOGITS        = 0,  // the (biased) logits themselves: SOFTMAX_WEIGHT (gpt-oss) and Llama 4
    GATING_SOFTMAX       = 1,
    GATING_SIGMOID       = 2,
    GATING_SQRT_SOFTPLUS = 4,  // sqrt(softplus(s))
};

struct selection_rule {
    int32_t gating      = GATING_LOGITS;
    int n_groups        = 1;  // {arch}.expert_group_count (1: no groups)
    int n_groups_used   = 1;  // {arch}.expert_group_used_count
    bool router_bias    = false;  // some layer has blk.*.ffn_gate_inp.bias
    bool selection_bias = false;  // some layer has blk.*.exp_probs_b.bias
    // Whether the gating must be computed (it changes the top-k: a selection bias is added after it, or
    // group scores sum it).
    bool scores_needed() const { return selection_bias || n_groups > 1; }
};

// The top-k of one token's router logits [n_experts] under `rule` (best first) into out[k]. router_bias and
// selection_bias may be nullptr (the layer has none); scores [n_experts] and order [n_experts] are scratch.
void select_experts(const selection_rule & rule, const float * logits, const float * router_bias,
                    const float * selection_bias, int n_experts, int k, float * scores, int32_t * order, int32_t * out);

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
    std::vector<vector_tensor> router_biases;        // [layer] blk.*.ffn_gate_inp.bias
    std::vector<vector_tensor> selection_biases;     // [layer] blk.*.exp_probs_b.bias
    selection_rule selection;                        // the file's rule (see selection_rule)
    // Why the predictor is off for this file, or "" (on). The predictor repeats the file's selection
    // rule (selection_rule: router bias, gating, selection bias, expert groups); it is off where that
    // rule is not known: a selection bias or groups with no {arch}.expert_gating_func and no default of
    // the architecture known, GroveMoE's groups of experts, a bias of a type ggml cannot convert.
    std::string predictor_off;
    // Why cache-aware selection (expert-selection.h) cannot run on this file, or "" (it can): the top-k must be taken
    // on the scores the weights are gathered from (build_moe_ffn's ffn_moe_probs, biased or masked or not).
    std::string selection_off;
};

// One layer's router as floats: the matrix [n_experts x n_embd] and its biases (empty: none).
struct layer_router {
    const float * rows = nullptr;            // into the mapping (F32) or `owned`
    std::vector<float> owned;                // dequantised matrix (non-F32 files)
    std::vector<float> router_bias;          // [n_experts] or empty
    std::vector<float> selection_bias;       // [n_experts] or empty
};

// The experts layer `layer` picks for router inputs x [n_rows x n_embd] (row-major), by the predictor's
// arithmetic on the router and biases read from the file (not the mapping): out [n_rows x k]. For tests that
// compare it with llama.cpp's own top-k. Throws std::runtime_error if the layer has no usable router.
void expert_layout_route(const expert_layout & layout, int layer, const float * x, int n_rows, int32_t * out);
// The same from router logits [n_rows x n_experts] (llama.cpp's ffn_moe_logits) instead of inputs.
void expert_layout_select(const expert_layout & layout, int layer, const float * logits, int n_rows, int32_t * out);

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
    selection_config selection;         // exact (default) or cache-aware selection of each token's experts

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
    // `preload` (experts will be dropped: a budget below the model's experts), the load is lean
    // (lean-load.h: llama.cpp maps the file without reading it) and only the non-expert pages are
    // read now, as small folios (residency_preload); experts are read when the cache keeps them.
    // Without it llama.cpp reads the whole file, and attach() and drops split the large folios
    // that read leaves where they must (a block dropped whole and the pages still needed read back).
    void before_load(bool preload);
    // Bytes before_load read (the non-expert pages; 0 without preload).
    uint64_t preloaded_bytes() const { return preloaded_bytes_; }

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
    void on_topk(ggml_tensor * t, int layer);
    // Cache-aware selection (params_.selection): changes ids_ (the top-k node's ids, just read) and writes the changed
    // rows back into the node (zeroing the scores of skipped slots) before the layer's weights are gathered and its
    // experts computed.
    void select_cache_aware(ggml_tensor * t, int layer);
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
    std::unique_ptr<lean_load> lean_load_;            // from before_load(preload) to attach()
    uint64_t preloaded_bytes_ = 0;
    std::vector<layer_router> routers_;               // [layer]; rows nullptr: not predicted
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
    std::vector<float> predict_scores_;        // [n_experts]
    std::vector<int32_t> predict_topk_;        // [k]
    expert_selector selector_;                 // cache-aware selection
    std::vector<uint8_t> available_;           // [n_experts] resident units of the layer
    std::vector<float> gate_;                  // [n_experts] one row's gate values (logit families)
    std::vector<uint8_t> row_skipped_;         // [k]
    std::vector<selection_change> row_changes_;  // [n_tokens]
};
