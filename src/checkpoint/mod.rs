//! Quantized checkpoint layouts, one module each: GPTQ (with its bit packing), AWQ and
//! bitsandbytes. Each reads its tensors into packed kernels through a [`LinearFactory`] and
//! lays out the tensors a writer saves; the container (safetensors, sharding) is
//! [`crate::formats`]' job. Layouts are described in docs/formats.md.

pub mod awq;
pub mod bnb;
pub mod gptq;
pub mod gptq_pack;

use crate::config::AutoConfig;
use crate::error::{Error, Result};
use crate::kernels::bnb::FourBitDecode;
use crate::nn::LinearFactory;
use crate::qtypes::bnb::BitsAndBytesConfig;
use std::path::PathBuf;

/// The builder of packed linear layers for a quantized checkpoint (its config's
/// `quantization_config.quant_method`), or for quantization at load time (`load_in`);
/// `None` for a plain float checkpoint. Old checkpoints have no `quantization_config`: their
/// settings are in a file beside `config.json` that implies the method, `quantize_config.json`
/// (AutoGPTQ ≤ 0.6) or `quant_config.json` (AutoAWQ 0.1).
pub fn quantized_linear_factory(
    config: &AutoConfig,
    load_in: Option<&BitsAndBytesConfig>,
    four_bit_decode: FourBitDecode,
) -> Result<Option<Box<dyn LinearFactory>>> {
    let source = config
        .source
        .clone()
        .unwrap_or_else(|| PathBuf::from("config.json"));
    let legacy = [
        ("quantize_config.json", "gptq"),
        ("quant_config.json", "awq"),
    ]
    .into_iter()
    .map(|(file, method)| (source.with_file_name(file), method))
    .find(|(file, _)| config.source.is_some() && file.is_file());
    let legacy_cfg;
    let (qcfg, origin, implied) = match (config.raw.get("quantization_config"), legacy) {
        (Some(q), _) => (Some(q), source.clone(), None),
        (None, Some((file, method))) => {
            legacy_cfg = crate::error::read_json(&file)?;
            (Some(&legacy_cfg), file, Some(method))
        }
        (None, None) => (None, source.clone(), None),
    };
    // The legacy files often have no quant_method: their name says it.
    let method = qcfg
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        .or(implied);
    if let (Some(_), Some(method)) = (load_in, method) {
        return Err(Error::InvalidArgument(format!(
            "{} is already quantized ({method}); it cannot also be quantized at load time",
            origin.display()
        )));
    }
    if let Some(bnb) = load_in {
        return bnb::load_time_factory(bnb, four_bit_decode).map(Some);
    }
    let Some(qcfg) = qcfg else { return Ok(None) };
    match method {
        Some("gptq") => gptq::linear_factory(config, qcfg).map(Some),
        Some("awq") => awq::linear_factory(config, qcfg).map(Some),
        Some("bitsandbytes") => bnb::linear_factory(config, qcfg, four_bit_decode).map(Some),
        Some(other) => Err(Error::Unsupported(format!(
            "{}: quant_method `{other}` is not supported (gptq, awq, bitsandbytes are)",
            origin.display()
        ))),
        None => Err(Error::format(
            origin,
            "quantization_config has no quant_method",
        )),
    }
}
