//! The OpenAPI document ferryd serves is the one committed in
//! crates/agent/openapi.json: a change to the API shows in review.

mod common;

use std::collections::BTreeSet;

use common::Agent;

const REGENERATE: &str =
    "regenerate it: cargo build --release -p ferry-agent && target/release/ferryd --print-openapi > crates/agent/openapi.json";

fn committed_text() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}; {REGENERATE}"))
}

#[test]
fn served_openapi_equals_the_committed_copy() {
    let agent = Agent::with_ferry_bin("openapi", "1G", 2, Some("/bin/false".as_ref()));
    let served = agent.get("/openapi.json");
    assert_eq!(served.status, 200);
    let served = served.json();
    let committed: serde_json::Value =
        serde_json::from_str(&committed_text()).expect("the committed openapi.json is JSON");
    assert!(
        served == committed,
        "the served OpenAPI document differs from crates/agent/openapi.json; {REGENERATE}"
    );

    let printed = std::process::Command::new(common::ferryd_bin())
        .arg("--print-openapi")
        .output()
        .unwrap();
    assert!(printed.status.success());
    assert!(
        String::from_utf8(printed.stdout).unwrap() == committed_text(),
        "`ferryd --print-openapi` differs from crates/agent/openapi.json; {REGENERATE}"
    );
}

/// Every documented endpoint is exercised by a test in this directory;
/// a new one must be added here and tested.
#[test]
fn documented_endpoints_are_the_tested_ones() {
    let doc: serde_json::Value = serde_json::from_str(&committed_text()).unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let tested: BTreeSet<String> = [
        "GET /v1/vms",                     // lifecycle, bad_input, cli
        "POST /v1/vms",                    // lifecycle, bad_input, readopt, cli
        "GET /v1/vms/{id}",                // lifecycle, readopt, cli
        "DELETE /v1/vms/{id}",             // lifecycle, readopt, cli
        "POST /v1/vms/{id}/pause",         // lifecycle, readopt, cli
        "POST /v1/vms/{id}/resume",        // lifecycle, readopt, cli
        "POST /v1/vms/{id}/snapshot",      // lifecycle, bad_input, cli
        "POST /v1/vms/{id}/migrations",    // peer_migration
        "GET /v1/migrations/{id}",         // peer_migration
        "DELETE /v1/migrations/{id}",      // peer_migration, cancel_past_commit
        "PATCH /v1/migrations/{id}",       // tune_migration
        "POST /v1/peer/migrations",        // peer_migration (source agent; refused strangers)
        "GET /v1/peer/migrations/{id}",    // peer_migration (the source confirms the commit)
        "DELETE /v1/peer/migrations/{id}", // peer_migration (the source aborts on cancel)
        "GET /v1/events",                  // lifecycle
        "GET /metrics",                    // lifecycle, readopt, bad_input
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(documented, tested);
}
