//! Who is calling (README, "Authentication"), and whether a browser request
//! came from this site.
//!
//! A bearer token is compared in constant time. A trusted proxy's user header
//! is believed only from a peer inside `BREAKGLASS_TRUSTED_PROXIES`. A login
//! cookie is checked by [`super::login`]. With nothing configured, only a
//! login cookie is accepted.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use super::login::{COOKIE, CookieCheck, Logins};
use crate::config::AuthConfig;

/// The caller, as later handlers and logs see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `bearer`, or the user name the proxy vouched for.
    pub name: String,
    pub via: Via,
    /// The TCP peer (the proxy's address, behind one).
    pub peer: IpAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Bearer,
    /// Attached by the browser or the proxy on the browser's behalf, so a
    /// cross-site page could make the browser send it.
    ProxyHeader,
    /// The first-run login's cookie: attached by the browser on its own too.
    Cookie,
}

/// Peer address of the TCP connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Decides who is calling, or why nobody we trust is.
pub fn authenticate(
    auth: &AuthConfig,
    logins: &Logins,
    headers: &HeaderMap,
    peer: IpAddr,
) -> Result<Identity, ApiError> {
    if let (Some(expected), Some(given)) = (&auth.bearer_token, bearer(headers))
        && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
    {
        return Ok(Identity { name: "bearer".into(), via: Via::Bearer, peer });
    }
    if is_trusted(auth, peer)
        && let Some(user) = proxy_user(headers, &auth.user_header)?
    {
        return Ok(Identity { name: user.chars().take(256).collect(), via: Via::ProxyHeader, peer });
    }
    if let Some(value) = cookie(headers, COOKIE) {
        let again = "run `breakglass login` on the server for a new login link";
        match logins.check(value) {
            CookieCheck::Valid => return Ok(Identity { name: "console".into(), via: Via::Cookie, peer }),
            CookieCheck::Expired => {
                return Err(ApiError::Unauthorized(format!("this browser's login has expired: {again}")));
            }
            CookieCheck::OtherMode if auth.is_first_run() => {
                return Err(ApiError::Unauthorized(format!(
                    "this browser signed in while API_BEARER_TOKEN or BREAKGLASS_TRUSTED_PROXIES was set: {again}"
                )));
            }
            CookieCheck::OtherMode => {
                return Err(ApiError::Unauthorized(format!(
                    "this browser signed in before API_BEARER_TOKEN or BREAKGLASS_TRUSTED_PROXIES was set: {again}"
                )));
            }
            CookieCheck::Invalid => {}
        }
    }
    if auth.is_first_run() {
        return Err(ApiError::Unauthorized(
            "not authenticated: open the login link printed at start-up (or run `breakglass login` on the \
             server), or configure API_BEARER_TOKEN or BREAKGLASS_TRUSTED_PROXIES"
                .into(),
        ));
    }
    Err(ApiError::Unauthorized("not authenticated".into()))
}

/// The one user a trusted proxy vouches for, or `None` when it names nobody.
///
/// The header twice with two values (a proxy that appends rather than
/// replaces, and a client that sent its own) leaves no way to tell which
/// the proxy meant: refused, rather than believing whichever came first.
fn proxy_user<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, ApiError> {
    let mut values = headers.get_all(name).iter().map(|v| v.as_bytes().trim_ascii());
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.any(|other| other != first) {
        return Err(ApiError::Unauthorized(format!(
            "the trusted proxy sent two different {name} headers: refusing both"
        )));
    }
    Ok(std::str::from_utf8(first).ok().filter(|user| !user.is_empty()))
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}

/// Whether the browser reached us over HTTPS, so that the login cookie can
/// be `Secure`. breakglass has no TLS listener of its own: TLS ends at a
/// proxy, and only a trusted proxy is believed about it, through
/// `X-Forwarded-Proto` or `Forwarded: proto=` (RFC 7239). Where a header
/// lists several hops, the first is the browser's.
pub fn came_over_https(auth: &AuthConfig, headers: &HeaderMap, peer: IpAddr) -> bool {
    if !is_trusted(auth, peer) {
        return false;
    }
    let first_hop =
        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.split(',').next()).map(str::trim);
    let forwarded_proto = first_hop("forwarded").and_then(|hop| {
        hop.split(';')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| key.trim().eq_ignore_ascii_case("proto"))
            .map(|(_, value)| value.trim().trim_matches('"'))
    });
    [first_hop("x-forwarded-proto"), forwarded_proto].into_iter().flatten().any(|p| p.eq_ignore_ascii_case("https"))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn is_trusted(auth: &AuthConfig, peer: IpAddr) -> bool {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    auth.trusted_proxies.iter().any(|net| net.contains(&peer))
}

/// A state-changing request carried by credentials a browser attaches on its
/// own must come from this site: `Sec-Fetch-Site` says so, or, where that is
/// absent, `Origin` names the request's host. Neither header: not a browser.
pub fn check_same_site(method: &Method, headers: &HeaderMap, identity: &Identity) -> Result<(), ApiError> {
    if identity.via == Via::Bearer || matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let refused = || ApiError::Forbidden("cross-site request refused".into());
    if let Some(site) = headers.get("sec-fetch-site") {
        return match site.to_str().unwrap_or_default() {
            "same-origin" | "none" => Ok(()),
            _ => Err(refused()),
        };
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin_host =
        origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, rest)| rest.trim_end_matches('/'));
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(refused()),
    }
}

/// Middleware on `/api`: authenticate, refuse cross-site writes, and hand
/// the identity to the handler.
pub async fn require(
    State(state): State<AppState>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let identity = authenticate(&state.config.auth, &state.logins, request.headers(), peer.ip())?;
    check_same_site(request.method(), request.headers(), &identity)?;
    request.extensions_mut().insert(identity);
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::login::Mode;
    use axum::http::HeaderValue;

    fn config(token: Option<&str>, proxies: &[&str]) -> AuthConfig {
        AuthConfig {
            login_token: None,
            bearer_token: token.map(str::to_owned),
            trusted_proxies: proxies.iter().map(|p| p.parse().unwrap()).collect(),
            user_header: "x-authentik-username".parse().unwrap(),
            login_ttl: std::time::Duration::from_secs(60),
        }
    }

    /// Logins that no test here consults (no request carries a cookie).
    fn no_logins() -> Logins {
        Logins::new(std::path::Path::new("/nonexistent"), None, Mode::Open, std::time::Duration::from_secs(60))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(k.parse::<axum::http::HeaderName>().unwrap(), HeaderValue::from_str(v).unwrap());
        }
        map
    }

    const INSIDE: &str = "10.1.2.3";
    const OUTSIDE: &str = "192.0.2.7";

    #[test]
    fn nothing_configured_refuses_even_a_token() {
        let err = authenticate(
            &config(None, &[]),
            &no_logins(),
            &headers(&[("authorization", "Bearer x")]),
            INSIDE.parse().unwrap(),
        );
        assert!(matches!(err, Err(ApiError::Unauthorized(m)) if m.contains("API_BEARER_TOKEN")));
    }

    #[test]
    fn bearer_must_match_exactly() {
        let auth = config(Some("s3cret"), &[]);
        let peer = OUTSIDE.parse().unwrap();
        assert_eq!(
            authenticate(&auth, &no_logins(), &headers(&[("authorization", "Bearer s3cret")]), peer).unwrap().via,
            Via::Bearer
        );
        assert_eq!(
            authenticate(&auth, &no_logins(), &headers(&[("authorization", "bearer s3cret")]), peer).unwrap().name,
            "bearer"
        );
        for wrong in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer "] {
            assert!(authenticate(&auth, &no_logins(), &headers(&[("authorization", wrong)]), peer).is_err(), "{wrong}");
        }
    }

    #[test]
    fn proxy_header_only_from_a_trusted_peer() {
        let auth = config(None, &["10.0.0.0/8"]);
        let h = headers(&[("x-authentik-username", "alice")]);
        assert_eq!(authenticate(&auth, &no_logins(), &h, INSIDE.parse().unwrap()).unwrap().name, "alice");
        assert!(authenticate(&auth, &no_logins(), &h, OUTSIDE.parse().unwrap()).is_err());
        let mapped: IpAddr = "::ffff:10.9.9.9".parse().unwrap();
        assert_eq!(authenticate(&auth, &no_logins(), &h, mapped).unwrap().via, Via::ProxyHeader);
        assert!(
            authenticate(&auth, &no_logins(), &headers(&[("x-authentik-username", " ")]), INSIDE.parse().unwrap())
                .is_err()
        );
    }

    #[test]
    fn two_different_user_headers_are_refused_the_same_one_twice_is_not() {
        let auth = config(None, &["10.0.0.0/8"]);
        let peer = INSIDE.parse().unwrap();
        let twice = |a: &str, b: &str| {
            let mut map = HeaderMap::new();
            map.append("x-authentik-username", HeaderValue::from_str(a).unwrap());
            map.append("x-authentik-username", HeaderValue::from_str(b).unwrap());
            authenticate(&auth, &no_logins(), &map, peer)
        };
        assert!(matches!(twice("alice", "bob"), Err(ApiError::Unauthorized(m)) if m.contains("different")));
        assert!(matches!(twice("alice", ""), Err(ApiError::Unauthorized(m)) if m.contains("different")));
        assert_eq!(twice("alice", "alice ").unwrap().name, "alice");
    }

    #[test]
    fn only_a_trusted_proxy_is_believed_about_https() {
        let auth = config(None, &["10.0.0.0/8"]);
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[], false),
            (&[("x-forwarded-proto", "https")], true),
            (&[("x-forwarded-proto", "https, http")], true),
            (&[("x-forwarded-proto", "http, https")], false),
            (&[("forwarded", "for=192.0.2.60;proto=https")], true),
            (&[("forwarded", "proto=http, proto=https")], false),
            (&[("forwarded", "for=x;proto")], false),
        ];
        for (pairs, https) in cases {
            let h = headers(pairs);
            assert_eq!(came_over_https(&auth, &h, INSIDE.parse().unwrap()), *https, "{pairs:?}");
            assert!(!came_over_https(&auth, &h, OUTSIDE.parse().unwrap()), "untrusted {pairs:?}");
        }
    }

    #[test]
    fn cross_site_posts_with_ambient_credentials_are_refused() {
        let peer: IpAddr = INSIDE.parse().unwrap();
        let proxy = Identity { name: "alice".into(), via: Via::ProxyHeader, peer };
        let bearer = Identity { name: "bearer".into(), via: Via::Bearer, peer };
        let post = Method::POST;
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[], true),
            (&[("sec-fetch-site", "same-origin")], true),
            (&[("sec-fetch-site", "none")], true),
            (&[("sec-fetch-site", "cross-site")], false),
            (&[("sec-fetch-site", "same-site")], false),
            (&[("origin", "https://console.example"), ("host", "console.example")], true),
            (&[("origin", "https://evil.example"), ("host", "console.example")], false),
            (&[("origin", "null"), ("host", "console.example")], false),
        ];
        for (pairs, allowed) in cases {
            let h = headers(pairs);
            assert_eq!(check_same_site(&post, &h, &proxy).is_ok(), *allowed, "{pairs:?}");
            assert!(check_same_site(&post, &h, &bearer).is_ok(), "bearer {pairs:?}");
            assert!(check_same_site(&Method::GET, &h, &proxy).is_ok(), "GET {pairs:?}");
        }
    }
}

#[cfg(test)]
mod login_tests {
    use super::*;
    use crate::http::login::Mode;
    use axum::http::HeaderValue;

    #[test]
    fn the_login_token_works_once_and_its_cookie_identifies_the_console() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = std::time::Duration::from_secs(60);
        let logins = Logins::new(dir.path(), Some("t0ken".into()), Mode::Open, ttl);
        assert_eq!(logins.redeem("wrong"), None);
        let secret = logins.redeem("t0ken").expect("the right token").value;
        assert_eq!(logins.redeem("t0ken"), None, "one time only");
        let mut auth = AuthConfig {
            login_token: Some("t0ken".into()),
            bearer_token: None,
            trusted_proxies: vec![],
            user_header: "x-authentik-username".parse().unwrap(),
            login_ttl: ttl,
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(&format!("other=1; breakglass={secret}")).unwrap());
        let peer = "127.0.0.1".parse().unwrap();
        let identity = authenticate(&auth, &logins, &headers, peer).unwrap();
        assert_eq!((identity.name.as_str(), identity.via), ("console", Via::Cookie));

        // The same cookie under a server that now has a token.
        auth.bearer_token = Some("s3cret".into());
        let guarded = Logins::new(dir.path(), None, Mode::Guarded, ttl);
        let refused = authenticate(&auth, &guarded, &headers, peer);
        assert!(matches!(refused, Err(ApiError::Unauthorized(m)) if m.contains("before API_BEARER_TOKEN")));

        auth.bearer_token = None;
        let (body, _) = secret.rsplit_once('.').unwrap();
        let forged = format!("breakglass={body}.{}", "0".repeat(64));
        headers.insert(header::COOKIE, HeaderValue::from_str(&forged).unwrap());
        let refused = authenticate(&auth, &logins, &headers, peer);
        assert!(matches!(refused, Err(ApiError::Unauthorized(m)) if m.contains("login link")));
    }
}
