"""Where a rollout server runs, decided from its URL before anything is sent (rollout/hosts.py): the same-host
weight transport refuses a server on another host, the distributed one refuses a loopback group address for it,
and the group address defaults to this host's address that routes to the server."""

import pytest

from megatron_vr1.rollout.hosts import TransportUnreachable, is_this_host, route_address
from megatron_vr1.rollout.sglang_http import Endpoint
from megatron_vr1.weight_sync.distributed import DistributedTransport
from megatron_vr1.weight_sync.syncer import WeightSyncer
from megatron_vr1.weight_sync.tensor import TensorTransport

ELSEWHERE = "192.0.2.7"  # TEST-NET-1 (RFC 5737): never an address of this machine


def test_this_host_and_another():
    assert is_this_host("127.0.0.1") and is_this_host("localhost")
    assert not is_this_host(ELSEWHERE)
    assert route_address("127.0.0.1") == "127.0.0.1"


def test_same_host_transport_refuses_a_server_elsewhere_before_sending():
    remote = Endpoint(f"http://{ELSEWHERE}:30000")
    with pytest.raises(TransportUnreachable, match=rf"rollout.sync_transport=tensor .* runs on {ELSEWHERE}: use "):
        WeightSyncer([remote], TensorTransport(device="cpu"))  # nothing listens there: a send would fail otherwise
    TensorTransport(device="cpu").check_reach([Endpoint("http://127.0.0.1:30000")])


def test_distributed_transport_refuses_a_loopback_group_for_a_server_elsewhere():
    remote = Endpoint(f"http://{ELSEWHERE}:30000")
    with pytest.raises(TransportUnreachable, match="cannot reach the weight-update group at 127.0.0.1"):
        DistributedTransport(master_address="127.0.0.1").check_reach([remote])
    DistributedTransport().check_reach([remote])  # the default: this host's routable address, found at connect
