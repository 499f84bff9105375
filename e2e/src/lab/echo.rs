//! The echo server every lab pod (and the internet host) runs: TCP and UDP
//! on the pod's ports, speaking [`crate::lab::protocol`]. Started as the
//! hidden `canal-lab __echo` inside the pod's namespace.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::Error;
use crate::lab::protocol::{self, Answer, Protocol};

/// How long a TCP client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line accepted.
const MAX_REQUEST: u64 = 512;

/// Binds every port on every address of `binds` (a pod's IPv4 and IPv6
/// addresses), then creates `ready_file` (so the lab knows the pod
/// serves), then serves until killed.
///
/// A host with several addresses must bind the one clients use: a UDP
/// socket bound to 0.0.0.0 answers from the address of the outgoing route,
/// which a client's connected socket (and a masquerading node's conntrack
/// entry) does not accept as the reply.
pub async fn serve(
    binds: &[IpAddr],
    ports: &[(u16, Protocol)],
    ready_file: Option<PathBuf>,
) -> Result<(), Error> {
    let mut tasks = tokio::task::JoinSet::new();
    for (&(port, protocol), &bind) in ports.iter().flat_map(|p| binds.iter().map(move |b| (p, b))) {
        let addr = SocketAddr::new(bind, port);
        match protocol {
            Protocol::Tcp => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::Io(format!("binding TCP {addr}"), e))?;
                tasks.spawn(serve_tcp(listener));
            }
            Protocol::Udp => {
                let socket = UdpSocket::bind(addr)
                    .await
                    .map_err(|e| Error::Io(format!("binding UDP {addr}"), e))?;
                tasks.spawn(serve_udp(socket));
            }
            // Declared on the Pod only: this kernel has no SCTP sockets.
            Protocol::Sctp => {}
        }
    }
    if let Some(file) = ready_file {
        std::fs::write(&file, b"ready\n")
            .map_err(|e| Error::Io(format!("writing {}", file.display()), e))?;
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            return Err(e);
        }
    }
    Ok(())
}

async fn serve_tcp(listener: TcpListener) -> Result<(), Error> {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(async move {
                    if let Err(e) = tcp_connection(stream, peer).await {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                });
            }
            // Out of descriptors and the like: keep serving the others.
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn tcp_connection(stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    let n = tokio::time::timeout(
        REQUEST_TIMEOUT,
        (&mut reader).take(MAX_REQUEST).read_line(&mut line),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    if n == 0 {
        return Ok(());
    }
    match protocol::answer(&line, peer, true) {
        Answer::Reply(reply) => {
            write.write_all(format!("{reply}\n").as_bytes()).await?;
            write.shutdown().await
        }
        Answer::Stream(reply) => {
            write.write_all(format!("{reply}\n").as_bytes()).await?;
            // Bytes already buffered after the request line go back first.
            let buffered = reader.buffer().to_vec();
            reader.consume(buffered.len());
            write.write_all(&buffered).await?;
            tokio::io::copy(&mut reader, &mut write).await?;
            write.shutdown().await
        }
        Answer::Echo | Answer::Close => Ok(()),
    }
}

async fn serve_udp(socket: UdpSocket) -> Result<(), Error> {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            // ICMP errors for earlier replies surface here; keep serving.
            Err(e) => {
                tracing::debug!("recv failed: {e}");
                continue;
            }
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        let reply = match protocol::answer(&text, peer, false) {
            Answer::Reply(reply) => reply.into_bytes(),
            Answer::Echo => buf[..n].to_vec(),
            Answer::Stream(_) | Answer::Close => continue,
        };
        if let Err(e) = socket.send_to(&reply, peer).await {
            tracing::debug!(%peer, "reply failed: {e}");
        }
    }
}
