//! GPTQ (stub, being written).
