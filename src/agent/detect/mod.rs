//! The detector: YOLOv8 in Candle, from file to labelled boxes.
//!
//! Only [`Detector`], its configuration, [`Detection`] and the model's size are public; the
//! network's blocks are private to [`model`].

pub mod annotate;
mod conv;
pub mod fetch;
pub mod image_io;
pub mod import;
pub mod model;
pub mod postprocess;
pub mod weights;

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::DynamicImage;

pub use image_io::{ImageError, Letterbox};
pub use model::{LevelOutput, ModelSize};
pub use postprocess::Detection;
pub use weights::ModelLoadError;

/// The 80 COCO class names, used for 80-class models that carry no names of their own.
pub const COCO_NAMES: &str = include_str!("../../../models/coco.names");

/// Input sides the detector accepts: multiples of 32 (the largest stride) in this range.
pub const MIN_INPUT: usize = 32;
pub const MAX_INPUT: usize = 1920;

/// Knobs of one detector instance.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DetectorConfig {
    /// Square network input side (640 default; 320/416/480/512 run faster).
    pub input_size: usize,
    /// Minimum class confidence for a box.
    pub conf: f32,
    /// IoU above which NMS suppresses the weaker box of the same class.
    pub iou: f32,
    /// At most this many boxes per image.
    pub max_detections: usize,
    /// Refuse images with more pixels than this (checked before decoding).
    pub max_pixels: u64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            input_size: 640,
            conf: 0.25,
            iou: 0.45,
            max_detections: 300,
            max_pixels: image_io::DEFAULT_MAX_PIXELS,
        }
    }
}

/// A configuration value the detector cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("input size {0} is not a multiple of 32 between {MIN_INPUT} and {MAX_INPUT}")]
    InputSize(usize),
    #[error("{name} = {value} is outside 0..=1")]
    Threshold { name: &'static str, value: f32 },
}

impl DetectorConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.input_size.is_multiple_of(32)
            || !(MIN_INPUT..=MAX_INPUT).contains(&self.input_size)
        {
            return Err(ConfigError::InputSize(self.input_size));
        }
        for (name, value) in [("conf", self.conf), ("iou", self.iou)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(ConfigError::Threshold { name, value });
            }
        }
        Ok(())
    }
}

/// Why detection on one image failed.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("inference failed: {0}")]
    Inference(#[from] candle_core::Error),
}

/// Why a detector could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelLoadError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// One image's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageResult {
    pub width: u32,
    pub height: u32,
    pub detections: Vec<Detection>,
    /// Letterbox + forward + decode + NMS, in milliseconds.
    pub inference_ms: f64,
}

/// What `model info` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub size: String,
    pub num_classes: usize,
    pub names: Vec<String>,
    pub bn_eps: f64,
    pub tensors: usize,
    pub parameters: usize,
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// A loaded YOLOv8 detector.
#[derive(Debug)]
pub struct Detector {
    /// The network, BatchNorm folded.
    model: model::YoloV8,
    /// Class names, index = class id.
    names: Vec<String>,
    /// Where tensors live (CPU, or CUDA with the `cuda` feature).
    device: Device,
    /// Thresholds and input size.
    config: DetectorConfig,
    /// What the file said about itself, for `model info`.
    info: ModelInfo,
}

impl Detector {
    /// Loads a safetensors model. Class names come from the file's metadata, else from
    /// `names_file`, else COCO's for an 80-class model, else `class0..`.
    pub fn load(
        path: &Path,
        names_file: Option<&Path>,
        device: &Device,
        config: DetectorConfig,
    ) -> Result<Self, LoadError> {
        config.validate()?; // before reading a large file for nothing
        let file = weights::ModelFile::read(path)?;
        Self::from_file(file, path, names_file, device, config)
    }

    /// Builds a detector from tensors already in memory (used by `load` and by tests).
    pub fn from_file(
        file: weights::ModelFile,
        path: &Path,
        names_file: Option<&Path>,
        device: &Device,
        config: DetectorConfig,
    ) -> Result<Self, LoadError> {
        config.validate()?;
        let bn_eps = file.bn_eps(path)?;
        let meta_names = file.names(path)?;
        let tensors = file.tensors.len();
        let parameters = file
            .tensors
            .iter()
            .filter(|(k, _)| !k.contains("running_"))
            .map(|(_, t)| t.elem_count())
            .sum();
        let vb = VarBuilder::from_tensors(file.tensors, DType::F32, device);
        let model = model::YoloV8::load(vb, bn_eps).map_err(|e| ModelLoadError::Architecture {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let names = match (names_file, meta_names) {
            (Some(f), _) => weights::read_names_file(f)?,
            (None, Some(n)) => n,
            (None, None) if model.num_classes == 80 => COCO_NAMES
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            (None, None) => (0..model.num_classes)
                .map(|i| format!("class{i}"))
                .collect(),
        };
        if names.len() != model.num_classes {
            return Err(ModelLoadError::Architecture {
                path: path.to_owned(),
                reason: format!(
                    "{} class names for a {}-class head",
                    names.len(),
                    model.num_classes
                ),
            }
            .into());
        }
        let info = ModelInfo {
            size: model.size.to_string(),
            num_classes: model.num_classes,
            names: names.clone(),
            bn_eps,
            tensors,
            parameters,
            metadata: file
                .metadata
                .into_iter()
                .filter(|(k, _)| k != "names")
                .collect(),
        };
        Ok(Self {
            model,
            names,
            device: device.clone(),
            config,
            info,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn size(&self) -> ModelSize {
        self.model.size
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Letterboxes an image into the network input tensor.
    pub fn prepare(&self, img: &DynamicImage) -> candle_core::Result<(Tensor, Letterbox)> {
        image_io::letterbox_tensor(img, self.config.input_size, &self.device)
    }

    /// The forward pass alone (what `bench` times).
    pub fn forward(&self, input: &Tensor) -> candle_core::Result<Vec<LevelOutput>> {
        self.model.forward(input)
    }

    /// Decodes raw outputs into labelled boxes in original pixels.
    pub fn postprocess(&self, levels: &[LevelOutput], lb: &Letterbox) -> Vec<Detection> {
        let cands = postprocess::decode(
            levels,
            self.model.num_classes,
            self.model.reg_max,
            &self.model.dfl,
            self.config.conf,
        );
        let kept = postprocess::nms(cands, self.config.iou, self.config.max_detections);
        postprocess::finish(kept, lb, &self.names)
    }

    /// Detects objects in a decoded image.
    pub fn detect(&self, img: &DynamicImage) -> Result<ImageResult, DetectError> {
        let start = Instant::now();
        let (input, lb) = self.prepare(img)?;
        let levels = self.forward(&input)?;
        let detections = self.postprocess(&levels, &lb);
        Ok(ImageResult {
            width: lb.orig_w,
            height: lb.orig_h,
            detections,
            inference_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Reads an image file and detects objects in it.
    pub fn detect_file(&self, path: &Path) -> Result<(DynamicImage, ImageResult), DetectError> {
        let img = image_io::load_image(path, self.config.max_pixels)?;
        let result = self.detect(&img)?;
        Ok((img, result))
    }
}

/// Builds the tensor names and shapes of a YOLOv8 of the given width/depth multiples, in our
/// naming. Used to make randomly initialised models for tests and benches.
pub fn yolo_v8_layout(size: ModelSize, num_classes: usize) -> Vec<(String, Vec<usize>)> {
    let (w, d, r) = match size {
        ModelSize::N => (0.25, 0.33, 2.0),
        ModelSize::S => (0.50, 0.33, 2.0),
        ModelSize::M => (0.75, 0.67, 1.5),
        ModelSize::L => (1.00, 1.00, 1.0),
        ModelSize::X | ModelSize::Custom(_) => (1.25, 1.00, 1.0),
    };
    let ch = |c: f64| (c * w) as usize;
    let n = |k: f64| (k * d).round().max(1.0) as usize;
    let mut out = Vec::new();
    let mut conv = |p: &str, cin: usize, cout: usize, k: usize| {
        out.push((format!("{p}.conv.weight"), vec![cout, cin, k, k]));
        for s in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{p}.bn.{s}"), vec![cout]));
        }
    };
    let c2f = |p: &str,
               cin: usize,
               cout: usize,
               nb: usize,
               conv: &mut dyn FnMut(&str, usize, usize, usize)| {
        let c = cout / 2;
        conv(&format!("{p}.cv1"), cin, 2 * c, 1);
        conv(&format!("{p}.cv2"), (2 + nb) * c, cout, 1);
        for i in 0..nb {
            conv(&format!("{p}.bottleneck.{i}.cv1"), c, c, 3);
            conv(&format!("{p}.bottleneck.{i}.cv2"), c, c, 3);
        }
    };
    let (c64, c128, c256, c512) = (ch(64.), ch(128.), ch(256.), ch(512.));
    let c5 = (512. * w * r) as usize;
    conv("net.b1.0", 3, c64, 3);
    conv("net.b1.1", c64, c128, 3);
    c2f("net.b2.0", c128, c128, n(3.), &mut conv);
    conv("net.b2.1", c128, c256, 3);
    c2f("net.b2.2", c256, c256, n(6.), &mut conv);
    conv("net.b3.0", c256, c512, 3);
    c2f("net.b3.1", c512, c512, n(6.), &mut conv);
    conv("net.b4.0", c512, c5, 3);
    c2f("net.b4.1", c5, c5, n(3.), &mut conv);
    conv("net.b5.0.cv1", c5, c5 / 2, 1);
    conv("net.b5.0.cv2", c5 / 2 * 4, c5, 1);
    c2f("fpn.n1", c5 + c512, c512, n(3.), &mut conv);
    c2f("fpn.n2", c512 + c256, c256, n(3.), &mut conv);
    conv("fpn.n3", c256, c256, 3);
    c2f("fpn.n4", c256 + c512, c512, n(3.), &mut conv);
    conv("fpn.n5", c512, c512, 3);
    c2f("fpn.n6", c512 + c5, c5, n(3.), &mut conv);
    let c2 = (c256 / 4).max(64);
    let c3 = c256.max(num_classes.min(100));
    for (i, cin) in [c256, c512, c5].into_iter().enumerate() {
        conv(&format!("head.cv2.{i}.0"), cin, c2, 3);
        conv(&format!("head.cv2.{i}.1"), c2, c2, 3);
        conv(&format!("head.cv3.{i}.0"), cin, c3, 3);
        conv(&format!("head.cv3.{i}.1"), c3, c3, 3);
    }
    for i in 0..3 {
        out.push((format!("head.cv2.{i}.2.weight"), vec![64, c2, 1, 1]));
        out.push((format!("head.cv2.{i}.2.bias"), vec![64]));
        out.push((
            format!("head.cv3.{i}.2.weight"),
            vec![num_classes, c3, 1, 1],
        ));
        out.push((format!("head.cv3.{i}.2.bias"), vec![num_classes]));
    }
    out.push(("head.dfl.conv.weight".into(), vec![1, 16, 1, 1]));
    out
}

/// A randomly initialised YOLOv8 (uniform weights scaled by fan-in, positive variances,
/// DFL projection `0..16`), deterministic for a given seed.
pub fn random_yolo_v8(
    size: ModelSize,
    num_classes: usize,
    seed: u64,
) -> candle_core::Result<std::collections::HashMap<String, Tensor>> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut map = std::collections::HashMap::new();
    for (name, shape) in yolo_v8_layout(size, num_classes) {
        let n: usize = shape.iter().product();
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let bound = (3.0 / fan_in as f32).sqrt();
        let data: Vec<f32> = if name == "head.dfl.conv.weight" {
            (0..n).map(|i| i as f32).collect()
        } else if name.ends_with("running_var") {
            (0..n).map(|_| 0.5 + next()).collect()
        } else if name.ends_with("bn.weight") {
            (0..n).map(|_| 0.8 + 0.4 * next()).collect()
        } else if name.ends_with("running_mean")
            || name.ends_with("bn.bias")
            || name.ends_with(".bias")
        {
            (0..n).map(|_| 0.2 * (next() - 0.5)).collect()
        } else {
            (0..n).map(|_| bound * (2.0 * next() - 1.0)).collect()
        };
        map.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(map)
}
