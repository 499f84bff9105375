//! Certificates of the real-kubelet cluster, issued by the lab's CA
//! ([`crate::certs`]): the API server's serving certificate (also valid for
//! the control-plane address nodes and pods dial), its client certificate
//! towards kubelets, the controller-manager's, the scheduler's, kube-proxy's,
//! and one kubelet client certificate per node (`system:node:<node>` in
//! `system:nodes`, what the Node authorizer and NodeRestriction expect).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose,
};

use crate::Error;
use crate::certs::{self, Pki};

/// A certificate and its key on disk.
#[derive(Debug, Clone)]
pub struct KeyPairFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM key.
    pub key: PathBuf,
}

impl KeyPairFiles {
    fn at(dir: &Path, name: &str) -> KeyPairFiles {
        KeyPairFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// The PKI of one real-kubelet lab.
#[derive(Debug, Clone)]
pub struct ClusterPki {
    /// The base PKI (CA, admin, service-account keys).
    pub base: Pki,
    /// The API server's serving certificate.
    pub apiserver: KeyPairFiles,
    /// The API server's client certificate towards kubelets.
    pub apiserver_kubelet_client: KeyPairFiles,
    /// kube-controller-manager.
    pub controller_manager: KeyPairFiles,
    /// kube-scheduler.
    pub scheduler: KeyPairFiles,
    /// kube-proxy (one identity for every node, as kubeadm's).
    pub kube_proxy: KeyPairFiles,
    dir: PathBuf,
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|e| Error::Io(format!("writing {}", path.display()), e))
}

fn issue(
    issuer: &rcgen::Issuer<'_, KeyPair>,
    files: &KeyPairFiles,
    user: &str,
    group: Option<&str>,
) -> Result<(), Error> {
    let (cert, key) = certs::client_cert(issuer, user, group)?;
    write(&files.cert, &cert)?;
    write(&files.key, &key)
}

impl ClusterPki {
    /// Generates the whole PKI into `dir`; the serving certificate covers
    /// `api_address`.
    pub fn generate(dir: &Path, api_address: Ipv4Addr) -> Result<ClusterPki, Error> {
        let base = certs::generate(dir)?;
        let pki = ClusterPki::at(dir, base);
        let issuer = certs::load_issuer(&pki.base)?;

        let key = KeyPair::generate()
            .map_err(|e| Error::Certificates(format!("generating the API server key: {e}")))?;
        let mut params = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            api_address.to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
            // The `kubernetes` Service's ClusterIP (first of SERVICE_CIDR).
            "10.96.0.1".to_string(),
        ])
        .map_err(|e| Error::Certificates(format!("API server names: {e}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "kube-apiserver");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| Error::Certificates(format!("signing the API server certificate: {e}")))?;
        write(&pki.apiserver.cert, &cert.pem())?;
        write(&pki.apiserver.key, &key.serialize_pem())?;

        // kubeadm's identity for the API server's kubelet client.
        issue(
            &issuer,
            &pki.apiserver_kubelet_client,
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
        )?;
        issue(
            &issuer,
            &pki.controller_manager,
            "system:kube-controller-manager",
            None,
        )?;
        issue(&issuer, &pki.scheduler, "system:kube-scheduler", None)?;
        issue(&issuer, &pki.kube_proxy, "system:kube-proxy", None)?;
        Ok(pki)
    }

    /// The layout in `dir` (after [`ClusterPki::generate`]).
    pub fn at(dir: &Path, base: Pki) -> ClusterPki {
        ClusterPki {
            base,
            apiserver: KeyPairFiles::at(dir, "apiserver-real"),
            apiserver_kubelet_client: KeyPairFiles::at(dir, "apiserver-kubelet-client"),
            controller_manager: KeyPairFiles::at(dir, "controller-manager"),
            scheduler: KeyPairFiles::at(dir, "scheduler"),
            kube_proxy: KeyPairFiles::at(dir, "kube-proxy"),
            dir: dir.to_path_buf(),
        }
    }

    /// Opens the PKI written earlier in `dir`.
    pub fn open(dir: &Path) -> ClusterPki {
        ClusterPki::at(dir, Pki::at(dir))
    }

    /// Issues (or returns) the kubelet client certificate of `node`.
    pub fn kubelet(&self, node: &str) -> Result<KeyPairFiles, Error> {
        let files = KeyPairFiles::at(&self.dir, &format!("kubelet-{node}"));
        if !files.cert.exists() {
            let issuer = certs::load_issuer(&self.base)?;
            issue(
                &issuer,
                &files,
                &format!("system:node:{node}"),
                Some("system:nodes"),
            )?;
        }
        Ok(files)
    }
}
