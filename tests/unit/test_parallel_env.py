"""Rank / world / master detection from torchrun and Slurm variables."""

import socket

from megatron_vr1.parallel.env import detect, expand_nodelist, free_port


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],login5") == ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]
    assert expand_nodelist("node1") == ["node1"]
    assert expand_nodelist("a[1-2]-ib,b[9-10]") == ["a1-ib", "a2-ib", "b9", "b10"]


def test_detect_torchrun():
    env = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 1, "10.0.0.1", 1234, "torchrun")


def test_detect_slurm_master_from_nodelist():
    env = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                  "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 16, 5, "gpu12", "slurm")
    assert 20000 <= env.master_port < 40000


def test_detect_single_process_and_free_port():
    env = detect({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # still free
