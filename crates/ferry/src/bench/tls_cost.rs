//! What mutual TLS costs a migration: each TLS row beside the plaintext
//! row it mirrors (same guest, same streams), in throughput and in CPU per
//! GiB on each side. The throughput ratio is the target (TLS at
//! least 80% of plaintext); the CPU figures say where the difference goes,
//! which on a host whose two ends share its cores is the whole story.

use super::cpu::per_gib;
use super::{median, RowResult};

/// The TLS throughput target, as a share of plaintext's.
pub const TLS_TARGET: f64 = 0.80;

/// One TLS row beside its plaintext twin.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TlsCost {
    pub tls_row: &'static str,
    pub plain_row: &'static str,
    /// Median throughput, TLS over plaintext.
    pub throughput_ratio: f64,
    /// Median CPU ms per GiB sent: source migration threads, destination.
    pub plain_cpu_ms_per_gib: (f64, f64),
    pub tls_cpu_ms_per_gib: (f64, f64),
    /// Ferry's TLS throughput over QEMU's TLS throughput, if QEMU ran.
    pub over_qemu_tls: Option<f64>,
}

fn cpu_per_gib(r: &RowResult) -> (f64, f64) {
    let of = |f: &dyn Fn(&super::ferry_side::FerryOutcome) -> Option<f64>| {
        median(r.ferry_runs.iter().filter_map(f).collect())
    };
    (
        of(&|o| Some(per_gib(o.src_cpu_ms, o.transferred_bytes))),
        of(&|o| o.dst_cpu_ms.map(|c| per_gib(c, o.transferred_bytes))),
    )
}

/// The page-data streams the row's first run opened (auto picks by the
/// host, so the rows' settings alone may not say).
fn streams_used(r: &RowResult) -> Option<u32> {
    r.ferry_runs.first().map(|o| o.report.streams.max(1))
}

/// Every TLS row of `results` whose plaintext twin ran too.
pub fn pairs(results: &[RowResult]) -> Vec<TlsCost> {
    results
        .iter()
        .filter(|t| t.row.tls)
        .filter_map(|t| {
            let plain = results.iter().find(|p| {
                !p.row.tls
                    && p.row.workload == t.row.workload
                    && streams_used(p) == streams_used(t)
                    && p.row.priority == t.row.priority
                    && p.row.prealloc == t.row.prealloc
                    && p.row.bandwidth == t.row.bandwidth
                    && p.row.network == t.row.network
                    && p.row.disk.is_none()
                    && t.row.disk.is_none()
            })?;
            let (tf, pf) = (t.ferry.as_ref()?, plain.ferry.as_ref()?);
            Some(TlsCost {
                tls_row: t.row.name,
                plain_row: plain.row.name,
                throughput_ratio: tf.throughput_gbit / pf.throughput_gbit,
                plain_cpu_ms_per_gib: cpu_per_gib(plain),
                tls_cpu_ms_per_gib: cpu_per_gib(t),
                over_qemu_tls: t
                    .qemu
                    .as_ref()
                    .map(|q| tf.throughput_gbit / q.throughput_gbit),
            })
        })
        .collect()
}

pub fn print(costs: &[TlsCost]) {
    if costs.is_empty() {
        return;
    }
    println!(
        "\nTLS beside plaintext (target: TLS at least {:.0}% of plaintext's throughput, and above QEMU with tls-creds-x509). CPU is ms per GiB sent: the source's migration threads / the destination process.\n",
        TLS_TARGET * 100.0
    );
    println!("| TLS row | TLS / plaintext throughput | target | plaintext CPU src / dst | TLS CPU src / dst | TLS CPU over plaintext | Ferry TLS / QEMU TLS throughput |");
    println!("|---|---|---|---|---|---|---|");
    for c in costs {
        let (ps, pd) = c.plain_cpu_ms_per_gib;
        let (ts, td) = c.tls_cpu_ms_per_gib;
        println!(
            "| {} | {:.2} | {} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2}x | {} |",
            c.tls_row,
            c.throughput_ratio,
            if c.throughput_ratio >= TLS_TARGET {
                "kept"
            } else {
                "MISSED"
            },
            ps,
            pd,
            ts,
            td,
            (ts + td) / (ps + pd),
            c.over_qemu_tls.map_or("-".into(), |r| format!("{r:.2}x")),
        );
    }
}
