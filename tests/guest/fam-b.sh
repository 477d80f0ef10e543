#!/bin/sh
for _ in $(seq 600); do
    v=$(fam read 0)
    if [ "$v" = 0x76636C31 ]; then
        echo "fam-b: read $v"
        fam write 8 0x62626232
        exit 0
    fi
    sleep 0.1
done
echo "fam-b: timeout"
