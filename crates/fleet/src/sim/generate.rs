//! A generated fleet, the same for the same spec: hosts in racks of 20
//! (10 racks to a zone), with CPU generations and Ferry versions that
//! differ by rack; VMs of 1-16 GiB in the proportions of a general-purpose
//! cloud, most nearly idle, some writing hard; a few with TERMINATE, some
//! allowing post-copy, some in anti-affinity groups.

use std::collections::BTreeSet;

use crate::model::{
    Availability, Health, Host, Maintenance, MigrationPolicy, OnHostMaintenance, Resources, Tenant,
    Version, Vm, VmRunState, GIB, MIB,
};

#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub hosts: usize,
    pub vms: usize,
    pub tenants: usize,
    pub hosts_per_rack: usize,
    pub host_capacity: Resources,
    /// Each host's migration link, bytes per second.
    pub link_bytes_per_sec: u64,
    /// Placement keeps this share of every host free, percent.
    pub headroom_percent: u32,
    pub seed: u64,
}

impl Default for FleetSpec {
    fn default() -> Self {
        Self {
            hosts: 1000,
            vms: 20_000,
            tenants: 50,
            hosts_per_rack: 20,
            host_capacity: Resources::new(128 * GIB, 96),
            // 10 Gbit/s.
            link_bytes_per_sec: 1_250_000_000,
            headroom_percent: 10,
            seed: 17,
        }
    }
}

/// SplitMix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn percent(&mut self) -> u64 {
        self.below(100)
    }
}

const BASE_FEATURES: [&str; 3] = ["aes", "avx2", "sse4_2"];
const NEW_FEATURE: &str = "avx512f";

/// Hosts, VMs and tenants for `spec`.
pub fn generate(spec: &FleetSpec) -> (Vec<Host>, Vec<Vm>, Vec<Tenant>) {
    let mut rng = Rng(spec.seed);
    let hosts: Vec<Host> = (0..spec.hosts)
        .map(|i| {
            let rack = i / spec.hosts_per_rack.max(1);
            let mut features: BTreeSet<String> =
                BASE_FEATURES.iter().map(|s| s.to_string()).collect();
            // Every fifth rack is a newer CPU generation.
            if rack % 5 == 0 {
                features.insert(NEW_FEATURE.into());
            }
            // Upgrades roll out rack by rack: some are a version behind,
            // some a version ahead.
            let minor = match rack % 10 {
                3 => 3,
                7 => 5,
                _ => 4,
            };
            Host {
                name: format!("h{i:04}"),
                capacity: spec.host_capacity,
                labels: [
                    ("rack".to_string(), format!("rack{rack}")),
                    ("zone".to_string(), format!("zone{}", rack / 10)),
                ]
                .into(),
                health: Health::Healthy,
                version: Version::new(1, minor),
                cpu_features: features,
                maintenance: Maintenance::None,
                link_bytes_per_sec: spec.link_bytes_per_sec,
                receive_setup: None,
                send_setup_ms: None,
            }
        })
        .collect();
    let tenants: Vec<Tenant> = (0..spec.tenants.max(1))
        .map(|t| Tenant {
            name: format!("t{t:02}"),
            max_concurrent_migrations: None,
        })
        .collect();
    let usable = spec.host_capacity.less_headroom(spec.headroom_percent);
    let mut used = vec![Resources::default(); hosts.len()];
    let mut vms = Vec::with_capacity(spec.vms);
    let mut next_host = 0usize;
    for i in 0..spec.vms {
        let gib = match rng.percent() {
            0..=24 => 1,
            25..=54 => 2,
            55..=79 => 4,
            80..=94 => 8,
            _ => 16,
        };
        let res = Resources::new(gib * GIB, (gib as u32 / 2).max(1));
        // First host from the round-robin position that has room.
        let Some(h) = (0..hosts.len())
            .map(|k| (next_host + k) % hosts.len())
            .find(|&h| usable.holds(used[h].plus(res)))
        else {
            break;
        };
        next_host = (h + 1) % hosts.len();
        used[h] = used[h].plus(res);
        let populated = gib * GIB / 100 * (20 + rng.below(71)) / MIB * MIB;
        let dirty = match rng.percent() {
            0..=59 => rng.below(5) * MIB,
            60..=89 => (20 + rng.below(181)) * MIB,
            _ => (300 + rng.below(901)) * MIB,
        };
        let terminate = rng.percent() < 8;
        let tenant = format!("t{:02}", rng.below(tenants.len() as u64));
        let anti_affinity = if rng.percent() < 15 {
            [format!("{tenant}-g{}", rng.below(5))].into()
        } else {
            BTreeSet::new()
        };
        let mut cpu_features: BTreeSet<String> =
            BASE_FEATURES.iter().map(|s| s.to_string()).collect();
        if hosts[h].cpu_features.contains(NEW_FEATURE) && rng.percent() < 50 {
            cpu_features.insert(NEW_FEATURE.into());
        }
        vms.push(Vm {
            id: format!("vm{i:05}"),
            tenant,
            host: hosts[h].name.clone(),
            resources: res,
            populated_bytes: populated,
            dirty_rate: dirty,
            availability: Availability {
                on_host_maintenance: if terminate {
                    OnHostMaintenance::Terminate
                } else {
                    OnHostMaintenance::Migrate
                },
                automatic_restart: rng.percent() < 50,
            },
            migration: MigrationPolicy {
                allow_postcopy: rng.percent() < 20,
            },
            anti_affinity,
            cpu_features,
            state: VmRunState::Running,
        });
    }
    (hosts, vms, tenants)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_spec_gives_the_same_fleet() {
        let spec = FleetSpec {
            hosts: 40,
            vms: 500,
            ..FleetSpec::default()
        };
        let (h1, v1, _) = generate(&spec);
        let (h2, v2, _) = generate(&spec);
        assert_eq!(h1, h2);
        assert_eq!(v1, v2);
        assert_eq!(v1.len(), 500);
        assert_eq!(h1[25].rack(), "rack1");
        crate::model::Fleet::new(h1, v1, vec![]).unwrap();
    }
}
