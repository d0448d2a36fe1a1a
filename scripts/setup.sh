#!/usr/bin/env bash
# Installs what Ferry's build, tests and benchmarks need on a fresh Debian 12
# machine of this kind:
# - QEMU 10.0 from bookworm-backports, the newest QEMU Debian ships and the
#   baseline `ferry bench` compares against (the guest boots under it too);
# - iperf3, the loopback TCP limit `ferry bench` measures beside every
#   throughput row;
# - libclang (the userfaultfd crate generates its kernel bindings with bindgen);
# - iproute2 (`ip`, `bridge`): the network tests' namespaces, bridges and taps;
# - etcd-server and etcd-client (etcd 3.4, `etcd` and `etcdctl`): the fleet's
#   etcd store tests start a real etcd on loopback;
# - protobuf-compiler (`protoc`) and libprotobuf-dev (protobuf's own
#   .proto files, which etcd's import): the etcd-client crate's build script
#   generates its gRPC code from etcd's .proto files;
# - chromium: the fleet web page's test renders the page in headless
#   chromium (its DOM and a screenshot);
# - the test guest's crates (cargo fetch), which its offline build needs.
# Idempotent: installs only what is missing.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive

backports=/etc/apt/sources.list.d/bookworm-backports.sources
if grep -qs 'bookworm' /etc/os-release && [ ! -e "$backports" ]; then
  echo "setup: adding Debian's bookworm-backports source (for QEMU 10.0)"
  $SUDO tee "$backports" >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p'; }
need=()
[ "$(qemu_major)" -ge 10 ] 2>/dev/null || need+=(qemu-system-x86)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
{ command -v ip && command -v bridge; } >/dev/null 2>&1 || need+=(iproute2)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} (Debian packages)"
  $SUDO apt-get update -qq
  target=()
  [ -e "$backports" ] && target=(-t bookworm-backports)
  $SUDO apt-get install -y -qq --no-install-recommends "${target[@]}" "${need[@]}" >/dev/null
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust stable (rustup)" >&2; exit 1; }
# The test guest (guest/, its own package) is built offline by
# crates/testguest/build.rs: fetch its crates (virtio-drivers, smoltcp) first.
cargo fetch --locked --manifest-path "$(dirname "$0")/../guest/Cargo.toml" >/dev/null
if [ ! -e /dev/kvm ]; then
  echo "setup: WARNING: /dev/kvm is missing: every KVM test will report SKIPPED" >&2
fi
echo "setup: ok ($(qemu-system-x86_64 --version | head -1))"
