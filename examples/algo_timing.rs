//! Time the hot spots of GPTQ and AWQ at SmolLM2-135M layer shapes (hidden 576, intermediate
//! 1536, group 64): `cargo run --release --example algo_timing`.
//!
//! GPTQ: accumulating the Hessian of 2048 calibration rows, and the column sweep with and
//! without act-order. AWQ: the scale search (with and without the module forward it
//! inspects), the clipping search and the final pseudo-quantization, on 8192 rows.
use autoquant::kernels::matmul_nt;
use autoquant::qtypes::grid::QuantParams;
use autoquant::qtypes::{Bits, GroupSize};
use autoquant::quant::awq::{pseudo_quantize, search_clip, search_scales, AwqOptions};
use autoquant::quant::gptq::{gptq_quantize, GptqOptions, Hessian};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn normals(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
    // Box-Muller: two uniforms give one standard normal.
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
            scale * ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

fn gptq(rng: &mut rand::rngs::StdRng) {
    for (n, k) in [(1536usize, 576usize), (576, 1536)] {
        let rows = 2048;
        let x = normals(rng, rows * k, 1.0);
        let mut h = Hessian::new(k);
        let t = Instant::now();
        for _ in 0..4 {
            h.add_sample(&x, rows);
        }
        let per = t.elapsed().as_secs_f64() / 4.0;
        let w = normals(rng, n * k, 0.02);
        let mut opts = GptqOptions::new(QuantParams {
            bits: Bits::B4,
            group_size: GroupSize::from_size(Some(64)),
            sym: true,
        });
        let t = Instant::now();
        gptq_quantize(&w, n, k, &h, &opts).unwrap();
        let tq = t.elapsed().as_secs_f64();
        opts.desc_act = true;
        let t = Instant::now();
        gptq_quantize(&w, n, k, &h, &opts).unwrap();
        let td = t.elapsed().as_secs_f64();
        println!(
            "gptq N={n} K={k}: add_sample({rows} rows) {:.1} ms ({:.1} GFLOP/s), sweep {:.1} ms, \
             act-order {:.1} ms",
            per * 1e3,
            (rows * k * k) as f64 / per / 1e9,
            tq * 1e3,
            td * 1e3
        );
    }
}

fn awq(rng: &mut rand::rngs::StdRng) {
    let opts = AwqOptions {
        group_size: 64,
        ..AwqOptions::default()
    };
    let rows = 8192;
    let linear = |x: &[f32], k: usize, w: &[f32], n: usize| {
        let mut out = vec![0f32; rows * n];
        matmul_nt(x, rows, k, w, n, &mut out);
        out
    };
    for (name, n, k) in [
        ("o_proj", 576, 576),
        ("gate_proj", 1536, 576),
        ("down_proj", 576, 1536),
    ] {
        let x = normals(rng, rows * k, 1.0);
        let w = normals(rng, n * k, 0.05);
        let t = Instant::now();
        let mut inspect = |ws: &[Vec<f32>]| linear(&x, k, &ws[0], n);
        let s = search_scales(&x, rows, k, &[(&w, n)], &mut inspect, &opts).unwrap();
        let t_scale = t.elapsed();
        let t = Instant::now();
        let mut noop = |_: &[Vec<f32>]| vec![0f32; 1];
        search_scales(&x, rows, k, &[(&w, n)], &mut noop, &opts).unwrap();
        let t_overhead = t.elapsed();
        let t = Instant::now();
        let mv = search_clip(&x, rows, k, &w, n, &opts).unwrap();
        let t_clip = t.elapsed();
        let t = Instant::now();
        let q = pseudo_quantize(&w, n, k, &opts).unwrap();
        let t_q = t.elapsed();
        println!(
            "awq {name} [{n}, {k}], {rows} rows: search_scales {t_scale:.2?} (without the module \
             forward {t_overhead:.2?}), search_clip {t_clip:.2?}, pseudo_quantize {t_q:.2?} \
             (ratio {}, {} thresholds, {} codes)",
            s.best_ratio,
            mv.len(),
            q.codes.len()
        );
    }
}

fn main() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    gptq(&mut rng);
    awq(&mut rng);
}
