#!/bin/sh
# Debian's ping and iperf3 in the tiny image: they load with their libraries,
# ping sets DF on full-size frames (-M do; busybox's ping has no -M), iperf3 measures.
echo "tools-check: $(ping -V | head -n 1)"
ping -M "do" -s 1422 -c 1 127.0.0.1 | sed 's/^/tools-check: /'
echo "tools-check: $(iperf3 --version | head -n 1)"
iperf3 -s -1 -D
for _ in 1 2 3 4 5 6 7 8 9 10; do
    out=$(iperf3 -c 127.0.0.1 -t 1 -f m 2>&1) && break
    sleep 0.2
done
echo "$out" | grep receiver | sed 's/^/tools-check: iperf3 /'
