//! The API server forwarder. Processes inside a node namespace cannot reach
//! the root namespace's loopback, where the lab's kube-apiserver listens. One
//! forwarder process (the hidden `canal-lab __forward`, in the root
//! namespace) keeps a listener on `127.0.0.1:6443` inside every node
//! namespace (created on a thread moved there with setns) and relays each
//! accepted connection to the API server. It follows the node list in the
//! state directory, so `node add` and `node del` need no restart.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::Error;
use crate::lab::netns;
use crate::lab::state::StateDir;

/// How often the node list is re-read.
const RESYNC: Duration = Duration::from_millis(200);

/// Runs the forwarder until killed.
pub async fn run(state: StateDir, upstream: SocketAddr, port: u16) -> Result<(), Error> {
    let mut listeners: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
    loop {
        let wanted: Vec<String> = match state.nodes() {
            Ok(nodes) => nodes.into_iter().map(|n| n.netns).collect(),
            Err(e) => {
                tracing::warn!("reading the node list: {e}");
                Vec::new()
            }
        };
        listeners.retain(|netns, task| {
            let keep = wanted.contains(netns) && !task.is_finished();
            if !keep {
                tracing::info!(%netns, "closing listener");
                task.abort();
            }
            keep
        });
        for netns in wanted {
            if listeners.contains_key(&netns) || !netns::exists(&netns) {
                continue;
            }
            match listen_in(&netns, port) {
                Ok(listener) => {
                    tracing::info!(%netns, port, "listening");
                    listeners.insert(netns, tokio::spawn(accept_loop(listener, upstream)));
                }
                Err(e) => tracing::warn!(%netns, "cannot listen yet: {e}"),
            }
        }
        tokio::time::sleep(RESYNC).await;
    }
}

/// Binds `127.0.0.1:port` inside `netns`; the socket stays there while this
/// process's tokio threads (in the root namespace) accept on it.
fn listen_in(netns: &str, port: u16) -> Result<TcpListener, Error> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let std_listener = netns::run_in(netns, move || {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(l)
    })?
    .map_err(|e| Error::Io(format!("binding {addr} in namespace {netns}"), e))?;
    TcpListener::from_std(std_listener)
        .map_err(|e| Error::Io(format!("registering the listener of {netns}"), e))
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((inbound, _)) => {
                tokio::spawn(relay(inbound, upstream));
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn relay(mut inbound: TcpStream, upstream: SocketAddr) {
    match TcpStream::connect(upstream).await {
        Ok(mut outbound) => {
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            if let Err(e) = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
                tracing::debug!("relay ended: {e}");
            }
        }
        Err(e) => tracing::warn!(%upstream, "cannot reach the API server: {e}"),
    }
}

/// Waits until something accepts on `127.0.0.1:port` inside `netns`.
pub fn wait_listening(netns: &str, port: u16, timeout: Duration) -> Result<(), Error> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let reachable = netns::run_in(netns, move || {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })?;
    if reachable {
        Ok(())
    } else {
        Err(Error::Timeout(format!(
            "the API forwarder to listen on {addr} inside {netns}"
        )))
    }
}
