"""The project's own sbatch scripts on a real Slurm cluster (slurmctld + two slurmd on this host, Debian's
slurm-wlm 22.05), submitted with ``sbatch --wait``: exit codes come back, failures are seen."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "scripts" / "slurm_local_cluster.sh"
SLURM = REPO / "examples" / "slurm"

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster needs root")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Two fake nodes with the resources the scripts ask for (#SBATCH lines stay unchanged): 32 CPUs and 8 "GPUs"
    # each (GRES backed by /dev/null clones; the code runs on the CPU).
    env = dict(os.environ, SLURM_LOCAL_NODES="2", SLURM_LOCAL_CPUS="32", SLURM_LOCAL_GPUS="8",
               SLURM_LOCAL_DIR=str(tmp_path_factory.mktemp("slurm")))
    up = subprocess.run(["bash", str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr[-4000:]
    yield env
    subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, timeout=120)


def sbatch(cluster_env: dict, script: Path, workdir: Path, extra_env: dict, *options: str) -> tuple[int, str]:
    """Submit with ``sbatch --wait`` from ``workdir`` (the venv first on PATH, as a user's shell would have it);
    return the exit code and the job's output."""
    env = dict(cluster_env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHON_ENV=str(REPO / ".venv"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra_env)
    res = subprocess.run(["sbatch", "--wait", "--parsable", *options, str(script)], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=900)
    job_id = res.stdout.strip().split(";")[0]
    outputs = sorted(workdir.glob(f"*-{job_id}*.out")) if job_id else []
    text = "".join(p.read_text() for p in outputs) + res.stderr
    return res.returncode, text


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_vr1.data.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "hf", preset="test", seed=0)


def test_convert_job_round_trip(cluster, tiny_hf, tmp_path):
    mcore = tmp_path / "mcore"
    rc, out = sbatch(cluster, SLURM / "convert.sbatch", tmp_path,
                     {"DIRECTION": "hf-to-mcore", "HF": str(tiny_hf), "OUT": str(mcore)})
    assert rc == 0, out
    assert (mcore / "metadata.json").exists()
    rc, out = sbatch(cluster, SLURM / "convert.sbatch", tmp_path,
                     {"DIRECTION": "mcore-to-hf", "HF": str(tiny_hf), "CKPT": str(mcore), "OUT": str(tmp_path / "hf")})
    assert rc == 0, out
    assert (tmp_path / "hf" / "config.json").exists() and list((tmp_path / "hf").glob("*.safetensors"))


def test_failing_job_is_seen(cluster, tmp_path):
    rc, out = sbatch(cluster, SLURM / "convert.sbatch", tmp_path,
                     {"DIRECTION": "hf-to-mcore", "HF": str(tmp_path / "missing"), "OUT": str(tmp_path / "o")})
    assert rc != 0
    assert "missing" in out and "Traceback" not in out  # the user sees which path is wrong, not a stack trace


def test_bad_knob_fails_at_once(cluster, tmp_path):
    rc, out = sbatch(cluster, SLURM / "convert.sbatch", tmp_path, {"DIRECTION": "sideways"})
    assert rc == 2 and "DIRECTION must be" in out


def test_train_job_on_two_nodes(cluster, tiny_hf, tmp_path):
    """train_vision_r1.sbatch unchanged, on a 2-node allocation: srun starts one torchrun per node, they meet at
    the first node, and a TP=2 GRPO step runs with one rank per node (rollout on rank 0, in-process engine)."""
    from megatron_vr1.data.synth import build_synth

    data = build_synth(tmp_path / "data", n=8, seed=0, difficulty="demo", n_val=2)
    run_dir = tmp_path / "run"
    sets = " ".join([f"model.hf_path={tiny_hf}", f"data.train_path={data['train']}", "rollout.engine=hf",
                     "parallel.tensor_parallel=2", "grpo.train_steps=1", "grpo.warmup_steps=0",
                     "grpo.num_generations=2", "grpo.prompts_per_step=2", "rollout.max_new_tokens=8",
                     "log.progress=false"])
    rc, out = sbatch(cluster, SLURM / "train_vision_r1.sbatch", tmp_path,
                     {"RECIPE": "tiny_cpu_demo", "SETS": sets, "RUN_DIR": str(run_dir), "GPUS_PER_NODE": "1"},
                     "--nodes=2", "--time=00:20:00")
    assert rc == 0, out[-6000:]
    assert "2 training node(s) x 1 ranks" in out
    from megatron_vr1.training.metrics import read_metrics

    (record,) = read_metrics(run_dir)
    assert record["step"] == 1 and record["weight_version"] == 1
    assert (run_dir / "checkpoints" / "latest").exists()  # where a requeued job resumes from


def test_scaling_bench_array_appends_one_row_per_task(cluster, tmp_path):
    """scaling_bench.sbatch as a 2-task job array (1 node TP=1, then 2 nodes TP=2 with one rank per node), the
    tiny model on CPU: each task appends its row to the one CSV, with the node count torchrun reports."""
    from megatron_vr1.benchmarks.scaling_csv import read_rows

    csv = tmp_path / "scaling.csv"
    rc, out = sbatch(cluster, SLURM / "scaling_bench.sbatch", tmp_path,
                     {"RECIPE": "tiny_cpu_demo", "LAYOUTS": "1:1:1 2:2:1", "GPUS_PER_NODE": "1", "STEPS": "1",
                      "CSV": str(csv), "BENCH_ARGS": "--model tiny --global-batch 4 --warmup 0"},
                     "--array=0-1", "--nodes=2", "--time=00:20:00")
    assert rc == 0, out[-6000:]
    rows = sorted(read_rows(csv), key=lambda r: r.gpus_or_procs)
    assert [(r.nodes, r.gpus_or_procs, r.tp, r.dp, r.global_batch) for r in rows] == [(1, 1, 1, 1, 4), (2, 2, 2, 1, 4)]
    assert all(r.step_s_median > 0 and r.device.startswith("CPU process") for r in rows)
