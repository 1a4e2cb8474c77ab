//! Calibration data for GPTQ and AWQ: token windows sampled from a text the way the GPTQ
//! reference does (Python's `random.seed(seed)` then `randint(0, len - seqlen - 1)` per sample,
//! reproduced bit for bit so both tools see the same windows), or one sample per document.

use crate::error::{Error, Result};
use crate::tokenizer::AutoTokenizer;
use std::path::{Path, PathBuf};

/// How documents become samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalibMode {
    /// Tokenize all documents joined by blank lines, then cut random `seqlen` windows.
    Windows,
    /// One sample per document (JSON-lines record), truncated to `seqlen`.
    Records,
    /// AutoAWQ's default: up to `nsamples` documents of at most `seqlen` tokens (longer ones
    /// are skipped), concatenated and cut into blocks of `seqlen`.
    Blocks,
}

#[derive(Clone, Debug)]
pub struct CalibOptions {
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
    /// `None`: records for `.jsonl`, windows otherwise.
    pub mode: Option<CalibMode>,
}

/// Most calibration tokens (`nsamples × seqlen`) accepted: 64 times the GPTQ default of 128
/// windows of 2048, and already activations of gigabytes per block for a large model. Checked
/// before any text is read or any window allocated.
pub const MAX_CALIB_TOKENS: usize = 1 << 24;

impl CalibOptions {
    /// At least one sample of two tokens, and at most [`MAX_CALIB_TOKENS`] in all.
    pub fn validate(&self) -> Result<()> {
        if self.nsamples == 0 || self.seqlen < 2 {
            return Err(Error::InvalidArgument(format!(
                "need at least one sample of at least 2 tokens (--nsamples {}, --seqlen {})",
                self.nsamples, self.seqlen
            )));
        }
        match self.nsamples.checked_mul(self.seqlen) {
            Some(n) if n <= MAX_CALIB_TOKENS => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "--nsamples {} × --seqlen {} calibration tokens is more than the {} accepted",
                self.nsamples, self.seqlen, MAX_CALIB_TOKENS
            ))),
        }
    }
}

impl Default for CalibOptions {
    fn default() -> Self {
        CalibOptions {
            nsamples: 128,
            seqlen: 2048,
            seed: 0,
            mode: None,
        }
    }
}

/// Tokenized calibration samples plus what to record about where they came from.
#[derive(Clone, Debug)]
pub struct CalibData {
    pub samples: Vec<Vec<u32>>,
    /// Human-readable origin, e.g. `news.txt (windows of 2048, seed 0)`.
    pub description: String,
    /// sha256 of the source text, so `ppl` can warn when evaluating on calibration data.
    pub sha256: Option<String>,
    /// Problems worth telling the user about (also printed when the data is built).
    pub warnings: Vec<String>,
}

impl CalibData {
    pub fn num_tokens(&self) -> usize {
        self.samples.iter().map(Vec::len).sum()
    }

    /// Calibration from a file: plain or WikiText-style text, or JSON lines with a `text` field.
    pub fn from_file(path: &Path, tokenizer: &AutoTokenizer, opts: &CalibOptions) -> Result<Self> {
        opts.validate()?;
        let docs = crate::text::load_records(path)?;
        let is_jsonl = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("jsonl" | "json")
        );
        let mode = opts.mode.unwrap_or(if is_jsonl {
            CalibMode::Records
        } else {
            CalibMode::Windows
        });
        // Blocks count documents; in plain text each non-empty line is one.
        let docs: Vec<String> = if mode == CalibMode::Blocks && !is_jsonl {
            docs.iter()
                .flat_map(|d| d.lines())
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect()
        } else {
            docs
        };
        let bytes = crate::error::read_file(path)?;
        let mut data = Self::from_texts(&docs, tokenizer, opts, mode)
            .map_err(|e| Error::InvalidArgument(format!("calibration {}: {e}", path.display())))?;
        data.description = format!("{} ({})", file_name(path), data.description);
        data.sha256 = Some(crate::fsutil::sha256_hex(&bytes));
        Ok(data)
    }

    /// Calibration from strings (library API).
    pub fn from_texts(
        docs: &[String],
        tokenizer: &AutoTokenizer,
        opts: &CalibOptions,
        mode: CalibMode,
    ) -> Result<Self> {
        opts.validate()?;
        if docs.iter().all(|d| d.trim().is_empty()) {
            return Err(Error::InvalidArgument(
                "the calibration data is empty".into(),
            ));
        }
        let mut warnings = vec![];
        let (samples, description) = match mode {
            CalibMode::Windows => {
                let ids = tokenizer.encode(&docs.join("\n\n"), true)?;
                let samples = sample_windows(&ids, opts.nsamples, opts.seqlen, opts.seed)?;
                let distinct = ids.len() / opts.seqlen;
                if distinct < opts.nsamples {
                    warnings.push(format!(
                        "the text has {} tokens, room for only {distinct} non-overlapping windows of \
                         {}; the {} sampled windows overlap, so calibration sees less variety \
                         than asked",
                        ids.len(),
                        opts.seqlen,
                        opts.nsamples
                    ));
                }
                (
                    samples,
                    format!(
                        "{} random windows of {} tokens, seed {}",
                        opts.nsamples, opts.seqlen, opts.seed
                    ),
                )
            }
            CalibMode::Records => {
                let mut samples = vec![];
                for d in docs.iter().filter(|d| !d.trim().is_empty()) {
                    if samples.len() == opts.nsamples {
                        break;
                    }
                    let mut ids = tokenizer.encode(d, true)?;
                    ids.truncate(opts.seqlen);
                    if ids.len() >= 2 {
                        samples.push(ids);
                    }
                }
                if samples.is_empty() {
                    return Err(Error::InvalidArgument(
                        "no record has two or more tokens".into(),
                    ));
                }
                if samples.len() < opts.nsamples {
                    warnings.push(format!(
                        "only {} usable records for the {} samples asked",
                        samples.len(),
                        opts.nsamples
                    ));
                }
                let n = samples.len();
                (
                    samples,
                    format!("{n} records of at most {} tokens", opts.seqlen),
                )
            }
            CalibMode::Blocks => {
                let mut all = vec![];
                let mut used = 0;
                for d in docs.iter().map(|d| d.trim()).filter(|d| !d.is_empty()) {
                    if used == opts.nsamples {
                        break;
                    }
                    let ids = tokenizer.encode(d, true)?;
                    if ids.len() <= opts.seqlen {
                        all.extend(ids);
                        used += 1;
                    }
                }
                let samples: Vec<Vec<u32>> =
                    all.chunks_exact(opts.seqlen).map(<[u32]>::to_vec).collect();
                if samples.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "{used} documents of at most {} tokens give {} tokens, less than one \
                         block of {}",
                        opts.seqlen,
                        all.len(),
                        opts.seqlen
                    )));
                }
                if used < opts.nsamples {
                    warnings.push(format!(
                        "only {used} documents of at most {} tokens for the {} asked",
                        opts.seqlen, opts.nsamples
                    ));
                }
                let n = samples.len();
                (
                    samples,
                    format!(
                        "{used} documents of at most {} tokens in {n} blocks of {}",
                        opts.seqlen, opts.seqlen
                    ),
                )
            }
        };
        Ok(CalibData {
            samples,
            description,
            sha256: None,
            warnings,
        })
    }

    /// Token windows saved as JSON (`[[ids...], ...]`, or `{"windows": [...]}` as the reference
    /// runner script writes them),
    /// so both implementations calibrate on identical inputs.
    pub fn from_windows_json(path: &Path) -> Result<Self> {
        let mut v = crate::error::read_json(path)?;
        // The reference runner wraps the windows with a note of how they were made.
        if let Some(w) = v.get_mut("windows") {
            v = w.take();
        }
        let samples: Vec<Vec<u32>> = serde_json::from_value(v).map_err(|e| {
            Error::format(
                path,
                format!(
                    "expected a JSON array of token-id arrays (or {{\"windows\": [...]}}): {e}"
                ),
            )
        })?;
        if samples.is_empty() || samples.iter().any(|s| s.len() < 2) {
            return Err(Error::format(
                path,
                "needs at least one window of two or more tokens",
            ));
        }
        let n = samples.len();
        Ok(CalibData {
            samples,
            description: format!("{} ({n} saved windows)", file_name(path)),
            sha256: None,
            warnings: vec![],
        })
    }

    /// Warn when the data is thin for the layers it must calibrate: a Hessian of a layer with
    /// `k` inputs has rank at most the number of calibration tokens.
    pub fn check_against(&mut self, max_in_features: usize) {
        let tokens = self.num_tokens();
        if tokens < 4 * max_in_features {
            self.warnings.push(format!(
                "{tokens} calibration tokens for layers with up to {max_in_features} inputs: \
                 the Hessian estimate is poor below ~{} tokens; GPTQ will overfit these samples",
                4 * max_in_features
            ));
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| PathBuf::from(path).display().to_string())
}

/// `nsamples` windows of `seqlen` tokens at offsets drawn as the GPTQ reference draws them.
pub fn sample_windows(
    ids: &[u32],
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if ids.len() <= seqlen {
        return Err(Error::InvalidArgument(format!(
            "the text has {} tokens, too few for one window of {seqlen} (+1); use a longer text \
             or a smaller --seqlen",
            ids.len()
        )));
    }
    let mut rng = PyRandom::seed(seed);
    (0..nsamples)
        .map(|_| {
            let start = rng.randint(0, (ids.len() - seqlen - 1) as u64)? as usize;
            Ok(ids[start..start + seqlen].to_vec())
        })
        .collect()
}

/// Python's `random.Random` (MT19937 seeded by `init_by_array`), enough of it for `randint`.
pub struct PyRandom {
    state: [u32; 624],
    index: usize,
}

impl PyRandom {
    /// `random.seed(seed)` for a non-negative integer seed.
    pub fn seed(seed: u64) -> Self {
        let mut key: Vec<u32> = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut r = PyRandom {
            state: [0; 624],
            index: 624,
        };
        r.init_genrand(19_650_218);
        let mt = &mut r.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..624.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..623 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.state[0] = s;
        for i in 1..624 {
            let prev = self.state[i - 1];
            self.state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = 624;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.state[i] = v;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random.randint(a, b)`: `a + _randbelow(b - a + 1)` by rejection on `getrandbits`.
    pub fn randint(&mut self, a: u64, b: u64) -> Result<u64> {
        let n = b - a + 1;
        let k = 64 - n.leading_zeros();
        if k > 32 {
            return Err(Error::InvalidArgument(format!(
                "range {n} is too large for the calibration sampler"
            )));
        }
        loop {
            let r = (self.next_u32() >> (32 - k)) as u64;
            if r < n {
                return Ok(a + r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python_random() {
        // python3 -c "import random; random.seed(0); print([random.randint(0, 281609 - 2048 - 1) for _ in range(5)])"
        let mut r = PyRandom::seed(0);
        let got: Vec<u64> = (0..5)
            .map(|_| r.randint(0, 281_609 - 2048 - 1).unwrap())
            .collect();
        assert_eq!(got, [201979, 220500, 21225, 135746, 268055]);
        let mut r = PyRandom::seed(7);
        let got: Vec<u64> = (0..5).map(|_| r.randint(0, 100).unwrap()).collect();
        assert_eq!(got, [41, 19, 50, 83, 6]);
        // A seed wider than 32 bits takes the two-word key path.
        let mut r = PyRandom::seed((1 << 40) + 3);
        let got: Vec<u64> = (0..3).map(|_| r.randint(0, 1000).unwrap()).collect();
        assert_eq!(got, [225, 62, 562]);
    }

    #[test]
    fn too_short_text_is_an_error() {
        let err = sample_windows(&[1, 2, 3], 4, 3, 0).unwrap_err().to_string();
        assert!(err.contains("too few"), "{err}");
        assert_eq!(sample_windows(&[1, 2, 3, 4], 2, 3, 0).unwrap().len(), 2);
    }
}
