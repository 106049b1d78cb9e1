//! Layered configuration for both binaries, with errors that name the key and where it came from.
//!
//! Layers, later ones win (the `config` crate merges them):
//!
//! 1. embedded defaults — the `Default` impls of the structs below, which the commented example
//!    files `systemd/edge-agent.toml` and `systemd/edge-sink.toml` restate (a test keeps
//!    them equal);
//! 2. a TOML file — `--config FILE`, or the system path (`/etc/edge-agent/agent.toml`,
//!    `/etc/edge-sink/sink.toml`) when it exists;
//! 3. environment variables — `EDGE_AGENT__SECTION__KEY` / `EDGE_SINK__SECTION__KEY`
//!    (double underscores separate the levels: `EDGE_AGENT__UPLINK__BROKERS=host:9092`).
//!
//! Every struct is `deny_unknown_fields`. The file is first checked on its own, so a typo, an
//! unknown key or a wrong type is reported as `file F, line L: key `a.b`: ...`; what is left
//! after merging can only come from the environment and is reported with the variable's name.
//! [`mask_secrets`] hides secrets when the effective configuration is printed.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {file}: cannot read it: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {file}, line {line}: key `{key}`: {message}")]
    File {
        file: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error("environment variable {var} (key `{key}`): {message}")]
    Env {
        var: String,
        key: String,
        message: String,
    },
    #[error("config key `{key}` (from {origin}): {message}")]
    Invalid {
        key: String,
        origin: String,
        message: String,
    },
    #[error("configuration: {0}")]
    Merge(String),
}

/// Which program's configuration: its environment prefix and system file.
#[derive(Debug, Clone, Copy)]
pub struct Layers {
    /// `EDGE_AGENT` or `EDGE_SINK`.
    pub env_prefix: &'static str,
    /// Read when no `--config` is given and the file exists.
    pub system_file: &'static str,
}

/// The agent's layers.
pub const AGENT: Layers = Layers {
    env_prefix: "EDGE_AGENT",
    system_file: "/etc/edge-agent/agent.toml",
};

/// The sink's layers.
pub const SINK: Layers = Layers {
    env_prefix: "EDGE_SINK",
    system_file: "/etc/edge-sink/sink.toml",
};

/// A loaded configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    pub config: T,
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
    /// Environment variables that took part (names only).
    pub env_vars: Vec<String>,
}

impl<T> Loaded<T> {
    /// Where the values came from, for errors: the file, the variables, or the defaults.
    pub fn origin(&self) -> String {
        match &self.file {
            Some(f) if self.env_vars.is_empty() => format!("file {}", f.display()),
            Some(f) => format!(
                "file {} or environment {}",
                f.display(),
                self.env_vars.join(", ")
            ),
            None if self.env_vars.is_empty() => "embedded defaults".into(),
            None => format!("environment {}", self.env_vars.join(", ")),
        }
    }
}

/// Loads `T` from defaults, the file and the environment (`env` is passed in so tests do not
/// have to touch the process environment).
pub fn load<T>(
    layers: Layers,
    explicit_file: Option<&Path>,
    env: &[(String, String)],
) -> Result<Loaded<T>, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let file = match explicit_file {
        Some(p) => Some(p.to_path_buf()),
        None => {
            let p = PathBuf::from(layers.system_file);
            p.exists().then_some(p)
        }
    };
    let defaults = config::Config::try_from(&T::default())
        .map_err(|e| ConfigError::Merge(format!("embedded defaults: {e}")))?;
    let mut builder = config::Config::builder().add_source(defaults);
    if let Some(path) = &file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.clone(),
            source,
        })?;
        check_file::<T>(path, &text)?;
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }
    let prefix = format!("{}__", layers.env_prefix);
    let mut env_map = config::Map::new();
    let mut env_vars = Vec::new();
    for (k, v) in env {
        if let Some(rest) = k.strip_prefix(&prefix) {
            env_vars.push(k.clone());
            env_map.insert(rest.to_ascii_lowercase().replace("__", "."), v.clone());
        }
    }
    env_vars.sort();
    let environment = config::Environment::with_prefix(layers.env_prefix)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("detector.classes")
        .source(Some(
            env.iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .cloned()
                .collect(),
        ));
    let merged = builder
        .add_source(environment)
        .build()
        .map_err(|e| ConfigError::Merge(e.to_string()))?;
    let config: T = serde_path_to_error::deserialize(merged).map_err(|e| {
        let key = e.path().to_string();
        let var = format!(
            "{}__{}",
            layers.env_prefix,
            key.to_ascii_uppercase().replace('.', "__")
        );
        let message = e.into_inner().to_string();
        if env_map
            .keys()
            .any(|k| key.starts_with(k.as_str()) || k.starts_with(&key))
        {
            ConfigError::Env { var, key, message }
        } else {
            ConfigError::Merge(format!("key `{key}`: {message}"))
        }
    })?;
    Ok(Loaded {
        config,
        file,
        env_vars,
    })
}

/// Checks one TOML file against `T` alone, so its errors can name the line.
fn check_file<T: DeserializeOwned>(path: &Path, text: &str) -> Result<(), ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::File {
        file: path.to_path_buf(),
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(0),
        key: String::new(),
        message: e.message().to_string(),
    })?;
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(_) => Ok(()),
        Err(e) => {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| line_of(text, s.start))
                .unwrap_or_else(|| guess_line(text, &key));
            Err(ConfigError::File {
                file: path.to_path_buf(),
                line,
                key,
                message: inner.message().to_string(),
            })
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Line of the last path segment's `name =`, for errors that carry no position.
fn guess_line(text: &str, key: &str) -> usize {
    let last = key.rsplit('.').next().unwrap_or(key);
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(last)
                .is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
        .unwrap_or(0)
}

/// The process environment as pairs (for [`load`]).
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars().collect()
}

/// Replaces the values of keys that hold secrets (passwords in connection strings, librdkafka
/// `*password*` / `*secret*` properties) with `***`.
pub fn mask_secrets(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let lk = k.to_ascii_lowercase();
                if let serde_json::Value::String(s) = v {
                    if lk.contains("password") && !lk.ends_with("_file")
                        || lk.contains("secret") && !lk.ends_with("_file")
                    {
                        *s = "***".into();
                    } else if lk.contains("url") || lk.contains("conninfo") {
                        *s = mask_conninfo(s);
                    }
                } else {
                    mask_secrets(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

/// Why the effective configuration could not be printed.
#[derive(Debug, thiserror::Error)]
pub enum PrintError {
    #[error("configuration to JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("configuration to TOML: {0}")]
    Toml(#[from] toml::ser::Error),
}

/// The effective configuration as TOML for `config check`: secrets masked, unset options
/// (JSON `null`, which TOML cannot express) left out, and `f32` settings printed as written
/// (`0.45`, not the `0.44999998807907104` of its widening to `f64`).
pub fn printable<T: Serialize>(config: &T) -> Result<String, PrintError> {
    fn tidy(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|_, x| !x.is_null());
                m.values_mut().for_each(tidy);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(tidy),
            serde_json::Value::Number(n) => {
                if let Some(short) = n.as_f64().and_then(shortest_f32) {
                    *n = short;
                }
            }
            _ => {}
        }
    }
    let mut v = serde_json::to_value(config)?;
    mask_secrets(&mut v);
    tidy(&mut v);
    Ok(toml::to_string_pretty(&v)?)
}

/// A float that is exactly an `f32` (a widened `f32` setting) as the `f64` of its shortest
/// decimal form; `None` for integers and for values only an `f64` holds.
fn shortest_f32(x: f64) -> Option<serde_json::Number> {
    let narrow = x as f32;
    if x.fract() == 0.0 || !x.is_finite() || f64::from(narrow) != x {
        return None;
    }
    let short: f64 = narrow.to_string().parse().ok()?;
    serde_json::Number::from_f64(short)
}

/// Hides `password=...` in a libpq key/value string and `user:pass@` in a URL.
pub fn mask_conninfo(s: &str) -> String {
    if let Some(at) = s.find('@') {
        if let Some(scheme_end) = s.find("://") {
            let creds = &s[scheme_end + 3..at];
            if let Some(colon) = creds.find(':') {
                return format!("{}:***{}", &s[..scheme_end + 3 + colon], &s[at..]);
            }
        }
    }
    s.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// This machine's identity for `device_id` when the configuration leaves it empty.
pub fn machine_id(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let id = text.trim();
    (!id.is_empty()).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        port: u16,
        name: String,
        map: std::collections::BTreeMap<String, String>,
    }

    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Outer {
        id: String,
        inner: Inner,
    }

    const L: Layers = Layers {
        env_prefix: "T_APP",
        system_file: "/nonexistent/t-app.toml",
    };

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("app.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn layers_merge_in_order() {
        let (_d, p) = write("id = \"file\"\n[inner]\nport = 7\nname = \"n\"\n");
        let env = vec![("T_APP__INNER__PORT".to_string(), "9".to_string())];
        let got: Loaded<Outer> = load(L, Some(&p), &env).unwrap();
        assert_eq!(got.config.id, "file");
        assert_eq!(got.config.inner.port, 9, "environment beats the file");
        assert_eq!(got.config.inner.name, "n");
        assert_eq!(got.env_vars, vec!["T_APP__INNER__PORT".to_string()]);
    }

    #[test]
    fn dotted_map_keys_survive_the_merge() {
        let (_d, p) = write("[inner.map]\n\"client.id\" = \"pi-7\"\n");
        let got: Loaded<Outer> = load(L, Some(&p), &[]).unwrap();
        assert_eq!(
            got.config.inner.map.get("client.id").map(String::as_str),
            Some("pi-7"),
            "{:?}",
            got.config.inner.map
        );
    }

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let (_d, p) = write("id = \"x\"\n[inner]\nprot = 7\n");
        let err = load::<Outer>(L, Some(&p), &[]).unwrap_err().to_string();
        assert!(err.contains("app.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_file_and_line() {
        let (_d, p) = write("[inner]\nname = \"a\"\nport = \"seven\"\n");
        let err = load::<Outer>(L, Some(&p), &[]).unwrap_err().to_string();
        assert!(err.contains("inner.port"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("app.toml"), "{err}");
    }

    #[test]
    fn bad_environment_value_names_the_variable() {
        let env = vec![("T_APP__INNER__PORT".to_string(), "lots".to_string())];
        let err = load::<Outer>(L, None, &env).unwrap_err().to_string();
        assert!(err.contains("T_APP__INNER__PORT"), "{err}");
        assert!(err.contains("inner.port"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = load::<Outer>(L, Some(Path::new("/nope/app.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nope/app.toml"), "{err}");
    }

    #[test]
    fn secrets_are_masked() {
        let mut v = serde_json::json!({
            "database_url": "host=db user=sink password=hunter2 dbname=x",
            "url2": "postgres://sink:hunter2@db/x",
            "librdkafka": {"sasl.password": "hunter2", "client.id": "a"},
            "sasl_password_file": "/run/credentials/x",
        });
        mask_secrets(&mut v);
        let s = v.to_string();
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("/run/credentials/x"), "{s}");
        assert!(s.contains("client.id"), "{s}");
    }
}
