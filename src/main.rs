//! The `autoquant` command-line tool.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    // Ctrl-C / SIGTERM: delete the output being written (a long quantization may have put
    // gigabytes in its hidden temporary folder), then exit as interrupted.
    // Resumable work (a streamed quantization's finished blocks) is kept and named.
    let _ = ctrlc::set_handler(|| {
        for p in autoquant::fsutil::remove_live_temporaries() {
            eprintln!("interrupted: removed the partial output {}", p.display());
        }
        for p in autoquant::fsutil::resumable_folders() {
            eprintln!(
                "interrupted: the finished blocks are kept in {}; run the same command with \
                 --resume to continue",
                p.display()
            );
        }
        std::process::exit(130);
    });
    // A file-size limit (ulimit -f) would end the process with SIGXFSZ, silently and with the
    // temporary output left behind; ignored, the write fails with EFBIG and the run ends with an
    // error naming the file, removing its temporaries like any other failure.
    // SAFETY: only changes the process-wide disposition of SIGXFSZ; no handler runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Worker stacks as large as a main thread's, because the command itself runs on a worker
    // (below). Nothing has built the global pool yet, so a failure here is the system refusing
    // the threads (a memory or process limit): an error, not a panic.
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads.unwrap_or(0))
        .stack_size(8 << 20)
        .build_global()
    {
        let asked = args
            .threads
            .map_or("one per core".to_string(), |n| n.to_string());
        eprintln!("error: cannot start the worker threads ({asked}; --threads): {e}");
        std::process::exit(1);
    }
    let json = args.json;
    let peak = args.peak_rss;
    // Run the command on a pool worker: a parallel section called from outside the pool hands
    // its work over and sleeps until it is done, tens of microseconds per call, and decoding one
    // token makes some 150 such calls (measured: NF4 decoding 75 → 96 tok/s on 2 threads).
    let (done, result) = std::sync::mpsc::channel();
    rayon::spawn(move || {
        let _ = done.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            || cli::run(args),
        )));
    });
    let outcome = match result.recv() {
        Ok(Ok(outcome)) => outcome,
        // A panic (already reported by the hook) ends the process as it would on this thread.
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => std::process::exit(101),
    };
    match outcome {
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
