"""Certificates for an etcd that serves TLS and asks clients for theirs (tests only).

``EtcdPki(dir)`` writes, with ``identity.etcd_pki`` (what ``shoal etcd-cert`` uses), a
CA with a member certificate for 127.0.0.1 and a client pair, and a client pair from
another CA that etcd must refuse.
"""

from __future__ import annotations

from pathlib import Path

from identity.etcd_pki import EtcdCa
from registry_service.etcd import EtcdTls

__all__ = ["EtcdPki"]


class EtcdPki:
    """Under ``root``: ``ca``, ``server``/``server_key`` for etcd, and the ``client`` and
    ``stranger`` (another CA's) settings for a registry."""

    def __init__(self, root: Path) -> None:
        ca = EtcdCa.create("shoal-test etcd CA")
        member = ca.write_pair(root / "etcd", "etcd", server_names=("localhost",))
        self.ca = root / "etcd" / "ca.pem"
        self.server, self.server_key = member.cert, member.key
        client = ca.write_pair(root / "client", "registry")
        self.client = EtcdTls(self.ca, client.cert, client.key)
        other = EtcdCa.create("another CA").write_pair(root / "stranger", "registry")
        self.stranger = EtcdTls(self.ca, other.cert, other.key)
