#!/usr/bin/env bash
# The network test topology of issue 15, shared by the tests, the demo and
# the bench:
#
#   PREFIX-client  (10.77.N.100/24)
#        | veth
#   PREFIX-switch  bridge "switch"  <- its fdb says where a MAC was learnt
#        | veth uplink          | veth uplink
#   PREFIX-hostA  bridge A     PREFIX-hostB  bridge B   <- 10.77.N.11 and .12,
#        | tap A                    | tap B           the hosts' own addresses
#                                                   (agents, migration streams);
#                                                   the VMMs open the taps
#
# Two tiers of bridges so that a missing announce shows: with one bridge,
# closing the source's tap would flush its forwarding entry by itself.
# Every interface lives inside the topology's namespaces (none in the root
# namespace), so `down` (deleting the namespaces) removes all of it.
# PREFIX-vm is the namespace of crates/netlab's stand-in echo server; it is
# not made here, but `down` removes it too.
#
# Usage: net-topology.sh up|down|status PREFIX [SUBNET_INDEX] [--json]
#   PREFIX        lower-case letters, digits and '-', at most 24 characters
#   SUBNET_INDEX  N of 10.77.N.0/24, 0-254; default derived from PREFIX
#   --json        print the names as one JSON document
# `up` on a half-made topology removes it and builds it anew. `down` is
# idempotent. Needs root (CAP_NET_ADMIN), iproute2 and /dev/net/tun.
set -euo pipefail

usage() {
  echo "usage: $0 up|down|status PREFIX [SUBNET_INDEX] [--json]" >&2
  exit 2
}
fail() {
  echo "net-topology: $*" >&2
  exit 1
}

json=0
args=()
for a in "$@"; do
  case "$a" in
    --json) json=1 ;;
    -h | --help) usage ;;
    -*) echo "net-topology: unknown option $a" >&2; usage ;;
    *) args+=("$a") ;;
  esac
done
[ ${#args[@]} -ge 2 ] && [ ${#args[@]} -le 3 ] || usage
cmd=${args[0]}
prefix=${args[1]}
case "$cmd" in up | down | status) ;; *) echo "net-topology: unknown command '$cmd'" >&2; usage ;; esac

# Bad input changes nothing: check everything before touching the system.
[[ "$prefix" =~ ^[a-z0-9][a-z0-9-]{0,23}$ ]] ||
  fail "bad PREFIX '$prefix': use 1-24 lower-case letters, digits or '-', starting with a letter or digit"
if [ ${#args[@]} -eq 3 ]; then
  index=${args[2]}
  [[ "$index" =~ ^[0-9]{1,3}$ ]] && [ "$index" -le 254 ] ||
    fail "bad SUBNET_INDEX '$index': use 0-254 (the N of 10.77.N.0/24)"
  index=$((10#$index))
else
  # The addresses exist only inside this topology's namespaces, so two
  # topologies never meet; a per-prefix subnet just keeps captures apart.
  index=$(($(printf '%s' "$prefix" | cksum | cut -d' ' -f1) % 250 + 1))
  index_given=0
fi

# Interface names must fit IFNAMSIZ (15 characters): a tag of at most 8
# characters (the prefix itself when short, else its start and a hash).
if [ ${#prefix} -le 8 ]; then
  tag=$prefix
else
  tag=${prefix:0:3}$(printf '%s' "$prefix" | md5sum | cut -c1-5)
fi

ns_a=$prefix-hostA
ns_b=$prefix-hostB
ns_c=$prefix-client
ns_s=$prefix-switch
ns_vm=$prefix-vm
namespaces=("$ns_s" "$ns_a" "$ns_b" "$ns_c")
switch_br=$tag-sw
port_a=$tag-pa
port_b=$tag-pb
port_c=$tag-pc
br_a=$tag-bra
br_b=$tag-brb
up_a=$tag-ua
up_b=$tag-ub
tap_a=$tag-ta
tap_b=$tag-tb
client_if=$tag-c
standin_port=$tag-vm
subnet=10.77.$index.0/24
guest_ip=10.77.$index.2
client_ip=10.77.$index.100
host_a_ip=10.77.$index.11
host_b_ip=10.77.$index.12

ns_exists() { [ -e "/run/netns/$1" ]; }

# `status` and `down` without SUBNET_INDEX report the subnet the running
# topology was built with (read from the client's address).
if [ "${index_given:-1}" = 0 ] && [ "$cmd" != up ] && [ -e "/run/netns/$ns_c" ]; then
  found=$(ip -n "$ns_c" -4 -o addr show dev "$client_if" 2>/dev/null | sed -n 's/.* inet 10\.77\.\([0-9]*\)\.100\/24 .*/\1/p' | head -1)
  if [ -n "$found" ]; then
    index=$found
    subnet=10.77.$index.0/24
    guest_ip=10.77.$index.2
    client_ip=10.77.$index.100
    host_a_ip=10.77.$index.11
    host_b_ip=10.77.$index.12
  fi
fi
link_exists() { ip -n "$1" link show dev "$2" >/dev/null 2>&1; }

print_names() {
  local state=$1 missing=$2
  if [ "$json" -eq 1 ]; then
    cat <<JSON
{"state":"$state","missing":[$missing],"prefix":"$prefix","tag":"$tag","subnet_index":$index,"subnet":"$subnet","prefix_len":24,"guest_ip":"$guest_ip","client_ip":"$client_ip",
 "switch":{"ns":"$ns_s","bridge":"$switch_br","port_a":"$port_a","port_b":"$port_b","port_client":"$port_c"},
 "host_a":{"ns":"$ns_a","bridge":"$br_a","uplink":"$up_a","tap":"$tap_a","ip":"$host_a_ip"},
 "host_b":{"ns":"$ns_b","bridge":"$br_b","uplink":"$up_b","tap":"$tap_b","ip":"$host_b_ip"},
 "client":{"ns":"$ns_c","ifname":"$client_if","ip":"$client_ip"},
 "standin":{"ns":"$ns_vm","port":"$standin_port"}}
JSON
  else
    echo "state        $state${missing:+ (missing: ${missing//\"/})}"
    echo "subnet       $subnet (guest $guest_ip, client $client_ip)"
    echo "switch       ns $ns_s, bridge $switch_br, ports $port_a (host A) $port_b (host B) $port_c (client)"
    echo "host A       ns $ns_a, bridge $br_a ($host_a_ip/24), uplink $up_a, tap $tap_a"
    echo "host B       ns $ns_b, bridge $br_b ($host_b_ip/24), uplink $up_b, tap $tap_b"
    echo "client       ns $ns_c, $client_if $client_ip/24"
  fi
}

# Every piece `up` makes, as "namespace interface" (namespace alone for the
# namespace itself), to tell up, down and partial apart.
pieces() {
  local ns
  for ns in "${namespaces[@]}"; do echo "$ns"; done
  echo "$ns_s $switch_br"; echo "$ns_s $port_a"; echo "$ns_s $port_b"; echo "$ns_s $port_c"
  echo "$ns_a $br_a"; echo "$ns_a $up_a"; echo "$ns_a $tap_a"
  echo "$ns_b $br_b"; echo "$ns_b $up_b"; echo "$ns_b $tap_b"
  echo "$ns_c $client_if"
}

missing_pieces() {
  local ns ifname out=""
  while read -r ns ifname; do
    if [ -z "$ifname" ]; then
      ns_exists "$ns" || out+="${out:+,}\"$ns\""
    elif ! ns_exists "$ns" || ! link_exists "$ns" "$ifname"; then
      out+="${out:+,}\"$ns/$ifname\""
    fi
  done < <(pieces)
  echo "$out"
}

any_present() {
  local ns
  for ns in "${namespaces[@]}" "$ns_vm"; do ns_exists "$ns" && return 0; done
  return 1
}

topology_down() {
  local ns
  for ns in "$ns_vm" "$ns_c" "$ns_a" "$ns_b" "$ns_s"; do
    ns_exists "$ns" || continue
    # A persistent tap that a VMM still holds would keep the namespace
    # alive (unseen) after `ip netns delete`; deleting the taps first ends
    # them even then.
    ip -n "$ns" -o link show type tun 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 |
      while read -r dev; do ip -n "$ns" link delete "$dev" 2>/dev/null || true; done
    ip netns delete "$ns" || fail "could not delete namespace $ns"
  done
}

check_tools() {
  [ "$(id -u)" -eq 0 ] || fail "must run as root (it creates namespaces, bridges and taps)"
  command -v ip >/dev/null || fail "'ip' (iproute2) not found"
  [ -c /dev/net/tun ] || fail "/dev/net/tun is missing (no tun/tap support)"
}

# Quiet namespaces: no IPv6 (no DAD, router solicitations or MLD reports to
# confuse the probes), no gratuitous ARP on link up (an announce must come
# only from whoever is tested).
quiet_ns() {
  local ns=$1
  if [ -d /proc/sys/net/ipv6 ]; then
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 >/dev/null
  fi
  ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.arp_notify=0 net.ipv4.conf.default.arp_notify=0 >/dev/null
  ip -n "$ns" link set lo up
}

# A bridge that forwards at once (no STP, no forward delay) and sends
# nothing by itself (no multicast snooping queries).
add_bridge() {
  ip -n "$1" link add name "$2" type bridge stp_state 0 forward_delay 0 mcast_snooping 0
  ip -n "$1" link set "$2" up
}

topology_up() {
  local ns
  for ns in "${namespaces[@]}"; do
    ip netns add "$ns"
    quiet_ns "$ns"
  done
  add_bridge "$ns_s" "$switch_br"
  for side in a b; do
    if [ $side = a ]; then ns=$ns_a br=$br_a up=$up_a port=$port_a tap=$tap_a host_ip=$host_a_ip
    else ns=$ns_b br=$br_b up=$up_b port=$port_b tap=$tap_b host_ip=$host_b_ip; fi
    add_bridge "$ns" "$br"
    # The host's own address (its agent's and its VMMs'), on its bridge as
    # a hypervisor's management address would be.
    ip -n "$ns" addr add "$host_ip/24" dev "$br"
    ip -n "$ns" link add "$up" type veth peer name "$port" netns "$ns_s"
    ip -n "$ns" link set "$up" master "$br" up
    ip -n "$ns_s" link set "$port" master "$switch_br" up
    # Persistent, so it outlives the VMM that opens it; vnet_hdr because
    # the VMM opens it with IFF_VNET_HDR; owned by the caller (root).
    ip -n "$ns" tuntap add dev "$tap" mode tap vnet_hdr user "$(id -u)" group "$(id -g)"
    ip -n "$ns" link set "$tap" master "$br" up
  done
  ip -n "$ns_c" link add "$client_if" type veth peer name "$port_c" netns "$ns_s"
  ip -n "$ns_s" link set "$port_c" master "$switch_br" up
  ip -n "$ns_c" addr add "$client_ip/24" dev "$client_if"
  ip -n "$ns_c" link set "$client_if" up
  wait_operational
}

# A link set up carries traffic only once the kernel's link watcher has
# seen its carrier (up to a second later): until then its queue drops
# everything, and a first ARP or SYN would be lost. Wait (bounded) for
# every veth end to be UP and every bridge port on a veth to forward.
wait_operational() {
  local ns dev i
  while read -r ns dev; do
    for ((i = 0; i < 150; i++)); do
      ip -n "$ns" -o link show dev "$dev" | grep -q 'state UP' && break
      sleep 0.02
    done
    ((i < 150)) || fail "$ns/$dev did not come up within 3 s"
  done <<LINKS
$ns_s $port_a
$ns_s $port_b
$ns_s $port_c
$ns_a $up_a
$ns_b $up_b
$ns_c $client_if
LINKS
  while read -r ns dev; do
    for ((i = 0; i < 150; i++)); do
      bridge -n "$ns" link show dev "$dev" | grep -q 'state forwarding' && break
      sleep 0.02
    done
    ((i < 150)) || fail "bridge port $ns/$dev does not forward after 3 s"
  done <<PORTS
$ns_s $port_a
$ns_s $port_b
$ns_s $port_c
$ns_a $up_a
$ns_b $up_b
PORTS
}

case "$cmd" in
  status)
    if ! any_present; then print_names down ""; exit 0; fi
    missing=$(missing_pieces)
    if [ -z "$missing" ]; then print_names up ""; else print_names partial "$missing"; fi
    ;;
  down)
    check_tools
    topology_down
    [ "$json" -eq 1 ] && print_names down ""
    [ "$json" -eq 1 ] || echo "net-topology: $prefix is down"
    ;;
  up)
    check_tools
    if any_present; then
      echo "net-topology: $prefix exists already (whole or in part); removing it to build it anew" >&2
      topology_down
    fi
    # A failure half-way removes what was made, so nothing is left behind.
    building=1
    trap 'if [ "$building" = 1 ]; then echo "net-topology: up failed; removing what was made" >&2; topology_down; fi' EXIT
    topology_up
    building=0
    missing=$(missing_pieces)
    [ -z "$missing" ] || { topology_down; fail "up made the topology but these are missing: $missing"; }
    print_names up ""
    ;;
esac
