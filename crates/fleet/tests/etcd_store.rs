//! The etcd backend against a real etcd-server on loopback: the store
//! contract every backend keeps, fencing by a lapsed lease, watch, and a
//! clear error when etcd is not there.

mod common;

use std::time::{Duration, Instant};

use common::etcd::EtcdServer;
use ferry_fleet::store::etcd::{EtcdBackend, DEFAULT_PREFIX};
use ferry_fleet::store::{Backend, Expect, Op, StoreError, Txn};

fn put(key: &str, value: &str) -> Txn {
    Txn {
        checks: vec![(key.into(), Expect::Any)],
        ops: vec![Op::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
        }],
        lease: None,
    }
}

#[test]
fn etcd_backend_keeps_the_store_contract() {
    let Some(etcd) = EtcdServer::start("etcd_backend_keeps_the_store_contract") else {
        return;
    };
    let b = EtcdBackend::connect(&etcd.endpoint, DEFAULT_PREFIX).unwrap();
    ferry_fleet::store::contract::check(&b);
    // The keys are under the prefix, and a second prefix sees none of them.
    let other = EtcdBackend::connect(&etcd.endpoint, "/other/").unwrap();
    assert!(other.list("hosts/").unwrap().is_empty());
    assert_eq!(b.list("hosts/").unwrap().len(), 1);
}

#[test]
fn a_lapsed_lease_fences_its_writes() {
    let Some(etcd) = EtcdServer::start("a_lapsed_lease_fences_its_writes") else {
        return;
    };
    let b = EtcdBackend::connect(&etcd.endpoint, DEFAULT_PREFIX).unwrap();
    let lease = b.grant_lease(1_000).unwrap();
    let mut txn = put("plans/p", "1");
    txn.lease = Some(lease);
    b.commit(&txn).unwrap();
    // No keep-alive: etcd lets it lapse (its TTL, at most a few seconds).
    let start = Instant::now();
    while b.live_leases().unwrap().contains(&lease) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the lease never lapsed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    txn.ops = vec![Op::Put {
        key: "plans/p".into(),
        value: b"stale".to_vec(),
    }];
    let e = b.commit(&txn).unwrap_err();
    assert!(matches!(e, StoreError::Fenced(l) if l == lease), "{e}");
    assert!(e.to_string().contains("no longer the leader"), "{e}");
    assert_eq!(b.get("plans/p").unwrap().unwrap().value, b"1");
    let e = b.keep_alive(lease).unwrap_err();
    assert!(matches!(e, StoreError::Fenced(_)), "{e}");
}

#[test]
fn watch_follows_changes_as_they_happen() {
    let Some(etcd) = EtcdServer::start("watch_follows_changes_as_they_happen") else {
        return;
    };
    let b = EtcdBackend::connect(&etcd.endpoint, DEFAULT_PREFIX).unwrap();
    let from = b.revision().unwrap();
    let rx = b.watch(from);
    let r1 = b.commit(&put("hosts/a", "1")).unwrap();
    b.commit(&Txn {
        checks: vec![],
        ops: vec![Op::Delete {
            key: "hosts/a".into(),
        }],
        lease: None,
    })
    .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a change within 5 s")
            .unwrap();
        seen.extend(batch);
    }
    assert_eq!(
        (seen[0].key.as_str(), seen[0].put, seen[0].revision),
        ("hosts/a", true, r1)
    );
    assert_eq!((seen[1].key.as_str(), seen[1].put), ("hosts/a", false));
    assert_eq!(b.changes_since(from).unwrap(), seen);
}

#[test]
fn an_unreachable_etcd_is_a_clear_error() {
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = EtcdBackend::connect(&format!("http://127.0.0.1:{port}"), DEFAULT_PREFIX)
        .err()
        .expect("no etcd there");
    let msg = e.to_string();
    assert!(
        msg.contains("unreachable") && msg.contains("no new moves"),
        "{msg}"
    );
    let e = EtcdBackend::connect("http://127.0.0.1:1", "no-slash")
        .err()
        .expect("a bad prefix");
    assert!(e.to_string().contains("must end in '/'"), "{e}");
}

#[test]
fn a_plan_over_etcds_txn_limit_is_refused_with_the_flag_to_raise_and_a_raised_limit_takes_it() {
    let test = "a_plan_over_etcds_txn_limit";
    let hosts = vec![common::host("a", "r1", 512), common::host("b", "r2", 512)];
    let vms: Vec<_> = (0..200)
        .map(|i| common::vm(&format!("v{i:03}"), "t", "a", 1))
        .collect();
    let policies = ferry_fleet::policy::Policies::default();
    // etcd's default: at most 128 operations in a transaction.
    let Some(etcd) = EtcdServer::start(test) else {
        return;
    };
    let b = EtcdBackend::connect(&etcd.endpoint, DEFAULT_PREFIX).unwrap();
    let store = ferry_fleet::store::FleetStore::new(b);
    let e = store.seed(&hosts, &vms, &[], &policies).unwrap_err();
    assert!(e.to_string().contains("--max-txn-ops"), "{e}");
    assert!(store.vms().unwrap().is_empty(), "nothing stored");
    drop(store);
    drop(etcd);
    let Some(etcd) = EtcdServer::start_with(test, &["--max-txn-ops=1024"]) else {
        return;
    };
    let b = EtcdBackend::connect(&etcd.endpoint, DEFAULT_PREFIX).unwrap();
    let mut s = common::open_on(b, &hosts, &vms, &policies);
    let id = s
        .prepare_drain("a", ferry_fleet::time::Timestamp(0))
        .unwrap()
        .id
        .clone();
    let stored = s.store().plans().unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].value, *s.plan(&id).unwrap());
    assert_eq!(stored[0].value.entries.len(), 200);
    // A new scheduler reads the same plan back from its 201 keys.
    let again = ferry_fleet::scheduler::Scheduler::open(
        EtcdBackend::connect(&etcd.endpoint, DEFAULT_PREFIX).unwrap(),
        ferry_fleet::sim::SimMigrator::new(&hosts, &vms),
        None,
    )
    .unwrap();
    assert_eq!(again.plan(&id), s.plan(&id));
}
