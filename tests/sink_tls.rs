//! TLS to PostgreSQL, against a real server that refuses unencrypted connections
//! (tests/common/tls_pg.rs): libpq's `sslmode` semantics, certificate and host-name checks,
//! the password read from a file, and the sink writing through a verified connection.

mod common;

use std::time::Duration;

use common::broker::Broker;
use common::rig::{event, producer, send_all};
use common::tls_pg::TlsPostgres;
use edge_vision::sink::database::{self, Database};

/// An error with its causes, as `anyhow`'s `{:#}` prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text
}

async fn ssl_in_use(url: &str) -> Result<bool, String> {
    let db = Database::new(url, None).map_err(|e| e.to_string())?;
    let c = db.connect().await.map_err(|e| chain(&e))?;
    let row = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_check_what_libpq_checks() {
    let pg = TlsPostgres::start();
    let ca = pg.ca.display().to_string();
    let other = pg.other_ca.display().to_string();
    let url = |host: &str, extra: &str| pg.url(host, "postgres", "postgres", extra);

    // verify-full: chain and name (the certificate is for `localhost`).
    let ok = url(
        "localhost",
        &format!("sslmode=verify-full sslrootcert={ca}"),
    );
    assert_eq!(ssl_in_use(&ok).await, Ok(true));
    // The same server under a name the certificate does not carry: refused.
    let wrong_name = url(
        "127.0.0.1",
        &format!("sslmode=verify-full sslrootcert={ca}"),
    );
    let db = Database::new(&wrong_name, None).unwrap();
    let e = db.connect().await.expect_err("host name must be checked");
    assert!(database::is_tls_refusal(&e), "{}", chain(&e));
    assert!(
        chain(&e).contains("certificate verify failed"),
        "{}",
        chain(&e)
    );
    // verify-ca checks the chain only.
    assert_eq!(
        ssl_in_use(&url(
            "127.0.0.1",
            &format!("sslmode=verify-ca sslrootcert={ca}")
        ))
        .await,
        Ok(true)
    );
    // A CA that did not sign the server's certificate: refused, by verify-ca and by require
    // with a root certificate (libpq treats that as verify-ca).
    for mode in ["verify-ca", "require"] {
        let u = url("localhost", &format!("sslmode={mode} sslrootcert={other}"));
        let e = Database::new(&u, None)
            .unwrap()
            .connect()
            .await
            .expect_err("a foreign CA must not be trusted");
        assert!(database::is_tls_refusal(&e), "{mode}: {}", chain(&e));
    }
    // require without a root certificate and prefer (the default): encrypted, unchecked.
    assert_eq!(
        ssl_in_use(&url("127.0.0.1", "sslmode=require")).await,
        Ok(true)
    );
    assert_eq!(ssl_in_use(&url("127.0.0.1", "")).await, Ok(true));
    // The URL form takes the same keys.
    let uri = format!(
        "postgresql://postgres@localhost:{}/postgres?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca.replace('/', "%2F")
    );
    assert_eq!(ssl_in_use(&uri).await, Ok(true));
    // disable: this server refuses unencrypted connections, and says so (not a TLS refusal).
    let e = Database::new(&url("127.0.0.1", "sslmode=disable"), None)
        .unwrap()
        .connect()
        .await
        .expect_err("plain connections are rejected by pg_hba.conf");
    assert!(!database::is_tls_refusal(&e), "{}", chain(&e));
    assert!(chain(&e).contains("no encryption"), "{}", chain(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_comes_from_a_file() {
    let pg = TlsPostgres::start();
    pg.least_privilege().await;
    let url = pg.url("localhost", "edge_sink", "edge", "sslmode=require");
    // Without the password the server asks for one and the connection fails.
    let e = Database::new(&url, None)
        .unwrap()
        .connect()
        .await
        .expect_err("SCRAM wants a password");
    assert!(chain(&e).contains("password"), "{}", chain(&e));
    let pw = pg.password_file();
    let c = Database::new(&url, Some(&pw))
        .unwrap()
        .connect()
        .await
        .expect("password from the file, trailing newline ignored");
    let user: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "edge_sink");
}

/// The whole sink over a verified TLS connection as the least-privilege role docs/sink.md
/// documents (no CREATE: the owner migrated; the sink only checks the schema is current),
/// password from a file named in the config file; a wrong CA stops it with an error that says
/// so; `edge-sink migrate` as that role is refused with a pointer to the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_writes_over_verified_tls_and_stops_on_a_foreign_ca() {
    let pg = TlsPostgres::start();
    pg.least_privilege().await;
    let b = Broker::start().await;
    b.create_topic("tls", 2);
    let p = producer(&b);
    let n = 3_000u64;
    let msgs: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let e = event(i, (i % 3) as usize);
            (e.device_id.clone(), serde_json::to_vec(&e).unwrap())
        })
        .collect();
    let objects: i64 = (0..n).map(|i| (i % 3) as i64).sum();
    send_all(&p, "tls", &msgs).await;

    let bin = env!("CARGO_BIN_EXE_edge-sink");
    let config = |ca: &std::path::Path| {
        let path = pg.dir.path().join(format!(
            "sink-{}.toml",
            ca.file_stem().unwrap().to_string_lossy()
        ));
        let url = pg.url(
            "localhost",
            "edge_sink",
            "edge",
            &format!("sslmode=verify-full sslrootcert={}", ca.display()),
        );
        std::fs::write(
            &path,
            format!(
                "brokers = \"{}\"\ntopic = \"tls\"\ngroup_id = \"g\"\ndatabase_url = \"{url}\"\n\
                 database_password_file = \"{}\"\nmetrics_listen = \"\"\nbatch_ms = 100\n",
                b.bootstrap,
                pg.password_file().display()
            ),
        )
        .unwrap();
        path
    };

    // Foreign CA: exits non-zero at once, naming the TLS refusal; nothing written.
    let errlog = pg.dir.path().join("foreign-ca.log");
    let mut child = std::process::Command::new(bin)
        .arg("--config")
        .arg(config(&pg.other_ca))
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&errlog).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("a refused certificate must stop the sink, not retry forever");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let err = std::fs::read_to_string(&errlog).unwrap();
    assert!(!status.success());
    assert!(err.contains("database TLS refused"), "{err}");
    assert!(err.contains("certificate verify failed"), "{err}");

    // The right CA: migrations and every event over TLS.
    let cfg = config(&pg.ca);
    let migrate = std::process::Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&migrate.stdout).trim(),
        "schema is current"
    );
    // A database this role may not create tables in: a clear refusal naming the remedy.
    let refused = std::process::Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .args([
            "migrate",
            "--database-url",
            &pg.url(
                "localhost",
                "edge_sink",
                "postgres",
                &format!("sslmode=verify-full sslrootcert={}", pg.ca.display()),
            ),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("run `edge-sink migrate` as the database owner"),
        "{err}"
    );
    let mut child = std::process::Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let check = Database::new(
        &pg.url(
            "localhost",
            "edge_sink",
            "edge",
            &format!("sslmode=verify-full sslrootcert={}", pg.ca.display()),
        ),
        Some(&pg.password_file()),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let (mut events, mut objs, mut tls_sessions) = (0i64, 0i64, 0i64);
    while std::time::Instant::now() < deadline {
        let c = check.connect().await.unwrap();
        events = c
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .unwrap()
            .get(0);
        objs = c
            .query_one("SELECT count(*) FROM objects", &[])
            .await
            .unwrap()
            .get(0);
        // Every client session of the sink's role is encrypted (pg_hba allows nothing else;
        // this shows the sink's own connections are among them).
        tls_sessions = c
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.usename = 'edge_sink' AND s.ssl AND a.pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if events >= n as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    unsafe { kill(child.id() as i32, 15) };
    let _ = child.wait();
    assert_eq!(events, n as i64);
    assert_eq!(objs, objects);
    assert!(tls_sessions >= 1, "the sink's session is encrypted");
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
