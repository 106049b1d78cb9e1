//! A TCP fault proxy between the agent and the broker, on loopback: pass traffic, cut it
//! (close every connection and refuse new ones), blackhole it (accept, forward nothing), and
//! restore it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASS: u8 = 0;
const CUT: u8 = 1;
const BLACKHOLE: u8 = 2;

/// Handle to a running proxy; dropping it does not stop it (the runtime does).
#[derive(Clone)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Bumped on every cut so live connections notice and close.
    generation: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Listens on `listen` (use port 0 for any) and forwards to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind(listen).await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let mode = Arc::new(AtomicU8::new(PASS));
        let generation = Arc::new(AtomicU64::new(0));
        let (m, g) = (mode.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                match m.load(Ordering::SeqCst) {
                    CUT => drop(client),
                    mode => {
                        let (m, g) = (m.clone(), g.clone());
                        tokio::spawn(async move {
                            let _ = relay(client, upstream, mode == BLACKHOLE, m, g).await;
                        });
                    }
                }
            }
        });
        Self {
            addr,
            mode,
            generation,
        }
    }

    pub fn cut(&self) {
        self.mode.store(CUT, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn blackhole(&self) {
        self.mode.store(BLACKHOLE, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.mode.store(PASS, Ordering::SeqCst);
    }
}

async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    blackhole: bool,
    mode: Arc<AtomicU8>,
    gen: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let born = gen.load(Ordering::SeqCst);
    if blackhole {
        // Hold the connection open and read nothing useful until restored.
        let mut buf = [0u8; 4096];
        loop {
            tokio::select! {
                r = client.read(&mut buf) => if r? == 0 { return Ok(()) },
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                    if mode.load(Ordering::SeqCst) == PASS { return Ok(()) }
                }
            }
        }
    }
    let mut server = TcpStream::connect(upstream).await?;
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut a = [0u8; 16 * 1024];
    let mut b = [0u8; 16 * 1024];
    loop {
        if gen.load(Ordering::SeqCst) != born {
            return Ok(()); // cut: drop both sides
        }
        tokio::select! {
            r = cr.read(&mut a) => { let n = r?; if n == 0 { return Ok(()) } sw.write_all(&a[..n]).await?; }
            r = sr.read(&mut b) => { let n = r?; if n == 0 { return Ok(()) } cw.write_all(&b[..n]).await?; }
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {
                if gen.load(Ordering::SeqCst) != born {
                    return Ok(()); // cut: drop both sides
                }
            }
        }
    }
}
