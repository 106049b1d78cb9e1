//! Packages, tested the way they reach a machine:
//!
//! * The Debian package of the agent (`cargo deb`, built from the binary `cargo test --release`
//!   just built, as scripts/package.sh does): its contents, and its whole life on a bare Debian 12
//!   (minbase) root, the way a device image gets it: `apt-get install ./edge-agent_*.deb` (which
//!   pulls in systemd), upgrade to a newer version with local edits and state, remove, purge.
//! * The sink's manual install steps in docs/deploy.md, run as written on a bare Debian 12 root.
//! * The system packages a bare machine needs for the demo: `bash scripts/demo.sh deps` (the
//!   demo's first step, scripts/deps.sh) on a bare Debian 12 root, which before it has no clang,
//!   libclang, PostgreSQL, curl, patch or openssl, and afterwards has them all.
//!
//! The bare roots come from scripts/chroot.sh: debootstrap once into ~/.cache/edge-vision/chroot
//! (a tarball), a fresh copy per test, commands inside a private mount namespace with /proc and
//! /dev mounted and always unmounted. Needs root, debootstrap and Debian's mirror
//! (scripts/deps.sh test installs debootstrap). Downloaded .debs are kept per test in
//! ~/.cache/edge-vision/chroot/apt-<test>, so a repeated run downloads nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

/// `$EDGE_VISION_CACHE`, else `~/.cache/edge-vision`: tools and the bare root live outside the
/// clone.
fn cache_dir() -> PathBuf {
    std::env::var_os("EDGE_VISION_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/edge-vision")
        })
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cargo_deb() -> PathBuf {
    let p = cache_dir().join("tools/bin/cargo-deb");
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

/// The last `n` characters of a long output (apt is verbose; the end says what went wrong).
fn tail(text: &[u8], n: usize) -> String {
    let s = String::from_utf8_lossy(text);
    let cut = s.len().saturating_sub(n);
    let start = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    s[start..].to_string()
}

/// The agent's package, built once per test binary from the release binary of this build, with
/// cargo-deb's `--no-build` as scripts/package.sh does (release profile here, not `device`: the
/// binary is the one the other tests ran).
fn agent_deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("package-v1");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_edge-agent"));
        let target_dir = bin.parent().unwrap().parent().unwrap();
        run(Command::new(cargo_deb())
            .current_dir(repo())
            .env("CARGO_TARGET_DIR", target_dir)
            .args(["--no-build", "--no-strip", "--fast", "-o"])
            .arg(&dir));
        let debs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        assert_eq!(debs.len(), 1, "one .deb in {}: {debs:?}", dir.display());
        debs[0].clone()
    })
}

fn deb_field(deb: &Path, field: &str) -> String {
    run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(field))
        .trim()
        .to_string()
}

#[test]
fn the_amd64_package_holds_the_agent_and_only_the_agent() {
    let deb = agent_deb();
    let contents = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    for path in [
        "./usr/bin/edge-agent",
        "systemd/system/edge-agent.service",
        "./etc/edge-agent/agent.toml",
        "./usr/lib/sysusers.d/edge-agent.conf",
        "./usr/lib/tmpfiles.d/edge-agent.conf",
        "./usr/share/edge-vision/models/manifest.toml",
        "./usr/share/doc/edge-agent/agent.md",
    ] {
        assert!(
            contents.contains(path),
            "{path} not in the package:\n{contents}"
        );
    }
    for path in ["./var/lib", "edge-sink", "edge-vision.conf"] {
        assert!(
            !contents.contains(path),
            "{path} must not be in the agent's package:\n{contents}"
        );
    }
    assert_eq!(deb_field(deb, "Package"), "edge-agent");
    assert_eq!(deb_field(deb, "Architecture"), "amd64");
    // cargo-deb's postinst calls systemd-sysusers unguarded (for the sysusers.d file): without
    // this dependency the package fails to configure on a machine without systemd.
    let depends = deb_field(deb, "Depends");
    assert!(
        depends.split(',').any(|d| d.trim() == "systemd"),
        "Depends must name systemd: {depends}"
    );

    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles.contains("/etc/edge-agent/agent.toml"),
        "{conffiles}"
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("systemd-sysusers edge-agent.conf"),
        "{postinst}"
    );
    assert!(
        postinst.contains("deb-systemd-helper") && postinst.contains("enable"),
        "the unit is enabled on install:\n{postinst}"
    );
    let postrm = std::fs::read_to_string(control.join("postrm")).unwrap();
    assert!(postrm.contains("/etc/edge-agent/credentials"), "{postrm}");

    let root = dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    // The unit's Documentation= names a file the package installs.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/edge-agent.service"))
        .or_else(|_| {
            std::fs::read_to_string(root.join("usr/lib/systemd/system/edge-agent.service"))
        })
        .expect("unit in the package");
    for doc in documentation(&unit) {
        assert!(
            root.join(doc.trim_start_matches('/')).is_file(),
            "Documentation={doc} is not in the package"
        );
    }
    let installed = root.join("usr/bin/edge-agent");
    let version = run(Command::new(&installed).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
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

/// The `file://` paths in a unit's `Documentation=` lines.
fn documentation(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
        .flat_map(|v| v.split_whitespace())
        .filter_map(|u| u.strip_prefix("file://"))
        .map(str::to_string)
        .collect()
}

/// A fresh bare Debian 12 root (scripts/chroot.sh), deleted on drop (also when a test fails).
struct Root {
    dir: PathBuf,
    name: &'static str,
}

fn chroot_sh() -> PathBuf {
    repo().join("scripts/chroot.sh")
}

impl Root {
    fn new(name: &'static str) -> Root {
        let dir = std::env::temp_dir().join(format!("edge-vision-{name}-{}", std::process::id()));
        let _ = Command::new("bash")
            .arg(chroot_sh())
            .arg("rm")
            .arg(&dir)
            .status();
        let t = Instant::now();
        let out = Command::new("bash")
            .arg(chroot_sh())
            .arg("new")
            .arg(&dir)
            .output()
            .expect("bash scripts/chroot.sh");
        assert!(
            out.status.success(),
            "scripts/chroot.sh new (needs root, debootstrap: bash scripts/deps.sh chroot; and deb.debian.org):\n{}",
            tail(&out.stderr, 4000)
        );
        println!(
            "[{name}] bare Debian 12 root: {:.1}s",
            t.elapsed().as_secs_f64()
        );
        Root { dir, name }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p.trim_start_matches('/'))
    }

    /// `bash -c SCRIPT` as root inside, with a clean environment.
    fn sh(&self, script: &str) -> Output {
        Command::new("bash")
            .arg(chroot_sh())
            .arg("run")
            .arg(&self.dir)
            .args(["bash", "-c", script])
            .env(
                "CHROOT_APT_CACHE",
                cache_dir()
                    .join("chroot")
                    .join(format!("apt-{}", self.name)),
            )
            .output()
            .expect("bash scripts/chroot.sh run")
    }

    /// Runs SCRIPT, which must succeed; returns its stdout.
    fn ok(&self, what: &str, script: &str) -> String {
        let t = Instant::now();
        let out = self.sh(script);
        println!("[{}] {what}: {:.1}s", self.name, t.elapsed().as_secs_f64());
        assert!(
            out.status.success(),
            "[{}] {what} failed ({}):\n--- stdout (end)\n{}\n--- stderr (end)\n{}",
            self.name,
            out.status,
            tail(&out.stdout, 6000),
            tail(&out.stderr, 6000)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `key=value` lines printed by SCRIPT.
    fn facts(&self, what: &str, script: &str) -> Facts {
        let text = self.ok(what, script);
        let map = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Facts {
            what: what.to_string(),
            map,
        }
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(chroot_sh())
            .arg("rm")
            .arg(&self.dir)
            .status();
    }
}

struct Facts {
    what: String,
    map: BTreeMap<String, String>,
}

impl Facts {
    fn get(&self, key: &str) -> &str {
        self.map
            .get(key)
            .unwrap_or_else(|| panic!("{}: no fact {key}:\n{self}", self.what))
    }
    fn expect(&self, key: &str, want: &str, why: &str) {
        assert_eq!(
            self.get(key),
            want,
            "{}: {key} ({why})\nall facts:\n{self}",
            self.what
        );
    }
    fn expect_contains(&self, key: &str, part: &str, why: &str) {
        assert!(
            self.get(key).contains(part),
            "{}: {key} should contain {part:?} ({why})\nall facts:\n{self}",
            self.what
        );
    }
}

impl std::fmt::Display for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (k, v) in &self.map {
            writeln!(f, "  {k}={v}")?;
        }
        Ok(())
    }
}

/// What a device with the agent's package looks like (printed as key=value lines).
const AGENT_FACTS: &str = r#"
st() { stat -c '%U:%G %a %F' "$1" 2>/dev/null || echo absent; }
echo "status=$(dpkg-query -W -f='${Status}' edge-agent 2>/dev/null || echo absent)"
echo "version=$(dpkg-query -W -f='${Version}' edge-agent 2>/dev/null || true)"
echo "audit=$(dpkg --audit 2>&1 | tr '\n' ' ')"
echo "user=$(getent passwd edge-agent || echo absent)"
echo "groups=$(id -nG edge-agent 2>/dev/null || echo absent)"
echo "sink_user=$(getent passwd edge-sink || echo absent)"
for p in /usr/bin/edge-agent /usr/bin/systemd-sysusers /var/lib/edge-agent /var/lib/edge-agent/models \
         /var/lib/edge-agent/outbox.sqlite /etc/edge-agent /etc/edge-agent/agent.toml \
         /etc/edge-agent/credentials /etc/edge-agent/credentials/password /etc/edge-sink \
         /usr/lib/sysusers.d/edge-agent.conf /usr/lib/tmpfiles.d/edge-agent.conf \
         /usr/lib/sysusers.d/edge-vision.conf \
         /etc/systemd/system/multi-user.target.wants/edge-agent.service; do
  echo "stat $p=$(st "$p")"
done
unit=$(ls /lib/systemd/system/edge-agent.service /usr/lib/systemd/system/edge-agent.service 2>/dev/null | head -1)
echo "unit=${unit:-absent}"
if [ -n "$unit" ]; then
  for doc in $(sed -n 's|^Documentation=||p' "$unit"); do
    f=${doc#file://}
    echo "doc $f=$(st "$f")"
  done
fi
echo "site_edit=$(grep -c '^# site edit' /etc/edge-agent/agent.toml 2>/dev/null || echo 0)"
echo "outbox=$(cat /var/lib/edge-agent/outbox.sqlite 2>/dev/null || echo absent)"
echo "conffile_leftovers=$(ls /etc/edge-agent/ 2>/dev/null | grep -c dpkg- || true)"
if [ -x /usr/bin/edge-agent ]; then
  # As the service user: it can read its 0640 root:edge-agent configuration.
  runuser -u edge-agent -- edge-agent --config /etc/edge-agent/agent.toml config check >/dev/null 2>/tmp/check.err \
    && echo "config_check=ok" || echo "config_check=failed: $(tr '\n' ' ' </tmp/check.err)"
fi
"#;

#[test]
fn the_agent_package_installs_upgrades_removes_and_purges_on_a_bare_debian() {
    let v1 = agent_deb();
    // The upgrade: the same package with a higher version (dpkg-deb -R / -b).
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    run(Command::new("dpkg-deb").arg("-R").arg(v1).arg(&tree));
    let control_path = tree.join("DEBIAN/control");
    let control = std::fs::read_to_string(&control_path).unwrap();
    let version1 = deb_field(v1, "Version");
    let version2 = format!("{version1}+upgrade1");
    std::fs::write(
        &control_path,
        control.replace(
            &format!("\nVersion: {version1}\n"),
            &format!("\nVersion: {version2}\n"),
        ),
    )
    .unwrap();
    let v2 = work.path().join(format!("edge-agent_{version2}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["-Zgzip", "-z1", "--root-owner-group", "-b"])
        .arg(&tree)
        .arg(&v2));
    assert_eq!(deb_field(&v2, "Version"), version2);

    let root = Root::new("agent-package");
    for (sub, deb) in [("v1", v1), ("v2", v2.as_path())] {
        let dir = root.path(&format!("/tmp/{sub}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(deb, dir.join(deb.file_name().unwrap())).unwrap();
    }

    let before = root.facts("bare root", AGENT_FACTS);
    before.expect("status", "absent", "a bare root has no agent");
    before.expect("user", "absent", "a bare root has no agent user");
    before.expect(
        "stat /usr/bin/systemd-sysusers",
        "absent",
        "a bare root has no systemd (the package must pull it in)",
    );

    // As a device image gets it (pi-gen, an L4T rootfs): apt resolves the dependencies (systemd)
    // from the mirror; systemd does not run in here, so nothing is started.
    root.ok(
        "apt-get install ./edge-agent_*.deb",
        "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -q; cd /tmp/v1; apt-get install -y -q ./edge-agent_*.deb",
    );
    let installed = root.facts("installed", AGENT_FACTS);
    installed.expect("status", "install ok installed", "postinst succeeded");
    installed.expect("version", &version1, "");
    installed.expect("audit", "", "dpkg --audit: nothing half-configured");
    installed.expect_contains("user", ":/var/lib/edge-agent:", "the agent's system user");
    installed.expect_contains("groups", "video", "the camera");
    installed.expect(
        "sink_user",
        "absent",
        "the agent's package creates no sink user",
    );
    installed.expect("stat /etc/edge-sink", "absent", "nor sink directories");
    installed.expect(
        "stat /usr/lib/sysusers.d/edge-vision.conf",
        "absent",
        "per-package sysusers files",
    );
    installed.expect(
        "stat /var/lib/edge-agent",
        "edge-agent:edge-agent 750 directory",
        "state directory (tmpfiles)",
    );
    installed.expect(
        "stat /var/lib/edge-agent/models",
        "edge-agent:edge-agent 750 directory",
        "models directory",
    );
    installed.expect(
        "stat /etc/edge-agent/credentials",
        "root:root 700 directory",
        "root-only secrets for LoadCredential=",
    );
    installed.expect(
        "stat /etc/edge-agent/agent.toml",
        "root:edge-agent 640 regular file",
        "the conffile, readable by the service's group",
    );
    installed.expect_contains(
        "stat /etc/systemd/system/multi-user.target.wants/edge-agent.service",
        "symbolic link",
        "enabled on install",
    );
    assert_ne!(installed.get("unit"), "absent", "{installed}");
    let docs: Vec<_> = installed
        .map
        .iter()
        .filter(|(k, _)| k.starts_with("doc "))
        .collect();
    assert!(
        !docs.is_empty(),
        "the unit names its documentation:\n{installed}"
    );
    for (k, v) in docs {
        assert!(
            v.ends_with("regular file"),
            "unit's Documentation= path is not installed: {k}={v}\n{installed}"
        );
    }
    installed.expect(
        "config_check",
        "ok",
        "the service user reads the shipped configuration",
    );

    // The site's own edits and state, which upgrades must keep.
    root.ok(
        "local edits: configuration, outbox, a credential",
        "set -e; echo '# site edit' >>/etc/edge-agent/agent.toml
         echo pending >/var/lib/edge-agent/outbox.sqlite; chown edge-agent:edge-agent /var/lib/edge-agent/outbox.sqlite
         install -m 600 /dev/null /etc/edge-agent/credentials/password; echo s3cret >/etc/edge-agent/credentials/password",
    );
    root.ok(
        "upgrade: apt-get install ./edge-agent_<newer>.deb",
        "set -e; export DEBIAN_FRONTEND=noninteractive; cd /tmp/v2; apt-get install -y -q ./edge-agent_*.deb",
    );
    let upgraded = root.facts("upgraded", AGENT_FACTS);
    upgraded.expect("status", "install ok installed", "");
    upgraded.expect("version", &version2, "the newer version");
    upgraded.expect("audit", "", "");
    upgraded.expect("site_edit", "1", "dpkg keeps the edited conffile");
    upgraded.expect("conffile_leftovers", "0", "no conffile prompt");
    upgraded.expect("outbox", "pending", "undelivered events survive upgrades");
    upgraded.expect(
        "stat /etc/edge-agent/credentials/password",
        "root:root 600 regular file",
        "credentials survive upgrades",
    );
    upgraded.expect(
        "stat /etc/edge-agent/agent.toml",
        "root:edge-agent 640 regular file",
        "",
    );
    upgraded.expect(
        "config_check",
        "ok",
        "the edited configuration is still valid",
    );

    root.ok(
        "apt-get remove edge-agent",
        "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get remove -y -q edge-agent",
    );
    let removed = root.facts("removed", AGENT_FACTS);
    removed.expect("status", "deinstall ok config-files", "");
    removed.expect("stat /usr/bin/edge-agent", "absent", "the binary goes");
    removed.expect("outbox", "pending", "remove keeps the state");
    removed.expect("site_edit", "1", "remove keeps the configuration");
    removed.expect(
        "stat /etc/edge-agent/credentials/password",
        "root:root 600 regular file",
        "remove keeps the credentials",
    );

    root.ok(
        "apt-get purge edge-agent",
        "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get purge -y -q edge-agent",
    );
    let purged = root.facts("purged", AGENT_FACTS);
    assert!(
        ["absent", "unknown ok not-installed"].contains(&purged.get("status")),
        "purged: dpkg forgets the package\n{purged}"
    );
    purged.expect(
        "stat /var/lib/edge-agent",
        "absent",
        "purge deletes the state",
    );
    purged.expect(
        "stat /etc/edge-agent/credentials",
        "absent",
        "purge deletes the Kafka secrets",
    );
    purged.expect("stat /etc/edge-agent", "absent", "and the configuration");
    purged.expect(
        "stat /etc/systemd/system/multi-user.target.wants/edge-agent.service",
        "absent",
        "and the unit's enablement",
    );
    // Debian policy: system users stay on purge (files may still belong to the uid).
    purged.expect_contains("user", ":/var/lib/edge-agent:", "the user stays");
}

/// The sink's install steps: the ```sh block after `<!-- sink-install -->` in docs/deploy.md.
fn sink_install_steps() -> String {
    let doc = std::fs::read_to_string(repo().join("docs/deploy.md")).unwrap();
    let after = doc
        .split_once("<!-- sink-install -->")
        .expect("docs/deploy.md marks the sink's install steps with <!-- sink-install -->")
        .1;
    let block = after
        .split_once("```sh\n")
        .expect("a ```sh block follows the marker")
        .1;
    block
        .split_once("```")
        .expect("the block ends")
        .0
        .to_string()
}

#[test]
fn the_sink_install_steps_in_deploy_md_work_on_a_bare_debian() {
    let root = Root::new("sink-install");
    // A checkout with a built sink, as the steps expect (target/release/edge-sink).
    let src = root.path("/src");
    std::fs::create_dir_all(&src).unwrap();
    for dir in ["systemd", "docs"] {
        run(Command::new("cp")
            .arg("-r")
            .arg(repo().join(dir))
            .arg(src.join(dir))
            .arg("-T"));
    }
    std::fs::create_dir_all(src.join("target/release")).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_edge-sink"),
        src.join("target/release/edge-sink"),
    )
    .unwrap();
    std::fs::write(root.path("/src/install.sh"), sink_install_steps()).unwrap();

    // A data-centre host runs systemd; the bare root gets it from the mirror.
    root.ok(
        "apt-get install systemd",
        "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -q; apt-get install -y -q --no-install-recommends systemd",
    );
    root.ok(
        "docs/deploy.md's sink install steps",
        "set -eu; cd /src; bash -eux install.sh",
    );
    let f = root.facts(
        "sink installed",
        r#"
st() { stat -c '%U:%G %a %F' "$1" 2>/dev/null || echo absent; }
echo "user=$(getent passwd edge-sink || echo absent)"
echo "agent_user=$(getent passwd edge-agent || echo absent)"
for p in /usr/bin/edge-sink /etc/edge-sink/sink.toml /etc/edge-sink/credentials /etc/edge-agent \
         /var/lib/edge-agent /usr/lib/sysusers.d/edge-sink.conf /usr/lib/tmpfiles.d/edge-sink.conf; do
  echo "stat $p=$(st "$p")"
done
unit=$(ls /usr/lib/systemd/system/edge-sink.service /lib/systemd/system/edge-sink.service 2>/dev/null | head -1)
echo "unit=${unit:-absent}"
for doc in $(sed -n 's|^Documentation=||p' "$unit"); do f=${doc#file://}; echo "doc=$f $(st "$f")"; done
runuser -u edge-sink -- edge-sink --config /etc/edge-sink/sink.toml config check >/dev/null 2>/tmp/check.err \
  && echo "config_check=ok" || echo "config_check=failed: $(tr '\n' ' ' </tmp/check.err)"
"#,
    );
    f.expect_contains("user", "edge-sink", "the sink's system user");
    f.expect(
        "agent_user",
        "absent",
        "the sink's files create no agent user",
    );
    f.expect("stat /etc/edge-agent", "absent", "nor agent directories");
    f.expect("stat /var/lib/edge-agent", "absent", "");
    f.expect("stat /usr/bin/edge-sink", "root:root 755 regular file", "");
    f.expect(
        "stat /etc/edge-sink/credentials",
        "root:root 700 directory",
        "root-only secrets for LoadCredential=",
    );
    f.expect(
        "stat /etc/edge-sink/sink.toml",
        "root:edge-sink 640 regular file",
        "readable by the service's group",
    );
    assert_ne!(f.get("unit"), "absent", "{f}");
    assert!(
        f.get("doc").ends_with("regular file"),
        "the unit's Documentation= path is installed by the steps:\n{f}"
    );
    f.expect(
        "config_check",
        "ok",
        "the service user reads the configuration",
    );
}

/// The demo's first step on a bare machine.
const TOOLS: &str = r#"
for c in clang cc c++ make pkg-config psql pg_ctlcluster pg_isready curl patch openssl python3; do
  command -v "$c" >/dev/null && echo "$c=yes" || echo "$c=no"
done
# What bindgen's clang-sys loads (v4l2-sys-mit: "Unable to find libclang" without it): a
# libclang.so* in LLVM's library directory that really exports the C API.
lib=$(ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*-linux-gnu/libclang-[0-9]*.so* 2>/dev/null | head -1)
if [ -n "$lib" ] && command -v python3 >/dev/null &&
   python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1]).clang_createIndex" "$lib" 2>/dev/null; then
  echo "libclang=yes"
else
  echo "libclang=no${lib:+ ($lib does not load)}"
fi
python3 -m pip --version >/dev/null 2>&1 && echo "pip=yes" || echo "pip=no"
echo '#include <linux/videodev2.h>' | clang -fsyntax-only -x c - 2>/dev/null && echo "videodev2=yes" || echo "videodev2=no"
grep -qs '^host all all 127.0.0.1/32 trust' /etc/postgresql/*/main/pg_hba.conf && echo "pg_trust=yes" || echo "pg_trust=no"
"#;

#[test]
fn the_demos_dependency_step_installs_what_a_bare_debian_lacks() {
    let root = Root::new("bare-machine");
    let dst = root.path("/edge-vision/scripts");
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    run(Command::new("cp")
        .arg("-r")
        .arg(repo().join("scripts"))
        .arg(&dst)
        .arg("-T"));
    let demo = std::fs::read_to_string(repo().join("scripts/demo.sh")).unwrap();
    assert!(
        demo.contains("bash scripts/deps.sh demo"),
        "the demo's first step is scripts/deps.sh demo"
    );

    let keys = [
        "clang",
        "libclang",
        "cc",
        "c++",
        "make",
        "psql",
        "pg_ctlcluster",
        "pg_isready",
        "curl",
        "patch",
        "openssl",
        "python3",
        "pip",
        "videodev2",
        "pg_trust",
    ];
    let before = root.facts("bare root", TOOLS);
    for k in [
        "clang",
        "libclang",
        "psql",
        "pg_ctlcluster",
        "curl",
        "patch",
        "openssl",
        "cc",
    ] {
        before.expect(
            k,
            "no",
            "a bare Debian 12 minbase lacks it (else this test proves nothing)",
        );
    }

    // Exactly what a user runs; no DEBIAN_FRONTEND, no terminal: the script must cope.
    let out = root.ok(
        "bash scripts/demo.sh deps",
        "cd /edge-vision && bash scripts/demo.sh deps",
    );
    assert!(
        out.contains("deps: installing"),
        "it says what it installs:\n{out}"
    );
    let after = root.facts("after scripts/deps.sh demo", TOOLS);
    for k in keys {
        after.expect(k, "yes", "installed by scripts/deps.sh demo");
    }

    // Each package only when missing: a second run installs nothing and runs no apt.
    let again = root.ok("second run", "cd /edge-vision && bash scripts/demo.sh deps");
    assert!(
        again.contains("all system packages for 'demo' present") && !again.contains("apt-get"),
        "{again}"
    );
}
