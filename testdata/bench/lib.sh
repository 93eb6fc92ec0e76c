# Settings and helpers shared by the bench scripts: source it, don't run it.
#
# The topology (topology.sh) is three network namespaces on this machine:
#
#   bc (client) 10.99.1.2 ──veth── 10.99.1.1 bg (gateway) 10.99.2.1 ──veth── 10.99.2.2 bs (server)
#
# bs has no route back to bc or to any tunnel address, so anything that
# reaches bs from bc and is answered went through a NAT in bg: iptables
# MASQUERADE in the classic design, sluice's egress sockets in the other.
# Every packet stays inside these namespaces.

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$BENCH_DIR/../.." && pwd)"
export PATH="$PATH:/usr/local/go/bin"

BENCH_TMP=${BENCH_TMP:-/tmp/sluice-bench}
STATE=$BENCH_TMP/state            # keys, logs, pid list, sluice state dirs
BIN=$BENCH_TMP/bin                # tools and wireguard-go, built from this module
RESULTS=${RESULTS:-$BENCH_TMP/results}
RAW=$RESULTS/raw.tsv              # design<TAB>test<TAB>rep<TAB>metric<TAB>value
SLUICE=${SLUICE:-$REPO/bin/sluice}

CL_IP=10.99.1.2                   # bc
GW_C_IP=10.99.1.1                 # bg, facing the client
GW_S_IP=10.99.2.1                 # bg, facing the server; the NAT address
SRV_IP=10.99.2.2                  # bs, "the internet"
SRV_NET=10.99.2.0/24
CL_NET=10.99.1.0/24
WG_NET=10.99.100.0/24             # the classic gateway's tunnel subnet
WG_PORT=51820
WG_MTU=1420
HTTP_PORT=8080
FLOW_PORT=9000                    # idleflows listens on FLOW_PORT..FLOW_PORT+FLOW_PORTS-1
FLOW_PORTS=16
# wireguard-go's control socket is /var/run/wireguard/IFACE.sock in the
# file system that all namespaces share: the names must not clash with
# anyone else's.
WG_CLIENT_IF=sbwc0
WG_GW_IF=sbwg0
SLUICE_TUN_IF=sbtun0
TUN_TABLE=199                     # bg's policy-routing table into sluice's TUN

REPS=${REPS:-3}
DUR=${DUR:-10}
UDP_LEN=${UDP_LEN:-1360}          # fits the 1420-MTU tunnel without fragments
UDP_RATE2=${UDP_RATE2:-200M}      # a second UDP point near the classic design's loss knee
CONN_N=${CONN_N:-3000}            # connections per connrate run
CONN_PAR=${CONN_PAR:-32}
FLOWS=${FLOWS:-15000}             # idle flows in the memory scenario
EGRESS_PORTS=${EGRESS_PORTS:-40000-40999}
# The loss scenario: PATTERN:PERCENT, each way on the tunnel's UDP (see
# loss_set); LOSS_BYTES moved per transfer, LOSS_TIMEOUT seconds before a
# transfer counts as stalled.
LOSS_PATTERNS=${LOSS_PATTERNS:-"none:0 random:0 random:0.5 random:1 random:2 burst:1 burst:2"}
LOSS_BYTES=${LOSS_BYTES:-64M}
LOSS_TIMEOUT=${LOSS_TIMEOUT:-60}

mkdir -p "$STATE" "$BIN" "$RESULTS"

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# --------------------------------------------------------------- processes
# Every process the bench starts is recorded in $STATE/pids so that
# stop_all (the EXIT trap) ends exactly those and nothing else.

# start_in NAME NS CMD...: run CMD in namespace NS in the background, in its
# own session; sets START_PID, and START_LOG to the file that gets its
# output, $STATE/logs/NAME$LOG_TAG.log (compare.sh tags each repetition).
# `ip netns exec` and setsid both exec, so the pid is CMD's own.
start_in() {
  local name=$1 ns=$2; shift 2
  mkdir -p "$STATE/logs"
  START_LOG=$STATE/logs/$name${LOG_TAG:-}.log
  setsid ip netns exec "$ns" "$@" >"$START_LOG" 2>&1 </dev/null &
  START_PID=$!
  echo "$START_PID $name" >>"$STATE/pids"
}

# stop_pid PID: SIGTERM, then SIGKILL after 5 s.
stop_pid() {
  local p=$1 i
  kill -0 "$p" 2>/dev/null || return 0
  kill "$p" 2>/dev/null || true
  for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  sed -i "/^$p /d" "$STATE/pids" 2>/dev/null || true
}

stop_all() {
  local p name
  [ -f "$STATE/pids" ] || return 0
  while read -r p name; do stop_pid "$p"; done < <(tac "$STATE/pids")
  rm -f "$STATE/pids"
}

# wait_for SECONDS CMD...: retry CMD every 0.1 s until it succeeds or
# SECONDS have passed.
wait_for() {
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.1
  done
}

# ------------------------------------------------------------------ builds
build_all() {
  log "building sluice (make build), the tools and wireguard-go"
  make -s -C "$REPO" build >&2 || die "make build failed"
  [ -x "$SLUICE" ] || die "$SLUICE missing after make build"
  (cd "$REPO" && go build -o "$BIN/" ./testdata/bench/tools/...) || die "building testdata/bench/tools failed"
  # The wireguard-go command, at the version go.mod requires.
  (cd "$REPO" && go build -o "$BIN/wireguard-go" golang.zx2c4.com/wireguard) || die "building wireguard-go failed"
}

# ----------------------------------------------------------- measurement
rec() { printf '%s\t%s\t%s\t%s\t%s\n' "$DESIGN" "$1" "$2" "$3" "$4" >>"$RAW"; }

# CPU ticks (utime+stime) of a pid; fields after the parenthesised name.
pid_ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12+$13}' || echo 0; }
# busy and total jiffies of the machine: user, nice, system, irq and softirq
# are busy; idle, iowait and steal (the hypervisor's) are not.
sys_ticks() { awk '/^cpu /{b=$2+$3+$4+$7+$8; t=b+$5+$6+$9; print b, t; exit}' /proc/stat; }
calc() { python3 -c "print($1)"; }

# cpu_begin/cpu_end TEST REP bracket a measurement: the machine's busy share
# (% of all cores) and each process of $CPU_PIDS ("name:pid ...", % of one
# core) over the interval.
cpu_begin() {
  _T0=$(date +%s.%N); read -r _SB0 _ST0 < <(sys_ticks)
  declare -gA _PT0=()
  local np
  for np in ${CPU_PIDS:-}; do _PT0[$np]=$(pid_ticks "${np#*:}"); done
}
cpu_end() {
  local t1 sb1 st1 hz el np t
  t1=$(date +%s.%N); read -r sb1 st1 < <(sys_ticks); hz=$(getconf CLK_TCK)
  el=$(calc "$t1-$_T0")
  rec "$1" "$2" sys_busy_pct "$(calc "round(100*($sb1-$_SB0)/max(1,$st1-$_ST0),1)")"
  for np in ${CPU_PIDS:-}; do
    t=$(pid_ticks "${np#*:}")
    rec "$1" "$2" "cpu_${np%%:*}_pct" "$(calc "round(100*($t-${_PT0[$np]})/$hz/$el,1)")"
  done
}

# iperf_failed TEST REP OUTPUT: record a failed iperf3 run and why.
iperf_failed() {
  local why
  why=$(jq -r '.error // empty' <<<"$3" 2>/dev/null || true)
  [ -n "$why" ] || why=$(tail -2 <<<"$3" | tr '\n' ' ')
  log "  $DESIGN $1 rep $2: iperf3 failed: $why"
  echo "$DESIGN $1 rep $2: iperf3 failed: $why" >>"$RESULTS/errors.txt"
  rec "$1" "$2" error 1
  sleep 1
}

# m_tcp TEST REP STREAMS up|down: iperf3 TCP from bc to bs (up) or bs to bc
# (down, -R), one second of slow start left out.
m_tcp() {
  local test=$1 r=$2 P=$3 dir=$4 j rev=()
  [ "$dir" = down ] && rev=(-R)
  cpu_begin
  if ! j=$(nsx bc iperf3 -c $SRV_IP -t "$DUR" -O 1 -P "$P" "${rev[@]}" --json 2>&1); then
    iperf_failed "$test" "$r" "$j"; return 0
  fi
  cpu_end "$test" "$r"
  rec "$test" "$r" gbps "$(jq '.end.sum_received.bits_per_second/1e9' <<<"$j")"
  rec "$test" "$r" retrans "$(jq '.end.sum_sent.retransmits // 0' <<<"$j")"
  log "  $DESIGN $test rep $r: $(jq -r '"\(.end.sum_received.bits_per_second/1e7|round/100) Gbit/s, \(.end.sum_sent.retransmits // 0) retransmits"' <<<"$j")"
  sleep 1
}

# m_udp TEST REP RATE: iperf3 UDP bc to bs at RATE (0: as fast as the client can send).
m_udp() {
  local test=$1 r=$2 B=$3 j
  cpu_begin
  if ! j=$(nsx bc iperf3 -c $SRV_IP -u -b "$B" -l "$UDP_LEN" -t "$DUR" --json 2>&1); then
    iperf_failed "$test" "$r" "$j"; return 0
  fi
  cpu_end "$test" "$r"
  # iperf3 3.12 has sum_sent/sum_received for UDP; older ones only sum.
  local s='(.end.sum_sent // .end.sum)' v='(.end.sum_received // .end.sum)'
  rec "$test" "$r" sent_gbps "$(jq "$s.bits_per_second/1e9" <<<"$j")"
  rec "$test" "$r" gbps "$(jq "$v.bits_per_second/1e9" <<<"$j")"
  rec "$test" "$r" loss_pct "$(jq "$v.lost_percent" <<<"$j")"
  log "  $DESIGN $test rep $r: $(jq -r "\"sent \($s.bits_per_second/1e7|round/100) Gbit/s, received \($v.bits_per_second/1e7|round/100) Gbit/s, loss \($v.lost_percent*100|round/100) %\"" <<<"$j")"
  sleep 1
}

# m_ping TEST REP: 20 echoes, 0.2 s apart.
m_ping() {
  local test=$1 r=$2 out line mn av mx md
  out=$(nsx bc ping -n -c 20 -i 0.2 -q $SRV_IP 2>&1) || true
  line=$(grep -E 'rtt|round-trip' <<<"$out" | sed 's/.*= //; s/ ms//')
  if [ -z "$line" ]; then
    log "  $DESIGN $test rep $r: no replies: $(tail -2 <<<"$out")"; rec "$test" "$r" error 1; return 0
  fi
  IFS=/ read -r mn av mx md <<<"$line"
  rec "$test" "$r" rtt_avg_ms "$av"; rec "$test" "$r" rtt_min_ms "$mn"; rec "$test" "$r" rtt_max_ms "$mx"
  rec "$test" "$r" loss_pct "$(grep -oE '[0-9.]+% packet loss' <<<"$out" | cut -d% -f1)"
  log "  $DESIGN $test rep $r: rtt min/avg/max $mn/$av/$mx ms"
}

# m_conn TEST REP N C PATH: connrate against httpsrv in bs.
m_conn() {
  local test=$1 r=$2 N=$3 C=$4 path=$5 j m
  cpu_begin
  if ! j=$(nsx bc "$BIN/connrate" -addr $SRV_IP:$HTTP_PORT -path "$path" -n "$N" -c "$C"); then
    log "  $DESIGN $test rep $r: connrate failed: $j"; rec "$test" "$r" error 1; return 0
  fi
  cpu_end "$test" "$r"
  for m in conn_per_s p50_ms p99_ms connect_p50_ms connect_p99_ms errors; do
    rec "$test" "$r" "$m" "$(jq ".$m" <<<"$j")"
  done
  # What went wrong, in words, for the report.
  jq -r --arg k "$DESIGN $test rep $r" 'select(.first_error) | "\($k): \(.errors) of \(.n) failed, the first with: \(.first_error)"' \
    <<<"$j" >>"$RESULTS/errors.txt"
  log "  $DESIGN $test rep $r: $j"
  sleep 1
}

# ------------------------------------------------------------------ loss
# loss_set PATTERN PERCENT: lose PERCENT % of the tunnel's UDP each way.
#   burst   nftables in bg, `numgen random` on UDP 51820 in prerouting and
#           postrouting, as an operator would write it. A UDP GSO datagram
#           (wireguard-go sends its batches as one) is one packet to
#           netfilter there, so a drop loses up to 64 datagrams in a row.
#   random  every datagram alone: GSO off on both veths, so the kernel
#           cuts batches before they cross, and the rule at each
#           receiver's prerouting (bc for server → client, bg the other
#           way), where netfilter sees single datagrams (veth GRO is off).
#   none    nothing lost: the same transfer as a reference. random:0 is
#           the reference for the random rows: GSO off, nothing lost.
loss_set() {
  local pattern=$1 pct=$2 pm
  loss_clear
  pm=$(calc "int(round($pct * 10))")   # per mille: nftables counts in integers
  case $pattern in
    none) return 0 ;;
    burst)
      nsx bg nft -f - <<NFT
table inet sluice_bench_loss {
  chain pre { type filter hook prerouting priority -300; udp dport $WG_PORT numgen random mod 1000 < $pm drop; }
  chain post { type filter hook postrouting priority 300; udp sport $WG_PORT numgen random mod 1000 < $pm drop; }
}
NFT
      ;;
    random)
      nsx bg ethtool -K bg-eth0 gso off tx-udp-segmentation off >/dev/null
      nsx bc ethtool -K bc-eth0 gso off tx-udp-segmentation off >/dev/null
      nsx bg nft -f - <<NFT
table inet sluice_bench_loss {
  chain pre { type filter hook prerouting priority -300; udp dport $WG_PORT numgen random mod 1000 < $pm drop; }
}
NFT
      nsx bc nft -f - <<NFT
table inet sluice_bench_loss {
  chain pre { type filter hook prerouting priority -300; udp sport $WG_PORT numgen random mod 1000 < $pm drop; }
}
NFT
      ;;
    *) die "loss pattern $pattern: want none, random or burst" ;;
  esac
}

loss_clear() {
  local ns
  for ns in bc bg; do nsx $ns nft delete table inet sluice_bench_loss 2>/dev/null || true; done
  nsx bg ethtool -K bg-eth0 gso on tx-udp-segmentation on >/dev/null 2>&1 || true
  nsx bc ethtool -K bc-eth0 gso on tx-udp-segmentation on >/dev/null 2>&1 || true
}

# m_xfer TEST REP up|down: one iperf3 transfer of LOSS_BYTES, its MB/s and
# seconds. One that has not finished after LOSS_TIMEOUT s is a stall: it
# counts as 0 MB/s, and as such in the median.
m_xfer() {
  local test=$1 r=$2 dir=$3 j rev=()
  [ "$dir" = down ] && rev=(-R)
  if ! j=$(timeout "$LOSS_TIMEOUT" ip netns exec bc iperf3 -c $SRV_IP -n "$LOSS_BYTES" "${rev[@]}" --json 2>&1) ||
    ! jq -e '.end.sum_received.bits_per_second' <<<"$j" >/dev/null 2>&1; then
    log "  $DESIGN $test rep $r: no end within ${LOSS_TIMEOUT} s: a stall"
    echo "$DESIGN $test rep $r: $LOSS_BYTES not moved within $LOSS_TIMEOUT s" >>"$RESULTS/errors.txt"
    rec "$test" "$r" mbytes_per_s 0
    rec "$test" "$r" stalled 1
    nsx bc pkill -x iperf3 2>/dev/null || true
    sleep 1
    return 0
  fi
  rec "$test" "$r" mbytes_per_s "$(jq '.end.sum_received.bits_per_second/8e6' <<<"$j")"
  rec "$test" "$r" seconds "$(jq '.end.sum_received.seconds' <<<"$j")"
  rec "$test" "$r" stalled 0
  log "  $DESIGN $test rep $r: $(jq -r '"\(.end.sum_received.bits_per_second/8e6|round) MB/s in \(.end.sum_received.seconds*100|round/100) s"' <<<"$j")"
  sleep 0.5
}
