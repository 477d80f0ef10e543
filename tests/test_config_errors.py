"""Bad input gives exactly one line naming file, line and key, and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SAMPLES, run_cli, write_tree

GOOD_BASE = {
    "etc/resources.yaml": "default:\n  networks: []\n  fam:\n    max-size: 1G\n",
}

CASES = [
    pytest.param(
        {"etc/templates.yaml": "tiny:\n  image: [tiny\n  memory: 256M\n"},
        ["template", "list"],
        "{etc}/templates.yaml:3: YAML syntax error: expected ',' or ']', but got ':' "
        "(expected valid YAML)",
        id="yaml-syntax",
    ),
    pytest.param(
        {"etc/templates.yaml": "tiny:\n  image: tiny\n  cpus: 2\n"},
        ["template", "list"],
        "{etc}/templates.yaml:3: tiny.cpus: unknown key; did you mean 'vcpus'? (expected one "
        "of: append, cpu-model, description, disks, fam, image, inherits, initrd, kernel, "
        "machine, memory, nic-model, qemu-args, resource-set, user-data, vcpus)",
        id="unknown-key",
    ),
    pytest.param(
        {"etc/templates.yaml": "a:\n  image: x\n  inherits: b\nb:\n  inherits: c\n"
                               "c:\n  inherits: a\n"},
        ["template", "list"],
        "{etc}/templates.yaml:7: c.inherits: inheritance cycle: a -> b -> c -> a "
        "(expected a chain of templates that ends)",
        id="inherits-cycle",
    ),
    pytest.param(
        {"etc/templates.yaml": "a:\n  image: x\n",
         "home/templates.yaml": "mine:\n  inherits: nope\n"},
        ["template", "list"],
        "{home}/templates.yaml:2: mine.inherits: unknown template 'nope' "
        "(expected one of: a, mine)",
        id="unknown-parent",
    ),
    pytest.param(
        {"etc/templates.yaml": "a:\n  image: x\n  fam:\n    name: f\n    size: 3M\n"},
        ["template", "list"],
        "{etc}/templates.yaml:5: a.fam.size: 3M is not a power of two "
        "(expected a power of two such as 64M or 1G, at most 1G)",
        id="fam-size-3M",
    ),
    pytest.param(
        {"etc/templates.yaml": "a:\n  image: x\n  fam:\n    size: 2G\n"},
        ["template", "list"],
        "{etc}/templates.yaml:4: a.fam.size: 2G is more than the maximum 1G of resource set "
        "'default' (expected a power of two such as 64M or 1G, at most 1G)",
        id="fam-size-over-max",
    ),
    pytest.param(
        {"etc/templates.yaml": "a:\n  image: x\n  user-data: missing.yaml\n"},
        ["template", "list"],
        "{etc}/templates.yaml:3: a.user-data: 'missing.yaml': no such file "
        "(expected a file name or an inline cloud-config mapping)",
        id="missing-user-data",
    ),
    pytest.param(
        {"etc/templates.yaml": "a:\n  image: x\n  memory: lots\n"},
        ["template", "list"],
        "{etc}/templates.yaml:3: a.memory: 'lots' is not a size (expected a size such as "
        "512M or 2G)",
        id="bad-size",
    ),
    pytest.param(
        {"etc/templates.yaml": "a:\n  image: x\n  resource-set: gpu\n"},
        ["template", "list"],
        "{etc}/templates.yaml:3: a.resource-set: unknown resource set 'gpu' "
        "(expected a resource set from resources.yaml (default))",
        id="unknown-resource-set",
    ),
    pytest.param(
        {"etc/batch.yaml": "store:\n  endpoints: [etcd.example:2379]\n"},
        ["template", "list"],
        "{etc}/batch.yaml:2: store.endpoints: 'etcd.example:2379' is not an http:// or "
        "https:// URL (expected a list of URLs such as https://10.0.0.1:2379)",
        id="batch-endpoint",
    ),
    pytest.param(
        {"etc/networks.yaml": "cluster:\n  type: private\n  subnet: 10.200.0.1/16\n"},
        ["template", "list"],
        "{etc}/networks.yaml:3: cluster.subnet: '10.200.0.1/16' is not a valid network: "
        "10.200.0.1/16 has host bits set (expected an IPv4 network such as 10.200.0.0/24 "
        "(prefix /8 to /29))",
        id="network-subnet",
    ),
    pytest.param(
        {"etc/networks.yaml": "cluster:\n  type: infiniband\n"},
        ["template", "list"],
        "{etc}/networks.yaml:2: cluster.type: 'infiniband' is not a network type "
        "(expected one of: nat, private)",
        id="network-type",
    ),
    pytest.param({}, ["check", "tpl:0"],
                 "cluster definition 'tpl:0': count of 'tpl' must be at least 1, not 0 "
                 "(expected TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], for example debian:4,tiny:2)",
                 id="definition-zero"),
    pytest.param({}, ["check", "tpl:x"],
                 "cluster definition 'tpl:x': count 'x' of 'tpl' is not a number "
                 "(expected TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], for example debian:4,tiny:2)",
                 id="definition-not-number"),
    pytest.param({}, ["check", ":3"],
                 "cluster definition ':3': ':3' has no template name "
                 "(expected TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], for example debian:4,tiny:2)",
                 id="definition-no-name"),
    pytest.param({}, ["check", ""],
                 "cluster definition '': the definition is empty "
                 "(expected TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], for example debian:4,tiny:2)",
                 id="definition-empty"),
    pytest.param({}, ["check", "tpl:2,nosuch:1"],
                 "cluster definition 'tpl:2,nosuch:1': unknown template 'nosuch' "
                 "(expected a template: tpl)",
                 id="definition-unknown-template"),
    pytest.param({}, ["template", "show", "nosuch"],
                 "template 'nosuch': no such template (expected one of: tpl)",
                 id="show-unknown-template"),
]


@pytest.mark.parametrize(("files", "argv", "expected"), CASES)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, conf: dict[str, str], files: dict[str, str], argv: list[str], expected: str
) -> None:
    tree = {**GOOD_BASE, "etc/templates.yaml": "tpl:\n  image: x\n", **files}
    write_tree(tmp_path, tree)
    proc = run_cli(*argv, env=conf)
    message = expected.format(etc=conf["VCLUSTER_CONF"], home=conf["VCLUSTER_HOME"])
    assert proc.stderr == f"vcluster: error: {message}\n"
    assert proc.returncode == 2
    assert proc.stdout == ""


def test_verbose_shows_details_for_bad_input(tmp_path: Path, conf: dict[str, str]) -> None:
    write_tree(tmp_path, {"etc/templates.yaml": "a:\n  image: x\n  fam: {size: 3M}\n"})
    proc = run_cli("-vv", "template", "list", env=conf)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr  # details only on request
    assert proc.stderr.rstrip().endswith("(expected a power of two such as 64M or 1G, at most 1G)")


def test_samples_load_clean() -> None:
    env = {"VCLUSTER_CONF": str(SAMPLES), "VCLUSTER_HOME": "/nonexistent"}
    proc = run_cli("check", "tiny-fam:2,debian:1,debian-fam,tiny", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for name in ("batch", "networks", "resources", "templates"):
        assert f"ok  {SAMPLES}/{name}.yaml" in proc.stdout
    assert proc.stdout.splitlines()[-5:] == [
        "vm0  tiny-fam", "vm1  tiny-fam", "vm2  debian", "vm3  debian-fam", "vm4  tiny"]
