//! QEMU's side of the TLS rows: `tls-creds-x509` directories made from the
//! bench's own identities (the same CA and certificates Ferry's TLS rows
//! use), in the file names QEMU looks for.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The id of the `tls-creds-x509` object on both QEMUs.
pub const CREDS_ID: &str = "ferrytls";

/// The credentials of one QEMU migration over TLS.
#[derive(Debug, Clone)]
pub struct QemuTls {
    /// The destination's: ca-cert.pem, server-cert.pem, server-key.pem.
    pub server_dir: PathBuf,
    /// The source's: ca-cert.pem, client-cert.pem, client-key.pem.
    pub client_dir: PathBuf,
}

impl QemuTls {
    /// Lays out `ca_dir`'s identities `source` and `destination` (as `ferry
    /// ca issue` wrote them) for QEMU, under `ca_dir/qemu-*`.
    pub fn from_identities(ca_dir: &Path, source: &str, destination: &str) -> anyhow::Result<Self> {
        let lay_out = |host: &str, role: &str| -> anyhow::Result<PathBuf> {
            let from = ca_dir.join(host);
            let to = ca_dir.join(format!("qemu-{role}"));
            std::fs::create_dir_all(&to)?;
            for (file, name) in [
                ("ca.crt", "ca-cert.pem".to_string()),
                ("cert.pem", format!("{role}-cert.pem")),
                ("key.pem", format!("{role}-key.pem")),
            ] {
                std::fs::copy(from.join(file), to.join(&name)).with_context(|| {
                    format!(
                        "copying {} for QEMU's tls-creds-x509",
                        from.join(file).display()
                    )
                })?;
            }
            Ok(to)
        };
        Ok(Self {
            server_dir: lay_out(destination, "server")?,
            client_dir: lay_out(source, "client")?,
        })
    }

    /// The `-object` argument for the destination (`server`, which asks
    /// for and checks the source's certificate) or the source (`client`).
    pub fn object_arg(&self, server: bool) -> String {
        let (dir, endpoint) = if server {
            (&self.server_dir, "server,verify-peer=on")
        } else {
            (&self.client_dir, "client")
        };
        format!(
            "tls-creds-x509,id={CREDS_ID},dir={},endpoint={endpoint}",
            dir.display()
        )
    }
}
