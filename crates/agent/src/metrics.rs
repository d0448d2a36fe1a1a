//! `GET /metrics`: one Prometheus registry for the agent. Gauges that
//! describe the VMs are refreshed from the records at each scrape;
//! counters count as things happen. Migration metrics (by outcome, bytes
//! sent, a downtime histogram) register here next to these when
//! migrations land.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

pub struct Metrics {
    registry: Registry,
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
        Self {
            registry,
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

    /// Sets the gauges, then renders the text format.
    pub fn render(&self, states: &[VmState], reserved: (u64, u32), capacity: (u64, u32)) -> String {
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
