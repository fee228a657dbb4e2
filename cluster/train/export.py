"""GGUF export of the trained model (architecture `qwen3moe`) and the reader that inverts it.

Keys (`qwen3moe.*` unless noted): context_length, embedding_length, block_count,
feed_forward_length (= expert_feed_forward_length: every layer is MoE), attention.head_count,
attention.head_count_kv, attention.key_length, attention.value_length, rope.dimension_count,
rope.freq_base, attention.layer_norm_rms_epsilon, expert_count, expert_used_count,
expert_feed_forward_length, expert_weights_norm (true; llama.cpp's qwen3moe graph normalises the
top-k weights whatever this says), general.file_type = MOSTLY_F16.

Tokenizer: `tokenizer.ggml.model = "gpt2"` (byte-level BPE), `tokenizer.ggml.pre = "qwen2"`
(the pre-tokenizer regex the tokenizer was trained with), tokens by id, token types (special
tokens CONTROL, the rest NORMAL), merges in rank order, bos/eos/padding ids, add_bos_token true,
add_eos_token false, and a ChatML `tokenizer.chat_template` (`<|im_start|>role\\n...<|im_end|>`).

Tensors, names and layouts as llama.cpp's qwen3moe loader creates them (numpy shape = reversed
ggml ne): matrices and expert tensors F16, norms and the router `ffn_gate_inp` F32 (routing
decisions stay exact to the float32 model), no `output.weight` (tied: llama.cpp reuses
`token_embd.weight`).

A checkpoint trained with a top-k selection bias (`MoEConfig.selection_bias`) is refused:
`qwen3moe`'s graph in llama.cpp passes no `ffn_exp_probs_b` to build_moe_ffn, so its experts
would be chosen without the bias the model was trained with. The llama.cpp architectures whose
graphs add that tensor to softmax probabilities (ernie4_5-moe: no q/k norm; dots1: a required
shared expert, untied output, K/V as wide as Q) need the export to reshape the model (a zero
shared expert, the KV heads repeated, the embedding copied to output.weight) -- not done yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cluster.train.tokenizer import SPECIAL_TOKENS, read_vocabulary

ARCH = "qwen3moe"
GGUF_FILE = "moe-5domains.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _is_f32(name: str, array: np.ndarray) -> bool:
    return array.ndim == 1 or name.endswith("ffn_gate_inp.weight")


def write_gguf(path: Path, tensors: dict[str, np.ndarray], hparams: dict, tokenizer_path: Path, name: str) -> None:
    """Writes a qwen3moe GGUF file.

    Args:
        path: the file to write (replaced).
        tensors: float32 arrays by GGUF name, in GGUF layout (model.MoETransformer.gguf_tensors).
        hparams: the fields of model.MoEConfig.
        tokenizer_path: the tokenizer.json whose vocabulary and merges go into the file.
        name: `general.name`.
    """
    import gguf

    vocab = read_vocabulary(tokenizer_path)
    if len(vocab.tokens) != hparams["n_vocab"]:
        raise ValueError(f"tokenizer has {len(vocab.tokens)} tokens, the model's embedding {hparams['n_vocab']} rows")
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(hparams["n_ctx"])
    writer.add_embedding_length(hparams["n_embd"])
    writer.add_block_count(hparams["n_layer"])
    writer.add_feed_forward_length(hparams["n_ff_exp"])
    writer.add_head_count(hparams["n_head"])
    writer.add_head_count_kv(hparams["n_head_kv"])
    writer.add_key_length(hparams["head_dim"])
    writer.add_value_length(hparams["head_dim"])
    writer.add_rope_dimension_count(hparams["head_dim"])
    writer.add_rope_freq_base(hparams["rope_freq_base"])
    writer.add_layer_norm_rms_eps(hparams["rms_eps"])
    writer.add_expert_count(hparams["n_expert"])
    writer.add_expert_used_count(hparams["n_expert_used"])
    writer.add_expert_feed_forward_length(hparams["n_ff_exp"])
    writer.add_expert_weights_norm(True)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocab.tokens)
    special = set(SPECIAL_TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in vocab.tokens])
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.eos_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    for tensor_name, array in tensors.items():
        dtype = np.float32 if _is_f32(tensor_name, array) else np.float16
        writer.add_tensor(tensor_name, np.ascontiguousarray(array.astype(dtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def export_checkpoint(checkpoint: Path, tokenizer_path: Path, path: Path) -> Path:
    """Writes the GGUF of a training checkpoint and returns its path."""
    from cluster.train.train import load_model

    model, cfg, steps = load_model(checkpoint)
    if cfg.model.selection_bias:
        raise ValueError(f"checkpoint {checkpoint} was trained with a top-k selection bias (--bias-rate "
                         f"{cfg.bias_rate}); {ARCH} in llama.cpp selects experts without one (no ffn_exp_probs_b), "
                         "so the GGUF would route differently from the trained model: not exported")
    tensors = {k: v.detach().float().numpy() for k, v in model.gguf_tensors().items()}
    write_gguf(path, tensors, cfg.model.to_dict(), tokenizer_path, name=f"{path.stem} ({steps} steps)")
    return path


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The model.MoEConfig fields and the float32 tensors of a GGUF this module wrote.

    Raises:
        ValueError: the file is not a qwen3moe GGUF with the keys write_gguf writes.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.get_field(key)
        if field is None:
            raise ValueError(f"'{path}' lacks the key {key}")
        return field.contents()

    arch = value("general.architecture")
    if arch != ARCH:
        raise ValueError(f"'{path}' is a {arch} model, expected {ARCH}")
    hparams = {
        "n_vocab": len(value("tokenizer.ggml.tokens")),
        "n_ctx": int(value(f"{ARCH}.context_length")),
        "n_embd": int(value(f"{ARCH}.embedding_length")),
        "n_layer": int(value(f"{ARCH}.block_count")),
        "n_head": int(value(f"{ARCH}.attention.head_count")),
        "n_head_kv": int(value(f"{ARCH}.attention.head_count_kv")),
        "head_dim": int(value(f"{ARCH}.attention.key_length")),
        "n_expert": int(value(f"{ARCH}.expert_count")),
        "n_expert_used": int(value(f"{ARCH}.expert_used_count")),
        "n_ff_exp": int(value(f"{ARCH}.expert_feed_forward_length")),
        "rope_freq_base": float(value(f"{ARCH}.rope.freq_base")),
        "rms_eps": float(value(f"{ARCH}.attention.layer_norm_rms_epsilon")),
    }
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne -> numpy shape
        tensors[t.name] = np.asarray(t.data).reshape(shape).astype(np.float32)
    return hparams, tensors
