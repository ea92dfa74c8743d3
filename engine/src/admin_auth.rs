//! The operator credential of the admin API (docs/ADMIN.md): a 256-bit
//! random token, kept in a file only its owner can read,
//! sent as `Authorization: Bearer <token>`.
//!
//! Out of the box a node writes `DATA/admin.token` (mode 0600) on its first
//! start and `iris admin …` reads it from the default data directory, so a
//! developer on a laptop types nothing more. A cluster names one token file
//! for all its nodes (`admin_token_file` in the cluster file, which
//! `iris dev-cluster` writes), and every command given `--cluster FILE` uses
//! it. Without a valid token only the routes named public answer
//! (`/health` and `/metrics` by default); everything that changes state or
//! returns message data answers 401.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Random bytes in a token (hex-encoded in the file and the header).
pub const TOKEN_BYTES: usize = 32;
/// Largest token file read (a token, a newline, some slack).
pub const TOKEN_FILE_BYTES_MAX: u64 = 4096;
/// The token file a node writes in its data directory.
pub const TOKEN_FILE_NAME: &str = "admin.token";
/// Environment variable naming a token file for `iris admin …`.
pub const TOKEN_FILE_ENV: &str = "IRIS_ADMIN_TOKEN_FILE";
/// Where `iris admin …` looks last: the default data directory's token.
pub const DEFAULT_TOKEN_PATH: &str = "./iris-data/admin.token";

/// Routes that may be opened to callers without the token
/// (`admin_public`); every other route always needs it.
pub const PUBLIC_ROUTES_ALLOWED: [&str; 4] = ["health", "metrics", "stats", "slots"];

/// The operator token, compared in constant time.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// What can go wrong with a token file (the environment, or an operator's
/// file; never a peer's bytes).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin token file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin token file {path} can be read by others (mode {mode:o}): `chmod 600 {path}`")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("admin token file {path}: {why}")]
    Malformed { path: PathBuf, why: &'static str },
}

impl Token {
    /// A fresh token from the kernel's random source.
    pub fn generate() -> std::io::Result<Token> {
        let mut bytes = [0u8; TOKEN_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Token(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Does `presented` equal this token? Constant time in the token's length.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Reads a token file: one token, owner-only permissions.
    pub fn read(path: &Path) -> Result<Token, TokenError> {
        let io = |source| TokenError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        file.take(TOKEN_FILE_BYTES_MAX)
            .read_to_string(&mut text)
            .map_err(io)?;
        let token = text.trim();
        let malformed = |why| TokenError::Malformed {
            path: path.to_path_buf(),
            why,
        };
        if token.len() < 32 {
            return Err(malformed("the token is shorter than 32 characters"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(malformed(
                "the token must be printable ASCII without spaces",
            ));
        }
        Ok(Token(token.to_string()))
    }

    /// Reads `path`, or writes a new token there (mode 0600) if it does not
    /// exist. Two processes racing to create it both end up with the winner's.
    pub fn read_or_create(path: &Path) -> Result<Token, TokenError> {
        match Token::read(path) {
            Err(TokenError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            other => return other,
        }
        match create_token_file(path) {
            Err(TokenError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Token::read(path)
            }
            other => other,
        }
    }
}

/// Writes a new token file at `path` (refusing to overwrite one).
pub fn create_token_file(path: &Path) -> Result<Token, TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let token = Token::generate().map_err(io)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(format!("{}\n", token.0).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    Ok(token)
}

/// The token `iris admin …` sends: from the file named on the command line,
/// else the one in `IRIS_ADMIN_TOKEN_FILE`, else the cluster file's, else
/// the default data directory's if it exists; none if nothing names one.
pub fn client_token(
    flag: Option<&Path>,
    cluster_token_file: Option<&Path>,
) -> Result<Option<Token>, TokenError> {
    let env = std::env::var_os(TOKEN_FILE_ENV).map(PathBuf::from);
    if let Some(path) = flag.map(Path::to_path_buf).or(env) {
        return Token::read(&path).map(Some);
    }
    if let Some(path) = cluster_token_file {
        return Token::read(path).map(Some);
    }
    let default = Path::new(DEFAULT_TOKEN_PATH);
    match Token::read(default) {
        Ok(token) => Ok(Some(token)),
        Err(TokenError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "iris-admin-auth-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_created_token_is_owner_only_and_read_back() {
        let d = dir();
        let path = d.join(TOKEN_FILE_NAME);
        let t = Token::read_or_create(&path).unwrap();
        assert_eq!(t.as_str().len(), 2 * TOKEN_BYTES);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Token::read_or_create(&path).unwrap();
        assert!(
            again.matches(t.as_str()),
            "the second start reads the same token"
        );
        assert!(!t.matches(&t.as_str()[1..]));
        let mut wrong = t.as_str().to_string();
        wrong.replace_range(0..1, if wrong.starts_with('0') { "1" } else { "0" });
        assert!(!t.matches(&wrong));
        assert!(create_token_file(&path).is_err(), "never overwritten");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        let d = dir();
        let path = d.join("t");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Token::read(&path),
            Err(TokenError::Exposed { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Token::read(&path).is_ok());
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(
            Token::read(&path),
            Err(TokenError::Malformed { .. })
        ));
        std::fs::remove_dir_all(d).unwrap();
    }
}
