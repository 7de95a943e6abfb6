//! CNI network configs for `ctr run --cni`, and the bridge networks tests reserve so that
//! parallel harnesses (in this process or another) never share a bridge name or a subnet.

use std::{
    fs,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::daemon::Containerd;

/// Where reservations live: one file per /24, holding the owner's pid, shared by every harness
/// on the host.
const RESERVATIONS_DIR: &str = "ambit-test-networks";
/// The /24s handed out: 10.232.0.0/24 up to 10.239.255.0/24 (tests with fixed networks have
/// used 10.231.x).
const FIRST_SECOND_OCTET: u8 = 232;
const SLOTS: u32 = 8 * 256;

/// A bridge network reserved for one harness: its /24 and bridge name are used by no other
/// live harness on this host until the harness that reserved them is dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservedNetwork {
    /// The host bridge's name (`ambit<slot>`, at most 15 bytes).
    pub bridge: String,
    /// The network's first three octets.
    prefix: [u8; 3],
}

impl ReservedNetwork {
    fn of_slot(slot: u32) -> ReservedNetwork {
        // slot < SLOTS: the second octet stays within 232..=239.
        let second = FIRST_SECOND_OCTET + (slot / 256) as u8;
        ReservedNetwork {
            bridge: format!("ambit{slot}"),
            prefix: [10, second, (slot % 256) as u8],
        }
    }

    /// `a.b.c.0/24`.
    pub fn subnet(&self) -> String {
        let [a, b, c] = self.prefix;
        format!("{a}.{b}.{c}.0/24")
    }

    /// Address `n` of the network (`.1` is the bridge's, the gateway; host-local hands out `.2`
    /// first).
    pub fn host(&self, n: u8) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, n)
    }
}

/// Whether the process that wrote `file` is gone (a reservation a killed test left). An empty
/// file is being written by its owner right now: not stale.
fn stale(file: &Path) -> bool {
    match fs::read_to_string(file) {
        Ok(pid) => {
            let pid = pid.trim();
            !pid.is_empty() && !Path::new("/proc").join(pid).exists()
        }
        Err(_) => false,
    }
}

impl Containerd {
    /// Reserves a /24 and a bridge name no other live harness on the host holds (a file created
    /// exclusively per /24 under the temp dir, released when this harness is dropped; one whose
    /// owner died is taken over), skipping any /24 the host already routes (a network some test
    /// made with fixed names). Write its config with [`Containerd::write_reserved_network`].
    pub fn reserve_network(&self) -> Result<ReservedNetwork> {
        let dir = std::env::temp_dir().join(RESERVATIONS_DIR);
        fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        // Start where this harness's name points, so parallel harnesses rarely even meet.
        let start = self
            .dir()
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(*b)))
            % SLOTS;
        let me = std::process::id().to_string();
        // A network some test made with fixed names (no reservation) shows as a route.
        let routes = Command::new("ip")
            .args(["-4", "route", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for i in 0..SLOTS {
            let slot = (start + i) % SLOTS;
            let subnet = ReservedNetwork::of_slot(slot).subnet();
            if routes
                .lines()
                .any(|r| r.split_whitespace().next() == Some(&subnet))
            {
                continue;
            }
            let file = dir.join(slot.to_string());
            let created = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file);
            let mut handle = match created {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if stale(&file) {
                        // The next pass over this slot may take it; another harness may too.
                        let _ = fs::remove_file(&file);
                    }
                    continue;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to create {}", file.display()))
                }
            };
            self.reservations
                .lock()
                .map_err(|_| anyhow!("reservation list poisoned"))?
                .push(file.clone());
            handle
                .write_all(me.as_bytes())
                .with_context(|| format!("failed to write {}", file.display()))?;
            return Ok(ReservedNetwork::of_slot(slot));
        }
        bail!(
            "every test network under {} is reserved (remove the directory if no test runs)",
            dir.display()
        )
    }

    /// Writes [`bridge_conflist`] for `net` as `file_name` into [`Containerd::cni_conf_dir`].
    pub fn write_reserved_network(
        &self,
        file_name: &str,
        cni_version: &str,
        network: &str,
        net: &ReservedNetwork,
        extra: &[&str],
    ) -> Result<PathBuf> {
        self.write_bridge_network(
            file_name,
            cni_version,
            network,
            &net.bridge,
            &net.subnet(),
            extra,
        )
    }
}

/// A conflist for `ctr run --cni`: `bridge` (with `host-local` IPAM on `subnet`, the bridge the
/// gateway, a default route) then `loopback`, then the `extra` plugin objects (raw JSON) in
/// order. `cni_version` is e.g. `1.0.0` or `0.4.0`. host-local keeps its leases under the
/// harness's cache dir (its default /var/lib/cni/networks, mounted over).
pub fn bridge_conflist(
    cni_version: &str,
    network: &str,
    bridge: &str,
    subnet: &str,
    extra: &[&str],
) -> String {
    let mut plugins = vec![
        format!(
            r#"{{"type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
      "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{subnet}"}}]],
                "routes": [{{"dst": "0.0.0.0/0"}}]}}}}"#
        ),
        r#"{"type": "loopback"}"#.to_owned(),
    ];
    plugins.extend(extra.iter().map(|p| (*p).to_owned()));
    format!(
        "{{\n  \"cniVersion\": \"{cni_version}\",\n  \"name\": \"{network}\",\n  \"plugins\": [\n    {}\n  ]\n}}\n",
        plugins.join(",\n    ")
    )
}
