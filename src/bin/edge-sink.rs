//! `edge-sink`: Kafka -> PostgreSQL. Thin: the work is in `edge_vision::sink`.
//!
//! Exit codes: 0 success (or stopped by SIGTERM/SIGINT); 1 runtime error; 2 bad usage.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_vision::settings;
use edge_vision::sink::{self, SinkConfig, SinkStatus};

#[derive(Parser)]
#[command(
    name = "edge-sink",
    version,
    about = "Kafka -> PostgreSQL sink for edge-vision events"
)]
struct Cli {
    /// Configuration file (default: /etc/edge-sink/sink.toml when it exists). Environment
    /// variables EDGE_SINK__KEY override it; flags override both.
    #[arg(long, global = true)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the migrations in migrations/ and exit.
    Migrate {
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Consume the topic into PostgreSQL until SIGTERM/SIGINT.
    Run {
        #[arg(long)]
        brokers: Option<String>,
        #[arg(long)]
        topic: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        database_url: Option<String>,
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long)]
        batch_ms: Option<u64>,
        /// `/metrics` address ("" turns it off).
        #[arg(long)]
        metrics_listen: Option<String>,
    },
    /// Benchmark: N synthetic events through the topic into a fresh database, timed, against
    /// a raw COPY BINARY of the same rows into another fresh database (docs/benchmarks.md).
    Bench {
        #[arg(long)]
        brokers: String,
        /// An existing, empty topic.
        #[arg(long)]
        topic: String,
        /// Server to create the two scratch databases on (libpq string without dbname).
        #[arg(long, default_value = "host=127.0.0.1 user=postgres")]
        server: String,
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        #[arg(long, default_value_t = 5000)]
        batch_size: usize,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the effective values (secrets masked).
    Check,
}

/// Loads the layered configuration; errors name the key and the file or variable.
fn load_config(file: Option<&std::path::Path>) -> Result<SinkConfig, settings::ConfigError> {
    let loaded = settings::load::<SinkConfig>(settings::SINK, file, &settings::process_env())?;
    let cfg = loaded.config;
    for (key, empty) in [
        ("brokers", cfg.brokers.is_empty()),
        ("topic", cfg.topic.is_empty()),
        ("group_id", cfg.group_id.is_empty()),
        ("database_url", cfg.database_url.is_empty()),
        ("batch_size", cfg.batch_size == 0),
    ] {
        if empty {
            return Err(settings::ConfigError::Invalid {
                key: key.into(),
                origin: loaded
                    .file
                    .as_ref()
                    .map(|f| format!("file {}", f.display()))
                    .unwrap_or_else(|| "environment".into()),
                message: "must not be empty or zero".into(),
            });
        }
    }
    // The connection string's TLS options and the password file, checked now so a mistake is
    // a configuration error (exit 2) rather than a failure at the first connection.
    if let Err(e) = edge_vision::database::Database::new(
        &cfg.database_url,
        cfg.database_password_file.as_deref(),
    ) {
        let key = e.key();
        let text = e.to_string();
        return Err(settings::ConfigError::Invalid {
            key: key.into(),
            origin: loaded
                .file
                .as_ref()
                .map(|f| format!("file {}", f.display()))
                .unwrap_or_else(|| "defaults or environment".into()),
            message: text
                .strip_prefix(&format!("{key}: "))
                .unwrap_or(&text)
                .to_string(),
        });
    }
    Ok(cfg)
}

/// A metric read off the status: name, help, getter.
type Field = (&'static str, &'static str, fn(&SinkStatus) -> f64);

/// Serves the sink's metrics from its status channel.
async fn serve_metrics(
    addr: &str,
    status: tokio::sync::watch::Receiver<SinkStatus>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use edge_vision::metrics::Registry;
    let listener = edge_vision::metrics::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let registry = std::sync::Arc::new(Registry::default());
    let fields: [Field; 8] = [
        ("edge_sink_events_total", "Event rows written.", |s| {
            s.events as f64
        }),
        ("edge_sink_objects_total", "Object rows written.", |s| {
            s.objects as f64
        }),
        (
            "edge_sink_dead_letters_total",
            "Messages dead-lettered.",
            |s| s.dead_letters as f64,
        ),
        ("edge_sink_batches_total", "Batches committed.", |s| {
            s.batches as f64
        }),
        (
            "edge_sink_db_retries_total",
            "Batch writes retried after a database error.",
            |s| s.db_retries as f64,
        ),
        (
            "edge_sink_broker_errors_total",
            "Consumer errors waited out (broker unreachable, transport).",
            |s| s.broker_errors as f64,
        ),
        (
            "edge_sink_offset_gaps_total",
            "Messages that arrived past a hole in their partition's offsets (records lost upstream).",
            |s| s.offset_gaps as f64,
        ),
        (
            "edge_sink_lag_messages",
            "Messages behind the high watermarks (librdkafka statistics).",
            |s| s.lag.map(|l| l as f64).unwrap_or(f64::NAN),
        ),
    ];
    for (name, help, f) in fields {
        let rx = status.clone();
        registry.gauge_fn(
            name,
            help,
            Box::new(move || vec![(String::new(), f(&rx.borrow()))]),
        );
    }
    let hist = registry.histogram(
        "edge_sink_batch_seconds",
        "Time to write one batch (COPY, insert, offsets, commit).",
        &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0],
    );
    let mut rx = status.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        while rx.changed().await.is_ok() {
            let (b, ms) = {
                let s = rx.borrow_and_update();
                (s.batches, s.last_batch_ms)
            };
            if b > seen {
                seen = b;
                hist.observe(ms as f64 / 1000.0);
            }
        }
    });
    let health: edge_vision::metrics::HealthFn = std::sync::Arc::new(|| Ok(()));
    tokio::spawn(edge_vision::metrics::serve(
        listener, registry, health, stop,
    ));
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = match load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-sink: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-sink: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result: anyhow::Result<()> = rt.block_on(async move {
        match cli.command {
            Command::Config {
                command: ConfigCommand::Check,
            } => {
                println!(
                    "{}",
                    settings::printable(&cfg).map_err(|e| anyhow::anyhow!(e))?
                );
                eprintln!("edge-sink: configuration is valid");
                Ok(())
            }
            Command::Bench {
                brokers,
                topic,
                server,
                events,
                batch_size,
            } => {
                let report = bench(&brokers, &topic, &server, events, batch_size).await?;
                println!("{report}");
                Ok(())
            }
            Command::Migrate { database_url } => {
                let url = database_url.unwrap_or(cfg.database_url);
                let db = edge_vision::database::Database::new(
                    &url,
                    cfg.database_password_file.as_deref(),
                )?;
                let mut client = db.connect().await?;
                // Up to date: no DDL at all, so the unit's ExecStartPre works for a role
                // without CREATE (docs/sink.md).
                if sink::schema_is_current(&client).await? {
                    println!("schema is current");
                    return Ok(());
                }
                let n = match sink::migrate(&mut client).await {
                    Err(sink::SinkError::Migrate(e)) => Err(sink::SinkError::SchemaBehind(e)),
                    r => r,
                }?;
                println!("applied {n} migration(s)");
                Ok(())
            }
            Command::Run {
                brokers,
                topic,
                group,
                database_url,
                batch_size,
                batch_ms,
                metrics_listen,
            } => {
                let mut cfg = cfg;
                cfg.brokers = brokers.unwrap_or(cfg.brokers);
                cfg.topic = topic.unwrap_or(cfg.topic);
                cfg.group_id = group.unwrap_or(cfg.group_id);
                cfg.database_url = database_url.unwrap_or(cfg.database_url);
                cfg.batch_size = batch_size.unwrap_or(cfg.batch_size).max(1);
                cfg.batch_ms = batch_ms.unwrap_or(cfg.batch_ms);
                cfg.metrics_listen = metrics_listen.unwrap_or(cfg.metrics_listen);
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                let (status_tx, status_rx) = tokio::sync::watch::channel(SinkStatus::default());
                if !cfg.metrics_listen.is_empty() {
                    serve_metrics(&cfg.metrics_listen, status_rx.clone(), stop_rx.clone()).await?;
                }
                tokio::spawn(async move {
                    edge_vision::notify::terminated().await;
                    let _ = stop_tx.send(true);
                });
                sink::run(cfg, stop_rx, status_tx).await?;
                println!("{}", serde_json::to_string(&*status_rx.borrow())?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-sink: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A deterministic synthetic event: 0-3 objects.
fn synthetic(i: u64) -> edge_vision::event::Event {
    use edge_vision::event::{Event, FrameSize, ModelRef, Object};
    let objects = (0..(i * 7919) % 4)
        .map(|k| Object {
            label: "person".into(),
            class_id: 0,
            confidence: 0.3 + (k as f32) / 10.0,
            bbox: [10.0 * k as f32, 20.0, 110.0, 300.0 + k as f32],
        })
        .collect();
    let mut e = Event::detection(
        &format!("bench-{}", i % 16),
        ModelRef {
            name: "yolov8n".into(),
            sha256: "0".repeat(64),
        },
        FrameSize {
            width: 1280,
            height: 720,
        },
        objects,
    );
    e.seq = i / 16 + 1;
    e
}

/// Creates a scratch database with the schema.
async fn scratch_db(server: &str, name: &str) -> anyhow::Result<String> {
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

/// `edge-sink bench`.
async fn bench(
    brokers: &str,
    topic: &str,
    server: &str,
    n: u64,
    batch_size: usize,
) -> anyhow::Result<serde_json::Value> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use std::time::{Duration, Instant};
    let events: Vec<_> = (0..n).map(synthetic).collect();
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
                .map_err(|_| anyhow::anyhow!("cancelled"))?
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
            anyhow::bail!("sink did not finish in 30 min: {st:?}");
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
    let (ce, co) = sink::copy_baseline(&mut client, topic, &events, batch_size).await?;
    let copy_secs = t.elapsed().as_secs_f64();
    let copy_rate = (ce + co) as f64 / copy_secs;
    Ok(serde_json::json!({
        "events": n,
        "objects": objects,
        "batch_size": batch_size,
        "sink_catch_up_s": (catch_up.as_secs_f64() * 100.0).round() / 100.0,
        "sink_rows_per_s": sink_rate.round(),
        "copy_rows_per_s": copy_rate.round(),
        "copy_s": (copy_secs * 100.0).round() / 100.0,
        "ratio": (sink_rate / copy_rate * 1000.0).round() / 1000.0,
        "sink_batches": st.batches,
    }))
}
