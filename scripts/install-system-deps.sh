#!/usr/bin/env bash
# Installs the Debian packages layerfs needs to build, test and demo. Idempotent; run as root.
set -euo pipefail
pkgs=(
  fuse3                                           # fusermount3: unprivileged mounts
  attr zstd                                       # getfattr/setfattr for tests, zstd layers
  fuse-overlayfs                                  # the drop-in we compare against
  umoci skopeo buildah busybox-static             # real tools that build reference images
  libarchive-tools golang-go                      # bsdtar layers; Go's archive/tar as oracle
  docker-registry                                 # a real OCI registry on 127.0.0.1
  zsh                                             # the zsh completion test
  uidmap passwd python3.11                        # rootless tests: newuidmap, useradd, a
                                                  # python an unprivileged user can run
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The FUSE module and device must be usable (they are on these machines; say so if not).
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || echo "install-system-deps: warning: /dev/fuse is absent" >&2
# Unprivileged users mount through the setuid fusermount3, which opens /dev/fuse as the caller:
# Debian's udev rule makes it 0666; containers without udev leave it 0600 (root only).
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" = 600 ] && [ "$(id -u)" -eq 0 ]; then
  chmod 0666 /dev/fuse
fi
# The registry package starts a system service; tests run their own instance.
systemctl disable --now docker-registry >/dev/null 2>&1 || true
exit 0
