//! What every canal binary shares: logging setup, the HTTP endpoint that
//! serves `/metrics`, `/healthz` and `/readyz`, and building a kube client.

pub mod health;
pub mod http;
pub mod kube_client;
pub mod logging;
pub mod metrics;

pub use health::Health;
