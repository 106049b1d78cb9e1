//! Native import of Ultralytics training checkpoints (`best.pt`, `yolov8n.pt`), no Python.
//!
//! A checkpoint is a zip (PyTorch's format) whose `data.pkl` is a dict with a `model` entry.
//! That entry is not a state dict but a whole pickled `DetectionModel` object, which is why
//! `candle_core::pickle::read_pth_tensor_info` and `VarBuilder::from_pth` find zero tensors in
//! it, silently. Here we unpickle with candle's `pickle::Stack` and walk the module tree
//! ourselves: each `torch.nn.Module` is a `BUILD` of its class with a state dict holding
//! `_parameters`, `_buffers` and `_modules`. Every tensor found is read from its storage entry
//! in the zip. Zero tensors is an error, never an empty model.
//!
//! The tensors are renamed from Ultralytics' flat `model.N.*` layout to the
//! `lmz/candle-yolo-v8` naming our loader reads, and the class names, BatchNorm epsilon and
//! provenance go into the safetensors metadata.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::Tensor;
use sha2::Digest;

use super::weights::{self, FORMAT};

/// Why a checkpoint could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path} is not a PyTorch zip checkpoint: {reason}")]
    NotACheckpoint { path: PathBuf, reason: String },
    #[error("checkpoint {path}: cannot unpickle {entry}: {reason}")]
    Pickle {
        path: PathBuf,
        entry: String,
        reason: String,
    },
    #[error("checkpoint {path} has no model object (looked for `model` and `ema`)")]
    NoModel { path: PathBuf },
    #[error("checkpoint {path} holds no tensors in its model object")]
    NoTensors { path: PathBuf },
    #[error("checkpoint {path}: tensor {name}: {reason}")]
    Tensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("checkpoint {path} is not a YOLOv8 detection model: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// What an import produced, for the CLI to report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportSummary {
    pub tensors: usize,
    pub names: Vec<String>,
    pub bn_eps: f64,
    pub ultralytics_version: Option<String>,
    pub source_sha256: String,
}

/// A module found while walking the pickled object tree.
#[derive(Debug, Default)]
struct Walk {
    /// `dotted.name` -> where its bytes live.
    tensors: Vec<TensorInfo>,
    /// `dotted.module.path` -> Python class name (e.g. `model.22` -> `Detect`).
    classes: HashMap<String, String>,
    /// Every BatchNorm's `eps`.
    bn_eps: Vec<f64>,
}

/// The state dict of a pickled `nn.Module`: `BUILD(REDUCE(class, ()), {...})`.
fn module_parts(obj: &Object) -> Option<(String, &Vec<(Object, Object)>)> {
    if let Object::Build { callable, args } = obj {
        if let (
            Object::Reduce {
                callable: class, ..
            },
            Object::Dict(state),
        ) = (callable.as_ref(), args.as_ref())
        {
            if let Object::Class { class_name, .. } = class.as_ref() {
                return Some((class_name.clone(), state));
            }
        }
    }
    None
}

fn dict_get<'a>(d: &'a [(Object, Object)], key: &str) -> Option<&'a Object> {
    d.iter()
        .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
        .map(|(_, v)| v)
}

fn walk(prefix: &str, obj: &Object, dir: &Path, out: &mut Walk) -> candle_core::Result<()> {
    let Some((class_name, state)) = module_parts(obj) else {
        return Ok(());
    };
    out.classes
        .insert(prefix.trim_end_matches('.').to_string(), class_name.clone());
    if class_name.starts_with("BatchNorm") {
        if let Some(Object::Float(eps)) = dict_get(state, "eps") {
            out.bn_eps.push(*eps);
        }
    }
    for key in ["_parameters", "_buffers"] {
        if let Some(Object::Dict(entries)) = dict_get(state, key) {
            for (name, value) in entries {
                let Object::Unicode(name) = name else {
                    continue;
                };
                let full = format!("{prefix}{name}");
                if let Some(info) = value.clone().into_tensor_info(Object::Unicode(full), dir)? {
                    out.tensors.push(info);
                }
            }
        }
    }
    if let Some(Object::Dict(children)) = dict_get(state, "_modules") {
        for (name, child) in children {
            if let Object::Unicode(name) = name {
                walk(&format!("{prefix}{name}."), child, dir, out)?;
            }
        }
    }
    Ok(())
}

/// Ultralytics YOLOv8 layer index -> `lmz/candle-yolo-v8` prefix. Layers 10, 11, 13, 14, 17
/// and 20 (upsample, concat) hold no weights.
const LAYER_NAMES: [(usize, &str); 17] = [
    (0, "net.b1.0"),
    (1, "net.b1.1"),
    (2, "net.b2.0"),
    (3, "net.b2.1"),
    (4, "net.b2.2"),
    (5, "net.b3.0"),
    (6, "net.b3.1"),
    (7, "net.b4.0"),
    (8, "net.b4.1"),
    (9, "net.b5.0"),
    (12, "fpn.n1"),
    (15, "fpn.n2"),
    (16, "fpn.n3"),
    (18, "fpn.n4"),
    (19, "fpn.n5"),
    (21, "fpn.n6"),
    (22, "head"),
];

/// The class each YOLOv8 detection layer must have.
const LAYER_CLASSES: [(usize, &str); 7] = [
    (0, "Conv"),
    (2, "C2f"),
    (9, "SPPF"),
    (10, "Upsample"),
    (11, "Concat"),
    (21, "C2f"),
    (22, "Detect"),
];

/// Maps an Ultralytics tensor name to ours; `None` for tensors we do not keep.
pub(crate) fn rename(name: &str) -> Option<String> {
    if name.ends_with("num_batches_tracked") {
        return None;
    }
    let rest = name.strip_prefix("model.")?;
    let (idx, tail) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let prefix = LAYER_NAMES.iter().find(|(i, _)| *i == idx)?.1;
    // C2f's bottlenecks are `m.N` in Ultralytics, `bottleneck.N` here.
    let tail = match tail.strip_prefix("m.") {
        Some(t) => format!("bottleneck.{t}"),
        None => tail.to_string(),
    };
    Some(format!("{prefix}.{tail}"))
}

fn read_tensor(
    zip: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
    info: &TensorInfo,
) -> Result<Tensor, String> {
    let layout = &info.layout;
    if !layout.is_contiguous() {
        return Err(format!(
            "non-contiguous storage {layout:?} is not supported"
        ));
    }
    let mut entry = zip
        .by_name(&info.path)
        .map_err(|e| format!("storage {}: {e}", info.path))?;
    let mut skip = layout.start_offset() as u64;
    let mut sink = [0u8; 4096];
    while skip > 0 {
        let n = entry
            .read(&mut sink[..skip.min(4096) as usize])
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("storage shorter than its offset".into());
        }
        skip -= n as u64;
    }
    let len = layout.shape().elem_count() * info.dtype.size_in_bytes();
    let mut raw = vec![0u8; len];
    entry
        .read_exact(&mut raw)
        .map_err(|e| format!("storage {} shorter than the tensor: {e}", info.path))?;
    Tensor::from_raw_buffer(&raw, info.dtype, layout.dims(), &candle_core::Device::Cpu)
        .map_err(|e| e.to_string())
}

fn class_names(state: &[(Object, Object)]) -> Vec<String> {
    let mut names: Vec<(i64, String)> = Vec::new();
    match dict_get(state, "names") {
        Some(Object::Dict(d)) => {
            for (k, v) in d {
                if let (Some(i), Object::Unicode(s)) = (k.clone().int_or_long().ok(), v) {
                    names.push((i, s.clone()));
                }
            }
        }
        Some(Object::List(l)) => {
            for (i, v) in l.iter().enumerate() {
                if let Object::Unicode(s) = v {
                    names.push((i as i64, s.clone()));
                }
            }
        }
        _ => {}
    }
    names.sort_by_key(|(i, _)| *i);
    names.into_iter().map(|(_, s)| s).collect()
}

/// Tensors in our naming, safetensors metadata, and a summary, as read from a checkpoint.
pub type Imported = (
    HashMap<String, Tensor>,
    HashMap<String, String>,
    ImportSummary,
);

/// Reads an Ultralytics checkpoint and returns our tensors plus metadata.
pub fn read_checkpoint(path: &Path) -> Result<Imported, ImportError> {
    let p = || path.to_owned();
    let bytes = std::fs::read(path).map_err(|source| ImportError::Io { path: p(), source })?;
    let sha = hex(&sha2::Sha256::digest(&bytes));
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes.as_slice())).map_err(|e| {
        ImportError::NotACheckpoint {
            path: p(),
            reason: e.to_string(),
        }
    })?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| ImportError::NotACheckpoint {
            path: p(),
            reason: "no data.pkl in the archive".into(),
        })?;
    let dir = PathBuf::from(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
    let root = {
        let entry = zip.by_name(&pkl).map_err(|e| ImportError::NotACheckpoint {
            path: p(),
            reason: e.to_string(),
        })?;
        let mut reader = std::io::BufReader::new(entry);
        let mut stack = Stack::empty();
        let pe = |e: candle_core::Error| ImportError::Pickle {
            path: p(),
            entry: pkl.clone(),
            reason: e.to_string(),
        };
        stack.read_loop(&mut reader).map_err(pe)?;
        stack.finalize().map_err(pe)?
    };
    let Object::Dict(top) = &root else {
        return Err(ImportError::NoModel { path: p() });
    };
    let model = ["model", "ema"]
        .iter()
        .filter_map(|k| dict_get(top, k))
        .find(|o| module_parts(o).is_some())
        .ok_or_else(|| ImportError::NoModel { path: p() })?;
    let version = match dict_get(top, "version") {
        Some(Object::Unicode(v)) => Some(v.clone()),
        _ => None,
    };
    let Some((model_class, model_state)) = module_parts(model) else {
        return Err(ImportError::NoModel { path: p() });
    };
    if model_class != "DetectionModel" {
        return Err(ImportError::Unsupported {
            path: p(),
            reason: format!("model class is {model_class}, expected DetectionModel"),
        });
    }
    let names = class_names(model_state);

    let mut found = Walk::default();
    walk("", model, &dir, &mut found).map_err(|e| ImportError::Pickle {
        path: p(),
        entry: pkl.clone(),
        reason: e.to_string(),
    })?;
    if found.tensors.is_empty() {
        return Err(ImportError::NoTensors { path: p() });
    }
    for (idx, want) in LAYER_CLASSES {
        let got = found
            .classes
            .get(&format!("model.{idx}"))
            .map(String::as_str)
            .unwrap_or("(missing)");
        if got != want {
            return Err(ImportError::Unsupported {
                path: p(),
                reason: format!("layer {idx} is {got}, a YOLOv8 detection model has {want} there"),
            });
        }
    }
    if found.classes.contains_key("model.23") {
        return Err(ImportError::Unsupported {
            path: p(),
            reason: "more than 23 layers".into(),
        });
    }

    let mut tensors = HashMap::new();
    for info in &found.tensors {
        let Some(ours) = rename(&info.name) else {
            continue;
        };
        let t = read_tensor(&mut zip, info).map_err(|reason| ImportError::Tensor {
            path: p(),
            name: info.name.clone(),
            reason,
        })?;
        tensors.insert(ours, t);
    }
    if tensors.is_empty() {
        return Err(ImportError::NoTensors { path: p() });
    }
    let bn_eps = found
        .bn_eps
        .first()
        .copied()
        .unwrap_or(weights::DEFAULT_BN_EPS);
    if found.bn_eps.iter().any(|e| (e - bn_eps).abs() > 1e-12) {
        return Err(ImportError::Unsupported {
            path: p(),
            reason: "BatchNorm layers use different eps values".into(),
        });
    }
    let names = if names.is_empty() {
        // No names in the checkpoint: number the classes so that labels are still printable.
        let nc = tensors
            .get("head.cv3.0.2.weight")
            .map(|t| t.dims()[0])
            .unwrap_or(0);
        (0..nc).map(|i| format!("class{i}")).collect()
    } else {
        names
    };
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), FORMAT.to_string());
    metadata.insert(
        "names".to_string(),
        serde_json::to_string(&names).unwrap_or_else(|_| "[]".into()),
    );
    metadata.insert("bn_eps".to_string(), format!("{bn_eps}"));
    metadata.insert(
        "source".to_string(),
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    metadata.insert("source_sha256".to_string(), sha.clone());
    if let Some(v) = &version {
        metadata.insert("ultralytics_version".to_string(), v.clone());
    }
    let summary = ImportSummary {
        tensors: tensors.len(),
        names,
        bn_eps,
        ultralytics_version: version,
        source_sha256: sha,
    };
    Ok((tensors, metadata, summary))
}

/// `edge-agent model import`: checkpoint in, safetensors out (written to a temporary name and
/// renamed, so a failed import never leaves a half-written model). The CLI then loads the output
/// back as a detector before it reports success.
pub fn import_checkpoint(input: &Path, output: &Path) -> Result<ImportSummary, ImportError> {
    let (tensors, metadata, summary) = read_checkpoint(input)?;
    let tmp = output.with_extension("safetensors.tmp");
    let werr = |reason: String| ImportError::Write {
        path: output.to_owned(),
        reason,
    };
    weights::write_safetensors(&tmp, &tensors, metadata).map_err(|e| werr(e.to_string()))?;
    std::fs::rename(&tmp, output).map_err(|e| werr(e.to_string()))?;
    Ok(summary)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::rename;

    #[test]
    fn renames_ultralytics_layers() {
        assert_eq!(
            rename("model.0.conv.weight").as_deref(),
            Some("net.b1.0.conv.weight")
        );
        assert_eq!(
            rename("model.2.m.1.cv2.bn.running_var").as_deref(),
            Some("net.b2.0.bottleneck.1.cv2.bn.running_var")
        );
        assert_eq!(
            rename("model.21.cv1.conv.weight").as_deref(),
            Some("fpn.n6.cv1.conv.weight")
        );
        assert_eq!(
            rename("model.22.cv3.2.2.bias").as_deref(),
            Some("head.cv3.2.2.bias")
        );
        assert_eq!(
            rename("model.22.dfl.conv.weight").as_deref(),
            Some("head.dfl.conv.weight")
        );
        assert_eq!(rename("model.4.cv1.bn.num_batches_tracked"), None);
        assert_eq!(rename("model.10.foo"), None);
        assert_eq!(rename("stride"), None);
    }
}
