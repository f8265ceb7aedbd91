//! Notifications (README "Notifications"): the real binary posting to
//! receivers the test runs on loopback: an ntfy-style webhook, and a push
//! service whose messages the test decrypts as a browser would (RFC 8291)
//! after checking their VAPID signature (RFC 8292).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde_json::{Value, json};

use crate::harness::{Server, eventually};
use crate::pve::{Pve, Sshd};

const PUBLIC_URL: &str = "https://console.example";

/// How a receiver answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    Status(u16),
    /// Never answers.
    Stall,
    /// 307 to `/followed` on the same receiver.
    Redirect,
}

#[derive(Debug, Clone)]
struct Received {
    /// Path and query.
    target: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// An HTTP server on loopback that records every request.
struct Receiver {
    base: String,
    seen: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Answer>>,
}

impl Receiver {
    async fn start(answer: Answer) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(answer));
        let app = axum::Router::new().fallback({
            let (seen, answer, base) = (seen.clone(), answer.clone(), base.clone());
            move |uri: axum::http::Uri, headers: HeaderMap, body: axum::body::Bytes| {
                let (seen, answer, base) = (seen.clone(), answer.clone(), base.clone());
                async move {
                    let target = uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
                    seen.lock().unwrap().push(Received { target, headers, body: body.to_vec() });
                    let answer = *answer.lock().unwrap();
                    match answer {
                        Answer::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
                        Answer::Stall => std::future::pending().await,
                        Answer::Redirect => (
                            StatusCode::TEMPORARY_REDIRECT,
                            [(axum::http::header::LOCATION, format!("{base}/followed"))],
                        )
                            .into_response(),
                    }
                }
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { base, seen, answer }
    }

    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }
}

/// One sample of `GET /metrics`, by its whole name with labels.
async fn metric(server: &Server, name: &str) -> u64 {
    let text = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// Polls `/metrics` until `name` reaches `value`.
async fn metric_reaches(server: &Server, name: &str, value: u64) {
    let start = Instant::now();
    loop {
        let now = metric(server, name).await;
        if now == value {
            return;
        }
        assert!(now < value, "{name} went past {value}: {now}");
        assert!(start.elapsed() < crate::harness::DEADLINE, "timed out waiting for {name} = {value} (is {now})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const WEBHOOK_SENT: &str = r#"breakglass_notifications_sent_total{channel="webhook"}"#;
const WEBHOOK_FAILED: &str = r#"breakglass_notifications_failed_total{channel="webhook"}"#;
const PUSH_SENT: &str = r#"breakglass_notifications_sent_total{channel="webpush"}"#;
const PUSH_FAILED: &str = r#"breakglass_notifications_failed_total{channel="webpush"}"#;

fn with_webhook(url: &str) -> crate::harness::Options {
    Server::options().env("BREAKGLASS_NOTIFY_URL", url).env("BREAKGLASS_PUBLIC_URL", PUBLIC_URL)
}

// ---- The webhook ----------------------------------------------------------

#[tokio::test]
async fn a_turn_end_reaches_the_webhook_in_ntfy_format_with_a_link_to_the_session() {
    let receiver = Receiver::start(Answer::Status(200)).await;
    let server = with_webhook(&format!("{}/breakglass-topic", receiver.base)).start();
    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    eventually("the webhook to be called", || receiver.seen().len() == 1).await;
    let note = &receiver.seen()[0];
    assert_eq!(note.target, "/breakglass-topic");
    assert_eq!(String::from_utf8_lossy(&note.body), "Load and memory are normal; devvm is healthy.");
    assert_eq!(note.headers["title"], "Turn ended");
    assert_eq!(note.headers["priority"], "default");
    assert_eq!(note.headers["tags"], "speech_balloon,turn_ended");
    assert_eq!(note.headers["click"], format!("{PUBLIC_URL}/?session={session}").as_str());
    assert_eq!(note.headers["content-type"], "text/plain; charset=utf-8");
    metric_reaches(&server, WEBHOOK_SENT, 1).await;
    assert_eq!(metric(&server, WEBHOOK_FAILED).await, 0);

    // A turn that fails says why, and no link is guessed without a public URL.
    let plain = Server::options().env("BREAKGLASS_NOTIFY_URL", format!("{}/t2", receiver.base)).start();
    let session = plain.open_session().await;
    plain.run_turn(&session, "stderr the disk is on fire\nexit 3").await;
    eventually("the failed turn's note", || receiver.seen().iter().any(|r| r.target == "/t2")).await;
    let note = receiver.seen().into_iter().find(|r| r.target == "/t2").unwrap();
    assert_eq!(note.headers["title"], "Turn failed");
    assert_eq!(String::from_utf8_lossy(&note.body), "the disk is on fire");
    assert!(note.headers.get("click").is_none(), "no BREAKGLASS_PUBLIC_URL, no link");
}

#[tokio::test]
async fn the_json_format_posts_every_field() {
    let receiver = Receiver::start(Answer::Status(204)).await;
    let server = with_webhook(&format!("{}/hook", receiver.base)).env("BREAKGLASS_NOTIFY_FORMAT", "json").start();
    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    eventually("the webhook to be called", || receiver.seen().len() == 1).await;
    let note = &receiver.seen()[0];
    assert_eq!(note.headers["content-type"], "application/json");
    let body: Value = serde_json::from_slice(&note.body).unwrap();
    assert_eq!(
        body,
        json!({"title": "Turn ended", "body": "Load and memory are normal; devvm is healthy.", "priority": "default",
            "url": format!("{PUBLIC_URL}/?session={session}"), "kind": "turn_ended", "session": session})
    );
}

#[tokio::test]
async fn a_finished_power_verb_reaches_the_webhook() {
    let receiver = Receiver::start(Answer::Status(200)).await;
    let host = Sshd::start(Pve::new());
    let server = host.breakglass(with_webhook(&format!("{}/power", receiver.base)));
    let response = server.post("/api/pve/status").send().await.unwrap();
    assert_eq!(response.status(), 200);
    eventually("the verb's note", || receiver.seen().len() == 1).await;
    let note = &receiver.seen()[0];
    assert_eq!(note.headers["title"], "Power verb status: exit 0");
    assert_eq!(note.headers["priority"], "high");
    assert_eq!(note.headers["tags"], "zap,power");
    assert_eq!(note.headers["click"], format!("{PUBLIC_URL}/").as_str());
    assert_eq!(String::from_utf8_lossy(&note.body), "status on 127.0.0.1: exit 0");
}

/// A receiver that never answers holds up neither the turn nor the next
/// one; its failure is counted once the delivery's 10 s are up.
#[tokio::test]
async fn a_stalled_webhook_does_not_delay_the_turn_and_is_counted() {
    let receiver = Receiver::start(Answer::Stall).await;
    let server = with_webhook(&format!("{}/stall", receiver.base)).start();
    let session = server.open_session().await;
    let mut stream = server.attach(&session, None).await;
    stream.until_caught_up().await;
    let mut took = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        server.start_turn(&session, "replay basic").await;
        stream.until_turn_end().await;
        took.push(started.elapsed());
    }
    eventually("the first note to reach the stalled receiver", || !receiver.seen().is_empty()).await;
    eprintln!("turns with a stalled webhook took {took:?}");
    for t in &took {
        assert!(*t < Duration::from_secs(5), "a turn waited on the webhook: {took:?}");
    }
    let started = Instant::now();
    metric_reaches(&server, WEBHOOK_FAILED, 1).await;
    eprintln!("the stalled delivery was given up after a further {:?}", started.elapsed());
    assert_eq!(metric(&server, WEBHOOK_SENT).await, 0);
}

/// A 500 is a failure, counted and logged by origin only: the URL's path
/// and query (a token) never reach the log.
#[tokio::test]
async fn a_failing_webhook_is_counted_and_its_secret_is_not_logged() {
    let receiver = Receiver::start(Answer::Status(500)).await;
    let server = with_webhook(&format!("{}/topic-s3cret?auth=t0ken", receiver.base)).start();
    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    metric_reaches(&server, WEBHOOK_FAILED, 1).await;
    assert_eq!(receiver.seen()[0].target, "/topic-s3cret?auth=t0ken");
    eventually("the failure in the log", || server.log().contains("webhook notification failed")).await;
    let log = server.log();
    let line = log.lines().find(|l| l.contains("webhook notification failed")).unwrap();
    assert!(line.contains(&receiver.base) && line.contains("500"), "{line}");
    assert!(!log.contains("s3cret") && !log.contains("t0ken"), "the URL's secret parts were logged:\n{log}");
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let receiver = Receiver::start(Answer::Redirect).await;
    let server = with_webhook(&format!("{}/moved", receiver.base)).start();
    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    metric_reaches(&server, WEBHOOK_FAILED, 1).await;
    let targets: Vec<_> = receiver.seen().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/moved"], "the redirect was followed");
}

/// TLS roots are read when the first note goes out, not at start-up: a
/// system certificate store that cannot be read costs the notifications
/// (counted as failures, the reason logged), never the console.
#[tokio::test]
async fn an_unreadable_certificate_store_fails_notifications_not_the_start() {
    let receiver = Receiver::start(Answer::Status(200)).await;
    let missing = "/nonexistent/breakglass-test-roots";
    let server = with_webhook(&format!("{}/topic", receiver.base))
        .env("SSL_CERT_FILE", missing)
        .env("SSL_CERT_DIR", missing)
        .start();
    let health = server.client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    metric_reaches(&server, WEBHOOK_FAILED, 1).await;
    assert!(receiver.seen().is_empty(), "a note went out without a client");
    eventually("the failure in the log", || server.log().contains("webhook notification failed")).await;
    let log = server.log();
    let line = log.lines().find(|l| l.contains("webhook notification failed")).unwrap();
    assert!(line.contains("HTTP client"), "{line}");
}

#[test]
fn the_webhook_url_is_refused_on_the_command_line() {
    let said = crate::harness::refused_at_start(&["serve", "--notify-url", "https://ntfy.example/t"], &[]);
    assert!(said.contains("BREAKGLASS_NOTIFY_URL"), "{said}");
    assert!(!said.contains("ntfy.example"), "the URL is not repeated: {said}");
}

// ---- Web Push -------------------------------------------------------------

/// A browser's side of a push subscription.
struct Browser {
    secret: p256::SecretKey,
    auth: [u8; 16],
}

impl Browser {
    fn new() -> Browser {
        let mut auth = [0u8; 16];
        auth.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..]);
        Browser { secret: p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng), auth }
    }

    fn public(&self) -> Vec<u8> {
        self.secret.public_key().to_encoded_point(false).as_bytes().to_vec()
    }

    fn subscription(&self, endpoint: &str) -> Value {
        json!({"endpoint": endpoint, "keys": {"p256dh": URL_SAFE_NO_PAD.encode(self.public()),
            "auth": URL_SAFE_NO_PAD.encode(self.auth)}})
    }

    /// RFC 8291 §3.4 and RFC 8188 §2, written from the RFCs: one record,
    /// the keyid being the server's ephemeral public key.
    fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        use sha2::Sha256;
        let (salt, rest) = body.split_at(16);
        let record_size = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let id_len = rest[4] as usize;
        assert_eq!(id_len, 65, "the keyid is the sender's uncompressed public key");
        let sender = &rest[5..5 + id_len];
        let ciphertext = &rest[5 + id_len..];
        assert!(ciphertext.len() <= record_size, "one record");
        let sender_key = p256::PublicKey::from_sec1_bytes(sender).unwrap();
        let shared = p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), sender_key.as_affine());
        let mut key_info = b"WebPush: info\0".to_vec();
        key_info.extend_from_slice(&self.public());
        key_info.extend_from_slice(sender);
        let mut ikm = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(Some(&self.auth), shared.raw_secret_bytes().as_slice())
            .expand(&key_info, &mut ikm)
            .unwrap();
        let prk = hkdf::Hkdf::<Sha256>::new(Some(salt), &ikm);
        let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
        prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek).unwrap();
        prk.expand(b"Content-Encoding: nonce\0", &mut nonce).unwrap();
        let cipher = aes_gcm::Aes128Gcm::new_from_slice(&cek).unwrap();
        let mut plain = cipher.decrypt(aes_gcm::Nonce::from_slice(&nonce), ciphertext).expect("decrypts");
        // The last record ends with the delimiter 0x02, then zero padding.
        while plain.last() == Some(&0) {
            plain.pop();
        }
        assert_eq!(plain.pop(), Some(2), "the last record's delimiter");
        plain
    }
}

/// Checks the VAPID `Authorization` of a push message and returns its claims.
fn vapid_claims(headers: &HeaderMap, server_key: &str) -> Value {
    use p256::ecdsa::signature::Verifier;
    let authorization = headers["authorization"].to_str().unwrap();
    let rest = authorization.strip_prefix("vapid t=").unwrap_or_else(|| panic!("{authorization}"));
    let (token, key) = rest.split_once(", k=").unwrap();
    assert_eq!(key, server_key, "k is the key from /api/push/key");
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(server_key).unwrap()).unwrap();
    let signature = p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
    verifying.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature).expect("the JWT's signature");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
}

async fn push_key(server: &Server) -> String {
    let key: Value = server.get("/api/push/key").send().await.unwrap().json().await.unwrap();
    let key = key["public_key"].as_str().unwrap().to_owned();
    let bytes = URL_SAFE_NO_PAD.decode(&key).unwrap();
    assert_eq!((bytes.len(), bytes[0]), (65, 4), "an uncompressed P-256 point");
    key
}

async fn subscribe(server: &Server, subscription: &Value) -> reqwest::StatusCode {
    server.post("/api/push/subscriptions").json(subscription).send().await.unwrap().status()
}

#[tokio::test]
async fn a_push_message_is_signed_encrypted_and_decrypts_to_the_note() {
    let push_service = Receiver::start(Answer::Status(201)).await;
    let server = Server::options().env("BREAKGLASS_PUBLIC_URL", PUBLIC_URL).start();
    let key = push_key(&server).await;
    let browser = Browser::new();
    let endpoint = format!("{}/push/v2/abc123", push_service.base);
    assert_eq!(subscribe(&server, &browser.subscription(&endpoint)).await, 201);

    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    eventually("the push message", || push_service.seen().len() == 1).await;
    let message = &push_service.seen()[0];
    assert_eq!(message.target, "/push/v2/abc123");
    assert_eq!(message.headers["content-encoding"], "aes128gcm");
    assert_eq!(message.headers["urgency"], "normal");
    let ttl: u64 = message.headers["ttl"].to_str().unwrap().parse().unwrap();
    assert!(ttl > 0 && ttl <= 24 * 3600, "TTL {ttl}");
    let claims = vapid_claims(&message.headers, &key);
    assert_eq!(claims["aud"], push_service.base, "aud is the push service's origin, port included");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let exp = claims["exp"].as_u64().unwrap();
    assert!(exp > now && exp <= now + 24 * 3600, "exp within 24 h: {exp} vs {now}");
    assert!(
        claims["sub"].as_str().unwrap().starts_with("https://")
            || claims["sub"].as_str().unwrap().starts_with("mailto:")
    );

    let note: Value = serde_json::from_slice(&browser.decrypt(&message.body)).unwrap();
    assert_eq!(
        note,
        json!({"title": "Turn ended", "body": "Load and memory are normal; devvm is healthy.", "priority": "default",
            "url": format!("{PUBLIC_URL}/?session={session}"), "kind": "turn_ended", "session": session})
    );
    metric_reaches(&server, PUSH_SENT, 1).await;
}

/// A subscription its push service says is gone (410) is removed: the next
/// note does not go to it, and it stays gone across a restart, while the
/// key (and the live subscription) persist.
#[tokio::test]
async fn a_gone_subscription_is_pruned_and_the_key_survives_a_restart() {
    let live = Receiver::start(Answer::Status(201)).await;
    let dead = Receiver::start(Answer::Status(410)).await;
    let mut server = Server::start();
    let key = push_key(&server).await;
    let browser = Browser::new();
    assert_eq!(subscribe(&server, &browser.subscription(&format!("{}/live", live.base))).await, 201);
    assert_eq!(subscribe(&server, &browser.subscription(&format!("{}/dead", dead.base))).await, 201);
    assert_eq!(metric(&server, "breakglass_push_subscriptions").await, 2);

    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    metric_reaches(&server, PUSH_SENT, 1).await;
    assert_eq!(metric(&server, PUSH_FAILED).await, 1, "the 410");
    assert_eq!(metric(&server, "breakglass_push_subscriptions_pruned_total").await, 1);
    assert_eq!(metric(&server, "breakglass_push_subscriptions").await, 1);

    server.run_turn(&session, "replay basic").await;
    // Failures are counted before deliveries: once the second is counted,
    // every delivery of that note is.
    metric_reaches(&server, PUSH_SENT, 2).await;
    assert_eq!(metric(&server, PUSH_FAILED).await, 1, "nothing more sent to the pruned subscription");
    assert_eq!(dead.seen().len(), 1);
    assert_eq!(live.seen().len(), 2);

    assert!(server.terminate().success());
    server.restart();
    assert_eq!(push_key(&server).await, key, "the same key after a restart");
    assert_eq!(
        metric(&server, "breakglass_push_subscriptions").await,
        1,
        "the live one is kept, the dead one stays gone"
    );
    dead.answer(Answer::Status(201));
    server.run_turn(&session, "replay basic").await;
    metric_reaches(&server, PUSH_SENT, 1).await;
    assert_eq!((live.seen().len(), dead.seen().len()), (3, 1));
}

#[tokio::test]
async fn subscriptions_are_validated_and_removed_on_request() {
    let server = Server::options().env("BREAKGLASS_TRUSTED_PROXIES", "127.0.0.1/32").start();
    let browser = Browser::new();
    let bad = [
        browser.subscription("http://push.example/not-https"),
        browser.subscription("https://push.example/x").tap(|s| s["keys"]["auth"] = json!("AAAA")),
        browser.subscription("https://push.example/x").tap(|s| s["keys"]["p256dh"] = json!("BAAA")),
        json!({"endpoint": "https://push.example/x"}),
    ];
    for subscription in &bad {
        assert_eq!(subscribe(&server, subscription).await, 422, "{subscription}");
    }
    let good = browser.subscription("https://push.example/send/1");
    assert_eq!(subscribe(&server, &good).await, 201);
    let removed = |endpoint: &str| {
        server
            .client
            .delete(server.url("/api/push/subscriptions"))
            .bearer_auth(crate::harness::TOKEN)
            .json(&json!({ "endpoint": endpoint }))
    };
    let answer: Value = removed("https://push.example/send/1").send().await.unwrap().json().await.unwrap();
    assert_eq!(answer, json!({"removed": true}));
    let answer: Value = removed("https://push.example/send/1").send().await.unwrap().json().await.unwrap();
    assert_eq!(answer, json!({"removed": false}));
    assert_eq!(metric(&server, "breakglass_push_subscriptions").await, 0);
    // A browser's cross-site POST is refused like every other API POST.
    let cross_site = server
        .client
        .post(server.url("/api/push/subscriptions"))
        .header("X-authentik-username", "alice")
        .header("Sec-Fetch-Site", "cross-site")
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 403);
    assert_eq!(metric(&server, "breakglass_push_subscriptions").await, 0);
    // Without a token, nothing.
    let response = server.client.get(server.url("/api/push/key")).send().await.unwrap();
    assert_eq!(response.status(), 401);
}

trait Tap {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl Tap for Value {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

#[tokio::test]
async fn a_tool_call_waiting_for_the_operator_is_an_urgent_note_with_its_command_and_effect() {
    let receiver = Receiver::start(Answer::Status(200)).await;
    let server = with_webhook(&format!("{}/approvals", receiver.base)).start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "hook Bash ssh pve reset\nresult").await;
    eventually("the approval's note", || !receiver.seen().is_empty()).await;
    let note = &receiver.seen()[0];
    assert_eq!(note.headers["title"], "Approval needed: Bash");
    assert_eq!(note.headers["priority"], "urgent");
    assert_eq!(String::from_utf8_lossy(&note.body), "ssh pve reset: hard reset of the VM: unsaved guest state is lost");
    assert_eq!(note.headers["click"], format!("{PUBLIC_URL}/?session={session}").as_str());
    server.cancel(&session).await;
    stream.until_turn_end().await;
}
