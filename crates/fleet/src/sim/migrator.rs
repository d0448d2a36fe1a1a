//! A simulated migrator. Each migration spends its setup (the target's
//! measured cost of receiving a VM of its size, else `predict::SETUP_MS`,
//! plus the source's measured cost of sending: `predict::setup_ms`), then
//! sends the bytes pre-copy would send
//! (`predict::bytes_to_send` over the source's link), then takes
//! `predict::BLACKOUT_MS` of blackout. While it sends, it gets an equal
//! share of its source's link among the migrations leaving that host, and
//! of its target's among those arriving there, whichever is less; time is
//! integrated between calls to `advance`. Every migration is recorded
//! with when it started and ended: the audit checks the caps from that
//! record, not from the scheduler's own view.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::migrator::{MigrationRequest, MigrationStatus, Migrator, MigratorError};
use crate::model::{Host, ReceiveSetup, Vm};
use crate::plan::predict::{bytes_to_send, BLACKOUT_MS, SETUP_MS};
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Running,
    Committed,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationRecord {
    pub id: String,
    pub vm: String,
    pub tenant: String,
    pub source: String,
    pub target: String,
    pub source_rack: String,
    pub target_rack: String,
    pub started: Timestamp,
    /// Exact (interpolated) end; None while running.
    pub ended: Option<Timestamp>,
    pub outcome: Outcome,
    pub bytes: u64,
}

/// A stop or a boot the migrator was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmOp {
    pub vm: String,
    pub host: String,
    pub boot: bool,
    pub at: Timestamp,
}

struct SimHost {
    rack: String,
    link: f64,
    setup: Option<ReceiveSetup>,
    send_setup_ms: f64,
    failed: bool,
}

struct SimVm {
    tenant: String,
    mem_bytes: u64,
    populated: u64,
    dirty: u64,
}

/// A fault to inject into a VM's next migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails when half its bytes are sent.
    FailHalfway,
    /// Never converges: sends nothing (until cancelled or switched to
    /// post-copy).
    Stall,
}

struct Active {
    rec: usize,
    src: usize,
    dst: usize,
    /// Bytes still to send.
    left: f64,
    total: f64,
    data_from: f64,
    fault: Option<Fault>,
}

/// Peak link use seen, bytes per second.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkPeaks {
    /// The busiest host link (in + out), and which host.
    pub host: f64,
    pub host_name: String,
    /// Cross-rack traffic per rack uplink (in + out).
    pub rack_uplink: BTreeMap<String, f64>,
}

pub struct SimMigrator {
    hosts: Vec<SimHost>,
    host_ix: HashMap<String, usize>,
    host_names: Vec<String>,
    vms: HashMap<String, SimVm>,
    active: BTreeMap<String, Active>,
    ids: HashMap<String, usize>,
    record: Vec<MigrationRecord>,
    ops: Vec<VmOp>,
    faults: HashMap<String, Vec<Fault>>,
    clock: f64,
    peaks: LinkPeaks,
}

impl SimMigrator {
    pub fn new(hosts: &[Host], vms: &[Vm]) -> Self {
        Self {
            host_ix: hosts
                .iter()
                .enumerate()
                .map(|(i, h)| (h.name.clone(), i))
                .collect(),
            host_names: hosts.iter().map(|h| h.name.clone()).collect(),
            hosts: hosts
                .iter()
                .map(|h| SimHost {
                    rack: h.rack().to_string(),
                    link: h.link_bytes_per_sec as f64,
                    setup: h.receive_setup,
                    send_setup_ms: h.send_setup_ms.unwrap_or(0.0).max(0.0),
                    failed: false,
                })
                .collect(),
            vms: vms
                .iter()
                .map(|v| {
                    (
                        v.id.clone(),
                        SimVm {
                            tenant: v.tenant.clone(),
                            mem_bytes: v.resources.mem_bytes,
                            populated: v.populated_bytes,
                            dirty: v.dirty_rate,
                        },
                    )
                })
                .collect(),
            active: BTreeMap::new(),
            ids: HashMap::new(),
            record: Vec::new(),
            ops: Vec::new(),
            faults: HashMap::new(),
            clock: 0.0,
            peaks: LinkPeaks::default(),
        }
    }

    pub fn record(&self) -> &[MigrationRecord] {
        &self.record
    }

    pub fn ops(&self) -> &[VmOp] {
        &self.ops
    }

    pub fn peaks(&self) -> &LinkPeaks {
        &self.peaks
    }

    /// The VM's next migrations meet these faults, one each.
    pub fn inject(&mut self, vm: &str, faults: &[Fault]) {
        self.faults
            .entry(vm.to_string())
            .or_default()
            .extend_from_slice(faults);
    }

    /// The host dies now: migrations to and from it fail (the VMs stay on
    /// their sources, or are lost with a failed source).
    pub fn fail_host(&mut self, name: &str, now: Timestamp) {
        self.advance(now);
        let Some(&h) = self.host_ix.get(name) else {
            return;
        };
        self.hosts[h].failed = true;
        let hit: Vec<String> = self
            .active
            .iter()
            .filter(|(_, a)| a.src == h || a.dst == h)
            .map(|(id, _)| id.clone())
            .collect();
        for id in hit {
            self.end(&id, Outcome::Failed, now.ms() as f64);
        }
    }

    fn end(&mut self, id: &str, outcome: Outcome, at_ms: f64) {
        if let Some(a) = self.active.remove(id) {
            let r = &mut self.record[a.rec];
            r.ended = Some(Timestamp(at_ms.ceil() as u64));
            r.outcome = outcome;
            r.bytes = (a.total - a.left.max(0.0)) as u64;
        }
    }

    /// Moves the simulated clock to `now`, sending what the links carry.
    pub fn advance(&mut self, now: Timestamp) {
        let to = now.ms() as f64;
        if to <= self.clock {
            return;
        }
        let mut out_n = vec![0u32; self.hosts.len()];
        let mut in_n = vec![0u32; self.hosts.len()];
        for a in self.active.values() {
            if a.data_from < to && a.left > 0.0 {
                out_n[a.src] += 1;
                in_n[a.dst] += 1;
            }
        }
        let mut host_load = vec![0f64; self.hosts.len()];
        let mut uplink: HashMap<usize, f64> = HashMap::new();
        let mut finished = Vec::new();
        let mut failed = Vec::new();
        for (id, a) in self.active.iter_mut() {
            if a.left <= 0.0 || a.data_from >= to {
                if a.left <= 0.0 {
                    // Only its blackout is left.
                    finished.push((id.clone(), a.data_from));
                }
                continue;
            }
            let rate = (self.hosts[a.src].link / f64::from(out_n[a.src]))
                .min(self.hosts[a.dst].link / f64::from(in_n[a.dst]));
            let rate = if a.fault == Some(Fault::Stall) {
                0.0
            } else {
                rate
            };
            let from = self.clock.max(a.data_from);
            let span_ms = to - from;
            let sent = rate * span_ms / 1e3;
            host_load[a.src] += rate;
            host_load[a.dst] += rate;
            if self.hosts[a.src].rack != self.hosts[a.dst].rack {
                *uplink.entry(a.src).or_insert(0.0) += rate;
                *uplink.entry(a.dst).or_insert(0.0) += rate;
            }
            if a.fault == Some(Fault::FailHalfway) && a.left - sent <= a.total / 2.0 {
                let at = from + (a.left - a.total / 2.0).max(0.0) / rate * 1e3;
                failed.push((id.clone(), at));
                continue;
            }
            if sent >= a.left {
                let done_at = from + a.left / rate * 1e3;
                a.left = 0.0;
                a.data_from = done_at;
                finished.push((id.clone(), done_at));
            } else {
                a.left -= sent;
            }
        }
        for (h, load) in host_load.iter().enumerate() {
            if *load > self.peaks.host {
                self.peaks.host = *load;
                self.peaks.host_name = self.host_names[h].clone();
            }
        }
        let mut per_rack: HashMap<&str, f64> = HashMap::new();
        for (h, load) in uplink {
            *per_rack.entry(self.hosts[h].rack.as_str()).or_insert(0.0) += load;
        }
        for (rack, load) in per_rack {
            let peak = self
                .peaks
                .rack_uplink
                .entry(rack.to_string())
                .or_insert(0.0);
            *peak = peak.max(load);
        }
        for (id, at) in failed {
            self.end(&id, Outcome::Failed, at);
        }
        for (id, at) in finished {
            if at + BLACKOUT_MS <= to {
                self.end(&id, Outcome::Committed, at + BLACKOUT_MS);
            }
        }
        self.clock = to;
    }
}

impl Migrator for SimMigrator {
    fn start(&mut self, req: &MigrationRequest, now: Timestamp) -> Result<(), MigratorError> {
        self.advance(now);
        let refuse = |host: &str, reason: &str| MigratorError::Refused {
            host: host.to_string(),
            reason: reason.to_string(),
        };
        if self.ids.contains_key(&req.id) {
            return Err(refuse(&req.source, "a migration of that name already ran"));
        }
        let (Some(&src), Some(&dst)) =
            (self.host_ix.get(&req.source), self.host_ix.get(&req.target))
        else {
            return Err(refuse(&req.target, "unknown host"));
        };
        for h in [src, dst] {
            if self.hosts[h].failed {
                return Err(MigratorError::Unreachable {
                    host: self.host_names[h].clone(),
                    reason: "the host is down".into(),
                });
            }
        }
        if self
            .active
            .values()
            .any(|a| self.record[a.rec].vm == req.vm)
        {
            return Err(refuse(&req.source, "the VM is already migrating (409)"));
        }
        let Some(vm) = self.vms.get(&req.vm) else {
            return Err(refuse(&req.source, "no such VM"));
        };
        let (bytes, _) = bytes_to_send(vm.populated, vm.dirty, self.hosts[src].link as u64);
        let setup_ms = self.hosts[dst]
            .setup
            .map_or(SETUP_MS, |s| s.ms(vm.mem_bytes).max(0.0))
            + self.hosts[src].send_setup_ms;
        let fault = self.faults.get_mut(&req.vm).and_then(|f| {
            if f.is_empty() {
                None
            } else {
                Some(f.remove(0))
            }
        });
        self.record.push(MigrationRecord {
            id: req.id.clone(),
            vm: req.vm.clone(),
            tenant: vm.tenant.clone(),
            source: req.source.clone(),
            target: req.target.clone(),
            source_rack: self.hosts[src].rack.clone(),
            target_rack: self.hosts[dst].rack.clone(),
            started: now,
            ended: None,
            outcome: Outcome::Running,
            bytes: 0,
        });
        let rec = self.record.len() - 1;
        self.ids.insert(req.id.clone(), rec);
        self.active.insert(
            req.id.clone(),
            Active {
                rec,
                src,
                dst,
                left: bytes.max(1) as f64,
                total: bytes.max(1) as f64,
                data_from: now.ms() as f64 + setup_ms,
                fault,
            },
        );
        Ok(())
    }

    fn poll(&mut self, id: &str, now: Timestamp) -> Result<MigrationStatus, MigratorError> {
        self.advance(now);
        let Some(&rec) = self.ids.get(id) else {
            return Ok(MigrationStatus::Unknown);
        };
        let r = &self.record[rec];
        Ok(match r.outcome {
            Outcome::Running => {
                let a = &self.active[id];
                MigrationStatus::Running {
                    sent_bytes: (a.total - a.left) as u64,
                    expected_bytes: a.total as u64,
                    elapsed_ms: now.since(r.started),
                }
            }
            Outcome::Committed => MigrationStatus::Committed {
                total_ms: r.ended.map_or(0, |e| e.since(r.started)),
            },
            Outcome::Failed => MigrationStatus::Failed {
                reason: if self.hosts[self.host_ix[&r.target]].failed {
                    format!("target {} failed", r.target)
                } else if self.hosts[self.host_ix[&r.source]].failed {
                    format!("source {} failed", r.source)
                } else {
                    "the migration failed (simulated fault); the VM runs on its source".into()
                },
            },
            Outcome::Cancelled => MigrationStatus::Cancelled,
        })
    }

    fn cancel(&mut self, id: &str, now: Timestamp) -> Result<(), MigratorError> {
        self.advance(now);
        if !self.ids.contains_key(id) {
            return Err(MigratorError::NoSuchMigration(id.to_string()));
        }
        self.end(id, Outcome::Cancelled, now.ms() as f64);
        Ok(())
    }

    fn switch_to_postcopy(&mut self, id: &str, now: Timestamp) -> Result<(), MigratorError> {
        self.advance(now);
        let Some(a) = self.active.get_mut(id) else {
            return Err(MigratorError::NoSuchMigration(id.to_string()));
        };
        // Post-copy sends every page once from here: at most what is left
        // of one pass, and the guest cannot outrun it.
        let populated = self.vms[&self.record[a.rec].vm].populated as f64;
        a.left = a.left.min(populated).max(1.0);
        a.total = a.total.max(a.left);
        a.fault = None;
        Ok(())
    }

    fn terminate(&mut self, vm: &Vm, now: Timestamp) -> Result<(), MigratorError> {
        self.ops.push(VmOp {
            vm: vm.id.clone(),
            host: vm.host.clone(),
            boot: false,
            at: now,
        });
        Ok(())
    }

    fn boot(&mut self, vm: &Vm, host: &str, now: Timestamp) -> Result<(), MigratorError> {
        match self.host_ix.get(host) {
            Some(&h) if !self.hosts[h].failed => {}
            _ => {
                return Err(MigratorError::Unreachable {
                    host: host.to_string(),
                    reason: "the host is down".into(),
                })
            }
        }
        self.ops.push(VmOp {
            vm: vm.id.clone(),
            host: host.to_string(),
            boot: true,
            at: now,
        });
        Ok(())
    }
}
