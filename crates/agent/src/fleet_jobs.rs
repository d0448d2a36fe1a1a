//! The fleet web page's migrations, from the agents: each record the
//! fleet's migrator keeps (`agent-jobs/NAME`, [`crate::fleet_migrator`])
//! names the VM, its source and the source agent's job, and that agent's
//! `GET /v1/migrations/{job}` says how far it got (progress) or how it
//! ended (the engine's report, its rounds and timeline).
//!
//! Only reads: the records from the page's read of the store, the jobs
//! by GET.
//! Each agent call is bounded by a short timeout, so a hung agent slows a
//! page by that much and shows as unknown, and only the newest records
//! are asked about.

use std::collections::HashMap;
use std::time::Duration;

use ferry_fleet::agents::endpoint;
use ferry_fleet::store::Backend;
use ferry_fleet::web::migrations::{
    thin, MigrationSource, MigrationView, ProgressView, ReportView, RoundView, STARTING, UNKNOWN,
};

use crate::client::AgentClient;
use crate::fleet_migrator::{JobRecord, JOBS};
use crate::migration::MigrationJob;

/// Points of a timeline the page gets at most.
const TIMELINE_POINTS: usize = 400;

pub struct AgentJobs {
    /// Longest wait for one agent's answer.
    pub call_timeout: Duration,
    /// The newest records asked about; older ones are left out.
    pub limit: usize,
}

impl Default for AgentJobs {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentJobs {
    pub fn new() -> Self {
        Self {
            call_timeout: Duration::from_secs(2),
            limit: 100,
        }
    }

    /// Every record, newest first, at most `limit`; one that does not
    /// decode is left out (the migrator would refuse it too).
    fn records(&self, store: &dyn Backend) -> Result<Vec<(String, JobRecord)>, String> {
        let mut recs: Vec<(String, JobRecord)> = store
            .list(JOBS)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter_map(|e| {
                let id = e.key.strip_prefix(JOBS)?.to_string();
                Some((id, serde_json::from_slice(&e.value).ok()?))
            })
            .collect();
        recs.sort_by_key(|(_, r)| std::cmp::Reverse(r.started));
        recs.truncate(self.limit);
        Ok(recs)
    }

    /// The client of `host`'s agent, or why there is none.
    fn client(&self, store: &dyn Backend, host: &str) -> Result<AgentClient, String> {
        match endpoint(&store, host) {
            Ok(Some(ep)) => {
                let mut c = AgentClient::new(&ep.socket);
                c.timeout = self.call_timeout;
                Ok(c)
            }
            Ok(None) => Err(format!("no agent registered for {host}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The agent's job as the page shows it.
pub fn view_of(id: &str, rec: &JobRecord, job: &MigrationJob) -> MigrationView {
    let mib = |m: f64| (m.max(0.0) * f64::from(1u32 << 20)) as u64;
    MigrationView {
        id: id.to_string(),
        vm: rec.vm.clone(),
        source: rec.source.clone(),
        target: rec.target.clone(),
        started: rec.started,
        job: Some(job.id.clone()),
        phase: job.phase.as_str().to_string(),
        progress: job.progress.as_ref().map(|p| ProgressView {
            phase: p.phase.clone(),
            round: p.round,
            sent_bytes: mib(p.sent_mib),
            left_bytes: mib(p.mib_left),
            dirty_rate_mibs: p.dirty_rate_mibs,
            throughput_mibs: p.throughput_mibs,
            elapsed_ms: p.elapsed_ms,
        }),
        report: job.report.as_ref().map(|r| ReportView {
            outcome: r.outcome.clone(),
            mode: r.mode.clone(),
            total_ms: r.total_ms,
            downtime_ms: r.blackout.host_downtime_ms,
            bytes_sent: r.bytes_sent,
            mem_bytes: r.mem_bytes,
            timeline: thin(&r.timeline, TIMELINE_POINTS),
            rounds: r
                .rounds
                .iter()
                .map(|x| RoundView {
                    round: x.round,
                    bytes_sent: x.bytes_sent,
                    duration_ms: x.duration_ms,
                    dirty_rate_mibs: x.dirty_rate_mibs,
                    blackout: x.blackout,
                })
                .collect(),
        }),
        error: job.error.clone(),
        unknown: None,
    }
}

fn without_agent(id: &str, rec: &JobRecord, phase: &str, why: String) -> MigrationView {
    MigrationView {
        id: id.to_string(),
        vm: rec.vm.clone(),
        source: rec.source.clone(),
        target: rec.target.clone(),
        started: rec.started,
        job: rec.job.clone(),
        phase: phase.to_string(),
        progress: None,
        report: None,
        error: None,
        unknown: Some(why),
    }
}

impl MigrationSource for AgentJobs {
    fn migrations(&self, store: &dyn Backend) -> Vec<MigrationView> {
        let recs = match self.records(store) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("fleet web: cannot list the migrations' records: {e}");
                return Vec::new();
            }
        };
        let mut clients: HashMap<String, Result<AgentClient, String>> = HashMap::new();
        recs.iter()
            .map(|(id, rec)| {
                let Some(job) = &rec.job else {
                    return without_agent(
                        id,
                        rec,
                        STARTING,
                        "its agent's job id is not recorded yet".into(),
                    );
                };
                let client = clients
                    .entry(rec.source.clone())
                    .or_insert_with(|| self.client(store, &rec.source));
                let c = match client {
                    Ok(c) => c,
                    Err(why) => return without_agent(id, rec, UNKNOWN, why.clone()),
                };
                match c.get(&format!("/v1/migrations/{job}")) {
                    Ok(r) if r.status == 200 => {
                        match serde_json::from_slice::<MigrationJob>(&r.body) {
                            Ok(j) => view_of(id, rec, &j),
                            Err(e) => without_agent(
                                id,
                                rec,
                                UNKNOWN,
                                format!("{}'s answer does not decode: {e}", rec.source),
                            ),
                        }
                    }
                    Ok(r) if r.status == 404 => without_agent(
                        id,
                        rec,
                        UNKNOWN,
                        format!("{} no longer knows its job {job}", rec.source),
                    ),
                    Ok(r) => without_agent(
                        id,
                        rec,
                        UNKNOWN,
                        format!("{} answered {}", rec.source, r.status),
                    ),
                    Err(e) => {
                        // One timeout per agent, not one per record.
                        *client = Err(e.to_string());
                        without_agent(id, rec, UNKNOWN, e.to_string())
                    }
                }
            })
            .collect()
    }
}
