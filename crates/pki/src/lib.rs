//! `hearth_pki`: the deployment's certificate authority and the mutual-TLS configs
//! of the control plane <-> host agent hop.
//!
//! - [`Ca`]: made once per deployment (the control plane keeps it in the database, so
//!   replicas share it); signs each host agent's CSR at enrollment and the control
//!   plane's own client certificate.
//! - A host certificate names its host ID as DNS SAN `<host-id>.hosts.hearth` and is
//!   good for server auth only; the control plane's names [`CONTROL_NAME`] and is good
//!   for client auth only, so neither can stand in for the other.
//! - [`agent_server_config`]: the agent's listener; it requires a client certificate
//!   issued by the CA that names [`CONTROL_NAME`].
//! - [`control_client_config`]: the control plane's client of one host; it checks that
//!   the agent's certificate chains to the CA, names the expected host ID, and is the
//!   very certificate recorded at enrollment (its SHA-256 fingerprint), so a revoked or
//!   re-issued certificate is refused.
//!
//! This crate holds no state and does no I/O.

use std::sync::Arc;

use hearth_types::HostId;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as TlsName, RootCertStore, SignatureScheme};

/// The name in the control plane's client certificate (DNS SAN).
pub const CONTROL_NAME: &str = "control.hearth";
/// Largest CSR accepted at enrollment (a P-256 CSR is ~500 bytes).
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// A failure to make, parse or use a certificate or key.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed")]
    Gen(#[source] rcgen::Error),
    #[error("the certificate signing request is invalid")]
    BadCsr(#[source] rcgen::Error),
    #[error("{what} is not valid PEM")]
    BadPem { what: &'static str },
    #[error("building the TLS config failed")]
    Tls(#[source] rustls::Error),
    #[error("building the certificate verifier failed")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("stored CA bundle is invalid")]
    BadBundle(#[source] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, PkiError>;

/// The DNS name a host's certificate carries for host `id`.
pub fn host_dns_name(id: &HostId) -> String {
    format!("{id}.hosts.hearth")
}

/// SHA-256 of a certificate's DER, hex: what the control plane pins per host.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

/// The deployment CA plus the control plane's client certificate, as stored (PEM).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Ca {
    pub ca_cert_pem: String,
    ca_key_pem: String,
    pub control_cert_pem: String,
    control_key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "hearth");
    d.push(DnType::CommonName, common_name);
    d
}

fn dns(name: &str) -> Result<SanType> {
    Ok(SanType::DnsName(
        name.to_owned().try_into().map_err(PkiError::Gen)?,
    ))
}

impl Ca {
    /// A new CA (P-256) and a control-plane client certificate signed by it.
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate().map_err(PkiError::Gen)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("hearth deployment CA");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(PkiError::Gen)?;
        let issuer = Issuer::new(params, &key);

        let control_key = KeyPair::generate().map_err(PkiError::Gen)?;
        let mut cp = CertificateParams::default();
        cp.distinguished_name = dn("hearth control plane");
        cp.subject_alt_names = vec![dns(CONTROL_NAME)?];
        cp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let control = cp.signed_by(&control_key, &issuer).map_err(PkiError::Gen)?;
        Ok(Self {
            ca_cert_pem: cert.pem(),
            ca_key_pem: key.serialize_pem(),
            control_cert_pem: control.pem(),
            control_key_pem: control_key.serialize_pem(),
        })
    }

    /// The control plane's client key (PEM), e.g. for a test that connects to an agent
    /// as the control plane would.
    pub fn control_key_pem(&self) -> &str {
        &self.control_key_pem
    }

    /// The stored form (JSON of the four PEMs).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(PkiError::BadBundle)
    }

    /// Sign a host agent's CSR: only its public key is taken; the certificate names
    /// `host` (whatever the CSR asked for) and is good for server auth only.
    /// Returns the certificate PEM and its fingerprint.
    pub fn sign_host_csr(&self, csr_pem: &str, host: &HostId) -> Result<(String, String)> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(PkiError::BadCsr(
                rcgen::Error::CouldNotParseCertificationRequest,
            ));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        let key = KeyPair::from_pem(&self.ca_key_pem).map_err(PkiError::Gen)?;
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, &key).map_err(PkiError::Gen)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(host.as_str());
        params.subject_alt_names = vec![dns(&host_dns_name(host))?];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let mut serial = [0u8; 16];
        rand_fill(&mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(&csr.public_key, &issuer)
            .map_err(PkiError::Gen)?;
        Ok((cert.pem(), fingerprint(cert.der())))
    }

    /// The control plane's TLS client config for the host `host` whose certificate
    /// has fingerprint `pin`.
    pub fn control_client_config(&self, host: &HostId, pin: &str) -> Result<rustls::ClientConfig> {
        control_client_config(
            &self.ca_cert_pem,
            &self.control_cert_pem,
            &self.control_key_pem,
            host,
            pin,
        )
    }
}

/// Fill `buf` from the OS's random source (through ring, already a dependency).
fn rand_fill(buf: &mut [u8]) {
    use rustls::crypto::ring::default_provider;
    let _ = default_provider().secure_random.fill(buf);
}

/// A host agent's new key pair and the CSR to send with its enrollment token.
pub struct HostKey {
    pub key_pem: String,
    pub csr_pem: String,
}

impl HostKey {
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate().map_err(PkiError::Gen)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("hearth host agent");
        let csr = params.serialize_request(&key).map_err(PkiError::Gen)?;
        Ok(Self {
            key_pem: key.serialize_pem(),
            csr_pem: csr.pem().map_err(PkiError::Gen)?,
        })
    }
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| PkiError::BadPem { what })?;
    if certs.is_empty() {
        return Err(PkiError::BadPem { what });
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::BadPem {
        what: "the private key",
    })
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "the CA certificate")? {
        roots.add(c).map_err(PkiError::Tls)?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks the fingerprint of a certificate the caller expects (leaf only).
pub fn cert_fingerprint_pem(pem: &str) -> Result<String> {
    let c = certs(pem, "the certificate")?;
    Ok(fingerprint(&c[0]))
}

/// The host agent's listener: presents the agent's certificate; accepts only
/// clients with a certificate from `ca_pem` naming [`CONTROL_NAME`].
pub fn agent_server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ServerConfig> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .build()
        .map_err(PkiError::Verifier)?;
    let verifier = Arc::new(ControlOnly { inner });
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(PkiError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "the agent certificate")?, key(key_pem)?)
        .map_err(PkiError::Tls)
}

/// The control plane's client of host `host`: presents the control certificate;
/// accepts only the agent certificate whose fingerprint is `pin`, issued by
/// `ca_pem`, naming `host`.
pub fn control_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    host: &HostId,
    pin: &str,
) -> Result<rustls::ClientConfig> {
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider())
            .build()
            .map_err(PkiError::Verifier)?;
    let name = ServerName::try_from(host_dns_name(host)).map_err(|_| PkiError::BadPem {
        what: "the host name",
    })?;
    let verifier = Arc::new(PinnedHost {
        inner,
        name,
        pin: pin.to_owned(),
    });
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(PkiError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs(cert_pem, "the control certificate")?, key(key_pem)?)
        .map_err(PkiError::Tls)
}

/// A client verifier that also requires the control plane's name.
#[derive(Debug)]
struct ControlOnly {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ControlOnly {
    fn root_hint_subjects(&self) -> &[TlsName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let name = ServerName::try_from(CONTROL_NAME)
            .map_err(|_| rustls::Error::General("control name".into()))?;
        rustls::client::verify_server_name(&parsed, &name)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server verifier that checks the host's name (not the URL's) and its pin.
#[derive(Debug)]
struct PinnedHost {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
    pin: String,
}

impl ServerCertVerifier for PinnedHost {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            &self.name,
            ocsp_response,
            now,
        )?;
        if fingerprint(end_entity) != self.pin {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests;
