//! The `autoquant` command-line tool.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    // Ctrl-C / SIGTERM: delete the output being written (a long quantization may have put
    // gigabytes in its hidden temporary folder), then exit as interrupted.
    let _ = ctrlc::set_handler(|| {
        for p in autoquant::fsutil::remove_live_temporaries() {
            eprintln!("interrupted: removed the partial output {}", p.display());
        }
        std::process::exit(130);
    });
    if let Some(n) = args.threads {
        // Ignore the error: it only means the pool was already built.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    let json = args.json;
    let peak = args.peak_rss;
    match cli::run(args) {
        Ok(()) => {
            if peak && !json {
                if let Some(b) = autoquant::eval::memory::peak_rss_bytes() {
                    eprintln!("peak RSS: {:.1} MiB", b as f64 / (1 << 20) as f64);
                }
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
