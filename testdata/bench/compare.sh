#!/usr/bin/env bash
# sluice against the design it replaces, measured side by side in one run on
# this machine; `make bench` runs it as root. See README.md.
#
#   REPS=3 DUR=10 testdata/bench/compare.sh
#
# 1. WireGuard: the same client (wireguard-go on a kernel TUN in bc) through
#    bg running either the classic design (wireguard-go, ip_forward, iptables
#    MASQUERADE, conntrack) or `sluice serve`. TCP 1 and 4 streams each way,
#    UDP, ping, new connections per second, CPU.
# 2. TUN mode: plain kernel forwarding with MASQUERADE in bg against
#    `sluice serve --tun` with policy routing into its TUN. TCP.
# 3. Idle flows: FLOWS idle TCP connections through `sluice serve` with a
#    1,000-port egress slice; sluice's RSS before and after, one byte echoed
#    on every flow at the end.
# 4. Loss: the same WireGuard pair moving LOSS_BYTES each way while
#    nftables drops a share of the tunnel's UDP, datagram by datagram or
#    in GSO-sized bursts (LOSS_PATTERNS; loss_set in lib.sh).
# The designs alternate within each repetition (classic first in odd ones),
# so that a slow patch of the machine does not favour one of them. Medians,
# ratios and the BENCH.md section come from report.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/topology.sh"
source "$BENCH_DIR/gateways.sh"

TUN_TESTS=${TUN_TESTS:-"up:1 down:1"}   # DIRECTION:STREAMS for the TUN-mode scenario
SCENARIOS=${SCENARIOS:-"wireguard tun flows loss"}
WRITE_BENCH_MD=${WRITE_BENCH_MD:-1}

[ "$(id -u)" = 0 ] || die "needs root: it creates network namespaces, TUN devices and iptables rules"
for t in ip iperf3 wg iptables conntrack curl ping jq python3 go make nft ethtool; do
  command -v $t >/dev/null || die "$t is not installed (make bench-deps installs what is missing)"
done
[ -e /dev/net/tun ] || die "/dev/net/tun is missing: the kernel TUN driver is needed"

trap 'topo_down' EXIT
trap 'exit 130' INT TERM
STARTED=$SECONDS

build_all
: >"$RAW"
rm -f "$RESULTS/flows.json" "$RESULTS/notes.txt" "$RESULTS/errors.txt"
rm -rf "$STATE/logs"

# ------------------------------------------------------------------ meta
# The binary is built from the work tree: count what differs from HEAD
# there, new files included, so that the report says so.
git_dirty=$(cd "$REPO" && git status --porcelain -- cmd pkg netstack nat tunnel go.mod go.sum 2>/dev/null | wc -l)
jq -n \
  --arg date "$(date -u '+%Y-%m-%d %H:%M UTC')" \
  --arg nproc "$(nproc)" \
  --arg kernel "$(uname -r)" \
  --arg cpu "$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')" \
  --arg mem "$(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)" \
  --arg nofile "$(ulimit -Hn)" \
  --arg go "$(go version | awk '{print $3}')" \
  --arg commit "$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --arg dirty "$git_dirty" \
  --arg wggo "$(cd "$REPO" && go list -m -f '{{.Version}}' golang.zx2c4.com/wireguard)" \
  --arg iperf3 "$(iperf3 --version | head -1 | awk '{print $2}')" \
  --arg iptables "$(iptables --version)" \
  --arg reps "$REPS" --arg dur "$DUR" --arg udp_len "$UDP_LEN" --arg udp_rate2 "$UDP_RATE2" \
  --arg conn_n "$CONN_N" --arg conn_par "$CONN_PAR" --arg flows "$FLOWS" \
  --arg egress_ports "$EGRESS_PORTS" --arg tun_tests "$TUN_TESTS" \
  --arg loss_patterns "$LOSS_PATTERNS" --arg loss_bytes "$LOSS_BYTES" --arg loss_timeout "$LOSS_TIMEOUT" \
  --arg origin_cc "$(sysctl -n net.ipv4.tcp_congestion_control)" \
  --arg load_start "$(cut -d' ' -f1-3 /proc/loadavg)" \
  '$ARGS.named' >"$RESULTS/meta.json"

topo_up
wg_keys
sluice_config

# ------------------------------------------------------------- scenarios
wg_suite() {
  local r=$1
  m_tcp tcp_up_P1 "$r" 1 up
  m_tcp tcp_up_P4 "$r" 4 up
  m_tcp tcp_down_P1 "$r" 1 down
  m_tcp tcp_down_P4 "$r" 4 down
  m_udp udp_max "$r" 0
  [ -z "$UDP_RATE2" ] || m_udp "udp_$UDP_RATE2" "$r" "$UDP_RATE2"
  m_ping ping "$r"
  m_conn conn_seq "$r" "$CONN_N" 1 /tiny
  m_conn conn_par "$r" "$CONN_N" "$CONN_PAR" /tiny
}

tun_suite() {
  local r=$1 t
  for t in $TUN_TESTS; do
    m_tcp "tcp_${t%%:*}_P${t#*:}" "$r" "${t#*:}" "${t%%:*}"
  done
}

loss_suite() {
  local r=$1 p pattern pct tag
  for p in $LOSS_PATTERNS; do
    pattern=${p%%:*} pct=${p#*:}
    tag=loss_${pattern}_${pct/./_}
    loss_set "$pattern" "$pct"
    m_xfer "${tag}_down" "$r" down
    m_xfer "${tag}_up" "$r" up
    loss_clear
  done
}

# alternate R A B: A then B in odd repetitions, B then A in even ones.
alternate() { if [ $(($1 % 2)) = 1 ]; then echo "$2 $3"; else echo "$3 $2"; fi; }

run_pair() { # SUITE A B
  local suite=$1 r d
  for r in $(seq "$REPS"); do
    for d in $(alternate "$r" "$2" "$3"); do
      DESIGN=$d LOG_TAG=-r$r
      log "== $suite: $d, repetition $r of $REPS"
      "${d}_up"
      "$suite" "$r"
      "${d}_down"
    done
  done
}

# rss_kib PID: resident set size from /proc/PID/status.
rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

flows_scenario() {
  DESIGN=sluice LOG_TAG=-flows
  log "== idle flows: $FLOWS TCP flows through sluice serve --egress-ports $EGRESS_PORTS"
  sluice_up --egress-ports "$EGRESS_PORTS"
  grep -m1 'open file limit' "$GW_LOG" | sed 's/^[^ \t]*[ \t]*//' >>"$RESULTS/notes.txt" || true
  sleep 1
  local rss0 rss1 rss2 open_line echo_line gwflows fds
  rss0=$(rss_kib "$GW_PID")
  coproc FLOWCLIENT { nsx bc "$BIN/idleflows" open -addr $SRV_IP -port $FLOW_PORT -ports $FLOW_PORTS -n "$FLOWS" -c 32 2>&1; }
  local in=${FLOWCLIENT[0]} out=${FLOWCLIENT[1]} cpid=$FLOWCLIENT_PID
  read -r -t 300 open_line <&"$in" || open_line='{}'
  log "  opened: $open_line"
  sleep 2   # let the gateway finish what the opening started
  rss1=$(rss_kib "$GW_PID")
  fds=$(ls "/proc/$GW_PID/fd" | wc -l)
  gwflows=$(nsx bg "$SLUICE" flows --count -p tcp --state "$STATE/sluice" 2>/dev/null || echo -1)
  echo >&"$out"
  read -r -t 300 echo_line <&"$in" || echo_line='{}'
  log "  echoed: $echo_line"
  wait "$cpid" || true
  rss2=$(rss_kib "$GW_PID")
  local hwm; hwm=$(awk '/^VmHWM:/{print $2}' "/proc/$GW_PID/status")
  jq -n --argjson open "$open_line" --argjson echo "$echo_line" \
    --arg rss0 "$rss0" --arg rss1 "$rss1" --arg rss2 "$rss2" --arg hwm "$hwm" \
    --arg fds "$fds" --arg gwflows "$gwflows" --arg egress "$EGRESS_PORTS" --arg ports "$FLOW_PORTS" \
    '{open: $open, echo: $echo, rss_before_kib: ($rss0|tonumber), rss_open_kib: ($rss1|tonumber),
      rss_after_echo_kib: ($rss2|tonumber), vmhwm_kib: ($hwm|tonumber), gateway_fds: ($fds|tonumber),
      gateway_tcp_flows: ($gwflows|tonumber), egress_ports: $egress, server_ports: ($ports|tonumber)}' \
    >"$RESULTS/flows.json"
  log "  sluice RSS ${rss0} KiB before, ${rss1} KiB with the flows open, ${rss2} KiB after the echo; $fds open files; $gwflows TCP flows in its table"
  sluice_down
}

for s in $SCENARIOS; do
  case $s in
    wireguard) run_pair wg_suite classic sluice ;;
    tun) run_pair tun_suite kfwd sluice_tun ;;
    flows) flows_scenario ;;
    loss) run_pair loss_suite classic sluice ;;
    *) die "unknown scenario $s (wireguard, tun, flows, loss)" ;;
  esac
done

topo_down
trap - EXIT
# Other work on the machine shows here: the bench alone keeps about 1.5 of
# 2 cores busy.
jq --arg l "$(cut -d' ' -f1-3 /proc/loadavg)" '.load_end = $l' "$RESULTS/meta.json" >"$RESULTS/meta.json.new" &&
  mv "$RESULTS/meta.json.new" "$RESULTS/meta.json"
log "measured in $(((SECONDS - STARTED) / 60)) min $(((SECONDS - STARTED) % 60)) s; raw figures in $RESULTS, logs in $STATE/logs"
args=()
[ "$WRITE_BENCH_MD" = 1 ] && args=(--bench-md "$REPO/BENCH.md")
python3 "$BENCH_DIR/report.py" --results "$RESULTS" "${args[@]}"
