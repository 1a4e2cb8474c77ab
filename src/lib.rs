//! autoquant: load, quantize, save and measure Hugging Face causal language models in Rust.
//!
//! The pipeline is the architecture: [`hub`] finds the files → [`config`], [`tokenizer`] and
//! [`models`] are the Auto classes → [`formats`] read and write checkpoints → [`eval`] measures.

pub mod auto;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod formats;
pub mod fsutil;
pub mod generate;
pub mod hub;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod qtypes;
pub mod quant;
pub mod tensor;
pub mod text;
pub mod tokenizer;

pub use error::{Error, Result};
