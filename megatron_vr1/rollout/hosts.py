"""Where a rollout server runs relative to this process, and how this process reaches it.

A weight transport that hands over shared-memory or CUDA-IPC handles (``tensor``) works only when the server
runs on this host; one that opens a process group (``distributed``) must give the server an address of this host
that the server can route to, not 127.0.0.1. Both are decided here from the server's URL, before anything is
sent: a misconfigured sync must fail with a message, not kill the server.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from megatron_vr1.rollout.sglang_http import Endpoint, call


class TransportUnreachable(RuntimeError):
    """The configured weight transport cannot reach a server's host; the message says which and what to use."""


def host_of(endpoint: Endpoint) -> str:
    return urlparse(endpoint.url).hostname or "127.0.0.1"


def _addresses(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror as e:
        raise TransportUnreachable(f"cannot resolve the rollout server host {host!r}: {e}") from None


def is_this_host(host: str) -> bool:
    """True when ``host`` names this machine (this network namespace): a loopback address, or an address one of
    its interfaces holds (binding to it succeeds only then)."""
    for address in _addresses(host):
        if address.startswith("127.") or address == "::1":
            return True
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, 0))
                return True
            except OSError:
                continue
    return False


def first_elsewhere(endpoints: list[Endpoint]) -> Endpoint | None:
    """The first server not on this host (see ``is_this_host``), or None when all are here."""
    return next((ep for ep in endpoints if not is_this_host(host_of(ep))), None)


def route_address(host: str, port: int = 9) -> str:
    """The address of this machine's interface that traffic to ``host`` leaves from: what a server on ``host``
    can connect back to. (A UDP "connect" only asks the routing table; nothing is sent.)"""
    address = sorted(_addresses(host))[0]
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((address, port))
        return probe.getsockname()[0]


def server_tensor_parallel(endpoint: Endpoint, timeout: float = 30.0) -> int:
    """The server's TP size (``/server_info``): each of its TP ranks joins a weight-update group."""
    info = call(endpoint, "/server_info", method="GET", timeout=timeout)
    if not isinstance(info, dict) or "tp_size" not in info:
        raise TransportUnreachable(f"{endpoint.url}/server_info did not report tp_size; is it an SGLang server?")
    if int(info.get("pp_size", 1)) != 1:
        raise TransportUnreachable(f"{endpoint.url} runs with pipeline parallelism (pp_size={info['pp_size']}), "
                                   "which SGLang's distributed weight update does not cover; use tensor "
                                   "parallelism only, or rollout.sync_transport=disk")
    return int(info["tp_size"])
