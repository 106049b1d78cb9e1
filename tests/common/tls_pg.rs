//! A second, throw-away PostgreSQL server that speaks TLS only: its own cluster (initdb) in a
//! temporary directory on a free loopback port, a test CA, a server certificate for
//! `localhost` signed by it, and a `pg_hba.conf` that rejects unencrypted connections and
//! wants a SCRAM password from the `edge_sink` role (created by `least_privilege()`). Certificates come from the `openssl`
//! command line tool; the server from the machine's PostgreSQL packages
//! (`/usr/lib/postgresql/<version>/bin`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use super::certs::{self_signed_ca, signed_cert};

/// The password of the `edge_sink` role (the tests hand it over in a file).
pub const SINK_PASSWORD: &str = "s3cret from a file";

pub struct TlsPostgres {
    /// Cluster, certificates, socket and log live here; removed on drop.
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The CA that signed the server's certificate.
    pub ca: PathBuf,
    /// A CA that signed nothing this server presents.
    pub other_ca: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server packages under /usr/lib/postgresql (scripts/postgres.sh)")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().expect("an initdb binary").1
}

impl TlsPostgres {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("edge-vision-tlspg-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        // initdb refuses to run as root: run the server as `postgres` then.
        let as_postgres = unsafe { geteuid() } == 0;
        self_signed_ca(d, "ca");
        self_signed_ca(d, "other-ca");
        signed_cert(d, "server", "ca", "DNS:localhost");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Self {
            port,
            ca: d.join("ca.pem"),
            other_ca: d.join("other-ca.pem"),
            bin: pg_bin(),
            as_postgres,
            dir,
        };
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown the cluster directory to postgres");
            // The certificates must stay readable for the test (root reads anything).
        }
        std::fs::set_permissions(
            d.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{dir}/server.pem'\nssl_key_file = '{dir}/server.key'\n\
             fsync = off\n",
            dir = d.display()
        );
        append(&Path::new(&pg.data()).join("postgresql.conf"), &conf);
        std::fs::write(
            Path::new(&pg.data()).join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all edge_sink 127.0.0.1/32 scram-sha-256\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 0.0.0.0/0 reject\n",
        )
        .unwrap();
        let log = format!("{}/server.log", d.display());
        pg.run("pg_ctl", &["-D", &pg.data(), "-l", &log, "-w", "start"]);
        // The sink's database, owned by `postgres`; `least_privilege()` adds the schema and
        // the sink's role.
        let sql = "CREATE DATABASE edge;".to_string();
        pg.run(
            "psql",
            &[
                "-h",
                &d.display().to_string(),
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-c",
                &sql,
            ],
        );
        pg
    }

    fn data(&self) -> String {
        format!("{}/data", self.dir.path().display())
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let exe = if exe.exists() {
            exe
        } else {
            PathBuf::from(tool)
        };
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        }
        .expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A libpq connection string to this server: `extra` adds keys (sslmode, sslrootcert, ...).
    /// `host` is the name the certificate is checked against; the address is always 127.0.0.1.
    pub fn url(&self, host: &str, user: &str, dbname: &str, extra: &str) -> String {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} user={user} dbname={dbname} {extra}",
            self.port
        )
    }

    /// Migrates database `edge` as its owner, then creates the sink's role with exactly the
    /// grants docs/sink.md documents (the SQL block is read from the document, so the
    /// document is what gets tested).
    pub async fn least_privilege(&self) {
        let owner = edge_vision::sink::database::Database::new(
            &self.url("localhost", "postgres", "edge", "sslmode=require"),
            None,
        )
        .unwrap();
        let mut c = owner.connect().await.expect("owner connection");
        edge_vision::sink::migrate(&mut c)
            .await
            .expect("migrations");
        let doc =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/sink.md"))
                .unwrap();
        let section = doc
            .split("## Least-privilege role")
            .nth(1)
            .expect("docs/sink.md has a least-privilege section");
        let sql = section
            .split("```sql")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("an sql block");
        assert!(sql.contains("PASSWORD '...'"), "{sql}");
        c.batch_execute(&sql.replace("PASSWORD '...'", &format!("PASSWORD '{SINK_PASSWORD}'")))
            .await
            .expect("the documented grants apply");
    }

    /// A file holding the `edge_sink` role's password (with a trailing newline, as editors
    /// write it).
    pub fn password_file(&self) -> PathBuf {
        let p = self.dir.path().join("db-password");
        std::fs::write(&p, format!("{SINK_PASSWORD}\n")).unwrap();
        p
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        };
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

extern "C" {
    fn geteuid() -> u32;
}
