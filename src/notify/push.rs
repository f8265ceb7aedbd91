//! The Web Push channel (README "Notifications"): notes to the installed
//! console's service worker through each browser's push service.
//!
//! - The server's VAPID key pair (RFC 8292, P-256) is made on first run and
//!   kept in `<data>/vapid.key` (mode 0600, like `login.key`); browsers
//!   subscribe with its public half.
//! - Subscriptions are kept in `<data>/push-subscriptions.json` (0600),
//!   rewritten whole on each change: a short, bounded list read once at
//!   start-up, kept beside the key it is bound to (a push service refuses a
//!   subscription made for another key), with no schema to migrate.
//! - Each message is encrypted for its subscription (RFC 8291, `aes128gcm`
//!   of RFC 8188) and signed with a VAPID JWT whose `aud` is the push
//!   service's origin. A subscription its service says is gone (404, 410)
//!   is removed.
//!
//! The only code that knows these files and this wire format.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::future::BoxFuture;
use p256::ecdsa::signature::Signer;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{Channel, ChannelName, Delivered, Note, Stats, origin};
use crate::files::write_atomically;

const KEY_FILE: &str = "vapid.key";
const SUBSCRIPTIONS_FILE: &str = "push-subscriptions.json";
/// Subscriptions kept at most: one per browser the operator uses, with room.
pub const MAX_SUBSCRIPTIONS: usize = 32;
/// Longest endpoint URL accepted (push services use a few hundred bytes).
const MAX_ENDPOINT: usize = 2048;
/// How long a push service keeps a message for a browser that is offline
/// (`TTL`, RFC 8030 §5.2), and how long the VAPID token is good for (at
/// most 24 h, RFC 8292 §2).
pub const TTL: Duration = Duration::from_secs(12 * 3600);

/// A browser's `PushSubscription.toJSON()`, as the console posts it and as
/// the subscriptions file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub endpoint: String,
    pub keys: Keys,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keys {
    /// The browser's P-256 public key, uncompressed, base64url.
    pub p256dh: String,
    /// The browser's 16-byte authentication secret, base64url.
    pub auth: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Invalid {
    #[error("endpoint is not a URL")]
    NotAUrl,
    #[error("endpoint is longer than {MAX_ENDPOINT} bytes")]
    TooLong,
    #[error("endpoint must be https (http only to a loopback address)")]
    NotHttps,
    #[error("endpoint must not carry a user name, password or fragment")]
    Extras,
    #[error("keys.p256dh must be an uncompressed P-256 public key (65 bytes), base64url")]
    BadP256dh,
    #[error("keys.auth must be 16 bytes, base64url")]
    BadAuth,
}

#[derive(Debug, Error)]
pub enum SubscribeError {
    #[error("invalid subscription: {0}")]
    Invalid(#[from] Invalid),
    #[error("too many push subscriptions (at most {MAX_SUBSCRIPTIONS}); remove one first")]
    TooMany,
    #[error("could not save the push subscriptions: {0}")]
    Storage(String),
}

/// A subscription checked and decoded, ready to send to.
struct Target {
    endpoint: reqwest::Url,
    public: p256::PublicKey,
    auth: web_push_native::Auth,
}

/// Checks a subscription as a browser would have made it.
pub fn validate(subscription: &Subscription) -> Result<(), Invalid> {
    target(subscription).map(|_| ())
}

fn target(subscription: &Subscription) -> Result<Target, Invalid> {
    if subscription.endpoint.len() > MAX_ENDPOINT {
        return Err(Invalid::TooLong);
    }
    let endpoint = reqwest::Url::parse(&subscription.endpoint).map_err(|_| Invalid::NotAUrl)?;
    let host = endpoint.host_str().ok_or(Invalid::NotAUrl)?;
    let loopback = match host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    };
    match endpoint.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => return Err(Invalid::NotHttps),
    }
    if !endpoint.username().is_empty() || endpoint.password().is_some() || endpoint.fragment().is_some() {
        return Err(Invalid::Extras);
    }
    let p256dh = decode(&subscription.keys.p256dh).ok_or(Invalid::BadP256dh)?;
    if p256dh.len() != 65 || p256dh[0] != 0x04 {
        return Err(Invalid::BadP256dh);
    }
    let public = p256::PublicKey::from_sec1_bytes(&p256dh).map_err(|_| Invalid::BadP256dh)?;
    let auth = decode(&subscription.keys.auth).filter(|a| a.len() == 16).ok_or(Invalid::BadAuth)?;
    Ok(Target { endpoint, public, auth: web_push_native::Auth::clone_from_slice(&auth) })
}

/// base64url, padded or not (browsers send it unpadded).
fn decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()
}

/// The channel: the key, the subscriptions, and the client to reach them.
pub struct Push {
    key: p256::ecdsa::SigningKey,
    /// The public key, uncompressed, base64url: what browsers subscribe with.
    public_key: String,
    subscriptions: Mutex<Vec<Subscription>>,
    file: PathBuf,
    /// One rewrite of the file at a time, each of the list as it is then.
    saving: tokio::sync::Mutex<()>,
    client: super::HttpClient,
    /// The VAPID `sub` claim: how a push service's operator reaches ours.
    contact: String,
    public_url: Option<String>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Push {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Push").field("public_key", &self.public_key).finish_non_exhaustive()
    }
}

impl Push {
    /// Reads (or makes) the key and reads the subscriptions. A key that
    /// cannot be read or made stops the server at start-up; a damaged
    /// subscriptions file is logged and set aside (browsers subscribe again).
    pub fn open(
        data_dir: &Path,
        client: super::HttpClient,
        contact: String,
        public_url: Option<String>,
        stats: Arc<Stats>,
    ) -> anyhow::Result<Push> {
        let key_path = data_dir.join(KEY_FILE);
        let secret = load_or_make_key(&key_path).with_context(|| format!("while reading {}", key_path.display()))?;
        let public_key = URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes());
        let file = data_dir.join(SUBSCRIPTIONS_FILE);
        let subscriptions = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<Vec<Subscription>>(&bytes) {
                Ok(list) => list.into_iter().filter(|s| validate(s).is_ok()).take(MAX_SUBSCRIPTIONS).collect(),
                Err(err) => {
                    let aside = data_dir.join(format!("{SUBSCRIPTIONS_FILE}.damaged"));
                    tracing::error!(%err, path = %file.display(), aside = %aside.display(),
                        "push subscriptions unreadable: set aside; browsers must subscribe again");
                    let _ = std::fs::rename(&file, &aside);
                    Vec::new()
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => return Err(err).with_context(|| format!("while reading {}", file.display())),
        };
        Ok(Push {
            key: p256::ecdsa::SigningKey::from(&secret),
            public_key,
            subscriptions: Mutex::new(subscriptions),
            file,
            saving: tokio::sync::Mutex::new(()),
            client,
            contact,
            public_url,
            stats,
        })
    }

    /// The HTTP client it sends with, for the other channels to share.
    pub fn client(&self) -> super::HttpClient {
        self.client.clone()
    }

    /// The public key browsers subscribe with (`applicationServerKey`).
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    pub fn subscription_count(&self) -> usize {
        self.lock().len()
    }

    /// Adds a subscription, or replaces the one with its endpoint.
    pub async fn subscribe(&self, subscription: Subscription) -> Result<(), SubscribeError> {
        validate(&subscription)?;
        let _saving = self.saving.lock().await;
        let before = self.lock().clone();
        {
            let mut list = self.lock();
            list.retain(|s| s.endpoint != subscription.endpoint);
            if list.len() >= MAX_SUBSCRIPTIONS {
                *list = before;
                return Err(SubscribeError::TooMany);
            }
            list.push(subscription);
        }
        if let Err(err) = self.save().await {
            *self.lock() = before;
            return Err(SubscribeError::Storage(err));
        }
        Ok(())
    }

    /// Removes the subscription with this endpoint; false if there was none.
    pub async fn unsubscribe(&self, endpoint: &str) -> Result<bool, SubscribeError> {
        let _saving = self.saving.lock().await;
        let before = self.lock().clone();
        let removed = {
            let mut list = self.lock();
            list.retain(|s| s.endpoint != endpoint);
            list.len() < before.len()
        };
        if removed && let Err(err) = self.save().await {
            *self.lock() = before;
            return Err(SubscribeError::Storage(err));
        }
        Ok(removed)
    }

    /// Writes the list as it is now (the caller holds `saving`), off the
    /// runtime's threads.
    async fn save(&self) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(&*self.lock()).map_err(|e| e.to_string())?;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || write_atomically(&file, &json, 0o600))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Sends a note to every subscription at once.
    async fn send_all(&self, note: &Note) -> Delivered {
        let subscriptions = self.lock().clone();
        if subscriptions.is_empty() {
            return Delivered::default();
        }
        let payload = note.to_json(self.public_url.as_deref()).to_string();
        let outcomes =
            futures_util::future::join_all(subscriptions.iter().map(|s| self.send_one(s, note, &payload))).await;
        let mut delivered = Delivered::default();
        let mut gone = Vec::new();
        for (subscription, outcome) in subscriptions.iter().zip(outcomes) {
            match outcome {
                Outcome::Sent => delivered.sent += 1,
                Outcome::Failed => delivered.failed += 1,
                Outcome::Gone => {
                    delivered.failed += 1;
                    gone.push(subscription.endpoint.clone());
                }
            }
        }
        for endpoint in gone {
            match self.unsubscribe(&endpoint).await {
                Ok(true) => {
                    self.stats.pruned.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(err) => tracing::error!(%err, "could not remove a dead push subscription"),
            }
        }
        delivered
    }

    async fn send_one(&self, subscription: &Subscription, note: &Note, payload: &str) -> Outcome {
        let Ok(target) = target(subscription) else {
            return Outcome::Gone;
        };
        let to = origin(&target.endpoint);
        let body = match web_push_native::encrypt(payload.as_bytes().to_vec(), &target.public, &target.auth) {
            Ok(body) => body,
            Err(err) => {
                tracing::warn!(%to, %err, "could not encrypt a push message");
                return Outcome::Failed;
            }
        };
        let authorization = format!("vapid t={}, k={}", self.token(&target.endpoint), self.public_key);
        let client = match self.client.get().await {
            Ok(client) => client,
            Err(why) => {
                tracing::warn!(%to, %why, "push message failed");
                return Outcome::Failed;
            }
        };
        let sent = client
            .post(target.endpoint.clone())
            .header("TTL", TTL.as_secs())
            .header("Urgency", note.priority.urgency())
            .header(reqwest::header::CONTENT_ENCODING, "aes128gcm")
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::AUTHORIZATION, authorization)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => Outcome::Sent,
            Ok(response) if matches!(response.status().as_u16(), 404 | 410) => {
                tracing::info!(%to, status = %response.status(), "push subscription gone: removing it");
                Outcome::Gone
            }
            Ok(response) => {
                tracing::warn!(%to, status = %response.status(), "push message refused");
                Outcome::Failed
            }
            Err(err) => {
                // The endpoint's path is the subscription's secret.
                tracing::warn!(%to, err = %err.without_url(), "push message failed");
                Outcome::Failed
            }
        }
    }

    /// A VAPID token (RFC 8292 §2): an ES256 JWT naming the push service's
    /// origin as its audience, good for [`TTL`].
    fn token(&self, endpoint: &reqwest::Url) -> String {
        let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default() + TTL;
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({ "aud": origin(endpoint), "exp": exp.as_secs(), "sub": self.contact });
        let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature: p256::ecdsa::Signature = self.key.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Subscription>> {
        self.subscriptions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

enum Outcome {
    Sent,
    Failed,
    /// The push service no longer knows the subscription.
    Gone,
}

impl Channel for Push {
    fn name(&self) -> ChannelName {
        ChannelName::WebPush
    }

    fn deliver<'a>(&'a self, note: &'a Note) -> BoxFuture<'a, Delivered> {
        Box::pin(self.send_all(note))
    }
}

/// The key in `path` (its 32-byte scalar, base64url), made on first use.
fn load_or_make_key(path: &Path) -> anyhow::Result<p256::SecretKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = decode(text.trim()).context("not base64url")?;
            p256::SecretKey::from_slice(&bytes).map_err(|_| anyhow::anyhow!("not a P-256 private key"))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let secret = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
            let text = format!("{}\n", URL_SAFE_NO_PAD.encode(secret.to_bytes()));
            write_atomically(path, text.as_bytes(), 0o600)?;
            tracing::info!(path = %path.display(), "made a VAPID key pair for Web Push");
            Ok(secret)
        }
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn browser_keys() -> Keys {
        let secret = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        Keys {
            p256dh: URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes()),
            auth: URL_SAFE_NO_PAD.encode([7u8; 16]),
        }
    }

    fn subscription(endpoint: &str) -> Subscription {
        Subscription { endpoint: endpoint.into(), keys: browser_keys() }
    }

    #[test]
    fn subscriptions_are_checked_strictly() {
        assert_eq!(validate(&subscription("https://push.example/send/abc")), Ok(()));
        assert_eq!(validate(&subscription("http://127.0.0.1:9/push")), Ok(()), "http to loopback");
        assert_eq!(validate(&subscription("http://[::1]:9/push")), Ok(()));
        assert_eq!(validate(&subscription("http://localhost:9/push")), Ok(()));
        assert_eq!(validate(&subscription("http://push.example/send")), Err(Invalid::NotHttps));
        assert_eq!(validate(&subscription("http://10.0.0.1/send")), Err(Invalid::NotHttps));
        assert_eq!(validate(&subscription("ftp://push.example/send")), Err(Invalid::NotHttps));
        assert_eq!(validate(&subscription("not a url")), Err(Invalid::NotAUrl));
        assert_eq!(validate(&subscription("https://u:p@push.example/")), Err(Invalid::Extras));
        let long = format!("https://push.example/{}", "a".repeat(MAX_ENDPOINT));
        assert_eq!(validate(&subscription(&long)), Err(Invalid::TooLong));

        let mut bad = subscription("https://push.example/");
        bad.keys.auth = URL_SAFE_NO_PAD.encode([1u8; 15]);
        assert_eq!(validate(&bad), Err(Invalid::BadAuth));
        bad = subscription("https://push.example/");
        bad.keys.p256dh = URL_SAFE_NO_PAD.encode([4u8; 65]);
        assert_eq!(validate(&bad), Err(Invalid::BadP256dh), "not a point on the curve");
        bad.keys.p256dh = "!!".into();
        assert_eq!(validate(&bad), Err(Invalid::BadP256dh));
        let mut padded = subscription("https://push.example/");
        padded.keys.auth = base64::engine::general_purpose::URL_SAFE.encode([7u8; 16]);
        assert_eq!(validate(&padded), Ok(()), "padding is accepted");
    }

    #[tokio::test]
    async fn the_key_and_subscriptions_survive_a_reopen_in_private_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            Push::open(
                dir.path(),
                crate::notify::HttpClient::default(),
                "mailto:ops@example.org".into(),
                None,
                Arc::default(),
            )
            .unwrap()
        };
        let push = open();
        assert_eq!(URL_SAFE_NO_PAD.decode(push.public_key()).unwrap().len(), 65);
        push.subscribe(subscription("https://push.example/a")).await.unwrap();
        let again = subscription("https://push.example/a");
        push.subscribe(again.clone()).await.unwrap();
        assert_eq!(push.subscription_count(), 1, "the same endpoint replaces");
        for _ in 1..MAX_SUBSCRIPTIONS {
            push.subscribe(subscription(&format!("https://push.example/{}", uuid::Uuid::new_v4()))).await.unwrap();
        }
        let over = push.subscribe(subscription("https://push.example/one-too-many")).await;
        assert!(matches!(over, Err(SubscribeError::TooMany)), "{over:?}");
        assert!(push.unsubscribe("https://push.example/a").await.unwrap());
        assert!(!push.unsubscribe("https://push.example/a").await.unwrap());

        let reopened = open();
        assert_eq!(reopened.public_key(), push.public_key(), "the same key");
        assert_eq!(reopened.subscription_count(), MAX_SUBSCRIPTIONS - 1);
        for file in [KEY_FILE, SUBSCRIPTIONS_FILE] {
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }
}
