//! Prometheus metrics in the text exposition format, served with `/healthz` on a local address.
//!
//! Deliberately small: counters, gauges, histograms and labelled counters are atomics that the
//! pipeline updates without locks on its hot path; gauges that are cheaper to read than to keep
//! (outbox depth, uplink state) are closures evaluated at scrape time. The HTTP side answers
//! `GET /metrics` and `GET /healthz` (200 `ok`, or 503 and the reason) and nothing else.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (stored as f64 bits).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    /// One per bound plus +Inf (not cumulative; summed when rendered).
    counts: Vec<AtomicU64>,
    /// Sum of observations, f64 bits, updated with a CAS loop.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self
                .sum
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Counters keyed by one label's value (e.g. detections by label).
#[derive(Debug, Default)]
pub struct LabelledCounter(Mutex<BTreeMap<String, u64>>);

impl LabelledCounter {
    pub fn add(&self, label: &str, n: u64) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(label.to_string()).or_default() += n;
        }
    }
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Samples computed at scrape time: `(labels, value)`, labels already formatted (`a="b"`).
pub type SampleFn = Box<dyn Fn() -> Vec<(String, f64)> + Send + Sync>;

enum Kind {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
    Labelled(String, Arc<LabelledCounter>),
    GaugeFn(SampleFn),
}

struct Entry {
    name: String,
    help: String,
    kind: Kind,
}

/// Everything one process exposes.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<Vec<Entry>>,
}

impl Registry {
    fn push(&self, name: &str, help: &str, kind: Kind) {
        if let Ok(mut e) = self.entries.lock() {
            e.push(Entry {
                name: name.into(),
                help: help.into(),
                kind,
            });
        }
    }

    pub fn counter(&self, name: &str, help: &str) -> Arc<Counter> {
        let c = Arc::new(Counter::default());
        self.push(name, help, Kind::Counter(c.clone()));
        c
    }

    pub fn gauge(&self, name: &str, help: &str) -> Arc<Gauge> {
        let g = Arc::new(Gauge::default());
        self.push(name, help, Kind::Gauge(g.clone()));
        g
    }

    pub fn histogram(&self, name: &str, help: &str, bounds: &[f64]) -> Arc<Histogram> {
        let h = Arc::new(Histogram::new(bounds));
        self.push(name, help, Kind::Histogram(h.clone()));
        h
    }

    pub fn labelled_counter(&self, name: &str, help: &str, label: &str) -> Arc<LabelledCounter> {
        let c = Arc::new(LabelledCounter::default());
        self.push(name, help, Kind::Labelled(label.into(), c.clone()));
        c
    }

    pub fn gauge_fn(&self, name: &str, help: &str, f: SampleFn) {
        self.push(name, help, Kind::GaugeFn(f));
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = self.entries.lock() else {
            return out;
        };
        for e in entries.iter() {
            let ty = match e.kind {
                Kind::Counter(_) | Kind::Labelled(..) => "counter",
                Kind::Gauge(_) | Kind::GaugeFn(_) => "gauge",
                Kind::Histogram(_) => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", e.name, e.help);
            let _ = writeln!(out, "# TYPE {} {ty}", e.name);
            match &e.kind {
                Kind::Counter(c) => {
                    let _ = writeln!(out, "{} {}", e.name, c.get());
                }
                Kind::Gauge(g) => {
                    let _ = writeln!(out, "{} {}", e.name, fmt_f64(g.get()));
                }
                Kind::Labelled(label, c) => {
                    for (v, n) in c.snapshot() {
                        let _ = writeln!(out, "{}{{{label}=\"{}\"}} {n}", e.name, escape(&v));
                    }
                }
                Kind::GaugeFn(f) => {
                    for (labels, v) in f() {
                        if labels.is_empty() {
                            let _ = writeln!(out, "{} {}", e.name, fmt_f64(v));
                        } else {
                            let _ = writeln!(out, "{}{{{labels}}} {}", e.name, fmt_f64(v));
                        }
                    }
                }
                Kind::Histogram(h) => {
                    let mut acc = 0;
                    for (i, b) in h.bounds.iter().enumerate() {
                        acc += h.counts[i].load(Ordering::Relaxed);
                        let _ = writeln!(out, "{}_bucket{{le=\"{}\"}} {acc}", e.name, fmt_f64(*b));
                    }
                    acc += h.counts[h.bounds.len()].load(Ordering::Relaxed);
                    let _ = writeln!(out, "{}_bucket{{le=\"+Inf\"}} {acc}", e.name);
                    let _ = writeln!(
                        out,
                        "{}_sum {}",
                        e.name,
                        fmt_f64(f64::from_bits(h.sum.load(Ordering::Relaxed)))
                    );
                    let _ = writeln!(out, "{}_count {acc}", e.name);
                }
            }
        }
        out
    }
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Escapes a label value.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `Ok(text)` when healthy (served as 200 with the text, e.g. `ok`, or what a healthy
/// service is waiting for), else the reason (served as 503).
pub type HealthFn = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Serves `/metrics` and `/healthz` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: HealthFn,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let Ok((mut sock, _)) = accepted else {
            continue;
        };
        let registry = registry.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded), with a deadline against idle clients.
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = match (method, path) {
                ("GET", "/metrics") => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    registry.render(),
                ),
                ("GET", "/healthz") => match health() {
                    Ok(text) => ("200 OK", "text/plain", format!("{text}\n")),
                    Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
                },
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
                _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// The metrics address could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("metrics address {addr:?}: {source}")]
    Parse {
        addr: String,
        source: std::net::AddrParseError,
    },
    #[error("metrics address {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Binds the metrics address (`host:port`); errors name the address.
pub async fn bind(addr: &str) -> Result<TcpListener, BindError> {
    let parsed: SocketAddr = addr.parse().map_err(|source| BindError::Parse {
        addr: addr.into(),
        source,
    })?;
    TcpListener::bind(parsed)
        .await
        .map_err(|source| BindError::Bind {
            addr: addr.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let r = Registry::default();
        let c = r.counter("frames_total", "Frames.");
        c.add(3);
        let h = r.histogram("lat_seconds", "Latency.", &[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let l = r.labelled_counter("dets_total", "Detections.", "label");
        l.add("per\"son", 2);
        r.gauge_fn(
            "state",
            "State.",
            Box::new(|| vec![("state=\"online\"".into(), 1.0)]),
        );
        let text = r.render();
        assert!(
            text.contains("# TYPE frames_total counter\nframes_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("lat_seconds_bucket{le=\"1\"} 2\n"), "{text}");
        assert!(
            text.contains("lat_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("lat_seconds_sum 5.55\n"), "{text}");
        assert!(
            text.contains("dets_total{label=\"per\\\"son\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("state{state=\"online\"} 1\n"), "{text}");
    }
}
