#!/usr/bin/env bash
# Builds the underlay container image (`make image`) without pulling anything: the root file system is made here
# from this machine's files, each from an installed Debian package (scripts/setup.sh installs them) or built by
# cargo, then imported from scratch with `podman import` into a private vfs store and saved as an OCI archive.
#
#   /usr/local/bin/underlay            the controller and the agent (glibc, its libraries below)
#   /usr/local/bin/underlay-cni        the CNI plugin (static: the agent copies it to the host, any glibc)
#   /usr/local/lib/underlay/cni/       the reference plugins the conflist chains (portmap, bandwidth)
#   /usr/sbin/nft, /usr/bin/nsenter    what the agent executes (`nft -f -` in its own namespace, through
#                                      `nsenter --net=…` for another)
#   /bin/sh (busybox)                  the agent's sysctl init container
#   /etc/ssl/certs/ca-certificates.crt the EC2 and STS endpoints' roots (the controller)
#   /usr/share/doc/<package>/copyright the licence of every Debian package a file comes from
#
# Binaries are stripped; their debug info (line tables) is split out with objcopy and kept beside the image,
# linked by .gnu_debuglink, for symbolising a backtrace from a running image. Output, in $CARGO_TARGET_DIR/oci:
#   underlay-<tag>.oci.tar   the image (podman load -i …; docs/install.md pushes it to ECR)
#   debug/<binary>.debug     the split debug info
#   underlay-<tag>.ref       the image's name, e.g. localhost/underlay:0.1.0
#
# Environment: UNDERLAY_IMAGE_REPO (default underlay), UNDERLAY_IMAGE_TAG (default: the workspace version),
# UNDERLAY_IMAGE_PROFILE: the cargo profile of the binaries, `image` (default: the shipping image) or `image-test`
# (`make test-image`: the same binaries and files at opt-level 1, for the image test in `make test`); any other profile writes to $CARGO_TARGET_DIR/oci-<profile> instead of oci. The image records
# its profile in the label dev.underlay.build-profile.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
cargo=${CARGO:-cargo}

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
repo=${UNDERLAY_IMAGE_REPO:-underlay}
tag=${UNDERLAY_IMAGE_TAG:-$version}
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# Reproducible timestamps: the commit's time, not the build's.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

profile=${UNDERLAY_IMAGE_PROFILE:-image}
case "$profile" in
  image) out="$target/oci" ;;
  *) out="$target/oci-$profile" ;;
esac

start=$(date +%s)
"$cargo" build --profile "$profile" -p underlay-cli -p underlay-cni --bin underlay --bin underlay-cni
built=$(date +%s)
bins="$target/$profile"

work="$out/work"
rm -rf "$work" "$out/debug"
mkdir -p "$work" "$out/debug"
# podman's store in a short temporary directory (podman refuses a runroot path over 50 characters).
store=$(mktemp -d /tmp/ulimage-XXXXXX)
cleanup() {
  rm -rf "$work" "$store"
}
trap cleanup EXIT
fs="$work/rootfs"

# A usr-merged tree like Debian 12's: /bin, /sbin, /lib, /lib64 are links into /usr.
mkdir -p "$fs"/usr/{bin,sbin,lib,lib64} "$fs"/usr/local/{bin,lib/underlay/cni} "$fs"/{etc/ssl/certs,tmp,proc,sys,dev,run,var}
for d in bin sbin lib lib64; do ln -s "usr/$d" "$fs/$d"; done
chmod 1777 "$fs/tmp"

packages=()
# The Debian package owning a host path (usr-merge aware: dpkg may record /lib/… or /usr/lib/…).
owner() {
  local p=$1 real
  real=$(readlink -f "$p")
  for q in "$p" "$real" "${real#/usr}" "/usr$p"; do
    if pkg=$(dpkg-query -S "$q" 2>/dev/null | head -1 | cut -d: -f1); then
      [ -n "$pkg" ] && { echo "$pkg"; return; }
    fi
  done
  echo "no Debian package owns $p: run scripts/setup.sh" >&2
  exit 1
}

# Copies a host file to the same path in the image (dereferenced), recording its package.
copy_host() {
  local src=$1 dst=${2:-$1}
  mkdir -p "$fs$(dirname "$dst")"
  cp -L "$src" "$fs$dst"
  packages+=("$(owner "$src")")
}

# Copies a host binary and every shared library it loads (as ldd resolves them on this machine).
copy_with_libs() {
  local src=$1 dst=${2:-$1} lib
  copy_host "$src" "$dst"
  for lib in $(ldd "$src" | awk '/=>/ {print $3} /^[[:space:]]*\/.*ld-linux/ {print $1}'); do
    [ -e "$fs$lib" ] || copy_host "$lib"
  done
}

# The two Rust binaries: stripped in the image, debug info beside it.
for b in underlay underlay-cni; do
  objcopy --only-keep-debug --compress-debug-sections=zlib "$bins/$b" "$out/debug/$b.debug"
  objcopy --strip-all --add-gnu-debuglink="$out/debug/$b.debug" "$bins/$b" "$fs/usr/local/bin/$b"
done
for lib in $(ldd "$bins/underlay" | awk '/=>/ {print $3} /^[[:space:]]*\/.*ld-linux/ {print $1}'); do
  [ -e "$fs$lib" ] || copy_host "$lib"
done
if ldd "$fs/usr/local/bin/underlay-cni" 2>&1 | grep -q '=>'; then
  echo "build-image: underlay-cni is dynamically linked" >&2
  exit 1
fi

copy_with_libs "$(command -v nft)" /usr/sbin/nft
copy_with_libs "$(command -v nsenter)" /usr/bin/nsenter
for p in portmap bandwidth; do
  copy_with_libs "/usr/lib/cni/$p" "/usr/local/lib/underlay/cni/$p"
done
copy_host /bin/busybox /usr/bin/busybox
ln -s busybox "$fs/usr/bin/sh"
cp /etc/ssl/certs/ca-certificates.crt "$fs/etc/ssl/certs/ca-certificates.crt"
packages+=(ca-certificates)

cat >"$fs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/usr/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin
PASSWD
cat >"$fs/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
GROUP
echo 'hosts: files dns' >"$fs/etc/nsswitch.conf"
mkdir -p "$fs/home/nonroot" "$fs/root"

for pkg in $(printf '%s\n' "${packages[@]}" | sed 's/:.*//' | sort -u); do
  if [ -f "/usr/share/doc/$pkg/copyright" ]; then
    mkdir -p "$fs/usr/share/doc/$pkg"
    cp "/usr/share/doc/$pkg/copyright" "$fs/usr/share/doc/$pkg/copyright"
  fi
done
printf '%s\n' "${packages[@]}" | sed 's/:.*//' | sort -u >"$fs/usr/share/doc/underlay-image-packages"

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" -C "$fs" -cf "$work/rootfs.tar" .

# podman bound to a store of its own: nothing here reads or changes the machine's images.
cat >"$store/containers.conf" <<CONF
[engine]
cgroup_manager = "cgroupfs"
events_logger = "none"
runtime = "runc"
CONF
cat >"$store/storage.conf" <<CONF
[storage]
driver = "vfs"
runroot = "$store/runroot"
graphroot = "$store/root"
CONF
podman_() {
  CONTAINERS_CONF="$store/containers.conf" CONTAINERS_STORAGE_CONF="$store/storage.conf" \
    podman --root "$store/root" --runroot "$store/runroot" --tmpdir "$store/tmp" --storage-driver vfs "$@"
}
ref="localhost/$repo:$tag"
label() { printf 'LABEL %s=%s' "$1" "$2"; }
podman_ import -q \
  --change "$(label org.opencontainers.image.title underlay)" \
  --change "$(label org.opencontainers.image.description "Overlay-free Kubernetes pod networking for AWS VPC: controller, node agent and CNI plugin")" \
  --change "$(label org.opencontainers.image.version "$tag")" \
  --change "$(label org.opencontainers.image.revision "$revision")" \
  --change "$(label org.opencontainers.image.created "$created")" \
  --change "$(label org.opencontainers.image.licenses Apache-2.0)" \
  --change "$(label dev.underlay.build-profile "$profile")" \
  --change "USER 65532:65532" \
  --change "ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin" \
  --change 'ENTRYPOINT ["/usr/local/bin/underlay"]' \
  --change 'CMD ["--help"]' \
  "$work/rootfs.tar" "$ref" >/dev/null
archive="$out/underlay-$tag.oci.tar"
rm -f "$archive"
podman_ save -q --format oci-archive -o "$archive" "$ref"
echo "$ref" >"$out/underlay-$tag.ref"
size=$(podman_ image inspect --format '{{.Size}}' "$ref")
podman_ rmi -f "$ref" >/dev/null 2>&1 || true
# vfs leaves plain directories (no mounts): the store goes with the work directory's cleanup.

end=$(date +%s)
echo "image: $ref in $archive"
echo "image: $size bytes unpacked, $(stat -c %s "$archive") bytes archived; debug info in $out/debug"
echo "image: cargo build (profile $profile) $((built - start)) s, image $((end - built)) s"
