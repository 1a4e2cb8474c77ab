//! bitsandbytes quantization of a loaded model: every eligible linear layer to NF4/FP4 or
//! LLM.int8 (the numerics in [`crate::qtypes::bnb`]), written as transformers + bitsandbytes
//! save it (the tensor layout in [`crate::checkpoint::bnb`]), and the memory report.

use crate::error::{Error, Result};
use crate::qtypes::bnb::*;
use crate::tensor::WeightDType;

// ---------------------------------------------------------------------------------------------
// Saving and the memory report

/// Options for [`quantize_checkpoint`].
#[derive(Clone, Debug)]
pub struct BnbSaveOptions {
    /// Method: `load_in_4bit` (quant type, double quant, blocksize) or `load_in_8bit`;
    /// `skip_modules` are kept dense and written to `llm_int8_skip_modules`.
    pub config: BitsAndBytesConfig,
    /// Dtype of every float tensor written (embeddings, norms, biases, skipped layers), and the
    /// dtype weights are rounded to before quantization (the quant state's `dtype`), as when
    /// transformers loads a model in that dtype and quantizes it.
    pub dtype: WeightDType,
    pub max_shard_bytes: u64,
    pub overwrite: bool,
}

impl Default for BnbSaveOptions {
    fn default() -> Self {
        BnbSaveOptions {
            config: BitsAndBytesConfig::four_bit(FourBitType::Nf4, false),
            dtype: WeightDType::F32,
            max_shard_bytes: 5_000_000_000,
            overwrite: false,
        }
    }
}

/// What [`quantize_checkpoint`] did.
#[derive(Clone, Debug)]
pub struct BnbSaveReport {
    pub dir: std::path::PathBuf,
    pub quantized_layers: usize,
    pub skipped_layers: Vec<String>,
    pub memory: BnbMemoryReport,
}

/// Quantize every eligible linear layer of a dense model and write a folder that transformers
/// (with bitsandbytes) and autoquant load: `config.json` with `quantization_config`,
/// `generation_config.json`, tokenizer files, and safetensors holding the tensors exactly as
/// `Linear4bit` / `Linear8bitLt` serialize them (docs/formats.md §3). Written atomically.
///
/// The model should be loaded dense (its linears' `to_f32` are the weights quantized).
pub fn quantize_checkpoint(
    model: &dyn crate::models::CausalLM,
    tokenizer: Option<&crate::tokenizer::AutoTokenizer>,
    generation: Option<&crate::generate::GenerationConfig>,
    dir: &std::path::Path,
    opts: &BnbSaveOptions,
) -> Result<BnbSaveReport> {
    opts.config.validate()?;
    let (tensors, report) = quantized_state_dict(model, opts)?;
    let out = crate::fsutil::AtomicDir::with_overwrite(dir, opts.overwrite)?;
    crate::auto::write_model_files(
        out.path(),
        model.config(),
        opts.dtype,
        Some(opts.config.to_quantization_config()),
        tokenizer,
        generation,
    )?;
    crate::formats::safetensors::save_safetensors_in_memory(
        out.path(),
        &tensors,
        opts.max_shard_bytes,
        &Default::default(),
    )?;
    let dir = out.commit()?;
    Ok(BnbSaveReport { dir, ..report })
}

/// Every tensor of the quantized checkpoint (sorted by name) and the report, without writing.
pub fn quantized_state_dict(
    model: &dyn crate::models::CausalLM,
    opts: &BnbSaveOptions,
) -> Result<(Vec<(String, crate::tensor::RawTensor)>, BnbSaveReport)> {
    use crate::checkpoint::bnb::{four_bit_tensors, int8_tensors};
    use rayon::prelude::*;
    opts.config.validate()?;
    let cfg = &opts.config;
    let mut tensors: Vec<(String, crate::tensor::RawTensor)> =
        crate::models::state_dict(model, opts.dtype)
            .into_iter()
            .collect();
    let linears = model.linears();
    let chosen: Vec<&crate::models::LinearRef> =
        linears.iter().filter(|l| !cfg.skips(&l.name)).collect();
    let skipped: Vec<String> = linears
        .iter()
        .filter(|l| cfg.skips(&l.name))
        .map(|l| l.name.clone())
        .collect();
    // (layer, its tensors, bytes held, weights)
    type Quantized = (
        String,
        Vec<(String, crate::tensor::RawTensor)>,
        usize,
        usize,
    );
    let quantized: Vec<Quantized> = chosen
        .par_iter()
        .map(|l| -> Result<_> {
            let (n, k) = (l.linear.out_features(), l.linear.in_features());
            let w: Vec<f32> = l
                .linear
                .weight
                .to_f32()
                .into_iter()
                .map(|v| opts.dtype.round(v))
                .collect();
            let err =
                |e: Error| Error::InvalidArgument(format!("quantizing `{}.weight`: {e}", l.name));
            let (ts, bytes) = if cfg.load_in_8bit {
                let q = quantize_int8(&w, n, k).map_err(err)?;
                let bytes = q.codes.len() + 4 * q.scb.len();
                (int8_tensors(&l.name, &q), bytes)
            } else {
                let q = quantize_4bit(
                    &w,
                    [n, k],
                    opts.dtype,
                    cfg.quant_type,
                    cfg.blocksize,
                    cfg.double_quant,
                )
                .map_err(err)?;
                (four_bit_tensors(&l.name, &q), q.storage_bytes())
            };
            Ok((l.name.clone(), ts, bytes, n * k))
        })
        .collect::<Result<_>>()?;
    let mut q_bytes = 0u64;
    let mut q_params = 0u64;
    for (name, ts, bytes, params) in quantized {
        let weight = format!("{name}.weight");
        tensors.retain(|(n, _)| n != &weight);
        tensors.extend(ts);
        q_bytes += bytes as u64;
        q_params += params as u64;
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    // Quantized weights were replaced above, so what is not quantization state is dense.
    let dense_bytes: u64 = tensors
        .iter()
        .filter(|(n, _)| !is_quant_tensor(n))
        .map(|(_, t)| t.data.len() as u64)
        .sum();
    let memory = BnbMemoryReport::from_counts(
        cfg.method_name(),
        q_params,
        q_bytes,
        dense_bytes,
        model.num_parameters() as u64,
        opts.dtype,
    );
    Ok((
        tensors,
        BnbSaveReport {
            dir: std::path::PathBuf::new(),
            quantized_layers: chosen.len(),
            skipped_layers: skipped,
            memory,
        },
    ))
}

/// Tensors that belong to a quantized layer's state rather than to dense parameters.
fn is_quant_tensor(name: &str) -> bool {
    name.ends_with(".SCB")
        || name.ends_with(".weight_format")
        || name.contains(".weight.absmax")
        || name.contains(".weight.quant_map")
        || name.contains(".weight.nested_")
        || name.contains(".weight.quant_state.")
}

/// Footprint before and after quantization, explained.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BnbMemoryReport {
    /// "bnb-nf4", "bnb-nf4-dq", "bnb-int8", …
    pub method: String,
    /// Weights of the quantized linear layers.
    pub quantized_params: u64,
    /// Bytes those layers hold: codes plus statistics (absmax / nested absmax / maps / SCB).
    pub quantized_bytes: u64,
    /// `8 · quantized_bytes / quantized_params`, statistics included (≈4.5 NF4, ≈4.127 NF4+DQ at
    /// blocksize 64, ≈8.06 int8 for 512 input features).
    pub bits_per_param: f64,
    /// Everything else (embeddings, norms, skipped layers, biases) in its dense dtype.
    pub dense_bytes: u64,
    /// All parameters stored densely in the reference dtype.
    pub bytes_before: u64,
    /// Quantized layers + dense rest.
    pub bytes_after: u64,
    pub explanation: String,
}

impl BnbMemoryReport {
    fn from_counts(
        method: String,
        quantized_params: u64,
        quantized_bytes: u64,
        dense_bytes: u64,
        total_params: u64,
        dtype: WeightDType,
    ) -> Self {
        let bits = if quantized_params == 0 {
            0.0
        } else {
            8.0 * quantized_bytes as f64 / quantized_params as f64
        };
        let before = total_params * dtype.bytes() as u64;
        let after = quantized_bytes + dense_bytes;
        let explanation = format!(
            "{method}: {:.2}M weights in quantized layers at {bits:.3} bits each (codes plus \
             block statistics) = {:.1} MiB; the other {:.2}M parameters stay {} = {:.1} MiB; \
             total {:.1} MiB after vs {:.1} MiB with everything in {} ({:.2}x smaller)",
            quantized_params as f64 / 1e6,
            mib(quantized_bytes),
            total_params.saturating_sub(quantized_params) as f64 / 1e6,
            dtype.name(),
            mib(dense_bytes),
            mib(after),
            mib(before),
            dtype.name(),
            before as f64 / after.max(1) as f64,
        );
        BnbMemoryReport {
            method,
            quantized_params,
            quantized_bytes,
            bits_per_param: bits,
            dense_bytes,
            bytes_before: before,
            bytes_after: after,
            explanation,
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// The memory report of a loaded model: layers whose storage is a bitsandbytes kernel count as
/// quantized; "before" is every parameter in f32 (what the model takes loaded without
/// quantization at the default dtype).
pub fn memory_report(model: &dyn crate::models::CausalLM) -> BnbMemoryReport {
    let mut q_params = 0u64;
    let mut q_bytes = 0u64;
    let mut method = String::from("none");
    // bitsandbytes never quantizes lm_head; an int8 one is `--lm-head-int8`, not the method.
    for l in model
        .linears()
        .into_iter()
        .filter(|l| l.name != "lm_head" && l.name != "embed_out")
    {
        let name = l.linear.weight.storage_name();
        if name.starts_with("bnb-") {
            q_params += (l.linear.in_features() * l.linear.out_features()) as u64;
            q_bytes += l.linear.weight.storage_bytes() as u64;
            method = name;
        }
    }
    let after = model.footprint_bytes() as u64;
    let dense = after.saturating_sub(q_bytes);
    let mut r = BnbMemoryReport::from_counts(
        method,
        q_params,
        q_bytes,
        dense,
        model.num_parameters() as u64,
        WeightDType::F32,
    );
    r.bytes_after = after;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp4_table_is_the_raw_values_over_12() {
        assert_eq!(FP4_CODE[1], 0.0625f32 / 12.0);
        assert!(FP4_CODE[8] == 0.0 && FP4_CODE[8].is_sign_positive());
        assert_eq!(FP4_CODE[11], -1.0);
    }

    #[test]
    fn bits_per_weight_match_the_documented_figures() {
        assert_eq!(four_bit_bits_per_weight(64, false), 4.5);
        let dq = four_bit_bits_per_weight(64, true);
        assert!((dq - 4.127).abs() < 1e-3, "{dq}");
    }

    #[test]
    fn python_style_skip_matching() {
        let cfg = BitsAndBytesConfig {
            skip_modules: vec!["mlp.down_proj".into(), "lm_head".into()],
            ..BitsAndBytesConfig::four_bit(FourBitType::Nf4, false)
        };
        assert!(cfg.skips("model.layers.3.mlp.down_proj"));
        assert!(cfg.skips("lm_head"));
        assert!(!cfg.skips("model.layers.3.mlp.up_proj"));
        assert!(!cfg.skips("model.layers.3.mlp.down_proj_x"));
    }
}
