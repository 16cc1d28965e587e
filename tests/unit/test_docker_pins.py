"""The Docker image pins the same versions as pyproject.toml and never replaces the base image's torch (no Docker
engine runs on these machines: the Dockerfile is checked statically, its requirements filter by running it)."""

import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
CONSTRAINTS = "/opt/base-torch-stack.txt"
TORCH_BUILT = {"torchvision", "torchaudio", "torchtext"}
"""Compiled against one torch release: any version of them requires that torch (torchvision 0.29.1: torch>=2.14)."""


def _pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [d for group in project["optional-dependencies"].values() for d in group]
    out = {}
    for spec in specs:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]+\])?==([^;\s]+)", spec.strip())
        assert m, f"pyproject.toml: {spec!r} is not an exact pin"
        out[m.group(1).lower()] = m.group(3)
    return out


def _dockerfile_args() -> dict[str, str]:
    text = (REPO / "docker" / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG ([A-Z_]+)=(\S+)$", text, flags=re.M))


def test_dockerfile_versions_equal_pyproject_pins():
    pins, args = _pins(), _dockerfile_args()
    assert args["MEGATRON_CORE_VERSION"] == pins["megatron-core"]
    assert args["TRANSFORMER_ENGINE_VERSION"] == pins["transformer-engine"]
    assert args["SGLANG_VERSION"] == pins["sglang"]


def test_sglang_environment_matches_cpu_bootstrap():
    # The image's SGLang venv and the CPU .venv-sglang must use the same transformers as sglang's own pin.
    args = _dockerfile_args()
    bootstrap = (REPO / "scripts" / "bootstrap_sglang.sh").read_text()
    assert f"transformers=={args['SGLANG_TRANSFORMERS_VERSION']}" in bootstrap
    assert f"sglang=={args['SGLANG_VERSION']}" in bootstrap


def _heredoc(opener: str) -> str:
    """The body of the Dockerfile heredoc that ``opener`` (a whole line) starts."""
    m = re.search(rf"^{re.escape(opener)}\n(.*?)^PY$", DOCKERFILE.read_text(), flags=re.M | re.S)
    assert m, f"docker/Dockerfile: the step {opener!r} is missing"
    return m.group(1)


def _derived_requirements() -> list[str]:
    """The requirements the Dockerfile installs from pyproject.toml: its own filter program, run on the file."""
    program = _heredoc("RUN python - <<'PY' > /tmp/requirements.txt")
    out = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, check=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _torch_pin(req: Requirement, floor: Version) -> str | None:
    """Why ``req`` would make pip replace the base image's torch, or None. A package built against torch pins it;
    a torch requirement pins it with ==, ~=, <, <= or a lower bound at the release pyproject.toml pins for the CPU
    (the wheels of that release are what needs it; the base image's torch may be older). megatron-core's
    torch>=2.6.0 passes."""
    name = canonicalize_name(req.name)
    if name in TORCH_BUILT:
        return f"{req} is built against one torch release"
    if name != "torch":
        return None
    for spec in req.specifier:
        if spec.operator in ("==", "===", "~=", "<", "<="):
            return f"{req} pins torch"
        if spec.operator in (">=", ">") and Version(spec.version).release[:2] >= floor.release[:2]:
            return f"{req} needs torch {floor.major}.{floor.minor}, the CPU pin, which the base image may predate"
    return None


def _torch_pins_in_closure(roots: list[str], floor: Version) -> tuple[list[str], list[str]]:
    """(violations as 'a -> b -> why', torch requirements accepted) over ``roots`` and their unconditional
    dependencies, read from this environment's installed metadata (pyproject.toml's pins are what it holds).
    Packages not installed here (transformer-engine on a CPU host) are not walked further."""
    bad, accepted, seen = [], [], set()
    stack = [(Requirement(r), ()) for r in roots]
    while stack:
        req, chain = stack.pop()
        chain = (*chain, str(req))
        why = _torch_pin(req, floor)
        if why:
            bad.append(" -> ".join(chain) + f": {why}")
            continue
        name = canonicalize_name(req.name)
        if name == "torch":
            accepted.append(" -> ".join(chain))
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        for spec in requires:
            dep = Requirement(spec)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                stack.append((dep, chain))
    return bad, accepted


def test_requirements_leave_the_torch_stack_to_the_base_image():
    """The Dockerfile derives its requirements from pyproject.toml minus the base image's torch and torchvision."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    derived = _derived_requirements()
    names = {canonicalize_name(Requirement(r).name) for r in derived}
    stack = names & ({"torch"} | TORCH_BUILT)
    assert not stack, f"docker/Dockerfile installs {sorted(stack)} over the base image's; add it to FROM_BASE there"
    kept = [d for d in deps if canonicalize_name(Requirement(d).name) not in {"torch", "torchvision"}]
    assert derived == kept  # everything else is installed, as pinned


def test_no_requirement_the_image_installs_pins_torch():
    """Nothing the trainer's environment gets (the derived requirements, megatron-core, Transformer Engine, and
    what they depend on) requires a torch other than the base image's; the unfiltered pins would."""
    floor = Version(_pins()["torch"])
    args = _dockerfile_args()
    roots = _derived_requirements() + [f"megatron-core=={args['MEGATRON_CORE_VERSION']}",
                                       f"transformer-engine[pytorch]=={args['TRANSFORMER_ENGINE_VERSION']}"]
    bad, accepted = _torch_pins_in_closure(roots, floor)
    assert not bad, (f"docker/Dockerfile would replace the base image's torch: {bad}; leave the package to the base "
                     f"image (FROM_BASE in the Dockerfile) or relax its pin in pyproject.toml")
    assert any(a.startswith("megatron-core==") for a in accepted), accepted  # the walk saw megatron-core's torch>=2.6
    # The check catches the bug it guards against: the torchvision pin (and the torch pin) of pyproject.toml.
    assert _torch_pins_in_closure([f"torchvision=={_pins()['torchvision']}"], floor)[0]
    assert _torch_pins_in_closure([f"torch=={_pins()['torch']}"], floor)[0]
    assert _torch_pin(Requirement("torch>=2.14.0"), floor) and not _torch_pin(Requirement("torch>=2.6.0"), floor)


def test_dockerfile_keeps_the_base_torch_and_installs_the_package():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.M) and "nvcr.io/nvidia/pytorch" in text
    # The packages left out of the requirements are the ones recorded and held as constraints.
    from_base = re.search(r"^FROM_BASE = \{([^}]*)\}", _heredoc("RUN python - <<'PY' > /tmp/requirements.txt"),
                          flags=re.M)
    stack = re.search(r"^for name in \(([^)]*)\):", _heredoc("RUN cat > /usr/local/bin/torch-stack-pins <<'PY'"),
                      flags=re.M)
    assert from_base and stack
    quoted = lambda s: set(re.findall(r'"([^"]+)"', s))  # noqa: E731
    assert quoted(from_base.group(1)) == quoted(stack.group(1)) == {"torch", "torchvision"}
    assert f"python /usr/local/bin/torch-stack-pins > {CONSTRAINTS}" in text
    # Every install into the trainer's environment is held to the base torch stack (or installs no dependencies),
    # and the stack is compared with the record after the last one.
    joined = text.replace("\\\n", " ")
    installs = [(m.start(), m.group(0)) for m in re.finditer(r"(?<![/\w])pip install[^&\n]*", joined)]
    assert len(installs) >= 2, installs  # the requirements + Transformer Engine (the SGLang venv's pip is its own)
    for _, cmd in installs:
        assert f"-c {CONSTRAINTS}" in cmd or "--no-deps" in cmd, f"docker/Dockerfile: {cmd!r} may replace torch"
    check = joined.find(f"python /usr/local/bin/torch-stack-pins | diff -u {CONSTRAINTS} -")
    assert check > max(pos for pos, _ in installs)
    assert "import megatron.core, transformer_engine.pytorch, megatron_vr1.cli" in joined[check:]
    for path in ("pyproject.toml", "megatron_vr1", "scripts", "examples", "tools"):
        assert (REPO / path).exists(), f"the Dockerfile copies {path}, which is missing"


def test_torch_stack_record_is_a_constraints_file():
    """The recording script runs (here on the CPU venv's stack) and writes what ``pip install -c`` reads."""
    script = _heredoc("RUN cat > /usr/local/bin/torch-stack-pins <<'PY'")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line and not line.startswith("#")]
    reqs = [Requirement(line) for line in lines]
    assert [r.name for r in reqs] == ["torch", "torchvision"] and all(str(r.specifier).startswith("==") for r in reqs)
    assert re.search(r"^# torch.__version__ \S+, CUDA ", out, flags=re.M)
