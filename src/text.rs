//! Text files as the evaluation and calibration code read them: plain or WikiText-style text,
//! or JSON lines with a `text` field.

use crate::error::{Error, Result};
use std::path::Path;

/// Read evaluation text: JSON lines with a `text` field (`.jsonl`/`.json`), otherwise the file
/// as is (plain or WikiText raw). JSON records are joined with "\n\n" as the papers join
/// WikiText rows.
pub fn load_text(path: &Path) -> Result<String> {
    Ok(load_records(path)?.join("\n\n"))
}

/// The documents of a text file: one per line of a JSON-lines file (its `text` field), or the
/// whole file for plain and WikiText-style text. Errors on empty or malformed input.
pub fn load_records(path: &Path) -> Result<Vec<String>> {
    let bytes = crate::error::read_file(path)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::format(path, format!("not UTF-8 text: {e}")))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "jsonl" || ext == "json" {
        let mut parts = vec![];
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| Error::format(path, format!("line {}: malformed JSON: {e}", i + 1)))?;
            let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                Error::format(path, format!("line {}: no string field `text`", i + 1))
            })?;
            parts.push(t.to_string());
        }
        if parts.iter().all(|p| p.trim().is_empty()) {
            return Err(Error::format(path, "no non-empty `text` records"));
        }
        return Ok(parts);
    }
    if text.trim().is_empty() {
        return Err(Error::format(path, "the file is empty"));
    }
    Ok(vec![text])
}

#[cfg(test)]
mod tests {
    use super::load_text;

    #[test]
    fn json_lines_are_joined_and_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\": \"a b\"}\n\n{\"text\": \"c\", \"id\": 2}\n").unwrap();
        assert_eq!(load_text(&p).unwrap(), "a b\n\nc");
        std::fs::write(&p, "{\"text\": \"a\"}\n{\"txt\": 1}\n").unwrap();
        let e = load_text(&p).unwrap_err().to_string();
        assert!(e.contains("d.jsonl") && e.contains("line 2"), "{e}");
        let raw = dir.path().join("wiki.raw");
        std::fs::write(&raw, " = Title = \n\n Text .\n").unwrap();
        assert_eq!(load_text(&raw).unwrap(), " = Title = \n\n Text .\n");
        std::fs::write(&raw, "  \n").unwrap();
        assert!(load_text(&raw).unwrap_err().to_string().contains("empty"));
    }
}
