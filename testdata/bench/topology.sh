#!/usr/bin/env bash
# The bench's three namespaces and the servers in bs.
#
#   bc (client) 10.99.1.2 ──veth── 10.99.1.1 bg (gateway) 10.99.2.1 ──veth── 10.99.2.2 bs (server)
#
# bs runs iperf3 -s (5201), httpsrv on 8080 (/tiny, 13 bytes; /1m, 1 MiB)
# and idleflows on 9000-9015. bs has no route to bc's network or to any
# tunnel address, so only NATed traffic is answered; httpsrv appends each
# source address it sees to $STATE/peers.txt, which the scripts check.
#
# Sourced by compare.sh for topo_up/topo_down; run alone:
#   topology.sh up|down|status
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

topo_up() {
  topo_down
  local ns
  for ns in bc bg bs; do ip netns add $ns; nsx $ns ip link set lo up; done
  ip link add bc-eth0 netns bc type veth peer name bg-eth0 netns bg
  ip link add bg-eth1 netns bg type veth peer name bs-eth0 netns bs
  nsx bc ip addr add $CL_IP/24 dev bc-eth0
  nsx bg ip addr add $GW_C_IP/24 dev bg-eth0
  nsx bg ip addr add $GW_S_IP/24 dev bg-eth1
  nsx bs ip addr add $SRV_IP/24 dev bs-eth0
  nsx bc ip link set bc-eth0 up
  nsx bg ip link set bg-eth0 up
  nsx bg ip link set bg-eth1 up
  nsx bs ip link set bs-eth0 up
  nsx bg sysctl -qw net.ipv4.ip_forward=1
  # The client reaches the server through bg; each scenario points this
  # route into its tunnel, or leaves it for plain forwarding.
  nsx bc ip route add $SRV_NET via $GW_C_IP
  # Room for the connection-rate and idle-flow runs.
  nsx bc sysctl -qw net.ipv4.ip_local_port_range="1024 65000"
  nsx bs sysctl -qw net.core.somaxconn=4096

  mkdir -p "$STATE/www"
  printf 'hello, bench\n' >"$STATE/www/tiny"
  head -c 1048576 /dev/urandom >"$STATE/www/1m"
  rm -f "$STATE/peers.txt"
  local log1 log2 log3
  start_in iperf3 bs iperf3 -s; log1=$START_LOG
  start_in httpsrv bs "$BIN/httpsrv" -addr :$HTTP_PORT -dir "$STATE/www" -peers "$STATE/peers.txt"; log2=$START_LOG
  start_in idleflows-server bs "$BIN/idleflows" serve -addr $SRV_IP -port $FLOW_PORT -ports $FLOW_PORTS; log3=$START_LOG
  wait_for 5 nsx bs bash -c "exec 3<>/dev/tcp/127.0.0.1/5201" || die "iperf3 -s did not start: $(cat "$log1")"
  wait_for 5 nsx bs bash -c "exec 3<>/dev/tcp/127.0.0.1/$HTTP_PORT" || die "httpsrv did not start: $(cat "$log2")"
  wait_for 5 nsx bs bash -c "exec 3<>/dev/tcp/$SRV_IP/$FLOW_PORT" || die "idleflows serve did not start: $(cat "$log3")"
  # A veth drops what it sends until the kernel has seen its carrier come
  # up; one ping each way settles ARP too.
  wait_for 5 nsx bc ping -c1 -W1 $GW_C_IP || die "bc cannot reach bg"
  wait_for 5 nsx bs ping -c1 -W1 $GW_S_IP || die "bs cannot reach bg"
}

topo_down() {
  stop_all
  local ns p
  for ns in bc bg bs; do
    if ip netns list | grep -qE "^$ns( |\$)"; then
      # Only processes that ran inside the bench's own namespaces.
      for p in $(ip netns pids $ns 2>/dev/null); do kill "$p" 2>/dev/null || true; done
      ip netns del $ns
    fi
  done
  rm -f /var/run/wireguard/$WG_CLIENT_IF.sock /var/run/wireguard/$WG_GW_IF.sock
}

topo_status() {
  local ns
  for ns in bc bg bs; do
    ip netns list | grep -qE "^$ns( |\$)" || { echo "[$ns] absent"; continue; }
    echo "[$ns]"
    nsx $ns ip -br addr | grep -v '^lo'
    nsx $ns ss -ltnup 2>/dev/null | tail -n +2
  done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    up) build_all; topo_up; trap - EXIT; topo_status ;;
    down) topo_down ;;
    status) topo_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
  esac
fi
