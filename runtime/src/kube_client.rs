//! Building a kube client and proving the API server answers, with errors
//! that say which server could not be reached and why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The API server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable configuration.
    #[error("loading Kubernetes client configuration{}: {message}", from.as_ref().map(|p| format!(" from {}", p.display())).unwrap_or_default())]
    Config {
        from: Option<PathBuf>,
        message: String,
    },
    /// The API server did not answer.
    #[error("cannot reach the Kubernetes API server at {server}: {source}")]
    Unreachable {
        server: String,
        #[source]
        source: kube::Error,
    },
    /// The API server did not answer in time.
    #[error("the Kubernetes API server at {server} did not answer within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
}

/// Loads the client configuration: `kubeconfig` when given, else the usual
/// inference (in-cluster service account, then `$KUBECONFIG`/`~/.kube/config`).
pub async fn config(kubeconfig: Option<&Path>) -> Result<Config, Error> {
    match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| Error::Config {
                from: Some(path.to_path_buf()),
                message: e.to_string(),
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Config {
                    from: Some(path.to_path_buf()),
                    message: e.to_string(),
                })
        }
        None => Config::infer().await.map_err(|e| Error::Config {
            from: None,
            message: e.to_string(),
        }),
    }
}

/// Builds a client and checks that the API server answers within `timeout`.
pub async fn connect(kubeconfig: Option<&Path>, timeout: Duration) -> Result<Client, Error> {
    let config = config(kubeconfig).await?;
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| Error::Config {
        from: kubeconfig.map(Path::to_path_buf),
        message: e.to_string(),
    })?;
    match tokio::time::timeout(timeout, client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(source)) => Err(Error::Unreachable { server, source }),
        Err(_) => Err(Error::Timeout { server, timeout }),
    }
}
