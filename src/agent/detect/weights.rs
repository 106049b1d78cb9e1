//! Model files: safetensors in the `lmz/candle-yolo-v8` naming, with our metadata.
//!
//! Metadata keys written by `edge-agent model import` (all optional on read, so the public hub
//! files load too):
//!
//! | key           | meaning                                                         |
//! |---------------|-----------------------------------------------------------------|
//! | `format`      | `edge-vision/yolov8-detect/1`                                   |
//! | `names`       | JSON array of class names, index = class id                     |
//! | `bn_eps`      | BatchNorm epsilon the model was trained with (default 1e-3)     |
//! | `source`      | file the weights were imported from                             |
//! | `source_sha256` | its checksum                                                  |
//! | `ultralytics_version` | version recorded in the checkpoint                      |

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// Value of the `format` metadata key.
pub const FORMAT: &str = "edge-vision/yolov8-detect/1";
/// Ultralytics' BatchNorm epsilon, used when a file does not record its own.
pub const DEFAULT_BN_EPS: f64 = 1e-3;

/// Why a model file could not be loaded. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    #[error("model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model file {path} is empty")]
    Empty { path: PathBuf },
    #[error("model file {path} is not a valid safetensors file (truncated or corrupt?): {reason}")]
    NotSafetensors { path: PathBuf, reason: String },
    #[error("model file {path} holds no tensors")]
    NoTensors { path: PathBuf },
    #[error("model file {path} is not a YOLOv8 detection model in the expected naming: {reason}")]
    Architecture { path: PathBuf, reason: String },
    #[error("model file {path}: metadata key `{key}` is invalid: {reason}")]
    Metadata {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
    #[error("class names file {path}: {reason}")]
    Names { path: PathBuf, reason: String },
}

/// Tensors and metadata read from a model file.
#[derive(Debug)]
pub struct ModelFile {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl ModelFile {
    /// Reads a safetensors file fully into memory and checks it.
    pub fn read(path: &Path) -> Result<Self, ModelLoadError> {
        let bytes = std::fs::read(path).map_err(|source| ModelLoadError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, ModelLoadError> {
        if bytes.is_empty() {
            return Err(ModelLoadError::Empty {
                path: path.to_owned(),
            });
        }
        let bad = |reason: String| ModelLoadError::NotSafetensors {
            path: path.to_owned(),
            reason,
        };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        if tensors.is_empty() {
            return Err(ModelLoadError::NoTensors {
                path: path.to_owned(),
            });
        }
        Ok(Self { tensors, metadata })
    }

    /// BatchNorm epsilon from the metadata, or Ultralytics' default.
    pub fn bn_eps(&self, path: &Path) -> Result<f64, ModelLoadError> {
        match self.metadata.get("bn_eps") {
            None => Ok(DEFAULT_BN_EPS),
            Some(v) => match v.parse::<f64>() {
                Ok(e) if e > 0.0 && e < 1.0 => Ok(e),
                _ => Err(ModelLoadError::Metadata {
                    path: path.to_owned(),
                    key: "bn_eps",
                    reason: format!("`{v}` is not a number in (0, 1)"),
                }),
            },
        }
    }

    /// Class names from the metadata, if the file carries them.
    pub fn names(&self, path: &Path) -> Result<Option<Vec<String>>, ModelLoadError> {
        match self.metadata.get("names") {
            None => Ok(None),
            Some(v) => serde_json::from_str::<Vec<String>>(v)
                .map(Some)
                .map_err(|e| ModelLoadError::Metadata {
                    path: path.to_owned(),
                    key: "names",
                    reason: e.to_string(),
                }),
        }
    }
}

/// Reads a class-names file: one name per line (like `models/coco.names`), blank lines ignored.
pub fn read_names_file(path: &Path) -> Result<Vec<String>, ModelLoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelLoadError::Names {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(ModelLoadError::Names {
            path: path.to_owned(),
            reason: "no class names in file".into(),
        });
    }
    Ok(names)
}

/// Writes tensors and metadata as a safetensors file.
pub fn write_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<(), candle_core::Error> {
    // Sorted for a byte-stable file: the same checkpoint always imports to the same bytes.
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut views = Vec::with_capacity(names.len());
    for n in names {
        views.push((n.clone(), OwnedView::new(&tensors[n])?));
    }
    let bytes = safetensors::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), Some(metadata))
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    std::fs::write(path, bytes)?;
    Ok(())
}

/// A tensor's bytes in little-endian order, ready for `safetensors::serialize`.
struct OwnedView {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl OwnedView {
    fn new(t: &Tensor) -> candle_core::Result<Self> {
        use candle_core::DType;
        let flat = t.flatten_all()?;
        let (dtype, bytes): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
            DType::F16 => (
                safetensors::Dtype::F16,
                flat.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                flat.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F64 => (
                safetensors::Dtype::F64,
                flat.to_vec1::<f64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::U8 => (safetensors::Dtype::U8, flat.to_vec1::<u8>()?),
            DType::I64 => (
                safetensors::Dtype::I64,
                flat.to_vec1::<i64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::U32 => (
                safetensors::Dtype::U32,
                flat.to_vec1::<u32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            _ => (
                safetensors::Dtype::F32,
                flat.to_dtype(DType::F32)?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        };
        Ok(Self {
            dtype,
            shape: t.dims().to_vec(),
            bytes,
        })
    }
}

impl safetensors::View for &OwnedView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}
