// llama-glue.cpp — discovery, eval callback and prediction of the expert cache (see llama-glue.h).
#include "llama-glue.h"

#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace {

constexpr char TOPK_PREFIX[]   = "ffn_moe_topk-";    // llama-graph.cpp build_moe_ffn: cb(.., "ffn_moe_topk", il)
constexpr char LOGITS_PREFIX[] = "ffn_moe_logits-";  // cb(logits, "ffn_moe_logits", il): gate_inp x cur

bool has_prefix(const char * name, const char * prefix, size_t n) { return std::strncmp(name, prefix, n) == 0; }

// "<prefix><int>" → int, or -1.
int parse_layer(const char * name, size_t prefix_len) {
    const char * p = name + prefix_len;
    if (*p < '0' || *p > '9') { return -1; }
    int value = 0;
    for (; *p >= '0' && *p <= '9'; ++p) { value = value * 10 + (*p - '0'); }
    return *p == '\0' ? value : -1;
}

// "blk.<il>.<rest>" → il and rest, or -1.
int parse_block(const std::string & name, std::string & rest) {
    if (name.compare(0, 4, "blk.") != 0) { return -1; }
    const size_t dot = name.find('.', 4);
    if (dot == std::string::npos || dot == 4) { return -1; }
    int il = 0;
    for (size_t i = 4; i < dot; ++i) {
        if (name[i] < '0' || name[i] > '9') { return -1; }
        il = il * 10 + (name[i] - '0');
    }
    rest = name.substr(dot + 1);
    return il;
}

struct gguf_handle {
    gguf_context * ctx = nullptr;
    ~gguf_handle() { if (ctx) { gguf_free(ctx); } }
};

int64_t get_int_key(const gguf_context * ctx, const std::string & key, int64_t fallback) {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    if (id < 0) { return fallback; }
    switch (gguf_get_kv_type(ctx, id)) {
        case GGUF_TYPE_UINT8:  return gguf_get_val_u8(ctx, id);
        case GGUF_TYPE_INT8:   return gguf_get_val_i8(ctx, id);
        case GGUF_TYPE_UINT16: return gguf_get_val_u16(ctx, id);
        case GGUF_TYPE_INT16:  return gguf_get_val_i16(ctx, id);
        case GGUF_TYPE_UINT32: return gguf_get_val_u32(ctx, id);
        case GGUF_TYPE_INT32:  return gguf_get_val_i32(ctx, id);
        case GGUF_TYPE_UINT64: return int64_t(gguf_get_val_u64(ctx, id));
        case GGUF_TYPE_INT64:  return gguf_get_val_i64(ctx, id);
        default:               return fallback;
    }
}

bool is_host(const ggml_tensor * t) {
    return t->data != nullptr && (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer));
}

// The first of `start` and its ancestors, breadth first, that `accept` takes, or nullptr. The MoE block's nodes
// above its top-k are some 20 (with expert groups: reshapes, get_rows, set_rows and fill, a few reached twice).
template <typename Accept>
const ggml_tensor * find_ancestor(const ggml_tensor * start, Accept && accept) {
    constexpr int MAX_NODES = 64;
    const ggml_tensor * queue[MAX_NODES];
    int head = 0, tail = 0;
    queue[tail++] = start;
    while (head < tail) {
        const ggml_tensor * t = queue[head++];
        if (accept(t)) { return t; }
        for (int i = 0; i < GGML_MAX_SRC && t->src[i] != nullptr && tail < MAX_NODES; ++i) {
            if (std::find(queue, queue + tail, t->src[i]) == queue + tail) { queue[tail++] = t->src[i]; }
        }
    }
    return nullptr;
}

// The router input of the MoE block whose top-k node is `topk`: src[1] of the `ffn_moe_logits-<il>` mat-mul among
// its ancestors (topk → argsort → probs → logits).
const ggml_tensor * find_router_input(const ggml_tensor * topk) {
    const ggml_tensor * logits = find_ancestor(topk, [](const ggml_tensor * t) {
        return t->op == GGML_OP_MUL_MAT && has_prefix(t->name, LOGITS_PREFIX, sizeof(LOGITS_PREFIX) - 1);
    });
    return logits != nullptr ? logits->src[1] : nullptr;
}

constexpr char PROBS_PREFIX[] = "ffn_moe_probs-";  // cb(probs, "ffn_moe_probs", il): what the weights are taken from

// The scores the layer's weights are gathered from (`ffn_moe_probs-<il>`, an ancestor of the top-k node where the
// top-k is taken on them, possibly biased or group-masked), or nullptr.
ggml_tensor * find_probs(const ggml_tensor * topk) {
    return const_cast<ggml_tensor *>(find_ancestor(topk, [](const ggml_tensor * t) {
        return has_prefix(t->name, PROBS_PREFIX, sizeof(PROBS_PREFIX) - 1);
    }));
}

uint64_t now_ns() {
    return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count());
}

// Dot product with 8 independent partial sums, so the compiler can vectorise it without
// -ffast-math (this runs n_experts times per layer per token in the eval callback).
float dot_f32(const float * a, const float * b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; ++j) { acc[j] += a[i + j] * b[i + j]; }
    }
    float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; ++i) { sum += a[i] * b[i]; }
    return sum;
}

// What makes llama.cpp abort or allocate absurdly at load, refused with the key and its value
// (issue 11): counts beyond llama.cpp's own limits, and floating-point hyper-parameters that are
// not finite (a NaN rms epsilon aborts inside ggml) or, for epsilons, not positive.
constexpr int64_t MAX_LAYERS  = 512;   // LLAMA_MAX_LAYERS, src/llama-hparams.h
constexpr int64_t MAX_EXPERTS = 1024;  // LLAMA_MAX_EXPERTS, src/llama-hparams.h
constexpr int64_t MAX_WIDTH   = 1 << 20;

void check_hparams(const gguf_context * ctx, const std::string & path) {
    const std::string arch = gguf_get_val_str(ctx, gguf_find_key(ctx, "general.architecture"));
    const struct { const char * key; int64_t lo, hi; } counts[] = {
        {".block_count", 1, MAX_LAYERS},          {".expert_count", 0, MAX_EXPERTS},
        {".expert_used_count", 0, MAX_EXPERTS},   {".embedding_length", 1, MAX_WIDTH},
        {".feed_forward_length", 0, 16 * MAX_WIDTH}, {".expert_feed_forward_length", 0, 16 * MAX_WIDTH},
        {".attention.head_count", 1, 1 << 16},    {".attention.head_count_kv", 0, 1 << 16},
        {".context_length", 1, int64_t(1) << 32},
    };
    for (const auto & c : counts) {
        const std::string key = arch + c.key;
        if (gguf_find_key(ctx, key.c_str()) < 0) { continue; }
        const int64_t value = get_int_key(ctx, key, INT64_MIN);
        if (value != INT64_MIN && (value < c.lo || value > c.hi)) {
            throw std::runtime_error("GGUF file '" + path + "' has " + key + "=" + std::to_string(value) +
                                     ", outside [" + std::to_string(c.lo) + ", " + std::to_string(c.hi) +
                                     "] (llama.cpp would refuse or allocate absurdly)");
        }
    }
    const int64_t n_kv = gguf_get_n_kv(ctx);
    for (int64_t i = 0; i < n_kv; ++i) {
        const gguf_type type = gguf_get_kv_type(ctx, i);
        if (type != GGUF_TYPE_FLOAT32 && type != GGUF_TYPE_FLOAT64) { continue; }
        const std::string key = gguf_get_key(ctx, i);
        const double value = type == GGUF_TYPE_FLOAT32 ? double(gguf_get_val_f32(ctx, i)) : gguf_get_val_f64(ctx, i);
        const bool epsilon = key.size() >= 7 && key.compare(key.size() - 7, 7, "epsilon") == 0;
        if (!std::isfinite(value) || (epsilon && value <= 0.0)) {
            throw std::runtime_error("GGUF file '" + path + "' has " + key + "=" + std::to_string(value) +
                                     (epsilon ? ", expected a finite number > 0" : ", expected a finite number") +
                                     " (llama.cpp would abort)");
        }
    }
}

// The gating build_moe_ffn applies for `arch` in the pinned llama.cpp (src/models/<arch>.cpp): a few
// architectures fix it in their graph; the others read {arch}.expert_gating_func and, where it is absent,
// default it in their load_arch_hparams. False if neither is known.
bool find_gating(const gguf_context * ctx, const std::string & arch, int n_layers, int32_t & gating) {
    static const std::pair<const char *, int32_t> fixed[] = {
        {"gpt-oss", GATING_LOGITS},  // SOFTMAX_WEIGHT: top-k of the biased logits, softmax over the k
        {"llama4", GATING_LOGITS},   // selection_probs = logits
        {"ernie4_5-moe", GATING_SOFTMAX}, {"minimax-01", GATING_SOFTMAX},
        {"nemotron_h", GATING_SIGMOID}, {"nemotron_h_moe", GATING_SIGMOID}, {"mimo2", GATING_SIGMOID},
    };
    for (const auto & f : fixed) {
        if (arch == f.first) { gating = f.second; return true; }
    }
    const int64_t value = get_int_key(ctx, arch + ".expert_gating_func", 0);
    switch (value) {
        case 1: gating = GATING_SOFTMAX; return true;
        case 2: gating = GATING_SIGMOID; return true;
        case 3: gating = GATING_LOGITS; return true;  // SOFTMAX_WEIGHT
        case 4: gating = GATING_SQRT_SOFTPLUS; return true;
        case 0: break;  // absent (NONE): the architecture's default
        default: return false;
    }
    static const char * sigmoid_default[] = {"glm4moe", "glm-dsa", "glm5-next", "step35", "afmoe", "laguna",
                                             "hy_v3", "cohere2moe"};
    for (const char * a : sigmoid_default) {
        if (arch == a) { gating = GATING_SIGMOID; return true; }
    }
    if (arch == "deepseek2") {  // DeepSeek V2 / V2.5 files have no key: softmax; GLM 4.7 Lite: sigmoid
        int64_t n_vocab = get_int_key(ctx, arch + ".vocab_size", 0);
        const int64_t tokens = gguf_find_key(ctx, "tokenizer.ggml.tokens");
        if (n_vocab == 0 && tokens >= 0 && gguf_get_kv_type(ctx, tokens) == GGUF_TYPE_ARRAY) {
            n_vocab = int64_t(gguf_get_arr_n(ctx, tokens));
        }
        gating = (n_layers == 47 || n_layers == 48) && n_vocab == 154880 ? GATING_SIGMOID : GATING_SOFTMAX;
        return true;
    }
    if (arch == "deepseek2-ocr") { gating = GATING_SOFTMAX; return true; }
    return false;
}

// Layer `il`'s router as floats; bytes_at(offset, size) gives a tensor's bytes (the mapping, or a read of
// the file) or nullptr. False if the layer has no router or a tensor cannot be converted.
template <typename BytesAt>
bool load_layer_router(const expert_layout & layout, int il, BytesAt && bytes_at, layer_router & out) {
    out = layer_router{};
    const router_tensor & r = layout.routers[size_t(il)];
    if (r.offset == 0 || r.n_embd != layout.n_embd || r.n_rows != layout.n_experts) { return false; }
    const size_t bytes = ggml_row_size(ggml_type(r.type), r.n_embd) * size_t(r.n_rows);
    const void * data = bytes_at(r.offset, bytes);
    if (data == nullptr) { return false; }
    if (r.type == GGML_TYPE_F32) {
        out.rows = static_cast<const float *>(data);
    } else {
        const ggml_type_traits * traits = ggml_get_type_traits(ggml_type(r.type));
        if (traits == nullptr || traits->to_float == nullptr) { return false; }
        out.owned.resize(size_t(r.n_embd * r.n_rows));
        traits->to_float(data, out.owned.data(), r.n_embd * r.n_rows);
        out.rows = out.owned.data();
    }
    const std::pair<const vector_tensor *, std::vector<float> *> biases[] = {
        {&layout.router_biases[size_t(il)], &out.router_bias},
        {&layout.selection_biases[size_t(il)], &out.selection_bias},
    };
    for (const auto & b : biases) {
        const vector_tensor & v = *b.first;
        if (v.offset == 0) { continue; }
        const void * bias = v.n == layout.n_experts ? bytes_at(v.offset, ggml_row_size(ggml_type(v.type), v.n)) : nullptr;
        const ggml_type_traits * traits = ggml_get_type_traits(ggml_type(v.type));
        if (bias == nullptr || traits == nullptr || (v.type != GGML_TYPE_F32 && traits->to_float == nullptr)) {
            out.rows = nullptr;  // a layer predicted without its bias would be predicted wrongly
            return false;
        }
        b.second->resize(size_t(v.n));
        if (v.type == GGML_TYPE_F32) {
            std::memcpy(b.second->data(), bias, size_t(v.n) * sizeof(float));
        } else {
            traits->to_float(bias, b.second->data(), v.n);
        }
    }
    return true;
}

// A layer's router read from the file with pread (no mapping needed): for expert_layout_route/select.
bool read_layer_router(const expert_layout & layout, int layer, layer_router & out) {
    if (layer < 0 || layer >= layout.n_layers) { return false; }
    const int fd = ::open(layout.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) { return false; }
    std::vector<std::vector<char>> buffers;
    auto bytes_at = [&](uint64_t offset, size_t size) -> const void * {
        buffers.emplace_back(size);
        size_t done = 0;
        while (done < size) {
            const ssize_t n = ::pread(fd, buffers.back().data() + done, size - done, off_t(offset + done));
            if (n <= 0) { return nullptr; }
            done += size_t(n);
        }
        return buffers.back().data();
    };
    const bool ok = load_layer_router(layout, layer, bytes_at, out);
    ::close(fd);
    if (ok && out.owned.empty()) {  // F32 rows point into a read buffer: keep a copy
        out.owned.assign(out.rows, out.rows + size_t(layout.n_embd) * size_t(layout.n_experts));
        out.rows = out.owned.data();
    }
    return ok;
}

} // namespace

void select_experts(const selection_rule & rule, const float * logits, const float * router_bias,
                    const float * selection_bias, int n_experts, int k, float * scores, int32_t * order, int32_t * out) {
    for (int e = 0; e < n_experts; ++e) { scores[e] = router_bias ? logits[e] + router_bias[e] : logits[e]; }
    if (rule.scores_needed()) {
        switch (rule.gating) {
            case GATING_SOFTMAX: {
                float max = scores[0];
                for (int e = 1; e < n_experts; ++e) { max = std::max(max, scores[e]); }
                float sum = 0.0f;
                for (int e = 0; e < n_experts; ++e) { scores[e] = std::exp(scores[e] - max); sum += scores[e]; }
                for (int e = 0; e < n_experts; ++e) { scores[e] /= sum; }
            } break;
            case GATING_SIGMOID:
                for (int e = 0; e < n_experts; ++e) { scores[e] = 1.0f / (1.0f + std::exp(-scores[e])); }
                break;
            case GATING_SQRT_SOFTPLUS:
                for (int e = 0; e < n_experts; ++e) {
                    const float s = scores[e];
                    scores[e] = std::sqrt(s > 20.0f ? s : std::log1p(std::exp(s)));
                }
                break;
            default: break;  // GATING_LOGITS
        }
        if (selection_bias) {
            for (int e = 0; e < n_experts; ++e) { scores[e] += selection_bias[e]; }
        }
    }
    if (rule.n_groups > 1) {
        // a group's score: the sum of its two best; the best n_groups_used groups stay, the others are masked
        const int per_group = n_experts / rule.n_groups;
        float group_score[256];
        int32_t groups[256];
        const int n_groups = std::min(rule.n_groups, 256);
        for (int g = 0; g < n_groups; ++g) {
            const float * q = scores + size_t(g) * size_t(per_group);
            float best = -INFINITY, second = -INFINITY;
            for (int i = 0; i < per_group; ++i) {
                if (q[i] > best) { second = best; best = q[i]; } else if (q[i] > second) { second = q[i]; }
            }
            group_score[g] = per_group >= 2 ? best + second : best;
            groups[g] = g;
        }
        const int used = std::min(rule.n_groups_used, n_groups);
        std::partial_sort(groups, groups + used, groups + n_groups,
                          [&](int32_t a, int32_t b) { return group_score[a] > group_score[b]; });
        uint8_t keep[256] = {};
        for (int i = 0; i < used; ++i) { keep[groups[i]] = 1; }
        for (int g = 0; g < n_groups; ++g) {
            if (keep[g]) { continue; }
            for (int i = 0; i < per_group; ++i) { scores[size_t(g) * size_t(per_group) + size_t(i)] = -INFINITY; }
        }
    }
    for (int e = 0; e < n_experts; ++e) { order[e] = e; }
    std::partial_sort(order, order + k, order + n_experts, [scores](int32_t a, int32_t b) { return scores[a] > scores[b]; });
    for (int i = 0; i < k; ++i) { out[i] = order[i]; }
}

expert_layout expert_layout_discover(const std::string & path) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) {
        throw std::runtime_error("model file not found: '" + path + "'");
    }
    if (!S_ISREG(st.st_mode)) {
        throw std::runtime_error("model path is not a regular file: '" + path + "'");
    }
    gguf_handle gguf;
    gguf.ctx = gguf_init_from_file(path.c_str(), gguf_init_params{/*no_alloc*/ true, /*ctx*/ nullptr});
    if (gguf.ctx == nullptr) {
        throw std::runtime_error("not a valid GGUF file: '" + path + "' (ggml's gguf reader rejected its header)");
    }
    const gguf_context * ctx = gguf.ctx;

    expert_layout layout;
    layout.path = path;
    layout.file_size = uint64_t(st.st_size);
    layout.page_size = residency_page_size();
    const int64_t arch_id = gguf_find_key(ctx, "general.architecture");
    if (arch_id < 0 || gguf_get_kv_type(ctx, arch_id) != GGUF_TYPE_STRING) {
        throw std::runtime_error("GGUF file '" + path + "' has no general.architecture");
    }
    layout.arch = gguf_get_val_str(ctx, arch_id);
    const std::string &arch = layout.arch;
    check_hparams(ctx, path);
    layout.n_layers = int(get_int_key(ctx, arch + ".block_count", 0));
    layout.n_experts = int(get_int_key(ctx, arch + ".expert_count", 0));
    layout.n_experts_used = int(get_int_key(ctx, arch + ".expert_used_count", 0));
    layout.n_embd = get_int_key(ctx, arch + ".embedding_length", 0);
    if (layout.n_experts <= 0) {
        throw std::runtime_error("dense model: '" + path + "' (" + arch + ") has no " + arch +
                                 ".expert_count; the expert cache needs a Mixture-of-Experts GGUF");
    }
    if (layout.n_layers <= 0 || layout.n_experts_used <= 0 || layout.n_experts_used > layout.n_experts) {
        throw std::runtime_error("GGUF file '" + path + "' has inconsistent MoE hyper-parameters: block_count=" +
                                 std::to_string(layout.n_layers) + " expert_count=" + std::to_string(layout.n_experts) +
                                 " expert_used_count=" + std::to_string(layout.n_experts_used));
    }

    const int64_t n_groups = get_int_key(ctx, arch + ".expert_group_count", 0);
    const int64_t n_groups_used = get_int_key(ctx, arch + ".expert_group_used_count", 0);
    if (n_groups > 1) {
        // llama.cpp asserts the same at load (llama-model.cpp); 256 groups bound select_experts' scratch
        if (n_groups > 256 || layout.n_experts % n_groups != 0 || n_groups_used < 1 || n_groups_used >= n_groups) {
            layout.predictor_off = "expert groups " + arch + ".expert_group_count=" + std::to_string(n_groups) +
                                   " expert_group_used_count=" + std::to_string(n_groups_used) +
                                   " do not divide " + std::to_string(layout.n_experts) + " experts into groups it can pick";
        } else {
            layout.selection.n_groups = int(n_groups);
            layout.selection.n_groups_used = int(n_groups_used);
        }
    }
    if (arch == "grovemoe") {
        layout.predictor_off = "GroveMoE's selection (sigmoid scores over expert groups of " + arch +
                               ".experts_per_group) is not in the predictor's rule";
    }

    const uint64_t data_offset = gguf_get_data_offset(ctx);
    const int64_t n_tensors = gguf_get_n_tensors(ctx);
    const size_t n_units = size_t(layout.n_layers) * size_t(layout.n_experts);
    layout.slices.assign(n_units, {});
    layout.unit_bytes.assign(n_units, 0);
    layout.routers.assign(size_t(layout.n_layers), router_tensor{});
    layout.router_biases.assign(size_t(layout.n_layers), vector_tensor{});
    layout.selection_biases.assign(size_t(layout.n_layers), vector_tensor{});

    // Every tensor's extent, to find which pages hold something other than expert slices.
    struct extent { uint64_t first, last; int32_t unit; size_t slice; };  // unit -2: non-expert; slice: index in slices[unit]
    std::vector<extent> extents;
    extents.reserve(size_t(n_tensors) * 4);
    for (int64_t i = 0; i < n_tensors; ++i) {
        const std::string name = gguf_get_tensor_name(ctx, i);
        const uint64_t offset = data_offset + gguf_get_tensor_offset(ctx, i);
        const uint64_t size = gguf_get_tensor_size(ctx, i);
        if (offset + size > layout.file_size) {
            throw std::runtime_error("truncated GGUF file '" + path + "': tensor '" + name + "' ends at byte " +
                                     std::to_string(offset + size) + " but the file has " +
                                     std::to_string(layout.file_size) + " bytes");
        }
        const int64_t * ne = gguf_get_tensor_ne(ctx, i);
        int n_dims = GGML_MAX_DIMS;
        while (n_dims > 1 && ne[n_dims - 1] == 1) { --n_dims; }

        std::string rest;
        const int il = parse_block(name, rest);
        const bool is_expert = il >= 0 && rest.find("_exps.") != std::string::npos;
        if (il >= 0 && rest == "ffn_gate_inp.weight" && il < layout.n_layers) {
            layout.routers[size_t(il)] = router_tensor{offset, int32_t(gguf_get_tensor_type(ctx, i)), ne[0], ne[1]};
        }
        if (il >= 0 && il < layout.n_layers && (rest == "exp_probs_b.bias" || rest == "ffn_gate_inp.bias")) {
            const bool selection = rest == "exp_probs_b.bias";
            (selection ? layout.selection_biases : layout.router_biases)[size_t(il)] =
                vector_tensor{offset, int32_t(gguf_get_tensor_type(ctx, i)), n_dims == 1 ? ne[0] : 0};
            (selection ? layout.selection.selection_bias : layout.selection.router_bias) = true;
        }
        if (!is_expert) {
            extents.push_back({offset, offset + size, -2, 0});
            continue;
        }
        if (il >= layout.n_layers || ne[n_dims - 1] != layout.n_experts || size % uint64_t(layout.n_experts) != 0) {
            throw std::runtime_error("expert tensor '" + name + "' in '" + path + "' does not have " +
                                     std::to_string(layout.n_experts) + " experts in its outermost dimension (layer " +
                                     std::to_string(il) + " of " + std::to_string(layout.n_layers) + ")");
        }
        layout.expert_tensors.push_back(name);
        const uint64_t per_expert = size / uint64_t(layout.n_experts);  // nb[n_dims-1]
        for (int e = 0; e < layout.n_experts; ++e) {
            const int32_t unit = int32_t(il) * layout.n_experts + e;
            expert_slice slice;
            slice.range = byte_range{offset + uint64_t(e) * per_expert, per_expert};
            extents.push_back({slice.range.offset, slice.range.offset + per_expert, unit, layout.slices[size_t(unit)].size()});
            layout.slices[size_t(unit)].push_back(slice);
            layout.expert_bytes += per_expert;
        }
    }
    if (layout.expert_tensors.empty()) {
        throw std::runtime_error("dense model: '" + path + "' declares " + std::to_string(layout.n_experts) +
                                 " experts but has no blk.*.*_exps tensors");
    }
    const bool gating_known = find_gating(ctx, arch, layout.n_layers, layout.selection.gating);
    if (arch == "llama4" || arch == "grovemoe") {  // build_moe_ffn: selection_probs is not made from probs
        layout.selection_off = arch + " takes its top-k on other scores than the ones its weights come from";
    }
    if (layout.predictor_off.empty() && !gating_known && layout.selection.scores_needed()) {
        layout.predictor_off = "the gating function of " + arch + " (" + arch + ".expert_gating_func=" +
                               std::to_string(get_int_key(ctx, arch + ".expert_gating_func", 0)) +
                               ") is not known, and its selection bias or expert groups are added to its scores";
    }

    // Boundary pages: who else lives on the first / last page of each slice.
    const uint64_t ps = layout.page_size;
    std::sort(extents.begin(), extents.end(), [](const extent & a, const extent & b) { return a.first < b.first; });
    // GGUF header and padding are "non-expert" too: anything on a page not covered by slices.
    uint64_t expert_pages_exclusive = 0;  // pages that hold only expert bytes
    for (size_t x = 0; x < extents.size(); ++x) {
        const extent & cur = extents[x];
        if (cur.unit < 0) { continue; }
        expert_slice & slice = layout.slices[size_t(cur.unit)][cur.slice];
        const uint64_t head_page = cur.first / ps;
        const uint64_t tail_page = (cur.last - 1) / ps;
        if (cur.first % ps != 0) {
            // whatever precedes in the file shares the head page
            slice.head_owner = -2;
            if (x > 0 && extents[x - 1].unit >= 0 && extents[x - 1].last > head_page * ps &&
                extents[x - 1].first / ps < head_page && extents[x - 1].last == cur.first) {
                slice.head_owner = extents[x - 1].unit;
            }
        }
        if (cur.last % ps != 0) {
            slice.tail_owner = -2;
            if (x + 1 < extents.size() && extents[x + 1].unit >= 0 && extents[x + 1].first == cur.last &&
                (extents[x + 1].last - 1) / ps > tail_page) {
                slice.tail_owner = extents[x + 1].unit;
            }
        }
        const uint64_t first_full = (cur.first + ps - 1) / ps;
        const uint64_t end_full = cur.last / ps;
        if (end_full > first_full) { expert_pages_exclusive += end_full - first_full; }
        layout.unit_bytes[size_t(cur.unit)] += (tail_page - head_page + 1) * ps;
    }
    const uint64_t file_pages = (layout.file_size + ps - 1) / ps;
    layout.non_expert_bytes = (file_pages - expert_pages_exclusive) * ps;

    layout.extents.reserve(extents.size() + 1);
    layout.extents.push_back(file_extent{0, data_offset, FILE_EXTENT_NON_EXPERT});  // GGUF header and metadata
    for (const extent & x : extents) {
        if (x.last > x.first) { layout.extents.push_back(file_extent{x.first, x.last, x.unit < 0 ? FILE_EXTENT_NON_EXPERT : x.unit}); }
    }
    return layout;
}

void expert_cache_params::validate() const {
    cache.validate();
    if (n_io_threads < 0 || n_io_threads > 64) {
        throw std::invalid_argument("n_io_threads must be in [0, 64], got " + std::to_string(n_io_threads));
    }
    if (predict_layers_ahead < 1 || predict_layers_ahead > 8) {
        throw std::invalid_argument("predict_layers_ahead must be in [1, 8], got " + std::to_string(predict_layers_ahead));
    }
    if (predict_max_rows < 1 || predict_max_rows > 4096) {
        throw std::invalid_argument("predict_max_rows must be in [1, 4096], got " + std::to_string(predict_max_rows));
    }
    selection.validate();
}

static cache_config checked(const expert_cache_params & params) {
    params.validate();
    cache_config config = params.cache;
    if (params.n_io_threads == 0) { config.prefetch = false; }  // nobody to read ahead
    // A read ahead fetches the experts the model's own top-k would pick: the reads cache-aware selection is there
    // to avoid by choosing resident ones (docs/bounded-23: without them it read a fifth of exact's disk bytes per token).
    if (params.selection.mode == SELECTION_CACHE_AWARE) { config.prefetch = false; }
    return config;
}

expert_cache::expert_cache(expert_layout layout, const expert_cache_params & params)
    : layout_(std::move(layout)),
      params_(params),
      policy_(layout_.n_layers, layout_.n_experts, layout_.unit_bytes, checked(params), layout_.n_experts_used),
      steps_(layout_.n_experts),
      selector_(layout_.n_experts) {
    if (params_.selection.mode == SELECTION_CACHE_AWARE && !layout_.selection_off.empty()) {
        throw std::invalid_argument("cache-aware expert selection cannot run on '" + layout_.path + "': " +
                                    layout_.selection_off);
    }
    if (params_.record_trace) { trace_.reserve(params_.trace_max_events, params_.trace_max_ids); }
    predict_rows_.reserve(size_t(params_.predict_max_rows));
    predict_logits_.resize(size_t(params_.predict_max_rows) * size_t(layout_.n_experts));
    order_.resize(size_t(layout_.n_experts));
    predict_scores_.resize(size_t(layout_.n_experts));
    predict_topk_.resize(size_t(layout_.n_experts_used));
    predicted_mask_.assign(size_t(layout_.n_experts), 0);
    predicted_.reserve(size_t(layout_.n_experts));
    in_flight_.reserve(size_t(layout_.n_experts) * 4);
    available_.assign(size_t(layout_.n_experts), 0);
    gate_.assign(size_t(layout_.n_experts), 0.0f);
}

expert_cache::~expert_cache() {
    residency_.reset();  // joins the I/O threads, which call into it
    lean_load_.reset();
}

void expert_cache::before_load(bool preload) {
    if (residency_) { return; }
    mappings_before_load_ = residency_mappings_of(layout_.path);
    if (preload) {
        lean_load_ = std::make_unique<lean_load>(layout_.path);  // llama.cpp's load maps, reads nothing
        preloaded_bytes_ = residency_preload(layout_);
    }
}

void expert_cache::attach() {
    if (residency_) { return; }
    auto residency = std::make_unique<unit_residency>(layout_, mappings_before_load_);
    lean_load_.reset();  // the model is mapped
    residency->establish(policy_);

    // Routers for prediction: point into the mapping (F32) or keep a dequantised copy; biases copied.
    const int n_layers = layout_.n_layers;
    routers_.assign(size_t(n_layers), layer_router{});
    const file_residency & file = residency->file();
    for (int il = 0; il < n_layers && layout_.predictor_off.empty(); ++il) {  // off: no router, no prediction
        load_layer_router(layout_, il, [&file](uint64_t offset, size_t) { return file.address_of(offset); },
                          routers_[size_t(il)]);
    }

    residency->start_io(params_.n_io_threads);
    residency_ = std::move(residency);
}

void expert_cache::reap_reads() {
    io_pool & io = residency_->io();
    for (size_t i = 0; i < in_flight_.size();) {
        if (io.idle(in_flight_[i])) {
            policy_.unpin(in_flight_[i]);
            in_flight_[i] = in_flight_.back();
            in_flight_.pop_back();
        } else {
            ++i;
        }
    }
}

bool expert_cache::eval_callback(ggml_tensor * t, bool ask, void * user_data) {
    if (!has_prefix(t->name, TOPK_PREFIX, sizeof(TOPK_PREFIX) - 1)) {
        return !ask;  // "no" to every other node; never cancel the graph
    }
    if (ask) { return true; }
    auto * self = static_cast<expert_cache *>(user_data);
    const int layer = parse_layer(t->name, sizeof(TOPK_PREFIX) - 1);
    if (self->residency_ && layer >= 0 && layer < self->layout_.n_layers && t->type == GGML_TYPE_I32 && is_host(t)) {
        self->on_topk(t, layer);
    }
    return true;
}

void expert_cache::on_topk(ggml_tensor * t, int layer) {
    const int k = int(t->ne[0]);         // [n_expert_used, n_tokens] I32 view
    const int n_tokens = int(t->ne[1]);
    if (k <= 0 || n_tokens <= 0) { return; }
    const uint64_t t0 = now_ns();
    if (ids_.size() < size_t(n_tokens) * size_t(k)) { ids_.resize(size_t(n_tokens) * size_t(k)); }
    const char * data = static_cast<const char *>(t->data);
    for (int i = 0; i < n_tokens; ++i) {
        for (int j = 0; j < k; ++j) {
            ids_[size_t(i) * size_t(k) + size_t(j)] = *reinterpret_cast<const int32_t *>(data + size_t(i) * t->nb[1] + size_t(j) * t->nb[0]);
        }
    }
    if (params_.selection.mode == SELECTION_CACHE_AWARE && !policy_.layer_all_resident(layer)) {
        select_cache_aware(t, layer);
    }
    if (params_.record_trace) { trace_.append(TRACE_EVENT_ACCESS, layer, n_tokens, ids_.data(), n_tokens * k); }

    reap_reads();
    io_pool & io = residency_->io();
    // the rows of the step's sequences, or nullptr: an access the step's sequences cannot be told in
    const uint8_t * row_decode = steps_.row_decode(n_tokens);
    const cache_counters before = policy_.counters();
    policy_.access(layer, ids_.data(), n_tokens, k, plan_, row_decode);
    if (row_decode != nullptr) { steps_.record_access(layer, ids_.data(), n_tokens, k, plan_.load, policy_); }
    residency_->mark(plan_);
    uint64_t t1 = now_ns();
    residency_->drop_units(plan_.evict);
    uint64_t t2 = now_ns();
    callback_timing_.ns_drop += t2 - t1;
    for (int32_t u : policy_.access_units()) {
        if (!io.idle(u)) { io.wait(u); }  // read ahead and still in flight
    }
    t1 = now_ns();
    callback_timing_.ns_prefetch_wait += t1 - t2;
    io.read_now(plan_.load.data(), plan_.load.size());
    t2 = now_ns();
    callback_timing_.ns_demand_read += t2 - t1;

    if (params_.predict && layer + 1 < layout_.n_layers) {
        const ggml_tensor * x = find_router_input(t);
        if (x != nullptr && x->type == GGML_TYPE_F32 && x->ne[0] == layout_.n_embd && is_host(x)) {
            // Layers further ahead give their reads more time to land. A layer whose experts are
            // all resident has nothing to read ahead: it is not predicted (when the whole model
            // fits, the callback does no prediction work at all).
            const int last = std::min(layer + params_.predict_layers_ahead, layout_.n_layers - 1);
            for (int target = layer + 1; target <= last; ++target) {
                if (routers_[size_t(target)].rows != nullptr &&
                    (params_.predict_resident_layers || !policy_.layer_all_resident(target))) {
                    predict_layer(x, layer, target);
                }
            }
        }
        t1 = now_ns();
        callback_timing_.ns_predict += t1 - t2;
        t2 = t1;
    }
    if (row_decode != nullptr) { steps_.share(before, policy_.counters()); }
    callback_timing_.ns_callback += t2 - t0;
}

void expert_cache::select_cache_aware(ggml_tensor * t, int layer) {
    ggml_tensor * probs = find_probs(t);
    const int k = int(t->ne[0]);
    const int n_tokens = int(t->ne[1]);
    const int n_experts = layout_.n_experts;
    if (probs == nullptr || probs->type != GGML_TYPE_F32 || !is_host(probs) || probs->ne[0] != n_experts ||
        probs->ne[1] != n_tokens || probs->nb[0] != sizeof(float)) {
        return;  // not the graph this was written for: the selection stays exact
    }
    // What the scores are, from the node that made them: probabilities (softmax, sigmoid, sqrt-softplus: >= 0, the
    // weights are the selected ones' values) or logits (gpt-oss's SOFTMAX_WEIGHT: a softmax over the selected ones).
    const bool logits = !(probs->op == GGML_OP_SOFT_MAX || probs->op == GGML_OP_UNARY || probs->op == GGML_OP_SQRT);
    const float zero = logits ? -INFINITY : 0.0f;
    const int32_t base = int32_t(layer) * n_experts;
    for (int e = 0; e < n_experts; ++e) { available_[size_t(e)] = policy_.is_resident(base + e) ? 1 : 0; }
    // While the cache has room, a missing expert is read without evicting anything: it is kept, not changed (a cold
    // cache with room to spare stays exact). Room is given out in the order the rows select.
    const uint64_t budget = policy_.config().budget_bytes;
    uint64_t resident = policy_.resident_bytes();
    for (size_t i = 0; i < size_t(n_tokens) * size_t(k) && resident < budget; ++i) {
        const int32_t e = ids_[i];
        if (e < 0 || e >= n_experts || available_[size_t(e)]) { continue; }
        const uint64_t bytes = policy_.unit_bytes(base + e);
        if (resident + bytes > budget) { continue; }
        available_[size_t(e)] = 1;
        resident += bytes;
    }
    selector_.begin(available_.data());
    if (row_skipped_.size() < size_t(k)) { row_skipped_.resize(size_t(k)); }
    if (row_changes_.size() < size_t(n_tokens)) { row_changes_.resize(size_t(n_tokens)); }
    char * out = static_cast<char *>(t->data);
    uint64_t replaced = 0, skipped = 0;
    for (int i = 0; i < n_tokens; ++i) {
        float * row = reinterpret_cast<float *>(static_cast<char *>(probs->data) + size_t(i) * probs->nb[1]);
        const float * gate = row;
        if (logits) {
            float max = -INFINITY;
            for (int e = 0; e < n_experts; ++e) { max = std::max(max, row[e]); }
            for (int e = 0; e < n_experts; ++e) { gate_[size_t(e)] = std::exp(row[e] - max); }
            gate = gate_.data();
        }
        int32_t * row_ids = ids_.data() + size_t(i) * size_t(k);
        const selection_change change = selector_.select(params_.selection, gate, row_ids, k, row_skipped_.data());
        row_changes_[size_t(i)] = change;
        if (change.replaced + change.skipped == 0) { continue; }
        replaced += uint64_t(change.replaced);
        skipped += uint64_t(change.skipped);
        for (int j = 0; j < k; ++j) {  // the graph computes with the changed row
            *reinterpret_cast<int32_t *>(out + size_t(i) * t->nb[1] + size_t(j) * t->nb[0]) = row_ids[j];
            if (row_skipped_[size_t(j)]) { row[row_ids[j]] = zero; }  // the stand-in slot weighs nothing
        }
    }
    policy_.count_selection_changes(replaced, skipped);
    if (steps_.row_decode(n_tokens) != nullptr) { steps_.record_selection_changes(row_changes_.data(), n_tokens); }
}

void expert_cache::begin_step(const int32_t * row_tags, const uint8_t * row_outputs, int n_rows) {
    const step_rows rows = steps_.begin(row_tags, row_outputs, n_rows);
    if (params_.record_trace) {
        const int32_t phase_rows[2] = {rows.n_decode, rows.n_prefill};
        trace_.append(TRACE_EVENT_STEP, -1, n_rows, phase_rows, 2);
    }
    policy_.begin_step(rows.n_decode, rows.n_prefill);
}

routing_trace expert_cache::sequence_trace(int32_t tag) const { return steps_.trace(tag); }

sequence_record expert_cache::take_sequence(int32_t tag) { return steps_.take(tag); }

void expert_cache::predict_layer(const ggml_tensor * x, int layer, int target) {
    const int64_t n_embd = layout_.n_embd;
    const int n_experts = layout_.n_experts;
    const int k = layout_.n_experts_used;
    const layer_router & router = routers_[size_t(target)];
    const float * w = router.rows;  // [n_experts x n_embd]
    const float * router_bias = router.router_bias.empty() ? nullptr : router.router_bias.data();
    const float * selection_bias = router.selection_bias.empty() ? nullptr : router.selection_bias.data();

    // The sampled rows of the router input [n_embd x n_rows]: at most predict_max_rows, evenly
    // spaced, always including the last one.
    const int64_t n_rows = x->ne[1];
    const int64_t stride = std::max<int64_t>(1, (n_rows + params_.predict_max_rows - 1) / params_.predict_max_rows);
    predict_rows_.clear();
    for (int64_t r = n_rows - 1; r >= 0; r -= stride) {
        predict_rows_.push_back(reinterpret_cast<const float *>(static_cast<const char *>(x->data) + size_t(r) * x->nb[1]));
    }
    // logits [rows x n_experts]: each router row is streamed once for all sampled rows
    const size_t rows = predict_rows_.size();
    if (predict_logits_.size() < rows * size_t(n_experts)) { predict_logits_.resize(rows * size_t(n_experts)); }
    for (int e = 0; e < n_experts; ++e) {
        const float * we = w + size_t(e) * size_t(n_embd);
        for (size_t r = 0; r < rows; ++r) { predict_logits_[r * size_t(n_experts) + size_t(e)] = dot_f32(we, predict_rows_[r], n_embd); }
    }
    predicted_.clear();
    for (size_t r = 0; r < rows; ++r) {
        const float * logits = predict_logits_.data() + r * size_t(n_experts);
        select_experts(layout_.selection, logits, router_bias, selection_bias, n_experts, k, predict_scores_.data(),
                       order_.data(), predict_topk_.data());
        for (int i = 0; i < k; ++i) {
            const int32_t e = predict_topk_[size_t(i)];
            if (!predicted_mask_[size_t(e)]) { predicted_mask_[size_t(e)] = 1; predicted_.push_back(e); }
        }
    }
    for (int32_t e : predicted_) { predicted_mask_[size_t(e)] = 0; }
    if (params_.record_trace) {
        trace_.append(TRACE_EVENT_PREDICT, target, 1, predicted_.data(), int32_t(predicted_.size()));
    }
    steps_.record_prediction(target, predicted_.data(), int(predicted_.size()));

    policy_.predict(target, predicted_.data(), int(predicted_.size()), plan_, target - layer);
    residency_->mark(plan_);
    residency_->drop_units(plan_.evict);
    io_pool & io = residency_->io();
    for (int32_t u : plan_.load) {
        policy_.pin(u);        // unpinned by reap_reads once its read ended
        io.read_ahead(u);      // false: a read of it is already queued or running
        in_flight_.push_back(u);
    }
}

void expert_cache::settle() {
    if (!residency_) { return; }
    for (int32_t u : in_flight_) { residency_->io().wait(u); }
    reap_reads();
    policy_.settle(plan_);
    residency_->mark(plan_);
    residency_->drop_units(plan_.evict);
    residency_->flush_drops();
    residency_->reconcile(policy_);
}

routing_trace expert_cache::take_trace() {
    routing_trace out;
    std::swap(out, trace_);
    if (params_.record_trace) { trace_.reserve(params_.trace_max_events, params_.trace_max_ids); }
    return out;
}

uint64_t expert_cache::measured_resident_bytes() const {
    return residency_ ? residency_->measured_resident_bytes() : 0;
}

int expert_cache::reconcile() {
    return residency_ ? residency_->reconcile(policy_) : 0;
}

residency_counters expert_cache::io_counters() const {
    residency_counters out = residency_ ? residency_->counters() : residency_counters{};
    out.ns_callback = callback_timing_.ns_callback;
    out.ns_demand_read = callback_timing_.ns_demand_read;
    out.ns_prefetch_wait = callback_timing_.ns_prefetch_wait;
    out.ns_drop = callback_timing_.ns_drop;
    out.ns_predict = callback_timing_.ns_predict;
    return out;
}

void expert_cache::set_budget(uint64_t budget_bytes) {
    policy_.set_budget(budget_bytes, plan_);
    if (residency_) {  // before attach nothing is resident, so there is nothing to mirror or drop
        residency_->mark(plan_);
        residency_->drop_units(plan_.evict);
        residency_->flush_drops();
    }
}

void expert_layout_select(const expert_layout & layout, int layer, const float * logits, int n_rows, int32_t * out) {
    layer_router router;
    if (!read_layer_router(layout, layer, router)) {
        throw std::runtime_error("layer " + std::to_string(layer) + " of '" + layout.path + "' has no router the predictor can use");
    }
    const int n = layout.n_experts, k = layout.n_experts_used;
    std::vector<float> scores(static_cast<size_t>(n));
    std::vector<int32_t> order(static_cast<size_t>(n));
    for (int r = 0; r < n_rows; ++r) {
        select_experts(layout.selection, logits + size_t(r) * size_t(n),
                       router.router_bias.empty() ? nullptr : router.router_bias.data(),
                       router.selection_bias.empty() ? nullptr : router.selection_bias.data(), n, k, scores.data(),
                       order.data(), out + size_t(r) * size_t(k));
    }
}

void expert_layout_route(const expert_layout & layout, int layer, const float * x, int n_rows, int32_t * out) {
    layer_router router;
    if (!read_layer_router(layout, layer, router)) {
        throw std::runtime_error("layer " + std::to_string(layer) + " of '" + layout.path + "' has no router the predictor can use");
    }
    const int n = layout.n_experts;
    std::vector<float> logits(size_t(n_rows) * size_t(n));
    for (int r = 0; r < n_rows; ++r) {
        for (int e = 0; e < n; ++e) {
            logits[size_t(r) * size_t(n) + size_t(e)] =
                dot_f32(router.rows + size_t(e) * size_t(layout.n_embd), x + size_t(r) * size_t(layout.n_embd), layout.n_embd);
        }
    }
    expert_layout_select(layout, layer, logits.data(), n_rows, out);
}
