//! awq checkpoints: reading (packed in memory) and writing. (Stub, being written.)

use crate::config::AutoConfig;
use crate::error::{Error, Result};
use crate::nn::LinearFactory;

/// Builds the packed linear layers of a checkpoint whose `quantization_config` is `qcfg`.
pub fn linear_factory(
    _config: &AutoConfig,
    _qcfg: &serde_json::Value,
) -> Result<Box<dyn LinearFactory>> {
    Err(Error::Unsupported(
        "awq checkpoints cannot be loaded yet".into(),
    ))
}
