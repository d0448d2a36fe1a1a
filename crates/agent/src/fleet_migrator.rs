//! The fleet scheduler's migrator on real agents: each call is a call on
//! a ferryd's API (`POST /v1/vms/{id}/migrations` on the source, `GET`,
//! `DELETE` and `PATCH /v1/migrations/{job}`, `DELETE /v1/vms/{id}`,
//! `POST /v1/vms`).
//!
//! It reaches each agent at the API socket the agent registered
//! (`agents/HOST`, crates/fleet's `agents`): a one-machine fleet, where
//! the socket's file permissions are the operator's authority and no
//! operator certificate has to exist. The source agent itself reaches the
//! target over mutual TLS, at the peer address the target registered.
//! (A fleet across machines would call the same API on each agent's peer
//! listener with an operator's certificate; the endpoint record carries
//! that address already.)
//!
//! The scheduler's name for a migration is kept with the agent's job in
//! the fleet's store (`agent-jobs/NAME`: VM, source, target, the agent's
//! job id), written before the agent is asked, so that `poll` after a
//! crash never starts a second migration: no record is `Unknown`, a
//! record is followed on its source. If the crash fell between the
//! agent's answer and the job id's write, the VM's place decides: on the
//! target it committed; on the source its start is reported failed
//! (the agent's lock on the VM refuses a second start while the first
//! might still run).
//!
//! The agent's refusals (409 the VM is busy, 422 not possible from here,
//! 503 no capacity, and any other answer that changed nothing) are
//! `Refused`; a socket that does not answer is `Unreachable`.

use std::collections::HashMap;
use std::time::Duration;

use ferry_fleet::agents::{definition, endpoint, AgentEndpoint};
use ferry_fleet::migrator::{MigrationRequest, MigrationStatus, Migrator, MigratorError};
use ferry_fleet::model::{Vm, MIB};
use ferry_fleet::store::fleet_store::Batch;
use ferry_fleet::store::{Backend, Expect, FleetStore, Op, StoreError, Txn};
use ferry_fleet::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::{AgentClient, ClientError, Reply};

/// The migrator's records, by the scheduler's migration name.
pub const JOBS: &str = "agent-jobs/";

/// What a scheduler's migration is on the agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub vm: String,
    pub source: String,
    pub target: String,
    pub started: Timestamp,
    /// The source agent's job id; None until it answered the start.
    pub job: Option<String>,
}

pub struct AgentMigrator<B: Backend> {
    store: B,
    clients: HashMap<String, AgentClient>,
    /// Longest wait for one agent call (a boot waits for the VMM).
    pub call_timeout: Duration,
}

fn unreachable(host: &str, e: impl std::fmt::Display) -> MigratorError {
    MigratorError::Unreachable {
        host: host.to_string(),
        reason: e.to_string(),
    }
}

fn store_down(e: StoreError) -> MigratorError {
    unreachable("the fleet store", e)
}

/// The agent's reason from an error answer (its `reason` field).
fn reason(r: &Reply) -> String {
    let v = r.json();
    let why = v["reason"]
        .as_str()
        .map_or_else(|| r.text(), str::to_string);
    format!("{} ({})", why, r.status)
}

fn job_key(id: &str) -> String {
    format!("{JOBS}{id}")
}

impl<B: Backend> AgentMigrator<B> {
    pub fn new(store: B) -> Self {
        Self {
            store,
            clients: HashMap::new(),
            call_timeout: Duration::from_secs(60),
        }
    }

    fn endpoint(&self, host: &str) -> Result<Option<AgentEndpoint>, MigratorError> {
        endpoint(&self.store, host).map_err(store_down)
    }

    /// The client of `host`'s agent (its endpoint read once).
    fn client(&mut self, host: &str) -> Result<AgentClient, MigratorError> {
        if let Some(c) = self.clients.get(host) {
            return Ok(c.clone());
        }
        let Some(ep) = self.endpoint(host)? else {
            return Err(unreachable(host, "no agent registered for this host"));
        };
        let mut c = AgentClient::new(&ep.socket);
        c.timeout = self.call_timeout;
        self.clients.insert(host.to_string(), c.clone());
        Ok(c)
    }

    fn call(
        &mut self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, MigratorError> {
        let c = self.client(host)?;
        c.request(method, path, body).map_err(|e| {
            // The agent may have registered anew (a new socket): read its
            // endpoint again next time.
            self.clients.remove(host);
            unreachable(host, e)
        })
    }

    fn record(&self, id: &str) -> Result<Option<(JobRecord, u64)>, MigratorError> {
        let key = job_key(id);
        let Some(e) = self.store.get(&key).map_err(store_down)? else {
            return Ok(None);
        };
        let rec = serde_json::from_slice(&e.value).map_err(|err| {
            store_down(StoreError::Decode {
                what: key,
                why: err.to_string(),
            })
        })?;
        Ok(Some((rec, e.mod_revision)))
    }

    fn put_record(&self, id: &str, rec: &JobRecord, expect: Expect) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        batch.put(job_key(id), rec, expect)?;
        FleetStore::new(&self.store).commit(batch, None)?;
        Ok(())
    }

    fn drop_record(&self, id: &str) {
        let _ = self.store.commit(&Txn {
            ops: vec![Op::Delete { key: job_key(id) }],
            ..Txn::default()
        });
    }

    /// The job of a recorded migration, or an error saying why not.
    fn job_of(&self, id: &str) -> Result<(JobRecord, String), MigratorError> {
        match self.record(id)? {
            Some((rec, _)) => match rec.job.clone() {
                Some(job) => Ok((rec, job)),
                None => Err(MigratorError::NoSuchMigration(format!(
                    "{id} (its agent's job id was never recorded)"
                ))),
            },
            None => Err(MigratorError::NoSuchMigration(id.to_string())),
        }
    }

    /// True when `host`'s agent runs `vm` now.
    fn runs(&mut self, host: &str, vm: &str) -> Result<bool, MigratorError> {
        let r = self.call(host, "GET", &format!("/v1/vms/{vm}"), None)?;
        Ok(r.status == 200 && r.json()["state"] == "running")
    }

    /// A recorded start whose answer was lost: the VM's place decides.
    fn settle_unanswered(&mut self, rec: &JobRecord) -> Result<MigrationStatus, MigratorError> {
        if self.runs(&rec.target, &rec.vm)? {
            return Ok(MigrationStatus::Committed { total_ms: 0 });
        }
        Ok(MigrationStatus::Failed {
            reason: format!(
                "the answer to its start on {} was lost; the VM is not on {}",
                rec.source, rec.target
            ),
        })
    }
}

impl<B: Backend> Migrator for AgentMigrator<B> {
    fn start(&mut self, req: &MigrationRequest, now: Timestamp) -> Result<(), MigratorError> {
        let refused = |host: &str, reason: String| MigratorError::Refused {
            host: host.to_string(),
            reason,
        };
        let Some(target) = self.endpoint(&req.target)? else {
            return Err(refused(
                &req.target,
                "no agent registered for this host".into(),
            ));
        };
        let Some(address) = target.peer_address else {
            return Err(refused(
                &req.target,
                "its agent serves no peer listener (no tls_dir)".into(),
            ));
        };
        let mut rec = JobRecord {
            vm: req.vm.clone(),
            source: req.source.clone(),
            target: req.target.clone(),
            started: now,
            job: None,
        };
        match self.put_record(&req.id, &rec, Expect::Absent) {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => {
                return Err(refused(
                    &req.source,
                    format!("a migration named {} was started already", req.id),
                ))
            }
            Err(e) => return Err(store_down(e)),
        }
        let body = json!({
            "target": {"host": req.target, "address": address},
            "mode": "precopy",
        });
        let c = match self.client(&req.source) {
            Ok(c) => c,
            Err(e) => {
                self.drop_record(&req.id);
                return Err(e);
            }
        };
        let r = match c.request(
            "POST",
            &format!("/v1/vms/{}/migrations", req.vm),
            Some(&body),
        ) {
            Ok(r) => r,
            Err(e @ ClientError::Connect { .. }) => {
                // Nothing reached the agent: no migration started.
                self.drop_record(&req.id);
                self.clients.remove(&req.source);
                return Err(unreachable(&req.source, e));
            }
            // Sent, and the answer lost: the record stays; `poll` settles it.
            Err(e) => return Err(unreachable(&req.source, e)),
        };
        if r.status != 202 {
            self.drop_record(&req.id);
            let host = if r.status == 503 {
                &req.target
            } else {
                &req.source
            };
            return Err(refused(host, reason(&r)));
        }
        let job = r.json()["id"].as_str().map(str::to_string);
        let Some((_, rev)) = self.record(&req.id)? else {
            return Err(store_down(StoreError::Backend(format!(
                "the record of {} vanished",
                req.id
            ))));
        };
        rec.job = job;
        self.put_record(&req.id, &rec, Expect::At(rev))
            .map_err(store_down)
    }

    fn poll(&mut self, id: &str, now: Timestamp) -> Result<MigrationStatus, MigratorError> {
        let Some((rec, _)) = self.record(id)? else {
            return Ok(MigrationStatus::Unknown);
        };
        let Some(job) = rec.job.clone() else {
            return self.settle_unanswered(&rec);
        };
        let r = self.call(&rec.source, "GET", &format!("/v1/migrations/{job}"), None)?;
        if r.status == 404 {
            return Ok(MigrationStatus::Failed {
                reason: format!("{} no longer knows its job {job}", rec.source),
            });
        }
        if r.status != 200 {
            return Err(unreachable(&rec.source, reason(&r)));
        }
        let v = r.json();
        let elapsed_ms = now.since(rec.started);
        Ok(match v["phase"].as_str().unwrap_or_default() {
            "committed" => MigrationStatus::Committed {
                total_ms: v["report"]["total_ms"]
                    .as_f64()
                    .map_or(elapsed_ms, |t| t as u64),
            },
            "failed" => MigrationStatus::Failed {
                reason: v["error"]
                    .as_str()
                    .unwrap_or("the agent gave no reason")
                    .to_string(),
            },
            "cancelled" => MigrationStatus::Cancelled,
            _ => {
                let p = &v["progress"];
                let sent = p["sent_mib"].as_f64().unwrap_or(0.0);
                let left = p["mib_left"].as_f64().unwrap_or(0.0);
                MigrationStatus::Running {
                    sent_bytes: (sent * MIB as f64) as u64,
                    expected_bytes: ((sent + left) * MIB as f64) as u64,
                    elapsed_ms,
                }
            }
        })
    }

    fn cancel(&mut self, id: &str, _now: Timestamp) -> Result<(), MigratorError> {
        let (rec, job) = self.job_of(id)?;
        let r = self.call(
            &rec.source,
            "DELETE",
            &format!("/v1/migrations/{job}"),
            None,
        )?;
        match r.status {
            202 => Ok(()),
            404 => Err(MigratorError::NoSuchMigration(id.to_string())),
            _ => Err(MigratorError::Refused {
                host: rec.source,
                reason: reason(&r),
            }),
        }
    }

    fn switch_to_postcopy(&mut self, id: &str, _now: Timestamp) -> Result<(), MigratorError> {
        let (rec, job) = self.job_of(id)?;
        let body = json!({"mode": "postcopy"});
        let r = self.call(
            &rec.source,
            "PATCH",
            &format!("/v1/migrations/{job}"),
            Some(&body),
        )?;
        match r.status {
            200 => Ok(()),
            404 => Err(MigratorError::NoSuchMigration(id.to_string())),
            _ => Err(MigratorError::Refused {
                host: rec.source,
                reason: reason(&r),
            }),
        }
    }

    fn terminate(&mut self, vm: &Vm, _now: Timestamp) -> Result<(), MigratorError> {
        let r = self.call(&vm.host, "DELETE", &format!("/v1/vms/{}", vm.id), None)?;
        match r.status {
            // Gone already is what was asked.
            200 | 404 => Ok(()),
            _ => Err(MigratorError::Refused {
                host: vm.host.clone(),
                reason: reason(&r),
            }),
        }
    }

    fn boot(&mut self, vm: &Vm, host: &str, _now: Timestamp) -> Result<(), MigratorError> {
        let Some(def) = definition(&self.store, &vm.id).map_err(store_down)? else {
            return Err(MigratorError::Refused {
                host: host.to_string(),
                reason: format!("no definition of {} in the fleet's store", vm.id),
            });
        };
        let body = json!({"id": vm.id, "definition": def.value});
        let r = self.call(host, "POST", "/v1/vms", Some(&body))?;
        match r.status {
            201 => Ok(()),
            _ => Err(MigratorError::Refused {
                host: host.to_string(),
                reason: reason(&r),
            }),
        }
    }
}
