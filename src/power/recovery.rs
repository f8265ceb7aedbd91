//! Whether a target is back (README "Operations"): its `check`, a TCP port
//! that accepts a connection or an HTTP(S) URL that answers 2xx, polled
//! after a verb that should bring it up.

use std::fmt;
use std::time::Duration;

use reqwest::Url;

/// Longest one attempt of a check may take.
const ATTEMPT: Duration = Duration::from_secs(5);
/// Pause between two attempts of a check, or two power-state queries.
pub const POLL: Duration = Duration::from_millis(500);

/// A target's `check` (README "Targets").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// `tcp:HOST:PORT`: a connection is accepted.
    Tcp { host: String, port: u16 },
    /// An `http://` or `https://` URL that answers 2xx.
    Http(Url),
}

impl Check {
    pub fn parse(text: &str) -> Result<Check, String> {
        if let Some(rest) = text.strip_prefix("tcp:") {
            let bad = || format!("{text:?}: write tcp:HOST:PORT");
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(bad)?;
            if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
                return Err(bad());
            }
            return Ok(Check::Tcp { host: host.to_owned(), port });
        }
        match Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Ok(Check::Http(url)),
            _ => Err(format!("{text:?}: use tcp:HOST:PORT or an http(s) URL")),
        }
    }

    /// One attempt: does the target answer now?
    /// Whether the check passes now; an HTTP check without a client (none
    /// could be made) never does.
    pub async fn passes(&self, client: Option<&reqwest::Client>) -> bool {
        match self {
            Check::Tcp { host, port } => {
                matches!(
                    tokio::time::timeout(ATTEMPT, tokio::net::TcpStream::connect((host.as_str(), *port))).await,
                    Ok(Ok(_))
                )
            }
            Check::Http(url) => match client {
                Some(client) => matches!(
                    tokio::time::timeout(ATTEMPT, client.get(url.clone()).send()).await,
                    Ok(Ok(response)) if response.status().is_success()
                ),
                None => false,
            },
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Check::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            // The URL's origin and path only: a query may carry a token.
            Check::Http(url) => write!(f, "{}{}", url.origin().ascii_serialization(), url.path()),
        }
    }
}

/// The client the HTTP checks use: no redirects followed (a 3xx is not
/// "back"), no proxy from the environment, bounded in time. A host with no
/// CA certificates (a stripped-down recovery image) gets one that trusts
/// no certificate: its `https` checks fail, its `http` checks still work.
/// `None` only if even that cannot be made; never a panic.
pub fn http_client() -> Option<reqwest::Client> {
    let builder = || reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).no_proxy().timeout(ATTEMPT);
    let err = match builder().build() {
        Ok(client) => return Some(client),
        Err(err) => err,
    };
    tracing::warn!(%err, "the system's CA certificates cannot be loaded: https recovery checks will fail");
    let no_roots =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth());
    match no_roots
        .map_err(|e| e.to_string())
        .and_then(|c| builder().tls_backend_preconfigured(c).build().map_err(|e| e.to_string()))
    {
        Ok(client) => Some(client),
        Err(err) => {
            tracing::error!(%err, "no HTTP client for the recovery checks: http checks will fail");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_parse_as_the_targets_file_writes_them() {
        assert_eq!(Check::parse("tcp:192.0.2.20:22"), Ok(Check::Tcp { host: "192.0.2.20".into(), port: 22 }));
        assert_eq!(Check::parse("tcp:[::1]:8080"), Ok(Check::Tcp { host: "::1".into(), port: 8080 }));
        assert_eq!(Check::parse("tcp:[::1]:8080").unwrap().to_string(), "tcp:[::1]:8080");
        let http = Check::parse("https://devvm.example/health?token=x").unwrap();
        assert_eq!(http.to_string(), "https://devvm.example/health", "no query in what is shown");
        for bad in ["tcp:host", "tcp::22", "tcp:h:0", "tcp:h:99999", "udp:h:1", "ftp://h/", ""] {
            assert!(Check::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_tcp_check_passes_once_something_listens() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let check = Check::Tcp { host: "127.0.0.1".into(), port };
        assert!(check.passes(http_client().as_ref()).await);
        drop(listener);
        assert!(!check.passes(http_client().as_ref()).await);
    }
}
