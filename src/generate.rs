//! Text generation: greedy or sampled (temperature, top-k, top-p, repetition penalty), with a
//! KV cache, stopping on EOS ids or stop strings, and a per-token callback for streaming.

use crate::error::{Error, Result};
use crate::models::{CausalLM, ForwardInput, LogitsMode};
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// false = greedy (argmax).
    pub do_sample: bool,
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 1.0 disables the penalty (transformers' RepetitionPenaltyLogitsProcessor).
    pub repetition_penalty: f32,
    pub seed: u64,
    pub eos_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 64,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            eos_token_ids: vec![],
            stop_strings: vec![],
        }
    }
}

impl GenerationConfig {
    pub fn validate(&self) -> Result<()> {
        if self.do_sample && !(self.temperature > 0.0) {
            return Err(Error::InvalidArgument(
                "temperature must be > 0 when sampling".into(),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument("top-p must be in (0, 1]".into()));
        }
        if !(self.repetition_penalty > 0.0) {
            return Err(Error::InvalidArgument(
                "repetition penalty must be > 0".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxNewTokens,
    Eos,
    StopString,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GenerationOutput {
    pub prompt_tokens: usize,
    /// The generated ids (including a final EOS id when one stopped generation).
    pub new_ids: Vec<u32>,
    pub stop_reason: StopReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl GenerationOutput {
    /// Decode throughput: tokens after the first per second of decoding.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let n = self.new_ids.len().saturating_sub(1);
        if self.decode_seconds > 0.0 {
            n as f64 / self.decode_seconds
        } else {
            0.0
        }
    }
}

/// Apply the repetition penalty in place: logits of tokens already seen are divided by the
/// penalty when positive and multiplied when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        if done.insert(id) {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Pick the next token from logits following transformers' processor order:
/// repetition penalty → temperature → top-k → top-p → sample.
pub fn sample_next(
    logits: &mut [f32],
    seen: &[u32],
    cfg: &GenerationConfig,
    rng: &mut impl Rng,
) -> u32 {
    apply_repetition_penalty(logits, seen, cfg.repetition_penalty);
    if !cfg.do_sample {
        return argmax(logits);
    }
    for l in logits.iter_mut() {
        *l /= cfg.temperature;
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    if cfg.top_k > 0 {
        order.truncate(cfg.top_k.max(1));
    }
    let max = logits[order[0] as usize];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i as usize] - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (always at least one token).
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= cfg.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let r: f64 = rng.gen();
    let mut cum = 0.0;
    for (i, p) in probs.iter().enumerate() {
        cum += p;
        if r < cum {
            return order[i];
        }
    }
    *order.last().expect("at least one candidate")
}

/// The prompt and every token asked for must fit the model's context: nothing is cut short
/// silently (docs/formats.md, "Config bounds").
fn check_length(model: &dyn CausalLM, prompt: usize, max_new_tokens: usize) -> Result<()> {
    let total = prompt.checked_add(max_new_tokens).ok_or_else(|| {
        Error::InvalidArgument(format!("max_new_tokens {max_new_tokens} is out of range"))
    })?;
    model.config().check_context(
        total,
        &format!("a prompt of {prompt} tokens plus max_new_tokens {max_new_tokens}"),
    )
}

/// Generate from `prompt_ids`. `on_token` is called with every new id and may return `true`
/// to stop (used for stop strings, which need the tokenizer).
pub fn generate(
    model: &dyn CausalLM,
    prompt_ids: &[u32],
    cfg: &GenerationConfig,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<GenerationOutput> {
    cfg.validate()?;
    if prompt_ids.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt is empty: generation needs at least one token".into(),
        ));
    }
    check_length(model, prompt_ids.len(), cfg.max_new_tokens)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut cache = model.new_cache(1);
    let mut seen = prompt_ids.to_vec();
    let mut new_ids = vec![];
    let t0 = Instant::now();
    let mut logits = model.forward(
        &ForwardInput::single(prompt_ids),
        &mut cache,
        LogitsMode::Last,
    )?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut stop_reason = StopReason::MaxNewTokens;
    while new_ids.len() < cfg.max_new_tokens {
        let next = sample_next(&mut logits, &seen, cfg, &mut rng);
        new_ids.push(next);
        seen.push(next);
        if cfg.eos_token_ids.contains(&next) {
            stop_reason = StopReason::Eos;
            break;
        }
        if on_token(next)? {
            stop_reason = StopReason::StopString;
            break;
        }
        if new_ids.len() == cfg.max_new_tokens {
            break;
        }
        logits = model.forward(&ForwardInput::single(&[next]), &mut cache, LogitsMode::Last)?;
    }
    Ok(GenerationOutput {
        prompt_tokens: prompt_ids.len(),
        new_ids,
        stop_reason,
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_follows_sign() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_head() {
        let cfg = GenerationConfig {
            do_sample: true,
            top_k: 1,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..20 {
            assert_eq!(
                sample_next(&mut vec![0.1, 3.0, 2.9, -1.0], &[], &cfg, &mut rng),
                1
            );
        }
        // Probabilities ~[0.64, 0.24, 0.09, ...]: top_p 0.5 keeps only the first.
        let cfg = GenerationConfig {
            do_sample: true,
            top_k: 0,
            top_p: 0.5,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(
                sample_next(&mut vec![3.0, 2.0, 1.0, 0.0], &[], &cfg, &mut rng),
                0
            );
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let cfg = GenerationConfig {
            do_sample: true,
            top_k: 0,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = [0usize; 2];
        for _ in 0..4000 {
            counts[sample_next(&mut vec![0.0, (3.0f32).ln()], &[], &cfg, &mut rng) as usize] += 1;
        }
        let frac = counts[1] as f64 / 4000.0;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
    }
}

/// Greedy or sampled generation for several prompts at once, left-padded to a common length
/// with an attention mask, as transformers' `generate` does for batches. Rows that reach EOS
/// are fed `pad_id` afterwards and their output stops at the EOS id.
pub fn generate_batch(
    model: &dyn CausalLM,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<u32>>> {
    cfg.validate()?;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::InvalidArgument(
            "every prompt needs at least one token".into(),
        ));
    }
    let batch = prompts.len();
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    check_length(model, t, cfg.max_new_tokens)?;
    let mut ids = Vec::with_capacity(batch * t);
    let mut mask: Vec<Vec<u8>> = vec![];
    for p in prompts {
        let pad = t - p.len();
        ids.extend(std::iter::repeat(pad_id).take(pad).chain(p.iter().copied()));
        mask.push(
            std::iter::repeat(0)
                .take(pad)
                .chain(std::iter::repeat(1).take(p.len()))
                .collect(),
        );
    }
    let vocab = model.config().vocab_size();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut cache = model.new_cache(batch);
    let input = ForwardInput {
        ids,
        batch,
        attention_mask: Some(mask.clone()),
        position_ids: None,
    };
    let mut logits = model.forward(&input, &mut cache, LogitsMode::Last)?;
    let mut seen: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Vec<u32>> = vec![vec![]; batch];
    let mut done = vec![false; batch];
    for step in 0..cfg.max_new_tokens {
        let mut next = vec![pad_id; batch];
        for b in 0..batch {
            if done[b] {
                continue;
            }
            let row = &mut logits[b * vocab..(b + 1) * vocab];
            let id = sample_next(row, &seen[b], cfg, &mut rng);
            next[b] = id;
            out[b].push(id);
            seen[b].push(id);
            done[b] = cfg.eos_token_ids.contains(&id);
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        for m in &mut mask {
            m.push(1);
        }
        let input = ForwardInput {
            ids: next,
            batch,
            attention_mask: Some(mask.clone()),
            position_ids: None,
        };
        logits = model.forward(&input, &mut cache, LogitsMode::Last)?;
    }
    Ok(out)
}
