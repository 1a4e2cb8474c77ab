//! GPTQ packing (docs/formats.md §1.3/§1.4) and the RTN grid (§1.2).
//!
//! Expected words and codes below are worked out by hand from the spec text, not taken from our
//! output: inputs are chosen so that scales are exact in f32 wherever possible.

use autoquant::checkpoint::gptq_pack::{
    check_loader_shape, pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros, ZeroFormat,
};
use autoquant::qtypes::grid::{grid, QuantParams};
use autoquant::qtypes::{Bits, GroupSize};
use autoquant::quant::rtn::quantize_rtn;
use proptest::prelude::*;

fn words(hex: &[u32]) -> Vec<i32> {
    hex.iter().map(|&w| w as i32).collect()
}

// ---------------------------------------------------------------- qweight, hand-packed layouts

#[test]
fn qweight_4bit_lowest_k_in_lowest_bits() {
    // N=2, K=8 → qweight [1, 2]. Column 0 codes 1..8 → nibbles 1,2,..,8 from the bottom.
    let mut codes = vec![1, 2, 3, 4, 5, 6, 7, 8];
    codes.extend([15, 0, 0, 0, 0, 0, 0, 0]);
    let packed = pack_qweight(&codes, 2, 8, 4).unwrap();
    assert_eq!(packed, words(&[0x8765_4321, 0x0000_000F]));
    assert_eq!(unpack_qweight(&packed, 2, 8, 4).unwrap(), codes);
}

#[test]
fn qweight_2bit_and_8bit_rows() {
    // 2-bit, K=16: code 3 at k=0 (bits 0-1) and 1 at k=15 (bits 30-31).
    let mut codes = vec![0u8; 16];
    codes[0] = 3;
    codes[15] = 1;
    assert_eq!(
        pack_qweight(&codes, 1, 16, 2).unwrap(),
        words(&[0x4000_0003])
    );

    // 8-bit, N=2, K=8 → qweight [2, 2] row-major: row r holds k = 4r..4r+3 of both columns.
    let mut codes: Vec<u8> = (1..=8).collect();
    codes.extend([0xAA, 0, 0, 0, 0, 0, 0, 0xFF]);
    let packed = pack_qweight(&codes, 2, 8, 8).unwrap();
    assert_eq!(
        packed,
        words(&[0x0403_0201, 0x0000_00AA, 0x0807_0605, 0xFF00_0000])
    );
}

#[test]
fn qweight_3bit_straddling_fields() {
    // One run of 32 codes → words w0, w1, w2 (rows 0..3 of a single column).
    let mut codes = vec![0u8; 32];
    codes[0] = 1; // w0 bits 0-2
    codes[9] = 7; // w0 bits 27-29
    codes[10] = 5; // 0b101: low bits 01 → w0 bits 30-31, bit 2 → w1 bit 0
    codes[11] = 2; // w1 bits 1-3
    codes[21] = 7; // bit 0 → w1 bit 31, bits 1-2 → w2 bits 0-1
    codes[22] = 1; // w2 bits 2-4
    codes[31] = 6; // w2 bits 29-31
    let w0 = 1 | (7 << 27) | (1 << 30);
    let w1 = 1 | (2 << 1) | (1 << 31);
    let w2 = 3 | (1 << 2) | (6 << 29);
    let packed = pack_qweight(&codes, 1, 32, 3).unwrap();
    assert_eq!(packed, words(&[w0, w1, w2]));
    assert_eq!(unpack_qweight(&packed, 1, 32, 3).unwrap(), codes);

    // v21 = 6 = 0b110: its bit 0 (0) goes to w1 bit 31, bits 1-2 (11) to w2 bits 0-1.
    let mut codes = vec![0u8; 32];
    codes[21] = 6;
    assert_eq!(pack_qweight(&codes, 1, 32, 3).unwrap(), words(&[0, 0, 3]));
}

#[test]
fn qweight_3bit_second_run_uses_rows_3_to_5() {
    // K=64, N=2: channels 32..63 of column 1 go to rows 3,4,5 at column 1.
    let mut codes = vec![0u8; 2 * 64];
    codes[64 + 32] = 7; // column 1, k=32 → row 3 bits 0-2
    codes[64 + 63] = 7; // column 1, k=63 → row 5 bits 29-31
    let packed = pack_qweight(&codes, 2, 64, 3).unwrap();
    let mut expected = vec![0u32; 6 * 2];
    expected[3 * 2 + 1] = 7;
    expected[5 * 2 + 1] = 7 << 29;
    assert_eq!(packed, words(&expected));
}

// ---------------------------------------------------------------- qzeros

#[test]
fn symmetric_constant_words() {
    // docs/formats.md §1.3 table: every zero is 2^(b-1); v1 stores 2^(b-1)-1.
    let table: [(u8, [u32; 3], [u32; 3]); 4] = [
        (2, [0x5555_5555; 3], [0xAAAA_AAAA; 3]),
        (
            3,
            [0xDB6D_B6DB, 0xB6DB_6DB6, 0x6DB6_DB6D],
            [0x2492_4924, 0x4924_9249, 0x9249_2492],
        ),
        (4, [0x7777_7777; 3], [0x8888_8888; 3]),
        (8, [0x7F7F_7F7F; 3], [0x8080_8080; 3]),
    ];
    for (bits, v1, v2) in table {
        // N chosen so qzeros has exactly 3 words per group: 3·32/b columns.
        let n = 3 * 32 / bits as usize;
        let zeros = vec![1u32 << (bits - 1); 2 * n];
        let p1 = pack_qzeros(&zeros, 2, n, bits, ZeroFormat::V1).unwrap();
        let p2 = pack_qzeros(&zeros, 2, n, bits, ZeroFormat::V2).unwrap();
        let e1: Vec<u32> = v1.iter().chain(&v1).copied().collect();
        let e2: Vec<u32> = v2.iter().chain(&v2).copied().collect();
        assert_eq!(p1, words(&e1), "{bits}-bit v1");
        assert_eq!(p2, words(&e2), "{bits}-bit v2");
        assert_eq!(
            unpack_qzeros(&p1, 2, n, bits, ZeroFormat::V1).unwrap(),
            zeros
        );
        assert_eq!(
            unpack_qzeros(&p2, 2, n, bits, ZeroFormat::V2).unwrap(),
            zeros
        );
    }
    // The signed values the table quotes.
    assert_eq!(0x7777_7777u32 as i32, 2004318071);
    assert_eq!(0x8080_8080u32 as i32, -2139062144);
}

#[test]
fn qzeros_v1_stores_z_minus_one() {
    let zeros: Vec<u32> = (1..=8).collect();
    assert_eq!(
        pack_qzeros(&zeros, 1, 8, 4, ZeroFormat::V2).unwrap(),
        words(&[0x8765_4321])
    );
    assert_eq!(
        pack_qzeros(&zeros, 1, 8, 4, ZeroFormat::V1).unwrap(),
        words(&[0x7654_3210])
    );
}

#[test]
fn qzeros_v1_refuses_zero_point_zero() {
    let mut zeros = vec![5u32; 16];
    zeros[8 + 3] = 0;
    let err = pack_qzeros(&zeros, 2, 8, 4, ZeroFormat::V1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("group 1, column 3"), "{err}");
    assert!(err.contains("gptq_v2"), "{err}");
    // v2 stores it fine.
    let p = pack_qzeros(&zeros, 2, 8, 4, ZeroFormat::V2).unwrap();
    assert_eq!(unpack_qzeros(&p, 2, 8, 4, ZeroFormat::V2).unwrap(), zeros);
}

#[test]
fn qzeros_v1_reader_wraps_modulo() {
    // A v1 field of all-ones (what AutoGPTQ writes for Z=0 and its neighbours) reads as 0.
    assert_eq!(
        unpack_qzeros(&words(&[0xFFFF_FFFF]), 1, 8, 4, ZeroFormat::V1).unwrap(),
        vec![0; 8]
    );
    assert_eq!(
        unpack_qzeros(&words(&[0xFFFF_FFFF]), 1, 4, 8, ZeroFormat::V1).unwrap(),
        vec![0; 4]
    );
    // v2 reads the field as is.
    assert_eq!(
        unpack_qzeros(&words(&[0xFFFF_FFFF]), 1, 8, 4, ZeroFormat::V2).unwrap(),
        vec![15; 8]
    );
}

// ---------------------------------------------------------------- packing errors

#[test]
fn packing_errors() {
    // Unsupported widths.
    assert!(pack_qweight(&[0; 40], 1, 40, 5).is_err());
    assert!(pack_qweight(&[0; 32], 1, 32, 1).is_err());
    // K not a multiple of 32/b (4-bit needs 8) or of 32 (3-bit).
    let e = pack_qweight(&[0; 12], 1, 12, 4).unwrap_err().to_string();
    assert!(e.contains("K = 12"), "{e}");
    assert!(pack_qweight(&[0; 16], 1, 16, 3).is_err());
    // Length not N·K.
    assert!(pack_qweight(&[0; 15], 2, 8, 4).is_err());
    assert!(unpack_qweight(&[0; 3], 2, 8, 4).is_err());
    // Code wider than the field.
    let e = pack_qweight(&[16, 0, 0, 0, 0, 0, 0, 0], 1, 8, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("16"), "{e}");
    assert!(pack_qzeros(&[4; 16], 1, 16, 2, ZeroFormat::V2).is_err());
    // N not a multiple of 32/b for qzeros.
    assert!(pack_qzeros(&[1; 6], 1, 6, 4, ZeroFormat::V2).is_err());
    assert!(unpack_qzeros(&[0; 2], 1, 8, 4, ZeroFormat::V1).is_err());
    // Loader rules: K multiple of 32, N of 32/b (32 for 3-bit).
    assert!(check_loader_shape(8, 32, 4).is_ok());
    assert!(check_loader_shape(8, 16, 4).is_err());
    assert!(check_loader_shape(16, 32, 3).is_err());
    assert!(check_loader_shape(32, 64, 3).is_ok());
}

// ---------------------------------------------------------------- round-trip properties

fn run_len(bits: u8) -> usize {
    if bits == 3 {
        32
    } else {
        32 / bits as usize
    }
}

fn bits_strategy() -> impl Strategy<Value = u8> {
    prop_oneof![Just(2u8), Just(3u8), Just(4u8), Just(8u8)]
}

/// (bits, N, K, codes [N,K]) with K a multiple of the packing run.
fn qweight_case() -> impl Strategy<Value = (u8, usize, usize, Vec<u8>)> {
    (bits_strategy(), 1usize..6, 1usize..5).prop_flat_map(|(bits, n, runs)| {
        let k = runs * run_len(bits);
        let maxq = ((1u32 << bits) - 1) as u8;
        (
            Just(bits),
            Just(n),
            Just(k),
            proptest::collection::vec(0..=maxq, n * k),
        )
    })
}

/// (bits, G, N, zeros [G,N], v1?) with N a multiple of the run; v1 zeros avoid 0.
fn qzeros_case() -> impl Strategy<Value = (u8, usize, usize, Vec<u32>, bool)> {
    (bits_strategy(), 1usize..4, 1usize..4, any::<bool>()).prop_flat_map(|(bits, g, runs, v1)| {
        let n = runs * run_len(bits);
        let maxq = (1u32 << bits) - 1;
        let lo = if v1 { 1 } else { 0 };
        (
            Just(bits),
            Just(g),
            Just(n),
            proptest::collection::vec(lo..=maxq, g * n),
            Just(v1),
        )
    })
}

proptest! {
    #[test]
    fn qweight_round_trip((bits, n, k, codes) in qweight_case()) {
        let packed = pack_qweight(&codes, n, k, bits).unwrap();
        prop_assert_eq!(packed.len(), k * bits as usize / 32 * n);
        prop_assert_eq!(unpack_qweight(&packed, n, k, bits).unwrap(), codes);
    }

    #[test]
    fn qzeros_round_trip((bits, g, n, zeros, v1) in qzeros_case()) {
        let format = if v1 { ZeroFormat::V1 } else { ZeroFormat::V2 };
        let packed = pack_qzeros(&zeros, g, n, bits, format).unwrap();
        prop_assert_eq!(packed.len(), g * (n * bits as usize / 32));
        prop_assert_eq!(unpack_qzeros(&packed, g, n, bits, format).unwrap(), zeros);
    }

    /// Asymmetric RTN: the grid spans [min(0,x), max(0,x)] shifted by under half a step (rounded
    /// zero), so a clipped value was within half a step of the end too: error ≤ scale/2 + f32 noise.
    #[test]
    fn rtn_asym_error_within_half_step(
        bits in bits_strategy(),
        w in proptest::collection::vec(-4.0f32..4.0, 2 * 16),
    ) {
        let q = quantize_rtn(&w, 2, 16, &QuantParams { bits: Bits::new(bits).unwrap(), group_size: GroupSize::Size(8), sym: false }).unwrap();
        let dq = q.dequantize();
        for (i, (&x, &y)) in w.iter().zip(&dq).enumerate() {
            let scale = q.scales[q.g_idx[i % 16] as usize * 2 + i / 16];
            prop_assert!((x - y).abs() <= scale * 0.5001, "x={} dq={} scale={}", x, y, scale);
        }
    }
}

// ---------------------------------------------------------------- RTN grid, hand-computed

fn rtn(
    w: &[f32],
    n: usize,
    k: usize,
    bits: u8,
    group_size: Option<usize>,
    sym: bool,
) -> autoquant::qtypes::grid::QuantizedLinear {
    quantize_rtn(
        w,
        n,
        k,
        &QuantParams {
            bits: Bits::new(bits).unwrap(),
            group_size: GroupSize::from_size(group_size),
            sym,
        },
    )
    .unwrap()
}

#[test]
fn rtn_asym_4bit_exact_grid() {
    // xmin=-1.5, xmax=6 → scale 7.5/15 = 0.5, zero round(1.5/0.5) = 3.
    // x/0.5 = -3, 0, 4, 12, 0.5, 1.5, -2.5, 2.5 → half-even: 0, 2, -2, 2 → +3.
    let w = [-1.5, 0.0, 2.0, 6.0, 0.25, 0.75, -1.25, 1.25];
    let q = rtn(&w, 1, 8, 4, None, false);
    assert_eq!(q.scales, vec![0.5]);
    assert_eq!(q.zeros, vec![3]);
    assert_eq!(q.codes, vec![0, 3, 7, 15, 3, 5, 1, 5]);
    assert_eq!(q.g_idx, vec![0; 8]);
    assert_eq!(
        q.dequantize(),
        vec![-1.5, 0.0, 2.0, 6.0, 0.0, 1.0, -1.0, 1.0]
    );
}

#[test]
fn rtn_asym_zero_rounds_half_even_and_clamps() {
    // xmin=-1.25, xmax=6.25 → scale 0.5, zero round(2.5) = 2; 6.25/0.5 = 12.5 → 12, +2 = 14.
    let q = rtn(&[-1.25, 6.25], 1, 2, 4, None, false);
    assert_eq!((q.scales[0], q.zeros[0]), (0.5, 2));
    assert_eq!(q.codes, vec![0, 14]);
    // xmin=-1.75, xmax=5.75 → scale 0.5, zero round(3.5) = 4; 11.5 → 12, +4 = 16 → clamped 15.
    let q = rtn(&[-1.75, 5.75], 1, 2, 4, None, false);
    assert_eq!((q.scales[0], q.zeros[0]), (0.5, 4));
    assert_eq!(q.codes, vec![0, 15]);
    // 3-bit: xmin=-3.5, xmax=3.5 → scale 7/7 = 1, zero round(3.5) = 4; 3.5 → 4+4 = 8 → 7.
    let q = rtn(&[-3.5, 0.0, 3.5, 1.0], 1, 4, 3, None, false);
    assert_eq!((q.scales[0], q.zeros[0]), (1.0, 4));
    assert_eq!(q.codes, vec![0, 4, 7, 5]);
}

#[test]
fn rtn_sym_4bit_and_8bit() {
    // xmin=-7.5, xmax=7 → xmax=7.5, xmin=-7.5, scale 15/15 = 1, zero 8.
    // round: -7.5→-8, 2, 7, -0.5→-0, 0.5→0, 1.5→2; +8.
    let q = rtn(&[-7.5, 2.0, 7.0, -0.5, 0.5, 1.5], 1, 6, 4, None, true);
    assert_eq!((q.scales[0], q.zeros[0]), (1.0, 8));
    assert_eq!(q.codes, vec![0, 10, 15, 8, 8, 10]);
    // Positive side is one step short: xmax=7.5 with xmin=-2 → 7.5 rounds to 8, +8 = 16 → 15.
    let q = rtn(&[-2.0, 7.5], 1, 2, 4, None, true);
    assert_eq!((q.scales[0], q.zeros[0]), (1.0, 8));
    assert_eq!(q.codes, vec![6, 15]);
    // 8-bit: range ±127.5 → scale 255/255 = 1, zero 128; 127.5 → 128+128 = 256 → 255.
    let q = rtn(&[-127.5, 1.0, 127.5], 1, 3, 8, None, true);
    assert_eq!((q.scales[0], q.zeros[0]), (1.0, 128));
    assert_eq!(q.codes, vec![0, 129, 255]);
}

#[test]
fn rtn_sym_no_negatives_quirk_clips_upper_half() {
    // No negatives: xmin stays 0, xmax=15 → scale 1, zero still 8.
    // 0→8, 1→9, 7.5→8+8=16→15, 15→23→15: everything above 7 clips.
    let q = rtn(&[0.0, 1.0, 7.5, 15.0], 1, 4, 4, None, true);
    assert_eq!((q.scales[0], q.zeros[0]), (1.0, 8));
    assert_eq!(q.codes, vec![8, 9, 15, 15]);
    assert_eq!(q.dequantize(), vec![0.0, 1.0, 7.0, 7.0]);
}

#[test]
fn rtn_all_zero_group_uses_unit_range() {
    // xmin=xmax=0 → -1..1: sym scale 2/15, zero 8, code 8 everywhere.
    assert_eq!(grid(&[0.0; 3], 4, true), (2.0f32 / 15.0, 8));
    let q = rtn(&[0.0; 4], 1, 4, 4, None, true);
    assert_eq!(q.codes, vec![8; 4]);
    assert_eq!(q.dequantize(), vec![0.0; 4]);
}

#[test]
fn rtn_grouped_2bit_layout() {
    // N=2, K=4, g=2, asym 2-bit (maxq 3). Scales/zeros are [G, N].
    // row0 g0 [-1, 2]: scale 3/3=1, zero 1 → codes 0, 3.
    // row0 g1 [0, 0]: -1..1 → scale 2/3, zero round(1/0.6666667f32 = 1.5) = 2 → code 2.
    // row1 g0 [3, 1.5]: xmin forced to 0, scale 1, zero 0 → 3, round(1.5)=2.
    // row1 g1 [-3, 0]: xmax forced to 0, scale 1, zero 3 → 0, 3.
    let w = [-1.0, 2.0, 0.0, 0.0, 3.0, 1.5, -3.0, 0.0];
    let q = rtn(&w, 2, 4, 2, Some(2), false);
    assert_eq!(q.scales, vec![1.0, 1.0, 2.0f32 / 3.0, 1.0]);
    assert_eq!(q.zeros, vec![1, 0, 2, 3]);
    assert_eq!(q.codes, vec![0, 3, 2, 2, 3, 2, 0, 3]);
    assert_eq!(q.g_idx, vec![0, 0, 1, 1]);
    assert_eq!(q.num_groups(), 2);
    assert_eq!(
        q.dequantize(),
        vec![-1.0, 2.0, 0.0, 0.0, 3.0, 2.0, -3.0, 0.0]
    );
}

#[test]
fn rtn_codes_survive_packing() {
    // A 4-bit asym layer, K=32, N=8, g=16: pack → unpack gives back codes and zeros (v2).
    let w: Vec<f32> = (0..8 * 32)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
        .collect();
    let q = rtn(&w, 8, 32, 4, Some(16), false);
    check_loader_shape(8, 32, 4).unwrap();
    let qw = pack_qweight(&q.codes, 8, 32, 4).unwrap();
    let qz = pack_qzeros(&q.zeros, 2, 8, 4, ZeroFormat::V2).unwrap();
    assert_eq!(unpack_qweight(&qw, 8, 32, 4).unwrap(), q.codes);
    assert_eq!(
        unpack_qzeros(&qz, 2, 8, 4, ZeroFormat::V2).unwrap(),
        q.zeros
    );
}

#[test]
fn rtn_errors() {
    let w = vec![0.5f32; 8];
    let p = |bits: u8, group_size: Option<usize>| QuantParams {
        bits: Bits::new(bits).unwrap(),
        group_size: GroupSize::from_size(group_size),
        sym: false,
    };
    for bits in [0u8, 1, 5, 6, 7, 16] {
        assert!(Bits::new(bits).is_err(), "bits {bits}");
    }
    let e = quantize_rtn(&w, 2, 4, &p(4, Some(3)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("group size 3") && e.contains("K=4"), "{e}");
    assert!(quantize_rtn(&w, 2, 4, &p(4, Some(0))).is_err());
    assert!(quantize_rtn(&w, 3, 4, &p(4, None)).is_err()); // length ≠ N·K
    assert!(quantize_rtn(&[], 0, 0, &p(4, None)).is_err());
    let mut bad = w.clone();
    bad[6] = f32::NAN;
    let e = quantize_rtn(&bad, 2, 4, &p(4, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 1, column 2"), "{e}");
    bad[6] = f32::INFINITY;
    assert!(quantize_rtn(&bad, 2, 4, &p(4, None)).is_err());
    // Finite but overflowing range: xmax − xmin = inf.
    assert!(quantize_rtn(&[-3e38, 3e38], 1, 2, &p(4, None)).is_err());
}

// ---------------------------------------------------------------- RTN against the reference

/// Golden output of the IST-DASLab reference `Quantizer` (quant.py at commit 2d65066, torch CPU):
/// `W = randn(4, 16)·0.05` with `torch.manual_seed(0)`, row 2 made non-negative (symmetric quirk),
/// row 3 columns 8..16 zeroed (the −1..1 fallback); per group of 8 columns, `find_params(block,
/// weight=True)` with `perchannel=True`, codes `clamp(round(block/scale) + zero, 0, maxq)`.
/// Weights and scales are f32 bit patterns, scales/zeros `[G, N]`, codes `[N, K]`.
#[rustfmt::skip]
const REF_W_BITS: [u32; 64] = [0xbd66926f, 0xbd6c00dd, 0xbc4d4623, 0xbcb1b77e, 0x3d2dd0de, 0x3d0db936, 0xbc817057, 0xbdd89935, 0x3c8400fa, 0xbd815d90, 0x3c8f5a66, 0x3c7c6c5f, 0x3bc4592c, 0x3d7d78eb, 0x3d64b74a, 0xbc4a91fd, 0xbd8a8302, 0xbdada9d2, 0x3ce819a0, 0x3d2282b1, 0x3cf548df, 0xbd9f3de3, 0xbc8bd23b, 0x3dbdbf72, 0x3d19a389, 0xbcefd1df, 0xbc0e0bef, 0x3c164e1d, 0x3d8e4567, 0x3da270cd, 0x3d41cd4a, 0xbd2cc8f6, 0x3cfb52da, 0x3acf0bd3, 0x3cc9cced, 0x3c4b805a, 0x3cb41973, 0x3bb82cab, 0x3d033bfa, 0x3cb4b297, 0x3ba79fc7, 0x3d224ae3, 0x3c6d4bb8, 0x3b2c0e79, 0x3cd629e5, 0x3debbeef, 0x3d966a2c, 0x3da27a18, 0xbd09d94c, 0x3d32c17f, 0x3d582320, 0x3c11b088, 0xbc3cb0da, 0xbca0766d, 0x3cde8895, 0xbca1db46, 0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000];
/// (bits, sym, scale bits, zeros, codes)
type RefCase = (u8, bool, [u32; 8], [u32; 8], [u8; 64]);
#[rustfmt::skip]
const REF_CASES: [RefCase; 5] = [
    (2, false, [0x3d4a566d, 0x3d72462d, 0x3c2efaa3, 0x3cebfd9d, 0x3d2abc04, 0x3d25e385, 0x3d1d29f5, 0x3f2aaaab], [2, 1, 0, 1, 2, 1, 0, 2], [1, 1, 2, 2, 3, 3, 2, 0, 2, 0, 2, 2, 2, 3, 3, 2, 0, 0, 1, 2, 2, 0, 1, 3, 2, 0, 1, 1, 3, 3, 2, 0, 3, 0, 2, 1, 2, 1, 3, 2, 0, 1, 0, 0, 1, 3, 2, 2, 0, 3, 3, 1, 1, 0, 2, 0, 2, 2, 2, 2, 2, 2, 2, 2]),
    (3, false, [0x3cad6ea7, 0x3ccfa9de, 0x3b95fb67, 0x3c4a4719, 0x3c925803, 0x3c8e30bb, 0x3c86b63f, 0x3e924925], [5, 3, 0, 3, 4, 2, 0, 3], [2, 2, 4, 4, 7, 7, 4, 0, 5, 0, 5, 5, 4, 7, 7, 3, 0, 0, 4, 5, 4, 0, 2, 7, 4, 0, 2, 3, 6, 7, 5, 0, 7, 0, 5, 3, 5, 1, 7, 5, 0, 2, 1, 0, 2, 7, 4, 5, 0, 7, 7, 4, 2, 1, 5, 1, 3, 3, 3, 3, 3, 3, 3, 3]),
    (4, true, [0x3c6709d2, 0x3c4a65cf, 0x3b0bfbb5, 0x3be68bde, 0x3c09fd66, 0x3c2d451f, 0x3bfb7654, 0x3e088889], [8, 8, 8, 8, 8, 8, 8, 8], [4, 4, 7, 6, 11, 10, 7, 0, 10, 0, 10, 10, 9, 15, 15, 7, 3, 1, 10, 11, 10, 2, 7, 15, 12, 5, 7, 9, 15, 15, 12, 4, 15, 9, 15, 14, 15, 11, 15, 15, 9, 13, 10, 8, 11, 15, 15, 15, 3, 14, 15, 9, 6, 5, 12, 5, 8, 8, 8, 8, 8, 8, 8, 8]),
    (4, false, [0x3c21debe, 0x3c41d1be, 0x3b0bfbb5, 0x3bbccae4, 0x3c08966a, 0x3c04b604, 0x3bfb7654, 0x3e088889], [11, 7, 0, 6, 8, 5, 0, 7], [5, 5, 10, 9, 15, 15, 9, 0, 10, 0, 10, 10, 9, 15, 15, 7, 1, 0, 9, 10, 10, 0, 6, 15, 10, 1, 4, 6, 14, 15, 11, 0, 14, 1, 12, 6, 10, 3, 15, 10, 1, 5, 2, 0, 3, 15, 10, 10, 0, 14, 15, 8, 4, 3, 11, 3, 7, 7, 7, 7, 7, 7, 7, 7]),
    (8, true, [0x3a5972a8, 0x3a3e7df0, 0x3903bfba, 0x39d8fc1c, 0x3a01df6f, 0x3a2313e1, 0x39ecab9b, 0x3c008081], [128, 128, 128, 128, 128, 128, 128, 128], [60, 59, 113, 102, 179, 170, 109, 0, 161, 0, 163, 159, 140, 253, 241, 103, 35, 11, 167, 183, 169, 21, 105, 255, 188, 81, 114, 143, 240, 255, 204, 60, 255, 141, 255, 227, 255, 173, 255, 255, 139, 216, 160, 134, 186, 255, 255, 255, 47, 233, 255, 149, 100, 81, 194, 80, 128, 128, 128, 128, 128, 128, 128, 128]),
];

#[test]
fn rtn_matches_reference_quantizer() {
    let w: Vec<f32> = REF_W_BITS.iter().map(|&b| f32::from_bits(b)).collect();
    for (bits, sym, scales, zeros, codes) in REF_CASES {
        let q = rtn(&w, 4, 16, bits, Some(8), sym);
        let got_scales: Vec<u32> = q.scales.iter().map(|s| s.to_bits()).collect();
        assert_eq!(got_scales, scales.to_vec(), "scales, {bits}-bit sym={sym}");
        assert_eq!(q.zeros, zeros.to_vec(), "zeros, {bits}-bit sym={sym}");
        assert_eq!(q.codes, codes.to_vec(), "codes, {bits}-bit sym={sym}");
    }
}
