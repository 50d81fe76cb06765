# Sourced by scripts/demo and scripts/test: make sure the system parts exist, then .venv.
# Usage: bootstrap_system PACKAGE_FOR_COMMAND...   (pairs "command:debian-package")
set -euo pipefail

bootstrap_system() {
  local missing=()
  python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
  local pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  ((${#missing[@]} == 0)) && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "spear: missing system packages: run: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "spear: installing ${missing[*]} with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

bootstrap_venv() {
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # Skip pip when this very pyproject.toml was installed with these extras already.
  local stamp=".venv/.spear-installed" want
  want="$1 $(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; then
    return 0
  fi
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e "$1"
  echo "$want" >> "$stamp"
}

# The private Docker daemon of the tests (scripts/dockerd): start it unless one is up already,
# build the test images, export DOCKER_HOST. A daemon started here is stopped when the calling
# script exits (also on failure or Ctrl-C); one that was already running is left alone. Not
# root, no apt: a note, and the docker tests skip (they fail under CI=true).
bootstrap_docker() {
  if ! scripts/dockerd status; then
    trap 'scripts/dockerd stop' EXIT
    trap 'exit 130' INT TERM
    scripts/dockerd start || true
  fi
  if scripts/dockerd status && scripts/dockerd images; then
    eval "$(scripts/dockerd env)"
  else
    echo "spear: no Docker daemon; the docker tests will skip (they fail under CI=true)" >&2
  fi
}
