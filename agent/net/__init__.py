"""Network confinement for launched skills: what a DNS answer may admit
(`admit`), the DNS stub that fills the skill's nftables sets (`dns_stub`),
the NFLOG reader that turns dropped packets into events (`nflog`) and the
wording and rate limit of those events (`events`).

The kernel-touching set-up of the namespace itself is `agent/launch/netns.py`.
"""
