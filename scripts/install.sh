#!/usr/bin/env bash
# Installs what shoal needs on Debian 12, as root: Debian packages and a virtualenv (.venv) with
# shoal and its Python dependencies. Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(runc tini busybox-static debootstrap docker-registry python3 python3-venv python3-pip ca-certificates procps
  gcc musl-tools  # builds the in-sandbox agent (src/shoal/server/agent)
  e2fsprogs  # per-sandbox disk images (mkfs.ext4)
  iproute2 nftables openssl  # sandbox networking (docs/network.md)
  s3fs fuse3)  # CloudBucketMount (docs/buckets.md)
# For the tests: a real terminal (tmux) for `shoal shell`, and a browser (chromium) that
# Playwright drives for the dashboard; Playwright's own browser download is never used.
APT_PACKAGES+=(tmux chromium)

if [ "$(id -u)" != 0 ]; then
  echo "shoal runs containers and mounts file systems: run this as root" >&2
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# gVisor (the `gvisor` runtime, docs/gvisor.md): Debian 12's own runsc (20221219) is broken on
# current kernels; the bookworm-backports build works. Add that suite, pin runsc to this version
# (apt never moves it), and install exactly it.
RUNSC_VERSION=0.0~20240729.0-4~bpo12+2
if [ "$(dpkg-query -W -f='${Version}' runsc 2>/dev/null || true)" != "$RUNSC_VERSION" ]; then
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/shoal-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  cat > /etc/apt/preferences.d/shoal-runsc <<PIN
Package: runsc
Pin: version $RUNSC_VERSION
Pin-Priority: 1001
PIN
  echo "installing runsc $RUNSC_VERSION from bookworm-backports"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "runsc=$RUNSC_VERSION"
fi

# The virtualenv is made from Debian's interpreter (the python3 package above), not from whichever
# python3 comes first on PATH (pyenv, conda, a source build): Debian builds it with profile-guided
# and link-time optimisation, and the server and the SDK spend most of a call in the interpreter
# (about 15% less CPU a call than a plain source build of 3.11: bench/README.md, Round 7).
# SHOAL_PYTHON picks another one. A venv made from another interpreter is made again.
PYTHON=${SHOAL_PYTHON:-/usr/bin/python3}
stamp=.venv/.shoal-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(readlink -f "$PYTHON") $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing shoal and its Python packages into .venv ($PYTHON)"
  "$PYTHON" -m venv --clear .venv
  .venv/bin/pip install -q --disable-pip-version-check -e '.[server,test]'
  echo "$want" > "$stamp"
fi

# The in-sandbox agent: a static binary built from src/shoal/server/agent (the server also builds
# it when its sources change).
.venv/bin/python -c "from shoal.server.agent import ensure_built; ensure_built()"
