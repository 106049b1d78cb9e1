//! The benchmark and developer commands of `edge-vision-dev` (not shipped to devices): the
//! detector's forward pass and whole-frame rate, filling an outbox with synthetic events, a
//! bare producer as the uplink's baseline, and the sink against a raw `COPY` of the same rows.
//! Each prints one JSON object; docs/benchmarks.md says which script runs which.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Objects, Synthetic};
use crate::agent::commands::{self, CommandError, ModelChoice};
use crate::agent::detect::{image_io, Detector};
use crate::agent::outbox::Durability;
use crate::agent::source;
use crate::agent::uplink::{self, UplinkConfig};
use crate::exit::{self, ExitStatus};
use crate::sink::{self, SinkConfig, SinkError, SinkStatus};

/// Why a developer command failed.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("detector: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("detector: {0}")]
    Detect(#[from] crate::agent::detect::DetectError),
    #[error("outbox: {0}")]
    Outbox(#[from] crate::agent::outbox::EnqueueError),
    #[error("outbox: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("output: {0}")]
    Json(#[from] serde_json::Error),
    #[error("output: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

impl ExitStatus for DevError {
    fn exit_code(&self) -> u8 {
        match self {
            DevError::Command(e) => e.exit_code(),
            DevError::Sink(e) => e.exit_code(),
            DevError::Usage(_) => exit::USAGE,
            DevError::Detect(_) => exit::INPUT,
            _ => exit::INTERNAL,
        }
    }
}

fn round(v: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

/// `bench detector --image`: the forward pass alone, median and p90 after warm-up.
pub fn detector(
    model: &ModelChoice,
    image: &Path,
    runs: usize,
    warmup: usize,
    json: bool,
) -> Result<u8, DevError> {
    let det = model.load(0.25, 0.45)?;
    let img = image_io::load_image(image, det.config().max_pixels)
        .map_err(|e| CommandError::Input(e.to_string()))?;
    let (tensor, _) = det.prepare(&img)?;
    for _ in 0..warmup {
        det.forward(&tensor)?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        det.forward(&tensor)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let threads = rayon::current_num_threads();
    if json {
        let out = serde_json::json!({
            "median_ms": round(pick(0.5), 2),
            "p90_ms": round(pick(0.9), 2),
            "runs": times.len(),
            "threads": threads,
        });
        println!("{out}");
    } else {
        println!(
            "{} ({} classes, size {}, input {}): median {:.1} ms, p90 {:.1} ms over {} runs, {threads} threads",
            model.model.display(),
            det.names().len(),
            det.size(),
            model.size,
            pick(0.5),
            pick(0.9),
            times.len(),
        );
    }
    Ok(exit::OK)
}

/// `bench detector --images`: whole detections (letterbox, forward, NMS) over decoded frames,
/// `passes` times over the set: the bare-inference baseline for `run`'s pipeline fps.
pub fn detector_frames(model: &ModelChoice, pattern: &str, passes: usize) -> Result<u8, DevError> {
    let det: Detector = model.load(0.25, 0.45)?;
    let files = source::list_images(pattern).map_err(|e| DevError::Usage(e.to_string()))?;
    let frames: Vec<_> = files
        .iter()
        .map(|f| {
            image_io::load_image(f, det.config().max_pixels)
                .map_err(|e| DevError::Command(CommandError::Input(e.to_string())))
        })
        .collect::<Result<_, _>>()?;
    let Some(first) = frames.first() else {
        return Err(DevError::Usage(format!("no images match {pattern}")));
    };
    det.detect(first)?; // warm-up
    let start = Instant::now();
    let mut n = 0u64;
    for _ in 0..passes.max(1) {
        for f in &frames {
            det.detect(f)?;
            n += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "frames": n,
            "seconds": round(secs, 2),
            "fps": round(n as f64 / secs, 2),
            "threads": rayon::current_num_threads(),
        })
    );
    Ok(exit::OK)
}

/// Bytes this process has written (`/proc/self/io`): to storage, and through write calls.
fn io_written() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    (field("write_bytes:"), field("wchar:"))
}

/// What `outbox fill` writes (its command-line arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct Fill {
    #[arg(long)]
    pub outbox: std::path::PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    #[arg(long, default_value = "synthetic-device")]
    pub device_id: String,
    /// Events per transaction (group commit).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Share of events that carry detections.
    #[arg(long, default_value_t = 0.5)]
    pub detection_ratio: f64,
    /// Outbox cap in bytes.
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    pub max_bytes: u64,
    /// fsync per commit (`full`) or per checkpoint (`normal`).
    #[arg(long, value_enum, default_value = "full")]
    pub durability: Durability,
    /// Print `acked SEQ` after every committed batch (crash tests read it).
    #[arg(long)]
    pub progress: bool,
    #[arg(long)]
    pub json: bool,
}

/// `outbox fill`: enqueues synthetic events in batches; prints the rate, bytes written per
/// event and the outbox's state.
pub fn outbox_fill(f: &Fill) -> Result<u8, DevError> {
    let mut ob = commands::open_outbox(&f.outbox, f.max_bytes, f.durability, &f.device_id)?;
    let gen = Synthetic::new(&f.device_id);
    let (disk0, wchar0) = io_written();
    let start = Instant::now();
    let mut done = 0u64;
    while done < f.count {
        let n = (f.batch.max(1) as u64).min(f.count - done);
        let mut events = gen.events(done..done + n, Objects::Share(f.detection_ratio));
        let seqs = ob.enqueue(&mut events)?;
        done += n;
        if let (true, Some(last)) = (f.progress, seqs.last()) {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "acked {last}")?;
            out.flush()?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let (disk1, wchar1) = io_written();
    let stats = ob.stats()?;
    let per_event = |bytes: u64| (bytes as f64 / f.count.max(1) as f64).round();
    let out = serde_json::json!({
        "enqueued": f.count,
        "seconds": round(secs, 3),
        "events_per_sec": (f.count as f64 / secs).round(),
        "disk_bytes_per_event": per_event(disk1.saturating_sub(disk0)),
        "written_bytes_per_event": per_event(wchar1.saturating_sub(wchar0)),
        "depth": stats.depth,
        "file_bytes": stats.file_bytes,
        "evictions": stats.evictions,
    });
    if f.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(exit::OK)
}

/// `outbox raw-send`: the uplink's baseline. Every payload of the outbox through a bare
/// rdkafka producer with the same client settings, no bookkeeping, nothing deleted; timed.
pub fn outbox_raw_send(path: &Path, brokers: &str, topic: &str) -> Result<u8, DevError> {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let ob = commands::open_outbox(path, u64::MAX / 4, Durability::Full, "raw-send")?;
    let rows = ob.next_batch(u32::MAX as usize, &std::collections::HashSet::new(), None)?;
    let producer: ThreadedProducer<DefaultProducerContext> =
        uplink::client_config(&UplinkConfig::new(brokers, topic))
            .map_err(CommandError::Uplink)?
            .create()?;
    let start = Instant::now();
    for r in &rows {
        let mut rec = BaseRecord::to(topic)
            .key(r.device_id.as_bytes())
            .payload(&r.payload);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((e, back))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    rec = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    producer.flush(rdkafka::util::Timeout::After(Duration::from_secs(300)))?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"sent": rows.len(), "seconds": round(secs, 3), "msgs_per_sec": (rows.len() as f64 / secs).round()})
    );
    Ok(exit::OK)
}

/// Creates (or re-creates) a scratch database with the schema on `server`.
async fn scratch_db(server: &str, name: &str) -> Result<String, DevError> {
    let admin = sink::connect(&format!("{server} dbname=postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let url = format!("{server} dbname={name}");
    let mut c = sink::connect(&url).await?;
    sink::migrate(&mut c).await?;
    Ok(url)
}

/// `sink bench`: `n` synthetic events through the topic into a fresh database, timed, against a
/// raw COPY BINARY of the same rows into another fresh database. Both scratch databases
/// (`edge_sink_bench`, `edge_sink_bench_copy`) are dropped and re-created on `server`.
pub async fn sink(
    brokers: &str,
    topic: &str,
    server: &str,
    n: u64,
    batch_size: usize,
) -> Result<serde_json::Value, DevError> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let events = Synthetic::new("bench")
        .devices(16)
        .with_seq()
        .events(0..n, Objects::UpTo(3));
    let objects: u64 = events.iter().map(|e| e.detections.len() as u64).sum();

    // 1. Fill the topic (not timed).
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("compression.type", "zstd")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    for chunk in events.chunks(50_000) {
        let mut futs = Vec::with_capacity(chunk.len());
        for e in chunk {
            let payload = serde_json::to_vec(e)?;
            let mut rec = FutureRecord::to(topic).key(&e.device_id).payload(&payload);
            loop {
                match producer.send_result(rec) {
                    Ok(f) => break futs.push(f),
                    Err((_, back)) => {
                        rec = back;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
        }
        for f in futs {
            f.await
                .map_err(|_| DevError::Failed("delivery cancelled".into()))?
                .map_err(|(e, _)| e)?;
        }
    }

    // 2. The sink, from start to the last row (catch-up time) and first to last batch (rate).
    let url = scratch_db(server, "edge_sink_bench").await?;
    let mut cfg = SinkConfig::new(brokers, topic, "edge-sink-bench", &url);
    cfg.batch_size = batch_size;
    cfg.metrics_listen = String::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (status_tx, mut status_rx) = tokio::sync::watch::channel(SinkStatus::default());
    let started = Instant::now();
    let task = tokio::spawn(sink::run(cfg, stop_rx, status_tx));
    let mut first: Option<(Instant, u64, u64)> = None;
    loop {
        let st = status_rx.borrow_and_update().clone();
        if st.batches > 0 && first.is_none() {
            first = Some((Instant::now(), st.events, st.objects));
        }
        if st.events >= n {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(DevError::Failed(format!(
                "sink did not finish in 30 min: {st:?}"
            )));
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), status_rx.changed()).await;
    }
    let done = Instant::now();
    let st = status_rx.borrow().clone();
    let _ = stop_tx.send(true);
    let _ = task.await;
    let catch_up = done - started;
    let (t1, e1, o1) = first.unwrap_or((started, 0, 0));
    let sink_rows = (st.events - e1) + (st.objects - o1);
    let sink_rate = sink_rows as f64 / (done - t1).as_secs_f64();

    // 3. Raw COPY BINARY of the same rows, same batch size, into a fresh database.
    let url = scratch_db(server, "edge_sink_bench_copy").await?;
    let mut client = sink::connect(&url).await?;
    let t = Instant::now();
    let (ce, co) = sink::writer::copy_baseline(&mut client, topic, &events, batch_size).await?;
    let copy_secs = t.elapsed().as_secs_f64();
    let copy_rate = (ce + co) as f64 / copy_secs;
    Ok(serde_json::json!({
        "events": n,
        "objects": objects,
        "batch_size": batch_size,
        "sink_catch_up_s": round(catch_up.as_secs_f64(), 2),
        "sink_rows_per_s": sink_rate.round(),
        "copy_rows_per_s": copy_rate.round(),
        "copy_s": round(copy_secs, 2),
        "ratio": round(sink_rate / copy_rate, 3),
        "sink_batches": st.batches,
    }))
}
