"""Hand libnftables JSON (libnftables-json(5)) to the kernel and read counters back.

Generic: the network namespace set-up, the DNS stub and the host NAT table
all go through here, and so may any other layer with a ruleset.

A libnftables context opens its netlink socket when it is created
(nft_ctx_new), and a netlink socket stays in the network namespace it was
made in, so a context made while the thread is in a skill's namespace keeps
acting on that namespace after the thread has left it
(tests/kernel/test_network_launch.py relies on this).
"""
from __future__ import annotations

import json
from typing import Iterable, Optional


class NftError(RuntimeError):
    pass


def context():
    """A libnftables context with JSON output, in the calling thread's network namespace."""
    try:
        import nftables
    except ImportError:
        raise NftError("python3-nftables is not installed (Debian package python3-nftables)") from None
    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(False)
    return nft


def apply(ruleset: dict, nft=None) -> None:
    """Run one libnftables JSON document as one transaction: all of it or nothing."""
    nft = nft or context()
    rc, _out, err = nft.json_cmd(ruleset)
    if rc != 0:
        raise NftError(f"nftables refused the ruleset: {err.strip() or f'rc={rc}'}")


def query(command: dict, nft=None) -> list[dict]:
    """Run a JSON list/get command and return its `nftables` array ([] when absent)."""
    nft = nft or context()
    rc, out, err = nft.json_cmd({"nftables": [command]})
    if rc != 0:
        raise NftError(err.strip() or f"rc={rc}")
    if isinstance(out, str):
        out = json.loads(out) if out else {}
    return list((out or {}).get("nftables", []))


def table_exists(family: str, table: str, nft=None) -> bool:
    try:
        query({"list": {"table": {"family": family, "name": table}}}, nft)
    except NftError:
        return False
    return True


def counters(family: str, table: str, names: Iterable[str], nft=None) -> dict[str, int]:
    """Packets seen by each named counter of `table` (0 for a name it lacks)."""
    items = query({"list": {"table": {"family": family, "name": table}}}, nft)
    found = {item["counter"]["name"]: int(item["counter"].get("packets", 0))
             for item in items if "counter" in item}
    return {name: found.get(name, 0) for name in names}


def add_elements(family: str, table: str, set_name: str, elements: list, nft=None,
                 timeout: Optional[int] = None) -> None:
    """Add (or refresh the timeout of) elements of a set. Re-adding an element
    that exists updates its timeout on this kernel (checked by the kernel tests)."""
    if not elements:
        return
    elems = [{"elem": {"val": e, "timeout": timeout}} if timeout is not None else e for e in elements]
    apply({"nftables": [{"add": {"element": {"family": family, "table": table, "name": set_name,
                                             "elem": elems}}}]}, nft)
