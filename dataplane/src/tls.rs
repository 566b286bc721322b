//! Mutual TLS between sidecars: each side proves its SPIFFE ID (its leaf certificate's
//! URI SAN) with a chain to the mesh's trust bundle.
//!
//! It lives in the data plane because every byte of a call passes through here; the
//! Python side gets and renews the certificates and hands them over as PEM
//! (`set_identity`). The identity is one immutable value, swapped whole behind a lock
//! that a handshake reads once: a swap applies to the next connection and leaves open
//! ones alone, and no call ever touches it.
//!
//! TLS 1.3 and ALPN h2 only, and no session resumption: connections are long-lived and
//! pooled, so resumption would save little, while without it every connection's peer
//! is checked against the bundle current when it opened, never waved through on a
//! ticket issued under an older one.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use rustls::client::Resumption;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use crate::verify::{spiffe_id, ExpectPeer, Fixed, MeshClients};

const H2: &[u8] = b"h2";

/// The one crypto provider: ring, TLS 1.3 suites only (the crate is built without 1.2).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(ring::default_provider()))
        .clone()
}

/// A workload's certificate and key, the roots it trusts, and the server side's config
/// made from them (made once per identity: the server side's is the same for every peer).
pub struct Identity {
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    server: Arc<ServerConfig>,
}

impl Identity {
    /// An identity from PEM: the leaf then its issuers, a PKCS#8 (or SEC1) key, and the
    /// bundle's roots. The error is one line for the caller.
    pub fn from_pem(chain: &[u8], key: &[u8], bundle: &[u8]) -> Result<Self, String> {
        let chain = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the certificate chain is not valid PEM: {e}"))?;
        let Some(leaf) = chain.first() else {
            return Err("the certificate chain holds no certificate".into());
        };
        spiffe_id(leaf).map_err(|e| format!("the leaf certificate {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| format!("the key is not a PEM private key: {e}"))?;
        let provider = provider();
        let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                "the key does not match the leaf certificate".into()
            }
            other => format!("the key or certificate is not usable: {other}"),
        })?;
        // `from_der` lets "cannot tell" pass; a key that cannot be checked is refused here.
        key.keys_match()
            .map_err(|_| "the key does not match the leaf certificate".to_owned())?;
        let key = Arc::new(key);
        let roots = roots_from_pem(bundle)?;
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("the trust bundle is not usable: {e}"))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(MeshClients(clients)))
            .with_cert_resolver(Arc::new(Fixed(key.clone())));
        server.alpn_protocols = vec![H2.to_vec()];
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(Identity {
            key,
            roots,
            server: Arc::new(server),
        })
    }
}

/// The roots of a PEM trust bundle; at least one.
fn roots_from_pem(bundle: &[u8]) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(bundle) {
        let root = root.map_err(|e| format!("the trust bundle is not valid PEM: {e}"))?;
        roots
            .add(root)
            .map_err(|e| format!("the trust bundle holds a bad certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the trust bundle holds no certificate".into());
    }
    Ok(Arc::new(roots))
}

/// The client side's config for a server that must be `peer`, presenting `key` (none
/// before the first certificate): made per connection, since the peer it expects is
/// part of it (a handshake costs far more anyway).
fn client_config(
    roots: Arc<RootCertStore>,
    key: Option<Arc<CertifiedKey>>,
    peer: &str,
) -> ClientConfig {
    let expect = ExpectPeer::new(roots, peer, &provider());
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider does TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(expect));
    let mut config = match key {
        Some(key) => builder.with_client_cert_resolver(Arc::new(Fixed(key))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![H2.to_vec()];
    config.resumption = Resumption::disabled();
    config
}

pub type ServerStream = server::TlsStream<TcpStream>;
pub type ClientStream = client::TlsStream<TcpStream>;

/// The current identity and the handshake counts, shared by both sides.
#[derive(Default)]
pub struct Tls {
    identity: RwLock<Option<Arc<Identity>>>,
    /// Roots to check servers by before there is an identity: a workload's first call
    /// is the one that asks for its certificate, so it has none to show.
    bootstrap: RwLock<Option<Arc<RootCertStore>>>,
    handshakes: AtomicU64,
    failures: AtomicU64,
}

impl Tls {
    pub fn install(&self, identity: Identity) {
        *self.identity.write().unwrap() = Some(Arc::new(identity));
    }

    /// Trust `bundle` for connections made before the first identity is installed.
    pub fn trust(&self, bundle: &[u8]) -> Result<(), String> {
        *self.bootstrap.write().unwrap() = Some(roots_from_pem(bundle)?);
        Ok(())
    }

    /// Whether connections can be made: with an identity, or a bundle to bootstrap by.
    pub fn ready(&self) -> bool {
        self.identity.read().unwrap().is_some() || self.bootstrap.read().unwrap().is_some()
    }

    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn current(&self) -> Result<Arc<Identity>, String> {
        let identity = self.identity.read().unwrap().clone();
        identity.ok_or_else(|| "the sidecar has no mesh identity yet".into())
    }

    fn count<T>(&self, outcome: Result<T, String>) -> Result<T, String> {
        let counter = match outcome {
            Ok(_) => &self.handshakes,
            Err(_) => &self.failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        outcome
    }

    /// The server side's handshake, done by `deadline`: the stream and the client's
    /// SPIFFE ID (parsed here, once per connection).
    pub async fn accept(
        &self,
        stream: TcpStream,
        deadline: Instant,
    ) -> Result<(ServerStream, Arc<str>), String> {
        let outcome = async {
            let acceptor = TlsAcceptor::from(self.current()?.server.clone());
            let tls = timeout_at(deadline, acceptor.accept(stream))
                .await
                .map_err(|_| "no TLS handshake in time".to_owned())?
                .map_err(|e| format!("TLS handshake failed: {}", describe(&e)))?;
            let (_, connection) = tls.get_ref();
            // A client that named no protocol would otherwise be served h2 unasked.
            if connection.alpn_protocol() != Some(H2) {
                return Err("the client did not ask for h2 (ALPN)".into());
            }
            let leaf = connection.peer_certificates().and_then(|c| c.first());
            let peer = spiffe_id(leaf.ok_or("the client sent no certificate")?)?;
            Ok((tls, peer.into()))
        };
        self.count(outcome.await)
    }

    /// The client side's handshake with `host`, whose server must prove it is `peer`.
    pub async fn connect(
        &self,
        stream: TcpStream,
        host: &str,
        peer: &str,
        limit: Duration,
    ) -> Result<ClientStream, String> {
        let outcome = async {
            let config = match self.identity.read().unwrap().clone() {
                Some(identity) => {
                    client_config(identity.roots.clone(), Some(identity.key.clone()), peer)
                }
                None => {
                    let roots = self.bootstrap.read().unwrap().clone();
                    client_config(
                        roots.ok_or("the sidecar has no mesh identity yet")?,
                        None,
                        peer,
                    )
                }
            };
            let connector = TlsConnector::from(Arc::new(config));
            // The name is only for SNI (none for an address): the verifier ignores it.
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|_| format!("{host:?} is not a host name TLS can use"))?;
            tokio::time::timeout(limit, connector.connect(name, stream))
                .await
                .map_err(|_| format!("the TLS handshake timed out after {}s", limit.as_secs()))?
                .map_err(|e| format!("TLS handshake failed: {}", describe(&e)))
        };
        self.count(outcome.await)
    }
}

/// A failed handshake in words: rustls' own, or our verifier's message as it was written.
fn describe(err: &io::Error) -> String {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            other.to_string()
        }
        Some(rustls) => rustls.to_string(),
        None => err.to_string(),
    }
}
