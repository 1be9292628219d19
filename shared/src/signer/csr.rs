//! Certificate signing requests: built by the proxies, checked by the signer.

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
};

use crate::identity::Identity;

/// Why a request cannot be built or is refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// Not PEM, not PKCS#10, a bad self-signature or an extension we do not sign.
    #[error("malformed certificate signing request: {0}")]
    Malformed(String),
    /// The request's names are not exactly the requested identity.
    #[error("the request's subject alternative names {found:?} are not exactly [{wanted}]")]
    NamesMismatch {
        /// The identity asked for.
        wanted: String,
        /// What the request names.
        found: Vec<String>,
    },
    /// Generating a key or a request failed.
    #[error("building a certificate signing request: {0}")]
    Build(#[from] rcgen::Error),
}

/// A fresh P-256 key pair and a PEM request for `identity` (one URI SAN).
pub fn build(identity: &Identity) -> Result<(KeyPair, String), CsrError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let uri = identity
        .to_string()
        .try_into()
        .map_err(|_| CsrError::Malformed(format!("{identity} is not an IA5 string")))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let pem = params.serialize_request(&key)?.pem()?;
    Ok((key, pem))
}

/// Parses `pem`, verifies its self-signature and that its only SAN is `identity` as a URI.
pub fn check(pem: &str, identity: &Identity) -> Result<CertificateSigningRequestParams, CsrError> {
    let request = CertificateSigningRequestParams::from_pem(pem)
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    let found: Vec<String> = request
        .params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            SanType::URI(uri) => uri.as_str().to_string(),
            SanType::DnsName(name) => format!("DNS:{}", name.as_str()),
            SanType::IpAddress(ip) => format!("IP:{ip}"),
            SanType::Rfc822Name(mail) => format!("email:{}", mail.as_str()),
            other => format!("{other:?}"),
        })
        .collect();
    let wanted = identity.to_string();
    if found.len() != 1 || found[0] != wanted {
        return Err(CsrError::NamesMismatch { wanted, found });
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        s.parse().expect("identity")
    }

    #[test]
    fn a_built_request_passes_for_its_identity_only() {
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let (_key, pem) = build(&web).expect("build");
        check(&pem, &web).expect("matches");
        let err = check(&pem, &id("spiffe://cluster.local/ns/shop/sa/db")).expect_err("mismatch");
        assert!(matches!(err, CsrError::NamesMismatch { .. }), "{err}");
    }

    #[test]
    fn extra_names_and_garbage_are_refused() {
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(web.to_string().try_into().expect("uri")),
            SanType::DnsName("evil.example".try_into().expect("dns")),
        ];
        let pem = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        assert!(
            matches!(check(&pem, &web), Err(CsrError::NamesMismatch { found, .. }) if found.len() == 2)
        );

        assert!(matches!(
            check("not a csr", &web),
            Err(CsrError::Malformed(_))
        ));
        // A valid PEM envelope around bytes that are not a request.
        let junk = pem::encode(&pem::Pem::new(
            "CERTIFICATE REQUEST",
            vec![0x30, 0x03, 1, 2, 3],
        ));
        assert!(matches!(check(&junk, &web), Err(CsrError::Malformed(_))));
    }

    #[test]
    fn a_tampered_request_fails_its_signature() {
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let (_key, pem) = build(&web).expect("build");
        let mut der = pem::parse(&pem).expect("pem").into_contents();
        // Flip a byte inside the URI SAN text: parseable, but the signature no longer holds.
        let pos = der
            .windows(4)
            .position(|w| w == b"shop")
            .expect("identity bytes in the request");
        der[pos] = b'x';
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let err = check(&tampered, &id("spiffe://cluster.local/ns/xhop/sa/web"))
            .expect_err("bad signature");
        assert!(matches!(err, CsrError::Malformed(_)), "{err}");
    }
}
