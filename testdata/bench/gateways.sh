# The designs under test, each brought up in bg (and its client in bc) by
# DESIGN_up and taken down by DESIGN_down: sourced by compare.sh.
#
# WireGuard designs, the client identical in both:
#   classic  wireguard-go on a kernel TUN in bg, ip_forward, iptables
#            MASQUERADE and conntrack (the design sluice replaces)
#   sluice   `sluice serve` in bg as the WireGuard server
# TUN designs, no tunnel between bc and bg:
#   kfwd        plain kernel forwarding in bg with iptables MASQUERADE
#   sluice_tun  `sluice serve --tun` in bg; policy routing sends what
#               arrives from bc into its TUN
#
# An up function sets CPU_PIDS ("name:pid ...") for the CPU accounting;
# the gateway process, where there is one, is called gw.

# -------------------------------------------------------------- the client
# wg_keys makes the client's and the classic gateway's keys, once a run.
# sluice gives each peer a preshared key; the classic gateway gets one too,
# so that the client's configuration differs only in keys and address.
wg_keys() {
  umask 077
  wg genkey >"$STATE/bc.key"; wg pubkey <"$STATE/bc.key" >"$STATE/bc.pub"
  wg genkey >"$STATE/bg.key"; wg pubkey <"$STATE/bg.key" >"$STATE/bg.pub"
  wg genpsk >"$STATE/classic.psk"
  umask 022
}

# start_wireguard_go NS IFACE: sets START_PID.
start_wireguard_go() {
  local ns=$1 ifn=$2
  rm -f /var/run/wireguard/$ifn.sock
  start_in "wireguard-go-$ifn" "$ns" env LOG_LEVEL=error WG_PROCESS_FOREGROUND=1 "$BIN/wireguard-go" -f "$ifn"
  wait_for 5 test -S /var/run/wireguard/$ifn.sock || die "wireguard-go in $ns did not start: $(cat "$START_LOG")"
}

# client_up SERVER_PUBKEY PSK_FILE ADDRESS/PREFIX: the same client for both
# designs, wireguard-go on a kernel TUN configured with wg, the server's
# network routed into the tunnel. Sets CLIENT_PID.
client_up() {
  local pub=$1 psk=$2 addr=$3
  start_wireguard_go bc $WG_CLIENT_IF
  CLIENT_PID=$START_PID
  nsx bc wg set $WG_CLIENT_IF private-key "$STATE/bc.key" \
    peer "$pub" preshared-key "$psk" endpoint $GW_C_IP:$WG_PORT allowed-ips 0.0.0.0/0 persistent-keepalive 25
  nsx bc ip addr add "$addr" dev $WG_CLIENT_IF
  nsx bc ip link set $WG_CLIENT_IF mtu $WG_MTU up
  nsx bc ip route replace $SRV_NET dev $WG_CLIENT_IF
}

client_down() {
  nsx bc ip route replace $SRV_NET via $GW_C_IP
  stop_pid "$CLIENT_PID"
  rm -f /var/run/wireguard/$WG_CLIENT_IF.sock
}

# check_path: bc reaches bs by ping and HTTP, and bs saw only bg's address.
check_path() {
  wait_for 10 nsx bc ping -n -c1 -W1 $SRV_IP || { nsx bc wg show 2>/dev/null; die "$DESIGN: bc cannot ping $SRV_IP"; }
  nsx bc curl -fsS -m 5 -o /dev/null http://$SRV_IP:$HTTP_PORT/tiny || die "$DESIGN: HTTP from bc to bs failed"
  if grep -vqx "$GW_S_IP" "$STATE/peers.txt"; then
    die "$DESIGN: the server saw $(grep -vx "$GW_S_IP" "$STATE/peers.txt" | tr '\n' ' '): not NATed to $GW_S_IP"
  fi
}

# ------------------------------------------------- classic: wireguard-go + NAT
classic_up() {
  start_wireguard_go bg $WG_GW_IF
  local gw=$START_PID
  nsx bg wg set $WG_GW_IF listen-port $WG_PORT private-key "$STATE/bg.key" \
    peer "$(cat "$STATE/bc.pub")" preshared-key "$STATE/classic.psk" allowed-ips 10.99.100.2/32
  nsx bg ip addr add 10.99.100.1/24 dev $WG_GW_IF
  nsx bg ip link set $WG_GW_IF mtu $WG_MTU up
  nsx bg iptables -t nat -A POSTROUTING -s $WG_NET -o bg-eth1 -j MASQUERADE
  client_up "$(cat "$STATE/bg.pub")" "$STATE/classic.psk" 10.99.100.2/24
  GW_PID=$gw
  CPU_PIDS="client:$CLIENT_PID gw:$GW_PID"
  check_path
}

classic_down() {
  client_down
  stop_pid "$GW_PID"
  rm -f /var/run/wireguard/$WG_GW_IF.sock
  nsx bg iptables -t nat -D POSTROUTING -s $WG_NET -o bg-eth1 -j MASQUERADE || true
  nsx bg conntrack -F 2>/dev/null || true
}

# ---------------------------------------------------------- sluice (WireGuard)
# sluice_config writes the settings that have no flag: the per-peer limits
# off (the classic design has none; the default 100 new flows a second
# would measure the limiter, not the data path) and no shutdown grace.
sluice_config() {
  cat >"$STATE/sluice.yaml" <<EOF
policy:
  limits:
    new_flows_per_second: 0
    burst: 0
    max_flows: 0
shutdown:
  grace: 0s
EOF
}

# start_sluice NAME ARGS...: `sluice serve` in bg; sets GW_PID and GW_LOG.
start_sluice() {
  local name=$1; shift
  start_in "$name" bg "$SLUICE" serve --config "$STATE/sluice.yaml" "$@"
  GW_PID=$START_PID GW_LOG=$START_LOG
}

# sluice_up [EXTRA SERVE ARGS]: the WireGuard server with a fresh state, the
# client's key added as peer "bench" through the running gateway.
sluice_up() {
  local st=$STATE/sluice conf addr pub psk
  rm -rf "$st"
  start_sluice sluice --state "$st" --listen :$WG_PORT --endpoint $GW_C_IP:$WG_PORT \
    --allow $SRV_NET --egress-addr $GW_S_IP --dns-upstream $SRV_IP:53 "$@"
  wait_for 20 nsx bg "$SLUICE" peer list --state "$st" ||
    die "sluice serve did not come up: $(tail -20 "$GW_LOG")"
  conf=$(nsx bg "$SLUICE" peer add bench --public-key "$(cat "$STATE/bc.pub")" --state "$st") ||
    die "sluice peer add failed: $conf"
  printf '%s\n' "$conf" >"$STATE/sluice-bench-peer.conf"
  # Address = 100.96.0.x/32, fd5c:1ce::x/128; the [Peer]'s keys.
  addr=$(sed -n 's/^Address *= *//p' <<<"$conf" | tr ',' '\n' | tr -d ' ' | grep -m1 '\.')
  pub=$(sed -n 's/^PublicKey *= *//p' <<<"$conf" | head -1)
  psk=$(sed -n 's/^PresharedKey *= *//p' <<<"$conf" | head -1)
  [ -n "$addr" ] && [ -n "$pub" ] || die "cannot read Address and PublicKey from sluice peer add: $conf"
  local pskfile=/dev/null   # wg's way to say "no preshared key"
  if [ -n "$psk" ]; then
    pskfile=$STATE/sluice.psk
    (umask 077; printf '%s\n' "$psk" >"$pskfile")
  fi
  client_up "$pub" "$pskfile" "$addr"
  CPU_PIDS="client:$CLIENT_PID gw:$GW_PID"
  check_path
}

sluice_down() {
  client_down
  stop_pid "$GW_PID"
}

# ------------------------------------------------------------- kfwd: TUN baseline
kfwd_up() {
  nsx bg iptables -t nat -A POSTROUTING -s $CL_NET -o bg-eth1 -j MASQUERADE
  nsx bc ip route replace $SRV_NET via $GW_C_IP
  CPU_PIDS=""
  check_path
}

kfwd_down() {
  nsx bg iptables -t nat -D POSTROUTING -s $CL_NET -o bg-eth1 -j MASQUERADE || true
  nsx bg conntrack -F 2>/dev/null || true
}

# ------------------------------------------------------ sluice_tun: serve --tun
# As cmd/sluice/serve_tun_test.go does it: whatever arrives on bg's
# client-facing veth goes into the TUN, and sluice re-dials from bg. The
# TUN's MTU is the veth's, so that both designs see the same packets.
sluice_tun_up() {
  local st=$STATE/sluice-tun
  rm -rf "$st"
  start_sluice sluice-tun --state "$st" --tun $SLUICE_TUN_IF --mtu 1500 \
    --allow $SRV_NET --egress-addr $GW_S_IP --dns-upstream $SRV_IP:53
  wait_for 20 sh -c "ip -n bg -o link show dev $SLUICE_TUN_IF | grep -q '[<,]UP[,>]'" ||
    die "sluice serve --tun did not bring $SLUICE_TUN_IF up: $(tail -20 "$GW_LOG")"
  nsx bg sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.$SLUICE_TUN_IF.rp_filter=0
  nsx bg ip route add default dev $SLUICE_TUN_IF table $TUN_TABLE
  nsx bg ip rule add iif bg-eth0 lookup $TUN_TABLE
  nsx bc ip route replace $SRV_NET via $GW_C_IP
  CPU_PIDS="gw:$GW_PID"
  check_path
}

sluice_tun_down() {
  nsx bg ip rule del iif bg-eth0 lookup $TUN_TABLE || true
  stop_pid "$GW_PID"
}
