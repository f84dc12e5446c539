//! A TCP proxy between a server and one of its backends (PostgreSQL,
//! SeaweedFS) that a test can take down and bring back: `refuse` closes
//! every connection and the port itself (the backend was killed: new
//! connections are refused),
//! `hang` keeps connections open and passes nothing (the backend was
//! SIGSTOPped or froze), `forward` is normal service.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How the proxy treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pass bytes both ways.
    Forward,
    /// Close every connection at once.
    Refuse,
    /// Accept and hold connections, pass nothing.
    Hang,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let mode = Arc::new(watch::channel(Mode::Forward).0);
        let mut modes = mode.subscribe();
        let task = tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                let refused = *modes.borrow_and_update() == Mode::Refuse;
                if refused {
                    // The port closes: connecting is refused.
                    listener = None;
                } else if listener.is_none() {
                    listener = TcpListener::bind(addr).await.ok();
                }
                let Some(open) = &listener else {
                    if modes.changed().await.is_err() {
                        return;
                    }
                    continue;
                };
                tokio::select! {
                    accepted = open.accept() => {
                        if let Ok((client, _)) = accepted {
                            tokio::spawn(serve(client, target, modes.clone()));
                        }
                    }
                    changed = modes.changed() => if changed.is_err() { return },
                }
            }
        });
        Self { addr, mode, task }
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes how traffic is treated, for open connections too.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.mode.send_replace(Mode::Refuse);
    }
}

async fn serve(mut client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Mode>) {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Mode::Refuse => {
                let _ = client.shutdown().await;
                return;
            }
            Mode::Hang => {
                if mode.changed().await.is_err() {
                    return;
                }
            }
            Mode::Forward => break,
        }
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = async {
            while mode.changed().await.is_ok() {
                if *mode.borrow() != Mode::Forward {
                    break;
                }
            }
        } => {
            // Hung: hold both ends open, silent, until the test moves on;
            // refused: close now.
            while *mode.borrow() == Mode::Hang {
                if mode.changed().await.is_err() {
                    break;
                }
            }
        }
    }
}
