//! The detector on real weights and real photos, checked against ONNX Runtime; round trips of
//! model files; bad input.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use edge_vision::agent::detect::postprocess::iou;
use edge_vision::agent::detect::weights::{self, ModelFile};
use edge_vision::agent::detect::{self, Detector, DetectorConfig, ModelSize};

fn detector(config: DetectorConfig) -> Detector {
    Detector::load(common::imported_model(), None, &Device::Cpu, config)
        .expect("load imported model")
}

#[test]
fn import_keeps_class_names_and_recognises_yolov8s() {
    let det = detector(DetectorConfig::default());
    assert_eq!(det.names(), ["Normal", "Fall"]);
    assert_eq!(det.size(), ModelSize::S);
    let info = det.info();
    assert_eq!(info.bn_eps, 1e-3);
    assert_eq!(
        info.metadata.get("format").map(String::as_str),
        Some(weights::FORMAT)
    );
    assert_eq!(
        info.metadata.get("ultralytics_version").map(String::as_str),
        Some("8.3.202")
    );
    // YOLOv8s has ~11.1M parameters.
    assert!(
        (10_000_000..12_000_000).contains(&info.parameters),
        "{}",
        info.parameters
    );
}

#[test]
fn import_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    detect::import::import_checkpoint(&common::fixture("fall-best.pt"), &a).unwrap();
    detect::import::import_checkpoint(&common::fixture("fall-best.pt"), &b).unwrap();
    let fa = ModelFile::read(&a).unwrap();
    let fb = ModelFile::read(&b).unwrap();
    assert_eq!(fa.metadata, fb.metadata);
    assert_eq!(fa.tensors.len(), fb.tensors.len());
    let mut total = 0;
    for (name, ta) in &fa.tensors {
        let tb = &fb.tensors[name];
        let va = ta
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let vb = tb
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(va == vb, "tensor {name} differs between two imports");
        total += va.len();
    }
    assert!(total > 10_000_000);
}

/// Bus: the three men in front of the bus; Zidane: two people. Boxes and scores agree with
/// ONNX Runtime on the same model's ONNX export: IoU >= 0.9 per box, confidence within 0.02.
#[test]
fn detections_agree_with_onnx_runtime() {
    let det = detector(DetectorConfig::default());
    let refs = common::ort_reference();
    assert_eq!(refs.len(), 2);
    for r in &refs {
        let (_, got) = det.detect_file(&common::fixture(&r.image)).expect("detect");
        assert_eq!((got.width, got.height), (r.width, r.height));
        assert_eq!(
            got.detections.len(),
            r.detections.len(),
            "{}: {:?}",
            r.image,
            got.detections
        );
        for want in &r.detections {
            let best = got
                .detections
                .iter()
                .filter(|d| d.class_id == want.class_id)
                .max_by(|a, b| iou(&a.bbox, &want.bbox).total_cmp(&iou(&b.bbox, &want.bbox)))
                .expect("a box of the same class");
            let overlap = iou(&best.bbox, &want.bbox);
            assert!(
                overlap >= 0.9,
                "{}: IoU {overlap} for {want:?} vs {best:?}",
                r.image
            );
            assert!(
                (best.confidence - want.confidence).abs() <= 0.02,
                "{}: confidence {} vs ONNX Runtime {}",
                r.image,
                best.confidence,
                want.confidence
            );
            assert_eq!(best.label, want.label);
        }
    }
    // The content the issue names, independent of the fixture.
    let (_, bus) = det.detect_file(&common::fixture("bus.jpg")).unwrap();
    assert_eq!(
        bus.detections
            .iter()
            .filter(|d| d.label == "Normal")
            .count(),
        3
    );
    for d in &bus.detections {
        // Standing men: taller than wide, in the lower part of the photo.
        let [x1, y1, x2, y2] = d.bbox;
        assert!(y2 - y1 > 1.5 * (x2 - x1), "{d:?}");
        assert!(y2 > 800.0, "{d:?}");
    }
    let (_, zidane) = det.detect_file(&common::fixture("zidane.jpg")).unwrap();
    assert_eq!(zidane.detections.len(), 2);
}

#[test]
fn smaller_inputs_still_find_the_people() {
    for size in [320, 416, 480, 512] {
        let det = detector(DetectorConfig {
            input_size: size,
            ..DetectorConfig::default()
        });
        let (_, r) = det.detect_file(&common::fixture("bus.jpg")).unwrap();
        assert!(r.detections.len() >= 2, "size {size}: {:?}", r.detections);
        assert!(
            r.detections.iter().all(|d| d.label == "Normal"),
            "size {size}: {:?}",
            r.detections
        );
    }
}

#[test]
fn greyscale_and_rgba_inputs_work() {
    let det = detector(DetectorConfig::default());
    let img = image::open(common::fixture("bus.jpg")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let grey = dir.path().join("bus-grey.png");
    let rgba = dir.path().join("bus-rgba.png");
    image::DynamicImage::ImageLuma8(img.to_luma8())
        .save(&grey)
        .unwrap();
    image::DynamicImage::ImageRgba8(img.to_rgba8())
        .save(&rgba)
        .unwrap();
    let (_, g) = det.detect_file(&grey).unwrap();
    assert!(g.detections.len() >= 2, "greyscale: {:?}", g.detections);
    let (_, a) = det.detect_file(&rgba).unwrap();
    let (_, orig) = det.detect_file(&common::fixture("bus.jpg")).unwrap();
    // RGBA PNG holds the same pixels as the JPEG decode: identical result.
    assert_eq!(a.detections, orig.detections);
}

/// A detector over a randomly initialised model (no file involved).
fn random_detector(tensors: HashMap<String, Tensor>, input_size: usize) -> Detector {
    Detector::from_file(
        ModelFile {
            tensors,
            metadata: HashMap::new(),
        },
        Path::new("random"),
        None,
        &Device::Cpu,
        DetectorConfig {
            input_size,
            ..DetectorConfig::default()
        },
    )
    .expect("random model loads")
}

/// Tensors of a model, forward output flattened, for exact comparisons.
fn outputs(det: &Detector, input: &Tensor) -> Vec<f32> {
    det.forward(input)
        .unwrap()
        .into_iter()
        .flat_map(|l| l.boxes.into_iter().chain(l.classes))
        .collect()
}

#[test]
fn random_yolov8n_saved_and_reloaded_gives_identical_outputs() {
    let tensors = detect::random_yolo_v8(ModelSize::N, 80, 7).unwrap();
    let direct = random_detector(tensors.clone(), 320);
    assert_eq!(direct.size(), ModelSize::N);
    assert_eq!(direct.names().len(), 80);
    assert_eq!(direct.names()[0], "person"); // COCO names for an 80-class model without names
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("n.safetensors");
    weights::write_safetensors(&file, &tensors, HashMap::new()).unwrap();
    let reloaded = Detector::load(
        &file,
        None,
        &Device::Cpu,
        DetectorConfig {
            input_size: 320,
            ..DetectorConfig::default()
        },
    )
    .unwrap();
    let img = image::open(common::fixture("zidane.jpg")).unwrap();
    let (input, _) = direct.prepare(&img).unwrap();
    let a = outputs(&direct, &input);
    let b = outputs(&reloaded, &input);
    assert_eq!(a.len(), (40 * 40 + 20 * 20 + 10 * 10) * (64 + 80));
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, b, "reloaded model differs");
    // And the outputs depend on the weights (a different seed differs).
    let other = random_detector(detect::random_yolo_v8(ModelSize::N, 80, 8).unwrap(), 320);
    assert_ne!(a, outputs(&other, &input));
}

#[test]
fn every_stock_size_loads_from_its_shapes() {
    for (size, nc) in [(ModelSize::N, 3), (ModelSize::S, 1), (ModelSize::M, 80)] {
        let det = random_detector(detect::random_yolo_v8(size, nc, 1).unwrap(), 64);
        assert_eq!(det.size(), size);
        assert_eq!(det.names().len(), nc);
    }
}

#[test]
fn the_fused_cpu_path_matches_candles_reference_convolutions() {
    // Same imported weights, run once through our fused GEMM path and once through Candle's
    // stock conv2d (the path other devices take): outputs agree.
    let tensors = detect::random_yolo_v8(ModelSize::N, 2, 3).unwrap();
    let fused = random_detector(tensors.clone(), 128);
    let img = image::open(common::fixture("bus.jpg")).unwrap();
    let (input, _) = fused.prepare(&img).unwrap();
    let ours = outputs(&fused, &input);
    let reference =
        edge_vision::agent::detect::model::reference_forward(&tensors, 1e-3, &input).unwrap();
    assert_eq!(ours.len(), reference.len());
    let max_err = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0.0f32, f32::max);
    assert!(max_err < 1e-3, "max relative error {max_err}");
}

#[test]
fn bad_model_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let load = |p: &Path| {
        Detector::load(p, None, &Device::Cpu, DetectorConfig::default())
            .unwrap_err()
            .to_string()
    };

    let missing = dir.path().join("missing.safetensors");
    let e = load(&missing);
    assert!(
        e.contains("missing.safetensors") && e.contains("No such file"),
        "{e}"
    );

    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert!(load(&empty).contains("is empty"), "{}", load(&empty));

    let full = std::fs::read(common::imported_model()).unwrap();
    for cut in [7, 100, full.len() / 2, full.len() - 1] {
        let truncated = dir.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&truncated, &full[..cut]).unwrap();
        let e = load(&truncated);
        assert!(
            e.contains("not a valid safetensors file") && e.contains(&format!("cut{cut}")),
            "{e}"
        );
    }

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, vec![0xffu8; 4096]).unwrap();
    assert!(
        load(&garbage).contains("not a valid safetensors"),
        "{}",
        load(&garbage)
    );

    // Valid safetensors, wrong model: names the missing tensor.
    let other = dir.path().join("other.safetensors");
    let mut t = HashMap::new();
    t.insert(
        "foo.weight".to_string(),
        Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    weights::write_safetensors(&other, &t, HashMap::new()).unwrap();
    let e = load(&other);
    assert!(
        e.contains("not a YOLOv8") && e.contains("net.b1.0.conv.weight"),
        "{e}"
    );

    // No tensors at all.
    let none = dir.path().join("none.safetensors");
    weights::write_safetensors(&none, &HashMap::new(), HashMap::new()).unwrap();
    let e = load(&none);
    assert!(
        e.contains("none.safetensors")
            && (e.contains("holds no tensors") || e.contains("not a valid")),
        "{e}"
    );
}

/// A minimal pickle: `{"model": DetectionModel()}` with an empty module tree.
fn empty_model_pickle() -> Vec<u8> {
    let mut p = vec![0x80, 0x02, b'}'];
    let uni = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    };
    uni(&mut p, "model");
    p.extend(b"cultralytics.nn.tasks\nDetectionModel\n");
    p.push(b')');
    p.push(0x81); // NEWOBJ
    p.push(b'}');
    uni(&mut p, "_modules");
    p.push(b'}');
    p.push(b's');
    p.push(b'b'); // BUILD
    p.push(b's');
    p.push(b'.');
    p
}

fn zip_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in entries {
            z.start_file(*name, opts).unwrap();
            std::io::Write::write_all(&mut z, data).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let import = |p: &Path| {
        detect::import::import_checkpoint(p, &out)
            .unwrap_err()
            .to_string()
    };

    let no_tensors = dir.path().join("no-tensors.pt");
    std::fs::write(
        &no_tensors,
        zip_with(&[("ckpt/data.pkl", &empty_model_pickle())]),
    )
    .unwrap();
    let e = import(&no_tensors);
    assert!(
        e.contains("no-tensors.pt") && e.contains("holds no tensors"),
        "{e}"
    );
    assert!(!out.exists(), "nothing is written on failure");

    let not_zip = dir.path().join("text.pt");
    std::fs::write(&not_zip, b"hello").unwrap();
    assert!(
        import(&not_zip).contains("not a PyTorch zip checkpoint"),
        "{}",
        import(&not_zip)
    );

    let no_pkl = dir.path().join("nopkl.pt");
    std::fs::write(&no_pkl, zip_with(&[("x/readme", b"hi")])).unwrap();
    assert!(
        import(&no_pkl).contains("no data.pkl"),
        "{}",
        import(&no_pkl)
    );

    let bad_pkl = dir.path().join("badpkl.pt");
    std::fs::write(
        &bad_pkl,
        zip_with(&[("x/data.pkl", &[0x80, 0x02, 0xff, 0xfe])]),
    )
    .unwrap();
    assert!(
        import(&bad_pkl).contains("cannot unpickle"),
        "{}",
        import(&bad_pkl)
    );

    assert!(import(&dir.path().join("absent.pt")).contains("absent.pt"));

    // The real checkpoint with a storage entry cut short fails on that tensor, by name.
    let real = std::fs::read(common::fixture("fall-best.pt")).unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(real.as_slice())).unwrap();
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut data).unwrap();
        let name = f.name().expect("entry name").to_string();
        if name.ends_with("/data/0") {
            data.truncate(data.len() / 2);
        }
        entries.push((name, data));
    }
    let refs: Vec<(&str, &[u8])> = entries
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let cut = dir.path().join("cut.pt");
    std::fs::write(&cut, zip_with(&refs)).unwrap();
    let e = import(&cut);
    assert!(e.contains("shorter than the tensor"), "{e}");
}

#[test]
fn bad_images_give_clear_errors_and_no_panic() {
    let det = detector(DetectorConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &Path| det.detect_file(p).unwrap_err().to_string();

    let missing = dir.path().join("missing.jpg");
    assert!(err(&missing).contains("missing.jpg"), "{}", err(&missing));

    let empty = dir.path().join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    assert!(err(&empty).contains("is empty"), "{}", err(&empty));

    let text = dir.path().join("notes.jpg");
    std::fs::write(&text, b"this is not an image at all").unwrap();
    assert!(err(&text).contains("cannot be decoded"), "{}", err(&text));

    let jpeg = std::fs::read(common::fixture("bus.jpg")).unwrap();
    let truncated = dir.path().join("truncated.jpg");
    std::fs::write(&truncated, &jpeg[..jpeg.len() / 3]).unwrap();
    // A cut JPEG either decodes (grey bottom) or fails cleanly; it never panics.
    let _ = det.detect_file(&truncated);

    let one = dir.path().join("one.png");
    image::RgbImage::from_pixel(1, 1, image::Rgb([10, 200, 30]))
        .save(&one)
        .unwrap();
    let (_, r) = det.detect_file(&one).expect("1x1 image is processed");
    assert_eq!((r.width, r.height), (1, 1));
    assert!(r
        .detections
        .iter()
        .all(|d| d.bbox.iter().all(|v| (0.0..=1.0).contains(v))));

    // 10000x10000: refused from the header by default (no 300 MB allocation) ...
    let huge = dir.path().join("huge.png");
    image::GrayImage::new(10_000, 10_000).save(&huge).unwrap();
    let e = err(&huge);
    assert!(
        e.contains("10000x10000") && e.contains("over the limit"),
        "{e}"
    );
    // ... and processed when the limit is raised.
    let big = detector(DetectorConfig {
        max_pixels: 100_000_000,
        ..DetectorConfig::default()
    });
    let (_, r) = big
        .detect_file(&huge)
        .expect("huge image with raised limit");
    assert_eq!((r.width, r.height), (10_000, 10_000));
    assert!(
        r.detections.is_empty(),
        "a black image has no people: {:?}",
        r.detections
    );
}

#[test]
fn invalid_configuration_is_refused() {
    for cfg in [
        DetectorConfig {
            input_size: 500,
            ..DetectorConfig::default()
        },
        DetectorConfig {
            input_size: 0,
            ..DetectorConfig::default()
        },
        DetectorConfig {
            conf: 1.5,
            ..DetectorConfig::default()
        },
        DetectorConfig {
            iou: -0.1,
            ..DetectorConfig::default()
        },
    ] {
        let e = Detector::load(common::imported_model(), None, &Device::Cpu, cfg).unwrap_err();
        assert!(matches!(e, detect::LoadError::Config(_)), "{e}");
    }
}
