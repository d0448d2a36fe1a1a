//! `ferry vm ...`: the VMs of this host through its agent (`ferryd`), over
//! the agent's Unix socket. Tables for people, `--json` for programs (the
//! agent's own JSON, unchanged).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_agent::client::{AgentClient, Reply};
use ferry_agent::model::{VmRecord, VmView};
use serde_json::json;

use crate::size::show_size;

#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// The agent's socket.
    #[arg(long, global = true, default_value = ferry_agent::config::DEFAULT_SOCKET)]
    pub agent: PathBuf,
    /// Print the agent's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: VmCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Define a VM and start it.
    Create(Box<CreateArgs>),
    /// Every VM on this host.
    List,
    /// One VM, with its uptime and latest heartbeat.
    Show { id: String },
    /// Stop a VM and remove it.
    Delete { id: String },
    /// Stop a VM's vCPUs.
    Pause { id: String },
    /// Run a paused VM again.
    Resume { id: String },
    /// Write a snapshot of a running VM to FILE (it runs on).
    Snapshot { id: String, file: PathBuf },
    /// Live-migrate a VM to another host's agent; a live bar, then the
    /// report.
    Migrate(MigrateVmArgs),
}

#[derive(Debug, clap::Args)]
pub struct MigrateVmArgs {
    pub id: String,
    /// The destination: its host name (its certificate's) and its agent's
    /// peer listener, HOST@IP:PORT.
    #[arg(long)]
    pub to: String,
    /// precopy, postcopy, hybrid or auto (post-copy only where the VM's
    /// policy allows it).
    #[arg(long)]
    pub mode: Option<String>,
    /// The blackout to aim for (e.g. 10ms); default: the VM's policy.
    #[arg(long, value_parser = crate::duration::parse_duration)]
    pub downtime: Option<Duration>,
    /// Abandon the migration rather than exceed this blackout.
    #[arg(long, value_parser = crate::duration::parse_duration)]
    pub max_downtime: Option<Duration>,
    /// Send-rate cap (e.g. 200MiB/s); default: the VM's policy.
    #[arg(long, value_parser = crate::size::parse_rate)]
    pub bandwidth: Option<u64>,
    /// Page-data streams.
    #[arg(long)]
    pub streams: Option<u16>,
}

impl MigrateVmArgs {
    fn body(&self) -> anyhow::Result<serde_json::Value> {
        let Some((host, address)) = self.to.split_once('@') else {
            bail!(
                "--to {}: expected HOST@IP:PORT, e.g. hostB@10.0.0.2:7443",
                self.to
            );
        };
        let mut body = json!({"target": {"host": host, "address": address}});
        if let Some(m) = &self.mode {
            body["mode"] = json!(m);
        }
        if let Some(d) = self.downtime {
            body["downtime_ms"] = json!(d.as_secs_f64() * 1e3);
        }
        if let Some(d) = self.max_downtime {
            body["max_downtime_ms"] = json!(d.as_secs_f64() * 1e3);
        }
        if let Some(b) = self.bandwidth {
            body["bandwidth"] = json!(b);
        }
        if let Some(s) = self.streams {
            body["streams"] = json!(s);
        }
        Ok(body)
    }
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The VM's id (lower-case letters, digits, '-'); default: one is made.
    #[arg(long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub vm: super::run::VmArgs,
    /// Migration policy: the blackout to aim for (e.g. 10ms).
    #[arg(long, value_parser = crate::duration::parse_duration)]
    pub downtime: Option<Duration>,
    /// Migration policy: send-rate cap (e.g. 200MiB/s).
    #[arg(long, value_parser = crate::size::parse_rate)]
    pub bandwidth: Option<u64>,
    /// Migration policy: never brake the guest to converge.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Migration policy: allow post-copy.
    #[arg(long)]
    pub allow_postcopy: bool,
    /// Migration policy: abort a migration not done within this (e.g. 5m).
    #[arg(long, value_parser = crate::duration::parse_duration)]
    pub completion_timeout: Option<Duration>,
    /// A virtio-net card on this host's network NAME (`[[network]]` in
    /// host.toml); every host the VM moves to must have it.
    #[arg(long, value_name = "NAME")]
    pub network: Option<String>,
    /// The card's MAC (default: one is generated and recorded).
    #[arg(long, requires = "network", value_name = "MAC")]
    pub mac: Option<String>,
    /// The --disk image is on this host's own storage: a migration copies
    /// it (pre-copy only). Without it the image must be on storage every
    /// host shares, at the same path.
    #[arg(long, requires = "disk")]
    pub local_disk: bool,
}

impl CreateArgs {
    fn body(&self) -> anyhow::Result<serde_json::Value> {
        if self.vm.net.is_some() {
            anyhow::bail!(
                "ferry vm create: --net names a tap, which the agent makes itself; give --network NAME (one of the host's [[network]]s) and optionally --mac MAC"
            );
        }
        let mut policy = json!({
            "allow_auto_converge": !self.no_auto_converge,
            "allow_postcopy": self.allow_postcopy,
        });
        if let Some(d) = self.downtime {
            policy["downtime_ms"] = json!(d.as_secs_f64() * 1e3);
        }
        if let Some(b) = self.bandwidth {
            policy["bandwidth"] = json!(b);
        }
        if let Some(t) = self.completion_timeout {
            policy["completion_timeout_ms"] = json!(t.as_millis() as u64);
        }
        let mut body = json!({
            "definition": {
                "mem_bytes": self.vm.mem,
                "vcpus": self.vm.vcpus(),
                // With its +disk (or +net) term: the agent judges it.
                "workload": self.vm.guest_workload().to_string(),
                "guest": self.vm.guest,
                "prealloc": self.vm.prealloc,
            },
            "policy": policy,
        });
        if let Some(id) = &self.id {
            body["id"] = json!(id);
        }
        if let Some(disk) = &self.vm.disk {
            let path = &disk.0.path;
            // The agent runs elsewhere: it needs the absolute path.
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            body["definition"]["disk"] =
                json!({"path": path, "readonly": disk.0.readonly, "local": self.local_disk});
        }
        if let Some(network) = &self.network {
            body["definition"]["net"] = json!({"network": network, "mac": self.mac});
        }
        Ok(body)
    }
}

pub fn vm(args: VmArgs) -> anyhow::Result<bool> {
    let client = AgentClient::new(&args.agent);
    let (reply, what) = match &args.command {
        VmCommand::Create(c) => (
            client.request("POST", "/v1/vms", Some(&c.body()?))?,
            "create",
        ),
        VmCommand::List => (client.get("/v1/vms")?, "list"),
        VmCommand::Show { id } => (client.get(&format!("/v1/vms/{id}"))?, "show"),
        VmCommand::Delete { id } => (
            client.request("DELETE", &format!("/v1/vms/{id}"), None)?,
            "delete",
        ),
        VmCommand::Pause { id } => (
            client.request("POST", &format!("/v1/vms/{id}/pause"), None)?,
            "pause",
        ),
        VmCommand::Resume { id } => (
            client.request("POST", &format!("/v1/vms/{id}/resume"), None)?,
            "resume",
        ),
        VmCommand::Migrate(m) => return migrate(&client, m, args.json),
        VmCommand::Snapshot { id, file } => {
            let path = std::path::absolute(file)
                .with_context(|| format!("snapshot file {}", file.display()))?;
            (
                client.request(
                    "POST",
                    &format!("/v1/vms/{id}/snapshot"),
                    Some(&json!({ "path": path })),
                )?,
                "snapshot",
            )
        }
    };
    if args.json {
        println!("{}", reply.text().trim_end());
        return Ok(reply.is_success());
    }
    if !reply.is_success() {
        let body = reply.json();
        let reason = body["reason"].as_str().unwrap_or("(no reason given)");
        let kind = body["error"].as_str().unwrap_or("error");
        bail!(
            "{what} refused by ferryd ({} {kind}): {reason}",
            reply.status
        );
    }
    print_human(&args.command, &reply)?;
    Ok(true)
}

fn print_human(command: &VmCommand, reply: &Reply) -> anyhow::Result<()> {
    let decode = |what| -> anyhow::Result<VmRecord> {
        serde_json::from_slice(&reply.body).with_context(|| format!("ferryd's answer to {what}"))
    };
    match command {
        VmCommand::List => {
            let records: Vec<VmRecord> =
                serde_json::from_slice(&reply.body).context("ferryd's list")?;
            print_table(&records);
        }
        VmCommand::Show { .. } => {
            let view: VmView = serde_json::from_slice(&reply.body).context("ferryd's VM")?;
            print_view(&view);
        }
        VmCommand::Create(_) => {
            let r = decode("create")?;
            println!("VM {} {} (pid {})", r.id, r.state.as_str(), pid(&r));
        }
        VmCommand::Delete { .. } => println!("VM {} deleted", decode("delete")?.id),
        VmCommand::Pause { .. } | VmCommand::Resume { .. } => {
            let r = decode("pause/resume")?;
            println!("VM {} {}", r.id, r.state.as_str());
        }
        VmCommand::Migrate(_) => {}
        VmCommand::Snapshot { .. } => {
            let v = reply.json();
            println!(
                "snapshot written to {} ({} bytes, VM paused {:.1} ms)",
                v["path"].as_str().unwrap_or("?"),
                v["file_bytes"],
                v["pause_ms"].as_f64().unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn pid(r: &VmRecord) -> String {
    r.pid.map_or("-".into(), |p| p.to_string())
}

fn print_table(records: &[VmRecord]) {
    println!(
        "{:<20} {:<9} {:>9} {:>5} {:<20} {:>8}  CREATED",
        "ID", "STATE", "MEMORY", "VCPUS", "WORKLOAD", "PID"
    );
    for r in records {
        println!(
            "{:<20} {:<9} {:>9} {:>5} {:<20} {:>8}  {}",
            r.id,
            r.state.as_str(),
            show_size(r.definition.mem_bytes),
            r.definition.vcpus,
            r.definition.workload,
            pid(r),
            r.created_at
        );
        if let Some(reason) = &r.reason {
            println!("{:<20} {reason}", "");
        }
    }
}

fn print_view(v: &VmView) {
    let r = &v.record;
    let p = &r.policy;
    let mut rows = vec![
        ("id", r.id.clone()),
        ("state", r.state.as_str().to_string()),
        (
            "VM",
            format!(
                "{} vCPU, {}, workload {}{}",
                r.definition.vcpus,
                show_size(r.definition.mem_bytes),
                r.definition.workload,
                if r.definition.prealloc {
                    ", preallocated"
                } else {
                    ""
                }
            ),
        ),
        ("VMM pid", pid(r)),
        ("API socket", r.api_socket.display().to_string()),
        ("log", r.log.display().to_string()),
        ("created", r.created_at.clone()),
        (
            "migration policy",
            format!(
                "downtime {} ms, bandwidth {}, auto-converge {}, post-copy {}, timeout {} s",
                p.downtime_ms,
                p.bandwidth
                    .map_or("unlimited".into(), |b| format!("{}/s", show_size(b))),
                if p.allow_auto_converge { "yes" } else { "no" },
                if p.allow_postcopy { "yes" } else { "no" },
                p.completion_timeout_ms / 1000
            ),
        ),
    ];
    if let Some(reason) = &r.reason {
        rows.push(("reason", reason.clone()));
    }
    if let Some(live) = &v.live {
        rows.push(("uptime", format!("{:.1} s", live.uptime_ms / 1e3)));
        if let Some(hb) = &live.heartbeat {
            rows.push((
                "latest heartbeat",
                format!(
                    "seq {}, err {}, stall {} us (longest {} us), sequence breaks {}",
                    hb.seq, hb.err, hb.stall_us, hb.max_stall_us, hb.sequence_breaks
                ),
            ));
        }
    }
    if let Some(e) = &v.live_error {
        rows.push(("VMM", format!("not answering: {e}")));
    }
    for (k, v) in rows {
        println!("  {k:<18} {v}");
    }
}

/// Starts the job, draws its progress until it ends, then its report.
fn migrate(client: &AgentClient, args: &MigrateVmArgs, json: bool) -> anyhow::Result<bool> {
    let reply = client.request(
        "POST",
        &format!("/v1/vms/{}/migrations", args.id),
        Some(&args.body()?),
    )?;
    if !reply.is_success() {
        let body = reply.json();
        bail!(
            "migrate refused by ferryd ({} {}): {}",
            reply.status,
            body["error"].as_str().unwrap_or("error"),
            body["reason"].as_str().unwrap_or("(no reason given)")
        );
    }
    let id = reply.json()["id"].as_str().unwrap_or_default().to_owned();
    if !json {
        eprintln!("ferry: migration {id} of VM {} to {}", args.id, args.to);
    }
    let job = super::migration::follow(client, &id, !json)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        super::migration::print_job(&job);
    }
    Ok(job.phase == ferry_agent::migration::JobPhase::Committed)
}
