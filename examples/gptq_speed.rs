//! Time GPTQ on one large linear layer (Llama-7B shapes by default):
//! `cargo run --release --example gptq_speed -- [N K]`.
use autoquant::qtypes::grid::QuantParams;
use autoquant::qtypes::{Bits, GroupSize};
use autoquant::quant::gptq::{gptq_quantize, GptqOptions, Hessian};
use rand::{Rng, SeedableRng};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let shapes = if args.len() == 2 {
        vec![(args[0], args[1])]
    } else {
        vec![(4096, 4096), (11008, 4096), (4096, 11008)]
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for (n, k) in shapes {
        let rows = 512;
        let x: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-0.05f32..0.05)).collect();
        let t = std::time::Instant::now();
        let mut h = Hessian::new(k);
        for _ in 0..2 {
            h.add_sample(&x, rows);
        }
        let th = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let opts = GptqOptions::new(QuantParams {
            bits: Bits::B4,
            group_size: GroupSize::Size(128),
            sym: true,
        });
        let r = gptq_quantize(&w, n, k, &h, &opts).expect("gptq");
        let tq = t.elapsed().as_secs_f64();
        println!(
            "N={n} K={k}: hessian {th:.2}s, gptq {tq:.2}s ({:.1} GFLOP/s for N*K^2), loss {:.3}",
            (n as f64) * (k as f64).powi(2) / tq / 1e9,
            r.loss
        );
    }
}
