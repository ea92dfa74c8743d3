//! TLS: the client listener's (rustls's unbuffered API on the connection
//! slots) and the certificate material of the node (`--tls-cert`/`--tls-key`,
//! reloaded on SIGHUP and `POST /reload`).
//!
//! A TLS connection is still its slot, plus a boxed `TlsConn`: rustls's
//! connection state and two byte queues that hold something only while a
//! record is incomplete (`pending_in`) or not yet taken by the socket
//! (`pending_out`). Ciphertext is read into the core's one scratch buffer and
//! decrypted in place; the plaintext goes into the connection's pooled read
//! buffer, where frames are decoded as on plain TCP. Answers are encrypted from
//! the plaintext outbox when it is flushed.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Largest TLS record on the wire: 16 KiB of plaintext plus header, padding
/// and tag (RFC 8446 5.2 allows 2^14 + 256 of ciphertext).
pub const TLS_RECORD_BYTES_MAX: usize = 5 + (1 << 14) + 256;
/// State-machine steps per pump (each step consumes or emits something).
const PUMP_STEPS_MAX: usize = 64;
/// A drained `pending_out` larger than this is freed rather than kept (0: always:
/// an idle TLS connection then holds no ciphertext buffer at all).
const PENDING_OUT_KEPT_BYTES_MAX: usize = 0;

/// The client listener's certificate and key, replaced whole on reload.
pub struct TlsContext {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("certificate file {}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("certificate file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "certificate file {}: no certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// The certificates of the PEM file `ca` as trust roots; errors name the
/// file as `what` ("cluster CA", "etcd CA").
pub fn load_roots(what: &str, ca: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| format!("{what} {}: {e}", ca.display()))?;
    }
    Ok(roots)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("key file {}: {e}", path.display()))
}

impl TlsContext {
    pub fn open(cert: &Path, key: &Path) -> Result<TlsContext, String> {
        let config = Self::load(cert, key)?;
        Ok(TlsContext {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(config),
        })
    }

    fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
        let certs = load_certs(cert)?;
        let key = load_key(key)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("TLS certificate and key do not go together: {e}"))?;
        config.max_early_data_size = 0;
        Ok(Arc::new(config))
    }

    /// Reads the certificate and key again; connections made from now on use
    /// them (open ones keep theirs). On error the old pair stays.
    pub fn reload(&self) -> Result<(), String> {
        let config = Self::load(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A TLS connection's state beside its slot.
pub struct TlsConn {
    conn: UnbufferedServerConnection,
    /// Ciphertext of an incomplete record (at most one record's worth).
    pub pending_in: Vec<u8>,
    /// Ciphertext to send; `pending_sent` of it went out already.
    pub pending_out: Vec<u8>,
    pub pending_sent: usize,
    /// The peer sent close_notify or the connection failed: nothing more is read.
    pub closed: bool,
}

/// What one pump of the state machine did.
pub struct Pumped {
    /// Bytes of `incoming` consumed (the rest is an incomplete record).
    pub consumed: usize,
    /// Plaintext bytes appended to the read buffer.
    pub plain: usize,
    /// Whether `app_out` was encrypted into `pending_out` (the handshake is done).
    pub encrypted: bool,
}

/// A TLS failure of a peer (bad record, bad handshake, alert).
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

impl TlsConn {
    pub fn new(config: Arc<ServerConfig>) -> Result<Box<TlsConn>, TlsError> {
        let conn = UnbufferedServerConnection::new(config).map_err(|e| TlsError(e.to_string()))?;
        Ok(Box::new(TlsConn {
            conn,
            pending_in: Vec::new(),
            pending_out: Vec::new(),
            pending_sent: 0,
            closed: false,
        }))
    }

    /// Bytes of ciphertext waiting for the socket.
    pub fn unsent(&self) -> &[u8] {
        &self.pending_out[self.pending_sent..]
    }

    /// Marks `n` bytes of `unsent()` as sent; frees a large drained buffer.
    pub fn sent(&mut self, n: usize) {
        self.pending_sent += n;
        if self.pending_sent == self.pending_out.len() {
            self.pending_sent = 0;
            if self.pending_out.capacity() > PENDING_OUT_KEPT_BYTES_MAX {
                self.pending_out = Vec::new();
            } else {
                self.pending_out.clear();
            }
        }
    }

    /// Runs the state machine over `incoming` (ciphertext, decrypted in
    /// place): handshake records are queued in `pending_out`, application
    /// data is appended to `plain[*plain_len..]` (the caller leaves room for
    /// all of `incoming`), and once the connection may send, `app_out`
    /// (plaintext) is encrypted into `pending_out`.
    pub fn pump(
        &mut self,
        incoming: &mut [u8],
        plain: &mut [u8],
        plain_len: &mut usize,
        app_out: &[u8],
    ) -> Result<Pumped, TlsError> {
        let mut pumped = Pumped {
            consumed: 0,
            plain: 0,
            encrypted: false,
        };
        for _ in 0..PUMP_STEPS_MAX {
            let status = self
                .conn
                .process_tls_records(&mut incoming[pumped.consumed..]);
            let mut discard = status.discard;
            let state = status.state.map_err(|e| TlsError(e.to_string()))?;
            let mut stop = false;
            match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(|e| TlsError(e.to_string()))?;
                        discard += record.discard;
                        let n = record.payload.len();
                        let room = plain.len() - *plain_len;
                        if n > room {
                            return Err(TlsError(format!(
                                "a record of {n} plaintext bytes with {room} bytes of room"
                            )));
                        }
                        plain[*plain_len..*plain_len + n].copy_from_slice(record.payload);
                        *plain_len += n;
                        pumped.plain += n;
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    append_grown(&mut self.pending_out, 1024, |buf| {
                        encode.encode(buf).map_err(|e| match e {
                            EncodeError::InsufficientSize(e) => Ok(e.required_size),
                            e => Err(e.to_string()),
                        })
                    })?;
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // Queued in pending_out, which the caller sends in order.
                    transmit.done();
                }
                ConnectionState::BlockedHandshake => stop = true,
                ConnectionState::WriteTraffic(mut traffic) => {
                    if !app_out.is_empty() && !pumped.encrypted {
                        let guess = app_out.len() + app_out.len() / 64 + 64;
                        append_grown(&mut self.pending_out, guess, |buf| {
                            traffic.encrypt(app_out, buf).map_err(|e| match e {
                                EncryptError::InsufficientSize(e) => Ok(e.required_size),
                                e => Err(e.to_string()),
                            })
                        })?;
                        pumped.encrypted = true;
                    }
                    stop = true;
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.closed = true;
                    stop = true;
                }
                // Early data is off (max_early_data_size 0); anything else
                // new in rustls: stop here rather than spin.
                _ => stop = true,
            }
            pumped.consumed += discard;
            if stop {
                return Ok(pumped);
            }
        }
        Ok(pumped)
    }

    /// Queues close_notify (after an ERROR), if the handshake is done.
    pub fn close_notify(&mut self) {
        let status = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state {
            let _ = append_grown(&mut self.pending_out, 64, |buf| {
                traffic.queue_close_notify(buf).map_err(|e| match e {
                    EncryptError::InsufficientSize(e) => Ok(e.required_size),
                    e => Err(e.to_string()),
                })
            });
        }
    }
}

/// Appends what `write` puts into a buffer to `out`: first `guess` bytes of
/// room, then as many as `write` asks for (`Err(Ok(required))`, rustls's
/// InsufficientSize). On a failure (`Err(Err(why))`) `out` is left as it was.
fn append_grown(
    out: &mut Vec<u8>,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Result<usize, String>>,
) -> Result<(), TlsError> {
    let at = out.len();
    let mut room = guess;
    for _ in 0..2 {
        out.resize(at + room, 0);
        match write(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n);
                return Ok(());
            }
            Err(Ok(required)) => room = required,
            Err(Err(why)) => {
                out.truncate(at);
                return Err(TlsError(why));
            }
        }
    }
    out.truncate(at);
    Err(TlsError("the encoder asked for more room twice".into()))
}
