//! Real TLS handshakes over an in-memory pipe: the checks of both sides.

use std::sync::Arc;

use super::*;

struct Host {
    id: HostId,
    key: HostKey,
    cert: String,
    pin: String,
}

fn enroll(ca: &Ca) -> Host {
    let id = HostId::generate();
    let key = HostKey::generate().unwrap();
    let (cert, pin) = ca.sign_host_csr(&key.csr_pem, &id).unwrap();
    Host { id, key, cert, pin }
}

/// Handshake a client config against a server config; Ok when both accept, else
/// `Err((side that refused, its error))`.
async fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> std::result::Result<(), (&'static str, String)> {
    match exchange(client, server).await {
        (Ok(()), Ok(())) => Ok(()),
        // The side that found the other's certificate bad failed locally; the other
        // only got an alert.
        (_, Err(s)) if !s.contains("received fatal alert") => Err(("server", s)),
        (Err(c), _) => Err(("client", c)),
        (Ok(()), Err(s)) => Err(("server", s)),
    }
}

async fn exchange(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> (
    std::result::Result<(), String>,
    std::result::Result<(), String>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let srv = tokio::spawn(async move {
        let mut s = acceptor
            .accept(b)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf)
            .await
            .map_err(|e| format!("server: {e}"))?;
        s.write_all(b"ok")
            .await
            .map_err(|e| format!("server: {e}"))?;
        s.flush().await.map_err(|e| format!("server: {e}"))?;
        Ok::<_, String>(())
    });
    let name = ServerName::try_from("ignored.example").unwrap();
    let cli = async {
        let mut c = connector
            .connect(name, a)
            .await
            .map_err(|e| format!("client: {e}"))?;
        c.write_all(b"hi")
            .await
            .map_err(|e| format!("client: {e}"))?;
        c.flush().await.map_err(|e| format!("client: {e}"))?;
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf)
            .await
            .map_err(|e| format!("client: {e}"))?;
        Ok::<_, String>(())
    };
    let c = cli.await;
    let s = srv.await.unwrap();
    (c, s)
}

fn server_of(ca: &Ca, h: &Host) -> rustls::ServerConfig {
    agent_server_config(&ca.ca_cert_pem, &h.cert, &h.key.key_pem).unwrap()
}

#[tokio::test]
async fn enrolled_host_and_control_plane_accept_each_other() {
    let ca = Ca::generate().unwrap();
    let h = enroll(&ca);
    let client = ca.control_client_config(&h.id, &h.pin).unwrap();
    handshake(client, server_of(&ca, &h)).await.unwrap();
}

#[tokio::test]
async fn the_stored_bundle_round_trips() {
    let ca = Ca::from_bytes(&Ca::generate().unwrap().to_bytes()).unwrap();
    let h = enroll(&ca);
    let client = ca.control_client_config(&h.id, &h.pin).unwrap();
    handshake(client, server_of(&ca, &h)).await.unwrap();
}

#[tokio::test]
async fn agent_refuses_a_client_of_another_ca() {
    let ca = Ca::generate().unwrap();
    let foreign = Ca::generate().unwrap();
    let h = enroll(&ca);
    // The foreign control plane even trusts the right CA and pins the right cert.
    let client = control_client_config(
        &ca.ca_cert_pem,
        &foreign.control_cert_pem,
        &foreign.control_key_pem,
        &h.id,
        &h.pin,
    )
    .unwrap();
    let (side, err) = handshake(client, server_of(&ca, &h)).await.unwrap_err();
    assert_eq!(side, "server", "{err}");
}

#[tokio::test]
async fn agent_refuses_another_hosts_certificate_as_a_client() {
    let ca = Ca::generate().unwrap();
    let h = enroll(&ca);
    let other = enroll(&ca);
    // A host agent (same CA) trying to pose as the control plane.
    let client = control_client_config(
        &ca.ca_cert_pem,
        &other.cert,
        &other.key.key_pem,
        &h.id,
        &h.pin,
    )
    .unwrap();
    let (side, err) = handshake(client, server_of(&ca, &h)).await.unwrap_err();
    assert_eq!(side, "server", "{err}");
}

#[tokio::test]
async fn control_refuses_a_host_of_another_ca() {
    let ca = Ca::generate().unwrap();
    let foreign = Ca::generate().unwrap();
    let h = enroll(&ca);
    let impostor = enroll(&foreign);
    let client = ca.control_client_config(&h.id, &h.pin).unwrap();
    let server =
        agent_server_config(&ca.ca_cert_pem, &impostor.cert, &impostor.key.key_pem).unwrap();
    let (side, err) = handshake(client, server).await.unwrap_err();
    assert_eq!(side, "client", "{err}");
}

#[tokio::test]
async fn control_refuses_a_certificate_naming_another_host() {
    let ca = Ca::generate().unwrap();
    let h = enroll(&ca);
    let other = enroll(&ca);
    // Expect host h (and even pin the other's cert): the name check still fails.
    let client = ca.control_client_config(&h.id, &other.pin).unwrap();
    let (side, err) = handshake(client, server_of(&ca, &other)).await.unwrap_err();
    assert!(
        side == "client" && err.contains("not valid for name"),
        "{side}: {err}"
    );
}

#[tokio::test]
async fn control_refuses_a_replaced_or_revoked_certificate() {
    let ca = Ca::generate().unwrap();
    let h = enroll(&ca);
    // A second certificate for the same host ID (e.g. a stolen token used twice):
    // right CA, right name, not the pinned one.
    let key2 = HostKey::generate().unwrap();
    let (cert2, _) = ca.sign_host_csr(&key2.csr_pem, &h.id).unwrap();
    let client = ca.control_client_config(&h.id, &h.pin).unwrap();
    let server = agent_server_config(&ca.ca_cert_pem, &cert2, &key2.key_pem).unwrap();
    let (side, err) = handshake(client, server).await.unwrap_err();
    assert!(
        side == "client" && err.to_lowercase().contains("revoked"),
        "{side}: {err}"
    );
}

#[test]
fn a_garbage_csr_is_refused() {
    let ca = Ca::generate().unwrap();
    let id = HostId::generate();
    assert!(matches!(
        ca.sign_host_csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            &id
        ),
        Err(PkiError::BadCsr(_))
    ));
    assert!(ca
        .sign_host_csr(&"A".repeat(MAX_CSR_BYTES + 1), &id)
        .is_err());
}

#[test]
fn the_certificate_names_the_host_whatever_the_csr_asked() {
    let ca = Ca::generate().unwrap();
    let id = HostId::generate();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec![CONTROL_NAME.to_owned()]).unwrap();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let (cert, _) = ca.sign_host_csr(&csr, &id).unwrap();
    let der = &certs(&cert, "c").unwrap()[0];
    let parsed = ParsedCertificate::try_from(der).unwrap();
    let control = ServerName::try_from(CONTROL_NAME).unwrap();
    assert!(rustls::client::verify_server_name(&parsed, &control).is_err());
    let host = ServerName::try_from(host_dns_name(&id)).unwrap();
    rustls::client::verify_server_name(&parsed, &host).unwrap();
}
