//! Speed: prefill (one forward pass over `prompt_len` tokens, like llama-bench's pp512) and
//! greedy decode (`gen_len` tokens one at a time with a KV cache, like tg128).

use crate::error::Result;
use crate::models::{CausalLM, ForwardInput, LogitsMode};
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub prompt_len: usize,
    pub gen_len: usize,
    pub repetitions: usize,
    /// Compute logits for every prompt position, as perplexity does (llama-bench does not).
    pub all_logits: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prompt_len: 512,
            gen_len: 128,
            repetitions: 3,
            all_logits: false,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub prompt_len: usize,
    pub gen_len: usize,
    pub repetitions: usize,
    /// Best-of-repetitions throughput.
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    pub prefill_seconds: Vec<f64>,
    pub decode_seconds: Vec<f64>,
    pub footprint_bytes: usize,
    pub peak_rss_bytes: Option<u64>,
    pub threads: usize,
}

/// Deterministic pseudo-random token ids, so runs are comparable.
fn synthetic_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab.max(1) as u64) as u32
        })
        .collect()
}

pub fn bench(model: &dyn CausalLM, opts: &BenchOptions) -> Result<BenchResult> {
    let config = model.config();
    config.check_context(
        opts.prompt_len,
        &format!("--prompt-len {}", opts.prompt_len),
    )?;
    // Decoding starts from one token of context.
    config.check_context(
        opts.gen_len.saturating_add(1),
        &format!("--gen-len {}", opts.gen_len),
    )?;
    let vocab = config.vocab_size();
    let ids = synthetic_ids(opts.prompt_len.max(1), vocab);
    let mode = if opts.all_logits {
        LogitsMode::All
    } else {
        LogitsMode::Last
    };
    let (mut prefill, mut decode) = (vec![], vec![]);
    for _ in 0..opts.repetitions.max(1) {
        let mut cache = model.new_cache(1);
        let t0 = Instant::now();
        model.forward(&ForwardInput::single(&ids), &mut cache, mode)?;
        prefill.push(t0.elapsed().as_secs_f64());

        // Decode from a 1-token context so the measurement is the per-token cost at short range.
        let mut cache = model.new_cache(1);
        let mut logits = model.forward(
            &ForwardInput::single(&ids[..1]),
            &mut cache,
            LogitsMode::Last,
        )?;
        let t1 = Instant::now();
        for _ in 0..opts.gen_len {
            let next = crate::generate::argmax(&logits);
            logits = model.forward(&ForwardInput::single(&[next]), &mut cache, LogitsMode::Last)?;
        }
        decode.push(t1.elapsed().as_secs_f64());
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok(BenchResult {
        prompt_len: ids.len(),
        gen_len: opts.gen_len,
        repetitions: opts.repetitions.max(1),
        prefill_tokens_per_second: ids.len() as f64 / best(&prefill),
        decode_tokens_per_second: opts.gen_len as f64 / best(&decode),
        prefill_seconds: prefill,
        decode_seconds: decode,
        footprint_bytes: model.footprint_bytes(),
        peak_rss_bytes: super::memory::peak_rss_bytes(),
        threads: rayon::current_num_threads(),
    })
}
