//! The systemd units in `systemd/`: `systemd-analyze verify` accepts them and
//! `systemd-analyze security --offline=yes` rates each at an exposure of 2.0 or less; each
//! service's sysusers.d/tmpfiles.d files create its own user and directories and nothing of the
//! other's; each unit's `Documentation=` names a file its install puts there.

use std::path::{Path, PathBuf};
use std::process::Command;

fn units() -> [(&'static str, &'static str, &'static str); 2] {
    [
        (
            "edge-agent.service",
            "/usr/bin/edge-agent",
            env!("CARGO_BIN_EXE_edge-agent"),
        ),
        (
            "edge-sink.service",
            "/usr/bin/edge-sink",
            env!("CARGO_BIN_EXE_edge-sink"),
        ),
    ]
}

/// The unit with its binary path pointed at the freshly built one (verify checks that the
/// command exists and is executable).
fn staged(dir: &Path, name: &str, installed: &str, built: &str) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("systemd")
            .join(name),
    )
    .expect("unit file");
    let p = dir.join(name);
    std::fs::write(&p, text.replace(installed, built)).unwrap();
    p
}

#[test]
fn units_verify() {
    let dir = tempfile::tempdir().unwrap();
    for (name, installed, built) in units() {
        let unit = staged(dir.path(), name, installed, built);
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .expect("systemd-analyze (Debian package systemd) is needed for this test");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {err}");
        assert!(err.trim().is_empty(), "{name} has warnings:\n{err}");
    }
}

#[test]
fn units_are_hardened_to_an_exposure_of_two_or_less() {
    let dir = tempfile::tempdir().unwrap();
    for (name, installed, built) in units() {
        let unit = staged(dir.path(), name, installed, built);
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(&unit)
            .output()
            .expect("systemd-analyze (Debian package systemd) is needed for this test");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no score for {name}: {text}"));
        let score: f64 = line
            .split(':')
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unreadable score line {line:?}"));
        println!("{name}: exposure {score}");
        assert!(score <= 2.0, "{name}: exposure {score} > 2.0\n{text}");
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Applied to an empty root with `systemd-sysusers --root` / `systemd-tmpfiles --root`, the
/// agent's files make user `edge-agent` (in `video`), /var/lib/edge-agent{,/models} and the
/// root-only /etc/edge-agent/credentials, and nothing of the sink; the sink's files make user
/// `edge-sink` and /etc/edge-sink/credentials, and nothing of the agent.
#[test]
fn sysusers_and_tmpfiles_are_per_service() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for (service, other) in [("edge-agent", "edge-sink"), ("edge-sink", "edge-agent")] {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        for (tool, kind, extra) in [
            ("systemd-sysusers", "sysusers", None),
            ("systemd-tmpfiles", "tmpfiles", Some("--create")),
        ] {
            let out = Command::new(tool)
                .arg(format!("--root={}", root.path().display()))
                .args(extra)
                .arg(repo().join(format!("systemd/{service}.{kind}")))
                .output()
                .unwrap_or_else(|e| panic!("{tool} (Debian package systemd): {e}"));
            assert!(
                out.status.success(),
                "{tool} {service}.{kind}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
        let uid_of = |name: &str| {
            passwd
                .lines()
                .find(|l| l.starts_with(&format!("{name}:")))
                .and_then(|l| l.split(':').nth(2))
                .and_then(|u| u.parse::<u32>().ok())
        };
        let uid = uid_of(service).unwrap_or_else(|| panic!("{service}: no user\n{passwd}"));
        assert!(
            uid_of(other).is_none(),
            "{service}'s files create user {other}:\n{passwd}"
        );
        let credentials = root.path().join(format!("etc/{service}/credentials"));
        let meta = std::fs::metadata(&credentials)
            .unwrap_or_else(|e| panic!("{}: {e}", credentials.display()));
        assert!(meta.is_dir());
        assert_eq!(meta.uid(), 0, "credentials are root's");
        assert_eq!(meta.permissions().mode() & 0o777, 0o700, "and root-only");
        for path in [format!("etc/{other}"), format!("var/lib/{other}")] {
            assert!(
                !root.path().join(&path).exists(),
                "{service}'s files create /{path}"
            );
        }
        if service == "edge-agent" {
            let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
            assert!(
                group
                    .lines()
                    .any(|l| l.starts_with("video:") && l.contains("edge-agent")),
                "edge-agent is in video (the camera):\n{group}"
            );
            for dir in ["var/lib/edge-agent", "var/lib/edge-agent/models"] {
                let meta = std::fs::metadata(root.path().join(dir)).unwrap();
                assert_eq!(meta.uid(), uid, "/{dir} belongs to edge-agent");
                assert_eq!(meta.permissions().mode() & 0o777, 0o750, "/{dir}");
            }
        }
    }
}

/// `Documentation=file://...` in each unit names a file its install puts there: the agent's
/// from the package's assets (Cargo.toml, `[package.metadata.deb]`; tests/package.rs checks the
/// installed package too), the sink's from the install steps in docs/deploy.md.
#[test]
fn each_unit_names_documentation_its_install_provides() {
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .expect("deb assets");
    let packaged: Vec<String> = assets
        .iter()
        .filter_map(|a| {
            let a = a.as_array()?;
            let (src, dst) = (a.first()?.as_str()?, a.get(1)?.as_str()?);
            Some(if dst.ends_with('/') {
                format!("/{dst}{}", Path::new(src).file_name()?.to_str()?)
            } else {
                format!("/{dst}")
            })
        })
        .collect();
    let deploy = std::fs::read_to_string(repo().join("docs/deploy.md")).unwrap();
    for (unit, provided_by) in [
        ("edge-agent.service", "the package"),
        ("edge-sink.service", "docs/deploy.md"),
    ] {
        let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
        let docs: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("Documentation="))
            .flat_map(str::split_whitespace)
            .filter_map(|u| u.strip_prefix("file://"))
            .collect();
        assert!(!docs.is_empty(), "{unit} names no local documentation");
        for doc in docs {
            let ok = if provided_by == "the package" {
                packaged.iter().any(|p| p == doc)
            } else {
                deploy.contains(doc)
            };
            assert!(
                ok,
                "{unit}: Documentation={doc} is not installed by {provided_by} ({packaged:?})"
            );
        }
    }
}
