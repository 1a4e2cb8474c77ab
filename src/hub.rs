//! Finding model files: a local folder, a `.gguf` file, or a hub id resolved through the
//! Hugging Face cache layout (offline first), downloading through `hf-hub` when allowed.
//!
//! Cache layout (as written by `huggingface_hub` and `hf-hub`):
//! `<cache>/models--org--name/refs/<revision>` holds a commit sha, and the files live in
//! `<cache>/models--org--name/snapshots/<sha>/`.

use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const DEFAULT_REVISION: &str = "main";

/// Tokenizer and generation files fetched when present; a 404 for any of them is fine.
const OPTIONAL_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Weight files in the order transformers tries them on the hub.
const WEIGHT_FILES: &[&str] = &[
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

/// How a model's files were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    LocalDir,
    GgufFile,
    HubCache {
        repo_id: String,
        revision: String,
        commit: String,
    },
    Downloaded {
        repo_id: String,
        revision: String,
        commit: String,
        endpoint: String,
    },
}

/// The folder holding a model's files, and its GGUF file if the model is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub gguf: Option<PathBuf>,
    pub source: ModelSource,
}

impl ModelFiles {
    /// The path of `name` inside the model folder, if it exists. Names that would leave the
    /// folder (absolute, `..`, backslashes) give `None`.
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        validate_relative_name(name).ok()?;
        let path = self.dir.join(name);
        path.exists().then_some(path)
    }

    pub fn config_path(&self) -> Option<PathBuf> {
        self.file("config.json")
    }

    /// One line saying where the model came from, for logs and `autoquant info`.
    pub fn describe(&self) -> String {
        let dir = self.dir.display();
        match &self.source {
            ModelSource::LocalDir => format!("local folder {dir}"),
            ModelSource::GgufFile => match &self.gguf {
                Some(file) => format!("GGUF file {}", file.display()),
                None => format!("GGUF model in {dir}"),
            },
            ModelSource::HubCache {
                repo_id,
                revision,
                commit,
            } => {
                format!("{repo_id}@{revision} (commit {commit}) from the hub cache at {dir}")
            }
            ModelSource::Downloaded {
                repo_id,
                revision,
                commit,
                endpoint,
            } => {
                format!(
                    "{repo_id}@{revision} (commit {commit}) downloaded from {endpoint} to {dir}"
                )
            }
        }
    }
}

/// Options for [`resolve`]. `None` means "take it from the environment at resolve time".
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    pub revision: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub offline: Option<bool>,
    pub endpoint: Option<String>,
    pub token: Option<String>,
}

/// [`HubOptions`] with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    pub revision: Option<String>,
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub endpoint: String,
    pub token: Option<String>,
}

impl HubOptions {
    /// Fill the defaults from the process environment.
    pub fn settings(&self) -> HubSettings {
        self.settings_with(|key| std::env::var(key).ok())
    }

    /// Fill the defaults from `env` (a lookup by variable name), following `huggingface_hub`:
    /// cache = `HF_HUB_CACHE`, else legacy `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, where
    /// `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`.
    /// Empty variables count as unset.
    pub fn settings_with(&self, env: impl Fn(&str) -> Option<String>) -> HubSettings {
        let var = |key: &str| env(key).filter(|v| !v.trim().is_empty());
        let cache_dir = self.cache_dir.clone().unwrap_or_else(|| {
            if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
                return PathBuf::from(dir);
            }
            let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
                let cache_home = var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                    // Without a home folder, fall back to a relative path rather than failing:
                    // an explicit cache_dir or HF_HUB_CACHE still works.
                    let home = var("HOME")
                        .or_else(|| var("USERPROFILE"))
                        .unwrap_or_default();
                    PathBuf::from(home).join(".cache")
                });
                cache_home.join("huggingface")
            });
            hf_home.join("hub")
        });
        let offline = self.offline.unwrap_or_else(|| {
            ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
                .iter()
                .any(|key| var(key).is_some_and(|v| is_truthy(&v)))
        });
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| var("HF_ENDPOINT"))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let token = self.token.clone().or_else(|| var("HF_TOKEN"));
        HubSettings {
            revision: self.revision.clone(),
            cache_dir,
            offline,
            endpoint,
            token,
        }
    }
}

fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Find a model's files. `model` is an existing `.gguf` file or folder, or a hub id
/// `org/name` / `name` with an optional `@revision` suffix.
pub fn resolve(model: &str, opts: &HubOptions) -> Result<ModelFiles> {
    let path = Path::new(model);
    if !model.is_empty() && path.exists() {
        return resolve_local(model, path);
    }
    let settings = opts.settings();
    let (repo_id, revision) = parse_hub_id(model, settings.revision.as_deref())?;
    let mut tried = vec![format!("local path `{model}`: does not exist")];
    if let Some(found) = find_in_cache(&settings.cache_dir, &repo_id, &revision, &mut tried)? {
        return Ok(found);
    }
    if settings.offline {
        // Offline, an incomplete snapshot is still the best we have: config-only commands work.
        if let Some(found) = cached_snapshot(&settings.cache_dir, &repo_id, &revision) {
            return Ok(found);
        }
        tried.push("download: not attempted, offline mode (HF_HUB_OFFLINE)".to_string());
        return Err(Error::NotFound {
            model: model.to_string(),
            tried,
        });
    }
    download(model, &repo_id, &revision, &settings, tried)
}

fn resolve_local(model: &str, path: &Path) -> Result<ModelFiles> {
    if path.is_file() {
        if !has_extension(path, "gguf") {
            return Err(Error::InvalidArgument(format!(
                "`{model}` is a file but not a .gguf; pass a model folder, a .gguf file or a hub id"
            )));
        }
        let dir = parent_dir(path);
        return Ok(ModelFiles {
            dir,
            gguf: Some(path.to_path_buf()),
            source: ModelSource::GgufFile,
        });
    }
    let dir = path.to_path_buf();
    if dir.join("config.json").is_file() {
        return Ok(ModelFiles {
            dir,
            gguf: None,
            source: ModelSource::LocalDir,
        });
    }
    let ggufs = gguf_files(&dir)?;
    match ggufs.as_slice() {
        [one] => Ok(ModelFiles {
            dir,
            gguf: Some(one.clone()),
            source: ModelSource::GgufFile,
        }),
        [] => Err(Error::NotFound {
            model: model.to_string(),
            tried: vec![
                format!("{}: missing", dir.join("config.json").display()),
                format!("{}: no .gguf file", dir.display()),
            ],
        }),
        many => Err(Error::InvalidArgument(format!(
            "{} has no config.json and several .gguf files; pass one of: {}",
            dir.display(),
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn gguf_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_file() && has_extension(&path, "gguf") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Split `org/name@revision` and check both parts cannot escape the cache folder.
/// Returns `(repo_id, revision)`.
pub fn parse_hub_id(model: &str, revision: Option<&str>) -> Result<(String, String)> {
    let refuse = |why: &str| {
        Error::InvalidArgument(format!(
            "`{model}` is not an existing file or folder, and not a valid hub id: {why}"
        ))
    };
    let (id, suffix) = match model.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (model, None),
    };
    let revision = match (suffix, revision) {
        (Some(a), Some(b)) if a != b => {
            return Err(refuse(&format!(
                "two revisions given (`{a}` in the id and `{b}` as an option)"
            )))
        }
        (Some(r), _) | (None, Some(r)) => r,
        (None, None) => DEFAULT_REVISION,
    };
    if id.is_empty() {
        return Err(refuse("empty id"));
    }
    if id.contains('\\') || id.starts_with('/') {
        return Err(refuse(
            "hub ids have no backslashes and are not absolute paths",
        ));
    }
    if id.contains("..") || id.contains("--") {
        return Err(refuse("`..` and `--` are not allowed"));
    }
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 {
        return Err(refuse("expected `name` or `org/name` (one `/` at most)"));
    }
    for part in &parts {
        if part.is_empty() {
            return Err(refuse("empty part around `/`"));
        }
        if let Some(c) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
        {
            return Err(refuse(&format!(
                "character `{c}` (allowed: letters, digits, - _ .)"
            )));
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return Err(refuse("parts may not start or end with `-` or `.`"));
        }
    }
    validate_revision(revision).map_err(|why| refuse(&why))?;
    Ok((id.to_string(), revision.to_string()))
}

/// Revisions are branch or tag names (may contain `/`, like `refs/pr/1`) or commit shas.
/// They become paths under `refs/`, so they must stay inside it.
fn validate_revision(revision: &str) -> std::result::Result<(), String> {
    let ok_chars = revision
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    let ok_parts = revision
        .split('/')
        .all(|p| !p.is_empty() && !p.starts_with('.'));
    if revision.is_empty() || !ok_chars || !ok_parts || revision.contains("..") {
        return Err(format!(
            "revision `{revision}`: use letters, digits, - _ . and `/` between non-empty parts, no `..`"
        ));
    }
    Ok(())
}

/// Check that `name` is a plain relative path (like `model-00001-of-00002.safetensors` or
/// `sub/file.bin`) that cannot leave the folder it is joined to.
pub fn validate_relative_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.contains('\\')
        || name.contains('\0')
        || Path::new(name)
            .components()
            .any(|c| !matches!(c, Component::Normal(_)));
    if bad {
        return Err(Error::InvalidArgument(format!(
            "file name `{name}` is refused: it must be a relative path without `..`, `.` or backslashes"
        )));
    }
    Ok(())
}

/// The distinct shard file names of a sharded checkpoint index (`weight_map` values), each
/// checked with [`validate_relative_name`], in first-seen order.
pub fn read_shard_index(index: &Path) -> Result<Vec<String>> {
    let json = crate::error::read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| Error::tensor(index, tensor, "weight_map value is not a string"))?;
        validate_relative_name(file).map_err(|e| Error::tensor(index, tensor, e.to_string()))?;
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    Ok(shards)
}

fn repo_folder(cache_dir: &Path, repo_id: &str) -> PathBuf {
    cache_dir.join(format!("models--{}", repo_id.replace('/', "--")))
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The snapshot folder for a revision, if the cache has one (complete or not).
fn snapshot_dir(
    cache_dir: &Path,
    repo_id: &str,
    revision: &str,
) -> std::result::Result<(PathBuf, String), String> {
    let folder = repo_folder(cache_dir, repo_id);
    let commit = if is_commit_hash(revision) {
        revision.to_string()
    } else {
        let ref_path = folder.join("refs").join(revision);
        let text = std::fs::read_to_string(&ref_path)
            .map_err(|e| format!("hub cache {}: {e}", ref_path.display()))?;
        let commit = text.trim();
        if !is_commit_hash(commit) {
            return Err(format!(
                "hub cache {}: does not hold a commit hash",
                ref_path.display()
            ));
        }
        commit.to_string()
    };
    let dir = folder.join("snapshots").join(&commit);
    if !dir.is_dir() {
        return Err(format!("hub cache {}: missing", dir.display()));
    }
    Ok((dir, commit))
}

/// A cached snapshot that has everything a model needs: config.json plus weights (all shards
/// of an index), or a single `.gguf`.
fn find_in_cache(
    cache_dir: &Path,
    repo_id: &str,
    revision: &str,
    tried: &mut Vec<String>,
) -> Result<Option<ModelFiles>> {
    let (dir, commit) = match snapshot_dir(cache_dir, repo_id, revision) {
        Ok(found) => found,
        Err(why) => {
            tried.push(why);
            return Ok(None);
        }
    };
    let source = ModelSource::HubCache {
        repo_id: repo_id.into(),
        revision: revision.into(),
        commit,
    };
    if !dir.join("config.json").is_file() {
        if let [one] = gguf_files(&dir)?.as_slice() {
            return Ok(Some(ModelFiles {
                gguf: Some(one.clone()),
                dir,
                source,
            }));
        }
        tried.push(format!(
            "hub cache {}: no config.json and not exactly one .gguf",
            dir.display()
        ));
        return Ok(None);
    }
    if weights_complete(&dir)? {
        return Ok(Some(ModelFiles {
            dir,
            gguf: None,
            source,
        }));
    }
    tried.push(format!(
        "hub cache {}: has config.json but no complete weights",
        dir.display()
    ));
    Ok(None)
}

fn weights_complete(dir: &Path) -> Result<bool> {
    for name in WEIGHT_FILES {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        if !name.ends_with(".index.json") {
            return Ok(true);
        }
        let shards = read_shard_index(&path)?;
        return Ok(shards.iter().all(|s| dir.join(s).is_file()));
    }
    Ok(false)
}

fn cached_snapshot(cache_dir: &Path, repo_id: &str, revision: &str) -> Option<ModelFiles> {
    let (dir, commit) = snapshot_dir(cache_dir, repo_id, revision).ok()?;
    dir.join("config.json").is_file().then(|| ModelFiles {
        dir,
        gguf: None,
        source: ModelSource::HubCache {
            repo_id: repo_id.into(),
            revision: revision.into(),
            commit,
        },
    })
}

enum FetchError {
    NotFound,
    Failed(String),
}

/// Get one file through the cache, downloading it if missing.
/// `hf-hub` reports HTTP statuses only as text (it does not re-export `ureq`), so a 404 is
/// recognised by ureq's message "…: status code 404". `hf-hub` also has a few `unwrap`s on
/// server replies (e.g. a redirect without `Location`); a panic there becomes an error.
fn fetch_file(repo: &ApiRepo, name: &str) -> std::result::Result<PathBuf, FetchError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| repo.get(name))) {
        Ok(Ok(path)) => Ok(path),
        Ok(Err(e))
            if matches!(e, ApiError::RequestError(_))
                && e.to_string().contains("status code 404") =>
        {
            Err(FetchError::NotFound)
        }
        Ok(Err(e)) => Err(FetchError::Failed(e.to_string())),
        Err(_) => Err(FetchError::Failed(
            "the HTTP client failed on the server's reply".to_string(),
        )),
    }
}

/// Download config, tokenizer and weights into the standard cache layout, so the next run
/// finds them offline.
fn download(
    model: &str,
    repo_id: &str,
    revision: &str,
    settings: &HubSettings,
    mut tried: Vec<String>,
) -> Result<ModelFiles> {
    let not_found = |tried: Vec<String>| Error::NotFound {
        model: model.to_string(),
        tried,
    };
    let mut builder = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_endpoint(settings.endpoint.clone())
        .with_progress(std::io::stderr().is_terminal());
    if settings.token.is_some() {
        builder = builder.with_token(settings.token.clone());
    }
    let api = match builder.build() {
        Ok(api) => api,
        Err(e) => {
            tried.push(format!("download: could not start the HTTP client: {e}"));
            return Err(not_found(tried));
        }
    };
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let branch = api.repo(repo);
    let config = match fetch_file(&branch, "config.json") {
        Ok(path) => path,
        Err(e) => {
            let why = match e {
                FetchError::NotFound => "not found (404)".to_string(),
                FetchError::Failed(why) => why,
            };
            tried.push(format!("download {}: {why}", branch.url("config.json")));
            return Err(not_found(tried));
        }
    };
    let dir = parent_dir(&config);
    let commit = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if !is_commit_hash(&commit) {
        tried.push(format!(
            "download: the server sent commit `{commit}`, not a commit hash"
        ));
        return Err(not_found(tried));
    }
    // Fetch the rest at the commit config.json came from, so a push in between cannot mix files.
    let pinned = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        commit.clone(),
    ));
    let fetch = |name: &str, tried: &mut Vec<String>| -> Result<Option<PathBuf>> {
        match fetch_file(&pinned, name) {
            Ok(path) => Ok(Some(path)),
            Err(FetchError::NotFound) => {
                tried.push(format!("download {}: not found (404)", pinned.url(name)));
                Ok(None)
            }
            Err(FetchError::Failed(why)) => {
                tried.push(format!("download {}: {why}", pinned.url(name)));
                Err(not_found(tried.clone()))
            }
        }
    };
    for name in OPTIONAL_FILES {
        fetch(name, &mut tried)?;
    }
    let mut have_weights = false;
    for name in WEIGHT_FILES {
        let Some(path) = fetch(name, &mut tried)? else {
            continue;
        };
        if name.ends_with(".index.json") {
            for shard in read_shard_index(&path)? {
                if fetch(&shard, &mut tried)?.is_none() {
                    return Err(Error::format(
                        &path,
                        format!("lists shard `{shard}`, which the hub does not have"),
                    ));
                }
            }
        }
        have_weights = true;
        break;
    }
    if !have_weights {
        tried.push(format!(
            "download: no weights among {}",
            WEIGHT_FILES.join(", ")
        ));
        return Err(not_found(tried));
    }
    let source = ModelSource::Downloaded {
        repo_id: repo_id.to_string(),
        revision: revision.to_string(),
        commit,
        endpoint: settings.endpoint.clone(),
    };
    Ok(ModelFiles {
        dir,
        gguf: None,
        source,
    })
}
