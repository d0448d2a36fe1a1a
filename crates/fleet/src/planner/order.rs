//! The order work is served in: by priority, and within a priority
//! round-robin between tenants, so that the k-th VM of every tenant comes
//! before the (k+1)-th of any. A tenant with migrations already running
//! counts them as rounds it has had: a newcomer is not starved behind a
//! tenant with a long queue.

use std::collections::HashMap;

use crate::model::Fleet;

use super::slots::Slots;
use super::WorkItem;

/// Indexes into `work`, in service order.
pub fn service_order(fleet: &Fleet, work: &[WorkItem], slots: &Slots<'_>) -> Vec<usize> {
    let mut served: HashMap<(crate::policy::Priority, &str), u32> = HashMap::new();
    let mut keyed: Vec<(crate::policy::Priority, u32, &str, usize)> = work
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let tenant = fleet.vm(w.vm).tenant.as_str();
            let n = served.entry((w.priority, tenant)).or_insert(0);
            let round = *n + slots.tenant_running(tenant);
            *n += 1;
            (w.priority, round, tenant, i)
        })
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, _, _, i)| i).collect()
}
