//! A VMM that does not come up: the create answers 500 with the VMM's own
//! last words, the record stays (failed, with the reason) for an operator
//! to read, its capacity is released, and delete removes it.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Agent, TempDir};
use serde_json::json;

#[test]
fn a_vmm_that_dies_while_starting_is_recorded_failed() {
    let bin_dir = TempDir::new("fake-ferry");
    let fake = bin_dir.path("ferry");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'ferry: error: no guest today' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = Agent::with_ferry_bin("vmmfail", "1G", 2, Some(&fake));

    let r = agent.post(
        "/v1/vms",
        Some(json!({"id": "f1", "definition": {"mem_bytes": 64u64 << 20}})),
    );
    assert_eq!(r.status, 500, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"], "vmm_error");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains("exited with status 3") && reason.contains("no guest today"),
        "{reason}"
    );

    let v = agent.show("f1");
    assert_eq!(v["state"], "failed", "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("no guest today"),
        "{v}"
    );
    let m = agent.get("/metrics").text();
    assert!(
        m.contains("ferryd_memory_reserved_bytes 0"),
        "capacity released: {m}"
    );
    assert!(m.contains("ferryd_vms{state=\"failed\"} 1"), "{m}");
    let audit = agent.audit_lines();
    assert_eq!(audit.last().unwrap()["outcome"], "failed", "{audit:?}");

    // The id stays taken until the record is deleted.
    let again = agent.post(
        "/v1/vms",
        Some(json!({"id": "f1", "definition": {"mem_bytes": 64u64 << 20}})),
    );
    assert_eq!(again.status, 409);
    assert_eq!(agent.delete("/v1/vms/f1").status, 200);
    assert_eq!(agent.get("/v1/vms").json(), json!([]));
}
