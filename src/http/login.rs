//! Signing browsers in (README, "The web console"): one-time login links,
//! and the signed, expiring cookies they become.
//!
//! A link comes from the start-up announcement on a bare machine's first
//! run, or from `breakglass login` at any time, in any auth mode. The
//! command and the server share nothing but the data directory, so this
//! module is the only code that knows these files:
//!
//! - `login.key`: the HMAC key that signs cookies. Replacing or deleting it
//!   signs every browser out; the server notices at the next check (one
//!   `stat` per cookie it is shown) and rotates, without a restart.
//! - `logins/<SHA-256 of a token, hex>`: a link minted by `breakglass
//!   login`, holding its expiry in Unix seconds. The token itself is never
//!   written down: it leaves the command only on its stdout. Deleted when
//!   used; expired ones are deleted when next seen.
//! - `listen`: the URL the server listens on, so the command can print a
//!   whole link.
//!
//! A cookie is `<id>.<expiry>.<mode>.<signature>`: it says when it stops
//! being good and under which auth mode it was signed, and is refused under
//! any other (a first-run cookie says nothing about who may call once a
//! token or a proxy guards the server).

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, Config};
use crate::files::{match_parent_owner, write_atomically};
use crate::util::random_token;

/// The console's session cookie.
pub const COOKIE: &str = "breakglass";
/// How long a link from `breakglass login` may wait to be opened.
pub const LINK_TTL: Duration = Duration::from_secs(5 * 60);

const KEY_FILE: &str = "login.key";
const LINKS_DIR: &str = "logins";
const LISTEN_FILE: &str = "listen";

/// How `/api` is guarded, as far as a login cookie cares: a cookie is good
/// only under the mode it was signed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Neither a bearer token nor trusted proxies: a bare machine's first run.
    Open,
    /// A bearer token, trusted proxies, or both.
    Guarded,
}

impl Mode {
    pub fn of(auth: &AuthConfig) -> Self {
        if auth.is_first_run() { Mode::Open } else { Mode::Guarded }
    }

    fn tag(self) -> &'static str {
        match self {
            Mode::Open => "open",
            Mode::Guarded => "guarded",
        }
    }
}

/// What a cookie shown to the server is worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieCheck {
    Valid,
    /// Signed by us, but past its expiry.
    Expired,
    /// Signed by us under the other [`Mode`].
    OtherMode,
    /// Not signed with the current key: forged, mangled, or signed out.
    Invalid,
}

/// A cookie handed to a browser that opened a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub value: String,
    /// The browser keeps it as long as the server accepts it.
    pub max_age: Duration,
}

/// The server's side of signing in: redeems links, signs and checks cookies.
#[derive(Debug)]
pub struct Logins {
    /// The token of the link printed at start-up, until it is used or every
    /// login is revoked.
    startup: Mutex<Option<String>>,
    key: KeyFile,
    /// Where `breakglass login` leaves its links.
    links: PathBuf,
    mode: Mode,
    /// How long a cookie is good for (`BREAKGLASS_LOGIN_TTL_SECONDS`).
    ttl: Duration,
}

impl Logins {
    /// Logins over `data_dir`, touching no file until first used.
    pub fn new(data_dir: &Path, startup: Option<String>, mode: Mode, ttl: Duration) -> Self {
        Logins {
            startup: Mutex::new(startup),
            key: KeyFile::new(data_dir.join(KEY_FILE)),
            links: data_dir.join(LINKS_DIR),
            mode,
            ttl,
        }
    }

    /// The server's logins: reads (or creates) the key, so that a key we
    /// cannot read stops the server at start-up, then makes room for links
    /// and says where the server listens. Those two are only for `breakglass
    /// login`: failing them (a full disk) is logged, and the console stays
    /// up for everything else (README, "Data, durability and backups").
    pub fn open(config: &Config, listening: SocketAddr) -> anyhow::Result<Self> {
        let logins = Logins::new(
            &config.data_dir,
            config.auth.login_token.clone(),
            Mode::of(&config.auth),
            config.auth.login_ttl,
        );
        logins.key.current().with_context(|| format!("while reading {}", logins.key.path.display()))?;
        let listen = config.data_dir.join(LISTEN_FILE);
        let url = format!("{}\n", local_url(listening));
        let ready = private_dir(&logins.links).and_then(|()| {
            write_atomically(&listen, url.as_bytes(), 0o644)
                .with_context(|| format!("while writing {}", listen.display()))
        });
        if let Err(err) = ready {
            tracing::warn!(err = format!("{err:#}"), "`breakglass login` will not work with this server");
        }
        Ok(logins)
    }

    /// Exchanges a link's token, once, for a cookie. Reads the links
    /// directory: call it off the async runtime.
    pub fn redeem(&self, token: &str) -> Option<Cookie> {
        self.redeem_at(token, unix_now())
    }

    fn redeem_at(&self, token: &str, now: Duration) -> Option<Cookie> {
        // The key first: a token spent on a cookie we cannot sign is lost.
        let key = self.current_key()?;
        let redeemed = {
            let mut startup = lock(&self.startup);
            let matches = startup.as_deref().is_some_and(|t| bool::from(t.as_bytes().ct_eq(token.as_bytes())));
            if matches {
                *startup = None;
            }
            matches
        };
        if !redeemed && !self.redeem_link(token, now.as_secs()) {
            return None;
        }
        // Whole seconds, rounded up: a cookie is good for at least the TTL.
        let expiry = now.as_secs() + 1 + self.ttl.as_secs();
        let body = format!("{}.{expiry}.{}", random_token(), self.mode.tag());
        Some(Cookie { value: format!("{body}.{}", sign(&key, &body)), max_age: self.ttl })
    }

    /// Finds the link minted for `token`, and deletes it: the deletion is
    /// the claim, so two requests racing with one link get one cookie.
    /// Expired and unreadable links are deleted on the way.
    fn redeem_link(&self, token: &str, now: u64) -> bool {
        let wanted = sha256_hex(token.as_bytes());
        let Ok(entries) = fs::read_dir(&self.links) else {
            return false;
        };
        let mut found = None;
        for entry in entries.flatten() {
            let name = entry.file_name();
            // Anything else is a link still being written, or not ours.
            let Some(name) = name.to_str().filter(|n| is_sha256_hex(n)) else {
                continue;
            };
            let expiry = fs::read_to_string(entry.path()).ok().and_then(|text| text.trim().parse::<u64>().ok());
            // Beyond what `breakglass login` writes: not one of its links.
            let plausible = expiry.is_some_and(|e| now < e && e <= now + LINK_TTL.as_secs() + 60);
            if !plausible {
                let _ = fs::remove_file(entry.path());
            } else if bool::from(name.as_bytes().ct_eq(wanted.as_bytes())) {
                found = Some(entry.path());
            }
        }
        found.is_some_and(|path| fs::remove_file(path).is_ok())
    }

    /// Whether a cookie the browser sent is still good.
    pub fn check(&self, cookie: &str) -> CookieCheck {
        self.check_at(cookie, unix_now())
    }

    fn check_at(&self, cookie: &str, now: Duration) -> CookieCheck {
        let Some((body, signature)) = cookie.rsplit_once('.') else {
            return CookieCheck::Invalid;
        };
        let Some(key) = self.current_key() else {
            return CookieCheck::Invalid;
        };
        if !bool::from(sign(&key, body).as_bytes().ct_eq(signature.as_bytes())) {
            return CookieCheck::Invalid;
        }
        let mut fields = body.split('.');
        let (Some(_id), Some(expiry), Some(mode), None) = (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return CookieCheck::Invalid;
        };
        if mode != self.mode.tag() {
            return CookieCheck::OtherMode;
        }
        match expiry.parse::<u64>() {
            Ok(expiry) if now.as_secs() < expiry => CookieCheck::Valid,
            Ok(_) => CookieCheck::Expired,
            Err(_) => CookieCheck::Invalid,
        }
    }

    /// The signing key as the file holds it now. A key that changed under
    /// us is a revocation: the start-up link goes with the cookies. Without
    /// a usable key, no cookie is good (the failure is logged).
    fn current_key(&self) -> Option<Arc<[u8]>> {
        match self.key.current() {
            Ok((key, Freshness::Same)) => Some(key),
            Ok((key, Freshness::Replaced)) => {
                tracing::warn!("{} changed: every browser is signed out", self.key.path.display());
                lock(&self.startup).take();
                Some(key)
            }
            Err(err) => {
                tracing::error!(%err, path = %self.key.path.display(), "cannot read the login key: refusing every cookie");
                None
            }
        }
    }
}

/// `breakglass login`: leaves a fresh link for the server in `data_dir` and
/// returns its token (good once, for [`LINK_TTL`]).
pub fn mint_link(data_dir: &Path) -> anyhow::Result<String> {
    let links = data_dir.join(LINKS_DIR);
    private_dir(&links)?;
    let token = random_token();
    let expiry = unix_now().as_secs() + LINK_TTL.as_secs();
    let path = links.join(sha256_hex(token.as_bytes()));
    write_atomically(&path, format!("{expiry}\n").as_bytes(), 0o600)
        .with_context(|| format!("while writing {}", path.display()))?;
    Ok(token)
}

/// `breakglass login --revoke-all`: a new key (every cookie is void) and no
/// links waiting to be opened.
pub fn revoke_all(data_dir: &Path) -> anyhow::Result<()> {
    let key = data_dir.join(KEY_FILE);
    write_atomically(&key, random_token().as_bytes(), 0o600)
        .with_context(|| format!("while writing {}", key.display()))?;
    let links = data_dir.join(LINKS_DIR);
    match fs::read_dir(&links) {
        Ok(entries) => {
            for entry in entries {
                let path = entry.with_context(|| format!("while reading {}", links.display()))?.path();
                fs::remove_file(&path).with_context(|| format!("while removing {}", path.display()))?;
            }
            Ok(())
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("while reading {}", links.display())),
    }
}

/// The URL the server in `data_dir` said it listens on.
pub fn listening_url(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(LISTEN_FILE);
    let text = fs::read_to_string(&path).with_context(|| {
        format!("cannot read {}: is the server running with this data directory? (or give --url)", path.display())
    })?;
    Ok(text.trim().to_owned())
}

/// How this host reaches the listener: an unspecified address is reached on
/// loopback.
fn local_url(addr: SocketAddr) -> String {
    let reachable = match addr.ip() {
        ip if !ip.is_unspecified() => addr,
        std::net::IpAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        std::net::IpAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
    };
    format!("http://{reachable}")
}

/// `login.key`, re-read whenever the file is no longer the one read last.
#[derive(Debug)]
struct KeyFile {
    path: PathBuf,
    loaded: Mutex<Option<(Stamp, Arc<[u8]>)>>,
}

/// Whether the key is the one read before.
enum Freshness {
    Same,
    Replaced,
}

/// What tells one version of a file from another without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        Stamp { dev: meta.dev(), ino: meta.ino(), len: meta.len(), mtime: meta.mtime(), mtime_nsec: meta.mtime_nsec() }
    }
}

/// Keys shorter than this are not ours (or were cut short): replaced.
const MIN_KEY_LEN: usize = 32;

impl KeyFile {
    fn new(path: PathBuf) -> Self {
        KeyFile { path, loaded: Mutex::new(None) }
    }

    fn current(&self) -> io::Result<(Arc<[u8]>, Freshness)> {
        let mut loaded = lock(&self.loaded);
        // A key written here is read back like any other, so that a
        // `breakglass login --revoke-all` racing with us settles on one file.
        for _ in 0..3 {
            match fs::metadata(&self.path) {
                Ok(meta) => {
                    if let Some((stamp, key)) = loaded.as_ref()
                        && *stamp == Stamp::of(&meta)
                    {
                        return Ok((key.clone(), Freshness::Same));
                    }
                    let mut file = fs::File::open(&self.path)?;
                    let stamp = Stamp::of(&file.metadata()?);
                    let mut key = Vec::new();
                    io::Read::read_to_end(&mut file, &mut key)?;
                    if key.len() >= MIN_KEY_LEN {
                        let freshness = if loaded.is_some() { Freshness::Replaced } else { Freshness::Same };
                        let key: Arc<[u8]> = key.into();
                        *loaded = Some((stamp, key.clone()));
                        return Ok((key, freshness));
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
            write_atomically(&self.path, random_token().as_bytes(), 0o600)?;
        }
        Err(io::Error::other("the key keeps changing while it is read"))
    }
}

fn sign(key: &[u8], body: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(body.as_bytes());
    hex(&mac.finalize().into_bytes())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_sha256_hex(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A directory only its owner may read (it holds links), owned like the
/// data directory holding it: `breakglass login` run as root must leave
/// files the server's user can read and delete.
fn private_dir(path: &Path) -> anyhow::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => match_parent_owner(path).with_context(|| format!("while creating {}", path.display())),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(err).with_context(|| format!("while creating {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn at(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_cookie_is_good_until_its_expiry_and_only_in_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let open = Logins::new(dir.path(), Some("t0ken".into()), Mode::Open, TTL);
        let cookie = open.redeem_at("t0ken", at(1_000)).expect("the start-up token");
        assert_eq!(cookie.max_age, TTL);
        assert_eq!(open.check_at(&cookie.value, at(1_000)), CookieCheck::Valid);
        assert_eq!(open.check_at(&cookie.value, at(1_060)), CookieCheck::Valid, "at least the whole TTL");
        assert_eq!(open.check_at(&cookie.value, at(1_061)), CookieCheck::Expired);

        let guarded = Logins::new(dir.path(), None, Mode::Guarded, TTL);
        assert_eq!(guarded.check_at(&cookie.value, at(1_000)), CookieCheck::OtherMode, "same key, other mode");

        let (body, _) = cookie.value.rsplit_once('.').unwrap();
        let forged = [
            format!("{body}.{}", "0".repeat(64)),
            cookie.value.replace(".open.", ".guarded."),
            cookie.value.replacen('.', ".9", 1),
            "guess".to_owned(),
            String::new(),
        ];
        for forged in forged {
            assert_eq!(guarded.check_at(&forged, at(1_000)), CookieCheck::Invalid, "{forged}");
        }
    }

    #[test]
    fn a_minted_link_works_once_and_expired_ones_are_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let logins = Logins::new(dir.path(), None, Mode::Guarded, TTL);
        let token = mint_link(dir.path()).unwrap();
        let now = unix_now();
        assert_eq!(logins.redeem_at("not the token", now), None);
        assert!(logins.redeem_at(&token, now).is_some());
        assert_eq!(logins.redeem_at(&token, now), None, "once");

        let stale = mint_link(dir.path()).unwrap();
        fs::write(dir.path().join(LINKS_DIR).join("stray"), "not a link").unwrap();
        let later = now + LINK_TTL + Duration::from_secs(1);
        assert_eq!(logins.redeem_at(&stale, later), None, "expired");
        let left: Vec<_> = fs::read_dir(dir.path().join(LINKS_DIR)).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["stray"], "the expired link is gone; what is not a link is left alone");
    }

    #[test]
    fn a_replaced_or_deleted_key_signs_everyone_out() {
        let dir = tempfile::tempdir().unwrap();
        let logins = Logins::new(dir.path(), None, Mode::Guarded, TTL);
        let first = logins.redeem_at(&mint_link(dir.path()).unwrap(), unix_now()).unwrap();
        assert_eq!(logins.check(&first.value), CookieCheck::Valid);
        fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(logins.check(&first.value), CookieCheck::Invalid);
        let key = fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(key.mode() & 0o777, 0o600, "a new key was made");

        let second = logins.redeem_at(&mint_link(dir.path()).unwrap(), unix_now()).unwrap();
        assert_eq!(logins.check(&second.value), CookieCheck::Valid);
        revoke_all(dir.path()).unwrap();
        assert_eq!(logins.check(&second.value), CookieCheck::Invalid);
    }

    #[test]
    fn revoking_voids_the_start_up_link_too() {
        let dir = tempfile::tempdir().unwrap();
        let logins = Logins::new(dir.path(), Some("t0ken".into()), Mode::Open, TTL);
        assert_eq!(logins.check("x.1.open.y"), CookieCheck::Invalid, "reads the key");
        revoke_all(dir.path()).unwrap();
        assert_eq!(logins.redeem("t0ken"), None);
    }
}
