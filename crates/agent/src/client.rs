//! A client of the agent's API over its Unix socket (hyper's HTTP/1
//! client on a tokio UnixStream, in a small current-thread runtime):
//! what `ferry vm` and the tests use.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach ferryd at {} (is it running? --agent SOCKET): {source}", .socket.display())]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to ferryd at {}: {message}", .socket.display())]
    Http { socket: PathBuf, message: String },
    #[error("no answer from ferryd at {} within {limit:?}", .socket.display())]
    Timeout { socket: PathBuf, limit: Duration },
    #[error("cannot start the client runtime: {0}")]
    Runtime(std::io::Error),
}

/// One answer: its status and its body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (Null if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The agent at a socket path.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
    /// Longest wait for one whole answer (creating a VM waits for its boot).
    pub timeout: Duration,
}

fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)
}

impl AgentClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
            timeout: Duration::from_secs(120),
        }
    }

    fn http_err(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Http {
            socket: self.socket.clone(),
            message: e.to_string(),
        }
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.http_err(e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn build(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<hyper::Request<Full<Bytes>>, ClientError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "ferryd");
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        req.body(Full::new(Bytes::from(body)))
            .map_err(|e| self.http_err(e))
    }

    async fn send(&self, req: hyper::Request<Full<Bytes>>) -> Result<Reply, ClientError> {
        let work = async {
            let mut sender = self.connect().await?;
            let response = sender
                .send_request(req)
                .await
                .map_err(|e| self.http_err(e))?;
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.http_err(e))?
                .to_bytes();
            Ok(Reply {
                status,
                content_type,
                body,
            })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| ClientError::Timeout {
                socket: self.socket.clone(),
                limit: self.timeout,
            })?
    }

    /// `METHOD PATH` with raw bytes as the body (any content type).
    pub fn request_raw(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Reply, ClientError> {
        let req = self.build(method, path, content_type, body)?;
        runtime()?.block_on(self.send(req))
    }

    /// `METHOD PATH`, with a JSON body if given.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, ClientError> {
        match body {
            Some(v) => self.request_raw(
                method,
                path,
                Some("application/json"),
                serde_json::to_vec(v).unwrap_or_default(),
            ),
            None => self.request_raw(method, path, None, Vec::new()),
        }
    }

    pub fn get(&self, path: &str) -> Result<Reply, ClientError> {
        self.request("GET", path, None)
    }

    /// Follows `GET /v1/events` on a thread of its own: each SSE `data:`
    /// line arrives parsed. The stream ends when the receiver is dropped
    /// and the next event comes, or when the agent goes away.
    pub fn events(&self) -> Result<mpsc::Receiver<serde_json::Value>, ClientError> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let client = self.clone();
        std::thread::spawn(move || {
            let Ok(rt) = runtime() else { return };
            rt.block_on(async move {
                let req = match client.build("GET", "/v1/events", None, Vec::new()) {
                    Ok(r) => r,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let mut sender = match client.connect().await {
                    Ok(s) => s,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let mut body = match sender.send_request(req).await {
                    Ok(r) => r.into_body(),
                    Err(e) => return drop(ready_tx.send(Err(client.http_err(e)))),
                };
                let _ = ready_tx.send(Ok(()));
                let mut pending = String::new();
                while let Some(Ok(frame)) = body.frame().await {
                    let Some(data) = frame.data_ref() else {
                        continue;
                    };
                    pending.push_str(&String::from_utf8_lossy(data));
                    while let Some(end) = pending.find('\n') {
                        let line: String = pending.drain(..=end).collect();
                        if let Some(json) = line.trim_end().strip_prefix("data: ") {
                            let value = serde_json::from_str(json)
                                .unwrap_or(serde_json::Value::String(json.into()));
                            if tx.send(value).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        });
        match ready_rx.recv_timeout(self.timeout) {
            Ok(Ok(())) => Ok(rx),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Timeout {
                socket: self.socket.clone(),
                limit: self.timeout,
            }),
        }
    }
}
