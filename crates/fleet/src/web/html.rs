//! The page, one HTML document written here: tables of hosts, VMs,
//! migrations in flight and plans, and a plot of each finished migration.
//! Every text from the store or an agent goes through [`esc`]. The page
//! reloads itself every few seconds (a meta refresh: it has no script).

use std::fmt::Write;

use super::migrations::MigrationView;
use super::snapshot::{FleetView, HostRow};
use super::svg;
use crate::model::resources::show_bytes;
use crate::model::{Health, Maintenance, Resources, VmRunState};
use crate::plan::{Action, EntryState, Plan, PlanEntry, PlanKind};
use crate::time::Timestamp;

/// Plots drawn at most (the newest); the JSON has every migration.
pub const MAX_PLOTS: usize = 20;

/// Seconds between the page's own reloads.
pub const REFRESH_S: u32 = 5;

/// `s` as HTML text or an attribute's value.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A wall-clock timestamp as UTC, `2026-12-04 18:31:39`.
pub fn utc(t: Timestamp) -> String {
    let secs = t.ms() / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, from 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn size(r: Resources) -> String {
    format!("{} · {} vCPU", show_bytes(r.mem_bytes), r.vcpus)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn ms(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} s", v / 1e3)
    } else {
        format!("{v:.0} ms")
    }
}

/// A share as a whole percent (0 of nothing).
fn percent(part: u64, whole: u64) -> u64 {
    part.saturating_mul(100).checked_div(whole).unwrap_or(0)
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
h1{margin:0 0 .2em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.25em .6em;border-bottom:1px solid #eee;text-align:left;vertical-align:top}\
th{background:#f4f4f4}.meta{color:#666}.usage{display:inline-block;width:80px;height:8px;background:#eee;margin-left:.4em}\
.usage span{display:block;height:8px;background:#1f6feb}\
.healthy,.alive,.committed,.migrated,.done{color:#1a7f37}.degraded,.lapsed,.draining,.blocked,.refused{color:#9a6700}\
.unreachable,.failed,.cancelled{color:#cf222e}.plan{margin:1em 0 1.5em}figure{margin:1em 0}figcaption{margin-bottom:.3em}";

fn health(h: &Health) -> String {
    let detail = match h {
        Health::Healthy => String::new(),
        Health::Degraded { reason } => format!(": {}", esc(reason)),
        Health::Unreachable { since } => format!(" since {}", utc(*since)),
    };
    format!("<span class=\"{0}\">{0}</span>{detail}", h.word())
}

fn maintenance(m: &Maintenance) -> String {
    let detail = match m {
        Maintenance::Scheduled { at } => format!(" at {}", utc(*at)),
        Maintenance::Draining { plan } => format!(" ({})", esc(plan)),
        Maintenance::None | Maintenance::InMaintenance => String::new(),
    };
    format!(
        "<span class=\"{}\">{}</span>{detail}",
        m.word().replace(' ', "-"),
        m.word()
    )
}

fn usage_bar(p: u64) -> String {
    format!(
        "<span class=\"usage\" title=\"{p}%\"><span style=\"width:{}%\"></span></span>",
        p.min(100)
    )
}

fn hosts(s: &mut String, hosts: &[HostRow]) {
    let _ = write!(
        s,
        "<section id=\"hosts\"><h2>Hosts ({})</h2><table><tr><th>host</th><th>rack / zone</th>\
         <th>capacity</th><th>used</th><th>VMs</th><th>health</th><th>maintenance</th><th>lease</th></tr>",
        hosts.len()
    );
    for h in hosts {
        let p = percent(h.used.mem_bytes, h.capacity.mem_bytes);
        let _ = write!(
            s,
            "<tr class=\"host\" data-host=\"{name}\"><td>{name}</td><td>{} / {}</td><td>{}</td>\
             <td>{} ({p}% of memory){}</td><td>{}</td><td>{}</td><td>{}</td><td><span class=\"{lease}\">{lease}</span></td></tr>",
            esc(&h.rack),
            esc(&h.zone),
            size(h.capacity),
            size(h.used),
            usage_bar(p),
            h.vms,
            health(&h.health),
            maintenance(&h.maintenance),
            name = esc(&h.name),
            lease = h.lease.word(),
        );
    }
    s.push_str("</table></section>");
}

fn vms(s: &mut String, v: &FleetView) {
    let _ = write!(
        s,
        "<section id=\"vms\"><h2>VMs ({})</h2><table><tr><th>VM</th><th>host</th><th>tenant</th>\
         <th>size</th><th>state</th></tr>",
        v.vms.len()
    );
    for vm in &v.vms {
        let state = match vm.state {
            VmRunState::Running => "running",
            VmRunState::Stopped => "stopped",
        };
        let moving = v
            .migrations
            .iter()
            .find(|m| m.in_flight() && m.vm == vm.id)
            .map(|m| format!(", migrating to {}", esc(&m.target)))
            .unwrap_or_default();
        let _ = write!(
            s,
            "<tr class=\"vm\" data-vm=\"{id}\"><td>{id}</td><td>{}</td><td>{}</td><td>{}</td><td>{state}{moving}</td></tr>",
            esc(&vm.host),
            esc(&vm.tenant),
            size(vm.resources),
            id = esc(&vm.id),
        );
    }
    s.push_str("</table></section>");
}

fn in_flight(s: &mut String, ms_: &[&MigrationView]) {
    let _ = write!(
        s,
        "<section id=\"in-flight\"><h2>Migrations in flight ({})</h2>",
        ms_.len()
    );
    if ms_.is_empty() {
        s.push_str("<p class=\"meta\">none</p></section>");
        return;
    }
    s.push_str(
        "<table><tr><th>migration</th><th>VM</th><th>from → to</th><th>phase</th><th>round</th>\
         <th>sent</th><th>left in round</th><th>progress</th><th>dirty rate</th><th>throughput</th><th>elapsed</th></tr>",
    );
    for m in ms_ {
        let phase = match &m.unknown {
            Some(why) => format!("{} ({})", esc(&m.phase), esc(why)),
            None => esc(&m.phase),
        };
        let cells = match &m.progress {
            Some(p) => {
                let whole = p.sent_bytes + p.left_bytes;
                format!(
                    "<td>{}</td><td>{}</td><td>{}</td><td><progress max=\"{whole}\" value=\"{}\"></progress> {}%</td>\
                     <td>{:.1} MiB/s</td><td>{:.1} MiB/s</td><td>{}</td>",
                    p.round,
                    mib(p.sent_bytes),
                    mib(p.left_bytes),
                    p.sent_bytes,
                    percent(p.sent_bytes, whole),
                    p.dirty_rate_mibs,
                    p.throughput_mibs,
                    ms(p.elapsed_ms)
                )
            }
            None => "<td colspan=\"7\" class=\"meta\">no progress yet</td>".into(),
        };
        let _ = write!(
            s,
            "<tr class=\"migration\" data-migration=\"{}\"><td>{}</td><td>{}</td><td>{} → {}</td><td>{phase}</td>{cells}</tr>",
            esc(&m.id),
            esc(&m.id),
            esc(&m.vm),
            esc(&m.source),
            esc(&m.target),
        );
    }
    s.push_str("</table></section>");
}

fn kind(k: &PlanKind) -> String {
    match k {
        PlanKind::Drain { hosts } => format!("drain of {}", esc(&hosts.join(", "))),
        PlanKind::Evacuate { hosts, reason } => {
            format!("evacuation of {} ({})", esc(&hosts.join(", ")), esc(reason))
        }
        PlanKind::Move { vm, to } => format!(
            "move of {}{}",
            esc(vm),
            to.as_ref()
                .map(|t| format!(" to {}", esc(t)))
                .unwrap_or_default()
        ),
    }
}

fn entry_state(e: &PlanEntry) -> String {
    let word = e.state.word();
    let detail = match &e.state {
        EntryState::Migrating {
            target, postcopy, ..
        } => format!(
            " to {}{}",
            esc(target),
            if *postcopy { " (post-copy)" } else { "" }
        ),
        EntryState::Migrated {
            target,
            started_at,
            finished_at,
        } => format!(
            " to {} in {}",
            esc(target),
            ms(finished_at.since(*started_at) as f64)
        ),
        EntryState::Terminated { restarted_on, .. } => restarted_on
            .as_ref()
            .map(|h| format!(", restarted on {}", esc(h)))
            .unwrap_or_default(),
        _ => String::new(),
    };
    format!("<span class=\"{word}\">{word}</span>{detail}")
}

fn plan(s: &mut String, p: &Plan) {
    let state = format!("{:?}", p.state).to_lowercase();
    let counts: Vec<String> = p
        .counts()
        .into_iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    let _ = write!(
        s,
        "<section class=\"plan\" data-plan=\"{id}\" data-state=\"{state}\"><h3>{id}: {} — <span class=\"plan-state {state}\">{state}</span></h3>\
         <p class=\"meta\">{} priority; created {}{}{}{}; {}</p>",
        kind(&p.kind),
        p.priority.word(),
        utc(p.created_at),
        p.started_at
            .map(|t| format!(", started {}", utc(t)))
            .unwrap_or_default(),
        p.finished_at
            .map(|t| format!(", finished {}", utc(t)))
            .unwrap_or_default(),
        p.predicted_duration_ms
            .map(|d| format!(", predicted {}", ms(d as f64)))
            .unwrap_or_default(),
        esc(&counts.join(", ")),
        id = esc(&p.id),
    );
    s.push_str(
        "<table><tr><th>VM</th><th>tenant</th><th>from</th><th>action</th><th>target</th>\
         <th>state</th><th>reason</th><th>attempts</th></tr>",
    );
    for e in &p.entries {
        let action = match e.action {
            Action::Migrate => "migrate".to_string(),
            Action::Terminate { restart: true } => "terminate, restart".into(),
            Action::Terminate { restart: false } => "terminate".into(),
        };
        let _ = write!(
            s,
            "<tr class=\"entry\" data-vm=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{action}</td><td>{}</td><td>{}</td><td class=\"reason\">{}</td><td>{}</td></tr>",
            esc(&e.vm),
            esc(&e.vm),
            esc(&e.tenant),
            esc(&e.source),
            e.target.as_deref().map_or("—".into(), esc),
            entry_state(e),
            e.reason.as_deref().map_or("—".into(), esc),
            e.attempts,
        );
    }
    s.push_str("</table></section>");
}

fn finished(s: &mut String, ms_: &[&MigrationView]) {
    let _ = write!(
        s,
        "<section id=\"finished\"><h2>Finished migrations ({})</h2>",
        ms_.len()
    );
    if ms_.is_empty() {
        s.push_str("<p class=\"meta\">none</p>");
    }
    if ms_.len() > MAX_PLOTS {
        let _ = write!(
            s,
            "<p class=\"meta\">the newest {MAX_PLOTS} shown; /api/fleet has them all</p>"
        );
    }
    for m in ms_.iter().take(MAX_PLOTS) {
        let head = format!(
            "{}: {} from {} to {}",
            esc(&m.id),
            esc(&m.vm),
            esc(&m.source),
            esc(&m.target)
        );
        let _ = write!(
            s,
            "<figure class=\"migration\" data-migration=\"{}\"><figcaption><b>{head}</b>, <span class=\"{phase}\">{phase}</span>",
            esc(&m.id),
            phase = esc(&m.phase),
        );
        if let Some(e) = &m.error {
            let _ = write!(s, ": {}", esc(e));
        }
        match &m.report {
            Some(r) => {
                let _ = write!(
                    s,
                    "; {} {}, {} sent of {} in {} rounds, blackout {:.1} ms</figcaption>{}",
                    esc(&r.mode),
                    ms(r.total_ms),
                    mib(r.bytes_sent),
                    mib(r.mem_bytes),
                    r.rounds.len(),
                    r.downtime_ms,
                    svg::plot(&format!("{} ({})", m.id, m.vm), r)
                );
            }
            None => s.push_str("; no report</figcaption>"),
        }
        s.push_str("</figure>");
    }
    s.push_str("</section>");
}

/// The whole page.
pub fn page(v: &FleetView) -> String {
    let mut s = String::with_capacity(16 << 10);
    let _ = write!(
        s,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_S}\"><title>Ferry fleet</title><style>{STYLE}</style></head><body>\
         <h1>Ferry fleet</h1><p class=\"meta\">read {} UTC at store revision {}; reloads every {REFRESH_S} s; \
         the same as JSON: <a href=\"/api/fleet\">/api/fleet</a></p>",
        utc(v.taken_at),
        v.revision
    );
    hosts(&mut s, &v.hosts);
    vms(&mut s, v);
    let flying: Vec<&MigrationView> = v.migrations.iter().filter(|m| !m.finished()).collect();
    in_flight(&mut s, &flying);
    let _ = write!(
        s,
        "<section id=\"plans\"><h2>Plans ({})</h2>",
        v.plans.len()
    );
    if v.plans.is_empty() {
        s.push_str("<p class=\"meta\">none</p>");
    }
    for p in &v.plans {
        plan(&mut s, p);
    }
    s.push_str("</section>");
    let done: Vec<&MigrationView> = v.migrations.iter().filter(|m| m.finished()).collect();
    finished(&mut s, &done);
    s.push_str("</body></html>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_elements_and_attributes() {
        assert_eq!(
            esc(r#"<script>alert('x') & "y"</script>"#),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
        assert_eq!(esc("host-1"), "host-1");
    }

    #[test]
    fn utc_dates_are_civil() {
        assert_eq!(utc(Timestamp(0)), "1970-01-01 00:00:00");
        // 2024-02-29 12:34:56 UTC, a leap day.
        assert_eq!(utc(Timestamp(1_709_210_096_000)), "2024-02-29 12:34:56");
        assert_eq!(utc(Timestamp(1_798_761_599_000)), "2026-12-31 23:59:59");
    }
}
