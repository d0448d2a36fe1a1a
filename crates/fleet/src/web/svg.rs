//! The plot of a finished migration, drawn here as SVG: bytes sent over
//! time (the engine's timeline, or the rounds summed when it kept none)
//! beside the guest's dirty rate at the end of each round, the blackout's
//! round marked.

use std::fmt::Write;

use super::html::esc;
use super::migrations::ReportView;

const W: f64 = 760.0;
const H: f64 = 250.0;
/// Each panel's plot area.
const TOP: f64 = 34.0;
const PH: f64 = 160.0;
const PW: f64 = 290.0;
const LEFT: [f64; 2] = [70.0, 450.0];

const MIB: f64 = (1u64 << 20) as f64;

/// The smallest of 1, 2, 5 times a power of ten at or above `x`: an axis
/// ends on a round number.
pub fn nice_ceiling(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|v| *v >= x * (1.0 - 1e-9))
        .unwrap_or(10.0 * p)
}

fn num(v: f64) -> String {
    if v == v.trunc() || v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Time in the unit that reads best at this scale.
fn time_label(ms: f64, scale_ms: f64) -> String {
    if scale_ms >= 2000.0 {
        format!("{} s", num(ms / 1e3))
    } else {
        format!("{} ms", num(ms))
    }
}

/// Bytes sent so far over time: the timeline, or the rounds summed.
pub fn sent_over_time(r: &ReportView) -> Vec<(f64, f64)> {
    if r.timeline.len() >= 2 {
        return r.timeline.iter().map(|&(t, b)| (t, b as f64)).collect();
    }
    let mut t = 0.0;
    let mut sent = 0.0;
    let mut pts = vec![(0.0, 0.0)];
    for round in &r.rounds {
        t += round.duration_ms.max(0.0);
        sent += round.bytes_sent as f64;
        pts.push((t, sent));
    }
    pts
}

/// Axes, grid and tick labels of one panel; `x` and `y` are the values at
/// the ends of the axes.
fn axes(s: &mut String, left: f64, y_max: &str, y_mid: &str, x_ticks: &[(f64, String)]) {
    let bottom = TOP + PH;
    for (frac, label) in [(0.0, "0"), (0.5, y_mid), (1.0, y_max)] {
        let y = bottom - frac * PH;
        let _ = write!(
            s,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end" font-size="11">{}</text>"##,
            left + PW,
            left - 6.0,
            y + 4.0,
            esc(label)
        );
    }
    for (frac, label) in x_ticks {
        let x = left + frac * PW;
        let _ = write!(
            s,
            r##"<text x="{x}" y="{}" text-anchor="middle" font-size="11">{}</text>"##,
            bottom + 15.0,
            esc(label)
        );
    }
    let _ = write!(
        s,
        r##"<path d="M{left} {TOP} V{bottom} H{}" fill="none" stroke="#555"/>"##,
        left + PW
    );
}

/// The plot of `r`, titled `title`.
pub fn plot(title: &str, r: &ReportView) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" font-family="sans-serif"><title>{}</title>"##,
        esc(title)
    );

    // Bytes sent over time.
    let pts = sent_over_time(r);
    let t_end = pts.last().map_or(0.0, |p| p.0).max(r.total_ms).max(1.0);
    let x_max = nice_ceiling(t_end);
    let b_max = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    let y_max = nice_ceiling(b_max / MIB);
    let [l0, l1] = LEFT;
    let _ = write!(
        s,
        r##"<text x="{l0}" y="18" font-size="13" class="panel">MiB sent over time</text>"##
    );
    axes(
        &mut s,
        l0,
        &num(y_max),
        &num(y_max / 2.0),
        &[
            (0.0, "0".into()),
            (0.5, time_label(x_max / 2.0, x_max)),
            (1.0, time_label(x_max, x_max)),
        ],
    );
    let mut line = String::new();
    for (t, b) in &pts {
        let x = l0 + t / x_max * PW;
        let y = TOP + PH - (b / MIB) / y_max * PH;
        let _ = write!(line, "{x:.1},{y:.1} ");
    }
    let _ = write!(
        s,
        r##"<polyline class="sent" points="{}" fill="none" stroke="#1f6feb" stroke-width="2"/>"##,
        line.trim_end()
    );

    // Dirty rate per round.
    let _ = write!(
        s,
        r##"<text x="{l1}" y="18" font-size="13" class="panel">dirty rate per round, MiB/s</text>"##
    );
    let d_max = nice_ceiling(
        r.rounds
            .iter()
            .map(|x| x.dirty_rate_mibs)
            .fold(0.0, f64::max),
    );
    let n = r.rounds.len().max(1) as f64;
    let ticks: Vec<(f64, String)> = r
        .rounds
        .iter()
        .enumerate()
        // Every round's number while they fit, else about eight of them.
        .filter(|(i, _)| r.rounds.len() <= 16 || i % r.rounds.len().div_ceil(8) == 0)
        .map(|(i, x)| ((i as f64 + 0.5) / n, x.round.to_string()))
        .collect();
    axes(&mut s, l1, &num(d_max), &num(d_max / 2.0), &ticks);
    let slot = PW / n;
    for (i, round) in r.rounds.iter().enumerate() {
        // A round the guest dirtied nothing in still shows, as a sliver.
        let h = (round.dirty_rate_mibs.max(0.0) / d_max * PH).clamp(1.5, PH);
        let (class, fill) = if round.blackout {
            ("bar blackout", "#d1242f")
        } else {
            ("bar", "#2da44e")
        };
        let _ = write!(
            s,
            r##"<rect class="{class}" x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{fill}"><title>round {}: {} MiB/s dirty, {} MiB sent{}</title></rect>"##,
            l1 + i as f64 * slot + slot * 0.15,
            TOP + PH - h,
            slot * 0.7,
            round.round,
            num(round.dirty_rate_mibs),
            num(round.bytes_sent as f64 / MIB),
            if round.blackout { " (blackout)" } else { "" }
        );
    }
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" font-size="11" text-anchor="middle">round (red: sent with the VM paused)</text>"##,
        l1 + PW / 2.0,
        TOP + PH + 32.0
    );
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::migrations::RoundView;

    fn report() -> ReportView {
        ReportView {
            outcome: "committed".into(),
            mode: "precopy".into(),
            total_ms: 900.0,
            downtime_ms: 4.0,
            bytes_sent: 80 << 20,
            mem_bytes: 64 << 20,
            timeline: vec![],
            rounds: (1..=3)
                .map(|i| RoundView {
                    round: i,
                    bytes_sent: (64 >> (i - 1)) << 20,
                    duration_ms: 300.0,
                    dirty_rate_mibs: 40.0 / f64::from(i),
                    blackout: i == 3,
                })
                .collect(),
        }
    }

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(1.2), 2.0);
        assert_eq!(nice_ceiling(37.0), 50.0);
        assert_eq!(nice_ceiling(501.0), 1000.0);
        assert_eq!(nice_ceiling(0.03), 0.05);
    }

    #[test]
    fn without_a_timeline_the_rounds_are_summed() {
        let p = sent_over_time(&report());
        assert_eq!(p.len(), 4);
        assert_eq!(p[3], (900.0, ((64 + 32 + 16) << 20) as f64));
    }

    #[test]
    fn the_plot_has_a_bar_per_round_and_escapes_its_title() {
        let s = plot("<v1> & co", &report());
        assert!(s.starts_with("<svg"));
        assert!(s.ends_with("</svg>"));
        assert_eq!(s.matches("<rect class=\"bar").count(), 3);
        assert_eq!(s.matches("class=\"bar blackout\"").count(), 1);
        assert!(s.contains("<title>&lt;v1&gt; &amp; co</title>"));
        assert!(!s.contains("<v1>"));
        assert!(s.contains("<polyline class=\"sent\""));
        // No point leaves its panel.
        let pts = s
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        for p in pts.split(' ') {
            let (x, y) = p.split_once(',').unwrap();
            let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
            assert!((LEFT[0]..=LEFT[0] + PW).contains(&x), "{p}");
            assert!((TOP..=TOP + PH).contains(&y), "{p}");
        }
    }
}
