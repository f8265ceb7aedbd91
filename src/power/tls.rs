//! The HTTPS client the API backends share (README "Power backends"): it
//! trusts exactly one certificate, by its SHA-256 fingerprint, or the CAs
//! of one file, and nothing else; plain `http://` only to a loopback
//! address. Every request is bounded in time and in the size of its answer.
//!
//! Retries are deliberately narrow: a GET whose connection was reset is sent
//! once more (it changes nothing), a POST never is (a reset that arrived
//! after the BMC acted would otherwise power-cycle a machine twice).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};

use super::backend_types::BackendError;

/// The largest answer read from a backend; forensics are bounded further
/// by the backends themselves.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// A certificate's SHA-256 fingerprint, as `openssl x509 -fingerprint
/// -sha256` and Proxmox's GUI print it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

/// The digest as the targets file gives it, already checked.
impl From<[u8; 32]> for Fingerprint {
    fn from(digest: [u8; 32]) -> Fingerprint {
        Fingerprint(digest)
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "a certificate fingerprint is \"sha256:\" and 32 bytes in hex (colons optional), as `openssl x509 -noout \
     -fingerprint -sha256` prints them"
)]
pub struct BadFingerprint;

impl FromStr for Fingerprint {
    type Err = BadFingerprint;

    /// `sha256:AB:CD:…`, in either case, with or without the colons
    /// between bytes; the `sha256:` prefix may be left out, as Proxmox's
    /// GUI shows the fingerprint without it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let hex = match s.get(..7) {
            Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &s[7..],
            _ => s,
        };
        let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(BadFingerprint);
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
            let text = std::str::from_utf8(pair).map_err(|_| BadFingerprint)?;
            *byte = u8::from_str_radix(text, 16).map_err(|_| BadFingerprint)?;
        }
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What an `https://` backend is trusted by: one of the two, never the
/// system's roots (a BMC or a Proxmox node has a certificate of its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Exactly the certificate with this fingerprint; its names and dates
    /// are not checked, since a node's self-signed certificate names the
    /// node, not the address it is reached at.
    Fingerprint(Fingerprint),
    /// Certificates a CA in this PEM file signed, for the URL's host name.
    CaFile(PathBuf),
}

/// How long a backend may take; a slow BMC is told apart from a dead one
/// by the operation's own deadline, not by waiting for ever here.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { connect: Duration::from_secs(5), request: Duration::from_secs(30) }
    }
}

/// One backend's HTTP(S) endpoint.
#[derive(Debug, Clone)]
pub struct Https {
    client: reqwest::Client,
    /// The URL as configured, without a trailing slash: paths are appended
    /// to it, so a backend behind a path prefix keeps its prefix.
    base: String,
}

/// A backend's answer, read whole (up to [`MAX_BODY`]).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

impl Https {
    pub fn new(url: &str, trust: Option<&Trust>, timeouts: Timeouts) -> Result<Https, BackendError> {
        let parsed = Url::parse(url).map_err(|e| BackendError::Protocol(format!("{url:?} is not a URL: {e}")))?;
        let builder = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.request)
            // A redirect could lead anywhere; a backend is one address.
            .redirect(reqwest::redirect::Policy::none())
            // Straight to the backend: an HTTP proxy of the environment
            // would sit between us and the pinned certificate.
            .no_proxy();
        let builder = match parsed.scheme() {
            "https" => {
                let Some(trust) = trust else {
                    return Err(BackendError::Tls(format!(
                        "{url} needs tls_fingerprint or ca_file: the system's CAs are not trusted for a backend"
                    )));
                };
                builder.tls_backend_preconfigured(tls_config(trust)?).https_only(true)
            }
            "http" if is_loopback(&parsed) => builder,
            "http" => {
                return Err(BackendError::Tls(format!(
                    "{url}: plain http is only allowed to a loopback address; use https with tls_fingerprint or \
                     ca_file"
                )));
            }
            other => return Err(BackendError::Protocol(format!("{url}: unsupported scheme {other:?}"))),
        };
        let client = builder.build().map_err(|e| BackendError::Tls(chain(&e)))?;
        Ok(Https { client, base: url.trim_end_matches('/').to_owned() })
    }

    /// The URL of a path under the backend's base. Paths may come from the
    /// backend's own answers, so one that is not an absolute path on the
    /// same host (`//other`, `@other`, `.other`) is refused: the request,
    /// and its credentials, go nowhere but the configured address.
    pub fn url(&self, path: &str) -> Result<Url, BackendError> {
        let not_a_path = || BackendError::Protocol(format!("{path:?} is not a path on the backend"));
        if !path.starts_with('/') || path.starts_with("//") || path.starts_with("/\\") {
            return Err(not_a_path());
        }
        let whole = format!("{}{path}", self.base);
        let url = Url::parse(&whole).map_err(|e| BackendError::Protocol(format!("{whole:?}: {e}")))?;
        let base = Url::parse(&self.base).map_err(|e| BackendError::Protocol(format!("{:?}: {e}", self.base)))?;
        if url.origin() != base.origin() {
            return Err(not_a_path());
        }
        Ok(url)
    }

    /// A GET, sent once more if its connection was reset (README "Power
    /// backends": a read may be retried once, an action never).
    pub async fn get(&self, url: Url, headers: HeaderMap) -> Result<Answer, BackendError> {
        match self.send(self.client.get(url.clone()).headers(headers.clone())).await {
            Err(Failure::Reset(_)) => {
                self.send(self.client.get(url).headers(headers)).await.map_err(Failure::into_error)
            }
            other => other.map_err(Failure::into_error),
        }
    }

    /// A POST, sent exactly once.
    pub async fn post(
        &self,
        url: Url,
        headers: HeaderMap,
        content_type: &'static str,
        body: String,
    ) -> Result<Answer, BackendError> {
        let request =
            self.client.post(url).headers(headers).header(reqwest::header::CONTENT_TYPE, content_type).body(body);
        self.send(request).await.map_err(Failure::into_error)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, Failure> {
        let mut response = request.send().await.map_err(Failure::classify)?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(Failure::classify)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(Failure::Other(BackendError::Protocol(format!(
                    "the answer is larger than {MAX_BODY} bytes"
                ))));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, body })
    }
}

/// A failed exchange, with the one case a GET retries set apart.
enum Failure {
    Reset(BackendError),
    Other(BackendError),
}

impl Failure {
    fn into_error(self) -> BackendError {
        match self {
            Failure::Reset(e) | Failure::Other(e) => e,
        }
    }

    fn classify(err: reqwest::Error) -> Failure {
        if let Some(tls) = find::<rustls::Error>(&err) {
            return Failure::Other(BackendError::Tls(describe_tls(tls)));
        }
        let text = chain(&err);
        if err.is_timeout() {
            return Failure::Other(BackendError::Unreachable(format!("no answer in time: {text}")));
        }
        let reset = find::<std::io::Error>(&err).is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        }) || find::<hyper::Error>(&err).is_some_and(|h| h.is_incomplete_message());
        if reset && !err.is_connect() {
            Failure::Reset(BackendError::Unreachable(format!("the connection was reset: {text}")))
        } else {
            Failure::Other(BackendError::Unreachable(text))
        }
    }
}

/// The first error of type `T` in `err`'s chain. An `io::Error` that wraps
/// another error reports that error's source, not the error itself, so
/// each one's payload is looked at too.
fn find<'a, T: std::error::Error + 'static>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref())
            && let Some(found) = find::<T>(inner)
        {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// An error and its sources, as one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = e.source();
    }
    text
}

fn describe_tls(err: &rustls::Error) -> String {
    if let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = err
        && let Some(mismatch) = inner.downcast_ref::<Mismatch>()
    {
        return mismatch.to_string();
    }
    format!("the TLS handshake failed: {err}")
}

fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

fn tls_config(trust: &Trust) -> Result<rustls::ClientConfig, BackendError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| BackendError::Tls(e.to_string()))?;
    let config = match trust {
        Trust::Fingerprint(want) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { want: *want, provider }))
            .with_no_client_auth(),
        Trust::CaFile(path) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| BackendError::Tls(format!("cannot read the CA file {}: {e}", path.display())))?;
            for cert in certs {
                let cert = cert.map_err(|e| BackendError::Tls(format!("the CA file {}: {e}", path.display())))?;
                roots.add(cert).map_err(|e| BackendError::Tls(format!("the CA file {}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(BackendError::Tls(format!("the CA file {} holds no certificate", path.display())));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(config)
}

/// Trusts the one certificate whose fingerprint is pinned. The handshake's
/// signatures are still verified with the certificate's key, so only the
/// holder of that key gets through.
#[derive(Debug)]
struct Pinned {
    want: Fingerprint,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug, thiserror::Error)]
#[error("the server's certificate is {got}, not the pinned {want}")]
struct Mismatch {
    got: Fingerprint,
    want: Fingerprint,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity.as_ref());
        if got == self.want {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Mismatch {
                got,
                want: self.want,
            })))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A path segment percent-encoded (RFC 3986 `pchar`): a Proxmox UPID holds
/// `:`, `@` and `!`, which stay as they are.
pub fn segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

    #[test]
    fn fingerprint_parses_in_any_case_with_or_without_colons_and_prefix() {
        let canonical: Fingerprint = format!("sha256:{HEX}").parse().unwrap();
        for spelling in [
            format!("SHA256:{}", HEX.to_lowercase()),
            format!("sha256:{}", HEX.replace(':', "")),
            HEX.to_owned(),
            format!("  sha256:{HEX}\n"),
        ] {
            assert_eq!(spelling.parse::<Fingerprint>().unwrap(), canonical, "{spelling:?}");
        }
        assert_eq!(canonical.to_string(), format!("sha256:{HEX}"));
    }

    #[test]
    fn fingerprint_of_the_wrong_length_or_alphabet_is_refused() {
        for bad in
            ["", "sha256:", "sha256:AB:CD", &format!("sha256:{HEX}:00"), &format!("sha1:{HEX}"), &HEX.replace('A', "G")]
        {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn plain_http_is_refused_except_to_loopback() {
        for ok in ["http://127.0.0.1:8006", "http://127.3.4.5", "http://[::1]:80", "http://localhost:1"] {
            assert!(Https::new(ok, None, Timeouts::default()).is_ok(), "{ok}");
        }
        for refused in ["http://192.0.2.10:8006", "http://example.org", "http://[2001:db8::1]"] {
            let err = Https::new(refused, None, Timeouts::default()).unwrap_err();
            assert!(matches!(&err, BackendError::Tls(m) if m.contains("loopback")), "{refused}: {err:?}");
        }
    }

    /// Paths come from the backend's answers (Redfish's `@odata.id`): one
    /// that would move the request to another host (`@evil`, `.evil`,
    /// `//evil`) is refused, so credentials never go anywhere but the
    /// configured address.
    #[test]
    fn a_path_from_the_backend_cannot_leave_the_configured_host() {
        let https = Https::new("http://localhost:8000", None, Timeouts::default()).unwrap();
        for hostile in ["@evil.example/x", ".evil.example/x", "//evil.example/x", "evil", ":9/x", "\\\\evil.example/x"]
        {
            let err = https.url(hostile).unwrap_err();
            assert!(matches!(&err, BackendError::Protocol(m) if m.contains("not a path")), "{hostile}: {err:?}");
        }
        let url = https.url("/redfish/v1/Systems/1").unwrap();
        assert_eq!(url.as_str(), "http://localhost:8000/redfish/v1/Systems/1");
    }

    #[test]
    fn https_without_a_pin_or_a_ca_file_is_refused() {
        let err = Https::new("https://192.0.2.10:8006", None, Timeouts::default()).unwrap_err();
        assert!(matches!(&err, BackendError::Tls(m) if m.contains("tls_fingerprint or ca_file")), "{err:?}");
    }

    /// A loopback server that reads each request and closes the
    /// connection without answering; it counts the requests.
    async fn resetting_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(socket);
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn a_get_whose_connection_resets_is_sent_once_more_then_fails_unreachable() {
        let (url, seen) = resetting_server().await;
        let https = Https::new(&url, None, Timeouts::default()).unwrap();
        let err = https.get(https.url("/status").unwrap(), HeaderMap::new()).await.unwrap_err();
        assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_post_whose_connection_resets_is_never_sent_again() {
        let (url, seen) = resetting_server().await;
        let https = Https::new(&url, None, Timeouts::default()).unwrap();
        let err =
            https.post(https.url("/reset").unwrap(), HeaderMap::new(), "text/plain", "x".into()).await.unwrap_err();
        assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn segment_keeps_a_upid_and_escapes_the_rest() {
        let upid = "UPID:pve1:000003E8:00001B58:6560A1B2:qmstart:101:breakglass@pve!power:";
        assert_eq!(segment(upid), upid);
        assert_eq!(segment("a b/c%"), "a%20b%2Fc%25");
    }
}
