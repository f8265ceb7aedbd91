//! Authentication, login links and cross-site refusal (README,
//! "Authentication" and "The web console"), through the real binary.
//! Test clients connect from 127.0.0.1, so "trusted peer" means a
//! `BREAKGLASS_TRUSTED_PROXIES` that contains it.

use serde_json::{Value, json};

use std::time::{Duration, Instant};

use crate::harness::{DEADLINE, Server, TOKEN, eventually, kinds, wait_until};

async fn status_of(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_auth_matrix() {
    let server = Server::options().env("BREAKGLASS_TRUSTED_PROXIES", "127.0.0.0/8,10.0.0.0/8").start();
    let url = server.url("/api/session");
    let c = &server.client;
    let (none, body) = status_of(c.post(&url)).await;
    assert_eq!((none, body["detail"].as_str()), (401, Some("not authenticated")));
    assert_eq!(status_of(c.post(&url).bearer_auth("wrong")).await.0, 401);
    assert_eq!(status_of(c.post(&url).bearer_auth(TOKEN)).await.0, 200);
    assert_eq!(status_of(c.post(&url).header("X-authentik-username", "alice")).await.0, 200);
    assert_eq!(status_of(c.post(&url).header("X-authentik-username", "")).await.0, 401);
    // A wrong token does not hide a valid proxy identity.
    assert_eq!(status_of(c.post(&url).bearer_auth("wrong").header("X-authentik-username", "alice")).await.0, 200);
    assert_eq!(status_of(c.get(server.url("/health"))).await, (200, json!({"status": "ok", "service": "breakglass"})));
}

#[tokio::test]
async fn the_proxy_identity_is_recorded_with_the_prompt() {
    let server = Server::options().env("BREAKGLASS_TRUSTED_PROXIES", "127.0.0.1").start();
    let as_alice = |r: reqwest::RequestBuilder| r.header("X-authentik-username", "alice");
    let (_, opened) = status_of(as_alice(server.client.post(server.url("/api/session")))).await;
    let session = opened["session_id"].as_str().unwrap().to_owned();
    let prompt = as_alice(server.client.post(server.url(&format!("/api/session/{session}/prompt"))))
        .json(&json!({"prompt": "replay basic"}));
    assert_eq!(status_of(prompt).await.0, 200);
    let mut stream = server.attach(&session, None).await;
    let events = stream.until_turn_end().await;
    assert_eq!(events[0]["by"], "alice");
    assert_eq!(kinds(&events).last(), Some(&"turn_end"));
}

#[tokio::test]
async fn the_proxy_header_from_an_untrusted_peer_is_ignored() {
    let server = Server::options().env("BREAKGLASS_TRUSTED_PROXIES", "10.0.0.0/8").start();
    let request = server.client.post(server.url("/api/session")).header("X-authentik-username", "mallory");
    assert_eq!(status_of(request).await.0, 401);
}

#[tokio::test]
async fn a_custom_user_header_name() {
    let server = Server::options()
        .env("BREAKGLASS_TRUSTED_PROXIES", "127.0.0.1/32")
        .env("BREAKGLASS_TRUSTED_USER_HEADER", "X-Forwarded-User")
        .start();
    let url = server.url("/api/pve/verbs");
    assert_eq!(status_of(server.client.get(&url).header("X-Forwarded-User", "bob")).await.0, 200);
    assert_eq!(status_of(server.client.get(&url).header("X-authentik-username", "bob")).await.0, 401);
}

/// A bare machine's first run: nothing configured, so the API
/// refuses everyone but the holder of the one-time login link's cookie.
#[tokio::test]
async fn first_run_login_link_sets_a_strict_cookie_once() {
    let server = Server::options().no_token().start();
    let (status, body) = status_of(server.client.get(server.url("/api/pve/verbs")).bearer_auth(TOKEN)).await;
    assert_eq!(status, 401);
    assert!(body["detail"].as_str().unwrap().contains("login link"), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("API_BEARER_TOKEN"), "{body}");
    assert_eq!(status_of(server.client.get(server.url("/health"))).await.0, 200);

    let link = printed_login_link(&server).await;
    assert!(link.starts_with(&format!("{}/login?token=", server.base)), "{link}");
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let opened = no_redirects.get(&link).send().await.unwrap();
    assert_eq!(opened.status(), 303);
    assert_eq!(opened.headers()["location"], "/", "the token leaves the address bar");
    let set_cookie = opened.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set_cookie.starts_with("breakglass=")
            && set_cookie.contains("HttpOnly")
            && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();

    let again = no_redirects.get(&link).send().await.unwrap();
    assert_eq!(again.status(), 401, "the link works once");

    let with_cookie = |r: reqwest::RequestBuilder| r.header("Cookie", cookie.clone());
    let (status, me) = status_of(with_cookie(server.client.get(server.url("/api/whoami")))).await;
    assert_eq!((status, me["identity"].as_str(), me["via"].as_str()), (200, Some("console"), Some("login")));
    assert_eq!(status_of(with_cookie(server.client.post(server.url("/api/session")))).await.0, 200);
    let cross = with_cookie(server.client.post(server.url("/api/session"))).header("Sec-Fetch-Site", "cross-site");
    assert_eq!(status_of(cross).await.0, 403, "the cookie is ambient: cross-site posts are refused");
    let forged = server.client.get(server.url("/api/whoami")).header("Cookie", "breakglass=guess");
    assert_eq!(status_of(forged).await.0, 401);

    // The cookie is signed with a key kept in the data directory: it
    // outlives a restart (the link does not).
    let mut server = server;
    assert!(server.terminate().success());
    server.restart();
    let me = server.client.get(server.url("/api/whoami")).header("Cookie", cookie.clone());
    assert_eq!(status_of(me).await.0, 200, "still signed in after a restart");
    let key = std::fs::metadata(server.data_dir().join("login.key")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777, 0o600);
}

#[tokio::test]
async fn cross_site_posts_with_the_proxy_header_are_refused() {
    let server = Server::options().env("BREAKGLASS_TRUSTED_PROXIES", "127.0.0.1").start();
    let host = server.base.trim_start_matches("http://").to_owned();
    let post = |site: Option<&str>, origin: Option<&str>| {
        let mut request = server.client.post(server.url("/api/session")).header("X-authentik-username", "alice");
        if let Some(site) = site {
            request = request.header("Sec-Fetch-Site", site);
        }
        if let Some(origin) = origin {
            request = request.header("Origin", origin);
        }
        request
    };
    let (status, body) = status_of(post(Some("cross-site"), None)).await;
    assert_eq!((status, body["detail"].as_str()), (403, Some("cross-site request refused")));
    assert_eq!(status_of(post(Some("same-site"), None)).await.0, 403);
    assert_eq!(status_of(post(None, Some("https://evil.example"))).await.0, 403);
    assert_eq!(status_of(post(Some("same-origin"), None)).await.0, 200);
    assert_eq!(status_of(post(None, Some(&format!("http://{host}")))).await.0, 200);
    assert_eq!(status_of(post(None, None)).await.0, 200, "a script behind the proxy");
    // The power path is covered by the same rule, before any ssh.
    let verb = server
        .client
        .post(server.url("/api/pve/reset"))
        .header("X-authentik-username", "alice")
        .header("Sec-Fetch-Site", "cross-site");
    assert_eq!(status_of(verb).await.0, 403);
    // A bearer token is never ambient, so never refused for this.
    let bearer =
        server.client.post(server.url("/api/session")).bearer_auth(TOKEN).header("Sec-Fetch-Site", "cross-site");
    assert_eq!(status_of(bearer).await.0, 200);
}

/// The start-up login link the server printed (it follows the address).
async fn printed_login_link(server: &Server) -> String {
    let find = || {
        let printed = server.stdout.lock().unwrap();
        printed.iter().find_map(|l| Some(l.strip_prefix("login: open ")?.split_whitespace().next()?.to_owned()))
    };
    eventually("the login link on stdout", || find().is_some()).await;
    find().unwrap()
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// A proxy (or a client slipping past it) that sends the user header twice
/// with two names leaves us no way to know who calls: neither is believed.
#[tokio::test]
async fn two_different_proxy_identities_are_refused() {
    let server = Server::options().env("BREAKGLASS_TRUSTED_PROXIES", "127.0.0.1").start();
    let whoami = |names: &[&str]| {
        names.iter().fold(server.client.get(server.url("/api/whoami")), |r, n| r.header("X-authentik-username", *n))
    };
    let (status, body) = status_of(whoami(&["alice", "mallory"])).await;
    assert_eq!(status, 401, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("x-authentik-username") && detail.contains("different"), "{detail}");
    assert_eq!(status_of(whoami(&["alice", ""])).await.0, 401, "an empty second name is still another one");
    let (status, me) = status_of(whoami(&["alice", " alice"])).await;
    assert_eq!((status, me["identity"].as_str()), (200, Some("alice")), "the same name twice is one identity");
}

/// Chat apps and link previews send HEAD before anyone opens the link: that
/// must not spend it.
#[tokio::test]
async fn a_head_of_the_login_link_does_not_use_it_up() {
    let server = Server::options().no_token().start();
    let link = printed_login_link(&server).await;
    let client = no_redirects();
    for _ in 0..2 {
        let head = client.head(&link).send().await.unwrap();
        assert_eq!(head.status(), 200);
        assert!(head.headers().get("set-cookie").is_none(), "HEAD signs nobody in");
    }
    let opened = client.get(&link).send().await.unwrap();
    assert_eq!(opened.status(), 303, "the link still works after HEADs");
    assert!(opened.headers()["set-cookie"].to_str().unwrap().starts_with("breakglass="));
    assert_eq!(client.get(&link).send().await.unwrap().status(), 401, "and then only once");
}

/// Opens a login link as a browser would: the cookie it sets (`name=value`)
/// and the whole `Set-Cookie` line.
async fn sign_in(link: &str) -> (String, String) {
    let opened = no_redirects().get(link).send().await.unwrap();
    assert_eq!(opened.status(), 303, "{link}");
    let set_cookie = opened.headers()["set-cookie"].to_str().unwrap().to_owned();
    (set_cookie.split(';').next().unwrap().to_owned(), set_cookie)
}

async fn whoami_with(server: &Server, cookie: &str) -> (u16, Value) {
    status_of(server.client.get(server.url("/api/whoami")).header("Cookie", cookie)).await
}

/// Runs `breakglass <args>` to its end, as an operator on the server would.
fn breakglass(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .args(args)
        .env_clear()
        .env("RUST_LOG", "info")
        .output()
        .expect("run breakglass")
}

/// `breakglass login --data-dir <dir>`: the link it prints.
fn minted_link(server: &Server) -> String {
    let data = server.data_dir();
    // Written once the server is ready to redeem links, just after it says where it listens.
    wait_until("the server to write its address", || data.join("listen").exists());
    let out = breakglass(&["login", "--data-dir", data.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "breakglass login failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "only the link on stdout: {stdout:?}");
    stdout.trim().to_owned()
}

#[tokio::test]
async fn a_login_cookie_expires_after_its_ttl() {
    let server = Server::options().no_token().env("BREAKGLASS_LOGIN_TTL_SECONDS", "2").start();
    let link = printed_login_link(&server).await;
    let signed_in = Instant::now();
    let (cookie, set_cookie) = sign_in(&link).await;
    assert!(
        set_cookie.split("; ").any(|a| a == "Max-Age=2"),
        "the browser drops it when the server does: {set_cookie}"
    );
    assert_eq!(whoami_with(&server, &cookie).await.0, 200, "valid at first");
    let detail = loop {
        let (status, body) = whoami_with(&server, &cookie).await;
        if status == 401 {
            break body["detail"].as_str().unwrap_or_default().to_owned();
        }
        assert_eq!(status, 200);
        assert!(signed_in.elapsed() < DEADLINE, "the cookie never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(signed_in.elapsed() >= Duration::from_secs(2), "not before its TTL: {:?}", signed_in.elapsed());
    assert!(detail.contains("expired") && detail.contains("breakglass login"), "{detail}");
}

/// A cookie from a bare machine's first run says nothing about who may call
/// once the operator has set a token: a restart in that mode refuses it.
#[tokio::test]
async fn a_first_run_cookie_is_refused_after_a_restart_with_a_token() {
    let mut first_run = Server::options().no_token().start();
    let (cookie, _) = sign_in(&printed_login_link(&first_run).await).await;
    assert_eq!(whoami_with(&first_run, &cookie).await.0, 200);
    assert!(first_run.terminate().success());

    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(first_run.data_dir(), dir.path().join("data")).unwrap();
    let guarded = Server::options().start_in(dir);
    let (status, body) = whoami_with(&guarded, &cookie).await;
    assert_eq!(status, 401, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("breakglass login"), "says how to sign in again: {detail}");
    assert_eq!(status_of(guarded.get("/api/whoami")).await.0, 200, "the token works");
}

/// `breakglass login` is how a browser gets in whatever guards the server:
/// here a bearer token, which a browser cannot send.
#[tokio::test]
async fn breakglass_login_mints_a_one_time_link_for_a_running_server() {
    let server = Server::start();
    let link = minted_link(&server);
    assert!(link.starts_with(&format!("{}/login?token=", server.base)), "{link}");
    let token = link.rsplit_once('=').unwrap().1.to_owned();
    let logins = server.data_dir().join("logins");
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777
    };
    assert_eq!(mode(&logins), 0o700);
    let pending: Vec<_> = std::fs::read_dir(&logins).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(mode(&pending[0]), 0o600);
    assert!(!std::fs::read_to_string(&pending[0]).unwrap().contains(&token), "only a hash of the token is kept");

    let head = no_redirects().head(&link).send().await.unwrap();
    assert_eq!(head.status(), 200, "HEAD leaves it for the browser");
    let (cookie, _) = sign_in(&link).await;
    let (status, me) = whoami_with(&server, &cookie).await;
    assert_eq!((status, me["via"].as_str()), (200, Some("login")));
    assert_eq!(no_redirects().get(&link).send().await.unwrap().status(), 401, "once");
    assert_eq!(std::fs::read_dir(&logins).unwrap().count(), 0, "spent links are deleted");
    assert!(!server.log().contains(&token), "the token never reaches the server's log");

    let other = minted_link(&server);
    assert_ne!(other, link, "every run mints a new link");
}

#[tokio::test]
async fn revoking_logins_signs_every_browser_out_without_a_restart() {
    let server = Server::options().no_token().start();
    let (cookie, _) = sign_in(&printed_login_link(&server).await).await;
    assert_eq!(whoami_with(&server, &cookie).await.0, 200);
    std::fs::remove_file(server.data_dir().join("login.key")).unwrap();
    assert_eq!(whoami_with(&server, &cookie).await.0, 401, "deleting the key signs the browser out");

    let (cookie, _) = sign_in(&minted_link(&server)).await;
    assert_eq!(whoami_with(&server, &cookie).await.0, 200, "a new key signs new cookies");
    let pending = minted_link(&server);
    let data = server.data_dir();
    let out = breakglass(&["login", "--revoke-all", "--data-dir", data.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(whoami_with(&server, &cookie).await.0, 401, "revoke-all signs the browser out");
    assert_eq!(no_redirects().get(&pending).send().await.unwrap().status(), 401, "and voids links not yet used");
}

/// Behind a proxy that ends TLS, the cookie must not travel in clear: it is
/// `Secure` when a trusted proxy says the browser came over HTTPS, and a
/// client that merely claims so is not believed.
#[tokio::test]
async fn the_cookie_is_secure_only_when_a_trusted_proxy_says_https() {
    async fn secure(server: &Server, headers: &[(&str, &str)]) -> bool {
        let link = minted_link(server);
        let request = headers.iter().fold(no_redirects().get(&link), |r, (k, v)| r.header(*k, *v));
        let opened = request.send().await.unwrap();
        assert_eq!(opened.status(), 303);
        opened.headers()["set-cookie"].to_str().unwrap().split("; ").any(|a| a == "Secure")
    }
    let trusting = Server::options().env("BREAKGLASS_TRUSTED_PROXIES", "127.0.0.1").start();
    let untrusting = Server::options().env("BREAKGLASS_TRUSTED_PROXIES", "10.0.0.0/8").start();
    // (headers, Secure from the trusted peer, Secure from an untrusted one)
    type Case<'a> = (&'a [(&'a str, &'a str)], bool, bool);
    let cases: &[Case] = &[
        (&[], false, false),
        (&[("X-Forwarded-Proto", "https")], true, false),
        (&[("X-Forwarded-Proto", "HTTPS")], true, false),
        (&[("X-Forwarded-Proto", "http")], false, false),
        (&[("Forwarded", "for=192.0.2.60;proto=https;by=203.0.113.43")], true, false),
        (&[("Forwarded", "for=\"[2001:db8::1]\";Proto=\"https\"")], true, false),
        (&[("Forwarded", "for=192.0.2.60;proto=http")], false, false),
    ];
    for (headers, from_trusted, from_untrusted) in cases {
        assert_eq!(secure(&trusting, headers).await, *from_trusted, "trusted peer, {headers:?}");
        assert_eq!(secure(&untrusting, headers).await, *from_untrusted, "untrusted peer, {headers:?}");
    }
}
