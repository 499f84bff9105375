//! The API server of the real-kubelet lab listens inside the control-plane
//! namespace (so that nodes, pods through the `kubernetes` Service, and the
//! API server's own calls to kubelets all use routable addresses). People,
//! tests, kubectl and helm on the machine reach it through this forwarder:
//! the hidden `canal-lab __api-forward`, a listener on the root namespace's
//! loopback relaying every connection to the API server through a socket
//! created inside the control-plane namespace.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::Error;
use crate::lab::netns;

/// Binds `listen` (port 0: any free port), writes the bound port to
/// `port_file`, then relays connections to `upstream` inside `netns_name`
/// until killed.
pub async fn run(
    netns_name: String,
    upstream: SocketAddr,
    listen: SocketAddr,
    port_file: PathBuf,
) -> Result<(), Error> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Io(format!("binding {listen}"), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Io(format!("reading the address of {listen}"), e))?;
    crate::lab::state::write_atomic(&port_file, format!("{}\n", bound.port()).as_bytes())?;
    tracing::info!(%bound, %upstream, netns = %netns_name, "forwarding");
    loop {
        match listener.accept().await {
            Ok((inbound, _)) => {
                tokio::spawn(relay(inbound, netns_name.clone(), upstream));
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connects to `upstream` from inside `netns_name`.
async fn connect_in(netns_name: String, upstream: SocketAddr) -> Result<TcpStream, Error> {
    let ns = netns_name.clone();
    let stream = tokio::task::spawn_blocking(move || {
        netns::run_in(&ns, move || {
            let s = std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        })
    })
    .await
    .map_err(|e| Error::Lab(format!("connecting inside {netns_name}: {e}")))??
    .map_err(|e| Error::Io(format!("connecting to {upstream} inside {netns_name}"), e))?;
    TcpStream::from_std(stream).map_err(|e| Error::Io("registering a relayed socket".into(), e))
}

async fn relay(mut inbound: TcpStream, netns_name: String, upstream: SocketAddr) {
    match connect_in(netns_name, upstream).await {
        Ok(mut outbound) => {
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            if let Err(e) = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
                tracing::debug!("relay ended: {e}");
            }
        }
        Err(e) => tracing::warn!("cannot reach the API server: {e}"),
    }
}
