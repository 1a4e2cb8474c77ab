//! Quantization methods, one module per method, sharing calibration and layer streaming
//! (issues 3–5). Kernels for packed low-bit matmul live in `kernels`, formats in `formats`.

pub mod awq;
pub mod bnb;
pub mod calib;
pub mod gptq;
pub mod resume;
pub mod rtn;
pub mod stream;
