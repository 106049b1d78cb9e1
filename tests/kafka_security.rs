//! TLS and SASL/SCRAM to a real Kafka-protocol broker (tansu with scripts/tansu's patches:
//! `--cert` with `--key` served over TLS, SCRAM users from `TANSU_SCRAM_USERS`), for both
//! Kafka clients: the agent's uplink and the sink. A test CA signs the broker's certificate;
//! the clients verify it (librdkafka's default, host name included). A certificate from another
//! CA and a wrong password are refused with an error that says so, and nothing is lost: the
//! events stay in the outbox and flow once the password is fixed.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::certs::{self_signed_ca, signed_cert};
use common::rig::{count, database, spawn_sink, until, wait_for};
use edge_vision::agent::outbox::{Durability, Outbox, OutboxConfig};
use edge_vision::agent::uplink::{self, UplinkConfig, UplinkStatus};
use edge_vision::event::Event;
use edge_vision::kafka::Security;
use edge_vision::sink::SinkConfig;
use edge_vision::testkit::Synthetic;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tokio::sync::watch;

const USER: &str = "edge";
const PASSWORD: &str = "correct horse battery staple";

/// A broker that speaks TLS only (and SASL/SCRAM with `sasl`), with its test CAs.
struct Secure {
    broker: Broker,
    dir: tempfile::TempDir,
    sasl: bool,
}

impl Secure {
    async fn start(sasl: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        self_signed_ca(d, "ca");
        self_signed_ca(d, "other-ca");
        signed_cert(d, "broker", "ca", "DNS:localhost,IP:127.0.0.1");
        std::fs::write(d.join("users"), format!("{USER}:{PASSWORD}\n")).unwrap();
        let (cert, key, users) = (d.join("broker.pem"), d.join("broker.key"), d.join("users"));
        let mut args = vec![
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ];
        if sasl {
            args.push("--authentication");
        }
        let broker =
            Broker::start_with(&args, &[("TANSU_SCRAM_USERS", users.to_str().unwrap())]).await;
        Self { broker, dir, sasl }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Client settings trusting `ca`, logging in with the password in `password_file`.
    fn security(&self, ca: &str, password_file: &Path) -> Security {
        Security {
            protocol: Some(if self.sasl { "sasl_ssl" } else { "ssl" }.into()),
            sasl_mechanism: self.sasl.then(|| "SCRAM-SHA-512".into()),
            sasl_username: self.sasl.then(|| USER.into()),
            sasl_password_file: self.sasl.then(|| password_file.to_path_buf()),
            ssl_ca_location: Some(self.path(&format!("{ca}.pem"))),
            ..Security::default()
        }
    }

    /// Creates `topic` through the secured listener (the tansu CLI speaks plaintext only).
    async fn create_topic(&self, topic: &str, security: &Security) {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &self.broker.bootstrap);
        security.apply(&mut cc).unwrap();
        let admin: AdminClient<DefaultClientContext> = cc.create().unwrap();
        let made = admin
            .create_topics(
                &[NewTopic::new(topic, 2, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
            )
            .await
            .expect("create topic");
        assert!(made.iter().all(|r| r.is_ok()), "{made:?}");
    }
}

fn outbox(dir: &Path, n: u64) -> Arc<Mutex<Outbox>> {
    let mut cfg = OutboxConfig::new(dir.join("outbox.sqlite"), "dev-1");
    cfg.durability = Durability::Normal;
    let ob = Arc::new(Mutex::new(Outbox::open(cfg).unwrap().0));
    let mut events: Vec<Event> = (0..n)
        .map(|i| Synthetic::new("dev-1").event(i, usize::from(i % 2 == 0)))
        .collect();
    ob.lock().unwrap().enqueue(&mut events).unwrap();
    ob
}

fn depth(ob: &Arc<Mutex<Outbox>>) -> u64 {
    ob.lock().unwrap().stats().unwrap().depth
}

struct Uplink {
    stop: watch::Sender<bool>,
    status: watch::Receiver<UplinkStatus>,
    task: tokio::task::JoinHandle<Result<(), uplink::UplinkError>>,
}

fn spawn_uplink(ob: &Arc<Mutex<Outbox>>, s: &Secure, topic: &str, sec: Security) -> Uplink {
    let mut cfg = UplinkConfig::new(&s.broker.bootstrap, topic);
    cfg.security = sec;
    cfg.message_timeout_ms = 5_000;
    cfg.max_backoff_ms = 1_000;
    let (stop, stop_rx) = watch::channel(false);
    let (status_tx, status) = watch::channel(UplinkStatus::default());
    let task = tokio::spawn(uplink::run(ob.clone(), cfg, stop_rx, status_tx, false));
    Uplink { stop, status, task }
}

impl Uplink {
    /// Waits until the outbox is empty.
    async fn drained(&self, ob: &Arc<Mutex<Outbox>>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while depth(ob) > 0 {
            assert!(Instant::now() < deadline, "{:?}", *self.status.borrow());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the uplink reports an error containing `what`.
    async fn refused(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(e) = self.status.borrow().last_error.clone() {
                if e.contains(what) {
                    return e;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no error containing {what:?}: {:?}",
                *self.status.borrow()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) -> UplinkStatus {
        let _ = self.stop.send(true);
        self.task.await.unwrap().unwrap();
        let st = self.status.borrow().clone();
        st
    }
}

fn sink_config(s: &Secure, topic: &str, db: &str, sec: Security) -> SinkConfig {
    let mut cfg = SinkConfig::new(&s.broker.bootstrap, topic, "g", db);
    cfg.security = sec;
    cfg.batch_ms = 50;
    cfg.metrics_listen = String::new();
    cfg
}

/// Both clients over TLS with the broker's certificate verified against the test CA; a
/// plaintext client gets nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_sink_over_tls_verified_against_a_test_ca() {
    let s = Secure::start(false).await;
    let none = s.path("no-password");
    let tls = s.security("ca", &none);
    s.create_topic("tls", &tls).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = outbox(dir.path(), 500);

    let plain = spawn_uplink(&ob, &s, "tls", Security::default());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = plain.stop().await;
    assert_eq!(st.delivered, 0, "plaintext must not reach a TLS listener");
    assert_eq!(depth(&ob), 500);

    let up = spawn_uplink(&ob, &s, "tls", tls.clone());
    up.drained(&ob).await;
    let st = up.stop().await;
    assert_eq!(st.delivered, 500, "{st:?}");

    let db = database().await;
    let (stop, status, task) = spawn_sink(sink_config(&s, "tls", &db, tls));
    assert_eq!(
        wait_for(
            &db,
            "SELECT count(*) FROM events",
            500,
            Duration::from_secs(60)
        )
        .await,
        500,
        "{:?}",
        *status.borrow()
    );
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
    assert_eq!(
        count(&db, "SELECT count(DISTINCT event_id) FROM events").await,
        500
    );
}

/// A broker certificate that the configured CA did not sign: both clients refuse it and say
/// why; the events stay in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_with_a_clear_error() {
    let s = Secure::start(false).await;
    let none = s.path("no-password");
    s.create_topic("wrongca", &s.security("ca", &none)).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = outbox(dir.path(), 100);
    let wrong = s.security("other-ca", &none);

    let up = spawn_uplink(&ob, &s, "wrongca", wrong.clone());
    let why = up.refused("certificate verify failed").await;
    let st = up.stop().await;
    assert_eq!(st.delivered, 0, "{why}");
    assert_eq!(depth(&ob), 100, "nothing lost");

    let db = database().await;
    let (stop, status, task) = spawn_sink(sink_config(&s, "wrongca", &db, wrong));
    until(
        &status,
        "the sink names the refused certificate",
        30,
        |st| {
            st.last_broker_error
                .as_deref()
                .is_some_and(|e| e.contains("certificate verify failed"))
        },
    )
    .await;
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
}

/// SASL/SCRAM-SHA-512 over TLS with the password read from a file: a wrong password is refused
/// with an error that says so and loses nothing; with the file fixed, every event flows once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_with_the_password_from_a_file() {
    let s = Secure::start(true).await;
    let password = s.path("password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    let good = s.security("ca", &password);
    s.create_topic("scram", &good).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = outbox(dir.path(), 300);

    let wrong_file = s.path("wrong-password");
    std::fs::write(&wrong_file, "not the password\n").unwrap();
    let up = spawn_uplink(&ob, &s, "scram", s.security("ca", &wrong_file));
    let why = up.refused("uthentication").await;
    let st = up.stop().await;
    assert_eq!(st.delivered, 0, "{why}");
    assert_eq!(depth(&ob), 300, "nothing lost: {why}");

    // The operator fixes the file; the same outbox drains.
    std::fs::write(&wrong_file, format!("{PASSWORD}\n")).unwrap();
    let up = spawn_uplink(&ob, &s, "scram", s.security("ca", &wrong_file));
    up.drained(&ob).await;
    let st = up.stop().await;
    assert_eq!(st.delivered, 300, "{st:?}");

    let db = database().await;
    std::fs::write(s.path("password-typo"), "typo\n").unwrap();
    let typo = s.security("ca", &s.path("password-typo"));
    let (stop, status, task) = spawn_sink(sink_config(&s, "scram", &db, typo));
    until(&status, "the sink names the failed login", 30, |st| {
        st.last_broker_error
            .as_deref()
            .is_some_and(|e| e.contains("uthentication"))
    })
    .await;
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 0);

    let (stop, status, task) = spawn_sink(sink_config(&s, "scram", &db, good));
    assert_eq!(
        wait_for(
            &db,
            "SELECT count(*) FROM events",
            300,
            Duration::from_secs(60)
        )
        .await,
        300,
        "{:?}",
        *status.borrow()
    );
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
    assert_eq!(
        count(&db, "SELECT count(DISTINCT event_id) FROM events").await,
        300
    );
}
