//! `ferry ca init DIR` and `ferry ca issue --name NAME DIR`: the fleet's
//! private CA and the identity directories it signs (ferry-identity does
//! the work; this prints what was written).

use std::net::IpAddr;
use std::path::PathBuf;

use ferry_identity::ca::{self, CaFiles, IdentityFiles};
use ferry_identity::identity::show_time;
use ferry_identity::{IssueRequest, Role, Validity};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Make a private CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Init(InitArgs),
    /// Sign a host or operator identity with DIR's CA, into DIR/NAME/.
    Issue(IssueArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The CA's directory (created if missing; refused if it holds a CA).
    pub dir: PathBuf,
    /// The CA certificate's common name.
    #[arg(long, default_value = ca::DEFAULT_CA_NAME)]
    pub name: String,
    /// How long the CA is valid, in days.
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
    /// Print what was written as one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// The CA's directory (from `ferry ca init`).
    pub dir: PathBuf,
    /// The host's (or operator's) name: one DNS label, e.g. `hostB`.
    #[arg(long)]
    pub name: String,
    /// An address the host is reached at (repeatable).
    #[arg(long = "ip", value_name = "ADDR")]
    pub ips: Vec<IpAddr>,
    /// Another DNS name of the host (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    pub dns: Vec<String>,
    /// A client-only operator certificate instead of a host's.
    #[arg(long)]
    pub operator: bool,
    /// How long the certificate is valid, in days (never past the CA).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Replace an identity already in DIR/NAME/.
    #[arg(long)]
    pub force: bool,
    /// Print what was written as one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub fn ca(args: CaArgs) -> anyhow::Result<bool> {
    match args.command {
        CaCommand::Init(args) => init(args),
        CaCommand::Issue(args) => issue(args),
    }
}

fn init(args: InitArgs) -> anyhow::Result<bool> {
    let written = ca::init_ca(&args.dir, &args.name, args.days)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&init_json(&written))?);
    } else {
        println!(
            "made CA \"{}\" in {}, valid until {}",
            written.name,
            written.dir.display(),
            show_time(written.validity.not_after)
        );
        print_table(&[
            (&written.cert, "CA certificate: give a copy to every host"),
            (
                &written.key,
                "CA private key (mode 0600): keep it off the hosts",
            ),
        ]);
        println!(
            "next: ferry ca issue --name HOST --ip ADDR {}",
            written.dir.display()
        );
    }
    Ok(true)
}

fn issue(args: IssueArgs) -> anyhow::Result<bool> {
    let mut request = if args.operator {
        IssueRequest::operator(&args.name)
    } else {
        IssueRequest::host(&args.name)
    };
    request.ips = args.ips;
    request.dns = args.dns;
    request.validity = Validity::days(args.days)?;
    let written = ca::issue(&args.dir, &request, args.force)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&issue_json(&written))?);
    } else {
        let issued = &written.issued;
        println!(
            "issued {} ({}) in {}, valid until {}",
            issued.identity,
            issued.identity.uri(),
            written.dir.display(),
            show_time(issued.validity.not_after)
        );
        let cert_says = match issued.identity.role {
            Role::Host => {
                let mut names: Vec<String> =
                    issued.dns.iter().map(|d| format!("DNS {d}")).collect();
                names.extend(issued.ips.iter().map(|ip| format!("IP {ip}")));
                format!("certificate: server and client, {}", names.join(", "))
            }
            Role::Operator => "certificate: client only".to_string(),
        };
        print_table(&[
            (&written.ca, "the fleet CA certificate (a copy)"),
            (&written.cert, &cert_says),
            (&written.key, "private key (mode 0600)"),
        ]);
        println!(
            "copy {} to the {} and point it there (e.g. --tls DIR)",
            written.dir.display(),
            issued.identity.role
        );
    }
    Ok(true)
}

fn print_table(rows: &[(&PathBuf, &str)]) {
    let width = rows
        .iter()
        .map(|(path, _)| path.display().to_string().len())
        .max()
        .unwrap_or(0);
    for (path, what) in rows {
        println!("  {:<width$}  {what}", path.display().to_string());
    }
}

fn init_json(written: &CaFiles) -> serde_json::Value {
    json!({
        "dir": written.dir,
        "name": written.name,
        "not_before": show_time(written.validity.not_before),
        "not_after": show_time(written.validity.not_after),
        "files": { "ca_cert": written.cert, "ca_key": written.key },
    })
}

fn issue_json(written: &IdentityFiles) -> serde_json::Value {
    let issued = &written.issued;
    json!({
        "dir": written.dir,
        "name": issued.identity.name,
        "role": issued.identity.role.as_str(),
        "uri": issued.identity.uri(),
        "dns": issued.dns,
        "ips": issued.ips,
        "not_before": show_time(issued.validity.not_before),
        "not_after": show_time(issued.validity.not_after),
        "files": { "ca_cert": written.ca, "cert": written.cert, "key": written.key },
    })
}
