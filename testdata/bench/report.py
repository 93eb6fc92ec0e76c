#!/usr/bin/env python3
"""Turn compare.sh's results into the markdown section of BENCH.md.

Reads RESULTS/raw.tsv (design, test, rep, metric, value), meta.json and
flows.json; prints the section, and with --bench-md FILE replaces the
section headed SECTION in FILE (or appends it), leaving the rest alone.
Every ratio is sluice's median over the baseline's median from the same run.
"""
import argparse
import collections
import json
import os
import re
import statistics
import sys

SECTION = "## WireGuard gateway: sluice vs the classic design"

# (test, metric, label, target) for the WireGuard table. A target is
# (">=", x) or ("<=", x) on the ratio, or None where the row informs.
WG_ROWS = [
    ("tcp_up_P1", "gbps", "TCP client → server, 1 stream (Gbit/s)", (">=", 1.0)),
    ("tcp_up_P4", "gbps", "TCP client → server, 4 streams (Gbit/s)", (">=", 1.0)),
    ("tcp_down_P1", "gbps", "TCP server → client, 1 stream (Gbit/s)", (">=", 1.0)),
    ("tcp_down_P4", "gbps", "TCP server → client, 4 streams (Gbit/s)", (">=", 1.0)),
    ("udp_max", "gbps", "UDP at the client's top rate, received (Gbit/s)", (">=", 1.0)),
    ("udp_max", "sent_gbps", "UDP at the client's top rate, sent (Gbit/s)", None),
    ("udp_max", "loss_pct", "UDP at the client's top rate, loss (%)", ("<=loss", None)),
    ("udp_{rate2}", "gbps", "UDP at {rate2}bit/s, received (Gbit/s)", None),
    ("udp_{rate2}", "loss_pct", "UDP at {rate2}bit/s, loss (%)", ("<=loss", None)),
    ("conn_seq", "conn_per_s", "new HTTP connections/s, one at a time", (">=", 1.0)),
    ("conn_par", "conn_per_s", "new HTTP connections/s, {par} at a time", (">=", 1.0)),
    ("ping", "rtt_avg_ms", "ping RTT, average (ms)", ("<=", 1.1)),
    ("conn_seq", "connect_p50_ms", "TCP connect p50, one at a time (ms)", ("<=", 1.1)),
    ("conn_seq", "connect_p99_ms", "TCP connect p99, one at a time (ms)", ("<=", 1.1)),
    ("conn_par", "connect_p50_ms", "TCP connect p50, {par} at a time (ms)", None),
    ("conn_par", "connect_p99_ms", "TCP connect p99, {par} at a time (ms)", None),
    ("conn_seq", "p50_ms", "whole HTTP exchange p50, one at a time (ms)", None),
    ("conn_seq", "errors", "failed connections, one at a time", None),
    ("conn_par", "errors", "failed connections, {par} at a time", None),
]
CPU_TESTS = [
    ("tcp_up_P1", "TCP client → server, 1 stream"),
    ("tcp_up_P4", "TCP client → server, 4 streams"),
    ("tcp_down_P1", "TCP server → client, 1 stream"),
    ("tcp_down_P4", "TCP server → client, 4 streams"),
    ("udp_max", "UDP at the client's top rate (received)"),
]
TUN_LABEL = {"up": "client → server", "down": "server → client"}


def load(results):
    raw = collections.defaultdict(dict)  # (design, test, metric) -> {rep: value}
    path = os.path.join(results, "raw.tsv")
    if os.path.exists(path):
        for line in open(path):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 5 or parts[4] in ("", "null"):
                continue
            d, t, r, m, v = parts
            raw[(d, t, m)][r] = float(v)
    meta = json.load(open(os.path.join(results, "meta.json")))
    fpath = os.path.join(results, "flows.json")
    flows = json.load(open(fpath)) if os.path.exists(fpath) else None
    npath = os.path.join(results, "notes.txt")
    notes = open(npath).read().strip() if os.path.exists(npath) else ""
    epath = os.path.join(results, "errors.txt")
    errors = [l for l in open(epath).read().splitlines() if l.strip()] if os.path.exists(epath) else []
    return raw, meta, flows, notes, errors


def fmt(x):
    if x is None:
        return "—"
    if x == int(x) and abs(x) < 1e6:
        return f"{int(x):,}"
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.1 or a == 0:
        return f"{x:.2f}"
    return f"{x:.3f}"


class Report:
    def __init__(self, raw, meta):
        self.raw, self.meta = raw, meta
        self.nproc = int(meta["nproc"])

    def values(self, design, test, metric):
        return list(self.raw.get((design, test, metric), {}).values())

    def med(self, design, test, metric):
        v = self.values(design, test, metric)
        return statistics.median(v) if v else None

    def cell(self, design, test, metric):
        v = self.values(design, test, metric)
        if not v:
            return "—"
        m = statistics.median(v)
        if len(v) == 1 or min(v) == max(v):
            return fmt(m)
        return f"{fmt(m)} ({fmt(min(v))}–{fmt(max(v))})"

    def errors(self, design, test):
        return int(sum(self.values(design, test, "error")))

    def per_rep(self, design, test, fn):
        """fn(values of one rep by metric) for every rep; the median."""
        reps = collections.defaultdict(dict)
        for (d, t, m), byrep in self.raw.items():
            if d == design and t == test:
                for r, v in byrep.items():
                    reps[r][m] = v
        out = [x for x in (fn(v) for v in reps.values()) if x is not None]
        return statistics.median(out) if out else None

    def cpu_s_per_gb(self, design, test, who):
        """CPU seconds per GB received: the machine (all cores) or one process."""
        def one(v):
            gbps = v.get("gbps")
            if not gbps:
                return None
            if who == "machine":
                busy = v.get("sys_busy_pct")
                cores = None if busy is None else busy / 100 * self.nproc
            else:
                pct = v.get(f"cpu_{who}_pct")
                cores = None if pct is None else pct / 100
            return None if cores is None else cores / (gbps / 8)
        return self.per_rep(design, test, one)


def fmt_ratio(r):
    if r is None:
        return "—"
    return f"{r:.3f}" if r < 0.1 else f"{r:.2f}" if r < 10 else f"{r:.1f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def verdict(target, r, base, new):
    if target is None:
        return ""
    op, x = target
    if op == "<=loss":
        if base is None or new is None:
            return ""
        return "met" if new <= base + 1.0 else "missed"
    if r is None:
        return "missed"
    ok = r >= x if op == ">=" else r <= x
    return "met" if ok else "missed"


def target_text(target):
    if target is None:
        return ""
    op, x = target
    if op == "<=loss":
        return "≤ classic + 1 point"
    return f"{'≥' if op == '>=' else '≤'} {x:g}"


def wireguard_table(rep, out):
    m = rep.meta
    out.append("| measure | classic | sluice | sluice ÷ classic | target | |")
    out.append("|---|---:|---:|---:|---|---|")
    for test, metric, label, target in WG_ROWS:
        test = test.format(rate2=m["udp_rate2"])
        label = label.format(rate2=m["udp_rate2"], par=m["conn_par"])
        base, new = rep.med("classic", test, metric), rep.med("sluice", test, metric)
        if base is None and new is None:
            continue
        r = ratio(new, base)
        shown = fmt_ratio(r)
        if metric in ("loss_pct", "errors"):
            shown = "—"  # a ratio of small counts says nothing; the target compares the values
        out.append(f"| {label} | {rep.cell('classic', test, metric)} | {rep.cell('sluice', test, metric)} | "
                   f"{shown} | {target_text(target)} | {verdict(target, r, base, new)} |")


def cpu_table(rep, out, base_design, base_name, new_design, tests, gw_base):
    client = any(k[2] == "cpu_client_pct" and k[0] == new_design for k in rep.raw)
    out.append(f"| test | machine CPU s/GB, {base_name} | machine CPU s/GB, sluice | sluice ÷ {base_name} | "
               f"gateway process CPU s/GB, {base_name} | gateway process CPU s/GB, sluice | "
               f"gateway process, % of one core ({base_name} / sluice) |"
               + (f" client wireguard-go, % of one core ({base_name} / sluice) |" if client else ""))
    out.append("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if client else ""))
    for test, label in tests:
        if rep.med(base_design, test, "gbps") is None and rep.med(new_design, test, "gbps") is None:
            continue
        mb, mn = rep.cpu_s_per_gb(base_design, test, "machine"), rep.cpu_s_per_gb(new_design, test, "machine")
        gb = rep.cpu_s_per_gb(base_design, test, "gw") if gw_base else None
        gn = rep.cpu_s_per_gb(new_design, test, "gw")
        pb = rep.med(base_design, test, "cpu_gw_pct") if gw_base else None
        pn = rep.med(new_design, test, "cpu_gw_pct")
        r = ratio(mn, mb)
        row = (f"| {label} | {fmt(mb)} | {fmt(mn)} | {fmt_ratio(r)} | "
               f"{fmt(gb) if gw_base else 'kernel (in machine)'} | {fmt(gn)} | "
               f"{fmt(pb) if gw_base else '—'} / {fmt(pn)} |")
        if client:
            row += (f" {fmt(rep.med(base_design, test, 'cpu_client_pct'))} / "
                    f"{fmt(rep.med(new_design, test, 'cpu_client_pct'))} |")
        out.append(row)


def tun_table(rep, out):
    tests = []
    for t in rep.meta["tun_tests"].split():
        d, p = t.split(":")
        tests.append((f"tcp_{d}_P{p}", f"TCP {TUN_LABEL.get(d, d)}, {p} stream{'s' if p != '1' else ''}"))
    out.append("| measure | kernel forwarding + MASQUERADE | sluice serve --tun | sluice ÷ kernel | target | |")
    out.append("|---|---:|---:|---:|---|---|")
    for test, label in tests:
        base, new = rep.med("kfwd", test, "gbps"), rep.med("sluice_tun", test, "gbps")
        if base is None and new is None:
            continue
        r = ratio(new, base)
        out.append(f"| {label} (Gbit/s) | {rep.cell('kfwd', test, 'gbps')} | {rep.cell('sluice_tun', test, 'gbps')} | "
                   f"{fmt_ratio(r)} | ≥ 0.6 | {verdict(('>=', 0.6), r, base, new)} |")
    return tests


def flows_table(flows, out):
    o, e = flows.get("open", {}), flows.get("echo", {})
    n, opened = o.get("n"), o.get("ok", 0)
    before, with_flows = flows["rss_before_kib"], flows["rss_open_kib"]
    per = (with_flows - before) / opened if opened else None
    out.append("| measure | value |")
    out.append("|---|---:|")
    out.append(f"| flows asked for | {n:,} |")
    out.append(f"| flows opened (failed) | {opened:,} ({o.get('failed', 0):,}) in {o.get('seconds', 0):.1f} s |")
    out.append(f"| TCP flows in sluice's table with all open | {flows['gateway_tcp_flows']:,} |")
    out.append(f"| flows that echoed their byte at the end (failed) | {e.get('ok', 0):,} ({e.get('failed', 0):,}) |")
    out.append(f"| sluice RSS before (MiB) | {before / 1024:.1f} |")
    out.append(f"| sluice RSS with the flows open, idle (MiB) | {with_flows / 1024:.1f} |")
    out.append(f"| sluice RSS after the echo (MiB); peak VmHWM | {flows['rss_after_echo_kib'] / 1024:.1f}; "
               f"{flows['vmhwm_kib'] / 1024:.1f} |")
    out.append(f"| sluice open files with the flows open | {flows['gateway_fds']:,} |")
    if per is not None:
        verdict_ = "met" if per <= 20 else "missed"
        out.append(f"| **RSS per flow (KiB)**, target ≤ 20 | **{per:.1f}** ({verdict_}) |")
        out.append(f"| 100,000 flows, extrapolated (GiB) | {(before + 100000 * per) / 1048576:.2f} |")
    for k, v in (("open", o), ("echo", e)):
        if v.get("first_error"):
            out.append(f"| first {k} error | `{v['first_error']}` |")


LOSS_LABEL = {"none": "no loss", "random": "{pct} % of datagrams, one by one",
              "burst": "{pct} % of GSO batches (bursts)"}


def loss_tests(rep):
    """The loss scenario's tests, in LOSS_PATTERNS order: (pattern, pct, tag)."""
    out = []
    for p in rep.meta.get("loss_patterns", "").split():
        pattern, pct = p.split(":")
        out.append((pattern, pct, f"loss_{pattern}_{pct.replace('.', '_')}"))
    return out


def loss_table(rep, out):
    out.append("| tunnel's UDP lost each way | direction | classic (MB/s) | sluice (MB/s) | sluice ÷ classic "
               "| stalls (classic / sluice) | target | |")
    out.append("|---|---|---:|---:|---:|---|---|---|")
    for pattern, pct, tag in loss_tests(rep):
        for d, label in (("down", "server → client"), ("up", "client → server")):
            test = f"{tag}_{d}"
            base, new = rep.med("classic", test, "mbytes_per_s"), rep.med("sluice", test, "mbytes_per_s")
            if base is None and new is None:
                continue
            r = ratio(new, base)
            stalls = (f"{int(sum(rep.values('classic', test, 'stalled')))} / "
                      f"{int(sum(rep.values('sluice', test, 'stalled')))}")
            target = None if pattern == "none" or float(pct) == 0 else (">=", 0.8)
            out.append(f"| {LOSS_LABEL[pattern].format(pct=pct)} | {label} | {rep.cell('classic', test, 'mbytes_per_s')} "
                       f"| {rep.cell('sluice', test, 'mbytes_per_s')} | {fmt_ratio(r)} | {stalls} "
                       f"| {target_text(target)} | {verdict(target, r, base, new)} |")


def render(raw, meta, flows, notes, errors):
    rep = Report(raw, meta)
    m = meta
    out = [SECTION, ""]
    out.append(
        "One WireGuard client (the `wireguard-go` command on a kernel TUN, configured with `wg`) in "
        "namespace bc talks through a gateway namespace bg to a server namespace bs that has no route "
        "back to the client: bg is either **classic** — `wireguard-go` on a kernel TUN, `ip_forward`, "
        "iptables MASQUERADE and conntrack, the design sluice replaces — or **sluice** — `sluice serve` "
        "as the WireGuard server, terminating every flow and re-dialling it from bg's address. Both run in "
        "the same invocation, alternating within each repetition; each figure is the median of "
        f"{m['reps']} (range in brackets), and every ratio is sluice's median over the classic design's "
        "from the same run. Client, gateway and server share the machine's cores.")
    out.append("")
    out.append(f"- Machine: {m['nproc']} cores ({m['cpu']}), {m['mem']}, kernel {m['kernel']}, "
               f"open files hard limit {m['nofile']}. Load average (1, 5, 15 min) at the start "
               f"{m.get('load_start', '?')}, at the end {m.get('load_end', '?')}: other work on the "
               "machine during the run widens the ranges.")
    dirty = int(m["dirty"])
    out.append(f"- Date: {m['date']}. sluice built from commit {m['commit']}"
               + (f" plus {dirty} changed or new file(s) in the work tree under cmd, pkg, netstack, nat "
                  "and tunnel (other work in progress)" if dirty else "")
               + f"; {m['go']}; wireguard-go {m['wggo']} (built from go.mod's version); "
               f"iperf3 {m['iperf3']}; {m['iptables']}.")
    out.append(f"- Command: `REPS={m['reps']} DUR={m['dur']} make bench` (as root), which runs "
               "`go test -run '^$' -bench . -benchmem ./...` and then `testdata/bench/compare.sh`; "
               "`testdata/bench/README.md` says what each step does.")
    out.append(f"- Each iperf3 run lasts {m['dur']} s (TCP: after 1 s left out); UDP datagrams are "
               f"{m['udp_len']} bytes; connection rate: {m['conn_n']} HTTP/1.1 requests for a 13-byte "
               "file, one connection each.")
    out.append("")
    out.append("### WireGuard: sluice serve against wireguard-go + iptables MASQUERADE")
    out.append("")
    if not any(d in ("classic", "sluice") for (d, _, _) in raw):
        out.append("Not run.")
    wireguard_table(rep, out)
    errs = [(d, t) for (d, t, mm) in raw if mm == "error"]
    if errs:
        out.append("")
        out.append("Runs that failed and are left out: " + ", ".join(
            f"{d} {t} ×{rep.errors(d, t)}" for d, t in sorted(set(errs))) + ".")
    if errors:
        out.append("")
        out.append("Failures seen:")
        out.append("")
        out.extend(f"- {e}" for e in errors)
    out.append("")
    out.append("CPU seconds per gigabyte received. *Machine* is every core's busy time (user, system, "
               "softirq) over the run, client, server and iperf3 included: the only figure that "
               "counts the kernel's forwarding and NAT work, which belongs to no process. *Gateway "
               "process* is `wireguard-go` in bg for the classic design and `sluice` for sluice.")
    out.append("")
    cpu_table(rep, out, "classic", "classic", "sluice", CPU_TESTS, True)
    out.append("")
    out.append("### TUN mode: sluice serve --tun against kernel forwarding + MASQUERADE")
    out.append("")
    out.append("No tunnel between bc and bg. Baseline: bg forwards with iptables MASQUERADE. sluice: "
               "`sluice serve --tun` (MTU 1500, as the veths), with policy routing in bg sending "
               "everything that arrives from bc into the TUN (as `cmd/sluice/serve_tun_test.go` does). "
               "sluice opens the TUN with virtio-net headers and TCP segmentation offload, so TCP "
               "crosses between the kernel and its stack in segments of up to 64 KiB each way.")
    out.append("")
    if any(d in ("kfwd", "sluice_tun") for (d, _, _) in raw):
        tests = tun_table(rep, out)
        out.append("")
        cpu_table(rep, out, "kfwd", "kernel", "sluice_tun", tests, False)
    else:
        out.append("Not run.")
    out.append("")
    out.append("### Idle flows: sluice's memory per flow")
    out.append("")
    if flows:
        out.append(f"`idleflows` in bc opens the flows 32 at a time to 16 ports of bs, round-robin, "
                   f"through `sluice serve --egress-ports {flows['egress_ports']}` (a 1,000-port slice; "
                   "the kernel reuses an egress port once per destination), keeps them idle, then sends "
                   "one byte on each and expects it back. RSS is VmRSS from /proc; per flow is (with the "
                   "flows open − before) ÷ flows opened. Every flow holds one egress socket, so the "
                   f"open-files hard limit ({m['nofile']}) caps the flows one process can carry here.")
        out.append("")
        flows_table(flows, out)
        if notes:
            out.append("")
            out.append("sluice's log at start: `" + notes.replace("\n", "` `") + "`")
    else:
        out.append("Not run.")
    out.append("")
    out.append("### Loss: the same WireGuard pair over a link that loses packets")
    out.append("")
    if loss_tests(rep) and any(t.startswith("loss_") for (_, t, _) in raw):
        out.append(f"Each transfer moves {m.get('loss_bytes')} with iperf3 (`-n`, `-R` for server → client) "
                   f"while nftables drops a share of the tunnel's UDP each way; one that has not ended after "
                   f"{m.get('loss_timeout')} s counts as a stall and as 0 MB/s. *Datagrams one by one*: GSO is "
                   "off on both veths and the rule sits at each receiver's prerouting, so every datagram "
                   "is lost or not on its own, as on a radio link. *GSO batches*: the rule sits in the "
                   "gateway namespace's prerouting and postrouting, where a UDP GSO datagram — a batch of "
                   "up to 64 WireGuard packets — is one packet to netfilter: losses come in bursts. The "
                   "classic design's TCP is the server's own, end to end "
                   f"(`net.ipv4.tcp_congestion_control` = {m.get('origin_cc', '?')} here); sluice's "
                   "connections to the client use its `tcp.congestion_control` (bbr by default).")
        out.append("")
        loss_table(rep, out)
    else:
        out.append("Not run.")
    out.append("")
    out.append("### Settings that differ from the defaults")
    out.append("")
    out.append("- sluice runs with `--config` giving `policy.limits` 0 (no per-peer new-flow rate or flow "
               "cap: the classic design has none, and the default 100 new flows a second would measure "
               "the limiter rather than the gateway) and `shutdown.grace: 0s`; everything else comes from "
               "the flags: `--listen :51820 --endpoint 10.99.1.1:51820 --allow 10.99.2.0/24 "
               "--egress-addr 10.99.2.1 --dns-upstream 10.99.2.2:53`.")
    out.append("- The client's peer on sluice is added with `sluice peer add bench --public-key …`; sluice "
               "gives each peer a preshared key, so the classic gateway and the client use one as well.")
    out.append("")
    return "\n".join(out)


def replace_section(path, text):
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    lines = old.split("\n")
    start = next((i for i, l in enumerate(lines) if l.strip() == SECTION), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^## ", lines[i])), len(lines))
        rest = "\n".join(lines[end:])
        head = "\n".join(lines[:start])
        new = (head + "\n" if head else "") + text + ("\n" + rest if rest.strip() else "")
    open(path, "w").write(new.rstrip("\n") + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default=os.environ.get("RESULTS", "/tmp/sluice-bench/results"))
    ap.add_argument("--bench-md", help="BENCH.md to update")
    a = ap.parse_args()
    raw, meta, flows, notes, errors = load(a.results)
    text = render(raw, meta, flows, notes, errors)
    print(text)
    if a.bench_md:
        replace_section(a.bench_md, text)
        print(f"wrote the section to {a.bench_md}", file=sys.stderr)


if __name__ == "__main__":
    main()
