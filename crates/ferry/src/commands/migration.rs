//! `ferry migration show|cancel|tune JOB`: a migration job of this host's
//! agent, retuning one while it runs, and following one to its end with
//! the live bar `ferry migrate` draws.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_agent::client::{AgentClient, Reply};
use ferry_agent::migration::MigrationJob;

use super::migrate::ProgressView;

#[derive(Debug, clap::Args)]
pub struct MigrationArgs {
    /// The agent's socket.
    #[arg(long, global = true, default_value = ferry_agent::config::DEFAULT_SOCKET)]
    pub agent: PathBuf,
    /// Print the agent's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: MigrationCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum MigrationCommand {
    /// A job: phase, progress, and its report once it has ended.
    Show { job: String },
    /// Cancel a job before its commit (the VM runs on here); waits for it
    /// to end.
    Cancel { job: String },
    /// Retune a running job: the engine takes a new bandwidth cap at its
    /// next batch, a new downtime target or post-copy between rounds.
    Tune {
        job: String,
        /// A new downtime target (e.g. 5ms).
        #[arg(long, value_parser = crate::duration::parse_duration)]
        downtime: Option<Duration>,
        /// A new send-rate cap (e.g. 100MiB/s); 0 or `unlimited`: none.
        #[arg(long, value_parser = crate::size::parse_cap)]
        bandwidth: Option<u64>,
        /// Switch to post-copy after the round under way (the VM's policy
        /// must allow post-copy).
        #[arg(long)]
        postcopy: bool,
    },
}

fn decode(reply: &Reply, what: &str) -> anyhow::Result<MigrationJob> {
    if !reply.is_success() {
        let body = reply.json();
        bail!(
            "{what} refused by ferryd ({} {}): {}",
            reply.status,
            body["error"].as_str().unwrap_or("error"),
            body["reason"].as_str().unwrap_or("(no reason given)")
        );
    }
    serde_json::from_slice(&reply.body).with_context(|| format!("ferryd's answer to {what}"))
}

pub fn migration(args: MigrationArgs) -> anyhow::Result<bool> {
    let client = AgentClient::new(&args.agent);
    let job = match &args.command {
        MigrationCommand::Show { job } => {
            decode(&client.get(&format!("/v1/migrations/{job}"))?, "show")?
        }
        MigrationCommand::Cancel { job } => {
            decode(
                &client.request("DELETE", &format!("/v1/migrations/{job}"), None)?,
                "cancel",
            )?;
            follow(&client, job, false)?
        }
        MigrationCommand::Tune {
            job,
            downtime,
            bandwidth,
            postcopy,
        } => {
            if downtime.is_none() && bandwidth.is_none() && !postcopy {
                bail!("nothing to tune: give --downtime, --bandwidth or --postcopy");
            }
            let mut body = serde_json::Map::new();
            if let Some(d) = downtime {
                body.insert("downtime_ms".into(), (d.as_secs_f64() * 1e3).into());
            }
            if let Some(b) = bandwidth {
                body.insert("bandwidth".into(), (*b).into());
            }
            if *postcopy {
                body.insert("mode".into(), "postcopy".into());
            }
            let body = serde_json::Value::Object(body);
            decode(
                &client.request("PATCH", &format!("/v1/migrations/{job}"), Some(&body))?,
                "tune",
            )?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        print_job(&job);
    }
    Ok(true)
}

/// Polls the job until it has ended, drawing its progress if `bar`.
pub fn follow(client: &AgentClient, id: &str, bar: bool) -> anyhow::Result<MigrationJob> {
    let mut view = bar.then(ProgressView::new);
    let mut seen = 0;
    loop {
        let job = decode(&client.get(&format!("/v1/migrations/{id}"))?, "show")?;
        if let (Some(view), Some(p)) = (view.as_mut(), &job.last_progress) {
            if job.progress_lines != seen {
                seen = job.progress_lines;
                view.show(p);
            }
        }
        if job.phase.is_done() {
            if let Some(view) = &view {
                view.finish();
            }
            return Ok(job);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn print_job(j: &MigrationJob) {
    let mut rows = vec![
        ("job", j.id.clone()),
        ("VM", j.vm.clone()),
        (
            "from / to",
            format!("{} -> {} ({})", j.source, j.target.host, j.target.address),
        ),
        ("phase", j.phase.as_str().to_owned()),
        ("mode", j.mode.clone()),
        ("transport", j.transport.clone()),
        ("started", j.started_at.clone()),
    ];
    if let Some(e) = &j.ended_at {
        rows.push(("ended", e.clone()));
    }
    if let Some(p) = &j.progress {
        rows.push((
            "progress",
            format!(
                "{} {}: {:.1} MiB left, {:.0} MiB/s, dirty {:.0} MiB/s, predicted downtime {}, ETA {}",
                p.phase,
                p.round,
                p.mib_left,
                p.throughput_mibs,
                p.dirty_rate_mibs,
                p.predicted_downtime_ms
                    .map_or("-".into(), |d| format!("{d:.1} ms")),
                p.eta_ms.map_or("-".into(), |e| format!("{e:.0} ms"))
            ),
        ));
    }
    if let Some(r) = &j.report {
        rows.push((
            "report",
            format!(
                "{}: {} rounds, {:.1} MiB sent in {:.1} ms (setup {:.1} ms), host downtime {:.2} ms, guest stall {}",
                r.outcome,
                r.rounds.len(),
                r.bytes_sent as f64 / (1 << 20) as f64,
                r.total_ms,
                r.setup_ms,
                r.blackout.host_downtime_ms,
                r.guest
                    .stall_ms
                    .map_or("-".into(), |s| format!("{s:.2} ms"))
            ),
        ));
    }
    if let Some(e) = &j.error {
        rows.push(("error", e.clone()));
    }
    for (k, v) in rows {
        println!("  {k:<12} {v}");
    }
}
