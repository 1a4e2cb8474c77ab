//! Finding model files: local paths, a prepared hub cache, and downloads from a fake hub on
//! 127.0.0.1 that answers the way huggingface.co does for `hf-hub` 0.4.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use autoquant::hub::{self, HubOptions, ModelSource};
use autoquant::Error;

const SHA_MAIN: &str = "1111111111111111111111111111111111111111";
const SHA_TAG: &str = "2222222222222222222222222222222222222222";
const SHA_DIRECT: &str = "3333333333333333333333333333333333333333";
const SHA_SERVED: &str = "abcdefabcdefabcdefabcdefabcdefabcdef0123";

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        offline: Some(true),
        ..Default::default()
    }
}

/// A tiny valid safetensors file: one F32 tensor `w` of shape [2] holding [1.5, -2.0].
fn tiny_safetensors() -> Vec<u8> {
    let mut header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&1.5f32.to_le_bytes());
    bytes.extend_from_slice(&(-2.0f32).to_le_bytes());
    bytes
}

/// Cache with `org/tiny`: refs/main → SHA_MAIN, refs/v1.0 → SHA_TAG (with a trailing newline,
/// which readers must tolerate), and SHA_DIRECT reachable only by its commit.
fn prepared_cache() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("models--org--tiny");
    write(&repo.join("refs/main"), SHA_MAIN.as_bytes());
    write(&repo.join("refs/v1.0"), format!("{SHA_TAG}\n").as_bytes());
    for sha in [SHA_MAIN, SHA_TAG, SHA_DIRECT] {
        let snap = repo.join("snapshots").join(sha);
        write(
            &snap.join("config.json"),
            format!(r#"{{"model_type":"llama","commit":"{sha}"}}"#).as_bytes(),
        );
        write(&snap.join("model.safetensors"), &tiny_safetensors());
    }
    tmp
}

fn commit_in_config(files: &hub::ModelFiles) -> String {
    let text = std::fs::read_to_string(files.config_path().unwrap()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["commit"].as_str().unwrap().to_string()
}

#[test]
fn cache_resolves_branch_tag_and_commit_offline() {
    let cache = prepared_cache();
    let repo = cache.path().join("models--org--tiny/snapshots");

    let main = hub::resolve("org/tiny", &offline(cache.path())).unwrap();
    assert_eq!(main.dir, repo.join(SHA_MAIN));
    assert_eq!(main.gguf, None);
    assert_eq!(
        main.source,
        ModelSource::HubCache {
            repo_id: "org/tiny".into(),
            revision: "main".into(),
            commit: SHA_MAIN.into()
        }
    );
    assert_eq!(commit_in_config(&main), SHA_MAIN);
    assert!(main.describe().contains("org/tiny@main") && main.describe().contains(SHA_MAIN));

    let tag = hub::resolve("org/tiny@v1.0", &offline(cache.path())).unwrap();
    assert_eq!(tag.dir, repo.join(SHA_TAG));
    assert_eq!(commit_in_config(&tag), SHA_TAG);

    let opts = HubOptions {
        revision: Some("v1.0".into()),
        ..offline(cache.path())
    };
    assert_eq!(
        hub::resolve("org/tiny", &opts).unwrap().dir,
        repo.join(SHA_TAG)
    );

    let direct = hub::resolve(&format!("org/tiny@{SHA_DIRECT}"), &offline(cache.path())).unwrap();
    assert_eq!(direct.dir, repo.join(SHA_DIRECT));
    assert_eq!(commit_in_config(&direct), SHA_DIRECT);
}

#[test]
fn complete_cache_is_used_online_without_network() {
    let cache = prepared_cache();
    // An endpoint where nothing listens: any request would fail.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: Some(false),
        endpoint: Some(format!("http://{dead}")),
        ..Default::default()
    };
    let found = hub::resolve("org/tiny", &opts).unwrap();
    assert_eq!(
        found.dir,
        cache
            .path()
            .join("models--org--tiny/snapshots")
            .join(SHA_MAIN)
    );
}

#[test]
fn incomplete_cache_offline_still_gives_config_only_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("models--cfg");
    write(&repo.join("refs/main"), SHA_MAIN.as_bytes());
    write(
        &repo.join("snapshots").join(SHA_MAIN).join("config.json"),
        b"{}",
    );
    let found = hub::resolve("cfg", &offline(tmp.path())).unwrap();
    assert_eq!(found.dir, repo.join("snapshots").join(SHA_MAIN));
}

#[test]
fn unknown_model_offline_lists_what_was_tried() {
    let cache = prepared_cache();
    let err = hub::resolve("org/missing", &offline(cache.path())).unwrap_err();
    let Error::NotFound { model, tried } = &err else {
        panic!("expected NotFound, got {err}")
    };
    assert_eq!(model, "org/missing");
    let expected_ref = cache.path().join("models--org--missing/refs/main");
    assert!(
        tried.iter().any(|t| t.contains("local path `org/missing`")),
        "{tried:?}"
    );
    assert!(
        tried
            .iter()
            .any(|t| t.contains(&expected_ref.display().to_string())),
        "{tried:?}"
    );
    assert!(tried.iter().any(|t| t.contains("offline")), "{tried:?}");

    // A known repo with an unknown tag names the missing ref file.
    let err = hub::resolve("org/tiny@v9", &offline(cache.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("models--org--tiny/refs/v9"), "{err}");
}

#[test]
fn escaping_ids_and_revisions_are_refused() {
    let cache = prepared_cache();
    for bad in [
        "../etc",
        "org/../../x",
        "org\\x",
        "a/b/c",
        "org/",
        "/org/x-not-there",
        "",
        "org/tiny@../../x",
        "org/tiny@/abs",
        "a--b/c",
        "org/t y",
    ] {
        let err = hub::resolve(bad, &offline(cache.path())).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(_)),
            "`{bad}` gave {err}"
        );
        assert!(
            err.to_string().contains("not a valid hub id"),
            "`{bad}` gave {err}"
        );
    }
    let err = hub::parse_hub_id("org/x@v1", Some("v2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("two revisions"), "{err}");
    assert_eq!(
        hub::parse_hub_id("gpt2", None).unwrap(),
        ("gpt2".to_string(), "main".to_string())
    );
    assert_eq!(
        hub::parse_hub_id("org/x.y_z-1@refs/pr/1", None).unwrap(),
        ("org/x.y_z-1".to_string(), "refs/pr/1".to_string())
    );
}

#[test]
fn local_folder_and_gguf_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("hf");
    write(&folder.join("config.json"), b"{}");
    let found = hub::resolve(folder.to_str().unwrap(), &HubOptions::default()).unwrap();
    assert_eq!(
        (found.dir.clone(), found.gguf.clone(), found.source.clone()),
        (folder.clone(), None, ModelSource::LocalDir)
    );
    assert_eq!(found.config_path(), Some(folder.join("config.json")));
    assert_eq!(found.file("missing.json"), None);

    // Names that leave the folder are refused even when the target exists.
    write(&tmp.path().join("secret.json"), b"{}");
    assert!(tmp.path().join("hf/../secret.json").exists());
    for bad in [
        "../secret.json",
        "/etc/passwd",
        "a/../../secret.json",
        "..\\secret.json",
        "",
    ] {
        assert_eq!(found.file(bad), None, "{bad}");
    }

    let gguf_dir = tmp.path().join("g1");
    write(&gguf_dir.join("model-q8.gguf"), b"GGUF");
    let file = gguf_dir.join("model-q8.gguf");
    let by_file = hub::resolve(file.to_str().unwrap(), &HubOptions::default()).unwrap();
    assert_eq!(
        (by_file.dir, by_file.gguf, by_file.source),
        (gguf_dir.clone(), Some(file.clone()), ModelSource::GgufFile)
    );
    let by_dir = hub::resolve(gguf_dir.to_str().unwrap(), &HubOptions::default()).unwrap();
    assert_eq!(
        (by_dir.gguf, by_dir.source),
        (Some(file), ModelSource::GgufFile)
    );

    let two = tmp.path().join("g2");
    write(&two.join("a.gguf"), b"GGUF");
    write(&two.join("b.gguf"), b"GGUF");
    let err = hub::resolve(two.to_str().unwrap(), &HubOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("a.gguf") && err.contains("b.gguf"), "{err}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = hub::resolve(empty.to_str().unwrap(), &HubOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { tried, .. } if tried.iter().any(|t| t.contains("config.json"))),
        "{err}"
    );
}

#[test]
fn shard_index_names_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("model.safetensors.index.json");
    write(
        &index,
        br#"{"metadata":{"total_size":16},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#,
    );
    assert_eq!(
        hub::read_shard_index(&index).unwrap(),
        vec![
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    for evil in ["../../evil", "/abs/evil", "sub/../../evil", "..\\evil"] {
        let body = serde_json::json!({"weight_map": {"layer.weight": evil}}).to_string();
        write(&index, body.as_bytes());
        let err = hub::read_shard_index(&index).unwrap_err().to_string();
        assert!(
            err.contains("layer.weight") && err.contains("refused") && err.contains("index.json"),
            "{err}"
        );
    }
}

#[test]
fn settings_come_from_options_then_environment() {
    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }
    let none = HubOptions::default();

    let s = none.settings_with(env(&[("HOME", "/home/u")]));
    assert_eq!(s.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    assert!(!s.offline);
    assert_eq!(s.endpoint, "https://huggingface.co");
    assert_eq!(s.token, None);

    let s = none.settings_with(env(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]));
    assert_eq!(s.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
    let s = none.settings_with(env(&[("HOME", "/home/u"), ("HF_HOME", "/hf")]));
    assert_eq!(s.cache_dir, PathBuf::from("/hf/hub"));
    let s = none.settings_with(env(&[
        ("HF_HOME", "/hf"),
        ("HF_HUB_CACHE", "/c"),
        ("HUGGINGFACE_HUB_CACHE", "/old"),
    ]));
    assert_eq!(s.cache_dir, PathBuf::from("/c"));
    let s = none.settings_with(env(&[
        ("HF_HOME", "/hf"),
        ("HUGGINGFACE_HUB_CACHE", "/old"),
    ]));
    assert_eq!(s.cache_dir, PathBuf::from("/old"));
    // Empty means unset.
    let s = none.settings_with(env(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "")]));
    assert_eq!(s.cache_dir, PathBuf::from("/hf/hub"));

    for yes in ["1", "true", "TRUE", "yes", "on", " On "] {
        assert!(
            none.settings_with(env(&[("HF_HUB_OFFLINE", yes)])).offline,
            "{yes}"
        );
    }
    for no in ["0", "false", "no", "off", ""] {
        assert!(
            !none.settings_with(env(&[("HF_HUB_OFFLINE", no)])).offline,
            "{no}"
        );
    }
    assert!(
        none.settings_with(env(&[("TRANSFORMERS_OFFLINE", "1")]))
            .offline
    );

    let s = none.settings_with(env(&[
        ("HF_ENDPOINT", "http://mirror.local/"),
        ("HF_TOKEN", "hf_abc"),
    ]));
    assert_eq!(s.endpoint, "http://mirror.local");
    assert_eq!(s.token.as_deref(), Some("hf_abc"));

    // Explicit options beat the environment.
    let explicit = HubOptions {
        revision: Some("v2".into()),
        cache_dir: Some("/mine".into()),
        offline: Some(false),
        endpoint: Some("http://x".into()),
        token: Some("t".into()),
    };
    let s = explicit.settings_with(env(&[
        ("HF_HUB_CACHE", "/c"),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_ENDPOINT", "http://y"),
        ("HF_TOKEN", "u"),
    ]));
    assert_eq!(
        s,
        hub::HubSettings {
            revision: Some("v2".into()),
            cache_dir: "/mine".into(),
            offline: false,
            endpoint: "http://x".into(),
            token: Some("t".into())
        }
    );
}

// ---------------------------------------------------------------------------------------------
// A fake hub. For `/{repo}/resolve/{revision}/{file}` it answers like huggingface.co:
// - small files: 206 with `etag`, `x-repo-commit` and `content-range: bytes a-b/total`;
// - "LFS" files: 302 to an absolute `/cdn/{file}` URL, carrying `x-linked-etag` and
//   `x-repo-commit`; the CDN then serves byte ranges;
// - anything else, or an unknown revision: 404.
// It handles one request per connection and stops after `max_requests` or when told to (a
// connection of its own wakes the blocked `accept`); a client that stops sending is cut off by
// the socket's read timeout, so a broken client cannot hang the test.

struct FakeHub {
    base: String,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    fn start(
        repo: &'static str,
        files: Vec<(&'static str, Vec<u8>)>,
        lfs: &'static [&'static str],
    ) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let files: HashMap<String, Vec<u8>> =
            files.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let (stop2, log2, base2) = (stop.clone(), log.clone(), base.clone());
        let thread = std::thread::spawn(move || {
            let max_requests = 100;
            let mut served = 0;
            while served < max_requests {
                let Ok((stream, _)) = listener.accept() else {
                    break;
                };
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                served += 1;
                if let Some(line) = serve(stream, repo, &files, lfs, &base2) {
                    log2.lock().unwrap().push(line);
                }
            }
        });
        FakeHub {
            base,
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // Wake the accept; if the server already stopped, nobody listens and that is fine.
            let _ = TcpStream::connect(self.base.trim_start_matches("http://"));
            t.join().unwrap();
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(
    stream: TcpStream,
    repo: &str,
    files: &HashMap<String, Vec<u8>>,
    lfs: &[&str],
    base: &str,
) -> Option<String> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    let path = request_line.split_whitespace().nth(1)?.to_string();
    let mut out = stream;
    let resolve_prefix = format!("/{repo}/resolve/");
    if let Some(rest) = path.strip_prefix(&resolve_prefix) {
        let (revision, file) = rest.split_once('/')?;
        match files.get(file) {
            Some(body) if revision == "main" || revision == SHA_SERVED => {
                if lfs.contains(&file) {
                    let head = format!(
                        "HTTP/1.1 302 Found\r\nLocation: {base}/cdn/{file}\r\nx-linked-etag: \"{}\"\r\nx-repo-commit: {SHA_SERVED}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        fake_etag(file, 64)
                    );
                    out.write_all(head.as_bytes()).ok()?;
                } else {
                    let extra = format!("etag: \"{}\"\r\nx-repo-commit: {SHA_SERVED}\r\n", fake_etag(file, 40));
                    write_range(&mut out, body, range.as_deref(), &extra)?;
                }
            }
            _ => out.write_all(b"HTTP/1.1 404 Not Found\r\nx-error-code: EntryNotFound\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").ok()?,
        }
    } else if let Some(file) = path.strip_prefix("/cdn/") {
        write_range(&mut out, files.get(file)?, range.as_deref(), "")?;
    } else {
        out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .ok()?;
    }
    out.flush().ok()?;
    Some(format!("{path} {}", range.unwrap_or_default()))
}

/// A stable fake hash per file name (git sha1 / sha256 lengths), only used as blob names.
fn fake_etag(file: &str, len: usize) -> String {
    let seed = file
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    format!("{seed:016x}").repeat(4)[..len].to_string()
}

fn write_range(out: &mut TcpStream, body: &[u8], range: Option<&str>, extra: &str) -> Option<()> {
    let total = body.len();
    let (start, end) = match range.and_then(|r| r.strip_prefix("bytes=")) {
        Some(spec) => {
            let (a, b) = spec.split_once('-')?;
            let a: usize = a.parse().ok()?;
            let b: usize = if b.is_empty() {
                total - 1
            } else {
                b.parse::<usize>().ok()?.min(total - 1)
            };
            (a, b)
        }
        None => (0, total - 1),
    };
    let head = format!(
        "HTTP/1.1 {}\r\n{extra}Content-Range: bytes {start}-{end}/{total}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        if range.is_some() { "206 Partial Content" } else { "200 OK" },
        end + 1 - start
    );
    out.write_all(head.as_bytes()).ok()?;
    out.write_all(&body[start..=end]).ok()
}

fn online(cache: &Path, endpoint: &str) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        offline: Some(false),
        endpoint: Some(endpoint.to_string()),
        ..Default::default()
    }
}

const CONFIG: &[u8] = br#"{"model_type":"llama","hidden_size":4}"#;

#[test]
fn download_lands_in_cache_and_then_resolves_offline() {
    let weights = tiny_safetensors();
    let mut server = FakeHub::start(
        "org/tiny",
        vec![
            ("config.json", CONFIG.to_vec()),
            ("tokenizer.json", b"{\"version\":\"1.0\"}".to_vec()),
            ("model.safetensors", weights.clone()),
        ],
        &["model.safetensors"],
    );
    let cache = tempfile::tempdir().unwrap();
    let found = hub::resolve("org/tiny", &online(cache.path(), &server.base)).unwrap();
    let snapshot = cache
        .path()
        .join("models--org--tiny/snapshots")
        .join(SHA_SERVED);
    assert_eq!(found.dir, snapshot);
    assert_eq!(
        found.source,
        ModelSource::Downloaded {
            repo_id: "org/tiny".into(),
            revision: "main".into(),
            commit: SHA_SERVED.into(),
            endpoint: server.base.clone()
        }
    );
    assert_eq!(std::fs::read(found.config_path().unwrap()).unwrap(), CONFIG);
    assert_eq!(
        std::fs::read(found.file("tokenizer.json").unwrap()).unwrap(),
        b"{\"version\":\"1.0\"}"
    );
    let downloaded = std::fs::read(found.file("model.safetensors").unwrap()).unwrap();
    assert_eq!(downloaded, weights);
    let tensors = safetensors::SafeTensors::deserialize(&downloaded).unwrap();
    assert_eq!(
        tensors.tensor("w").unwrap().data(),
        &[0, 0, 0xc0, 0x3f, 0, 0, 0, 0xc0]
    );
    assert_eq!(found.file("merges.txt"), None);
    // Standard layout: the branch ref holds the commit with no newline.
    let main_ref =
        std::fs::read_to_string(cache.path().join("models--org--tiny/refs/main")).unwrap();
    assert_eq!(main_ref, SHA_SERVED);

    let requests = server.requests();
    // config.json came from the branch; everything after it is pinned to the served commit.
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("/org/tiny/resolve/main/config.json")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with(&format!("/org/tiny/resolve/{SHA_SERVED}/merges.txt"))),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("/cdn/model.safetensors")),
        "{requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.contains("pytorch_model")),
        "stops at the first weights found: {requests:?}"
    );
    server.shutdown();

    // The server is gone: the second run must be served from the cache.
    let again = hub::resolve("org/tiny", &offline(cache.path())).unwrap();
    assert_eq!(again.dir, snapshot);
    assert!(
        matches!(again.source, ModelSource::HubCache { ref commit, .. } if commit == SHA_SERVED)
    );
    assert_eq!(
        std::fs::read(again.file("model.safetensors").unwrap()).unwrap(),
        weights
    );
}

#[test]
fn download_sharded_checkpoint() {
    let index = br#"{"metadata":{"total_size":16},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;
    let mut server = FakeHub::start(
        "tiny",
        vec![
            ("config.json", CONFIG.to_vec()),
            ("model.safetensors.index.json", index.to_vec()),
            ("model-00001-of-00002.safetensors", tiny_safetensors()),
            ("model-00002-of-00002.safetensors", tiny_safetensors()),
        ],
        &[
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let found = hub::resolve("tiny", &online(cache.path(), &server.base)).unwrap();
    assert_eq!(
        found.dir,
        cache.path().join("models--tiny/snapshots").join(SHA_SERVED)
    );
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        assert_eq!(
            std::fs::read(found.file(shard).unwrap()).unwrap(),
            tiny_safetensors()
        );
    }
    server.shutdown();
    assert!(hub::resolve("tiny", &offline(cache.path())).is_ok());
}

#[test]
fn download_refuses_index_with_escaping_shard() {
    let index = br#"{"weight_map":{"lm_head.weight":"../../evil"}}"#;
    let server = FakeHub::start(
        "org/bad",
        vec![
            ("config.json", CONFIG.to_vec()),
            ("model.safetensors.index.json", index.to_vec()),
            ("../../evil", b"x".to_vec()),
        ],
        &[],
    );
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let err = hub::resolve("org/bad", &online(&cache, &server.base))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("../../evil") && err.contains("refused") && err.contains("lm_head.weight"),
        "{err}"
    );
    assert!(
        !server.requests().iter().any(|r| r.contains("evil")),
        "{:?}",
        server.requests()
    );
    let leaked: Vec<_> = walk(tmp.path())
        .into_iter()
        .filter(|p| p.ends_with("evil"))
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
}

#[test]
fn download_errors_list_http_failures() {
    // No weights on the server: every weight name is tried and reported.
    let server = FakeHub::start("org/noweights", vec![("config.json", CONFIG.to_vec())], &[]);
    let cache = tempfile::tempdir().unwrap();
    let err = hub::resolve("org/noweights", &online(cache.path(), &server.base)).unwrap_err();
    let Error::NotFound { tried, .. } = &err else {
        panic!("expected NotFound, got {err}")
    };
    for name in [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ] {
        assert!(
            tried
                .iter()
                .any(|t| t.contains(&format!("/{name}: not found (404)"))),
            "{name}: {tried:?}"
        );
    }

    // Unknown repo: the config.json request fails and is reported with the cache path looked at.
    let err = hub::resolve("org/unknown", &online(cache.path(), &server.base)).unwrap_err();
    let Error::NotFound { tried, .. } = &err else {
        panic!("expected NotFound, got {err}")
    };
    assert!(
        tried.iter().any(|t| t.contains("models--org--unknown")),
        "{tried:?}"
    );
    assert!(
        tried
            .iter()
            .any(|t| t.contains("/org/unknown/resolve/main/config.json") && t.contains("404")),
        "{tried:?}"
    );

    // Nothing listening: a transport error, not a 404.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = hub::resolve("org/tiny", &online(cache.path(), &format!("http://{dead}")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("http://{dead}/org/tiny/resolve/main/config.json"))
            && !err.contains("(404)"),
        "{err}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}
