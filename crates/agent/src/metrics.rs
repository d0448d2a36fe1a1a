//! `GET /metrics`: one Prometheus registry for the agent. Gauges that
//! describe the VMs are refreshed from the records at each scrape;
//! counters count as things happen. Migration metrics (by outcome, bytes
//! sent, a downtime histogram, memory reserved for incoming ones) too.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::model::VmState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// How a request ended: `ok` (2xx/3xx), `client_error` (4xx: refused,
/// nothing changed) or `server_error` (5xx).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    ok,
    client_error,
    server_error,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    /// committed, failed or cancelled.
    pub outcome: String,
}

pub struct Metrics {
    registry: Registry,
    migrations: Family<MigrationLabels, Counter>,
    migration_bytes: Counter,
    downtime: Histogram,
    mem_incoming: Gauge,
    vms: Family<StateLabels, Gauge>,
    mem_reserved: Gauge,
    mem_capacity: Gauge,
    vcpus_reserved: Gauge,
    vcpus_capacity: Gauge,
    requests: Family<RequestLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ferryd");
        let vms = Family::<StateLabels, Gauge>::default();
        registry.register("vms", "VMs on this host by state", vms.clone());
        let mem_reserved = Gauge::default();
        registry.register(
            "memory_reserved_bytes",
            "Guest memory reserved by VMs in the capacity ledger",
            mem_reserved.clone(),
        );
        let mem_capacity = Gauge::default();
        registry.register(
            "memory_capacity_bytes",
            "Guest memory this host may give to VMs",
            mem_capacity.clone(),
        );
        let vcpus_reserved = Gauge::default();
        registry.register(
            "vcpus_reserved",
            "vCPUs reserved by VMs in the capacity ledger",
            vcpus_reserved.clone(),
        );
        let vcpus_capacity = Gauge::default();
        registry.register(
            "vcpus_capacity",
            "vCPUs this host may give to VMs",
            vcpus_capacity.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "API requests by route and outcome",
            requests.clone(),
        );
        let migrations = Family::<MigrationLabels, Counter>::default();
        registry.register(
            "migrations",
            "Outgoing migrations ended, by outcome",
            migrations.clone(),
        );
        let migration_bytes = Counter::default();
        registry.register(
            "migration_sent_bytes",
            "Bytes outgoing migrations sent",
            migration_bytes.clone(),
        );
        let downtime =
            Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]);
        registry.register(
            "migration_downtime_milliseconds",
            "Host-side downtime of committed outgoing migrations",
            downtime.clone(),
        );
        let mem_incoming = Gauge::default();
        registry.register(
            "memory_reserved_incoming_bytes",
            "Guest memory reserved for incoming migrations not yet committed",
            mem_incoming.clone(),
        );
        Self {
            registry,
            migrations,
            migration_bytes,
            downtime,
            mem_incoming,
            vms,
            mem_reserved,
            mem_capacity,
            vcpus_reserved,
            vcpus_capacity,
            requests,
        }
    }

    pub fn count_request(&self, method: &str, route: &str, status: u16) {
        let outcome = match status {
            500.. => Outcome::server_error,
            400..=499 => Outcome::client_error,
            _ => Outcome::ok,
        };
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                outcome,
            })
            .inc();
    }

    /// An outgoing migration ended with `outcome`.
    pub fn migration_ended(&self, outcome: &str) {
        self.migrations
            .get_or_create(&MigrationLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// What a migration's data plane sent, and its downtime if it
    /// committed.
    pub fn migration_moved(&self, bytes: u64, downtime_ms: Option<f64>) {
        self.migration_bytes.inc_by(bytes);
        if let Some(d) = downtime_ms {
            self.downtime.observe(d);
        }
    }

    /// Sets the gauges, then renders the text format.
    pub fn render(
        &self,
        states: &[VmState],
        reserved: (u64, u32),
        capacity: (u64, u32),
        incoming: u64,
    ) -> String {
        self.mem_incoming.set(incoming as i64);
        for s in VmState::ALL {
            let n = states.iter().filter(|&&x| x == s).count();
            self.vms
                .get_or_create(&StateLabels {
                    state: s.as_str().to_owned(),
                })
                .set(n as i64);
        }
        self.mem_reserved.set(reserved.0 as i64);
        self.vcpus_reserved.set(i64::from(reserved.1));
        self.mem_capacity.set(capacity.0 as i64);
        self.vcpus_capacity.set(i64::from(capacity.1));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        out
    }
}
