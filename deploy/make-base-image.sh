#!/usr/bin/env bash
# Make a local Debian bookworm base image with Python, without any registry:
#   debootstrap --variant=minbase + python3 python3-venv ca-certificates
#   -> tarball (cached) -> docker import pilotfish-base:bookworm
#
# The Dockerfiles build FROM it with --build-arg BASE_IMAGE=pilotfish-base:bookworm.
#
# Environment:
#   DOCKER_HOST        engine to import into (default: a private dockerd, see lib.sh)
#   PF_BASE_IMAGE      image name              (default pilotfish-base:bookworm)
#   PF_DEBIAN_MIRROR   Debian mirror           (default: the first one in /etc/apt/sources.list*)
#   PF_CACHE_DIR       where the tarball is kept (default /var/cache/pilotfish)
#   PF_REBUILD=1       ignore the cached tarball
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SUITE=bookworm
# No python3-pip: the images install into a venv, whose pip comes from
# python3-venv (ensurepip); Debian's pip + setuptools + wheel would add 20 MB
# to every image. PF_BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
# brings it back.
PACKAGES="${PF_BASE_PACKAGES:-python3,python3-venv,ca-certificates}"
PF_CACHE_DIR="${PF_CACHE_DIR:-/var/cache/pilotfish}"

debian_mirror() {
    # deb822 (URIs:) or one-line (deb URL suite ...) format; the first Debian mirror wins.
    local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
    {
        sed -n 's/^URIs:[[:space:]]*//p' "${files[@]}" 2>/dev/null | tr ' ' '\n'
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' \
            "${files[@]}" 2>/dev/null
    } | grep -E '/debian/?$' | grep -v -- '-security' | head -1 || true
}

MIRROR="${PF_DEBIAN_MIRROR:-$(debian_mirror)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
# The key changes with anything that changes the tarball (bump FORMAT when
# this script's rootfs treatment changes).
FORMAT=2
key="$(printf '%s %s %s %s' "$FORMAT" "$SUITE" "$MIRROR" "$PACKAGES" | sha256sum | cut -c1-12)"
tarball="$PF_CACHE_DIR/base-$SUITE-$key.tar"

if [[ ! -s "$tarball" || "${PF_REBUILD:-0}" == 1 ]]; then
    need_packages debootstrap=debootstrap
    mkdir -p "$PF_CACHE_DIR"
    root="$(mktemp -d "$PF_CACHE_DIR/rootfs.XXXXXX")"
    trap 'rm -rf "$root"' EXIT
    log "debootstrap $SUITE from $MIRROR (+ $PACKAGES)"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$PF_CACHE_DIR/debootstrap.log" 2>&1 \
        || { tail -30 "$PF_CACHE_DIR/debootstrap.log" >&2; exit 1; }
    # Small and reproducible: no package caches, lists, docs or logs.
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/locale/* "$root"/tmp/* "$root"/root/.cache
    # Do not keep docs/man pages of packages installed later either (what the
    # official debian:*-slim images do).
    cat >"$root/etc/dpkg/dpkg.cfg.d/pilotfish-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
        >"$root/etc/apt/apt.conf.d/90pilotfish-no-recommends"
    chmod 0755 "$root"  # mktemp made it 0700: / must be traversable by non-root users
    : >"$root/etc/hostname"
    : >"$root/etc/resolv.conf"
    tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    find "$PF_CACHE_DIR" -maxdepth 1 -name "base-$SUITE-*.tar" ! -name "${tarball##*/}" -delete
    rm -rf "$root"
    trap - EXIT
else
    log "using cached $tarball"
fi

dockerd_up
if [[ "$(docker image inspect -f '{{index .Config.Labels "pilotfish.base.key"}}' "$PF_BASE_IMAGE" 2>/dev/null)" == "$key" ]]; then
    log "$PF_BASE_IMAGE already imported"
else
    log "docker import $PF_BASE_IMAGE"
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL pilotfish.base.key=$key org.opencontainers.image.base.name=debian:$SUITE" \
        --change 'CMD ["/bin/bash"]' \
        "$tarball" "$PF_BASE_IMAGE" >/dev/null
fi
docker image ls "$PF_BASE_IMAGE" >&2
