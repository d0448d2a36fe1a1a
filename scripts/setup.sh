#!/usr/bin/env bash
# Installs what Ferry's build, tests and benchmarks need on a fresh Debian 12
# machine of this kind: QEMU (the baseline the guest and benchmarks are
# checked against) and libclang (the userfaultfd crate generates its kernel
# bindings with bindgen at build time). Idempotent: installs only what is
# missing.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} (Debian packages)"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust stable (rustup)" >&2; exit 1; }
if [ ! -e /dev/kvm ]; then
  echo "setup: WARNING: /dev/kvm is missing: every KVM test will report SKIPPED" >&2
fi
echo "setup: ok"
