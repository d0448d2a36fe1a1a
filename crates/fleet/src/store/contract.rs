//! What every backend must do, as one check each backend's tests run.

use super::{Backend, Expect, Op, StoreError, Txn};

fn put(key: &str, value: &str, expect: Expect) -> Txn {
    Txn {
        checks: vec![(key.to_string(), expect)],
        ops: vec![Op::Put {
            key: key.to_string(),
            value: value.as_bytes().to_vec(),
        }],
        lease: None,
    }
}

/// Runs the contract on `b`; public so that the etcd backend's tests
/// (which need a real etcd) run it too.
pub fn check(b: &dyn Backend) {
    let start = b.revision().unwrap();
    let r1 = b.commit(&put("hosts/a", "1", Expect::Absent)).unwrap();
    assert_eq!(r1, start + 1);
    // A second create of the same key is a conflict, and changes nothing.
    let e = b.commit(&put("hosts/a", "x", Expect::Absent)).unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    assert_eq!(b.get("hosts/a").unwrap().unwrap().value, b"1");
    // Compare-and-swap on the revision.
    let r2 = b.commit(&put("hosts/a", "2", Expect::At(r1))).unwrap();
    let e = b.commit(&put("hosts/a", "3", Expect::At(r1))).unwrap_err();
    assert!(e.to_string().contains("another writer"), "{e}");
    let got = b.get("hosts/a").unwrap().unwrap();
    assert_eq!((got.value.as_slice(), got.mod_revision), (&b"2"[..], r2));
    // A failed check in a transaction of several writes applies none.
    let txn = Txn {
        checks: vec![
            ("hosts/b".into(), Expect::Absent),
            ("hosts/a".into(), Expect::At(r1)),
        ],
        ops: vec![Op::Put {
            key: "hosts/b".into(),
            value: b"b".to_vec(),
        }],
        lease: None,
    };
    assert!(b.commit(&txn).is_err());
    assert!(b.get("hosts/b").unwrap().is_none());
    b.commit(&put("hosts/b", "b", Expect::Absent)).unwrap();
    b.commit(&put("vms/v", "v", Expect::Any)).unwrap();
    let hosts: Vec<String> = b
        .list("hosts/")
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(hosts, ["hosts/a", "hosts/b"]);
    // Fencing: a revoked lease writes nothing.
    let lease = b.grant_lease(10_000).unwrap();
    let mut fenced = put("vms/v", "w", Expect::Any);
    fenced.lease = Some(lease);
    b.commit(&fenced).unwrap();
    assert!(b.live_leases().unwrap().contains(&lease));
    b.revoke_lease(lease).unwrap();
    assert!(!b.live_leases().unwrap().contains(&lease));
    assert!(matches!(
        b.commit(&fenced).unwrap_err(),
        StoreError::Fenced(_)
    ));
    assert!(b.keep_alive(lease).is_err());
    // Changes since a revision, deletes included.
    let before = b.revision().unwrap();
    b.commit(&Txn {
        checks: vec![],
        ops: vec![Op::Delete {
            key: "hosts/b".into(),
        }],
        lease: None,
    })
    .unwrap();
    let changes = b.changes_since(before).unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].key, "hosts/b");
    assert!(!changes[0].put);
    assert!(b.get("hosts/b").unwrap().is_none());
    assert!(b.changes_since(start).unwrap().len() >= 5);
}
