//! `POST /v1/peer/migrations`: the destination judges an offer,
//! reserves for it, makes the VM's tap and starts the receiving VMM.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_migration::transport::SessionToken;

use super::{
    host_of, kill, mutual_tls, read_new, reservation, IncomingPhase, IncomingSlot, IncomingView,
    PeerOffer, Prepared, PLAINTEXT, TOKEN_FILE,
};
use crate::api::ApiError;
use crate::events::Caller;
use crate::incoming::{IncomingFile, ReceiverProcess};
use crate::ledger::Holder;
use crate::model::CreateVm;
use crate::server::{lock, Agent, TapGuard};
use crate::supervisor::{self, ReceiverSecurity, Vmm};
use crate::time::now_rfc3339;

/// How long a receiver may take to print its listening address.
const RECEIVER_START: Duration = Duration::from_secs(30);
/// Beyond the policy's completion timeout, how long a prepared incoming
/// migration waits for its commit before it is released.
const INCOMING_GRACE: Duration = Duration::from_secs(30);
/// The line `ferry receive` prints once its address is bound.
const LISTENING: &str = "ferry: listening on ";
/// The image a VM's local disk is copied into, in its directory here.
const COPIED_DISK: &str = "disk.img";

impl Agent {
    /// `POST /v1/peer/migrations`: judge, reserve, start the receiver.
    pub async fn prepare_incoming(
        self: &Arc<Self>,
        caller: &Caller,
        offer: PeerOffer,
    ) -> Result<Prepared, ApiError> {
        let offered = Instant::now();
        let offered_at_ms = crate::incoming::unix_ms_now();
        Self::validate(&CreateVm {
            id: Some(offer.vm.clone()),
            definition: offer.definition.clone(),
            policy: offer.policy.clone(),
        })?;
        // A local disk arrives in a new image in the VM's directory here;
        // a shared one must be visible here at the same path.
        let mut offer = offer;
        if let Some(disk) = offer.definition.disk.as_mut().filter(|d| d.local) {
            disk.path = self
                .config
                .state_dir
                .join("vms")
                .join(&offer.vm)
                .join(COPIED_DISK);
        }
        // Refused before anything is reserved: the VM stays on the source.
        if !offer.definition.disk.as_ref().is_some_and(|d| d.local) {
            self.sees_disk(&offer.vm, &offer.definition)?;
        }
        let network = match &offer.definition.net {
            Some(net) => {
                if net.mac.is_none() {
                    return Err(ApiError::BadRequest(format!(
                        "VM {}'s card has no MAC in the offer: the source records one at creation",
                        offer.vm
                    )));
                }
                let Some(network) = self.config.network(&net.network) else {
                    return Err(ApiError::Incompatible(format!(
                        "VM {} needs network {:?}, which host {} does not have (it has: {})",
                        offer.vm,
                        net.network,
                        self.config.host_name,
                        self.config.network_names()
                    )));
                };
                Some(network.clone())
            }
            None => None,
        };
        // Plaintext only when both agents say so; otherwise mutual TLS with
        // the certificate that prepared it as the only source allowed.
        let plaintext = offer.plaintext_data_plane && self.config.insecure_plaintext_data_plane;
        let source = host_of(caller).map(str::to_owned);
        let security = if plaintext {
            ReceiverSecurity::Plaintext
        } else {
            let Some(host) = source.clone() else {
                return Err(ApiError::Incompatible(
                    "a mutual-TLS data plane takes only the source host that prepares it: prepare from the source agent's peer connection (a host certificate), or allow a plaintext data plane on both agents".into(),
                ));
            };
            ReceiverSecurity::MutualTls {
                dir: self.tls_dir()?,
                source: host,
            }
        };
        let token = SessionToken::generate().map_err(|e| ApiError::internal(e.to_string()))?;
        let vm = offer.vm.clone();
        let id = format!("in-{:08x}", rand::random::<u32>());
        {
            let slots = lock(&self.slots);
            if slots.contains_key(&vm) {
                return Err(ApiError::Conflict(format!(
                    "a VM {vm} exists on this host already"
                )));
            }
            if let Some(other) = self.incoming_vm(&vm) {
                return Err(ApiError::Conflict(format!(
                    "VM {vm} is already coming here ({other})"
                )));
            }
            // Checked and reserved under the slots' lock: two offers
            // cannot both pass.
            lock(&self.ledger).reserve(&vm, reservation(&offer.definition, Holder::Incoming))?;
        }
        // The VM's tap, attached to its bridge before any page moves.
        let tap = match &network {
            Some(n) => match crate::network::create_tap(n, &self.config.host_name) {
                Ok(t) => Some(TapGuard::new(t, &vm)),
                Err(e) => {
                    lock(&self.ledger).release(&vm);
                    return Err(ApiError::Incompatible(e.to_string()));
                }
            },
            None => None,
        };
        let net_flag = tap.as_ref().map(|t| crate::network::receive_flag(&t.tap));
        let dir = self.vm_dir(&vm);
        let released = |agent: &Self, e: ApiError| {
            lock(&agent.ledger).release(&vm);
            let _ = std::fs::remove_dir_all(&dir);
            crate::incoming::forget(&agent.config.state_dir, &id);
            e
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return Err(released(
                self,
                ApiError::internal(format!("cannot create {}: {e}", dir.display())),
            ));
        }
        let socket = dir.join("api.sock");
        let log = dir.join("console.log");
        let token_file = dir.join(TOKEN_FILE);
        let _ = std::fs::remove_file(&token_file);
        if let Err(e) = token.write_file(&token_file) {
            return Err(released(self, ApiError::internal(e.to_string())));
        }
        // Written before the receiver starts and again at each step, so
        // that a restarted agent finds its receiver (crate::incoming).
        let mut file = IncomingFile {
            view: IncomingView {
                id: id.clone(),
                vm: vm.clone(),
                job: offer.job.clone(),
                source: source.clone(),
                phase: IncomingPhase::Ready,
                address: String::new(),
                mem_bytes: offer.definition.mem_bytes,
                reason: None,
                created_at: now_rfc3339(),
            },
            offer,
            receiver: None,
            tap: tap.as_ref().map(|t| t.tap.clone()),
            answered: false,
            log_offset: 0,
            expires_at_ms: 0,
            offered_at_ms,
            prepare_ms: None,
            measured: None,
        };
        if let Err(e) = crate::incoming::save(&self.config.state_dir, &file) {
            return Err(released(self, ApiError::internal(e)));
        }
        let ip = self
            .config
            .peer_listen
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |a| a.ip());
        let mut vmm = match Vmm::spawn_receiver(
            &self.config.ferry_bin,
            &file.offer.definition,
            net_flag.as_deref(),
            ip,
            &socket,
            &log,
            &security,
            &token_file,
        ) {
            Ok(v) => v,
            Err(e) => return Err(released(self, ApiError::Vmm(e.to_string()))),
        };
        file.receiver = Some(ReceiverProcess {
            pid: vmm.pid,
            start_time: vmm.start_time,
        });
        if let Err(e) = crate::incoming::save(&self.config.state_dir, &file) {
            kill(vmm).await;
            return Err(released(self, ApiError::internal(e)));
        }
        // Its address, from its log.
        let started = Instant::now();
        let mut offset = 0;
        let address = loop {
            let text = read_new(&log, &mut offset);
            if let Some(a) = text
                .lines()
                .find_map(|l| l.strip_prefix(LISTENING))
                .map(|a| a.trim().to_owned())
            {
                break a;
            }
            if vmm.has_exited() || started.elapsed() > RECEIVER_START {
                let exit = kill(vmm).await;
                return Err(released(
                    self,
                    ApiError::Vmm(format!(
                        "the receiving VMM did not come up ({}): {}",
                        exit.description,
                        supervisor::last_words(&log)
                    )),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let token = token.to_hex();
        let expires =
            Duration::from_millis(file.offer.policy.completion_timeout_ms) + INCOMING_GRACE;
        file.view.address = address.clone();
        file.answered = true;
        file.log_offset = offset;
        file.expires_at_ms = crate::incoming::unix_ms_now() + expires.as_millis() as u64;
        file.prepare_ms = Some(offered.elapsed().as_millis() as u64);
        if let Err(e) = crate::incoming::save(&self.config.state_dir, &file) {
            kill(vmm).await;
            return Err(released(self, ApiError::internal(e)));
        }
        let inc = IncomingSlot::new(file.view.clone());
        lock(&self.incoming).insert(id.clone(), inc.clone());
        tracing::info!(
            "incoming migration {id}: VM {vm} from {}, receiver pid {} on {address}",
            inc.source.as_deref().unwrap_or("a local operator"),
            vmm.pid
        );
        let agent = self.clone();
        let deadline = Instant::now() + expires;
        tokio::spawn(async move {
            agent.watch_incoming(inc, vmm, tap, file, deadline).await;
        });
        Ok(Prepared {
            id,
            address,
            token,
            transport: match &security {
                ReceiverSecurity::Plaintext => PLAINTEXT.into(),
                ReceiverSecurity::MutualTls { source, .. } => mutual_tls(source),
            },
            plaintext,
            expires_in_ms: expires.as_millis() as u64,
        })
    }

    /// This host's directory of VM `vm` (its log, API socket, disk copy).
    pub(crate) fn vm_dir(&self, vm: &str) -> PathBuf {
        self.config.state_dir.join("vms").join(vm)
    }
}
