#!/usr/bin/env bash
# Courier bootstrap: everything `make run` and `make test` need on a fresh Debian/Ubuntu machine.
#
#   scripts/bootstrap.sh [--no-sync] [--services-only] [-h|--help]
#
#   1. uv          found on PATH / ~/.local/bin / pyenv shims, else installed from PyPI with pip
#                  (or apt's pipx). Never curls an installer script.
#   2. uv sync     `uv sync --locked --all-packages` in the repo root (skipped by --no-sync).
#   3. services    RabbitMQ (+ management and prometheus plugins) and Redis answering on
#                  127.0.0.1: started if installed but stopped, installed with apt if missing.
#                  A service that is already running is never stopped or restarted.
#   4. tools       promtool and prometheus (Debian package prometheus, installed with apt if
#                  missing; never started as a daemon): metric lint, rule tests, live chain.
#                  kubectl (kustomize built in; the overlay tests render with it): installed
#                  with apt when an apt source offers it, else a failure under CI and a
#                  warning otherwise (Debian's own archive has no kubectl).
#                  debootstrap (apt if missing): the fault harness builds a Debian 13 root with
#                  RabbitMQ 4.0 from it once (courier_testing/rabbitmq4.py; cached outside the repo).
#                  chromium (apt if missing): the console tests drive it with Playwright
#                  (tests/console; never `playwright install`, which downloads a browser).
#
# Options:
#   --no-sync        skip step 2
#   --services-only  only step 3
# Environment:
#   COURIER_RABBITMQ_PORT        AMQP port (default 5672)
#   COURIER_REDIS_PORT           Redis port (default 6379)
#   COURIER_RABBITMQ_MGMT_PORT   management API port (default 15672)
#   COURIER_RABBITMQ_PROM_PORT   prometheus port (default 15692)
#   COURIER_SYNC_ARGS            extra `uv sync --locked` args (default "--all-packages")
#   COURIER_BOOTSTRAP_QUIET=1    print only changes and errors
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)

RABBITMQ_PORT=${COURIER_RABBITMQ_PORT:-5672}
REDIS_PORT=${COURIER_REDIS_PORT:-6379}
MGMT_PORT=${COURIER_RABBITMQ_MGMT_PORT:-15672}
PROM_PORT=${COURIER_RABBITMQ_PROM_PORT:-15692}
QUIET=${COURIER_BOOTSTRAP_QUIET:-0}
RABBITMQ_WAIT=60
REDIS_WAIT=15
MGMT_WAIT=60
PLUGINS=(rabbitmq_management rabbitmq_prometheus)

DO_UV=1
DO_SYNC=1
DO_TOOLS=1
APT_UPDATED=0
UV=""
TMP_DIR=""

# ---------------------------------------------------------------------------------------------
# output

say() { printf 'bootstrap: %s\n' "$*"; }                  # a change: always shown
info() { [[ $QUIET == 1 ]] || say "$@"; }                # no change: hidden when quiet
warn() { printf 'bootstrap: warning: %s\n' "$*" >&2; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

# Print the last lines of a log file to stderr, indented, to explain a failure.
show_tail() {
    local file=$1 lines=${2:-15}
    [[ -s $file ]] || return 0
    tail -n "$lines" -- "$file" | sed 's/^/bootstrap:   | /' >&2
}

usage() {
    sed -n '2,/^set -euo pipefail/{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

now() { printf '%s' "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# Called in $(...) subshells, so TMP_DIR is created up front in main.
tmpfile() { mktemp "$TMP_DIR/log.XXXXXX"; }

cleanup() { if [[ -n $TMP_DIR ]]; then rm -rf -- "$TMP_DIR"; fi; }
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# helpers

have() { command -v "$1" >/dev/null 2>&1; }

# Run a command as root: directly when root, with sudo otherwise.
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif have sudo; then
        sudo "$@"
    else
        die "'$*' needs root: run as root or install sudo"
    fi
}

require_root_or_sudo() {
    [[ $EUID -eq 0 ]] || have sudo || die "$1 needs root, and sudo is not installed: re-run as root"
}

# find_exe NAME: print the path of NAME from PATH, /usr/sbin, /usr/bin or /usr/local/sbin.
find_exe() {
    local name=$1 dir
    if have "$name"; then command -v "$name"; return 0; fi
    for dir in /usr/sbin /usr/bin /usr/local/sbin /sbin; do
        if [[ -x $dir/$name ]]; then printf '%s\n' "$dir/$name"; return 0; fi
    done
    return 1
}

# port_open PORT: does something accept TCP connections on 127.0.0.1:PORT?
# shellcheck disable=SC2016 # $1 is expanded by the inner bash
port_open() {
    if have timeout; then
        timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
    else
        bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
    fi
}

# wait_port PORT SECONDS: poll until the port answers; fails after SECONDS.
wait_port() {
    local port=$1 deadline=$((SECONDS + $2))
    until port_open "$port"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# http_status URL [USER:PASSWORD]: print the HTTP status code, 000 when nothing answers.
http_status() {
    local url=$1 auth=${2:-}
    if have curl; then
        local args=(-s -o /dev/null -m 5 -w '%{http_code}')
        [[ -z $auth ]] || args+=(-u "$auth")
        curl "${args[@]}" "$url" 2>/dev/null || true
    elif have python3; then
        python3 - "$url" "$auth" <<'PY' 2>/dev/null || printf '000'
import base64, sys, urllib.error, urllib.request
url, auth = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url)
if auth:
    req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
try:
    with urllib.request.urlopen(req, timeout=5) as resp:
        print(resp.status, end="")
except urllib.error.HTTPError as exc:
    print(exc.code, end="")
except Exception:
    print("000", end="")
PY
    else
        # Neither curl nor python3: the best we can do is check the port.
        local port=${url#*://*:}
        port=${port%%/*}
        if port_open "$port"; then printf '200'; else printf '000'; fi
    fi
}

# How services can be started here: systemd, sysv (a real init as PID 1) or none (containers).
init_kind() {
    if [[ -d /run/systemd/system ]] && have systemctl; then
        echo systemd
    elif [[ -r /proc/1/comm && $(</proc/1/comm) == init ]] && have service; then
        echo sysv
    else
        echo none
    fi
}

# start_managed UNIT: start through systemd / service(8); fails when there is no usable init.
start_managed() {
    local unit=$1 log
    log=$(tmpfile)
    case $(init_kind) in
        systemd)
            as_root systemctl start "$unit" >"$log" 2>&1 && return 0
            show_tail "$log" 5
            warn "'systemctl start $unit' failed, starting it directly"
            ;;
        sysv)
            [[ -x /etc/init.d/$unit ]] || return 1
            as_root service "$unit" start >"$log" 2>&1 && return 0
            show_tail "$log" 5
            warn "'service $unit start' failed, starting it directly"
            ;;
        *) ;;
    esac
    return 1
}

# apt_install PACKAGE WHAT [HINT]: HINT says what to do on a machine without apt.
apt_install() {
    local pkg=$1 what=$2 log
    local hint=${3:-"install RabbitMQ (with the rabbitmq_management and rabbitmq_prometheus plugins) and Redis, start them on 127.0.0.1:$RABBITMQ_PORT and 127.0.0.1:$REDIS_PORT, then re-run"}
    if ! have apt-get; then
        die "$what is not installed and this is not an apt (Debian/Ubuntu) system: $hint"
    fi
    require_root_or_sudo "installing $pkg with apt"
    log=$(tmpfile)
    if [[ $APT_UPDATED == 0 ]]; then
        info "apt: apt-get update"
        if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1; then
            show_tail "$log"
            die "apt-get update failed"
        fi
        APT_UPDATED=1
    fi
    info "apt: installing $pkg"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "$pkg" >"$log" 2>&1; then
        show_tail "$log"
        die "apt-get install $pkg failed"
    fi
}

pkg_version() {
    if have dpkg-query; then
        dpkg-query -W -f='${Version}' "$1" 2>/dev/null || printf 'unknown'
    else
        printf 'unknown'
    fi
}

# ---------------------------------------------------------------------------------------------
# step 1: uv

# Is there a working uv on PATH or in the usual user install places? Sets UV.
find_uv() {
    local cand dir
    local -a dirs=()
    if cand=$(command -v uv 2>/dev/null) && "$cand" --version >/dev/null 2>&1; then
        UV=$cand
        return 0
    fi
    [[ -z ${HOME:-} ]] || dirs+=("$HOME/.local/bin")
    dirs+=("${PYENV_ROOT:-${HOME:-/root}/.pyenv}/shims")
    if have python3; then
        dir=$(python3 -c 'import site; print(site.getuserbase() + "/bin")' 2>/dev/null) || true
        [[ -z $dir ]] || dirs+=("$dir")
        dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null) || true
        [[ -z $dir ]] || dirs+=("$dir")
    fi
    for dir in "${dirs[@]}"; do
        if [[ -x $dir/uv ]] && "$dir/uv" --version >/dev/null 2>&1; then
            UV=$dir/uv
            export PATH="$dir:$PATH"
            return 0
        fi
    done
    return 1
}

uv_version() { "$UV" --version 2>/dev/null | awk '{ print $2 }'; }

path_note() {
    local dir
    dir=$(dirname -- "$UV")
    case ":$ORIG_PATH:" in
        *":$dir:"*) ;;
        *) warn "uv is in $dir, which is not on your PATH; add it: export PATH=\"$dir:\$PATH\"" ;;
    esac
}

# pip_try LOG DESCRIPTION CMD...: run one pip install attempt, remember how uv was installed.
pip_try() {
    local log=$1 how=$2
    shift 2
    if "$@" >"$log" 2>&1; then
        UV_HOW=$how
        return 0
    fi
    return 1
}

install_uv() {
    local log pipq=(--disable-pip-version-check --no-input -q)
    log=$(tmpfile)
    UV_HOW=""
    # 1. python3 -m pip install --user uv (PEP 668 -> --break-system-packages; venv -> no --user)
    if have python3 && python3 -m pip --version >/dev/null 2>&1; then
        if ! pip_try "$log" "pip (python3 -m pip install --user)" \
            python3 -m pip install "${pipq[@]}" --user uv; then
            if grep -qi 'externally-managed' "$log"; then
                pip_try "$log" "pip (python3 -m pip install --break-system-packages --user)" \
                    python3 -m pip install "${pipq[@]}" --break-system-packages --user uv || true
            else
                pip_try "$log" "pip (python3 -m pip install)" \
                    python3 -m pip install "${pipq[@]}" uv || true
            fi
        fi
    fi
    # 2. a plain `pip`
    if [[ -z $UV_HOW ]] && have pip; then
        if ! pip_try "$log" "pip (pip install)" pip install "${pipq[@]}" uv; then
            if grep -qi 'externally-managed' "$log"; then
                pip_try "$log" "pip (pip install --break-system-packages --user)" \
                    pip install "${pipq[@]}" --break-system-packages --user uv || true
            fi
        fi
    fi
    # 3. pipx, from apt when missing (also brings python3 to a bare machine)
    if [[ -z $UV_HOW ]]; then
        if ! have pipx && have apt-get && { [[ $EUID -eq 0 ]] || have sudo; }; then
            apt_install pipx "pipx"
        fi
        if have pipx; then
            pip_try "$log" "pipx (pipx install uv)" pipx install uv || true
        fi
    fi
    if [[ -z $UV_HOW ]]; then
        show_tail "$log"
        die "could not install uv from PyPI: tried python3 -m pip, pip and pipx; install uv and re-run"
    fi
    if have pyenv; then pyenv rehash >/dev/null 2>&1 || true; fi
    hash -r
    find_uv || die "uv was installed with $UV_HOW but no working uv is on PATH, in ~/.local/bin or in the pyenv shims"
}

ensure_uv() {
    if find_uv; then
        info "uv: found $(uv_version) ($UV)"
    else
        install_uv
        say "uv: installed $(uv_version) via $UV_HOW ($UV)"
    fi
    path_note
}

# ---------------------------------------------------------------------------------------------
# step 2: uv sync

sync_workspace() {
    local -a args=()
    local log t0 n_inst n_rm n_chk hint="" cmd
    read -r -a args <<<"${COURIER_SYNC_ARGS---all-packages}"
    cmd="uv sync --locked${args[*]:+ ${args[*]}}"
    [[ -f $REPO_ROOT/uv.lock ]] || die "sync: $REPO_ROOT/uv.lock is missing: run 'uv lock' and commit it"
    log=$(tmpfile)
    t0=$(now)
    if ! "$UV" sync --locked ${args[@]+"${args[@]}"} >"$log" 2>&1; then
        show_tail "$log"
        if grep -qi 'needs to be updated' "$log"; then
            hint=": uv.lock is out of date with pyproject.toml; run 'uv lock' and commit it"
        elif grep -qi 'no interpreter found' "$log"; then
            hint=": no suitable Python (the workspace needs 3.11); install python3.11 or let uv download one"
        fi
        die "sync: $cmd failed$hint"
    fi
    n_inst=$(grep -oE '^ *Installed [0-9]+ package' "$log" | grep -oE '[0-9]+' | head -n1) || true
    n_rm=$(grep -oE '^ *Uninstalled [0-9]+ package' "$log" | grep -oE '[0-9]+' | head -n1) || true
    n_chk=$(grep -oE '^ *(Checked|Audited) [0-9]+ package' "$log" | grep -oE '[0-9]+' | head -n1) || true
    if [[ -n $n_inst || -n $n_rm ]]; then
        say "sync: $cmd: installed ${n_inst:-0}, removed ${n_rm:-0} package(s) in .venv ($(elapsed "$t0"))"
    else
        info "sync: $cmd: ${n_chk:-all} packages already in sync ($(elapsed "$t0"))"
    fi
}

# ---------------------------------------------------------------------------------------------
# step 3: services

start_rabbitmq() {
    local server=$1 log
    log=$(tmpfile)
    require_root_or_sudo "rabbitmq: starting rabbitmq-server"
    if [[ $RABBITMQ_PORT != 5672 ]]; then
        warn "rabbitmq: COURIER_RABBITMQ_PORT=$RABBITMQ_PORT: the node must be configured to listen there"
    fi
    if ! start_managed rabbitmq-server; then
        # A failure here may only mean a start is already under way (e.g. by the package's
        # postinst): the port decides.
        if ! as_root "$server" -detached >"$log" 2>&1; then
            warn "rabbitmq: '$server -detached' exited non-zero, waiting for the port anyway"
        fi
    fi
    if ! wait_port "$RABBITMQ_PORT" "$RABBITMQ_WAIT"; then
        show_tail "$log"
        die "rabbitmq: started, but 127.0.0.1:$RABBITMQ_PORT did not answer within ${RABBITMQ_WAIT}s (see /var/log/rabbitmq/)"
    fi
}

ensure_rabbitmq() {
    local server
    if port_open "$RABBITMQ_PORT"; then
        info "rabbitmq: running on 127.0.0.1:$RABBITMQ_PORT"
    elif server=$(find_exe rabbitmq-server); then
        start_rabbitmq "$server"
        say "rabbitmq: was stopped, started it (127.0.0.1:$RABBITMQ_PORT)"
    else
        apt_install rabbitmq-server "rabbitmq-server"
        server=$(find_exe rabbitmq-server) || die "rabbitmq: apt installed rabbitmq-server but rabbitmq-server is not found"
        if wait_port "$RABBITMQ_PORT" 5; then
            say "rabbitmq: not installed, installed rabbitmq-server $(pkg_version rabbitmq-server) with apt (the package started it)"
        else
            start_rabbitmq "$server"
            say "rabbitmq: not installed, installed rabbitmq-server $(pkg_version rabbitmq-server) with apt and started it"
        fi
    fi
    ensure_rabbitmq_plugins
}

mgmt_url() { printf 'http://127.0.0.1:%s/api/overview' "$MGMT_PORT"; }
prom_url() { printf 'http://127.0.0.1:%s/metrics' "$PROM_PORT"; }

plugins_answer() {
    [[ $(http_status "$(mgmt_url)" guest:guest) == 200 && $(http_status "$(prom_url)") == 200 ]]
}

ensure_rabbitmq_plugins() {
    local plugins_cmd log p code deadline
    local -a missing=()
    if plugins_answer; then
        info "rabbitmq: plugins ${PLUGINS[*]} enabled (management API answers on :$MGMT_PORT, prometheus on :$PROM_PORT)"
        return 0
    fi
    plugins_cmd=$(find_exe rabbitmq-plugins) ||
        die "rabbitmq: management API (:$MGMT_PORT) / prometheus (:$PROM_PORT) do not answer and rabbitmq-plugins is not installed here: enable ${PLUGINS[*]} on the broker"
    log=$(tmpfile)
    if ! as_root "$plugins_cmd" list -e -m >"$log" 2>&1; then
        show_tail "$log"
        die "rabbitmq: 'rabbitmq-plugins list -e' failed"
    fi
    for p in "${PLUGINS[@]}"; do
        grep -qx "$p" "$log" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        if ! as_root "$plugins_cmd" enable "${missing[@]}" >"$log" 2>&1; then
            show_tail "$log"
            die "rabbitmq: 'rabbitmq-plugins enable ${missing[*]}' failed"
        fi
        say "rabbitmq: plugins ${missing[*]} were not enabled, enabled them (online)"
    else
        info "rabbitmq: plugins ${PLUGINS[*]} already enabled, waiting for their ports"
    fi
    deadline=$((SECONDS + MGMT_WAIT))
    until plugins_answer; do
        if ((SECONDS >= deadline)); then
            code=$(http_status "$(mgmt_url)" guest:guest)
            case $code in
                401 | 403) die "rabbitmq: management API on :$MGMT_PORT rejects guest:guest (HTTP $code)" ;;
                200) die "rabbitmq: prometheus endpoint $(prom_url) did not answer within ${MGMT_WAIT}s" ;;
                *) die "rabbitmq: management API $(mgmt_url) did not answer within ${MGMT_WAIT}s (HTTP $code)" ;;
            esac
        fi
        sleep 1
    done
    say "rabbitmq: management API answers on http://127.0.0.1:$MGMT_PORT (guest:guest), prometheus on :$PROM_PORT"
}

# start_redis_direct SERVER: daemonize redis-server on 127.0.0.1 (and ::1 when there is one).
start_redis_direct() {
    local server=$1 logfile pidfile log size binds deadline
    local -a extra=()
    require_root_or_sudo "redis: starting redis-server"
    as_root mkdir -p /var/lib/redis /var/log/redis
    if [[ $REDIS_PORT == 6379 ]]; then
        logfile=/var/log/redis/ci.log
    else
        logfile=/var/log/redis/ci-$REDIS_PORT.log
        pidfile=/var/run/redis-$REDIS_PORT.pid
        extra=(--pidfile "$pidfile")
    fi
    binds=("127.0.0.1")
    if [[ -r /proc/net/if_inet6 ]] && grep -qE '^0{31}1 ' /proc/net/if_inet6; then
        binds=("127.0.0.1 -::1" "127.0.0.1")
    fi
    log=$(tmpfile)
    local bind
    for bind in "${binds[@]}"; do
        size=$(as_root stat -c %s "$logfile" 2>/dev/null || echo 0)
        if ! as_root "$server" --daemonize yes --bind "$bind" --port "$REDIS_PORT" \
            --save "" --appendonly no --dir /var/lib/redis --logfile "$logfile" \
            ${extra[@]+"${extra[@]}"} >"$log" 2>&1; then
            show_tail "$log"
            die "redis: '$server --daemonize yes ...' failed"
        fi
        deadline=$((SECONDS + REDIS_WAIT))
        until port_open "$REDIS_PORT"; do
            if as_root tail -c +"$((size + 1))" "$logfile" 2>/dev/null |
                grep -q 'Could not create server TCP listening socket'; then
                break
            fi
            if ((SECONDS >= deadline)); then
                as_root tail -n 10 "$logfile" 2>/dev/null | sed 's/^/bootstrap:   | /' >&2 || true
                die "redis: started, but 127.0.0.1:$REDIS_PORT did not answer within ${REDIS_WAIT}s (see $logfile)"
            fi
            sleep 0.2
        done
        if port_open "$REDIS_PORT"; then return 0; fi
        info "redis: could not bind '$bind', retrying on 127.0.0.1 only"
    done
    as_root tail -n 10 "$logfile" 2>/dev/null | sed 's/^/bootstrap:   | /' >&2 || true
    die "redis: could not listen on 127.0.0.1:$REDIS_PORT (see $logfile)"
}

start_redis() {
    local server=$1
    # The packaged service listens on the port of /etc/redis/redis.conf (6379): use it only then.
    if [[ $REDIS_PORT == 6379 ]] && start_managed redis-server && wait_port "$REDIS_PORT" "$REDIS_WAIT"; then
        return 0
    fi
    start_redis_direct "$server"
}

ensure_redis() {
    local server
    if port_open "$REDIS_PORT"; then
        info "redis: running on 127.0.0.1:$REDIS_PORT"
    elif server=$(find_exe redis-server); then
        start_redis "$server"
        say "redis: was stopped, started it (127.0.0.1:$REDIS_PORT)"
    else
        apt_install redis-server "redis-server"
        server=$(find_exe redis-server) || die "redis: apt installed redis-server but redis-server is not found"
        if wait_port "$REDIS_PORT" 3; then
            say "redis: not installed, installed redis-server $(pkg_version redis-server) with apt (the package started it)"
        else
            start_redis "$server"
            say "redis: not installed, installed redis-server $(pkg_version redis-server) with apt and started it"
        fi
    fi
}

# ---------------------------------------------------------------------------------------------
# prometheus: promtool lints /metrics and unit-tests the alert rules; the live-chain test runs
# its own prometheus server on a free port. Nothing here starts a Prometheus daemon.

ensure_prometheus() {
    if have promtool && have prometheus; then
        info "prometheus: promtool and prometheus $(pkg_version prometheus) present"
        return
    fi
    apt_install prometheus "prometheus (promtool)" \
        "install Prometheus so that promtool and prometheus are on PATH, then re-run"
    have promtool || die "prometheus: apt installed prometheus but promtool is not on PATH"
    say "prometheus: not installed, installed prometheus $(pkg_version prometheus) with apt" \
        "(for promtool and the live-chain test; the tests start their own server)"
}

# kubectl renders k8s/overlays in tests/deploy (`kubectl kustomize`).
ensure_kubectl() {
    local candidate
    if have kubectl; then
        info "kubectl: $(kubectl version --client 2>/dev/null | head -n 1) present"
        return
    fi
    candidate=$(apt-cache policy kubectl 2>/dev/null | awk '/Candidate:/ { print $2 }')
    if [[ -n $candidate && $candidate != "(none)" ]]; then
        apt_install kubectl "kubectl" "install kubectl (v1.27+, kustomize built in), then re-run"
        say "kubectl: not installed, installed kubectl $(pkg_version kubectl) with apt"
        return
    fi
    local message="kubectl is not installed and no apt source offers it: install kubectl (v1.27+, kustomize built in; https://kubernetes.io/docs/tasks/tools/) — the overlay tests render k8s/overlays with it"
    if [[ -n ${CI:-} ]]; then
        die "$message"
    fi
    warn "$message"
}

# debootstrap: courier_testing/rabbitmq4.py builds the RabbitMQ 4 root with it (once, cached in
# ${XDG_CACHE_HOME:-~/.cache}/courier). Only installed here; the tests build the root.
ensure_debootstrap() {
    if have debootstrap || [[ -x /usr/sbin/debootstrap ]]; then
        info "debootstrap: present (for the RabbitMQ 4 test root)"
        return
    fi
    apt_install debootstrap "debootstrap" \
        "install debootstrap (the fault suite builds a Debian 13 root with RabbitMQ 4 from it), then re-run"
    say "debootstrap: not installed, installed $(pkg_version debootstrap) with apt (for the RabbitMQ 4 test root)"
}

# chromium: tests/console drives Debian's browser with Playwright's Python package.
ensure_chromium() {
    if have chromium || [[ -x /usr/bin/chromium ]]; then
        info "chromium: present (for the console tests)"
        return
    fi
    apt_install chromium "chromium" \
        "install Chromium at /usr/bin/chromium (or point COURIER_TEST_CHROMIUM at one; the console tests drive it), then re-run"
    say "chromium: not installed, installed $(pkg_version chromium) with apt (for the console tests)"
}

# The official AsyncAPI JSON Schemas (npm @asyncapi/specs, pinned in tests/contract/package-lock.json):
# the tests validate docs/asyncapi.yaml and user-service's /asyncapi.json against them.
ensure_asyncapi_specs() {
    local dir=tests/contract schema=tests/contract/node_modules/@asyncapi/specs/schemas/3.0.0-without-\$id.json log
    if [[ -f $schema && $dir/node_modules/.package-lock.json -nt $dir/package-lock.json ]]; then
        info "asyncapi: @asyncapi/specs present in $dir/node_modules (validates docs/asyncapi.yaml)"
        return
    fi
    if ! have npm; then
        apt_install npm "npm" "install Node.js and npm (the tests validate the AsyncAPI document with the npm package @asyncapi/specs), then re-run"
    fi
    log=$(tmpfile)
    if ! npm ci --prefix "$dir" --no-audit --no-fund >"$log" 2>&1; then
        show_tail "$log"
        die "asyncapi: npm ci in $dir failed (the npm registry must be reachable once)"
    fi
    say "asyncapi: installed @asyncapi/specs $(node -p "require('./$dir/node_modules/@asyncapi/specs/package.json').version" 2>/dev/null) in $dir/node_modules with npm ci (the AsyncAPI 3.0 schema the tests validate against)"
}

# ---------------------------------------------------------------------------------------------
# main

main() {
    local arg t0 port
    t0=$(now)
    ORIG_PATH=$PATH
    for arg in "$@"; do
        case $arg in
            --no-sync) DO_SYNC=0 ;;
            --services-only) DO_UV=0 DO_SYNC=0 DO_TOOLS=0 ;;
            -h | --help) usage; exit 0 ;;
            *) die "unknown option '$arg' (usage: $0 [--no-sync] [--services-only] [--help])" ;;
        esac
    done
    for port in "RABBITMQ_PORT=$RABBITMQ_PORT" "REDIS_PORT=$REDIS_PORT" \
        "RABBITMQ_MGMT_PORT=$MGMT_PORT" "RABBITMQ_PROM_PORT=$PROM_PORT"; do
        if ! [[ ${port#*=} =~ ^[0-9]+$ ]] || ((${port#*=} < 1 || ${port#*=} > 65535)); then
            die "invalid port COURIER_$port"
        fi
    done
    cd -- "$REPO_ROOT"
    TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/courier-bootstrap.XXXXXX")

    if ((DO_UV)); then ensure_uv; fi
    if ((DO_SYNC)); then sync_workspace; fi
    ensure_rabbitmq
    ensure_redis
    if ((DO_TOOLS)); then
        ensure_prometheus
        ensure_kubectl
        ensure_debootstrap
        ensure_chromium
        ensure_asyncapi_specs
    fi
    info "ready ($(elapsed "$t0"))"
}

main "$@"
