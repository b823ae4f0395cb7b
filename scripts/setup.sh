#!/usr/bin/env bash
# Installs what `make demo` and `make test` need, and nothing more. Idempotent: when everything is present it
# prints one line and changes nothing.
#
#   Debian packages  kernel tooling for the lab and root tests, the reference CNI plugins and a real container
#                    runtime for side-by-side tests and benchmarks, protoc for the agent's IPAM schema.
#   .venv/           a git-ignored Python venv with the EC2 emulator (moto server) and offline manifest validation.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

debs=(
  iproute2 nftables iperf3 sockperf procps
  containernetworking-plugins podman runc busybox-static uidmap
  protobuf-compiler
  python3-venv
)
pypi=("moto[server]==5.2.5" "kubernetes-validate==1.33.1")
venv="$root/.venv"
stamp="$venv/.underlay-setup"
# The stamp records what the venv was built from; a change to the list above rebuilds it.
want_stamp=$(printf '%s\n' "${pypi[@]}")

missing=()
for d in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q 'install ok installed' || missing+=("$d")
done

venv_ok=1
if [ ! -x "$venv/bin/python" ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want_stamp" ]; then
  venv_ok=0
fi

if [ ${#missing[@]} -eq 0 ] && [ $venv_ok -eq 1 ]; then
  echo "setup: all present (${#debs[@]} Debian packages, venv at .venv)"
  exit 0
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ $venv_ok -eq 0 ]; then
  echo "setup: building Python venv at .venv (${pypi[*]})"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${pypi[@]}"
  printf '%s' "$want_stamp" >"$stamp"
fi

echo "setup: done"
