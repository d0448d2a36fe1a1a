//! The taps as a VMM will use them (the contract): opened from inside the
//! host's namespace with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a frame
//! written to tap B teaches the switch that the MAC is behind host B, and
//! `down` removes a tap even while it is held open.

mod common;

use std::fs::File;
use std::io::Write;
use std::time::{Duration, Instant};

use common::{can_run, leftovers, sh, unique_prefix};
use ferry_netlab::{
    garp_frame, open_tap, rarp_frame, FdbPlace, Host, MacAddr, NetlabError, Topology,
};

/// The legacy virtio_net_hdr: the default size of a vnet_hdr tap's header.
const VNET_HDR_LEN: usize = 10;

fn write_frame(tap: &mut File, frame: &[u8]) {
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend_from_slice(frame);
    tap.write_all(&buf).unwrap();
}

fn wait_place(topo: &Topology, mac: MacAddr, want: FdbPlace) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        if topo.fdb_place(mac).unwrap() == Some(want.clone()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn frames_written_to_a_hosts_tap_teach_the_switch_and_down_removes_held_taps() {
    if !can_run("frames_written_to_a_hosts_tap_teach_the_switch_and_down_removes_held_taps") {
        return;
    }
    let prefix = unique_prefix();
    let topo = Topology::up(&prefix).unwrap();
    let tag = topo.names().tag.clone();
    let (a, b) = (topo.host(Host::A).clone(), topo.host(Host::B).clone());
    let mut tap_a = open_tap(&a.ns, &a.tap).expect("open tap A as the VMM does");
    let mut tap_b = open_tap(&b.ns, &b.tap).expect("open tap B as the VMM does");
    // Attached: the tap has carrier now.
    let shown = sh("ip", &["-n", &a.ns, "link", "show", &a.tap]);
    assert!(!shown.contains("NO-CARRIER"), "{shown}");
    // A tap already in use cannot be opened a second time.
    let again = open_tap(&a.ns, &a.tap);
    assert!(
        matches!(again, Err(NetlabError::Io { .. })),
        "a held tap opened twice"
    );
    eprintln!(
        "as expected, a second open of a held tap: {}",
        again.unwrap_err()
    );
    // So is a tap that does not exist (TUNSETIFF alone would create it).
    let missing = format!("{tag}-nx");
    let err = open_tap(&a.ns, &missing).unwrap_err();
    eprintln!("as expected, a missing tap: {err}");
    let links = sh("ip", &["-n", &a.ns, "-o", "link", "show"]);
    assert!(
        !links.contains(&missing),
        "opening a missing tap made one: {links}"
    );

    let mac = MacAddr([0x02, 0x6e, 0x6c, 0xaa, 0x00, 0x01]);
    let ip = topo.guest_ip();
    write_frame(&mut tap_a, &garp_frame(mac, ip));
    assert!(
        wait_place(&topo, mac, FdbPlace::HostA),
        "not learnt behind host A"
    );
    // The destination's announce: QEMU's RARP through tap B.
    write_frame(&mut tap_b, &rarp_frame(mac));
    assert!(
        wait_place(&topo, mac, FdbPlace::HostB),
        "not learnt behind host B"
    );

    // Down while both taps are still open.
    topo.down().unwrap();
    assert_eq!(leftovers(&prefix, &tag), Vec::<String>::new());
    drop((tap_a, tap_b));
}
