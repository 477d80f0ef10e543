#!/bin/sh
# vm0 writes a marker through its BAR2 mapping; vm1 waits for it through its own.
if [ "$(hostname)" = vm0 ]; then
    fam write 0 0x76636C31 && echo "fam-test: vm0 wrote 0x76636C31"
else
    for _ in $(seq 600); do
        v=$(fam read 0)
        if [ "$v" = 0x76636C31 ]; then echo "fam-test: vm1 read $v"; exit 0; fi
        sleep 0.1
    done
    echo "fam-test: vm1 timed out"
fi
