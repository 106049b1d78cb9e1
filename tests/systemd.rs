//! The systemd units in `systemd/`: `systemd-analyze verify` accepts them and
//! `systemd-analyze security --offline=yes` rates each at an exposure of 2.0 or less.

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
