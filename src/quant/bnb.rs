//! bitsandbytes-style quantization (LLM.int8, NF4/FP4 with double quantization). (Stub.)

use crate::error::{Error, Result};
use crate::nn::{LinearFactory, WeightDType};

/// 4-bit code book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FourBitType {
    #[default]
    Nf4,
    Fp4,
}

/// Mirrors transformers' `BitsAndBytesConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct BitsAndBytesConfig {
    pub load_in_8bit: bool,
    pub load_in_4bit: bool,
    pub quant_type: FourBitType,
    pub double_quant: bool,
    pub compute_dtype: WeightDType,
    /// LLM.int8 outlier threshold; 0 disables the decomposition.
    pub int8_threshold: f32,
    /// Module name suffixes kept in float; `lm_head` (and a tied output embedding) always are.
    pub skip_modules: Vec<String>,
}

impl Default for BitsAndBytesConfig {
    fn default() -> Self {
        BitsAndBytesConfig {
            load_in_8bit: false,
            load_in_4bit: false,
            quant_type: FourBitType::Nf4,
            double_quant: false,
            compute_dtype: WeightDType::F32,
            int8_threshold: 6.0,
            skip_modules: vec!["lm_head".into()],
        }
    }
}

/// Quantizes every eligible linear layer as it is loaded.
pub fn load_time_factory(_cfg: &BitsAndBytesConfig) -> Result<Box<dyn LinearFactory>> {
    Err(Error::Unsupported(
        "bitsandbytes quantization is not implemented yet".into(),
    ))
}
