//! The peer listener (the agent's API over mutual TLS 1.3, for other
//! agents and operators of the fleet) and the client one agent uses to
//! call another.
//!
//! A client without a certificate of the fleet's CA never gets past the
//! handshake. After it, the identity its certificate states rides with
//! every request as its [`Caller`]: a host may call only the
//! peer-migration endpoints (`/v1/peer/...`), an operator anything.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use ferry_identity::{Identity, PeerIdentity, Role};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::sync::watch;

use crate::api::{ApiError, PeerCred};
use crate::events::Caller;

/// ALPN of the agent API.
const ALPN_HTTP1: &str = "http/1.1";
/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call to a peer agent may take (a prepare waits for the
/// receiving VMM to listen).
const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PeerSetupError {
    #[error("tls_dir {}: {source}", .dir.display())]
    Identity {
        dir: std::path::PathBuf,
        source: Box<ferry_identity::IdentityError>,
    },
    #[error("tls_dir {}: {source}", .dir.display())]
    Tls {
        dir: std::path::PathBuf,
        source: Box<ferry_identity::ConfigError>,
    },
    #[error("tls_dir {}: the identity is {name}'s, not this host's ({host})", .dir.display())]
    NotThisHost {
        dir: std::path::PathBuf,
        name: String,
        host: String,
    },
    #[error("cannot listen on {addr} (peer_listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// This host's TLS configurations, both directions.
pub struct PeerTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

impl PeerTls {
    /// Loads the identity in `dir`, which must be the host `host_name`'s.
    pub fn load(dir: &Path, host_name: &str) -> Result<Self, PeerSetupError> {
        let id = Identity::load(dir).map_err(|source| PeerSetupError::Identity {
            dir: dir.to_owned(),
            source: Box::new(source),
        })?;
        if !id.me().is_host(host_name) {
            return Err(PeerSetupError::NotThisHost {
                dir: dir.to_owned(),
                name: id.me().uri(),
                host: host_name.to_owned(),
            });
        }
        let tls = |source| PeerSetupError::Tls {
            dir: dir.to_owned(),
            source: Box::new(source),
        };
        Ok(Self {
            server: ferry_identity::server_config(&id, &[ALPN_HTTP1]).map_err(tls)?,
            client: ferry_identity::client_config(&id, &[ALPN_HTTP1]).map_err(tls)?,
        })
    }
}

/// Refuses a host's call outside the peer-migration endpoints (403).
async fn authorize(
    ConnectInfo(PeerCred(caller)): ConnectInfo<PeerCred>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let allowed = match &caller {
        Caller::Peer { role, .. } if role == Role::Operator.as_str() => true,
        Caller::Peer { role, .. } if role == Role::Host.as_str() => path.starts_with("/v1/peer/"),
        _ => false,
    };
    if allowed {
        next.run(req).await
    } else {
        let who = match &caller {
            Caller::Peer { uri, .. } => uri.clone(),
            Caller::Local { .. } => "a local caller".into(),
        };
        ApiError::Forbidden(format!(
            "{who} may call only the peer-migration endpoints (/v1/peer/...) here; {} {path} needs an operator's certificate",
            req.method()
        ))
        .into_response()
    }
}

/// Returns once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, PeerSetupError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| PeerSetupError::Bind { addr, source })
}

/// Serves `app` on `listener` over mutual TLS until `stop` turns true.
/// A connection whose handshake fails is logged and dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Arc<rustls::ServerConfig>,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let app = app.layer(axum::middleware::from_fn(authorize));
    loop {
        let (tcp, addr) = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("peer listener: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Err(_) => {
                    tracing::warn!(
                        "peer {addr}: refused: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"
                    );
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!("peer {addr}: refused: TLS handshake failed: {e}");
                    return;
                }
                Ok(Ok(s)) => s,
            };
            let peer = match PeerIdentity::from_connection(tls.get_ref().1) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("peer {addr}: refused: {e}");
                    return;
                }
            };
            tracing::debug!("peer {addr}: {}", peer.uri());
            let svc = app.layer(axum::Extension(ConnectInfo(PeerCred(Caller::peer(&peer)))));
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("peer {addr}: {e}");
                    }
                }
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerCallError {
    #[error("cannot reach the agent of {host} at {address}: {message}")]
    Connect {
        host: String,
        address: String,
        message: String,
    },
    #[error("the agent of {host} at {address}: {message}")]
    Http {
        host: String,
        address: String,
        message: String,
    },
    #[error("the agent of {host} at {address} did not answer within {limit:?}")]
    Timeout {
        host: String,
        address: String,
        limit: Duration,
    },
}

/// An answer from a peer agent.
#[derive(Debug, Clone)]
pub struct PeerReply {
    pub status: u16,
    pub body: Bytes,
}

impl PeerReply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `reason` of an error body, or the body as text.
    pub fn reason(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// One call to the agent of `host` at `address` over mutual TLS; the
/// server's certificate must be `host`'s.
pub async fn call(
    client: &Arc<rustls::ClientConfig>,
    host: &str,
    address: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<PeerReply, PeerCallError> {
    let connect_err = |message: String| PeerCallError::Connect {
        host: host.to_owned(),
        address: address.to_owned(),
        message,
    };
    let http_err = |e: &dyn std::fmt::Display| PeerCallError::Http {
        host: host.to_owned(),
        address: address.to_owned(),
        message: e.to_string(),
    };
    let work = async {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| connect_err(format!("{host:?} is not a host name")))?;
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| connect_err(format!("TLS handshake failed: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http_err(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host);
        let bytes = match body {
            Some(v) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                serde_json::to_vec(v).unwrap_or_default()
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| http_err(&e))?;
        let response = sender.send_request(req).await.map_err(|e| http_err(&e))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| http_err(&e))?
            .to_bytes();
        Ok(PeerReply { status, body })
    };
    tokio::time::timeout(PEER_CALL_TIMEOUT, work)
        .await
        .map_err(|_| PeerCallError::Timeout {
            host: host.to_owned(),
            address: address.to_owned(),
            limit: PEER_CALL_TIMEOUT,
        })?
}
