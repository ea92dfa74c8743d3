//! Authentication of HELLO: `--auth none` (anyone is who they say; allowed
//! only while every client listener is on loopback, or with
//! `--insecure-no-auth`) or `--auth jwt` (the token is a JWT signed by one of
//! the configured public keys, whose `sub` is the HELLO user).
//!
//! JWT rules (docs/PROTOCOL.md "Authentication"): EdDSA (Ed25519), ES256 and
//! RS256 only; the header's `alg` must be the one of the key it names (`kid`,
//! a key file's stem), so `none` and HMAC-with-a-public-key are refused;
//! `exp` and `sub` are required, `nbf` is honoured, both with a leeway. Keys
//! are reloaded on SIGHUP and `POST /reload` (engine::admin): a bad key set
//! is refused and the old one kept; every key in the set is accepted, so a
//! rotation adds the new key, moves issuers over, then removes the old one.
//!
//! Verified tokens are cached per core (bounded), so a reconnect storm costs
//! a hash lookup per HELLO rather than a signature verification.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// How HELLO tokens are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No check: the HELLO user is taken at its word (loopback only, unless --insecure-no-auth).
    None,
    /// The token must be a JWT for the user, signed by a configured key.
    Jwt,
}

/// Why a HELLO was refused (ERROR 2). Logged and counted by reason; the
/// token itself is never logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token at all.
    Missing,
    /// Not a JWT, bad base64 or JSON, a required claim missing or mistyped.
    Malformed,
    /// The signature does not verify with the named key.
    Forged,
    /// Past `exp` (plus the leeway).
    Expired,
    /// Before `nbf` (minus the leeway).
    NotYetValid,
    /// `sub` is not the HELLO user, or not a valid user id (net::check_user_id).
    WrongSub,
    /// No configured key has the token's `kid` (or it names none and several are configured).
    UnknownKid,
    /// `alg` is not the named key's algorithm (`none`, HMAC, or another family).
    WrongAlg,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::Missing,
        Refusal::Malformed,
        Refusal::Forged,
        Refusal::Expired,
        Refusal::NotYetValid,
        Refusal::WrongSub,
        Refusal::UnknownKid,
        Refusal::WrongAlg,
    ];

    /// The `reason` label in /metrics and the logs.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Forged => "forged",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::WrongSub => "wrong_sub",
            Refusal::UnknownKid => "unknown_kid",
            Refusal::WrongAlg => "wrong_alg",
        }
    }
}

/// Counters of HELLO checks, for /metrics (shared by the cores).
#[derive(Debug, Default)]
pub struct AuthStats {
    pub accepted: AtomicU64,
    /// Signature verifications done (cache misses).
    pub verified: AtomicU64,
    pub refused: [AtomicU64; Refusal::ALL.len()],
}

impl AuthStats {
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }
}

/// One public key and the one algorithm it verifies.
struct Key {
    key: DecodingKey,
    alg: Algorithm,
}

/// The configured public keys, by `kid` (a key file's stem).
pub struct KeySet {
    keys: HashMap<String, Key>,
}

/// Largest key file read (a PEM public key is well under 4 KiB).
const KEY_FILE_BYTES_MAX: u64 = 64 << 10;
/// Keys in a `--jwt-keys` directory.
pub const KEYS_MAX: usize = 256;

impl KeySet {
    /// Loads PATH: one PEM public key, or a directory of them (`*.pem`; other
    /// files, such as `iris keygen`'s private `.key`, are skipped).
    pub fn load(path: &Path) -> Result<KeySet, String> {
        let meta =
            std::fs::metadata(path).map_err(|e| format!("JWT keys {}: {e}", path.display()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        if meta.is_dir() {
            let entries =
                std::fs::read_dir(path).map_err(|e| format!("JWT keys {}: {e}", path.display()))?;
            for entry in entries {
                let entry = entry.map_err(|e| format!("JWT keys {}: {e}", path.display()))?;
                let p = entry.path();
                if p.extension().is_some_and(|x| x == "pem") && p.is_file() {
                    files.push(p);
                }
            }
            files.sort();
        } else {
            files.push(path.to_path_buf());
        }
        if files.is_empty() {
            return Err(format!(
                "JWT keys {}: no *.pem public key in the directory",
                path.display()
            ));
        }
        if files.len() > KEYS_MAX {
            return Err(format!(
                "JWT keys {}: {} keys, more than {KEYS_MAX}",
                path.display(),
                files.len()
            ));
        }
        let mut keys = HashMap::new();
        for file in files {
            let kid = file
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| format!("JWT key {}: the file name is not UTF-8", file.display()))?
                .to_string();
            let key = load_key(&file)?;
            keys.insert(kid, key);
        }
        Ok(KeySet { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn find(&self, kid: Option<&str>) -> Option<&Key> {
        match kid {
            Some(kid) => self.keys.get(kid),
            None if self.keys.len() == 1 => self.keys.values().next(),
            None => None,
        }
    }
}

fn load_key(file: &Path) -> Result<Key, String> {
    let len = std::fs::metadata(file)
        .map_err(|e| format!("JWT key {}: {e}", file.display()))?
        .len();
    if len > KEY_FILE_BYTES_MAX {
        return Err(format!(
            "JWT key {}: {len} bytes, not a PEM key",
            file.display()
        ));
    }
    let pem = std::fs::read(file).map_err(|e| format!("JWT key {}: {e}", file.display()))?;
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("-----BEGIN PUBLIC KEY-----")
        && !text.contains("-----BEGIN RSA PUBLIC KEY-----")
    {
        return Err(format!(
            "JWT key {}: not a PEM public key (BEGIN PUBLIC KEY); a private key does not belong here",
            file.display()
        ));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok(Key {
            key,
            alg: Algorithm::EdDSA,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok(Key {
            key,
            alg: Algorithm::ES256,
        });
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok(Key {
            key,
            alg: Algorithm::RS256,
        });
    }
    Err(format!(
        "JWT key {}: not an Ed25519, P-256 or RSA public key",
        file.display()
    ))
}

/// The node's key set, replaced whole on reload; cores notice by generation.
pub struct SharedKeys {
    path: Option<PathBuf>,
    current: RwLock<Arc<KeySet>>,
    generation: AtomicU64,
}

impl SharedKeys {
    /// Loads the keys once at start (an error refuses the start).
    pub fn open(path: Option<&Path>) -> Result<SharedKeys, String> {
        let set = match path {
            Some(p) => KeySet::load(p)?,
            None => KeySet {
                keys: HashMap::new(),
            },
        };
        Ok(SharedKeys {
            path: path.map(Path::to_path_buf),
            current: RwLock::new(Arc::new(set)),
            generation: AtomicU64::new(1),
        })
    }

    /// Reads the keys again. On error the old set stays and the error is returned.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let set = KeySet::load(path)?;
        let n = set.len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(n)
    }

    fn snapshot(&self) -> (u64, Arc<KeySet>) {
        let generation = self.generation.load(Ordering::Acquire);
        let set = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (generation, set)
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
}

#[derive(serde::Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// A verified token, remembered for later HELLOs with the same bytes.
struct Verified {
    sub: Box<str>,
    exp: u64,
    nbf: u64,
}

/// What a core checks HELLOs with: the mode, its view of the key set, and
/// its cache of verified tokens.
pub struct Authenticator {
    mode: AuthMode,
    keys: Arc<SharedKeys>,
    generation: u64,
    set: Arc<KeySet>,
    leeway_s: u64,
    cache: HashMap<Box<[u8]>, Verified, ahash::RandomState>,
    cache_entries_max: usize,
    stats: Arc<AuthStats>,
}

/// Longest token looked at (a JWT with an RS256 signature is under 1 KiB);
/// longer is Malformed without parsing.
pub const TOKEN_BYTES_MAX: usize = 8 << 10;

impl Authenticator {
    pub fn new(
        mode: AuthMode,
        keys: Arc<SharedKeys>,
        leeway_s: u64,
        cache_entries_max: usize,
        stats: Arc<AuthStats>,
    ) -> Authenticator {
        let (generation, set) = keys.snapshot();
        Authenticator {
            mode,
            keys,
            generation,
            set,
            leeway_s,
            cache: HashMap::with_hasher(ahash::RandomState::new()),
            cache_entries_max,
            stats,
        }
    }

    /// Whether `token` proves the identity `user` at `now_s` (Unix seconds).
    pub fn check(&mut self, user: &str, token: &[u8], now_s: u64) -> Result<(), Refusal> {
        let result = match self.mode {
            AuthMode::None => Ok(()),
            AuthMode::Jwt => self.check_jwt(user, token, now_s),
        };
        match result {
            Ok(()) => self.stats.accepted.fetch_add(1, Ordering::Relaxed),
            Err(why) => self.stats.refused[why as usize].fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    fn check_jwt(&mut self, user: &str, token: &[u8], now_s: u64) -> Result<(), Refusal> {
        if token.is_empty() {
            return Err(Refusal::Missing);
        }
        if token.len() > TOKEN_BYTES_MAX {
            return Err(Refusal::Malformed);
        }
        let generation = self.keys.generation.load(Ordering::Acquire);
        if generation != self.generation {
            (self.generation, self.set) = self.keys.snapshot();
            self.cache.clear(); // a removed key's tokens must not stay good
        }
        if let Some(v) = self.cache.get(token) {
            return self.times_and_sub(user, &v.sub, v.exp, v.nbf, now_s);
        }
        let text = std::str::from_utf8(token).map_err(|_| Refusal::Malformed)?;
        let header = parse_header(text)?;
        let key = self
            .set
            .find(header.kid.as_deref())
            .ok_or(Refusal::UnknownKid)?;
        let alg = match header.alg.as_str() {
            "EdDSA" => Algorithm::EdDSA,
            "ES256" => Algorithm::ES256,
            "RS256" => Algorithm::RS256,
            _ => return Err(Refusal::WrongAlg), // none, HS*, and everything else
        };
        if alg != key.alg {
            return Err(Refusal::WrongAlg);
        }
        let mut validation = Validation::new(alg);
        // Times are checked below against our clock (and cached); the
        // library checks the signature and the claims' shape.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
        self.stats.verified.fetch_add(1, Ordering::Relaxed);
        let data = jsonwebtoken::decode::<Claims>(text, &key.key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => Refusal::Forged,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => Refusal::WrongAlg,
                ErrorKind::ExpiredSignature => Refusal::Expired,
                ErrorKind::ImmatureSignature => Refusal::NotYetValid,
                _ => Refusal::Malformed,
            }
        })?;
        let claims = data.claims;
        let verified = Verified {
            sub: claims.sub.into(),
            exp: claims.exp,
            nbf: claims.nbf.unwrap_or(0),
        };
        let result = self.times_and_sub(user, &verified.sub, verified.exp, verified.nbf, now_s);
        if result.is_ok() {
            if self.cache.len() >= self.cache_entries_max {
                // Bounded: forget one arbitrary entry (a miss costs one verification).
                let any = self.cache.keys().next().cloned();
                if let Some(k) = any {
                    self.cache.remove(&k);
                }
            }
            self.cache.insert(token.into(), verified);
        }
        result
    }

    fn times_and_sub(
        &self,
        user: &str,
        sub: &str,
        exp: u64,
        nbf: u64,
        now_s: u64,
    ) -> Result<(), Refusal> {
        if now_s > exp.saturating_add(self.leeway_s) {
            return Err(Refusal::Expired);
        }
        if now_s.saturating_add(self.leeway_s) < nbf {
            return Err(Refusal::NotYetValid);
        }
        // The HELLO user passed the user id rule before the token is looked
        // at; `sub` is held to the same rule on its own, so no token can
        // ever name an id the rule refuses.
        let sub_valid = net::check_user_id(sub, net::limits::USER_ID_LEN_MAX_DEFAULT).is_ok();
        if !sub_valid || sub != user {
            return Err(Refusal::WrongSub);
        }
        Ok(())
    }
}

fn parse_header(token: &str) -> Result<Header, Refusal> {
    use base64::Engine;
    let mut parts = token.split('.');
    let (Some(encoded), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Malformed);
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| Refusal::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| Refusal::Malformed)
}

/// `iris keygen` and `iris token`: development keys and tokens.
pub mod dev {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header as JwtHeader};

    /// Writes `DIR/KID.key` (PKCS#8 private key, mode 0600) and `DIR/KID.pem`
    /// (the public key, for `--jwt-keys`). Refuses to overwrite.
    pub fn keygen(dir: &Path, kid: &str) -> Result<(PathBuf, PathBuf), String> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| format!("cannot generate an Ed25519 key: {e}"))?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let private = dir.join(format!("{kid}.key"));
        let public = dir.join(format!("{kid}.pem"));
        for p in [&private, &public] {
            if p.exists() {
                return Err(format!("{} exists; not overwritten", p.display()));
            }
        }
        write_private(&private, pair.serialize_pem().as_bytes())?;
        std::fs::write(&public, pair.public_key_pem())
            .map_err(|e| format!("{}: {e}", public.display()))?;
        Ok((private, public))
    }

    /// A token for `user`, valid `ttl_s` from now, signed with the private key
    /// in `key_file` (`kid`: the file's stem, as `--jwt-keys DIR` names keys).
    pub fn token(key_file: &Path, user: &str, ttl_s: u64, now_s: u64) -> Result<String, String> {
        Signer::load(key_file)?.token(user, ttl_s, now_s)
    }

    /// A private key loaded once, for many tokens (load drivers).
    pub struct Signer {
        key: EncodingKey,
        header: JwtHeader,
    }

    impl Signer {
        pub fn load(key_file: &Path) -> Result<Signer, String> {
            let pem =
                std::fs::read(key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
            let (key, alg) = if let Ok(k) = EncodingKey::from_ed_pem(&pem) {
                (k, Algorithm::EdDSA)
            } else if let Ok(k) = EncodingKey::from_ec_pem(&pem) {
                (k, Algorithm::ES256)
            } else if let Ok(k) = EncodingKey::from_rsa_pem(&pem) {
                (k, Algorithm::RS256)
            } else {
                return Err(format!(
                    "{}: not a PEM private key (Ed25519, P-256 or RSA)",
                    key_file.display()
                ));
            };
            let mut header = JwtHeader::new(alg);
            header.kid = key_file
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string);
            Ok(Signer { key, header })
        }

        pub fn token(&self, user: &str, ttl_s: u64, now_s: u64) -> Result<String, String> {
            #[derive(serde::Serialize)]
            struct Out<'a> {
                sub: &'a str,
                iat: u64,
                exp: u64,
            }
            let claims = Out {
                sub: user,
                iat: now_s,
                exp: now_s + ttl_s,
            };
            jsonwebtoken::encode(&self.header, &claims, &self.key)
                .map_err(|e| format!("cannot sign: {e}"))
        }
    }

    pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.write_all(bytes)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JWT whose `sub` breaks the user id rule is refused even when the
    /// user it is checked against is the same string (issue 21, item 2).
    /// Red with the `sub_valid` check planted out of `times_and_sub`: the
    /// token of "eve#" was accepted for "eve#".
    #[test]
    fn a_sub_that_breaks_the_user_id_rule_is_refused() {
        let dir = std::env::temp_dir().join(format!("iris-auth-sub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let keys_dir = dir.join("keys");
        // --jwt-keys DIR reads the `.pem` public keys and skips the `.key`.
        let (private, _public) = dev::keygen(&keys_dir, "k1").expect("keygen");
        let keys = Arc::new(SharedKeys::open(Some(&keys_dir)).expect("keys"));
        let stats = Arc::new(AuthStats::default());
        let mut auth = Authenticator::new(AuthMode::Jwt, keys, 60, 16, stats);
        let now = now_s();
        let good = dev::token(&private, "eve", 600, now).expect("token");
        assert_eq!(auth.check("eve", good.as_bytes(), now), Ok(()));
        for bad in ["eve#", "bob/alice", "x+y", "bel\u{7}", "nel\u{85}"] {
            let token = dev::token(&private, bad, 600, now).expect("token");
            assert_eq!(
                auth.check(bad, token.as_bytes(), now),
                Err(Refusal::WrongSub),
                "{bad:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
