//! systemd's notify protocol (`sd_notify`), for `Type=notify` units with `WatchdogSec=`.
//!
//! A datagram to `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). Without the
//! variable every call is a no-op, so the binaries behave the same outside systemd. The agent
//! sends `READY=1` once its pipeline runs, then `WATCHDOG=1` from its heartbeat only while
//! every stage is making progress: a stalled pipeline stops the pings and systemd restarts it.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go; `None` outside systemd.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, String)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`.
    pub fn from_env() -> Self {
        Self::new(std::env::var("NOTIFY_SOCKET").ok().as_deref())
    }

    /// A notifier for an explicit socket address (`None`: disabled).
    pub fn new(addr: Option<&str>) -> Self {
        let target = addr
            .filter(|a| !a.is_empty())
            .and_then(|a| UnixDatagram::unbound().ok().map(|s| (s, a.to_string())));
        Self { target }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, `STATUS=...`). Errors are
    /// logged, never fatal: the agent's job does not depend on systemd listening.
    pub fn notify(&self, state: &str) {
        let Some((sock, addr)) = &self.target else {
            return;
        };
        let sent = if let Some(name) = addr.strip_prefix('@') {
            abstract_send(sock, name, state.as_bytes())
        } else {
            sock.send_to(state.as_bytes(), addr)
        };
        if let Err(e) = sent {
            tracing::warn!(socket = %addr, "sd_notify {state:?}: {e}");
        }
    }
}

#[cfg(target_os = "linux")]
fn abstract_send(sock: &UnixDatagram, name: &str, msg: &[u8]) -> std::io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    sock.send_to_addr(msg, &addr)
}

#[cfg(not(target_os = "linux"))]
fn abstract_send(_: &UnixDatagram, _: &str, _: &[u8]) -> std::io::Result<usize> {
    Err(std::io::Error::other("abstract sockets need Linux"))
}

/// Resolves when the process gets SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
#[cfg(feature = "kafka")]
pub async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The watchdog period systemd asks for (`$WATCHDOG_USEC`, for this process when
/// `$WATCHDOG_PID` is set), if any.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str());
        assert!(n.enabled());
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1");
        assert!(!Notifier::new(None).enabled());
    }
}
