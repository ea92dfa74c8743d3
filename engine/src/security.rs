//! The node's security material as one handle: JWT keys, the TLS listener's
//! certificate, and the settings `/health` reports. Reloaded together on
//! SIGHUP and `POST /reload`; a bad file is refused loudly and the old
//! material kept.

use crate::auth::{AuthMode, AuthStats, SharedKeys};
use crate::config::Config;
use crate::tls::TlsContext;
use std::sync::Arc;

pub struct Security {
    pub mode: AuthMode,
    pub keys: Arc<SharedKeys>,
    pub tls: Option<Arc<TlsContext>>,
    pub insecure_no_auth: bool,
    pub stats: Arc<AuthStats>,
}

impl Security {
    /// Loads everything once at start; an error refuses the start.
    pub fn open(config: &Config) -> Result<Security, String> {
        let keys = match config.auth.mode {
            AuthMode::Jwt => SharedKeys::open(config.auth.jwt_keys.as_deref())?,
            AuthMode::None => SharedKeys::open(None)?,
        };
        let tls_listener = config.tls_listen.is_some() || config.mqtt_tls_listen.is_some();
        let tls = match (tls_listener, &config.tls_cert, &config.tls_key) {
            (true, Some(cert), Some(key)) => Some(Arc::new(TlsContext::open(cert, key)?)),
            _ => None,
        };
        Ok(Security {
            mode: config.auth.mode,
            keys: Arc::new(keys),
            tls,
            insecure_no_auth: config.auth.insecure_no_auth,
            stats: Arc::new(AuthStats::default()),
        })
    }

    /// Reads keys and certificates again. Ok: what was reloaded; Err: what
    /// failed (anything that failed keeps its old material).
    pub fn reload(&self) -> Result<String, String> {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        if self.mode == AuthMode::Jwt {
            match self.keys.reload() {
                Ok(n) => done.push(format!("{n} JWT keys")),
                Err(e) => failed.push(e),
            }
        }
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => done.push("the TLS certificate".to_string()),
                Err(e) => failed.push(e),
            }
        }
        if failed.is_empty() {
            let what = if done.is_empty() {
                "nothing to reload".to_string()
            } else {
                format!("reloaded {}", done.join(" and "))
            };
            tracing::info!("{what}");
            Ok(what)
        } else {
            let why = failed.join("; ");
            tracing::error!(error = %why, "reload refused: the old keys and certificates stay in use");
            Err(why)
        }
    }

    /// Warnings for /health and the start log.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.mode == AuthMode::None && self.insecure_no_auth {
            w.push(
                "--insecure-no-auth: a non-loopback client listener without authentication \
                 (anyone can log in as anyone)"
                    .to_string(),
            );
        }
        w
    }
}
