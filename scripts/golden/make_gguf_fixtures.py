#!/usr/bin/env python3
"""Golden data for the GGUF reader (tests/gguf.rs).

Writes small GGUF files with the PyPI `gguf` package and records what the reference readers make
of them: `gguf.quants.dequantize` for every tensor type, and transformers' own GGUF loader
(`from_pretrained(..., gguf_file=...)`, which undoes llama.cpp's q/k row permutation) for the
Hugging Face names, shapes, values and config of tiny llama / qwen2 models. tiny_qwen3.gguf holds
the weights of the tiny qwen3 of tests/fixtures/tiny/qwen3 (make_tiny_models.py) in f32, laid out
as llama.cpp's converter writes a qwen3, so the test checks it against that fixture's
transformers logits.

    python scripts/golden/make_gguf_fixtures.py [--smollm2 PATH/SmolLM2-135M-Instruct.Q4_1.gguf]

Outputs go to tests/fixtures/gguf/. Expected tensors are raw little-endian f32 in one `.bin` per
fixture, located by a JSON manifest (`offset`/`len` in floats). With --smollm2 it also writes
smollm2_golden.json: config values and slices of a few dequantized, un-permuted tensors.
"""
import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gguf"
QK_K = 256


def write_expected(stem, entries):
    """entries: list of (dict of descriptive fields, float32 array). Writes STEM.bin + STEM.json."""
    manifest, chunks, offset = [], [], 0
    for fields, values in entries:
        values = np.ascontiguousarray(values, dtype="<f4")
        manifest.append({**fields, "offset": offset, "len": int(values.size)})
        chunks.append(values.tobytes())
        offset += values.size
    (OUT / f"{stem}.bin").write_bytes(b"".join(chunks))
    return manifest


def random_kquant_blocks(rng, qtype, n_blocks):
    """Random bytes for every field of a K-quant block, with the f16 scales set to sane values
    (random bytes there could be NaN/Inf or huge)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)

    def set_f16(pos, lo, hi):
        vals = rng.uniform(lo, hi, size=n_blocks).astype(np.float16)
        blocks[:, pos:pos + 2] = vals.view(np.uint8).reshape(n_blocks, 2)

    # Field positions follow ggml's block structs (d/dmin first for Q4_K/Q5_K, last for the others).
    if qtype == T.Q2_K:  # scales[16] qs[64] d dmin
        set_f16(QK_K // 16 + QK_K // 4, 0.001, 0.05)
        set_f16(QK_K // 16 + QK_K // 4 + 2, 0.001, 0.05)
    elif qtype == T.Q3_K:  # hmask[32] qs[64] scales[12] d
        set_f16(QK_K // 8 + QK_K // 4 + 12, -0.05, 0.05)
    elif qtype in (T.Q4_K, T.Q5_K):  # d dmin scales[12] ...
        set_f16(0, 0.001, 0.05)
        set_f16(2, 0.001, 0.05)
    elif qtype == T.Q6_K:  # ql[128] qh[64] scales[16] d
        set_f16(QK_K // 2 + QK_K // 4 + QK_K // 16, -0.05, 0.05)
    else:
        raise ValueError(qtype)
    return blocks


def make_all_types(rng):
    """One tensor per supported type, plus metadata of every value type."""
    path = OUT / "all_types.gguf"
    w = gguf.GGUFWriter(str(path), arch="test")
    # Metadata of every GGUF value type (the test asserts these literal inputs).
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float32("test.f32", 1.5)
    w.add_float64("test.f64", -2.25)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo wörld")
    w.add_array("test.array_i32", [1, -2, 3])
    w.add_array("test.array_str", ["a", "", "ccc"])
    w.add_array("test.array_f32", [0.5, -1.0])
    w.add_custom_alignment(64)  # non-default, so the reader must honour the key

    entries = []

    def add(name, qtype, data_bytes_or_array, expected):
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, data_bytes_or_array)
        else:
            w.add_tensor(name, data_bytes_or_array, raw_dtype=qtype)
        entries.append(({"name": name, "type": qtype.name, "shape": list(expected.shape)}, expected))

    def reference(raw, qtype):
        return gguf.quants.dequantize(raw, qtype).astype(np.float32)

    # Plain floats; the F32 one is 3-D to pin down the ggml-order vs row-major shape convention.
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    add("t.f32", T.F32, x, x)
    x16 = (rng.standard_normal((3, 8)) * 4).astype(np.float16)
    add("t.f16", T.F16, x16, reference(x16, T.F16))
    xb = gguf.quants.quantize(rng.standard_normal((2, 16)).astype(np.float32) * 3, T.BF16)
    add("t.bf16", T.BF16, xb, reference(xb, T.BF16))

    # Legacy 32-blocks: quantize random weights with the package's own numpy quantizer.
    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        weights = rng.standard_normal((3, 64)).astype(np.float32)
        weights[0, :32] += 2.0  # an all-positive block exercises Q4_1/Q5_1's min offset
        raw = gguf.quants.quantize(weights, qtype)
        add(f"t.{qtype.name.lower()}", qtype, raw, reference(raw, qtype))

    # K-quants: 2 rows of 2 super-blocks each, random but valid bytes.
    for qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        raw = random_kquant_blocks(rng, qtype, 4).reshape(2, -1)
        add(f"t.{qtype.name.lower()}", qtype, raw, reference(raw, qtype))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    manifest = write_expected("all_types", entries)
    (OUT / "all_types.json").write_text(json.dumps({"tensors": manifest}, indent=1) + "\n")


def make_unsupported(rng):
    """An IQ2_XXS tensor (a type we do not dequantize) beside a plain one."""
    w = gguf.GGUFWriter(str(OUT / "unsupported.gguf"), arch="test")
    w.add_tensor("ok.weight", np.arange(8, dtype=np.float32))
    _, type_size = gguf.GGML_QUANT_SIZES[T.IQ2_XXS]
    w.add_tensor("blk.0.attn_q.weight", rng.integers(0, 256, (1, type_size), dtype=np.uint8), raw_dtype=T.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_permute(weights, n_head):
    """What llama.cpp's converter does to q/k rows (HF layout -> GGUF layout)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def make_tiny_model(rng, arch):
    """A tiny llama (GQA, tied embeddings, vocab from the token list) or qwen2 (biases, untied,
    explicit vocab_size) GGUF, and transformers' reading of it."""
    hidden, n_head, n_kv, ffn, vocab = 32, 4, 2, 32, 32
    n_layers = 2 if arch == "llama" else 1
    head_dim = hidden // n_head
    path = OUT / f"tiny_{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)
    else:
        w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    # Quantized the way llama.cpp would store them; the permutation is applied before quantizing.
    def store(name, hf_values, qtype, permute_heads=None):
        values = hf_values if permute_heads is None else llama_permute(hf_values, permute_heads)
        if qtype == T.F32:
            w.add_tensor(name, values)
        elif qtype == T.F16:
            w.add_tensor(name, values.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    permute = arch == "llama"  # llama.cpp permutes llama q/k only, never qwen2's
    store("token_embd.weight", rand(vocab, hidden), T.Q8_0)
    for i in range(n_layers):
        store(f"blk.{i}.attn_norm.weight", 1 + rand(hidden), T.F32)
        q = rand(n_head * head_dim, hidden)
        if i == 0:
            q_original = q
        store(f"blk.{i}.attn_q.weight", q, T.Q8_0, n_head if permute else None)
        store(f"blk.{i}.attn_k.weight", rand(n_kv * head_dim, hidden), T.Q4_1, n_kv if permute else None)
        store(f"blk.{i}.attn_v.weight", rand(n_kv * head_dim, hidden), T.Q4_0)
        store(f"blk.{i}.attn_output.weight", rand(hidden, n_head * head_dim), T.F16)
        if arch == "qwen2":
            store(f"blk.{i}.attn_q.bias", rand(n_head * head_dim), T.F32)
            store(f"blk.{i}.attn_k.bias", rand(n_kv * head_dim), T.F32)
            store(f"blk.{i}.attn_v.bias", rand(n_kv * head_dim), T.F32)
        store(f"blk.{i}.ffn_norm.weight", 1 + rand(hidden), T.F32)
        store(f"blk.{i}.ffn_gate.weight", rand(ffn, hidden), T.Q5_0)
        store(f"blk.{i}.ffn_up.weight", rand(ffn, hidden), T.Q5_1)
        store(f"blk.{i}.ffn_down.weight", rand(hidden, ffn), T.Q8_0)
    store("output_norm.weight", 1 + rand(hidden), T.F32)
    if arch == "qwen2":
        store("output.weight", rand(vocab, hidden), T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    config, state = transformers_reading(path)
    # Cross-check the two references against each other: the q/k rows transformers hands back
    # must be the original HF rows (only quantized), so the permutation was undone, not repeated.
    q_hf = gguf.quants.dequantize(gguf.quants.quantize(q_original, T.Q8_0), T.Q8_0)
    assert np.array_equal(state["model.layers.0.self_attn.q_proj.weight"].numpy(), q_hf)
    entries = [({"name": k, "shape": list(v.shape)}, v.numpy()) for k, v in sorted(state.items())]
    manifest = write_expected(f"tiny_{arch}", entries)
    (OUT / f"tiny_{arch}.json").write_text(json.dumps({"config": config, "tensors": manifest}, indent=1) + "\n")


def make_qwen3_from_hf():
    """tests/fixtures/tiny/qwen3 as llama.cpp's converter writes a qwen3 GGUF: no q/k permutation,
    `attn_q_norm`/`attn_k_norm`, `attention.key_length`/`value_length` for the explicit head_dim,
    tensors kept in f32 so the transformers logits of the fixture apply unchanged.

    transformers' own GGUF loader cannot be the reference here: its qwen3 mapping ignores
    `attention.key_length` and falls back to Qwen3Config's head_dim of 128."""
    from safetensors.numpy import load_file

    src = OUT.parent / "tiny" / "qwen3"
    cfg = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    w = gguf.GGUFWriter(str(OUT / "tiny_qwen3.gguf"), arch="qwen3")
    w.add_name("tiny-qwen3")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(cfg["vocab_size"])])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for hf_name in sorted(state):
        if hf_name in top:
            name = top[hf_name]
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            name = f"blk.{layer}.{names[module]}.{suffix}"
        w.add_tensor(name, np.ascontiguousarray(state[hf_name], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_gpt_neox_from_hf():
    """tests/fixtures/tiny/gpt_neox as llama.cpp's converter writes a `gptneox` GGUF: the fused
    `attn_qkv` weight and bias regrouped from transformers' per-head [heads, 3, head_dim] rows to
    all queries, then all keys, then all values (as convert_hf_to_gguf.py's GPTNeoXModel does),
    LayerNorm biases, `rope.dimension_count` for the rotated share of each head, and
    `use_parallel_residual`; tensors kept in f32 so the fixture's transformers logits apply."""
    from safetensors.numpy import load_file

    src = OUT.parent / "tiny" / "gpt_neox"
    cfg = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    n_head, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = hidden // n_head
    rope = cfg["rope_parameters"]
    w = gguf.GGUFWriter(str(OUT / "tiny_gpt_neox.gguf"), arch="gptneox")
    w.add_name("tiny-gpt-neox")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(int(rope["partial_rotary_factor"] * head_dim))
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_head_count(n_head)
    w.add_parallel_residual(cfg["use_parallel_residual"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(cfg["vocab_size"])])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    names = {
        "input_layernorm": "attn_norm",
        "attention.query_key_value": "attn_qkv",
        "attention.dense": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.dense_h_to_4h": "ffn_up",
        "mlp.dense_4h_to_h": "ffn_down",
    }
    top = {"gpt_neox.embed_in.weight": "token_embd.weight",
           "gpt_neox.final_layer_norm.weight": "output_norm.weight",
           "gpt_neox.final_layer_norm.bias": "output_norm.bias",
           "embed_out.weight": "output.weight"}
    for hf_name in sorted(state):
        data = np.ascontiguousarray(state[hf_name], dtype=np.float32)
        if hf_name in top:
            name = top[hf_name]
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            name = f"blk.{layer}.{names[module]}.{suffix}"
            if module == "attention.query_key_value":
                grouped = data.reshape((n_head, 3, head_dim) + data.shape[1:])
                data = np.ascontiguousarray(np.concatenate(
                    [grouped[:, p].reshape((n_head * head_dim,) + data.shape[1:]) for p in range(3)]))
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_llama3_rope():
    """A weightless llama header plus the `rope_freqs` tensor llama.cpp's converter writes for
    Llama 3.1 scaling (factor 8, low/high freq factors 1/4, original context 8192): the reader
    must recover those parameters. transformers ignores this tensor, so the test asserts the
    parameters written here."""
    head_dim, theta = 128, 500000.0
    factor, low_freq_factor, high_freq_factor, original = 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen, high_wavelen = original / low_freq_factor, original / high_freq_factor
    divisors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            divisors.append(1.0)
        elif wavelen > low_wavelen:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    w = gguf.GGUFWriter(str(OUT / "llama3_rope.gguf"), arch="llama")
    w.add_context_length(131072)
    w.add_embedding_length(4 * head_dim)
    w.add_block_count(1)
    w.add_feed_forward_length(1024)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(128256)
    w.add_tensor("rope_freqs.weight", np.array(divisors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def transformers_reading(path):
    """Config and state dict exactly as transformers builds them from a GGUF file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The tensor half of `from_pretrained(..., gguf_file=...)` (which would also need accelerate):
    # a skeleton model only provides the GGUF->HF name map.
    skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    keys = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
            "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"]
    summary = {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}
    summary["rope_theta"] = rope_theta(config)
    scaling = rope_scaling(config)
    if scaling:
        summary["rope_scaling"] = scaling
    return summary, state


def rope_theta(config):
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    return theta


def rope_scaling(config):
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return None
    return {"rope_type": kind, "factor": params.get("factor")}


def make_smollm2_golden(path):
    """Slices of transformers' tensors for the real SmolLM2 GGUF (first 64 values of some rows)."""
    config, state = transformers_reading(Path(path))
    rows = {
        "model.embed_tokens.weight": [0, 1, 2, 3, 49151],
        "model.layers.0.mlp.gate_proj.weight": [7],
        "model.layers.0.self_attn.q_proj.weight": [0, 1, 32, 63, 575],
        "model.layers.0.self_attn.k_proj.weight": [0, 33, 191],
        "model.layers.0.self_attn.v_proj.weight": [191],
        "model.layers.29.self_attn.k_proj.weight": [40],
        "model.layers.29.mlp.down_proj.weight": [575],
        "model.layers.0.input_layernorm.weight": [None],
        "model.norm.weight": [None],
    }
    slices = []
    for name, wanted in rows.items():
        t = state[name].numpy()
        for r in wanted:
            values = t[:64] if r is None else t[r, :64]
            slices.append({"name": name, "row": r, "values": [float(v) for v in values]})
    shapes = {k: list(v.shape) for k, v in state.items()}
    golden = {"config": config, "n_tensors": len(state), "shapes": shapes, "slices": slices}
    (OUT / "smollm2_golden.json").write_text(json.dumps(golden) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", help="path to SmolLM2-135M-Instruct.Q4_1.gguf (optional)")
    ap.add_argument("--only-gpt-neox", action="store_true",
                    help="write tiny_gpt_neox.gguf alone, leaving the other fixtures as they are")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.only_gpt_neox:
        make_gpt_neox_from_hf()
        return
    rng = np.random.default_rng(20240611)
    make_all_types(rng)
    make_unsupported(rng)
    make_tiny_model(rng, "llama")
    make_tiny_model(rng, "qwen2")
    make_llama3_rope()
    make_qwen3_from_hf()
    make_gpt_neox_from_hf()
    if args.smollm2:
        make_smollm2_golden(args.smollm2)
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
