//! The HTTP/JSON API: routes, their OpenAPI description (utoipa, from the
//! handlers themselves), errors as `{"error", "reason"}` with their
//! status, the body limit, request counting and the audit of every call
//! that changes something.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::events::{AuditEntry, Caller, Event};
use crate::ledger::NoCapacity;
use crate::migration::{
    IncomingPhase, IncomingView, JobPhase, MigrationJob, PeerOffer, Prepared, StartMigration,
};
use crate::model::{CreateVm, ErrorBody, SnapshotDone, SnapshotRequest, VmRecord, VmView};
use crate::server::Agent;
use crate::time::now_rfc3339;
use crate::tune::TuneMigration;

/// Largest request body accepted (a VM definition is a few hundred bytes).
pub const BODY_LIMIT: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("no VM {0} on this host")]
    NotFound(String),
    #[error("no such route: {0}")]
    NoRoute(String),
    #[error("no migration {0} on this host")]
    NoMigration(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Incompatible(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    NoCapacity(#[from] NoCapacity),
    #[error("{0}")]
    Vmm(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }

    /// True when the agent or the VMM could not do what was asked; false
    /// for a refusal (bad input, unknown VM, conflict, no capacity), which
    /// changed nothing.
    pub fn is_failure(&self) -> bool {
        matches!(self, Self::Vmm(_) | Self::Internal(_))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotFound(_) | Self::NoRoute(_) | Self::NoMigration(_) => StatusCode::NOT_FOUND,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Incompatible(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::NoCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Vmm(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::TooLarge(_) => "payload_too_large",
            Self::NotFound(_) | Self::NoRoute(_) | Self::NoMigration(_) => "not_found",
            Self::Forbidden(_) => "forbidden",
            Self::Incompatible(_) => "incompatible",
            Self::Conflict(_) => "conflict",
            Self::NoCapacity(_) => "no_capacity",
            Self::Vmm(_) => "vmm_error",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::TooLarge(format!("the body is larger than {BODY_LIMIT} bytes"))
        } else {
            Self::BadRequest(r.body_text())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.kind().into(),
            reason: self.to_string(),
        };
        (self.status(), Json(body)).into_response()
    }
}

/// The peer of a Unix-socket connection, as the kernel reports it.
#[derive(Debug, Clone)]
pub struct PeerCred(pub Caller);

impl Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for PeerCred {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        let caller = match stream.io().peer_cred() {
            Ok(c) => Caller::Local {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            Err(_) => Caller::Local {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
            },
        };
        Self(caller)
    }
}

type Who = ConnectInfo<PeerCred>;

/// Writes the audit entry of a modifying call and turns its result into
/// the answer.
fn audited<T: serde::Serialize>(
    agent: &Agent,
    who: &Who,
    action: &str,
    vm: Option<&str>,
    ok_status: StatusCode,
    result: Result<T, ApiError>,
) -> Response {
    let (status, outcome, reason) = match &result {
        Ok(_) => (ok_status, "ok", None),
        Err(e) => {
            let outcome = if e.is_failure() { "failed" } else { "refused" };
            (e.status(), outcome, Some(e.to_string()))
        }
    };
    agent.events.audit(AuditEntry {
        time: now_rfc3339(),
        who: who.0 .0.clone(),
        action: action.to_owned(),
        vm: vm.map(str::to_owned),
        outcome: outcome.into(),
        status: status.as_u16(),
        reason,
    });
    match result {
        Ok(v) => (ok_status, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ferryd",
        description = "The Ferry host agent: the VMs of one host, each its own VMM process."
    ),
    components(schemas(ErrorBody, Event, AuditEntry, Caller, JobPhase, IncomingPhase))
)]
struct ApiDoc;

/// Every documented route, with its handler's OpenAPI description.
fn documented() -> OpenApiRouter<Arc<Agent>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_vms, create_vm))
        .routes(routes!(show_vm, delete_vm))
        .routes(routes!(pause_vm))
        .routes(routes!(resume_vm))
        .routes(routes!(snapshot_vm))
        .routes(routes!(start_migration))
        .routes(routes!(show_migration, cancel_migration, tune_migration))
        .routes(routes!(prepare_incoming))
        .routes(routes!(show_incoming, abort_incoming))
        .routes(routes!(events))
        .routes(routes!(metrics))
}

/// The router and the OpenAPI document generated from its handlers.
pub fn router(agent: Arc<Agent>) -> (axum::Router, utoipa::openapi::OpenApi) {
    let (router, doc) = documented().split_for_parts();
    let served = doc.clone();
    let router = router
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let served = served.clone();
                async move { Json(served) }
            }),
        )
        .fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                ApiError::NoRoute(format!("{method} {}", uri.path()))
            },
        )
        .layer(axum::middleware::from_fn_with_state(agent.clone(), count))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(agent);
    (router, doc)
}

/// The OpenAPI document alone, as `ferryd --print-openapi` prints it and
/// `crates/agent/openapi.json` keeps it.
pub fn openapi_json() -> String {
    let (_, doc) = documented().split_for_parts();
    let mut text = doc.to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

/// Counts every request by route and outcome.
async fn count(
    State(agent): State<Arc<Agent>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    agent
        .metrics
        .count_request(method.as_str(), &route, response.status().as_u16());
    response
}

/// Every VM on this host.
#[utoipa::path(get, path = "/v1/vms", responses(
    (status = 200, body = Vec<VmRecord>),
    (status = 500, body = ErrorBody),
))]
async fn list_vms(State(agent): State<Arc<Agent>>) -> Result<Json<Vec<VmRecord>>, ApiError> {
    agent.list().map(Json)
}

/// Defines a VM and starts its VMM; answers once the VMM answers.
#[utoipa::path(post, path = "/v1/vms", request_body = CreateVm, responses(
    (status = 201, description = "The VM runs", body = VmRecord),
    (status = 400, description = "Bad input; nothing changed", body = ErrorBody),
    (status = 409, description = "A VM with this id exists", body = ErrorBody),
    (status = 413, description = "The body is too large", body = ErrorBody),
    (status = 500, description = "The VMM did not come up; the record says why", body = ErrorBody),
    (status = 503, description = "Not enough capacity left", body = ErrorBody),
))]
async fn create_vm(
    State(agent): State<Arc<Agent>>,
    who: Who,
    body: Result<Json<CreateVm>, JsonRejection>,
) -> Response {
    let (id, result) = match body {
        Err(e) => (None, Err(e.into())),
        Ok(Json(req)) => {
            let id = req.id.clone();
            let r = agent.create(req).await;
            (r.as_ref().ok().map(|r| r.id.clone()).or(id), r)
        }
    };
    audited(
        &agent,
        &who,
        "POST /v1/vms",
        id.as_deref(),
        StatusCode::CREATED,
        result,
    )
}

/// One VM: its record and what its VMM says now (uptime, heartbeat).
#[utoipa::path(get, path = "/v1/vms/{id}", params(("id" = String, Path)), responses(
    (status = 200, body = VmView),
    (status = 404, body = ErrorBody),
))]
async fn show_vm(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    agent.show(&id).await.map(Json)
}

/// Stops the VM's VMM (SIGTERM, then SIGKILL) and removes its record.
#[utoipa::path(delete, path = "/v1/vms/{id}", params(("id" = String, Path)), responses(
    (status = 200, description = "The record as it was", body = VmRecord),
    (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody),
))]
async fn delete_vm(State(agent): State<Arc<Agent>>, who: Who, Path(id): Path<String>) -> Response {
    let r = agent.delete(&id).await;
    audited(
        &agent,
        &who,
        "DELETE /v1/vms/{id}",
        Some(&id),
        StatusCode::OK,
        r,
    )
}

/// Stops the VM's vCPUs.
#[utoipa::path(post, path = "/v1/vms/{id}/pause", params(("id" = String, Path)), responses(
    (status = 200, body = VmRecord),
    (status = 404, body = ErrorBody),
    (status = 409, description = "Not running", body = ErrorBody),
))]
async fn pause_vm(State(agent): State<Arc<Agent>>, who: Who, Path(id): Path<String>) -> Response {
    let r = agent.pause_or_resume(&id, true).await;
    audited(
        &agent,
        &who,
        "POST /v1/vms/{id}/pause",
        Some(&id),
        StatusCode::OK,
        r,
    )
}

/// Runs a paused VM's vCPUs again.
#[utoipa::path(post, path = "/v1/vms/{id}/resume", params(("id" = String, Path)), responses(
    (status = 200, body = VmRecord),
    (status = 404, body = ErrorBody),
    (status = 409, description = "Not paused", body = ErrorBody),
))]
async fn resume_vm(State(agent): State<Arc<Agent>>, who: Who, Path(id): Path<String>) -> Response {
    let r = agent.pause_or_resume(&id, false).await;
    audited(
        &agent,
        &who,
        "POST /v1/vms/{id}/resume",
        Some(&id),
        StatusCode::OK,
        r,
    )
}

/// Writes a snapshot of a running VM to a file; the VM runs on.
#[utoipa::path(post, path = "/v1/vms/{id}/snapshot", params(("id" = String, Path)),
    request_body = SnapshotRequest, responses(
    (status = 200, body = SnapshotDone),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 409, description = "Not running", body = ErrorBody),
    (status = 500, description = "The VMM could not write it; the VM runs on", body = ErrorBody),
))]
async fn snapshot_vm(
    State(agent): State<Arc<Agent>>,
    who: Who,
    Path(id): Path<String>,
    body: Result<Json<SnapshotRequest>, JsonRejection>,
) -> Response {
    let r = match body {
        Err(e) => Err(e.into()),
        Ok(Json(req)) => agent.snapshot(&id, req).await,
    };
    audited(
        &agent,
        &who,
        "POST /v1/vms/{id}/snapshot",
        Some(&id),
        StatusCode::OK,
        r,
    )
}

/// Starts migrating a running VM to another host's agent (over mutual
/// TLS); the job holds the VM's lock until it ends.
#[utoipa::path(post, path = "/v1/vms/{id}/migrations", params(("id" = String, Path)),
    request_body = StartMigration, responses(
    (status = 202, description = "The job; follow it with GET /v1/migrations/{id}", body = MigrationJob),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 409, description = "Another operation or migration holds the VM (named)", body = ErrorBody),
    (status = 422, description = "Not possible from this host (no TLS identity, mode not allowed by the policy)", body = ErrorBody),
))]
async fn start_migration(
    State(agent): State<Arc<Agent>>,
    who: Who,
    Path(id): Path<String>,
    body: Result<Json<StartMigration>, JsonRejection>,
) -> Response {
    let r = match body {
        Err(e) => Err(e.into()),
        Ok(Json(req)) => agent.start_migration(&who.0 .0, &id, req).await,
    };
    audited(
        &agent,
        &who,
        "POST /v1/vms/{id}/migrations",
        Some(&id),
        StatusCode::ACCEPTED,
        r,
    )
}

/// A migration job: phase, live progress, then the engine's report.
#[utoipa::path(get, path = "/v1/migrations/{id}", params(("id" = String, Path)), responses(
    (status = 200, body = MigrationJob),
    (status = 404, body = ErrorBody),
))]
async fn show_migration(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<MigrationJob>, ApiError> {
    agent.job(&id).map(Json)
}

/// Cancels a migration before its commit: the VM runs on here.
#[utoipa::path(delete, path = "/v1/migrations/{id}", params(("id" = String, Path)), responses(
    (status = 202, description = "Accepted before the engine's point of no return: the job ends `cancelled` (or `failed`, if it failed first) with the VM on the source", body = MigrationJob),
    (status = 404, body = ErrorBody),
    (status = 409, description = "The job has ended, or is past the point a cancel can keep the VM here (its blackout has begun, post-copy runs, or it has committed); the reason says which", body = ErrorBody),
    (status = 500, description = "The source VMM could not be reached, or did not start its migration in time; nothing was cancelled", body = ErrorBody),
))]
async fn cancel_migration(
    State(agent): State<Arc<Agent>>,
    who: Who,
    Path(id): Path<String>,
) -> Response {
    let r = agent.cancel_migration(&id).await;
    let vm = r.as_ref().ok().map(|j| j.vm.clone());
    audited(
        &agent,
        &who,
        "DELETE /v1/migrations/{id}",
        vm.as_deref(),
        StatusCode::ACCEPTED,
        r,
    )
}

/// Retunes a running migration: a new downtime target or bandwidth cap,
/// or a switch to post-copy where the VM's policy allows it.
#[utoipa::path(patch, path = "/v1/migrations/{id}", params(("id" = String, Path)), request_body = TuneMigration, responses(
    (status = 200, description = "Passed to the engine: a bandwidth cap from its next batch, the rest between rounds; while the job prepares, kept and the engine starts with it. The job shows the settings in force", body = MigrationJob),
    (status = 400, description = "Bad values or an empty body; nothing changed", body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 409, description = "The job has ended (naming its phase), was cancelled, or (for post-copy) is past its pre-copy rounds", body = ErrorBody),
    (status = 422, description = "Post-copy asked for; the VM's policy forbids it (or, while preparing, its disk is copied)", body = ErrorBody),
))]
async fn tune_migration(
    State(agent): State<Arc<Agent>>,
    who: Who,
    Path(id): Path<String>,
    body: Result<Json<TuneMigration>, JsonRejection>,
) -> Response {
    let r = match body {
        Err(e) => Err(e.into()),
        Ok(Json(req)) => agent.tune_migration(&id, req).await,
    };
    let vm = r.as_ref().ok().map(|j| j.vm.clone());
    audited(
        &agent,
        &who,
        "PATCH /v1/migrations/{id}",
        vm.as_deref(),
        StatusCode::OK,
        r,
    )
}

/// (Peer) A source offers a VM: checked, reserved, a receiver started.
#[utoipa::path(post, path = "/v1/peer/migrations", request_body = PeerOffer, responses(
    (status = 201, description = "Reserved; the receiver listens", body = Prepared),
    (status = 400, body = ErrorBody),
    (status = 409, description = "The VM is here or coming already", body = ErrorBody),
    (status = 422, description = "Incompatible (no TLS identity here for a mutual-TLS data plane, or none prepared by a source host certificate)", body = ErrorBody),
    (status = 503, description = "Not enough capacity; nothing started", body = ErrorBody),
))]
async fn prepare_incoming(
    State(agent): State<Arc<Agent>>,
    who: Who,
    body: Result<Json<PeerOffer>, JsonRejection>,
) -> Response {
    let (vm, r) = match body {
        Err(e) => (None, Err(e.into())),
        Ok(Json(offer)) => (
            Some(offer.vm.clone()),
            agent.prepare_incoming(&who.0 .0, offer).await,
        ),
    };
    audited(
        &agent,
        &who,
        "POST /v1/peer/migrations",
        vm.as_deref(),
        StatusCode::CREATED,
        r,
    )
}

/// (Peer) An incoming migration: ready, committed, aborted, expired.
#[utoipa::path(get, path = "/v1/peer/migrations/{id}", params(("id" = String, Path)), responses(
    (status = 200, body = IncomingView),
    (status = 403, description = "Prepared by another host", body = ErrorBody),
    (status = 404, body = ErrorBody),
))]
async fn show_incoming(
    State(agent): State<Arc<Agent>>,
    who: Who,
    Path(id): Path<String>,
) -> Result<Json<IncomingView>, ApiError> {
    agent.incoming(&who.0 .0, &id).map(Json)
}

/// (Peer) The source gave up: the receiver is stopped, the reservation
/// released.
#[utoipa::path(delete, path = "/v1/peer/migrations/{id}", params(("id" = String, Path)), responses(
    (status = 200, description = "Aborting", body = IncomingView),
    (status = 403, description = "Prepared by another host", body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 409, description = "Committed already", body = ErrorBody),
))]
async fn abort_incoming(
    State(agent): State<Arc<Agent>>,
    who: Who,
    Path(id): Path<String>,
) -> Response {
    let r = agent.abort_incoming(&who.0 .0, &id);
    let vm = r.as_ref().ok().map(|v| v.vm.clone());
    audited(
        &agent,
        &who,
        "DELETE /v1/peer/migrations/{id}",
        vm.as_deref(),
        StatusCode::OK,
        r,
    )
}

/// Server-sent events: VM state changes, adoptions, deletions, and every
/// audited call (`event:` is the event's `type`).
#[utoipa::path(get, path = "/v1/events", responses(
    (status = 200, content_type = "text/event-stream", body = Event),
))]
async fn events(
    State(agent): State<Arc<Agent>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = BroadcastStream::new(agent.events.subscribe()).filter_map(|item| {
        let event = item.ok()?;
        SseEvent::default()
            .event(event.kind())
            .json_data(&event)
            .ok()
            .map(Ok)
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Prometheus text: VMs by state, memory and vCPUs reserved against
/// capacity, API requests by outcome.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, content_type = "text/plain", body = String),
))]
async fn metrics(State(agent): State<Arc<Agent>>) -> Result<Response, ApiError> {
    let states: Vec<_> = agent.list()?.into_iter().map(|r| r.state).collect();
    let (reserved, capacity) = agent.ledger_figures();
    let text = agent
        .metrics
        .render(&states, reserved, capacity, agent.incoming_reserved());
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
