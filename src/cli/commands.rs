//! One function per command. Human-readable output goes to stdout, or JSON with `--json`;
//! progress goes to stderr.

use super::*;
use autoquant::auto::{parse_size, save_pretrained, Checkpoint, Pretrained, SaveOptions};
use autoquant::eval::{bench as benchmod, memory, perplexity};
use autoquant::generate::{generate as run_generate, GenerationConfig};
use autoquant::hub::HubOptions;
use autoquant::kernels::bnb::FourBitDecode;
use autoquant::models::LoadOptions;
use autoquant::qtypes::bnb::{BitsAndBytesConfig, FourBitType, Int8Compute};
use autoquant::tensor::WeightDType;
use autoquant::tokenizer::ChatMessage;
use autoquant::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::io::Write;

pub struct Context {
    pub json: bool,
}

impl HubArgs {
    fn options(&self) -> HubOptions {
        HubOptions {
            revision: self.revision.clone(),
            cache_dir: self.cache_dir.clone(),
            offline: self.offline.then_some(true),
            ..Default::default()
        }
    }
}

impl ModelArgs {
    fn hub(&self) -> HubOptions {
        self.hub.options()
    }
    /// The bitsandbytes load-time quantization asked for, if any.
    fn bnb(&self) -> Result<Option<BitsAndBytesConfig>> {
        if !(self.load_in_4bit || self.load_in_8bit) {
            return Ok(None);
        }
        let cfg = BitsAndBytesConfig {
            load_in_4bit: self.load_in_4bit,
            load_in_8bit: self.load_in_8bit,
            quant_type: FourBitType::parse(&self.bnb_4bit_quant_type)?,
            double_quant: self.double_quant,
            compute_dtype: WeightDType::parse(&self.compute_dtype)?,
            int8_threshold: self.int8_threshold,
            int8_compute: if self.int8_dequantized {
                Int8Compute::DequantizedWeights
            } else {
                Int8Compute::Int8Matmul
            },
            ..Default::default()
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }
    fn load(&self) -> Result<Pretrained> {
        let opts = LoadOptions {
            dtype: WeightDType::parse(&self.dtype)?,
            bnb: self.bnb()?,
            lm_head_int8: self.lm_head_int8,
            four_bit_decode: FourBitDecode::parse(&self.bnb_4bit_decode)?,
        };
        let p = Pretrained::load(&self.model, &opts, &self.hub())?;
        if opts.bnb.is_some() || p.config.raw.contains_key("quantization_config") {
            let r = autoquant::quant::bnb::memory_report(p.model.as_ref());
            if r.quantized_params > 0 {
                eprintln!("memory: {}", r.explanation);
            }
        }
        eprintln!(
            "loaded {} ({}, {} layers, {:.1}M params, {} weights, {:.1} MiB) in {:.2}s",
            p.files.describe(),
            p.config.model_type,
            p.config.num_layers(),
            p.model.num_parameters() as f64 / 1e6,
            self.dtype,
            p.model.footprint_bytes() as f64 / (1 << 20) as f64,
            p.load_seconds
        );
        Ok(p)
    }
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialize")
    );
}

fn peak_rss() -> serde_json::Value {
    memory::peak_rss_bytes().map_or(serde_json::Value::Null, |b| b.into())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn progress_bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} (elapsed {{elapsed}}, ETA {{eta}})"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

pub fn info(ctx: &Context, a: InfoArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&a.model.model, &a.model.hub())?;
    let counts = memory::count_parameters(&ckpt.config);
    let mut dtypes: std::collections::BTreeMap<String, usize> = Default::default();
    let mut tensors = vec![];
    for name in ckpt.weights.names() {
        if let Some(i) = ckpt.weights.info(&name) {
            *dtypes.entry(format!("{:?}", i.dtype)).or_default() += 1;
            tensors
                .push(json!({"name": name, "dtype": format!("{:?}", i.dtype), "shape": i.shape}));
        }
    }
    let files: Vec<String> = ckpt
        .weights
        .files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let stored_dtypes = match &ckpt.files.gguf {
        Some(g) => {
            let f = autoquant::formats::gguf::GgufFile::open(g)?;
            let mut m: std::collections::BTreeMap<String, usize> = Default::default();
            for t in f.tensor_infos() {
                *m.entry(t.ggml_type.name().to_string()).or_default() += 1;
            }
            m
        }
        None => dtypes.clone(),
    };
    let value = json!({
        "source": ckpt.files.describe(),
        "model_type": ckpt.config.model_type,
        "architecture": format!("{:?}", ckpt.config.arch),
        "parameters": counts,
        "stored_dtypes": stored_dtypes,
        "files": files,
        "config": ckpt.config.raw,
        "tensors": if a.tensors { json!(tensors) } else { json!(tensors.len()) },
        "peak_rss_bytes": peak_rss(),
    });
    if ctx.json {
        print_json(&value);
        return Ok(());
    }
    println!("source:        {}", ckpt.files.describe());
    println!("model_type:    {}", ckpt.config.model_type);
    println!("architecture:  {:#?}", ckpt.config.arch);
    println!(
        "parameters:    {} total ({} in decoder-block linears, {} embeddings/head, {} other)",
        counts.total, counts.block_linear_weights, counts.embeddings_and_head, counts.other
    );
    println!("stored dtypes: {:?}", stored_dtypes);
    println!("tensors:       {}", tensors.len());
    for f in &files {
        println!("file:          {f}");
    }
    if a.tensors {
        for t in &tensors {
            println!(
                "  {} {} {}",
                t["name"].as_str().unwrap_or(""),
                t["dtype"].as_str().unwrap_or(""),
                t["shape"]
            );
        }
    }
    Ok(())
}

pub fn estimate(ctx: &Context, a: EstimateArgs) -> Result<()> {
    let path = std::path::Path::new(&a.model);
    let config = if path.is_file() && path.extension().is_some_and(|e| e == "json") {
        autoquant::config::AutoConfig::from_pretrained(path)?
    } else {
        let files = autoquant::hub::resolve(
            &a.model,
            &HubOptions {
                offline: a.offline.then_some(true),
                ..Default::default()
            },
        )?;
        match &files.gguf {
            Some(g) => {
                let f = autoquant::formats::gguf::GgufFile::open(g)?;
                autoquant::config::AutoConfig::from_value(f.hf_config()?, g, Some(g))?
            }
            None => autoquant::config::AutoConfig::from_pretrained(&files.dir)?,
        }
    };
    let e = memory::estimate(&config, a.group_size);
    if ctx.json {
        print_json(&json!(e));
        return Ok(());
    }
    let p = &e.params;
    println!("{} model: {} parameters", e.model_type, p.total);
    println!(
        "  = {} in decoder-block linear weights (quantizable) + {} embeddings/lm_head + {} norms, biases, positions",
        p.block_linear_weights, p.embeddings_and_head, p.other
    );
    println!("Weights only (activations and KV cache come on top):");
    for r in &e.rows {
        println!(
            "  {:<10} {:>9.3} GB {:>9.3} GiB  {:>6.2} bits/weight  — {}",
            r.scheme,
            memory::gb(r.bytes),
            memory::gib(r.bytes),
            r.bits_per_block_weight,
            r.explanation
        );
    }
    Ok(())
}

pub fn generate(ctx: &Context, a: GenerateArgs) -> Result<()> {
    let p = a.model.load()?;
    let mut cfg = GenerationConfig {
        eos_token_ids: p.generation.eos_token_ids.clone(),
        ..Default::default()
    };
    cfg.max_new_tokens = a.max_new_tokens;
    cfg.do_sample =
        !a.greedy && (a.temperature.is_some() || a.top_k.is_some() || a.top_p.is_some());
    cfg.temperature = a.temperature.unwrap_or(1.0);
    cfg.top_k = a.top_k.unwrap_or(if cfg.do_sample { 50 } else { 0 });
    cfg.top_p = a.top_p.unwrap_or(1.0);
    cfg.repetition_penalty = a.repetition_penalty;
    cfg.seed = a.seed;
    cfg.stop_strings = a.stop.clone();
    let (text, add_special) = if a.chat {
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s.clone()));
        }
        msgs.push(ChatMessage::new("user", a.prompt.clone()));
        (p.tokenizer.apply_chat_template(&msgs, true)?, false)
    } else {
        (a.prompt.clone(), true)
    };
    let ids = p.tokenizer.encode(&text, add_special)?;
    let mut stream = p.tokenizer.stream_decoder(true);
    let mut generated = String::new();
    let mut printed = 0usize;
    let stdout = std::io::stdout();
    let longest_stop = cfg.stop_strings.iter().map(|s| s.len()).max().unwrap_or(0);
    let out = run_generate(p.model.as_ref(), &ids, &cfg, |id| {
        if let Some(piece) = stream.push(id)? {
            generated.push_str(&piece);
        }
        let stop_at = cfg
            .stop_strings
            .iter()
            .filter_map(|s| generated.find(s.as_str()))
            .min();
        // Print what can no longer turn into a stop string.
        let safe = match stop_at {
            Some(i) => i,
            None => floor_char_boundary(
                &generated,
                generated
                    .len()
                    .saturating_sub(longest_stop.saturating_sub(1)),
            ),
        };
        if !ctx.json && safe > printed {
            let mut h = stdout.lock();
            let _ = h.write_all(generated[printed..safe].as_bytes());
            let _ = h.flush();
            printed = safe;
        }
        if let Some(i) = stop_at {
            generated.truncate(i);
        }
        Ok(stop_at.is_some())
    })?;
    if out.stop_reason != autoquant::generate::StopReason::StopString {
        if let Some(rest) = stream.finish()? {
            generated.push_str(&rest);
        }
    }
    if ctx.json {
        print_json(&json!({
            "prompt": text,
            "prompt_ids": ids,
            "generated_ids": out.new_ids,
            "text": generated,
            "stop_reason": out.stop_reason,
            "prefill_seconds": out.prefill_seconds,
            "decode_seconds": out.decode_seconds,
            "decode_tokens_per_second": out.decode_tokens_per_second(),
            "peak_rss_bytes": peak_rss(),
        }));
    } else {
        if generated.len() > printed {
            print!("{}", &generated[printed..]);
        }
        println!();
        eprintln!(
            "[{} prompt tokens, {} new tokens, stop: {:?}, prefill {:.2}s, decode {:.1} tok/s]",
            out.prompt_tokens,
            out.new_ids.len(),
            out.stop_reason,
            out.prefill_seconds,
            out.decode_tokens_per_second()
        );
    }
    Ok(())
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

pub fn ppl(ctx: &Context, a: PplArgs) -> Result<()> {
    let p = a.model.load()?;
    let calibrated_on_data = calibration_overlap(&p.config, &a.data)?;
    if let Some(note) = &calibrated_on_data {
        eprintln!("warning: {note}");
    }
    let text = autoquant::text::load_text(&a.data)?;
    let ids = p.tokenizer.encode(&text, a.add_special_tokens)?;
    let protocol = if a.llama_cpp {
        perplexity::Protocol::LlamaCpp {
            bos: if p.tokenizer.adds_bos() {
                p.tokenizer.bos_token_id()
            } else {
                None
            },
        }
    } else if let Some(stride) = a.stride {
        perplexity::Protocol::Stride { stride }
    } else {
        perplexity::Protocol::Paper
    };
    let opts = perplexity::PplOptions {
        seqlen: a.seqlen,
        protocol,
        max_windows: a.max_windows,
        token_by_token: a.token_by_token,
    };
    let mut pb: Option<ProgressBar> = None;
    let r = perplexity::perplexity(
        p.model.as_ref(),
        &ids,
        &p.tokenizer.describe(),
        &opts,
        |done, total, running| {
            let bar = pb.get_or_insert_with(|| progress_bar(total, "perplexity"));
            bar.set_position(done as u64);
            bar.set_message(format!("ppl {running:.3}"));
        },
    )?;
    if let Some(bar) = pb {
        bar.finish_and_clear();
    }
    if ctx.json {
        let mut v = json!(r);
        v["data"] = json!(a.data.display().to_string());
        v["warning"] = json!(calibrated_on_data);
        v["model"] = json!(a.model.model);
        v["dtype"] = json!(a.model.dtype);
        v["peak_rss_bytes"] = peak_rss();
        print_json(&v);
    } else {
        println!(
            "perplexity {:.4}  ({} protocol{}, seqlen {}, {} windows, {} scored tokens of {}, tokenizer {}, {:.1}s, {:.0} tok/s)",
            r.perplexity, r.protocol, if r.token_by_token { ", token by token" } else { "" },
            r.seqlen, r.windows, r.scored_tokens, r.text_tokens, r.tokenizer, r.seconds, r.tokens_per_second
        );
    }
    Ok(())
}

pub fn bench(ctx: &Context, a: BenchArgs) -> Result<()> {
    let p = a.model.load()?;
    let opts = benchmod::BenchOptions {
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        repetitions: a.repetitions,
        all_logits: false,
    };
    let r = benchmod::bench(p.model.as_ref(), &opts)?;
    if ctx.json {
        let mut v = json!(r);
        v["model"] = json!(a.model.model);
        v["dtype"] = json!(a.model.dtype);
        print_json(&v);
    } else {
        println!(
            "prefill pp{}: {:.1} tok/s   decode tg{}: {:.1} tok/s   footprint {:.1} MiB   peak RSS {:.1} MiB   ({} threads)",
            r.prompt_len,
            r.prefill_tokens_per_second,
            r.gen_len,
            r.decode_tokens_per_second,
            mib(r.footprint_bytes as u64),
            mib(r.peak_rss_bytes.unwrap_or(0)),
            r.threads
        );
    }
    Ok(())
}

pub fn convert(ctx: &Context, a: ConvertArgs) -> Result<()> {
    if a.model.lm_head_int8 {
        return Err(Error::InvalidArgument(
            "--lm-head-int8 is a run-time option (generate, ppl, bench, info); convert saves \
             lm_head as the checkpoint holds it"
                .into(),
        ));
    }
    let p = a.model.load()?;
    let opts = SaveOptions {
        dtype: WeightDType::parse(&a.model.dtype)?,
        max_shard_bytes: parse_size(&a.max_shard_size)?,
        overwrite: a.overwrite,
    };
    if opts.max_shard_bytes == 0 {
        return Err(Error::InvalidArgument(
            "--max-shard-size must be positive".into(),
        ));
    }
    autoquant::fsutil::refuse_output_over_inputs(&a.output, &p.input_files())?;
    let dir = save_pretrained(
        p.model.as_ref(),
        Some(&p.tokenizer),
        Some(&p.generation),
        &a.output,
        &opts,
    )?;
    if ctx.json {
        print_json(
            &json!({"output": dir.display().to_string(), "dtype": a.model.dtype, "peak_rss_bytes": peak_rss()}),
        );
    } else {
        println!("wrote {}", dir.display());
    }
    Ok(())
}

pub fn quantize(ctx: &Context, a: QuantizeArgs) -> Result<()> {
    use autoquant::qtypes::grid::QuantParams;
    use autoquant::quant::calib::{CalibData, CalibOptions};
    use autoquant::quant::stream::{self, Method, StreamOptions};
    let hub = a.hub.options();
    let max_shard_bytes = parse_size(&a.max_shard_size)?;
    if max_shard_bytes == 0 {
        return Err(Error::InvalidArgument(
            "--max-shard-size must be positive".into(),
        ));
    }
    let out_dtype = WeightDType::parse(&a.out_dtype)?;
    let method = match a.method {
        QuantMethod::Rtn => Method::Rtn,
        QuantMethod::Gptq => Method::Gptq,
        QuantMethod::Awq => Method::Awq,
        QuantMethod::AwqGptq => Method::AwqGptq,
        QuantMethod::BnbNf4 | QuantMethod::BnbFp4 | QuantMethod::BnbInt8 => {
            if a.resume {
                return Err(Error::InvalidArgument(format!(
                    "--resume continues the streamed methods (rtn, gptq, awq, awq-gptq); \
                     {} quantizes the loaded model in one pass and has nothing to resume",
                    a.method.name()
                )));
            }
            return quantize_bnb(ctx, &a, &hub, out_dtype, max_shard_bytes);
        }
    };
    if a.double_quant {
        return Err(Error::InvalidArgument(
            "--double-quant applies to --method bnb-nf4/bnb-fp4".into(),
        ));
    }
    // AWQ's own grid is asymmetric (zero point per group).
    let params = QuantParams {
        bits: a.bits,
        group_size: a.group_size,
        sym: !(a.asym || method == Method::Awq),
    };
    let awq_calib = method == Method::Awq || method == Method::AwqGptq;
    let nsamples = a.nsamples.unwrap_or(128);
    let seqlen = a.seqlen.unwrap_or(if awq_calib { 512 } else { 2048 });
    let mut opts = if a.reference {
        StreamOptions::reference(method, params)
    } else {
        StreamOptions::new(method, params)
    };
    opts.damp_percent = a.damp;
    if a.desc_act || a.no_desc_act {
        opts.desc_act = a.desc_act;
    }
    opts.static_groups = a.static_groups;
    opts.true_sequential = !a.no_true_sequential;
    if a.clip_search || a.no_clip_search {
        opts.clip_search = a.clip_search;
    }
    if let Some(w) = a.sink_weight {
        opts.sink_weight = w;
    }
    opts.awq.duo_scaling = !a.awq_activation_only;
    opts.awq.apply_clip = !a.awq_no_clip;
    opts.awq_search_tokens = (a.awq_search_tokens > 0).then_some(a.awq_search_tokens);
    opts.dtype = out_dtype;
    opts.max_shard_bytes = max_shard_bytes;
    opts.overwrite = a.overwrite;
    opts.resume = a.resume;
    opts.progress = true;

    // Text calibration (and the dry run's estimate of it): sizes checked before anything is
    // read or allocated.
    let text_calib = method.calibrated() && a.calib_windows.is_none();
    if text_calib {
        CalibOptions {
            nsamples,
            seqlen,
            seed: a.seed,
            mode: None,
        }
        .validate()?;
    }
    let ckpt = Checkpoint::open(&a.model, &hub)?;
    if text_calib {
        ckpt.config
            .check_context(seqlen, &format!("--seqlen {seqlen}"))?;
    }
    // Saved windows say exactly how many tokens there are; text gives at most nsamples × seqlen.
    let calib_tokens = match &a.calib_windows {
        _ if !method.calibrated() => 0,
        Some(path) => {
            let windows = CalibData::from_windows_json(path)?;
            if let Some(longest) = windows.samples.iter().map(Vec::len).max() {
                ckpt.config.check_context(
                    longest,
                    &format!("a calibration window of {longest} tokens"),
                )?;
            }
            windows.num_tokens()
        }
        None => nsamples * seqlen,
    };
    if a.dry_run {
        let e = stream::estimate(&ckpt.config, ckpt.weights.as_ref(), &opts, calib_tokens)?;
        if ctx.json {
            print_json(&json!({
                "method": method.name(),
                "output_bytes": e.output_bytes,
                "bits_per_weight": e.bits_per_weight,
                "quantized_layers": e.quantized_layers,
                "peak_bytes": e.peak_bytes,
                "block_bytes": e.block_bytes,
                "activation_bytes": e.activation_bytes,
                "hessian_bytes": e.hessian_bytes,
                "stem_bytes": e.stem_bytes,
            }));
        } else {
            println!(
                "{} layers to quantize with {}: output {:.1} MiB ({:.3} bits per quantized weight)",
                e.quantized_layers,
                method.name(),
                mib(e.output_bytes),
                e.bits_per_weight
            );
            println!(
                "expected peak memory {:.1} MiB: one block {:.1} MiB, activations {:.1} MiB, \
                 Hessian {:.1} MiB, embeddings {:.1} MiB",
                mib(e.peak_bytes),
                mib(e.block_bytes),
                mib(e.activation_bytes),
                mib(e.hessian_bytes),
                mib(e.stem_bytes)
            );
        }
        return Ok(());
    }
    let output = a
        .output
        .clone()
        .ok_or_else(|| Error::InvalidArgument("-o/--output is required".into()))?;
    // Only text calibration needs the tokenizer; without one the output has none either.
    let tokenizer = match ckpt.tokenizer() {
        Ok(t) => Some(t),
        Err(e) if a.calib.is_none() => {
            eprintln!("note: no tokenizer ({e}); the output will have none");
            None
        }
        Err(e) => return Err(e),
    };
    let generation = match &tokenizer {
        Some(t) => Some(autoquant::auto::generation_defaults(
            &ckpt.files.dir,
            &ckpt.config,
            t,
            ckpt.files.gguf.is_none(),
        )?),
        None => None,
    };
    let calib = match (method, &a.calib, &a.calib_windows) {
        (Method::Rtn, None, None) => None,
        (Method::Rtn, _, _) => {
            eprintln!("note: RTN uses no calibration data; --calib is ignored");
            None
        }
        (_, Some(path), None) => {
            let opts = CalibOptions {
                nsamples,
                seqlen,
                seed: a.seed,
                mode: awq_calib.then_some(autoquant::quant::calib::CalibMode::Blocks),
            };
            let tokenizer = tokenizer
                .as_ref()
                .expect("text calibration has a tokenizer");
            Some(CalibData::from_file(path, tokenizer, &opts)?)
        }
        (_, None, Some(path)) => Some(CalibData::from_windows_json(path)?),
        (_, _, _) => {
            return Err(Error::InvalidArgument(format!(
                "{} needs calibration data: --calib FILE (or --calib-windows JSON)",
                method.name()
            )))
        }
    };
    let calib = calib.map(|mut c| {
        let widest = stream::plan(&ckpt.config, ckpt.weights.as_ref(), &opts)
            .map(|p| p.quantized.values().map(|&(_, k)| k).max().unwrap_or(0))
            .unwrap_or(0);
        c.check_against(widest);
        for w in &c.warnings {
            eprintln!("warning: {w}");
        }
        eprintln!("calibration: {} ({} tokens)", c.description, c.num_tokens());
        c
    });
    let r = stream::quantize_to_gptq(
        &ckpt.config,
        ckpt.weights.as_ref(),
        tokenizer.as_ref(),
        generation.as_ref(),
        calib.as_ref(),
        &output,
        &opts,
    )?;
    for w in r
        .warnings
        .iter()
        .skip(calib.as_ref().map_or(0, |c| c.warnings.len()))
    {
        eprintln!("warning: {w}");
    }
    let checkpoint_format = opts.checkpoint_format();
    if ctx.json {
        let layers: Vec<serde_json::Value> = r
            .layers
            .iter()
            .map(|l| {
                json!({"name": l.name, "loss": l.loss, "damp": l.damp_used,
                       "dead_columns": l.dead_columns, "seconds": l.seconds})
            })
            .collect();
        print_json(&json!({
            "output": r.dir.display().to_string(),
            "method": method.name(),
            "bits": a.bits,
            "group_size": a.group_size,
            "sym": !(a.asym || method == Method::Awq),
            "checkpoint_format": checkpoint_format,
            "settings": opts.rounding_settings(),
            "seconds": r.seconds,
            "peak_rss_bytes": r.peak_rss_bytes,
            "output_bytes": r.output_bytes,
            "quantized_params": r.quantized_params,
            "bits_per_weight": r.bits_per_weight,
            "calibration": r.calibration,
            "warnings": r.warnings,
            "layers": layers,
        }));
    } else {
        println!(
            "wrote {} ({} {}-bit, group {}, {}, {}) in {:.1}s",
            r.dir.display(),
            method.name(),
            a.bits,
            a.group_size,
            if a.asym || method == Method::Awq {
                "asymmetric"
            } else {
                "symmetric"
            },
            checkpoint_format,
            r.seconds
        );
        if opts.runs_gptq() {
            println!(
                "GPTQ: act-order {}, sink weight {}, clipping search {}, damp {}",
                on_off(opts.desc_act),
                opts.sink_weight,
                on_off(opts.clip_search),
                opts.damp_percent
            );
        }
        println!(
            "output {:.1} MiB; {:.3} bits per quantized weight (scales, zeros, g_idx included); \
             peak RSS {}",
            mib(r.output_bytes),
            r.bits_per_weight,
            r.peak_rss_bytes
                .map_or("unknown".into(), |b| format!("{:.1} MiB", mib(b)))
        );
    }
    Ok(())
}

/// `quantize --method bnb-nf4|bnb-fp4|bnb-int8`: the bitsandbytes serialization.
fn quantize_bnb(
    ctx: &Context,
    a: &QuantizeArgs,
    hub: &HubOptions,
    out_dtype: WeightDType,
    max_shard_bytes: u64,
) -> Result<()> {
    use autoquant::quant::bnb::{quantize_checkpoint, BnbSaveOptions};
    let config = match a.method {
        QuantMethod::BnbNf4 => BitsAndBytesConfig::four_bit(FourBitType::Nf4, a.double_quant),
        QuantMethod::BnbFp4 => BitsAndBytesConfig::four_bit(FourBitType::Fp4, a.double_quant),
        _ if a.double_quant => {
            return Err(Error::InvalidArgument(
                "--double-quant applies to 4-bit methods only".into(),
            ))
        }
        _ => BitsAndBytesConfig::eight_bit(6.0),
    };
    let output = a
        .output
        .clone()
        .ok_or_else(|| Error::InvalidArgument("-o/--output is required".into()))?;
    let t0 = std::time::Instant::now();
    let p = Pretrained::load(&a.model, &LoadOptions::default(), hub)?;
    autoquant::fsutil::refuse_output_over_inputs(&output, &p.input_files())?;
    let r = quantize_checkpoint(
        p.model.as_ref(),
        Some(&p.tokenizer),
        Some(&p.generation),
        &output,
        &BnbSaveOptions {
            config,
            dtype: out_dtype,
            max_shard_bytes,
            overwrite: a.overwrite,
        },
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    if ctx.json {
        print_json(&json!({
            "output": r.dir.display().to_string(),
            "method": a.method.name(),
            "seconds": seconds,
            "peak_rss_bytes": peak_rss(),
            "quantized_layers": r.quantized_layers,
            "skipped_layers": r.skipped_layers,
            "quantized_params": r.memory.quantized_params,
            "bits_per_weight": r.memory.bits_per_param,
            "bytes_before": r.memory.bytes_before,
            "bytes_after": r.memory.bytes_after,
            "memory": r.memory.explanation,
        }));
    } else {
        println!(
            "wrote {} ({}, {} layers quantized, {} kept: {}) in {seconds:.1}s",
            r.dir.display(),
            a.method.name(),
            r.quantized_layers,
            r.skipped_layers.len(),
            r.skipped_layers.join(", ")
        );
        println!("memory: {}", r.memory.explanation);
    }
    Ok(())
}

pub fn synth(ctx: &Context, a: SynthArgs) -> Result<()> {
    let config = autoquant::config::AutoConfig::from_pretrained(&a.config)?;
    let dtype = WeightDType::parse(&a.dtype)?;
    let opts = SaveOptions {
        dtype,
        max_shard_bytes: parse_size(&a.max_shard_size)?,
        overwrite: a.overwrite,
    };
    let params: u64 = autoquant::models::checkpoint_tensors(&config)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    eprintln!(
        "writing {} ({} layers, {:.2}B parameters, {:.2} GiB in {})",
        a.output.display(),
        config.num_layers(),
        params as f64 / 1e9,
        (params * dtype.bytes() as u64) as f64 / (1u64 << 30) as f64,
        dtype.name()
    );
    let t0 = std::time::Instant::now();
    let saved = autoquant::auto::write_random_checkpoint(&config, a.seed, dtype, &a.output, &opts)?;
    let seconds = t0.elapsed().as_secs_f64();
    if ctx.json {
        print_json(&json!({
            "output": a.output.display().to_string(),
            "parameters": params,
            "bytes": saved.total_size,
            "files": saved.files.len(),
            "seconds": seconds,
            "peak_rss_bytes": peak_rss(),
        }));
    } else {
        println!(
            "wrote {} ({} files, {:.2} GiB) in {seconds:.1}s; peak RSS {:.1} MiB",
            a.output.display(),
            saved.files.len(),
            saved.total_size as f64 / (1u64 << 30) as f64,
            memory::peak_rss_bytes().map_or(0.0, mib)
        );
    }
    Ok(())
}

/// A note when `data` is the very file the model was calibrated on (its sha256 is recorded in
/// the GPTQ `quantization_config.meta`): perplexity there flatters the quantization.
fn calibration_overlap(
    config: &autoquant::config::AutoConfig,
    data: &std::path::Path,
) -> Result<Option<String>> {
    let Some(recorded) = config
        .raw
        .get("quantization_config")
        .and_then(|q| q.get("meta"))
        .and_then(|m| m.get("calibration_sha256"))
        .and_then(|v| v.as_str())
    else {
        return Ok(None);
    };
    let bytes = std::fs::read(data).map_err(|e| Error::io(data, e))?;
    Ok(
        (autoquant::fsutil::sha256_hex(&bytes) == recorded).then(|| {
            format!(
                "{} is the file this model was calibrated on; its perplexity is optimistic \
             (evaluate on held-out text)",
                data.display()
            )
        }),
    )
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
