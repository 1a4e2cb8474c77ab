//! Measuring models: perplexity, memory (estimate, footprint, peak RSS) and speed.

pub mod bench;
pub mod memory;
pub mod perplexity;
