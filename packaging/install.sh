#!/usr/bin/env bash
# Install Dirigo as a systemd service on Debian/Ubuntu (run as root from a checkout or an
# unpacked source release):
#
#   sudo packaging/install.sh            # install or upgrade
#   sudo packaging/install.sh --root DIR # stage the same layout under DIR (no user, no systemctl)
#
# Layout: /opt/dirigo/venv (the agent and its dependencies), /etc/dirigo/config.yaml (kept on
# upgrade; first install copies conf.example.yaml for you to edit), /var/lib/dirigo (data_dir,
# owned by the `dirigo` system user), /etc/systemd/system/dirigo.service.
set -euo pipefail

root=""
if [[ "${1:-}" == "--root" ]]; then
    root="${2:?--root needs a directory}"
fi
source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"

step() { printf '==> %s\n' "$*"; }

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "Dirigo needs Python 3.11 or newer ($python is older)" >&2; exit 1; }

if [[ -z "$root" ]]; then
    [[ $EUID -eq 0 ]] || { echo "run as root (or use --root DIR to stage)" >&2; exit 1; }
    if ! id dirigo >/dev/null 2>&1; then
        step "creating system user dirigo"
        useradd --system --home-dir /var/lib/dirigo --shell /usr/sbin/nologin dirigo
    fi
fi

step "installing the agent into $root/opt/dirigo/venv"
"$python" -m venv "$root/opt/dirigo/venv"
"$root/opt/dirigo/venv/bin/python" -m pip install --quiet --upgrade "$source_dir"

step "configuration in $root/etc/dirigo"
install -d -m 0755 "$root/etc/dirigo"
if [[ ! -e "$root/etc/dirigo/config.yaml" ]]; then
    install -m 0640 "$source_dir/conf.example.yaml" "$root/etc/dirigo/config.yaml"
    echo "    edit $root/etc/dirigo/config.yaml (site, cloud, dicom.peers) before starting"
else
    echo "    keeping the existing config.yaml"
fi

step "data directory $root/var/lib/dirigo"
install -d -m 0700 "$root/var/lib/dirigo"

step "systemd unit"
install -d "$root/etc/systemd/system"
install -m 0644 "$source_dir/systemd/dirigo.service" "$root/etc/systemd/system/dirigo.service"

if [[ -z "$root" ]]; then
    chown -R dirigo:dirigo /var/lib/dirigo
    chgrp dirigo /etc/dirigo/config.yaml
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
        echo "    start with: systemctl enable --now dirigo"
    fi
fi
step "done: $("$root/opt/dirigo/venv/bin/dirigo" --version)"
