"""Which addresses name this machine (a distributed model's rank 0 must run here)."""

from __future__ import annotations

import ipaddress
import socket


def is_local(address: str) -> bool:
    """Whether `address` names this machine: a loopback name or an address we can bind."""
    if address in ("localhost", "127.0.0.1", "::1"):
        return True
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError:
        return False
    with socket.socket(family) as s:
        try:
            s.bind((address, 0))
            return True
        except OSError:
            return False
