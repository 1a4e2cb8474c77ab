//! One error type for the library. Every variant that concerns a file names it, and every
//! variant that concerns a tensor names the tensor too, so a user can tell what to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but its bytes do not follow the format (truncated, lying header, bad JSON).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A specific tensor is missing, has the wrong shape or dtype, or holds NaN/Inf.
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// The model could not be located; `tried` lists every place looked at.
    #[error("could not find model `{model}`; tried:\n  {}", tried.join("\n  "))]
    NotFound { model: String, tried: Vec<String> },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
}

/// Read a whole file, naming it in the error.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Read and parse a JSON file, naming it (and the line/column) in the error.
pub fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("malformed JSON: {e}")))
}
