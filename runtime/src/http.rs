//! The observability endpoint: Prometheus text on `/metrics`, `/healthz`
//! (liveness) and `/readyz` (readiness).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};

use crate::Health;

/// Failure to serve the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound.
    #[error("binding the metrics/health endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The server stopped with an error.
    #[error("serving the metrics/health endpoint: {0}")]
    Serve(#[source] std::io::Error),
}

#[derive(Clone)]
struct AppState {
    registry: Registry,
    health: Health,
}

/// The router, separate from binding so tests can call it directly.
pub fn router(registry: Registry, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { registry, health })
}

/// Binds `addr` and returns the bound address and a future that serves until dropped.
pub async fn bind(
    addr: SocketAddr,
    registry: Registry,
    health: Health,
) -> Result<(SocketAddr, impl Future<Output = Result<(), Error>>), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    let app = router(registry, health);
    Ok((bound, async move {
        axum::serve(listener, app).await.map_err(Error::Serve)
    }))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            buf,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}"),
        )
            .into_response(),
    }
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.is_live() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not live")
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let waiting = state.health.waiting_for();
    if waiting.is_empty() {
        (StatusCode::OK, "ok".to_string())
    } else {
        let mut body = format!("not ready: waiting for {}", waiting.join(", "));
        if let Some(reason) = state.health.not_ready_reason() {
            body.push_str("\nmain: ");
            body.push_str(&reason);
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::IntCounter;

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let registry = Registry::new();
        let c = IntCounter::new("canal_test_total", "a test counter").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc();
        let health = Health::new();
        let (addr, server) = bind("127.0.0.1:0".parse().unwrap(), registry, health.clone())
            .await
            .unwrap();
        tokio::spawn(server);

        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/metrics").await.contains("canal_test_total 1"));
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        health.set_ready(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let gate = health.gate("policy");
        let body = get("/readyz").await;
        assert!(body.starts_with("HTTP/1.1 503"), "{body}");
        assert!(body.ends_with("not ready: waiting for policy"), "{body}");
        gate.set(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        health.set_not_ready("mtu: setting MTU 65535: Invalid argument");
        let body = get("/readyz").await;
        assert!(body.starts_with("HTTP/1.1 503"), "{body}");
        assert!(
            body.ends_with(
                "not ready: waiting for main\nmain: mtu: setting MTU 65535: Invalid argument"
            ),
            "{body}"
        );
    }
}
