//! A real Kafka-protocol broker (tansu) per test, on loopback, behind a fault proxy: the broker
//! advertises the proxy's address, so every client connection goes through it.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::TopicPartitionList;

use super::proxy::FaultProxy;

/// The tansu binary: `$TANSU`, else the one `scripts/broker.sh install` puts in the cache.
pub fn tansu() -> PathBuf {
    let p = std::env::var_os("TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::cache_dir().join("tools/bin/tansu"));
    assert!(
        p.exists(),
        "tansu broker missing at {}: run `bash scripts/broker.sh install` (or scripts/test.sh)",
        p.display()
    );
    p
}

/// Where the broker's log (tansu writes it to stdout) goes: `$EDGE_VISION_BROKER_LOG` (appended; set `RUST_LOG` too, e.g.
/// `info`, to see tansu's group coordinator), else nowhere.
fn broker_log() -> Stdio {
    std::env::var_os("EDGE_VISION_BROKER_LOG")
        .and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        })
        .map(Stdio::from)
        .unwrap_or_else(Stdio::null)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Broker {
    child: Child,
    /// The broker's own port.
    pub port: u16,
    /// What clients use (the proxy).
    pub bootstrap: String,
    pub proxy: FaultProxy,
}

impl Broker {
    /// Starts tansu and its proxy; must run inside a tokio runtime (the proxy's tasks).
    pub async fn start() -> Self {
        Self::start_with(&[], &[]).await
    }

    /// [`Broker::start`] with more `tansu broker` arguments (`--cert`, `--key`,
    /// `--authentication`) and environment (`TANSU_SCRAM_USERS`: scripts/tansu/README.md).
    pub async fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let upstream: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), upstream).await;
            if let Some(b) = Self::spawn(port, proxy, args, env).await {
                return b;
            }
        }
        panic!("tansu would not start on any port");
    }

    async fn spawn(
        port: u16,
        proxy: FaultProxy,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Option<Self> {
        let upstream: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let proxy_port = proxy.addr.port();
        let mut child = Command::new(tansu())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{proxy_port}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .args(args)
            .envs(env.iter().copied())
            .stdout(broker_log())
            .stderr(broker_log())
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(upstream).is_err() {
            if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
                return None; // port taken meanwhile, or a slow start: try another port
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(Self {
            child,
            port,
            bootstrap: proxy.addr.to_string(),
            proxy,
        })
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let ok = Command::new(tansu())
            .args([
                "topic",
                "create",
                name,
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--partitions",
                &partitions.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("tansu topic create")
            .success();
        assert!(ok, "could not create topic {name}");
    }

    /// Deletes `name` (its records and watermarks go; a topic created again under the name
    /// starts at offset 0).
    pub fn delete_topic(&self, name: &str) {
        let ok = Command::new(tansu())
            .args([
                "topic",
                "delete",
                name,
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("tansu topic delete")
            .success();
        assert!(ok, "could not delete topic {name}");
    }

    /// Reads every message of `topic` from the beginning until `expect` distinct event ids
    /// were seen (or `timeout`); returns how often each event id arrived.
    pub fn consume_event_ids(
        &self,
        topic: &str,
        partitions: i32,
        expect: usize,
        timeout: Duration,
    ) -> HashMap<String, u32> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", format!("test-{}", uuid::Uuid::now_v7()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let mut seen: HashMap<String, u32> = HashMap::new();
        let deadline = Instant::now() + timeout;
        while seen.len() < expect && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let payload = m.payload().expect("payload");
                let ev =
                    edge_vision::event::decode(payload).expect("every message is a valid event");
                *seen.entry(ev.event_id.to_string()).or_default() += 1;
            }
        }
        // Drain a little longer to count late duplicates.
        let tail = Instant::now() + Duration::from_millis(500);
        while Instant::now() < tail {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                if let Ok(ev) = edge_vision::event::decode(m.payload().unwrap_or_default()) {
                    *seen.entry(ev.event_id.to_string()).or_default() += 1;
                }
            }
        }
        seen
    }
}

/// Every event on `topic` (all partitions from the start), decoded, until `expect` arrived or
/// 60 s passed, and half a second more to catch duplicates. Any client's bootstrap (a
/// MockCluster's too).
pub fn consume_events(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    expect: usize,
) -> Vec<edge_vision::event::Event> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("read-{}", uuid::Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < expect && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(
                edge_vision::event::decode(m.payload().unwrap())
                    .expect("every message is a valid event"),
            );
        }
    }
    // A little longer, to catch duplicates.
    let tail = Instant::now() + Duration::from_millis(500);
    while Instant::now() < tail {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(
                edge_vision::event::decode(m.payload().unwrap())
                    .expect("every message is a valid event"),
            );
        }
    }
    out
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
