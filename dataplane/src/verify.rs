//! Who a peer is: rustls' webpki verification of its chain against the trust bundle,
//! then its SPIFFE ID, the leaf's one URI SAN.
//!
//! Path validation (signatures, validity, key usage, path length) is webpki's, never
//! redone here. What webpki cannot do is name a mesh peer: its server-name check looks
//! at DNS names and addresses, and a sidecar is dialled by address while it is known by
//! its SPIFFE ID. So the server's name is not checked at all; its URI SAN must be the
//! ID the pool expects at that address. DNS SANs a leaf may carry are ignored.

use std::io;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::client::ResolvesClientCert;
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};
use x509_parser::extensions::GeneralName;

/// The SPIFFE ID `cert` names: its one URI SAN, which must be `spiffe://DOMAIN/PATH`.
/// The error completes "the certificate ...".
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert)
        .map_err(|_| "is not a valid X.509 certificate".to_owned())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| "has a malformed subjectAltName".to_owned())?;
    let mut uris = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) if is_spiffe(uri) => Ok(uri.to_owned()),
        (Some(uri), None) => Err(format!("names {uri:?}, which is not a SPIFFE ID")),
        (None, _) => Err("carries no URI SAN, so no SPIFFE ID".to_owned()),
        (Some(_), Some(_)) => Err("carries more than one URI SAN".to_owned()),
    }
}

/// A workload's ID: a trust domain and a path (the bare domain names no workload).
pub fn is_spiffe(uri: &str) -> bool {
    uri.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(domain, path)| !domain.is_empty() && !path.is_empty())
}

/// A refusal rustls sends as bad_certificate, whose text survives to the caller's status.
fn refuse(why: String) -> Error {
    let why = Arc::new(io::Error::other(why));
    Error::InvalidCertificate(CertificateError::Other(OtherError(why)))
}

/// The client side's check of a server: its chain, and that it is `peer`.
#[derive(Debug)]
pub struct ExpectPeer {
    roots: Arc<RootCertStore>,
    peer: Box<str>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ExpectPeer {
    pub fn new(roots: Arc<RootCertStore>, peer: &str, provider: &CryptoProvider) -> Self {
        ExpectPeer {
            roots,
            peer: peer.into(),
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for ExpectPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        let algorithms = self.algorithms.all;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            algorithms,
        )?;
        let found =
            spiffe_id(end_entity).map_err(|e| refuse(format!("the server's certificate {e}")))?;
        if *found != *self.peer {
            return Err(refuse(format!("the server is {found}, not {}", self.peer)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server side's check of a client: webpki's (a certificate is required), and a
/// SPIFFE ID in it, since the control plane is told who called.
#[derive(Debug)]
pub struct MeshClients(pub Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for MeshClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id(end_entity).map_err(|e| refuse(format!("the client's certificate {e}")))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The workload's one certificate, for either side of a handshake.
#[derive(Debug)]
pub struct Fixed(pub Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    fn cert(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("a test certificate")
    }

    #[test]
    fn the_spiffe_id_is_the_one_uri_san_whatever_dns_names_are_beside_it() {
        // A leaf as identity/ca.py issues it: the URI, and the same ID as a DNS name.
        let leaf = cert(include_str!("testdata/leaf.pem"));
        assert_eq!(
            spiffe_id(&leaf).as_deref(),
            Ok("spiffe://shoal.local/svc/worker")
        );
    }

    #[test]
    fn a_certificate_without_exactly_one_workload_id_names_nobody() {
        let cases = [
            (include_str!("testdata/dns_only.pem"), "carries no URI SAN"),
            (
                include_str!("testdata/two_uris.pem"),
                "more than one URI SAN",
            ),
            (include_str!("testdata/https_uri.pem"), "not a SPIFFE ID"),
            // A root names its trust domain, which is no workload.
            (include_str!("testdata/root.pem"), "not a SPIFFE ID"),
        ];
        for (pem, why) in cases {
            let err = spiffe_id(&cert(pem)).expect_err(why);
            assert!(err.contains(why), "{err:?} should say {why:?}");
        }
        assert!(spiffe_id(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01])).is_err());
    }

    #[test]
    fn only_an_id_with_a_domain_and_a_path_is_a_workloads() {
        assert!(is_spiffe("spiffe://shoal.local/registry"));
        assert!(is_spiffe("spiffe://shoal.local/svc/a"));
        for not in [
            "spiffe://shoal.local",
            "spiffe://shoal.local/",
            "spiffe:///svc/a",
            "https://x/y",
        ] {
            assert!(!is_spiffe(not), "{not}");
        }
    }
}
