//! The Debian package (`cargo deb`): built from the tested binary, it holds the binary, the
//! hardened unit (enabled on install), sysusers/tmpfiles snippets, the default configuration as
//! a conffile and the model manifest, and nothing under /var/lib (the outbox survives upgrades).
//! Unpacked into a scratch root, its binary runs and accepts its own configuration.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn cargo_deb() -> PathBuf {
    let p = common::cache_dir().join("tools/bin/cargo-deb");
    assert!(
        p.exists(),
        "cargo-deb missing at {}: scripts/test.sh installs it (cargo install cargo-deb --locked --root ~/.cache/edge-vision/tools)",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_amd64_package_installs_a_working_agent() {
    let dir = tempfile::tempdir().unwrap();
    let deb = dir.path().join("edge-agent.deb");
    // The binary cargo test just built (release profile) is what goes in.
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_edge-agent"));
    let target_dir = bin.parent().unwrap().parent().unwrap();
    run(Command::new(cargo_deb())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target_dir)
        .args(["--no-build", "--no-strip", "-o"])
        .arg(&deb));
    let contents = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/edge-agent",
        "edge-agent.service",
        "./etc/edge-agent/agent.toml",
        "./usr/lib/sysusers.d/edge-vision.conf",
        "./usr/lib/tmpfiles.d/edge-vision.conf",
        "./usr/share/edge-vision/models/manifest.toml",
    ] {
        assert!(
            contents.contains(path),
            "{path} not in the package:\n{contents}"
        );
    }
    assert!(
        !contents.contains("./var/lib"),
        "state must not be packaged:\n{contents}"
    );
    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    assert!(info.contains("Package: edge-agent"), "{info}");
    assert!(info.contains("Architecture: amd64"), "{info}");
    let control = dir.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles.contains("/etc/edge-agent/agent.toml"),
        "{conffiles}"
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("systemd-sysusers"), "{postinst}");
    assert!(
        postinst.contains("deb-systemd-helper") && postinst.contains("enable"),
        "the unit is enabled on install:\n{postinst}"
    );

    let root = dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let installed = root.join("usr/bin/edge-agent");
    let version = run(Command::new(&installed).arg("--version"));
    assert!(version.contains(edge_vision::VERSION), "{version}");
    let check = Command::new(&installed)
        .arg("--config")
        .arg(root.join("etc/edge-agent/agent.toml"))
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the shipped configuration is valid: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}
