#!/bin/sh
# Two tiny guests on one QEMU link (eth0: 10.81.0.1 and .2) with the MTU of a
# VM network carried by VXLAN (1450): a full-size frame with DF set crosses it
# (ping -M do -s 1422: 1422 + 8 + 20 = 1450), one byte more is refused, and
# iperf3 measures the link.  tiny-pa is the client, the other one the server.
ip link set eth0 mtu 1450
echo "pair-check: eth0 mtu $(cat /sys/class/net/eth0/mtu)"
if [ "$(hostname)" != tiny-pa ]; then
    iperf3 -s -1 -D && echo "pair-check: iperf3 server started"
    exit 0
fi
for _ in $(seq 150); do
    ping -c 1 -W 1 10.81.0.2 >/dev/null 2>&1 && break
    sleep 0.2
done
ping -M "do" -s 1422 -c 1 10.81.0.2 | sed 's/^/pair-check: /'
ping -M "do" -s 1423 -c 1 10.81.0.2 2>&1 | sed 's/^/pair-check: /'
for _ in 1 2 3 4 5 6 7 8 9 10; do
    out=$(iperf3 -c 10.81.0.2 -t 2 -f m 2>&1) && break
    sleep 0.5
done
echo "$out" | grep -E 'sender|receiver' | sed 's/^/pair-check: iperf3 /'
