//! A loopback TCP proxy that can cut every connection through it, to take a broker
//! away from ferry mid-stream without stopping the broker for the other tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::copy_bidirectional;
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
