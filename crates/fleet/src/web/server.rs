//! The page's HTTP server: axum on a thread of its own (the scheduler's
//! loop is synchronous), a current-thread runtime whose handlers read the
//! store and ask the agents on tokio's blocking threads.
//!
//! Routes: `/` (the page) and `/api/fleet` (its view as JSON), GET and
//! HEAD only. Any other method on any path is 405, any other path 404.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::html::{esc, page};
use super::migrations::MigrationSource;
use super::read_only::ReadOnly;
use super::snapshot::{snapshot, FleetView};
use crate::store::Backend;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("cannot listen for the web page on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the web page's runtime: {0}")]
    Runtime(std::io::Error),
}

/// The server running; dropping it stops it.
pub struct WebServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared<B> {
    store: ReadOnly<B>,
    migrations: Arc<dyn MigrationSource>,
}

/// The page forbids scripts and anything from elsewhere, so that a text
/// that slipped past escaping still could not run.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'";

fn headers(content_type: &'static str) -> [(header::HeaderName, &'static str); 4] {
    [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-store"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ]
}

async fn read<B: Backend + Send + Sync + 'static>(
    shared: Arc<Shared<B>>,
) -> Result<FleetView, Response> {
    let joined =
        tokio::task::spawn_blocking(move || snapshot(&shared.store, shared.migrations.as_ref()))
            .await;
    let failed = |why: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            headers("text/html; charset=utf-8"),
            format!(
                "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Ferry fleet</title></head>\
                 <body><h1>Ferry fleet</h1><p>The fleet's store cannot be read: {}</p></body></html>",
                esc(&why)
            ),
        )
            .into_response()
    };
    match joined {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(e) => Err(failed(format!("the read panicked: {e}"))),
    }
}

async fn html<B: Backend + Send + Sync + 'static>(State(s): State<Arc<Shared<B>>>) -> Response {
    match read(s).await {
        Ok(v) => (headers("text/html; charset=utf-8"), page(&v)).into_response(),
        Err(r) => r,
    }
}

async fn json<B: Backend + Send + Sync + 'static>(State(s): State<Arc<Shared<B>>>) -> Response {
    match read(s).await {
        Ok(v) => match serde_json::to_string_pretty(&v) {
            Ok(body) => (headers("application/json"), body).into_response(),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the fleet's view: {e}"),
            )
                .into_response(),
        },
        Err(r) => r,
    }
}

/// What no route matched: read-only, so any method but GET and HEAD is
/// 405 on every path.
async fn other(method: Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        (
            StatusCode::NOT_FOUND,
            "no such page: / and /api/fleet are\n",
        )
            .into_response()
    } else {
        method_not_allowed().await
    }
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "GET, HEAD")],
        "this page is read-only: GET and HEAD only\n",
    )
        .into_response()
}

pub fn router<B: Backend + Send + Sync + 'static>(
    backend: B,
    migrations: Arc<dyn MigrationSource>,
) -> Router {
    let shared = Arc::new(Shared {
        store: ReadOnly(backend),
        migrations,
    });
    Router::new()
        .route("/", get(html::<B>).fallback(method_not_allowed))
        .route("/api/fleet", get(json::<B>).fallback(method_not_allowed))
        .fallback(other)
        .with_state(shared)
}

impl WebServer {
    /// Listens on `addr` (port 0: any free port; [`WebServer::addr`] says
    /// which) and serves until dropped.
    pub fn start<B: Backend + Send + Sync + 'static>(
        addr: &str,
        backend: B,
        migrations: Arc<dyn MigrationSource>,
    ) -> Result<Self, WebError> {
        let bind_err = |source| WebError::Bind {
            addr: addr.to_string(),
            source,
        };
        // Bound here, so that a taken port is the caller's error at once.
        let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(WebError::Runtime)?;
        let app = router(backend, migrations);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fleet-web".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("fleet web: cannot serve on {local}: {e}");
                            return;
                        }
                    };
                    let served = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                    if let Err(e) = served {
                        eprintln!("fleet web: stopped serving on {local}: {e}");
                    }
                })
            })
            .map_err(WebError::Runtime)?;
        Ok(Self {
            addr: local,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
