//! Memory: the estimate from `config.json` alone, and the process's resident memory.

use crate::config::AutoConfig;
use crate::models::checkpoint_tensors;
use crate::qtypes::GroupSize;
use serde::Serialize;

/// Parameter counts by role, from the config (no weights needed).
#[derive(Clone, Debug, Serialize)]
pub struct ParamCounts {
    pub total: u64,
    /// Weights of the decoder blocks' linear layers: what GPTQ/AWQ/bnb quantize.
    pub block_linear_weights: u64,
    /// Token embeddings, and lm_head when it is not tied (kept in 16 bits by quantizers).
    pub embeddings_and_head: u64,
    /// Norms, biases and position tables.
    pub other: u64,
    /// Sum of `out_features` over the block linears and their `in_features` (for scale overhead).
    #[serde(skip)]
    linear_shapes: Vec<(u64, u64)>,
}

pub fn count_parameters(config: &AutoConfig) -> ParamCounts {
    let mut c = ParamCounts {
        total: 0,
        block_linear_weights: 0,
        embeddings_and_head: 0,
        other: 0,
        linear_shapes: vec![],
    };
    let conv1d = crate::models::family(config).conv1d_weights();
    for (name, shape) in checkpoint_tensors(config) {
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        c.total += n;
        let in_block = crate::models::block_of(config, &name).is_some();
        if in_block && name.ends_with(".weight") && shape.len() == 2 {
            c.block_linear_weights += n;
            let (out, inp) = if conv1d {
                (shape[1], shape[0])
            } else {
                (shape[0], shape[1])
            };
            c.linear_shapes.push((out as u64, inp as u64));
        } else if name.contains("embed_tokens")
            || name == "transformer.wte.weight"
            || name == "lm_head.weight"
            || name == "gpt_neox.embed_in.weight"
            || name == "embed_out.weight"
        {
            c.embeddings_and_head += n;
        } else {
            c.other += n;
        }
    }
    c
}

#[derive(Clone, Debug, Serialize)]
pub struct EstimateRow {
    pub scheme: String,
    pub bytes: u64,
    pub bits_per_block_weight: f64,
    pub explanation: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    pub model_type: String,
    pub params: ParamCounts,
    pub rows: Vec<EstimateRow>,
}

pub fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Bytes for every storage scheme. Quantized schemes keep embeddings, lm_head and norms in
/// 16 bits, as GPTQ/AWQ/bitsandbytes checkpoints do.
pub fn estimate(config: &AutoConfig, group_size: GroupSize) -> Estimate {
    let p = count_parameters(config);
    let mut rows = vec![];
    for (name, bytes) in [("f32", 4u64), ("f16", 2), ("bf16", 2)] {
        let total = p.total * bytes;
        rows.push(EstimateRow {
            scheme: name.into(),
            bytes: total,
            bits_per_block_weight: (bytes * 8) as f64,
            explanation: format!(
                "{} params × {bytes} bytes = {total} bytes = {:.3} GB = {:.3} GiB",
                p.total,
                gb(total),
                gib(total)
            ),
        });
    }
    let unquantized = (p.embeddings_and_head + p.other) * 2;
    // int8: one f16 scale per output row (LLM.int8 / per-channel).
    let int8_scales: u64 = p.linear_shapes.iter().map(|(o, _)| o * 2).sum();
    let int8 = p.block_linear_weights + int8_scales + unquantized;
    rows.push(EstimateRow {
        scheme: "int8".into(),
        bytes: int8,
        bits_per_block_weight: (p.block_linear_weights * 8 + int8_scales * 8) as f64 / p.block_linear_weights.max(1) as f64,
        explanation: format!(
            "{} block-linear weights × 1 byte + {} bytes of per-row f16 scales + {} other params × 2 bytes (f16) = {int8} bytes = {:.3} GB = {:.3} GiB",
            p.block_linear_weights,
            int8_scales,
            p.embeddings_and_head + p.other,
            gb(int8),
            gib(int8)
        ),
    });
    // int4 GPTQ layout: 4-bit codes, per group an f16 scale and a 4-bit zero, an int32 g_idx per input.
    let mut overhead = 0u64;
    for &(o, i) in &p.linear_shapes {
        let groups = match group_size.size() {
            Some(g) if g > 0 => i.div_ceil(g as u64),
            _ => 1,
        };
        overhead += groups * o * 2 + groups * o / 2 + i * 4;
    }
    let int4 = p.block_linear_weights / 2 + overhead + unquantized;
    rows.push(EstimateRow {
        scheme: format!("int4-g{group_size}"),
        bytes: int4,
        bits_per_block_weight: (p.block_linear_weights * 4 + overhead * 8) as f64 / p.block_linear_weights.max(1) as f64,
        explanation: format!(
            "{} block-linear weights × 0.5 byte + {overhead} bytes of scales/zeros/g_idx + {} other params × 2 bytes = {int4} bytes = {:.3} GB = {:.3} GiB",
            p.block_linear_weights,
            p.embeddings_and_head + p.other,
            gb(int4),
            gib(int4)
        ),
    });
    Estimate {
        model_type: config.model_type.clone(),
        params: p,
        rows,
    }
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Peak resident set size of this process so far, in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Give the heap's free pages back to the system. glibc raises its mmap threshold after the
/// first large `free`, so later large buffers come from per-thread arenas that keep their freed
/// pages: without this, a streamed run's RSS climbs over its first blocks to well above the
/// memory it uses. Called once per streamed block; its cost is the next block faulting those
/// pages in again (~60 ms per block on tests/gptq_stream.rs's toy model, small next to a real
/// block's work). A no-op off glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages to the kernel; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Current resident set size in bytes (Linux `VmRSS`).
pub fn current_rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn smollm2_parameter_count_matches_published_size() {
        // SmolLM2-135M: 30 layers, hidden 576, FFN 1536, 9 heads / 3 kv heads, vocab 49152, tied.
        let cfg = AutoConfig::from_value(
            json!({"model_type":"llama","vocab_size":49152,"hidden_size":576,"intermediate_size":1536,
                "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"tie_word_embeddings":true}),
            std::path::Path::new("config.json"),
            None,
        )
        .unwrap();
        let p = count_parameters(&cfg);
        // Hand count: embed 49152*576 = 28,311,552; per layer q 576*576 + k,v 2*192*576 + o 576*576
        // + 3*576*1536 + 2*576 norms = 3,540,096; ×30 = 106,202,880; final norm 576.
        assert_eq!(p.total, 28_311_552 + 106_202_880 + 576);
        assert_eq!(p.embeddings_and_head, 28_311_552);
        let e = estimate(&cfg, crate::qtypes::GroupSize::Size(128));
        assert_eq!(e.rows[0].bytes, p.total * 4);
    }
}
