//! The one-time session token that binds every connection of a migration
//! to the migration an agent prepared (protocol v8, frames Bind and
//! BindAck): the first frame the source sends on each connection, checked
//! by the destination in constant time before anything else is read.
//!
//! The token is a bearer secret of 32 random bytes, written as 64 hex
//! digits in a file only its owner may read (0600), so it never appears on
//! a command line (`/proc/PID/cmdline` is world-readable) or in a log.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::error::ProtocolError;
use crate::protocol::{
    read_header, read_message, write_message, Bind, BindAck, FrameKind, Hello, HelloAck, Message,
    SESSION_TOKEN_VERSION,
};

/// Bytes of randomness in a token.
pub const TOKEN_LEN: usize = 32;

/// A one-time token bound to one prepared migration.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken([u8; TOKEN_LEN]);

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

/// A token that cannot be read, parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("token file {}: mode {mode:o} lets others read it; it must be 0600 (chmod 600)", .path.display())]
    Readable { path: PathBuf, mode: u32 },
    #[error("a session token is {} hex digits (32 random bytes); this one {why}", TOKEN_LEN * 2)]
    Malformed { why: String },
    #[error("the system's random source: {0}")]
    Random(io::Error),
}

impl SessionToken {
    /// 32 bytes from the kernel's random source (getrandom(2) via
    /// /dev/urandom semantics).
    pub fn generate() -> Result<Self, TokenError> {
        let mut bytes = [0u8; TOKEN_LEN];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(TokenError::Random)?;
        Ok(SessionToken(bytes))
    }

    pub fn from_bytes(bytes: [u8; TOKEN_LEN]) -> Self {
        SessionToken(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; TOKEN_LEN] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let malformed = |why: String| TokenError::Malformed { why };
        if text.len() != TOKEN_LEN * 2 {
            return Err(malformed(format!("has {} characters", text.len())));
        }
        let mut bytes = [0u8; TOKEN_LEN];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let pair = text
                .get(2 * i..2 * i + 2)
                .ok_or_else(|| malformed("is not ASCII".into()))?;
            *byte = u8::from_str_radix(pair, 16)
                .map_err(|_| malformed(format!("has a non-hex digit at {}", 2 * i)))?;
        }
        Ok(SessionToken(bytes))
    }

    /// Reads a token file, refusing one that others may read.
    pub fn read_file(path: &Path) -> Result<Self, TokenError> {
        let io = |source| TokenError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Readable {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = String::new();
        Read::by_ref(&mut file)
            .take(4096)
            .read_to_string(&mut text)
            .map_err(io)?;
        Self::from_hex(&text)
    }

    /// Writes the token to a new file of mode 0600 (an existing file is
    /// refused: a token file is never reused).
    pub fn write_file(&self, path: &Path) -> Result<(), TokenError> {
        let io = |source| TokenError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.write_all(self.to_hex().as_bytes()).map_err(io)?;
        file.write_all(b"\n").map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// Compares in constant time, so that a peer cannot learn the token
    /// byte by byte from how long a refusal takes.
    pub fn matches(&self, presented: &[u8; TOKEN_LEN]) -> bool {
        self.0.ct_eq(presented).into()
    }
}

/// Why a connection could not be bound to the migration.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("the destination refused this connection's session token: {reason}")]
    Refused { reason: String },
    #[error(
        "the destination closed the connection instead of answering the session token: it speaks a protocol older than v{SESSION_TOKEN_VERSION}, which cannot bind a connection to a prepared migration (upgrade it, or allow a plaintext data plane on both sides)"
    )]
    PeerTooOld,
    #[error("the source sent no session token: {why}")]
    Missing { why: String },
    #[error("the source presented a session token that is not this migration's (wrong, from another migration, or replayed)")]
    WrongToken,
    #[error("binding the connection to the migration: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("binding the connection to the migration: {0}")]
    Io(#[from] io::Error),
}

impl BindError {
    /// A link failure, not a refusal: another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            BindError::Io(_) => true,
            BindError::Protocol(p) => p.is_retryable() && !matches!(p, ProtocolError::PeerClosed),
            _ => false,
        }
    }
}

/// The reason a refused source reads.
const WRONG_TOKEN: &str = "the session token is not the one of the migration this destination was prepared for (wrong, from another migration, or replayed); the connection is dropped";

/// The source's side: sends Bind first and waits (within `timeout`) for
/// the destination's BindAck.
pub fn bind_as_source(
    mut link: impl Read + Write,
    token: &SessionToken,
    set_timeout: impl Fn(Option<Duration>) -> io::Result<()>,
    timeout: Duration,
) -> Result<(), BindError> {
    write_message(&mut link, &Message::Bind(Bind { token: token.0 }))?;
    set_timeout(Some(timeout))?;
    let mut scratch = Vec::new();
    let answer = read_header(&mut link).and_then(|h| read_message(&mut link, &h, &mut scratch));
    set_timeout(None)?;
    match answer {
        Ok(Message::BindAck(BindAck::Accepted)) => Ok(()),
        Ok(Message::BindAck(BindAck::Refused { reason })) => Err(BindError::Refused { reason }),
        Ok(other) => Err(BindError::Protocol(ProtocolError::Unexpected {
            expected: "BindAck",
            got: other.kind(),
        })),
        // A v7 destination drops a connection whose first frame it does
        // not know.
        Err(ProtocolError::PeerClosed) => Err(BindError::PeerTooOld),
        Err(ProtocolError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
            Err(BindError::PeerTooOld)
        }
        Err(e) => Err(e.into()),
    }
}

/// The destination's side: the first frame must be a Bind with `token`;
/// the source is told the verdict either way. A source too old to bind
/// (its first frame a Hello) is refused in words it understands.
pub fn bind_as_destination(
    mut link: impl Read + Write,
    token: &SessionToken,
) -> Result<(), BindError> {
    let mut scratch = Vec::new();
    let header = read_header(&mut link)?;
    match header.kind {
        FrameKind::Bind => {}
        FrameKind::Hello => {
            let hello: Option<Hello> = match read_message(&mut link, &header, &mut scratch) {
                Ok(Message::Hello(h)) => Some(h),
                _ => None,
            };
            let theirs =
                hello.map_or_else(|| "an unknown range".into(), |h| h.versions.to_string());
            let reason = format!(
                "this destination takes only connections bound to its prepared migration by a session token (protocol v{SESSION_TOKEN_VERSION}); the source speaks {theirs}"
            );
            let _ = write_message(
                &mut link,
                &Message::HelloAck(HelloAck::Refused {
                    reason: reason.clone(),
                }),
            );
            return Err(BindError::Missing {
                why: format!("it opened with Hello ({theirs})"),
            });
        }
        other => {
            return Err(BindError::Missing {
                why: format!("its first frame was {other}"),
            })
        }
    }
    let Message::Bind(bind) = read_message(&mut link, &header, &mut scratch)? else {
        return Err(BindError::Missing {
            why: "its Bind frame did not decode".into(),
        });
    };
    if token.matches(&bind.token) {
        write_message(&mut link, &Message::BindAck(BindAck::Accepted))?;
        Ok(())
    } else {
        let _ = write_message(
            &mut link,
            &Message::BindAck(BindAck::Refused {
                reason: WRONG_TOKEN.into(),
            }),
        );
        Err(BindError::WrongToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_bad_text() {
        let t = SessionToken::generate().unwrap();
        assert_eq!(SessionToken::from_hex(&t.to_hex()).unwrap(), t);
        assert_eq!(t.to_hex().len(), 64);
        assert!(SessionToken::from_hex("abc").is_err());
        assert!(SessionToken::from_hex(&"zz".repeat(32)).is_err());
        assert!(SessionToken::from_hex(&"é".repeat(32)).is_err());
        assert_ne!(SessionToken::generate().unwrap(), t);
    }

    #[test]
    fn files_are_0600_and_others_readable_ones_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let t = SessionToken::generate().unwrap();
        t.write_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(SessionToken::read_file(&path).unwrap(), t);
        assert!(t.write_file(&path).is_err(), "a token file is never reused");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SessionToken::read_file(&path).unwrap_err();
        assert!(err.to_string().contains("0600"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_debug_form_hides_the_token() {
        let t = SessionToken::from_bytes([0x5a; 32]);
        assert!(!format!("{t:?}").contains("5a"));
    }
}
