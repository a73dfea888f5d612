#!/usr/bin/env bash
# wsgate beside two peers, on this machine: the Node `ws` server
# (bench/peers/node-ws) and nats-server's WebSocket listener
# (bench/peers/nats).
#
# Builds wsgate (release), installs the peers (npm ci; apt nats-server when
# missing), makes certificates, an HMAC secret, policies and the servers'
# configs in a temporary directory, then runs each scenario against
# wsgate, then each peer: every server pinned to CPU 0, `wsgate bench`
# pinned to CPU 1. Collects the JSON line of every run into results.jsonl
# and writes the report with bench/report.py: docs/benchmarks.md and
# docs/benchmarks.svg.
#
#   bench/run.sh                  the full run (under 15 minutes)
#   BENCH_QUICK=1 bench/run.sh    a ~2-minute smoke with small numbers; its
#                                 report goes to the work directory, not docs/
#
# Every number can be set (defaults: full run / quick run):
#   BENCH_IDLE_N=10000/1000  BENCH_IDLE_BIG_N=18000/2000  BENCH_IDLE_SOURCES=4
#   BENCH_HOLD=60/5 (seconds the 10,000 are held)  BENCH_BIG_HOLD=20/5
#   BENCH_SUBSCRIBERS=1000/200   BENCH_SIZE=100
#   BENCH_DURATION=10/3      BENCH_WARMUP=2/1             BENCH_CONNECT_N=2000/300
#   BENCH_SOAK=0  (seconds: hold wsgate's 10,000 idle connections that long
#                  instead of BENCH_HOLD, e.g. 600 for the 10-minute
#                  heartbeat soak, which then adds 9 minutes to the run)
#   BENCH_ONLY="floor idle idle-big idle-sub idle-big-sub fanout-w100 fanout-w1 connect resume api-c1 api-c16 api-rate fanout-rate cluster-w100 cluster-w1 cluster-resume presence cluster-presence"
#              (a subset; floor: `wsgate bench floor`, the kernel's
#              own cost of writing to BENCH_SUBSCRIBERS connections in
#              turn, plain and TLS, no server; idle-sub, idle-big-sub:
#              the idle runs with every connection subscribed to one
#              channel (the Node peer's are by nature); presence: BENCH_IDLE_N connections subscribed
#              to one channel without presence, then with it (its
#              members), wsgate only; cluster-presence: the same members
#              on replica B of two on a private redis-server, held
#              BENCH_PRESENCE_HOLD s, counting Redis' commands;
#              cluster-*: two wsgate replicas on a private
#              redis-server, subscribers on one, the publisher on the other;
#              resume: BENCH_RESUME_N clients drop and resume at once;
#              api-cN: BENCH_SUBSCRIBERS subscribers, publishes through the
#              HTTP API on N keep-alive connections, wsgate only;
#              api-rate: the same at BENCH_API_RATE over 16 connections;
#              fanout-rate: a WebSocket publisher at BENCH_API_RATE)
#   BENCH_API_RATE=100   BENCH_PRESENCE_HOLD=120/5
#   BENCH_RESUME_N=10000/1000
#   BENCH_SERVERS="wsgate node nats"
#   BENCH_PORT=9443 (wsgate; the Node peer +1, nats' WebSocket +3 and its
#                    client port +4, the HTTP API +5, all on 127.0.0.1)
#   BENCH_BIN=path  a wsgate binary built before (no build): to compare
#                   two builds, run alternately, each with its own BENCH_DOCS
#   BENCH_DOCS=dir  where the report goes (default docs/, or the work dir
#                   when BENCH_QUICK=1)   BENCH_KEEP=1  keep the work dir
#
# bench/notes.md, when it exists, is copied into the report as its Notes
# (which targets miss, by how much, what the profiles show, what was tried).
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then
  d_idle=1000 d_big=2000 d_hold=5 d_big_hold=5 d_subs=200 d_dur=3 d_warm=1 d_conn=300 d_resume=1000 d_phold=5
else
  d_idle=10000 d_big=18000 d_hold=60 d_big_hold=20 d_subs=1000 d_dur=10 d_warm=2 d_conn=2000 d_resume=10000 d_phold=120
fi
PRESENCE_HOLD=${BENCH_PRESENCE_HOLD:-$d_phold}
RESUME_N=${BENCH_RESUME_N:-$d_resume}
API_RATE=${BENCH_API_RATE:-100}
IDLE_N=${BENCH_IDLE_N:-$d_idle}
IDLE_BIG_N=${BENCH_IDLE_BIG_N:-$d_big}
HOLD=${BENCH_HOLD:-$d_hold}
BIG_HOLD=${BENCH_BIG_HOLD:-$d_big_hold}
SOAK=${BENCH_SOAK:-0}
IDLE_SOURCES=${BENCH_IDLE_SOURCES:-4}
SUBS=${BENCH_SUBSCRIBERS:-$d_subs}
SIZE=${BENCH_SIZE:-100}
DURATION=${BENCH_DURATION:-$d_dur}
WARMUP=${BENCH_WARMUP:-$d_warm}
CONNECT_N=${BENCH_CONNECT_N:-$d_conn}
ONLY=${BENCH_ONLY:-"floor idle idle-big idle-sub idle-big-sub fanout-w100 fanout-w1 connect resume api-c1 api-c16 api-rate fanout-rate cluster-w100 cluster-w1 cluster-resume presence cluster-presence"}
SERVERS=${BENCH_SERVERS:-"wsgate node nats"}
WS_PORT=${BENCH_PORT:-9443}
NODE_PORT=$((WS_PORT + 1))
NATS_PORT=$((WS_PORT + 3))
NATS_CLIENT_PORT=$((WS_PORT + 4))
API_PORT=$((WS_PORT + 5))
SERVER_CPU=0
CLIENT_CPU=1

log() { printf '\n[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench/run.sh: %s\n' "$*" >&2; exit 1; }

for server in $SERVERS; do
  case $server in wsgate | node | nats) ;; *) die "unknown server '$server' in BENCH_SERVERS (wsgate node nats)" ;; esac
done
has_server() { [[ " $SERVERS " == *" $1 "* ]]; }
# The machine's own NATS listens on these; ours must never touch them.
for port in "$NATS_PORT" "$NATS_CLIENT_PORT"; do
  [[ $port != 4222 && $port != 8222 ]] || die "BENCH_PORT puts nats-server on $port, a system NATS port; choose another"
done

# ---------------------------------------------------------------- tools
need_cmd() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  need_cmd apt-get || die "$1 is missing and there is no apt-get to install it"
  local sudo=
  [[ $(id -u) == 0 ]] || sudo=sudo
  log "installing $1 (apt)"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$1" >&2
}
need_cmd taskset || apt_install util-linux
need_cmd openssl || apt_install openssl
need_cmd python3 || apt_install python3
need_cmd node || apt_install nodejs
need_cmd npm || apt_install npm
need_cmd redis-server || apt_install redis-server
# Debian installs it in /usr/sbin, which a user's PATH may lack.
NATS_BIN=
if has_server nats; then
  find_nats() { command -v nats-server || { [[ -x /usr/sbin/nats-server ]] && echo /usr/sbin/nats-server; } || true; }
  NATS_BIN=$(find_nats)
  [[ -n $NATS_BIN ]] || { apt_install nats-server; NATS_BIN=$(find_nats); }
  [[ -n $NATS_BIN ]] || die "nats-server is missing"
fi
need_cmd cargo || die "cargo is missing: install a Rust toolchain (1.88 or newer)"
[[ $(nproc) -ge 2 ]] || die "needs at least 2 CPUs (server on CPU $SERVER_CPU, load on CPU $CLIENT_CPU)"

if [[ -n ${BENCH_BIN:-} ]]; then
  BIN=$BENCH_BIN
else
  log "cargo build --release"
  cargo build --release >&2
  BIN=$ROOT/target/release/wsgate
fi
"$BIN" bench --help >/dev/null 2>&1 || die "$BIN has no 'bench' command"

PEER=$ROOT/bench/peers/node-ws
if ! (cd "$PEER" && node -e "require.resolve('ws'); require.resolve('jsonwebtoken')" 2>/dev/null) ||
   [[ $PEER/package-lock.json -nt $PEER/node_modules/.package-lock.json ]]; then
  log "npm ci (bench/peers/node-ws)"
  (cd "$PEER" && npm ci --no-audit --no-fund >&2)
fi

# The most open files this shell (and so every server and client) may have.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [[ $NOFILE != unlimited ]] && ((NOFILE < IDLE_BIG_N + 100)); then
  log "open-file limit $NOFILE is below $IDLE_BIG_N connections; the large idle run may fail"
fi

# ---------------------------------------------------------------- setup
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wsgate-bench.XXXXXX")
mkdir -p "$WORK/logs"
KEEP=${BENCH_KEEP:-0}
DOCS=${BENCH_DOCS:-}
if [[ -z $DOCS ]]; then
  if [[ $QUICK == 1 ]]; then DOCS=$WORK KEEP=1; else DOCS=$ROOT/docs; fi
fi
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
log "work directory $WORK"

"$BIN" certs --out "$WORK/certs" >"$WORK/logs/certs.log"        # ECDSA P-256, its CA
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth \
  -keyout "$WORK/certs/rsa.key" -out "$WORK/certs/rsa.pem" 2>"$WORK/logs/openssl.log"
head -c 48 /dev/urandom | base64 -w0 >"$WORK/hmac.secret"       # 64 bytes of text
echo >>"$WORK/hmac.secret"
mkdir -p "$WORK/policies"
cp "$ROOT/policies/default.toml" "$WORK/policies/"

# cert name -> server cert, server key, CA the client trusts
cert_file() { case $1 in ecdsa) echo "$WORK/certs/server.pem" ;; rsa) echo "$WORK/certs/rsa.pem" ;; esac; }
key_file() { case $1 in ecdsa) echo "$WORK/certs/server.key" ;; rsa) echo "$WORK/certs/rsa.key" ;; esac; }
ca_file() { case $1 in ecdsa) echo "$WORK/certs/ca.pem" ;; rsa) echo "$WORK/certs/rsa.pem" ;; esac; }

for cert in ecdsa rsa; do
  cat >"$WORK/wsgate-$cert.toml" <<EOF
# wsgate configuration for benchmarks (bench/run.sh)
[server]
listen = "127.0.0.1:$WS_PORT"
max_connections = 30000

[tls]
cert_file = "$(cert_file $cert)"
key_file = "$(key_file $cert)"

[auth]
algorithms = ["HS256"]
hmac_secret_file = "$WORK/hmac.secret"

[websocket]
outbox_frames = 4096

[limits]
publish_rate_per_s = 10000000
publish_burst = 10000000
max_connections_per_user = 100000
max_subscriptions = 64
# One benchmark user publishes as fast as deliveries complete.
user_publish_rate_per_s = 0

# The load generator is a handful of 127.0.0.x addresses opening thousands
# of connections per second: per-address admission limits are for the
# open internet, not for this.
[admission]
max_connections_per_address = 0
address_new_connections_per_s = 0
address_failed_auths_per_min = 0

# The API bench publishes as one token subject as fast as it can.
[api]
listen = "127.0.0.1:$API_PORT"
requests_per_s = 10000000
requests_burst = 10000000

[policy]
dir = "$WORK/policies"

[log]
level = "warn"
EOF
  "$BIN" check-config --config "$WORK/wsgate-$cert.toml" >"$WORK/logs/check-config-$cert.log" ||
    die "wsgate check-config failed: $(cat "$WORK/logs/check-config-$cert.log")"
done

# nats-server's config per certificate, from bench/peers/nats/nats.conf.
# The token is the secret's text; it goes into the file, never onto a
# command line.
NATS_PEER=$ROOT/bench/peers/nats
if [[ -n $NATS_BIN ]]; then
  IFS= read -r nats_token <"$WORK/hmac.secret"
  for cert in ecdsa rsa; do
    # Quoted replacements: bash 5.2 reads a bare & in one as the match.
    conf=$(<"$NATS_PEER/nats.conf")
    conf=${conf//@CLIENT_PORT@/"$NATS_CLIENT_PORT"}
    conf=${conf//@WS_PORT@/"$NATS_PORT"}
    conf=${conf//@CERT_FILE@/"$(cert_file $cert)"}
    conf=${conf//@KEY_FILE@/"$(key_file $cert)"}
    conf=${conf//@TOKEN@/"$nats_token"}
    (umask 077 && printf '%s\n' "$conf" >"$WORK/nats-$cert.conf")
    "$NATS_BIN" -c "$WORK/nats-$cert.conf" -t >"$WORK/logs/nats-check-$cert.log" 2>&1 ||
      die "nats-server -t failed: $(cat "$WORK/logs/nats-check-$cert.log")"
  done
  unset nats_token conf
fi

machine_args=(--config "$WORK/wsgate-ecdsa.toml" --work "$WORK")
[[ -z $NATS_BIN ]] || machine_args+=(--nats "$NATS_BIN" --nats-config "$WORK/nats-ecdsa.conf")
python3 "$ROOT/bench/report.py" machine "${machine_args[@]}" >"$WORK/machine.json"

# ---------------------------------------------------------------- servers
SPID=
SPORT=
SCMD=

# Is something listening on 127.0.0.1:$1 (any address) right now?
listening() {
  local hex
  hex=$(printf '%04X' "$1")
  awk -v p=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

start_server() { # server cert
  local server=$1 cert=$2 logf port
  logf=$WORK/logs/$1-$2-$(date +%s%N).log
  port=$WS_PORT
  [[ $server == node ]] && port=$NODE_PORT
  [[ $server == nats ]] && port=$NATS_PORT
  ! listening "$port" || die "port $port is already in use; choose others with BENCH_PORT"
  if [[ $server == nats ]] && listening "$NATS_CLIENT_PORT"; then
    die "port $NATS_CLIENT_PORT is already in use; choose others with BENCH_PORT"
  fi
  case $server in
    wsgate)
      SPORT=$WS_PORT
      SCMD="taskset -c $SERVER_CPU $BIN serve --config $WORK/wsgate-$cert.toml"
      taskset -c "$SERVER_CPU" "$BIN" serve --config "$WORK/wsgate-$cert.toml" >"$logf" 2>&1 &
      ;;
    node)
      SPORT=$NODE_PORT
      SCMD="PORT=$NODE_PORT CERT=$(cert_file "$cert") KEY=$(key_file "$cert") SECRET_FILE=$WORK/hmac.secret taskset -c $SERVER_CPU node $PEER/server.mjs"
      PORT=$NODE_PORT HOST=127.0.0.1 CERT=$(cert_file "$cert") KEY=$(key_file "$cert") SECRET_FILE=$WORK/hmac.secret \
        taskset -c "$SERVER_CPU" node "$PEER/server.mjs" >"$logf" 2>&1 &
      ;;
    nats)
      SPORT=$NATS_PORT
      SCMD="taskset -c $SERVER_CPU $NATS_BIN -c $WORK/nats-$cert.conf"
      taskset -c "$SERVER_CPU" "$NATS_BIN" -c "$WORK/nats-$cert.conf" >"$logf" 2>&1 &
      ;;
  esac
  SPID=$!
  local i
  for ((i = 0; i < 300; i++)); do
    listening "$SPORT" && return 0
    kill -0 "$SPID" 2>/dev/null || { cat "$logf" >&2; die "$server exited at start"; }
    sleep 0.1
  done
  cat "$logf" >&2
  die "$server did not listen on port $SPORT within 30 s"
}

stop_server() {
  [[ -n $SPID ]] || return 0
  kill -TERM "$SPID" 2>/dev/null || true
  local i
  for ((i = 0; i < 150; i++)); do
    kill -0 "$SPID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$SPID" 2>/dev/null || true
  wait "$SPID" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    listening "$SPORT" || break
    sleep 0.1
  done
  SPID=
}
finish() {
  local rc=$?
  stop_server
  if [[ $KEEP == 1 || $rc != 0 ]]; then
    log "logs and results kept in $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap finish EXIT
trap 'exit 130' INT TERM

# Samples, once a second until killed, into $3: the time, the server's RSS
# (KiB) and CPU ticks, and the load generator's CPU ticks.
sample() {
  local spid=$1 cpid=$2 out=$3 rss sticks cticks
  taskset -cp "$CLIENT_CPU" "$BASHPID" >/dev/null 2>&1 || true
  while rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$spid/status" 2>/dev/null) && [[ -n $rss ]]; do
    sticks=$(awk '{ print $14 + $15 }' "/proc/$spid/stat" 2>/dev/null) || sticks=0
    cticks=$(awk '{ print $14 + $15 }' "/proc/$cpid/stat" 2>/dev/null) || cticks=-
    echo "$EPOCHREALTIME $rss ${sticks:-0} ${cticks:--}" >>"$out"
    sleep 1
  done
}

FAILED=0

# run_bench scenario server cert bench-args...
run_bench() {
  local scenario=$1 server=$2 cert=$3
  shift 3
  local url=wss://127.0.0.1:$WS_PORT/ws plain=()
  case $server in
    node)
      url=wss://127.0.0.1:$NODE_PORT/ws
      plain=(--plain)
      ;;
    # The NATS protocol over the WebSocket; the secret's text is the token.
    nats)
      url=wss://127.0.0.1:$NATS_PORT/
      plain=(--nats)
      ;;
  esac
  start_server "$server" "$cert"
  local mode=$1
  shift
  local args=("$mode" --url "$url" --ca "$(ca_file "$cert")" --secret "$WORK/hmac.secret" "${plain[@]}" "$@")
  # The server's RSS (idle, resume) and CPU per delivery (fanout).
  if [[ $mode == idle || $mode == resume || $mode == fanout ]]; then args+=(--server-pid "$SPID"); fi
  # The server's CPU per handshake (the peer's too: it is its process).
  if [[ $mode == connect ]]; then args+=(--server-pid "$SPID"); fi
  local tag=$scenario-$server-$cert out err samples rc=0
  out=$WORK/logs/$tag.out err=$WORK/logs/$tag.err samples=$WORK/logs/$tag.samples
  log "$scenario: $server ($cert): wsgate bench ${args[*]}"
  taskset -c "$CLIENT_CPU" "$BIN" bench "${args[@]}" >"$out" 2> >(tee "$err" >&2) &
  local bpid=$!
  sample "$SPID" "$bpid" "$samples" &
  local sampler=$!
  wait "$bpid" || rc=$?
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  stop_server
  ((rc == 0)) || { FAILED=$((FAILED + 1)); log "$scenario: $server: wsgate bench exited with $rc"; }
  python3 "$ROOT/bench/report.py" record \
    --scenario "$scenario" --server "$server" --cert "$cert" --exit "$rc" \
    --server-command "$SCMD" \
    --bench-command "taskset -c $CLIENT_CPU $BIN bench ${args[*]}" \
    --stdout "$out" --samples "$samples" --work "$WORK" --root "$ROOT" >>"$RESULTS"
  tail -n 1 "$out" >&2 || true
}

want() { [[ " $ONLY " == *" $1 "* ]]; }

# ---------------------------------------------------------------- the floor
# The kernel's own cost of a fan-out on this machine, before any server:
# plain TCP and rustls records, the writer where the servers run (and again
# at the end of the run).
run_floor() { # scenario tls-flag...
  local scenario=$1 out=$WORK/logs/$1.out samples=$WORK/logs/$1.samples rc=0
  shift
  local args=(floor --connections "$SUBS" --size "$SIZE" --duration "$DURATION" --warmup "$WARMUP" --reader-cpu "$CLIENT_CPU" "$@")
  log "$scenario: taskset -c $SERVER_CPU wsgate bench ${args[*]}"
  taskset -c "$SERVER_CPU" "$BIN" bench "${args[@]}" >"$out" 2>"$WORK/logs/$scenario.err" || rc=$?
  : >"$samples"
  ((rc == 0)) || { FAILED=$((FAILED + 1)); log "$scenario: exited with $rc"; }
  python3 "$ROOT/bench/report.py" record \
    --scenario "$scenario" --server kernel --cert none --exit "$rc" \
    --server-command "(none: the floor is the kernel's)" \
    --bench-command "taskset -c $SERVER_CPU $BIN bench ${args[*]}" \
    --stdout "$out" --samples "$samples" --work "$WORK" --root "$ROOT" >>"$RESULTS"
  tail -n 1 "$out" >&2 || true
}
if want floor; then
  run_floor floor-tcp
  run_floor floor-tls --tls
fi

# ---------------------------------------------------------------- scenarios
started=$SECONDS
for server in $SERVERS; do
  if want idle; then
    idle_hold=$HOLD
    if [[ $server == wsgate ]] && ((SOAK > 0)); then idle_hold=$SOAK; fi
    run_bench idle "$server" ecdsa idle --connections "$IDLE_N" --concurrency 200 \
      --hold "$idle_hold" --sources "$IDLE_SOURCES"
  fi
done
for server in $SERVERS; do
  if want idle-big; then
    run_bench idle-big "$server" ecdsa idle --connections "$IDLE_BIG_N" --concurrency 200 \
      --hold "$BIG_HOLD" --sources "$IDLE_SOURCES"
  fi
done
# The same connections, each subscribed to one channel (nats: one subject;
# the Node peer broadcasts to everyone, so its connections are already).
for server in $SERVERS; do
  if want idle-sub; then
    run_bench idle-sub "$server" ecdsa idle --connections "$IDLE_N" --concurrency 200 \
      --hold "$BIG_HOLD" --sources "$IDLE_SOURCES" --subscribe announce:bench
  fi
  if want idle-big-sub; then
    run_bench idle-big-sub "$server" ecdsa idle --connections "$IDLE_BIG_N" --concurrency 200 \
      --hold "$BIG_HOLD" --sources "$IDLE_SOURCES" --subscribe announce:bench
  fi
done
for window in 100 1; do
  for server in $SERVERS; do
    if want "fanout-w$window"; then
      run_bench "fanout-w$window" "$server" ecdsa fanout --subscribers "$SUBS" --size "$SIZE" \
        --window "$window" --duration "$DURATION" --warmup "$WARMUP"
    fi
  done
done
for cert in rsa ecdsa; do
  for server in $SERVERS; do
    if want connect; then
      run_bench "connect-$cert" "$server" "$cert" connect --connections "$CONNECT_N" --concurrency 50
    fi
  done
  # Resumed TLS sessions (abbreviated handshakes), wsgate's CPU per connect.
  if has_server wsgate && want connect; then
    run_bench "connect-resumed-$cert" wsgate "$cert" connect --connections "$CONNECT_N" --concurrency 50 --resume
  fi
done
# History and resume are wsgate's: the peers have nothing to compare.
if has_server wsgate && want resume; then
  run_bench resume wsgate ecdsa resume --connections "$RESUME_N" --concurrency 200 \
    --missed 10 --sources "$IDLE_SOURCES"
fi

# Publishing through the HTTP API (wsgate's own: the peer has none), on 1
# and 16 keep-alive connections as fast as the answers come, and at a fixed
# BENCH_API_RATE over 16, to the fan-out scenario's subscribers.
if [[ " $SERVERS " == *" wsgate "* ]]; then
  for scenario in api-c1 api-c16 api-rate; do
    want "$scenario" || continue
    case $scenario in
      api-c1) pace=(--connections 1) ;;
      api-c16) pace=(--connections 16) ;;
      api-rate) pace=(--connections 16 --rate "$API_RATE") ;;
    esac
    run_bench "$scenario" wsgate ecdsa api --api-url "https://127.0.0.1:$API_PORT" \
      --subscribers "$SUBS" --size "$SIZE" "${pace[@]}" --duration "$DURATION" --warmup "$WARMUP"
  done
fi
# The WebSocket publisher at the same fixed rate, beside api-rate.
if has_server wsgate && want fanout-rate; then
  run_bench fanout-rate wsgate ecdsa fanout --subscribers "$SUBS" --size "$SIZE" \
    --rate "$API_RATE" --duration "$DURATION" --warmup "$WARMUP"
fi

# What presence costs (wsgate's own): the same connections subscribed to
# one channel without presence (announce:* keeps none), then to one that
# keeps it (chat:*, with "presence":true), so the difference is what each
# member and watcher costs the process.
if [[ " $SERVERS " == *" wsgate "* ]] && want presence; then
  run_bench presence-off wsgate ecdsa idle --connections "$IDLE_N" --concurrency 200 \
    --hold 5 --sources "$IDLE_SOURCES" --subscribe announce:bench
  run_bench presence-on wsgate ecdsa idle --connections "$IDLE_N" --concurrency 200 \
    --hold 5 --sources "$IDLE_SOURCES" --subscribe chat:bench --presence
fi

# Two replicas on one Redis: subscribers on replica B, the publisher on
# replica A, so every delivery crosses Redis. Redis and both replicas share
# CPU 0, as one server does in the other scenarios.
REDIS_PORT=$((WS_PORT + 10))
B_PORT=$((WS_PORT + 2))
run_cluster_bench() { # scenario window (100, 1, resume or presence)
  local scenario=$1 window=$2 rpid apid bpid logd=$WORK/logs i
  for port in "$REDIS_PORT" "$WS_PORT" "$B_PORT"; do
    ! listening "$port" || die "port $port is already in use; choose others with BENCH_PORT"
  done
  taskset -c "$SERVER_CPU" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
    --appendonly no >"$logd/redis-$scenario.log" 2>&1 &
  rpid=$!
  for cfg in a b; do
    # The first `listen` is the server's; the replicas serve no API.
    sed -e "/^listen = \"127.0.0.1:$API_PORT\"/d" \
      -e "0,/^listen = /s|^listen = .*|listen = \"127.0.0.1:$([[ $cfg == a ]] && echo "$WS_PORT" || echo "$B_PORT")\"|" \
      "$WORK/wsgate-ecdsa.toml" >"$WORK/wsgate-cluster-$cfg.toml"
    printf '\n[cluster]\nredis_url = "redis://127.0.0.1:%s/"\n' "$REDIS_PORT" >>"$WORK/wsgate-cluster-$cfg.toml"
  done
  for ((i = 0; i < 100; i++)); do listening "$REDIS_PORT" && break; sleep 0.1; done
  taskset -c "$SERVER_CPU" "$BIN" serve --config "$WORK/wsgate-cluster-a.toml" >"$logd/$scenario-a.log" 2>&1 &
  apid=$!
  taskset -c "$SERVER_CPU" "$BIN" serve --config "$WORK/wsgate-cluster-b.toml" >"$logd/$scenario-b.log" 2>&1 &
  bpid=$!
  for ((i = 0; i < 300; i++)); do
    listening "$WS_PORT" && listening "$B_PORT" && break
    sleep 0.1
  done
  # Ready means connected to Redis.
  for ((i = 0; i < 100; i++)); do
    curl -skf --cacert "$(ca_file ecdsa)" "https://127.0.0.1:$WS_PORT/readyz" >/dev/null &&
      curl -skf "https://127.0.0.1:$B_PORT/readyz" >/dev/null && break
    sleep 0.1
  done
  local args=(fanout --url "wss://127.0.0.1:$B_PORT/ws" --publish-url "wss://127.0.0.1:$WS_PORT/ws"
    --ca "$(ca_file ecdsa)" --secret "$WORK/hmac.secret" --subscribers "$SUBS" --size "$SIZE"
    --window "$window" --duration "$DURATION" --warmup "$WARMUP")
  if [[ $window == presence ]]; then
    # Presence members on B (presence.ttl_s 60 s: a renewal every 20 s, a
    # sweep every 10 s), held BENCH_PRESENCE_HOLD s: Redis' commands per
    # member and minute, and B's RSS.
    args=(idle --url "wss://127.0.0.1:$B_PORT/ws" --ca "$(ca_file ecdsa)"
      --secret "$WORK/hmac.secret" --connections "$IDLE_N" --concurrency 200
      --sources "$IDLE_SOURCES" --hold "$PRESENCE_HOLD" --server-pid "$bpid"
      --subscribe chat:bench --presence --redis-url "redis://127.0.0.1:$REDIS_PORT/")
  fi
  if [[ $window == resume ]]; then
    # Subscribed on A, resumed on B (as after A drains), through Redis.
    args=(resume --url "wss://127.0.0.1:$WS_PORT/ws" --resume-url "wss://127.0.0.1:$B_PORT/ws"
      --ca "$(ca_file ecdsa)" --secret "$WORK/hmac.secret" --connections "$RESUME_N"
      --concurrency 200 --missed 10 --sources "$IDLE_SOURCES" --server-pid "$bpid"
      --redis-url "redis://127.0.0.1:$REDIS_PORT/")
  fi
  local out=$logd/$scenario.out samples=$logd/$scenario.samples rc=0
  log "$scenario: 2 replicas + redis: wsgate bench ${args[*]}"
  taskset -c "$CLIENT_CPU" "$BIN" bench "${args[@]}" >"$out" 2> >(tee "$logd/$scenario.err" >&2) &
  local bench=$!
  sample "$bpid" "$bench" "$samples" &
  local sampler=$!
  wait "$bench" || rc=$?
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  kill -TERM "$apid" "$bpid" 2>/dev/null || true
  wait "$apid" "$bpid" 2>/dev/null || true
  kill -TERM "$rpid" 2>/dev/null || true
  wait "$rpid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    listening "$WS_PORT" || listening "$B_PORT" || listening "$REDIS_PORT" || break
    sleep 0.1
  done
  ((rc == 0)) || { FAILED=$((FAILED + 1)); log "$scenario: wsgate bench exited with $rc"; }
  python3 "$ROOT/bench/report.py" record \
    --scenario "$scenario" --server wsgate-redis --cert ecdsa --exit "$rc" \
    --server-command "taskset -c $SERVER_CPU redis-server --port $REDIS_PORT --save '' --appendonly no; 2 × taskset -c $SERVER_CPU $BIN serve --config \$WORK/wsgate-cluster-{a,b}.toml ([cluster] redis_url)" \
    --bench-command "taskset -c $CLIENT_CPU $BIN bench ${args[*]}" \
    --stdout "$out" --samples "$samples" --work "$WORK" --root "$ROOT" >>"$RESULTS"
  tail -n 1 "$out" >&2 || true
}
if [[ " $SERVERS " == *" wsgate "* ]]; then
  if want cluster-presence; then run_cluster_bench cluster-presence presence; fi
  for window in 100 1; do
    if want "cluster-w$window"; then run_cluster_bench "cluster-w$window" "$window"; fi
  done
  if want cluster-resume; then run_cluster_bench cluster-resume resume; fi
fi
# The floor again: it is the machine's limit, and the report keeps the
# better of the two (a slow moment of a shared machine is not its limit).
if want floor; then
  run_floor floor-tcp
  run_floor floor-tls --tls
fi
log "benchmarks took $((SECONDS - started)) s"

# ---------------------------------------------------------------- report
mkdir -p "$DOCS"
python3 "$ROOT/bench/report.py" render --results "$RESULTS" --machine "$WORK/machine.json" \
  --quick "$QUICK" --md "$DOCS/benchmarks.md" --svg "$DOCS/benchmarks.svg" --notes "$ROOT/bench/notes.md"
cp "$RESULTS" "$DOCS/benchmarks.jsonl" 2>/dev/null || true
log "wrote $DOCS/benchmarks.md and $DOCS/benchmarks.svg ($FAILED failed runs)"
((FAILED == 0))
