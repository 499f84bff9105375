//! A throwaway PKI for one control plane: a CA, the API server's serving
//! certificate, an admin client certificate (group system:masters) and the
//! service-account signing key pair.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::Error;

/// Paths of the files [`generate`] writes.
#[derive(Debug, Clone)]
pub struct Pki {
    /// CA certificate (trusted by clients and used to verify client certificates).
    pub ca_cert: PathBuf,
    /// CA key, kept so more client certificates can be issued.
    pub ca_key: PathBuf,
    /// API server serving certificate.
    pub server_cert: PathBuf,
    /// API server serving key.
    pub server_key: PathBuf,
    /// Admin client certificate.
    pub admin_cert: PathBuf,
    /// Admin client key.
    pub admin_key: PathBuf,
    /// Service-account token signing key.
    pub sa_key: PathBuf,
    /// Service-account token verification key.
    pub sa_pub: PathBuf,
}

impl Pki {
    /// The file layout under `dir`.
    pub fn at(dir: &Path) -> Pki {
        Pki {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("apiserver.crt"),
            server_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
        }
    }
}

fn cert_err(what: &str, e: rcgen::Error) -> Error {
    Error::Certificates(format!("{what}: {e}"))
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|e| Error::Io(format!("writing {}", path.display()), e))
}

/// Generates a fresh PKI into `dir`.
pub fn generate(dir: &Path) -> Result<Pki, Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Io(format!("creating {}", dir.display()), e))?;
    let pki = Pki::at(dir);

    let ca_key = KeyPair::generate().map_err(|e| cert_err("generating the CA key", e))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn("canal-lab-ca", None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| cert_err("signing the CA", e))?;
    write(&pki.ca_cert, &ca_cert.pem())?;
    write(&pki.ca_key, &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().map_err(|e| cert_err("generating the server key", e))?;
    let mut server_params = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "10.96.0.1".to_string(),
    ])
    .map_err(|e| cert_err("server certificate names", e))?;
    server_params.distinguished_name = dn("kube-apiserver", None);
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .map_err(|e| cert_err("signing the server certificate", e))?;
    write(&pki.server_cert, &server_cert.pem())?;
    write(&pki.server_key, &server_key.serialize_pem())?;

    let (admin_cert, admin_key) = client_cert(&issuer, "canal-admin", Some("system:masters"))?;
    write(&pki.admin_cert, &admin_cert)?;
    write(&pki.admin_key, &admin_key)?;

    let sa_key =
        KeyPair::generate().map_err(|e| cert_err("generating the service-account key", e))?;
    write(&pki.sa_key, &sa_key.serialize_pem())?;
    write(&pki.sa_pub, &sa_key.public_key_pem())?;
    Ok(pki)
}

/// Issues a client certificate for `user` (in `group`), returning (cert PEM, key PEM).
pub fn client_cert(
    issuer: &Issuer<'_, KeyPair>,
    user: &str,
    group: Option<&str>,
) -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(|e| cert_err("generating a client key", e))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(user, group);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|e| cert_err("signing a client certificate", e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Loads the CA of an existing PKI to issue more client certificates.
pub fn load_issuer(pki: &Pki) -> Result<Issuer<'static, KeyPair>, Error> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| Error::Io(format!("reading {}", p.display()), e))
    };
    let key =
        KeyPair::from_pem(&read(&pki.ca_key)?).map_err(|e| cert_err("parsing the CA key", e))?;
    Issuer::from_ca_cert_pem(&read(&pki.ca_cert)?, key)
        .map_err(|e| cert_err("parsing the CA certificate", e))
}

fn dn(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}
