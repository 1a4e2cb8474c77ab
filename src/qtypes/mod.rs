//! Quantized data types: what a quantized weight *is*, apart from how it is computed with
//! ([`crate::kernels`]), stored ([`crate::checkpoint`], [`crate::formats`]) or produced
//! ([`crate::quant`]). Each type owns its numerics and its block layout:
//!
//! - [`grid`]: the integer grid of GPTQ, AWQ and RTN (scale and zero point per group, codes in
//!   `0..2^bits`), and the unpacked [`grid::QuantizedLinear`] every GPTQ-style layout is built from;
//! - [`bnb`]: bitsandbytes' NF4/FP4 code books, blockwise absmax (optionally itself quantized),
//!   LLM.int8 row-wise codes, and the bitsandbytes configuration;
//! - [`ggml`]: llama.cpp's block types (Q4_0, Q8_0, the K-quants, ...) and their dequantization.
//!
//! The user-facing parameters are validated here once, as types: [`Bits`] and [`GroupSize`].

pub mod bnb;
pub mod ggml;
pub mod grid;

use crate::error::{Error, Result};
use std::fmt;

/// Bits per weight of an integer grid: 2, 3, 4 or 8 (what GPTQ checkpoints can store; AWQ
/// checkpoints hold 4). Construct with [`Bits::new`], which names the rule when it refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bits(u8);

impl Bits {
    pub const B2: Bits = Bits(2);
    pub const B3: Bits = Bits(3);
    pub const B4: Bits = Bits(4);
    pub const B8: Bits = Bits(8);

    pub fn new(bits: u8) -> Result<Bits> {
        Bits::from_i64(bits.into())
    }

    /// From a value read from a file or the command line, which may be any integer.
    pub fn from_i64(bits: i64) -> Result<Bits> {
        match bits {
            2 | 3 | 4 | 8 => Ok(Bits(bits as u8)),
            _ => Err(Error::InvalidArgument(format!(
                "unsupported bit width {bits}: the integer grid holds 2, 3, 4 or 8 bits"
            ))),
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }

    /// The largest code, `2^bits − 1`.
    pub fn maxq(self) -> u32 {
        grid::maxq(self.0)
    }
}

impl serde::Serialize for Bits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u8(self.0)
    }
}

impl fmt::Display for Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Bits {
    type Err = Error;
    fn from_str(s: &str) -> Result<Bits> {
        let v: i64 = s.trim().parse().map_err(|_| {
            Error::InvalidArgument(format!("bit width `{s}` is not a number (2, 3, 4 or 8)"))
        })?;
        Bits::from_i64(v)
    }
}

/// Input channels that share one scale and zero point: a positive group size, or one group per
/// output channel. On disk and on the command line per-channel is written `-1`, as transformers'
/// configs write it; every other value below 1 is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupSize {
    PerChannel,
    Size(usize),
}

impl GroupSize {
    pub fn from_i64(v: i64) -> Result<GroupSize> {
        match v {
            -1 => Ok(GroupSize::PerChannel),
            v if v > 0 => Ok(GroupSize::Size(v as usize)),
            v => Err(Error::InvalidArgument(format!(
                "group size {v}: give a positive number of input channels, or -1 for one group \
                 per output channel"
            ))),
        }
    }

    /// `None` for per-channel, as the option-typed fields of the lower layers take it.
    pub fn size(self) -> Option<usize> {
        match self {
            GroupSize::PerChannel => None,
            GroupSize::Size(g) => Some(g),
        }
    }

    /// Input channels per group for a layer of `k` inputs (`k` for per-channel).
    pub fn channels(self, k: usize) -> usize {
        self.size().unwrap_or(k)
    }

    pub fn from_size(size: Option<usize>) -> GroupSize {
        size.map_or(GroupSize::PerChannel, GroupSize::Size)
    }

    /// The value transformers' configs store: the size, or -1.
    pub fn to_i64(self) -> i64 {
        match self {
            GroupSize::PerChannel => -1,
            GroupSize::Size(g) => g as i64,
        }
    }
}

impl serde::Serialize for GroupSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_i64(self.to_i64())
    }
}

impl fmt::Display for GroupSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_i64())
    }
}

impl std::str::FromStr for GroupSize {
    type Err = Error;
    fn from_str(s: &str) -> Result<GroupSize> {
        let v: i64 = s.trim().parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "group size `{s}` is not a number (a positive size, or -1 for per-channel)"
            ))
        })?;
        GroupSize::from_i64(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_accept_the_grid_widths_only() {
        for b in [2u8, 3, 4, 8] {
            assert_eq!(Bits::new(b).unwrap().get(), b);
        }
        for b in [0u8, 1, 5, 6, 7, 9, 16, 255] {
            let e = Bits::new(b).unwrap_err().to_string();
            assert!(e.contains("2, 3, 4 or 8"), "{e}");
        }
        assert!(Bits::from_i64(260).is_err());
        assert!(Bits::from_i64(-4).is_err());
        assert_eq!("3".parse::<Bits>().unwrap(), Bits::B3);
        assert!("four".parse::<Bits>().is_err());
        assert_eq!(Bits::B3.maxq(), 7);
    }

    #[test]
    fn group_size_has_one_per_channel_spelling() {
        assert_eq!(GroupSize::from_i64(-1).unwrap(), GroupSize::PerChannel);
        assert_eq!(GroupSize::from_i64(64).unwrap(), GroupSize::Size(64));
        for bad in [0i64, -2, -128, i64::MIN] {
            let e = GroupSize::from_i64(bad).unwrap_err().to_string();
            assert!(e.contains("-1 for one group per output channel"), "{e}");
        }
        assert_eq!("-1".parse::<GroupSize>().unwrap().size(), None);
        assert_eq!(GroupSize::Size(32).to_i64(), 32);
        assert_eq!(GroupSize::from_size(None), GroupSize::PerChannel);
    }
}
