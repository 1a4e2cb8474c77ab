//! Perplexity with the three protocols users compare against:
//! - `paper` (GPTQ/AWQ `datautils`): tokenize once, non-overlapping windows of `seqlen`, each
//!   scoring its `seqlen - 1` next-token targets;
//! - `stride` (transformers docs): sliding windows of `seqlen` moved by `stride`, scoring only
//!   the targets not scored by the previous window;
//! - `llama.cpp` (`llama-perplexity`): non-overlapping windows, only the second half scored,
//!   the first token replaced by BOS when the tokenizer adds one.

use crate::error::{Error, Result};
use crate::kernels::logsumexp;
use crate::models::{CausalLM, ForwardInput, LogitsMode};
use rayon::prelude::*;
use std::time::Instant;

#[derive(Clone, Debug, PartialEq)]
pub enum Protocol {
    Paper,
    Stride { stride: usize },
    LlamaCpp { bos: Option<u32> },
}

impl Protocol {
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Paper => "paper",
            Protocol::Stride { .. } => "stride",
            Protocol::LlamaCpp { .. } => "llama.cpp",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PplOptions {
    pub seqlen: usize,
    pub protocol: Protocol,
    pub max_windows: Option<usize>,
    /// Feed each window one token at a time through the KV cache, as generation does: the
    /// perplexity of the decoding arithmetic (e.g. `FourBitDecode`) instead of the prefill's.
    pub token_by_token: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PplResult {
    pub protocol: String,
    pub seqlen: usize,
    pub stride: Option<usize>,
    pub tokenizer: String,
    pub text_tokens: usize,
    pub windows: usize,
    pub scored_tokens: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
    pub window_mean_nll: Vec<f64>,
    pub token_by_token: bool,
    pub seconds: f64,
    /// Tokens run through the model per second (all window tokens, scored or not).
    pub tokens_per_second: f64,
}

/// A window to run: `ids[start..end]`, scoring targets at positions `score_from..` (a target at
/// window position `j` is predicted by the logits at `j - 1`).
#[derive(Debug)]
struct Window {
    start: usize,
    end: usize,
    score_from: usize,
}

fn plan(n: usize, opts: &PplOptions) -> Result<Vec<Window>> {
    let s = opts.seqlen;
    if s < 2 {
        return Err(Error::InvalidArgument("seqlen must be at least 2".into()));
    }
    let mut w = vec![];
    match &opts.protocol {
        Protocol::Paper | Protocol::LlamaCpp { .. } => {
            let first = if matches!(opts.protocol, Protocol::Paper) {
                1
            } else {
                s / 2 + 1
            };
            for i in 0..n / s {
                w.push(Window {
                    start: i * s,
                    end: (i + 1) * s,
                    score_from: first,
                });
            }
        }
        Protocol::Stride { stride } => {
            if *stride == 0 || *stride > s {
                return Err(Error::InvalidArgument(format!("stride must be in 1..={s}")));
            }
            let mut prev_end = 0;
            let mut begin = 0;
            while begin < n {
                let end = (begin + s).min(n);
                let trg_len = end - prev_end;
                // Targets are the last trg_len tokens of the window, except position 0.
                let score_from = (end - begin - trg_len).max(1);
                w.push(Window {
                    start: begin,
                    end,
                    score_from,
                });
                prev_end = end;
                if end == n {
                    break;
                }
                begin += stride;
            }
        }
    }
    if let Some(k) = opts.max_windows {
        w.truncate(k);
    }
    if w.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the text has {n} tokens, too few for one window of {s} (use a smaller --seqlen or more text)"
        )));
    }
    Ok(w)
}

/// Perplexity of `model` on the token ids of a whole text.
pub fn perplexity(
    model: &dyn CausalLM,
    ids: &[u32],
    tokenizer_name: &str,
    opts: &PplOptions,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<PplResult> {
    model
        .config()
        .check_context(opts.seqlen, &format!("--seqlen {}", opts.seqlen))?;
    let windows = plan(ids.len(), opts)?;
    let vocab = model.config().vocab_size();
    let t0 = Instant::now();
    let (mut total_nll, mut scored, mut run_tokens) = (0f64, 0usize, 0usize);
    let mut window_mean_nll = vec![];
    for (wi, w) in windows.iter().enumerate() {
        let mut input = ids[w.start..w.end].to_vec();
        if let Protocol::LlamaCpp { bos: Some(b) } = opts.protocol {
            input[0] = b;
        }
        let mut cache = model.new_cache(1);
        let logits = if opts.token_by_token {
            let mut all = Vec::with_capacity(input.len() * vocab);
            for t in &input {
                let step = ForwardInput::single(std::slice::from_ref(t));
                all.extend(model.forward(&step, &mut cache, LogitsMode::Last)?);
            }
            all
        } else {
            model.forward(&ForwardInput::single(&input), &mut cache, LogitsMode::All)?
        };
        let count = input.len() - w.score_from;
        let nll: f64 = (w.score_from..input.len())
            .into_par_iter()
            .map(|j| {
                let row = &logits[(j - 1) * vocab..j * vocab];
                logsumexp(row) - row[ids[w.start + j] as usize] as f64
            })
            .sum();
        if !nll.is_finite() {
            return Err(Error::Other(format!(
                "non-finite loss in window {wi} (tokens {}..{})",
                w.start, w.end
            )));
        }
        total_nll += nll;
        scored += count;
        run_tokens += input.len();
        window_mean_nll.push(nll / count.max(1) as f64);
        progress(wi + 1, windows.len(), (total_nll / scored as f64).exp());
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mean_nll = total_nll / scored as f64;
    Ok(PplResult {
        protocol: opts.protocol.name().into(),
        seqlen: opts.seqlen,
        stride: match opts.protocol {
            Protocol::Stride { stride } => Some(stride),
            _ => None,
        },
        tokenizer: tokenizer_name.into(),
        text_tokens: ids.len(),
        windows: windows.len(),
        scored_tokens: scored,
        mean_nll,
        perplexity: mean_nll.exp(),
        window_mean_nll,
        token_by_token: opts.token_by_token,
        seconds,
        tokens_per_second: run_tokens as f64 / seconds.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_windows_score_seqlen_minus_one() {
        let w = plan(
            1030,
            &PplOptions {
                seqlen: 512,
                protocol: Protocol::Paper,
                max_windows: None,
                token_by_token: false,
            },
        )
        .unwrap();
        assert_eq!(w.len(), 2);
        assert!(w.iter().all(|w| w.end - w.start - w.score_from == 511));
    }

    #[test]
    fn llama_cpp_scores_second_half() {
        let w = plan(
            1024,
            &PplOptions {
                seqlen: 512,
                protocol: Protocol::LlamaCpp { bos: None },
                max_windows: None,
                token_by_token: false,
            },
        )
        .unwrap();
        assert!(w.iter().all(|w| w.end - w.start - w.score_from == 255));
    }

    #[test]
    fn stride_scores_every_target_once() {
        let n = 1000;
        let w = plan(
            n,
            &PplOptions {
                seqlen: 512,
                protocol: Protocol::Stride { stride: 256 },
                max_windows: None,
                token_by_token: false,
            },
        )
        .unwrap();
        let mut scored = vec![0; n];
        for w in &w {
            for j in w.score_from..w.end - w.start {
                scored[w.start + j] += 1;
            }
        }
        assert_eq!(scored[0], 0);
        assert!(scored[1..].iter().all(|&c| c == 1));
    }

    #[test]
    fn too_short_text_is_an_error() {
        let e = plan(
            100,
            &PplOptions {
                seqlen: 512,
                protocol: Protocol::Paper,
                max_windows: None,
                token_by_token: false,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("100 tokens"));
    }
}
