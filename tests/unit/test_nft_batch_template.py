"""BatchTemplate (agent/attach/nft_netlink.py): a batch built once per policy
with the cgroup id and sequence numbers filled in later must be byte for byte
the batch built from scratch (pure)."""
from __future__ import annotations

import pytest

from agent.attach.nft_cgroup import hash_changes
from agent.attach.nft_netlink import BatchTemplate, batch
from agent.compile.bpf_policy import compile_bpf_policy
from agent.manifest import load_text

GRANTS = [
    '["198.51.100.7:8080"]',
    '["198.51.100.7:8080", "[2001:db8::/32]:*", "www.example.test:443"]',
    # addresses whose bytes are those of the stand-ins used to find the open fields
    '["[102:304:506:708:102:304:506:708]:258", "1.1.1.1:257", "2.2.2.2:514", "[101:101:101:101::]:*"]',
    '["10.0.0.0/8:443", "10.1.0.0/16:80", "[::/0]:53", "10.2.0.0/16:*"]',
]


def _policy(grants: str, mode: str = "enforce"):
    text = f'name: t\nversion: "1"\nmode: {mode}\npermissions:\n  tcp:\n    allowlist: {grants}\n'
    result = load_text(text, "t.yaml")
    assert result.ok, result.errors
    return compile_bpf_policy(result.policy)


@pytest.mark.parametrize("grants", GRANTS)
@pytest.mark.parametrize("mode", ["enforce", "audit"])
@pytest.mark.parametrize("delete", [False, True])
def test_a_filled_template_is_the_batch_built_from_scratch(grants, mode, delete):
    bp = _policy(grants, mode)

    def changes(cgroup_id):
        return [c for c in hash_changes(cgroup_id, bp.flags, bp.net4, bp.net6, delete=delete) if c[2]]

    template = BatchTemplate(changes, "skillguard_cg")
    for cgroup_id, seq in ((1, 1), (0x0101010101010101, 7), (4242, 0xFFFFFFF0 - 20), (2**64 - 1, 99_000)):
        assert template.fill(cgroup_id, seq) == batch(changes(cgroup_id), "skillguard_cg", seq)


def test_a_batch_whose_shape_depends_on_the_cgroup_is_refused():
    def changes(cgroup_id):
        return [(12, "members", [cgroup_id.to_bytes(8, "little")] * (1 + cgroup_id % 2))]

    with pytest.raises(ValueError):
        BatchTemplate(changes, "t")
