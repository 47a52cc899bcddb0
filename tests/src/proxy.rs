//! A loopback TCP proxy that can cut every connection through it, to take a broker
//! away from ferry mid-stream without stopping the broker for the other tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{copy_bidirectional, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy from a fresh loopback port to `upstream`.
pub struct Proxy {
    addr: SocketAddr,
    /// Bumped on every cut; connections opened before a cut end when it changes.
    epoch: watch::Sender<(u64, bool)>,
    _task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts proxying; panics if `upstream` is not a socket address.
    pub async fn start(upstream: &str) -> Self {
        let upstream: SocketAddr = upstream.parse().expect("upstream socket address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (epoch, watcher) = watch::channel((0u64, false));
        let watcher = Arc::new(watcher);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut cuts = (*watcher).clone();
                let (started, down) = *cuts.borrow_and_update();
                if down {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.wait_for(|(epoch, _)| *epoch != started) => {}
                    }
                });
            }
        });
        Self {
            addr,
            epoch,
            _task: task,
        }
    }

    /// Starts a proxy to an HTTP server that breaks every `every`-th connection in the
    /// middle of a response: it forwards a few hundred bytes of the answer, then closes
    /// both sides. [`FlakyProxy::cuts`] says how often it did.
    pub async fn start_flaky(upstream: &str, every: u64) -> FlakyProxy {
        let upstream: SocketAddr = upstream.parse().expect("upstream socket address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cuts = Arc::new(AtomicU64::new(0));
        let counted = cuts.clone();
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                n += 1;
                // Anywhere from the status line to the second response.
                let cut_after = (n % every == 0).then_some(1 + (n * 997) % 500);
                let cuts = counted.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    });
                    let mut forwarded = 0u64;
                    let mut buf = vec![0u8; 8192];
                    while let Ok(read) = server_read.read(&mut buf).await {
                        if read == 0 {
                            break;
                        }
                        let room =
                            cut_after.map_or(read as u64, |c| (c - forwarded).min(read as u64));
                        if client_write.write_all(&buf[..room as usize]).await.is_err() {
                            break;
                        }
                        forwarded += room;
                        if cut_after == Some(forwarded) {
                            cuts.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                    }
                    upstream.abort();
                });
            }
        });
        FlakyProxy {
            addr,
            cuts,
            _task: task,
        }
    }

    /// Where clients connect (`host:port`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection and refuses new ones for `down`, then lets them in
    /// again.
    pub async fn cut(&self, down: Duration) {
        self.epoch.send_modify(|(epoch, is_down)| {
            *epoch += 1;
            *is_down = true;
        });
        tokio::time::sleep(down).await;
        self.epoch.send_modify(|(_, is_down)| *is_down = false);
    }
}

/// A proxy that breaks some connections mid-response; see [`Proxy::start_flaky`].
pub struct FlakyProxy {
    addr: SocketAddr,
    cuts: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

impl FlakyProxy {
    /// Where clients connect (`host:port`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Responses cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::SeqCst)
    }
}
