# shellcheck shell=bash
# Shared helpers for the vdbfs scripts. Source it, do not run it:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# What it gives:
#   messages     say, step, warn, die
#   deps         ensure_deps (apt packages, /dev/fuse, rust toolchain), require_root
#   cleanup      guard_init, guard_push KEY CMD..., guard_drop KEY  (LIFO, run on EXIT)
#   postgres     PGBIN, pg_free_port, pg_initdb, pg_start, pg_stop, pg_psql, pg_bench
#   vdbfs        VDBFS_BIN, vdbfs_cmd, vdbfs_start_daemon, vdbfs_stop_daemon,
#                vdbfs_mount, vdbfs_umount
#   sources      vdbfs_source_link, vdbfs_source_note_staging, vdbfs_source_unlink
#   VDBs         vdbfs_vdb_create, vdbfs_vdb_note, vdbfs_vdb_delete, pg_psql_conn
#   misc         lsn_num, safe_rm_tree, show_log_tail
#
# Every helper that starts something (a postgres server, a daemon, a mount) registers how to undo
# it with the guard, so an error anywhere (set -e) or ^C still leaves the machine clean. Servers are
# stopped by their own PID or data directory, never by process name.

if [[ -n "${_VDBFS_LIB_LOADED:-}" ]]; then
    return 0
fi
_VDBFS_LIB_LOADED=1

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
VDBFS_BIN="${VDBFS_BIN:-$REPO_ROOT/target/release/vdbfs}"
# Bounded waits (seconds).
PG_START_TIMEOUT="${PG_START_TIMEOUT:-120}"
PG_STOP_TIMEOUT="${PG_STOP_TIMEOUT:-60}"
VDBFS_READY_TIMEOUT="${VDBFS_READY_TIMEOUT:-30}"
VDBFS_STOP_TIMEOUT="${VDBFS_STOP_TIMEOUT:-60}"

# ---------------------------------------------------------------------------------------------
# messages

if [[ -t 1 ]]; then
    _C_BOLD=$'\e[1m' _C_RED=$'\e[31m' _C_YEL=$'\e[33m' _C_GRN=$'\e[32m' _C_OFF=$'\e[0m'
else
    _C_BOLD='' _C_RED='' _C_YEL='' _C_GRN='' _C_OFF=''
fi

say() { printf '%s\n' "$*"; }
step() { printf '\n%s==> %s%s\n' "$_C_BOLD" "$*" "$_C_OFF"; }
ok() { printf '%s    ok: %s%s\n' "$_C_GRN" "$*" "$_C_OFF"; }
warn() { printf '%swarning: %s%s\n' "$_C_YEL" "$*" "$_C_OFF" >&2; }
die() {
    printf '%serror: %s%s\n' "$_C_RED" "$*" "$_C_OFF" >&2
    exit 1
}

# Print the last lines of a log file, indented, to stderr (used when something failed).
show_log_tail() {
    local file=$1 lines=${2:-40}
    if [[ -s "$file" ]]; then
        printf -- '---- last %s lines of %s ----\n' "$lines" "$file" >&2
        tail -n "$lines" "$file" | sed 's/^/    /' >&2
        printf -- '---- end of %s ----\n' "$file" >&2
    else
        printf -- '---- %s is empty or missing ----\n' "$file" >&2
    fi
}

require_root() {
    [[ "$(id -u)" -eq 0 ]] || die "$1 must run as root (it mounts FUSE filesystems and installs packages); try: sudo $0"
}

# ---------------------------------------------------------------------------------------------
# dependencies

# Which Debian 12 package provides what we need (checked with dpkg -S on bookworm):
#   fuse3                 /usr/bin/fusermount3, /sbin/mount.fuse3
#   postgresql-15         postgres, initdb, pg_ctl, pgbench, pg_test_fsync, contrib extensions
#                         (amcheck, ...). It also provides the virtual postgresql-contrib-15.
#   postgresql-client-15  psql, pg_amcheck, pg_isready, pg_basebackup
#   jq                    /usr/bin/jq (scripts read `vdbfs ... --json` with it)
#   e2fsprogs             /sbin/mkfs.ext4 (the full-disk test makes a small loop-mounted ext4)
#   chromium              /usr/bin/chromium (the web page's test drives it headless)
_DEP_FILES=(
    "fuse3:/usr/bin/fusermount3"
    "fuse3:/sbin/mount.fuse3"
    "postgresql-15:$PGBIN/postgres"
    "postgresql-15:$PGBIN/initdb"
    "postgresql-15:$PGBIN/pg_ctl"
    "postgresql-15:$PGBIN/pgbench"
    "postgresql-15:$PGBIN/pg_test_fsync"
    "postgresql-15:/usr/share/postgresql/15/extension/amcheck.control"
    "postgresql-client-15:$PGBIN/psql"
    "postgresql-client-15:$PGBIN/pg_amcheck"
    "postgresql-client-15:$PGBIN/pg_basebackup"
    "jq:/usr/bin/jq"
    "e2fsprogs:/sbin/mkfs.ext4"
    "chromium:/usr/bin/chromium"
)
_APT_UPDATED=""

_apt_install() {
    require_root "installing packages ($*)"
    command -v apt-get >/dev/null || die "apt-get not found: install $* by hand (this script knows Debian 12)"
    if [[ -z "$_APT_UPDATED" ]]; then
        say "    apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null ||
            die "apt-get update failed (no access to the Debian mirror?)"
        _APT_UPDATED=1
    fi
    say "    apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" ||
        die "apt-get install $* failed"
}

ensure_deps() {
    step "Checking dependencies (fuse3, PostgreSQL 15, jq, /dev/fuse, rust toolchain)"
    local entry pkg file missing=()
    for entry in "${_DEP_FILES[@]}"; do
        pkg=${entry%%:*} file=${entry#*:}
        if [[ ! -e "$file" ]] && [[ " ${missing[*]} " != *" $pkg "* ]]; then
            missing+=("$pkg")
        fi
    done
    # util-linux (runuser, findmnt, mountpoint) and procps are Essential/standard on Debian, but a
    # minimal container may lack procps.
    command -v runuser >/dev/null || missing+=(util-linux)
    command -v findmnt >/dev/null || missing+=(util-linux)
    if ((${#missing[@]})); then
        say "    missing packages: ${missing[*]}"
        _apt_install "${missing[@]}"
    fi
    for entry in "${_DEP_FILES[@]}"; do
        file=${entry#*:}
        [[ -e "$file" ]] || die "$file still missing after installing ${entry%%:*}"
    done
    id postgres >/dev/null 2>&1 || die "OS user 'postgres' does not exist (postgresql-common should have created it)"
    ok "packages: fuse3, postgresql-15, postgresql-client-15, jq, e2fsprogs, chromium (PGBIN=$PGBIN)"

    if [[ ! -c /dev/fuse ]]; then
        modprobe fuse 2>/dev/null || true
    fi
    [[ -c /dev/fuse ]] || die "/dev/fuse is missing: this machine (or container) cannot mount FUSE filesystems.
       Load the module (modprobe fuse) or run the container with --device /dev/fuse --cap-add SYS_ADMIN."
    ok "/dev/fuse present"

    ensure_rust
}

# Garage, the S3-compatible object store the remote tests and bench run on loopback. Upstream
# ships no binary through the package registries this project may use, so it is built from
# crates.io with the lightest feature set that runs a single node (lmdb metadata, bundled C
# libraries; no sqlite, k2v or metrics), once, into a stable path; reruns find it there.
GARAGE_VERSION="${GARAGE_VERSION:-2.5.0}"
GARAGE_ROOT="${GARAGE_ROOT:-/opt/vdbfs-tools/garage-$GARAGE_VERSION}"
GARAGE_BIN="${GARAGE_BIN:-$GARAGE_ROOT/bin/garage}"
export GARAGE_BIN

ensure_garage() {
    if [[ -x "$GARAGE_BIN" ]]; then
        ok "garage: $("$GARAGE_BIN" --version 2>/dev/null | head -1) ($GARAGE_BIN)"
        return 0
    fi
    say "    garage missing: cargo install garage $GARAGE_VERSION into $GARAGE_ROOT (41 minutes here on 2 shared cores, niced)"
    local start=$SECONDS
    CARGO_TARGET_DIR="${GARAGE_TARGET_DIR:-/var/tmp/vdbfs-garage-build}" \
        nice -n 19 cargo install garage --version "$GARAGE_VERSION" --locked \
        --no-default-features --features bundled-libs,lmdb --root "$GARAGE_ROOT" ||
        die "cargo install garage $GARAGE_VERSION failed"
    [[ -x "$GARAGE_BIN" ]] || die "$GARAGE_BIN missing after cargo install"
    ok "garage $GARAGE_VERSION built in $((SECONDS - start)) s ($GARAGE_BIN)"
}

ensure_rust() {
    if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null || die "cargo not found. Install a rust toolchain >= 1.85 with rustup
       (https://rustup.rs; Debian 12's rustc is too old), then re-run."
    local comp
    for comp in rustfmt clippy; do
        local probe=(cargo fmt --version)
        [[ $comp == clippy ]] && probe=(cargo clippy --version)
        if ! "${probe[@]}" >/dev/null 2>&1; then
            if command -v rustup >/dev/null; then
                say "    rustup component add $comp"
                rustup component add "$comp" || die "could not add the rust component $comp"
            else
                die "cargo has no $comp; install it (rustup component add $comp)"
            fi
        fi
    done
    ok "$(cargo --version), $(rustc --version | cut -d' ' -f1-2)"
}

# ---------------------------------------------------------------------------------------------
# cleanup guard: a LIFO stack of commands run on EXIT (also after ^C / SIGTERM).

_GUARD_KEYS=()
_GUARD_CMDS=()

guard_init() {
    trap '_guard_on_exit' EXIT
    trap 'warn "interrupted"; exit 130' INT
    trap 'warn "terminated"; exit 143' TERM
}

# guard_push KEY CMD [ARGS...]: run CMD ARGS on exit unless guard_drop KEY was called first.
guard_push() {
    local key=$1
    shift
    _GUARD_KEYS+=("$key")
    _GUARD_CMDS+=("$(printf '%q ' "$@")")
}

guard_drop() {
    local i
    for i in "${!_GUARD_KEYS[@]}"; do
        if [[ "${_GUARD_KEYS[$i]}" == "$1" ]]; then
            _GUARD_CMDS[i]=""
        fi
    done
}

_guard_on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    local i n=${#_GUARD_CMDS[@]} announced=""
    for ((i = n - 1; i >= 0; i--)); do
        [[ -n "${_GUARD_CMDS[$i]}" ]] || continue
        if [[ -z "$announced" ]]; then
            say "" >&2
            say "cleanup (exit status $rc):" >&2
            announced=1
        fi
        say "    ${_GUARD_KEYS[$i]}" >&2
        eval "${_GUARD_CMDS[$i]}"
        _GUARD_CMDS[i]=""
    done
    exit "$rc"
}

# ---------------------------------------------------------------------------------------------
# postgres (always as the OS user postgres; postgres refuses to run as root)

as_postgres() { runuser -u postgres -- "$@"; }

# Postmaster PID per data directory, read once it started: the guard can still kill it when the
# data directory (on a FUSE mount) no longer answers.
declare -gA _PG_PIDS=()

# A TCP port nobody listens on at 127.0.0.1 and with no unix socket in /tmp; starts at $1.
pg_free_port() {
    local port=${1:-54320}
    while ((port < 65000)); do
        if ! (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null &&
            [[ ! -e "/tmp/.s.PGSQL.$port" ]] && [[ ! -e "/tmp/.s.PGSQL.$port.lock" ]]; then
            echo "$port"
            return 0
        fi
        port=$((port + 1))
    done
    die "no free TCP port found"
}

# pg_initdb DATADIR: initdb with data checksums, as postgres, into a directory postgres can create.
pg_initdb() {
    local datadir=$1 log
    log="$(mktemp /tmp/vdbfs-initdb.XXXXXX.log)"
    chmod 0644 "$log"
    if ! as_postgres "$PGBIN/initdb" -k -D "$datadir" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$log" 2>&1; then
        show_log_tail "$log" 40
        die "initdb -k -D $datadir failed (output above)"
    fi
    rm -f "$log"
}

# pg_start DATADIR PORT SOCKDIR LOGFILE: start with pg_ctl -w (bounded wait); on failure print the
# server log tail. Listens on the unix socket in SOCKDIR only (listen_addresses=''), or on
# 127.0.0.1 too when PG_LISTEN=127.0.0.1. Extra settings: PG_OPTS="-c name=value ...".
# Registers "stop server DATADIR" with the guard (immediate stop, then SIGKILL of the postmaster).
pg_start() {
    local datadir=$1 port=$2 sockdir=$3 logfile=$4
    local listen=${PG_LISTEN:-}
    mkdir -p "$sockdir" "$(dirname "$logfile")"
    chown postgres: "$sockdir"
    touch "$logfile"
    chown postgres: "$logfile"
    guard_push "stop postgres $datadir" _pg_emergency_stop "$datadir"
    if ! as_postgres "$PGBIN/pg_ctl" -D "$datadir" -l "$logfile" -w -t "$PG_START_TIMEOUT" \
        -o "-p $port -k $sockdir -c listen_addresses='$listen' ${PG_OPTS:-}" start >/dev/null; then
        show_log_tail "$logfile" 40
        die "postgres did not start within ${PG_START_TIMEOUT}s (data directory $datadir, port $port, log $logfile)"
    fi
    _PG_PIDS[$datadir]=$(head -n1 "$datadir/postmaster.pid")
}

# pg_stop DATADIR [MODE]: clean stop (default fast), bounded; falls back to immediate.
pg_stop() {
    local datadir=$1 mode=${2:-fast}
    if as_postgres "$PGBIN/pg_ctl" -D "$datadir" -m "$mode" -w -t "$PG_STOP_TIMEOUT" stop >/dev/null; then
        guard_drop "stop postgres $datadir"
        return 0
    fi
    warn "pg_ctl -D $datadir stop -m $mode failed; stopping it the hard way"
    _pg_emergency_stop "$datadir"
    guard_drop "stop postgres $datadir"
    return 1
}

# pid_running PID: the process exists and is not a zombie. A postmaster that pg_ctl started is
# reparented to PID 1, and some inits (containers, microVMs) reap late: kill -0 alone would see
# an exited postmaster as running for a second or more.
pid_running() {
    local state
    state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n "$state" && "$state" != Z ]]
}

_pg_emergency_stop() {
    local datadir=$1 pid="" waited=0
    as_postgres "$PGBIN/pg_ctl" -D "$datadir" -m immediate -w -t 20 stop >/dev/null 2>&1 && return 0
    # pg_ctl found no postmaster.pid (the server was still starting, or the data directory no longer
    # answers): use the PID we recorded, else find the postmaster of exactly this data directory.
    pid=${_PG_PIDS[$datadir]:-}
    [[ -n "$pid" ]] || pid=$(head -n1 "$datadir/postmaster.pid" 2>/dev/null || true)
    [[ "$pid" =~ ^[0-9]+$ ]] || pid=$(_pg_find_postmaster "$datadir" || true)
    [[ "$pid" =~ ^[0-9]+$ ]] && pid_running "$pid" || return 0
    warn "sending SIGQUIT (immediate shutdown) to postmaster $pid ($datadir)"
    kill -QUIT "$pid" 2>/dev/null || true
    while pid_running "$pid" && ((waited < 100)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    if pid_running "$pid"; then
        warn "sending SIGKILL to postmaster $pid ($datadir)"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 1
    fi
}

# The PID of the postmaster started as "$PGBIN/postgres -D DATADIR ...", if any.
_pg_find_postmaster() {
    local datadir=$1 f i args=()
    for f in /proc/[0-9]*/cmdline; do
        mapfile -d '' -t args <"$f" 2>/dev/null || continue
        [[ "${args[0]:-}" == "$PGBIN/postgres" ]] || continue
        for ((i = 1; i + 1 < ${#args[@]}; i++)); do
            if [[ "${args[i]}" == -D ]] && [[ "${args[i + 1]}" == "$datadir" ]]; then
                f=${f#/proc/}
                echo "${f%/cmdline}"
                return 0
            fi
        done
    done
    return 1
}

# pg_psql SOCKDIR PORT [psql args...]: psql as postgres, stops on the first error.
pg_psql() {
    local sockdir=$1 port=$2
    shift 2
    as_postgres "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$sockdir" -p "$port" -U postgres "$@"
}

# pg_psql_conn CONNINFO [psql args...]: psql as the caller (root) with a libpq connection string,
# as a user would paste the one `vdbfs vdb create` prints; stops on the first error.
pg_psql_conn() {
    local conn=$1
    shift
    "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -d "$conn" "$@"
}

# lsn_num X/Y: an LSN as a number (for comparisons).
lsn_num() { echo $(((16#${1%/*} << 32) | 16#${1#*/})); }

# pg_bench SOCKDIR PORT [pgbench args...]
pg_bench() {
    local sockdir=$1 port=$2
    shift 2
    as_postgres "$PGBIN/pgbench" -h "$sockdir" -p "$port" -U postgres "$@"
}

# ---------------------------------------------------------------------------------------------
# vdbfs

# vdbfs_cmd STORE ARGS...: the CLI against one store.
vdbfs_cmd() {
    local store=$1
    shift
    "$VDBFS_BIN" --store "$store" "$@"
}

require_vdbfs_bin() {
    [[ -x "$VDBFS_BIN" ]] || die "$VDBFS_BIN not found or not executable; build it with: cargo build --release"
}

# vdbfs_start_daemon STORE LOGFILE: `vdbfs serve` in the background with a high fd limit; waits
# (bounded) until `vdbfs status` answers. Sets VDBFS_DAEMON_PID. Registers a SIGTERM stop.
vdbfs_start_daemon() {
    local store=$1 logfile=$2 waited=0
    mkdir -p "$(dirname "$logfile")"
    # postgres backends open hundreds of files each; the default 1024 fds is not enough.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    "$VDBFS_BIN" --store "$store" serve >>"$logfile" 2>&1 &
    VDBFS_DAEMON_PID=$!
    guard_push "stop vdbfs daemon $VDBFS_DAEMON_PID" vdbfs_stop_daemon "$VDBFS_DAEMON_PID" "$logfile"
    while ! vdbfs_cmd "$store" status >/dev/null 2>&1; do
        if ! kill -0 "$VDBFS_DAEMON_PID" 2>/dev/null; then
            show_log_tail "$logfile" 40
            die "vdbfs serve --store $store exited during startup (log $logfile)"
        fi
        if ((waited >= VDBFS_READY_TIMEOUT * 10)); then
            show_log_tail "$logfile" 40
            die "vdbfs serve --store $store did not answer 'vdbfs status' within ${VDBFS_READY_TIMEOUT}s (log $logfile)"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

# vdbfs_stop_daemon PID [LOGFILE]: SIGTERM (the daemon flushes and unmounts), bounded wait, then
# SIGKILL. Returns non-zero if the daemon did not exit cleanly with status 0.
vdbfs_stop_daemon() {
    local pid=$1 logfile=${2:-} waited=0 rc=0
    guard_drop "stop vdbfs daemon $pid"
    kill -0 "$pid" 2>/dev/null || {
        warn "vdbfs daemon $pid was already gone"
        return 1
    }
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= VDBFS_STOP_TIMEOUT * 10)); then
            warn "vdbfs daemon $pid did not exit within ${VDBFS_STOP_TIMEOUT}s of SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            [[ -n "$logfile" ]] && show_log_tail "$logfile" 30
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    wait "$pid" 2>/dev/null || rc=$?
    if ((rc != 0)); then
        warn "vdbfs daemon $pid exited with status $rc"
        [[ -n "$logfile" ]] && show_log_tail "$logfile" 30
    fi
    return "$rc"
}

# vdbfs_mount STORE DATASET MOUNTPOINT: registers an unmount with the guard.
vdbfs_mount() {
    local store=$1 dataset=$2 mnt=$3
    guard_push "unmount $mnt" _vdbfs_emergency_umount "$store" "$mnt"
    vdbfs_cmd "$store" mount "$dataset" "$mnt"
    mountpoint -q "$mnt" || die "vdbfs mount $dataset $mnt returned success but $mnt is not a mount point"
}

vdbfs_umount() {
    local store=$1 mnt=$2
    vdbfs_cmd "$store" umount "$mnt"
    guard_drop "unmount $mnt"
}

_vdbfs_emergency_umount() {
    local store=$1 mnt=$2
    local tries=0 err=""
    mountpoint -q "$mnt" 2>/dev/null || return 0
    # Processes that were just killed (postgres) may hold files there for a moment: retry, bounded.
    while ((tries < 20)); do
        err=$(vdbfs_cmd "$store" umount "$mnt" 2>&1 >/dev/null) && return 0
        mountpoint -q "$mnt" 2>/dev/null || return 0
        sleep 0.5
        tries=$((tries + 1))
    done
    warn "vdbfs umount $mnt failed ($err); detaching it with fusermount3 -u -z"
    fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
}

# Remove a directory tree made by a script, refusing to descend into anything still mounted.
safe_rm_tree() {
    local dir=$1
    [[ -e "$dir" ]] || return 0
    if findmnt -rn -o TARGET | awk -v d="$dir" '$0 == d || index($0, d "/") == 1 { f = 1 } END { exit !f }'; then
        warn "not removing $dir: something is still mounted under it"
        return 1
    fi
    rm -rf --one-file-system "$dir"
}

# ---------------------------------------------------------------------------------------------
# Postgres servers the daemon runs: staging standbys of sources (issue 4) and VDBs (issue 5). We
# record each one's PID and data directory (from `source status --json` / `vdb status --json`) so
# cleanup can check it is really gone after vdbfs stopped it, keyed "source:NAME" / "vdb:NAME".

declare -gA _DAEMON_PG_PID=() _DAEMON_PG_DATA=()

# _daemon_pg_note KEY PID DATADIR
_daemon_pg_note() {
    _DAEMON_PG_PID[$1]=$2
    _DAEMON_PG_DATA[$1]=$3
}

# _daemon_pg_down KEY: wait (bounded) for the recorded postmaster to exit; stop it here (and return
# 1 with a warning) if vdbfs left it running.
_daemon_pg_down() {
    local key=$1 waited=0
    local pid=${_DAEMON_PG_PID[$1]:-} data=${_DAEMON_PG_DATA[$1]:-}
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    while pid_running "$pid" && ((waited < 100)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    pid_running "$pid" || return 0
    warn "postgres $pid of ${key/:/ } still runs 10 s after vdbfs stopped it; stopping it"
    _PG_PIDS[$data]=$pid
    _pg_emergency_stop "$data"
    return 1
}

# ---------------------------------------------------------------------------------------------
# vdbfs sources (issue 4)

# vdbfs_source_link STORE NAME [link args...]: `vdbfs source link NAME ...`, its undo registered
# first: on exit, `source unlink NAME --force --delete-snapshots` while the source still runs (so its
# replication slot is dropped), then the staging postgres checked down. Output is the command's.
# Call it in the script's own shell (not inside $(...) or a pipeline), or the undo is lost.
vdbfs_source_link() {
    local store=$1 name=$2
    shift 2
    guard_push "unlink source $name" vdbfs_source_cleanup "$store" "$name" --force --delete-snapshots
    vdbfs_cmd "$store" source link "$name" "$@"
}

# vdbfs_source_note_staging NAME STATUS-JSON: remember the staging postmaster of NAME.
vdbfs_source_note_staging() {
    _daemon_pg_note "source:$1" "$(jq -r '.staging_pid // empty' <<<"$2")" "$(jq -r '.data_dir // empty' <<<"$2")"
}

# vdbfs_source_unlink STORE NAME [unlink args...]: the normal path. Fails if unlink fails; returns 1
# (with a warning) if the staging postgres outlived the unlink and had to be stopped here.
vdbfs_source_unlink() {
    local store=$1 name=$2
    shift 2
    vdbfs_cmd "$store" source unlink "$name" "$@" || return
    guard_drop "unlink source $name"
    _daemon_pg_down "source:$name"
}

# The guard's undo (best effort, quiet unless something is wrong).
vdbfs_source_cleanup() {
    local store=$1 name=$2 err
    shift 2
    # Nothing to undo when the link failed in its preflight (it leaves nothing behind).
    if vdbfs_cmd "$store" source status "$name" >/dev/null 2>&1; then
        err=$(vdbfs_cmd "$store" source unlink "$name" "$@" 2>&1 >/dev/null) || warn "vdbfs source unlink $name: $err"
    fi
    _daemon_pg_down "source:$name"
}

# ---------------------------------------------------------------------------------------------
# vdbfs VDBs (issue 5): the daemon provisions, starts and stops them.

# vdbfs_vdb_create STORE NAME [create args...]: `vdbfs vdb create NAME ...`, its undo (`vdb delete`,
# then the postmaster checked down) registered first. Output is the command's (line 1: the libpq
# connection string). Call it in the script's own shell (not inside $(...)), or the undo is lost;
# then vdbfs_vdb_note NAME "$(vdbfs_cmd STORE vdb status NAME --json)" so cleanup knows the PID.
vdbfs_vdb_create() {
    local store=$1 name=$2
    shift 2
    guard_push "delete vdb $name" vdbfs_vdb_cleanup "$store" "$name"
    vdbfs_cmd "$store" vdb create "$name" "$@"
}

# vdbfs_vdb_note NAME STATUS-JSON: remember the postmaster of VDB NAME.
vdbfs_vdb_note() {
    _daemon_pg_note "vdb:$1" "$(jq -r '.pid // empty' <<<"$2")" "$(jq -r '.data_dir // empty' <<<"$2")"
}

# vdbfs_vdb_delete STORE NAME: the normal path. Fails if delete fails; returns 1 (with a warning)
# if the VDB's postgres outlived the delete and had to be stopped here.
vdbfs_vdb_delete() {
    local store=$1 name=$2
    vdbfs_cmd "$store" vdb delete "$name" || return
    guard_drop "delete vdb $name"
    _daemon_pg_down "vdb:$name"
}

# The guard's undo (best effort).
vdbfs_vdb_cleanup() {
    local store=$1 name=$2 err
    # Nothing to undo when the create failed (it rolls back) or the VDB is gone already.
    if vdbfs_cmd "$store" vdb status "$name" >/dev/null 2>&1; then
        err=$(vdbfs_cmd "$store" vdb delete "$name" 2>&1 >/dev/null) || warn "vdbfs vdb delete $name: $err"
    fi
    _daemon_pg_down "vdb:$name"
}
