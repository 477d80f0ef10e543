#!/bin/sh
fam write 0 0x76636c31
echo "fam-a: wrote $(fam read 0)"
for _ in $(seq 600); do
    v=$(fam read 8)
    if [ "$v" = 0x62626232 ]; then echo "fam-a: read $v"; exit 0; fi
    sleep 0.1
done
echo "fam-a: timeout"
