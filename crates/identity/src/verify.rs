//! Certificate verifiers that add Ferry's identity check to webpki's: the
//! chain to the fleet CA first (webpki), then the `ferry://` URI. Checking
//! the URI inside the handshake, not after it, makes a refusal a TLS alert
//! the other side sees, and holds for every user of the configurations
//! (the blocking stream and the agent's HTTP client alike).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::identity::VerifierError;
use crate::peer::{PeerError, PeerIdentity, Role};

fn no_identity(e: PeerError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The client's check of the server: webpki against the fleet CA with the
/// expected host as the DNS name, then the certificate's URI must be
/// `ferry://host/<that name>` (a certificate may carry extra DNS names, but
/// only one identity).
#[derive(Debug)]
pub(crate) struct FerryServerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
}

impl FerryServerVerifier {
    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<Self>, VerifierError> {
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(VerifierError::Build)?;
        Ok(Arc::new(FerryServerVerifier { webpki }))
    }
}

impl ServerCertVerifier for FerryServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let identity = PeerIdentity::from_certificate(end_entity).map_err(no_identity)?;
        let expected = match server_name {
            ServerName::DnsName(name) => name.as_ref().to_string(),
            other => other.to_str().into_owned(),
        };
        if !identity.is_host(&expected) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForNameContext {
                    expected: server_name.to_owned(),
                    presented: vec![identity.to_string()],
                },
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The server's check of the client: webpki against the fleet CA (a
/// certificate is mandatory), then a well-formed `ferry://` URI.
#[derive(Debug)]
pub(crate) struct FerryClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
}

impl FerryClientVerifier {
    pub(crate) fn new(webpki: Arc<dyn ClientCertVerifier>) -> Arc<Self> {
        Arc::new(FerryClientVerifier { webpki })
    }
}

impl ClientCertVerifier for FerryClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity = PeerIdentity::from_certificate(end_entity).map_err(no_identity)?;
        // Roles are only host and operator, both of which may be clients.
        debug_assert!(matches!(identity.role, Role::Host | Role::Operator));
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{client_verifier, provider};

    /// A certificate our CA signed but that states no ferry:// identity
    /// (not made by `ferry ca issue`) is refused by both verifiers.
    #[test]
    fn a_certificate_without_a_ferry_uri_is_refused() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut params = rcgen::CertificateParams::new(vec!["hostB".to_string()]).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();

        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let client_side = FerryServerVerifier::new(Arc::new(roots), provider()).unwrap();
        let err = client_side
            .verify_server_cert(
                cert.der(),
                &[],
                &ServerName::try_from("hostB").unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        let is_no_uri = |err: &rustls::Error| {
            matches!(err, rustls::Error::InvalidCertificate(CertificateError::Other(o))
                if matches!(o.0.downcast_ref::<PeerError>(), Some(PeerError::NoFerryUri)))
        };
        assert!(is_no_uri(&err), "{err}");

        let server_side =
            FerryClientVerifier::new(client_verifier(ca_cert.der(), provider()).unwrap());
        let err = server_side
            .verify_client_cert(cert.der(), &[], UnixTime::now())
            .unwrap_err();
        assert!(is_no_uri(&err), "{err}");
    }
}
