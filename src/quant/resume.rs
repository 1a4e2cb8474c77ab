//! What a streamed quantization keeps so that, after a crash, `kill -9` or a reboot, it can
//! continue from its last finished block and write the same bytes as a run never interrupted.
//!
//! The work lives in a hidden folder beside the output, `.<output name>.partial/`:
//!
//! | file | holds |
//! |---|---|
//! | `progress.json` | the run's fingerprint, one record per finished block (layer reports, warnings), and which activation file is current |
//! | `lock` | locked (`flock`) by the run using the folder, so two runs never share it |
//! | `block-NNNNN.safetensors` | every tensor block `NNNNN` produced: packed weights, and float tensors the method changed |
//! | `inputs-NNNNN.safetensors` | calibration activations entering block `NNNNN`, f32 `[tokens, hidden]` per sample |
//!
//! Every file is written whole and renamed into place after fsync (`progress.json` last), so the
//! journal always describes files that are complete. A block's activations are saved after the
//! block when the last save took under a tenth of the time since it (and always after the first
//! block), which bounds the extra disk traffic to about a tenth of the run; a resumed run starts
//! at the block whose inputs were saved last and redoes the blocks after it, which gives the same
//! bytes because every step is deterministic. The fingerprint (settings, model files, calibration
//! tokens, program version) must match for `--resume` to continue; otherwise the run is refused
//! and names what changed. The folder is deleted once the output is in place. See
//! `docs/architecture.md` ("Interrupted runs").

use crate::error::{Error, Result};
use crate::formats::safetensors::{SafetensorsFile, SafetensorsWriter, TensorSpec};
use crate::formats::WeightSource;
use crate::tensor::{DType, RawTensor};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PROGRESS: &str = "progress.json";

/// Hashes of everything that decides the output bytes; a resumed run must match every one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Method, grid and every option of the run.
    pub settings: String,
    /// `config.json` and each weight file's name, size and modification time.
    pub model: String,
    /// The calibration token ids, sample by sample.
    pub calibration: String,
    /// The autoquant version that did the finished blocks.
    pub program: String,
}

impl Fingerprint {
    /// `settings` is any text that changes with a setting (the options' debug form);
    /// `calibration` the samples' token ids.
    pub fn new(
        settings: &str,
        config_json: &str,
        weight_files: &[PathBuf],
        calibration: &[Vec<u32>],
    ) -> Self {
        let mut model = config_json.to_string();
        for f in weight_files {
            let meta = fs::metadata(f).ok();
            let mtime = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            model.push_str(&format!(
                "\n{}\t{}\t{mtime}",
                f.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into()),
                meta.map_or(0, |m| m.len())
            ));
        }
        let mut tokens = Vec::new();
        for ids in calibration {
            tokens.extend_from_slice(&(ids.len() as u64).to_le_bytes());
            for id in ids {
                tokens.extend_from_slice(&id.to_le_bytes());
            }
        }
        Fingerprint {
            settings: crate::fsutil::sha256_hex(settings.as_bytes()),
            model: crate::fsutil::sha256_hex(model.as_bytes()),
            calibration: crate::fsutil::sha256_hex(&tokens),
            program: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// What differs from `other`, in words.
    fn differences(&self, other: &Fingerprint) -> Vec<&'static str> {
        let mut out = vec![];
        if self.settings != other.settings {
            out.push("the settings (method, bits, group size or another option)");
        }
        if self.model != other.model {
            out.push("the model's config or weight files");
        }
        if self.calibration != other.calibration {
            out.push("the calibration samples");
        }
        if self.program != other.program {
            out.push("the autoquant version");
        }
        out
    }
}

/// What one finished block reported, kept so a resumed run reports every block.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BlockRecord {
    pub layers: Vec<super::stream::LayerReport>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    fingerprint: Fingerprint,
    num_blocks: usize,
    blocks: Vec<BlockRecord>,
    /// The block whose saved calibration inputs are current.
    inputs_entry: Option<usize>,
}

/// The resumable state of one streamed quantization (see the module docs).
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    _lock: File,
    progress: Progress,
    calibrated: bool,
    last_save: Option<(Instant, Duration)>,
}

/// The folder a run writing `output` keeps its resumable work in.
pub fn partial_dir(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
    output.with_file_name(format!(".{name}.partial"))
}

fn block_file(i: usize) -> String {
    format!("block-{i:05}.safetensors")
}

fn inputs_file(i: usize) -> String {
    format!("inputs-{i:05}.safetensors")
}

fn lock(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::InvalidArgument(format!(
            "{}: another autoquant run is writing this output right now",
            dir.display()
        )));
    }
    Ok(file)
}

impl Journal {
    /// Open the journal of a run writing `output` with `num_blocks` blocks. With `resume`, the
    /// finished blocks of an interrupted run with the same fingerprint are kept (none is fine:
    /// the run starts from the first block). Without it, a folder holding finished blocks is
    /// refused rather than thrown away.
    pub fn open(
        output: &Path,
        fingerprint: Fingerprint,
        num_blocks: usize,
        calibrated: bool,
        resume: bool,
    ) -> Result<Journal> {
        let dir = partial_dir(output);
        let fresh = Progress {
            fingerprint: fingerprint.clone(),
            num_blocks,
            blocks: vec![],
            inputs_entry: None,
        };
        if !dir.exists() {
            fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        } else if !dir.is_dir() || dir.is_symlink() {
            return Err(Error::InvalidArgument(format!(
                "{}: exists and is not a folder of resumable work; move it away",
                dir.display()
            )));
        }
        let lock = lock(&dir)?;
        let path = dir.join(PROGRESS);
        let found: Option<Progress> = if path.exists() {
            let value = crate::error::read_json(&path)?;
            Some(serde_json::from_value(value).map_err(|e| {
                Error::format(
                    &path,
                    format!("not the progress of a streamed quantization: {e}"),
                )
            })?)
        } else {
            None
        };
        let progress = match found {
            Some(p) if !p.blocks.is_empty() && !resume => {
                return Err(Error::InvalidArgument(format!(
                    "{}: an interrupted run of this output finished {} of {} blocks there; add \
                     --resume to continue it, or delete the folder to start over",
                    dir.display(),
                    p.blocks.len(),
                    p.num_blocks
                )));
            }
            Some(p) if resume && !p.blocks.is_empty() => {
                let changed = p.fingerprint.differences(&fingerprint);
                if !changed.is_empty() || p.num_blocks != num_blocks {
                    return Err(Error::InvalidArgument(format!(
                        "{}: cannot resume: {} changed since the interrupted run; run it with \
                         its original settings and inputs, or delete the folder to start over",
                        dir.display(),
                        if changed.is_empty() {
                            "the number of blocks".to_string()
                        } else {
                            changed.join(" and ")
                        }
                    )));
                }
                if p.blocks.len() > num_blocks || p.inputs_entry.is_some_and(|e| e > p.blocks.len())
                {
                    return Err(Error::format(
                        &path,
                        "records more blocks than the model has",
                    ));
                }
                // Only blocks whose files are there count (a folder can lose files to a
                // deletion that was stopped half way).
                let mut p = p;
                if let Some(missing) =
                    (0..p.blocks.len()).find(|&i| !dir.join(block_file(i)).is_file())
                {
                    p.blocks.truncate(missing);
                }
                let have_inputs = |e: usize| dir.join(inputs_file(e)).is_file();
                if p.inputs_entry
                    .is_some_and(|e| e > p.blocks.len() || !have_inputs(e))
                {
                    p.inputs_entry = None;
                }
                p
            }
            _ => fresh,
        };
        crate::fsutil::keep_for_resume(&dir);
        let journal = Journal {
            dir,
            _lock: lock,
            progress,
            calibrated,
            last_save: None,
        };
        if journal.progress.blocks.is_empty() {
            journal.write_progress()?;
        }
        Ok(journal)
    }

    /// The folder, for messages.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Blocks finished and kept.
    pub fn finished(&self) -> usize {
        self.progress.blocks.len()
    }

    /// The first block this run has to quantize: after the last finished block, or for a
    /// calibrated method after the last block whose output activations were saved.
    pub fn start_block(&self) -> usize {
        if self.calibrated && self.finished() < self.progress.num_blocks {
            self.progress.inputs_entry.unwrap_or(0)
        } else {
            self.finished()
        }
    }

    /// The saved activations entering [`Journal::start_block`], one `[tokens × hidden]` vector
    /// per sample (`None` at the first block: the run embeds the samples itself).
    pub fn load_inputs(&self, sizes: &[usize]) -> Result<Option<Vec<Vec<f32>>>> {
        let wanted = self.calibrated && self.finished() < self.progress.num_blocks;
        let Some(entry) = self.progress.inputs_entry.filter(|_| wanted) else {
            return Ok(None);
        };
        let path = self.dir.join(inputs_file(entry));
        let file = SafetensorsFile::open(&path)?;
        let mut out = Vec::with_capacity(sizes.len());
        for (s, &len) in sizes.iter().enumerate() {
            let name = format!("sample.{s}");
            let t = file.read(&name)?;
            if t.dtype != DType::F32 || t.data.len() != 4 * len {
                return Err(Error::tensor(
                    &path,
                    name,
                    format!(
                        "holds {} bytes of {:?}, {} f32 expected",
                        t.data.len(),
                        t.dtype,
                        len
                    ),
                ));
            }
            out.push(
                t.data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            );
        }
        Ok(Some(out))
    }

    /// The records of the finished blocks before `start`, the ones a resumed run keeps.
    pub fn records_before(&self, start: usize) -> &[BlockRecord] {
        &self.progress.blocks[..start.min(self.finished())]
    }

    /// Keep block `i`: its tensors, its record and, when worth it (module docs), the
    /// activations entering block `i + 1` (`inputs`: one `[t, hidden]` slice per sample).
    pub fn record_block(
        &mut self,
        i: usize,
        tensors: &BTreeMap<String, RawTensor>,
        record: BlockRecord,
        inputs: &[&[f32]],
        hidden: usize,
    ) -> Result<()> {
        let specs = tensors
            .iter()
            .map(|(n, t)| TensorSpec::new(n.clone(), t.dtype, t.shape.clone()))
            .collect();
        let values: Vec<&RawTensor> = tensors.values().collect();
        write_tensors(&self.dir.join(block_file(i)), specs, |k| {
            Cow::Borrowed(values[k])
        })?;
        self.progress.blocks.truncate(i);
        self.progress.blocks.push(record);
        let previous = self.progress.inputs_entry;
        let last = i + 1 == self.progress.num_blocks;
        let due = match self.last_save {
            None => true,
            Some((at, took)) => at.elapsed() >= took * 10,
        };
        if self.calibrated && !inputs.is_empty() && !last && due {
            let t0 = Instant::now();
            let shape = |x: &[f32]| vec![x.len() / hidden.max(1), hidden];
            let specs = inputs
                .iter()
                .enumerate()
                .map(|(s, x)| TensorSpec::new(format!("sample.{s}"), DType::F32, shape(x)))
                .collect();
            // One sample's bytes at a time: the activations are the largest thing in memory.
            write_tensors(&self.dir.join(inputs_file(i + 1)), specs, |s| {
                Cow::Owned(RawTensor {
                    dtype: DType::F32,
                    shape: shape(inputs[s]),
                    data: bytemuck::cast_slice(inputs[s]).to_vec(),
                })
            })?;
            self.progress.inputs_entry = Some(i + 1);
            self.last_save = Some((Instant::now(), t0.elapsed()));
        }
        self.write_progress()?;
        if let Some(old) = previous.filter(|&p| Some(p) != self.progress.inputs_entry) {
            let _ = fs::remove_file(self.dir.join(inputs_file(old)));
        }
        Ok(())
    }

    /// The file holding the tensors block `i` produced.
    pub fn block_path(&self, i: usize) -> PathBuf {
        self.dir.join(block_file(i))
    }

    /// Delete the folder: the output it served is in place. The progress goes first, so a
    /// folder half deleted (killed meanwhile) no longer claims any finished block.
    pub fn finish(self) -> Result<()> {
        crate::fsutil::forget_resumable(&self.dir);
        let progress = self.dir.join(PROGRESS);
        fs::remove_file(&progress).map_err(|e| Error::io(&progress, e))?;
        fs::remove_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))
    }

    /// Delete the folder and what it kept: the run failed in a way resuming would repeat.
    pub fn discard(self) -> Result<()> {
        self.finish()
    }

    fn write_progress(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.progress)
            .map_err(|e| Error::Other(e.to_string()))?;
        crate::fsutil::write_atomic(&self.dir.join(PROGRESS), text.as_bytes())
    }
}

/// Write the tensors `specs` declares as one safetensors file, atomically; `tensor(k)` gives
/// the `k`-th, asked for in order.
fn write_tensors<'t>(
    path: &Path,
    specs: Vec<TensorSpec>,
    mut tensor: impl FnMut(usize) -> Cow<'t, RawTensor>,
) -> Result<()> {
    let n = specs.len();
    let mut writer = SafetensorsWriter::create(path, specs, &BTreeMap::new())?;
    for k in 0..n {
        writer.write_tensor(&tensor(k))?;
    }
    writer.finish()?;
    Ok(())
}
