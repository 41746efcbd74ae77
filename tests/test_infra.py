"""Cluster bootstrap (infra/): local kustomizations rendered offline with `kubectl kustomize` and validated,
remote bases pinned to the versions in infra/versions.env (and those to the SDKs the project uses), the
kind and GPU node setup agreeing with the cluster profile's selector and tolerations, the images carrying
the project's own dependency set, and the Makefile and walk-through agreeing with the chart and config."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from kat_core.config import ClusterConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S_VERSION = "1.37.0"


def versions() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (INFRA / "versions.env").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def kustomizations() -> dict[Path, dict]:
    return {p.parent: yaml.safe_load(p.read_text()) for p in sorted(INFRA.rglob("kustomization.yaml"))}


def is_remote(resource: str) -> bool:
    return "://" in resource or resource.startswith("github.com/")


def tolerates(toleration: dict, taint: dict) -> bool:
    """Kubernetes' rule: same key (or an empty key with Exists), same effect (or none), and Exists or an
    equal value."""
    if toleration.get("effect") and toleration["effect"] != taint["effect"]:
        return False
    if toleration.get("key") and toleration["key"] != taint["key"]:
        return False
    return toleration.get("operator", "Equal") == "Exists" or toleration.get("value") == taint.get("value")


# -------------------------------------------------------------------------------------- kustomizations


def test_remote_bases_are_pinned_to_versions_env():
    pins = versions()
    remote = {d: k for d, k in kustomizations().items() if any(is_remote(r) for r in k.get("resources", []))}
    assert {d.relative_to(INFRA).as_posix() for d in remote} == {
        "kfp/cluster-scoped", "kfp/env", "trainer/manager", "trainer/runtimes"}
    for directory, k in remote.items():
        for resource in k["resources"]:
            ref = re.search(r"[?&]ref=([^&]+)$", resource)
            assert ref, f"{directory}: {resource} is not pinned"
            expected = pins["KFP_VERSION"] if "kubeflow/pipelines" in resource else pins["TRAINER_VERSION"]
            assert ref.group(1) == expected, f"{directory}: {resource} is not at {expected}"


def test_pins_match_the_sdks_the_project_uses():
    from importlib.metadata import version

    pins = versions()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    kfp = next(d for d in deps if d.startswith("kfp>="))
    assert re.match(r"kfp>=([\d.]+)", kfp).group(1) == pins["KFP_VERSION"]  # the backend of the SDK we compile with
    trainer_api = version("kubeflow-trainer-api").split(".")[:2]  # what the kubeflow SDK speaks
    assert pins["TRAINER_VERSION"].lstrip("v").split(".")[:2] == trainer_api


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_local_kustomizations_render_offline_and_validate():
    import kubernetes_validate

    local = [d for d, k in kustomizations().items() if not any(is_remote(r) for r in k.get("resources", []))]
    assert local, "no local kustomization"
    config = load_config("cluster").cluster
    for directory in local:
        out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        assert docs
        for doc in docs:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # the GPU check schedules exactly as the cluster profile's training tasks do
    out = subprocess.run(["kubectl", "kustomize", str(INFRA / "gpu" / "check")], capture_output=True, text=True,
                         timeout=60, check=True)
    job = yaml.safe_load(out.stdout)
    pod = job["spec"]["template"]["spec"]
    assert job["metadata"]["namespace"] == "kubeflow"
    assert pod["nodeSelector"] == config.node_selector
    assert pod["tolerations"] == config.tolerations
    assert pod["containers"][0]["resources"]["limits"][config.accelerator] == "1"


def test_gpu_node_setup_matches_the_cluster_profile():
    config = load_config("cluster").cluster
    kind = yaml.safe_load((INFRA / "kind" / "cluster.yaml").read_text())
    gpu_workers = [n for n in kind["nodes"] if n.get("labels")]
    assert len(gpu_workers) == 1 and kind["nodes"][0]["role"] == "control-plane"
    worker = gpu_workers[0]
    assert config.node_selector.items() <= worker["labels"].items()
    patch = yaml.safe_load(worker["kubeadmConfigPatches"][0])
    taints = patch["nodeRegistration"]["taints"]
    assert taints and all(any(tolerates(t, taint) for t in config.tolerations) for taint in taints)
    # a plain worker stays free for the CPU tasks (and the walk-through's CPU-only run)
    assert any(n["role"] == "worker" and not n.get("labels") for n in kind["nodes"])
    # the GPU operator's daemonsets tolerate the same taint, so they reach the GPU nodes
    operator = yaml.safe_load((INFRA / "gpu" / "gpu-operator-values.yaml").read_text())
    assert all(any(tolerates(t, taint) for t in operator["daemonsets"]["tolerations"]) for taint in taints)
    # and the same taint is what the walk-through tells an admin to set
    readme = (INFRA / "README.md").read_text()
    command = re.search(r"kubectl taint nodes NODE ([\w./-]+)=(\w+):(\w+)", readme)
    assert any(tolerates(t, {"key": command.group(1), "value": command.group(2), "effect": command.group(3)})
               for t in config.tolerations)


# ---------------------------------------------------------------------------------------------- images


def dockerfile_installs(path: Path) -> list[str]:
    """The package arguments of every `pip install` in a Dockerfile (flags and their values dropped)."""
    text = path.read_text().replace("\\\n", " ")
    packages = []
    for command in re.findall(r"pip install ([^&\n]+)", text):
        words = command.split()
        skip = False
        for word in words:
            if skip:
                skip = False
            elif word in ("--index-url", "-i", "--extra-index-url"):
                skip = True
            elif not word.startswith("-"):
                packages.append(word.strip('"'))
    return packages


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=\"?([^\"\n]+)\"?$", path.read_text(), re.M))


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_carry_the_projects_dependency_set(name):
    from packaging.requirements import Requirement

    path = INFRA / "images" / name
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {Requirement(d).name: Requirement(d) for d in project["project"]["dependencies"]}
    extras = project["project"]["optional-dependencies"]
    args = dockerfile_args(path)
    installs = dockerfile_installs(path)
    # the project itself, with extras that exist: its dependencies come from pyproject.toml, nowhere else
    project_installs = [p for p in installs if p.startswith("/src")]
    assert project_installs == ["/src[cluster]"] and "cluster" in extras
    # anything installed before it is a dependency the project declares, at a version it accepts
    for spec in installs:
        if spec.startswith("/src"):
            continue
        req = Requirement(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], spec))
        assert req.name in deps, f"{name} installs {req.name}, which pyproject.toml does not declare"
        pinned = next(iter(req.specifier)).version
        assert deps[req.name].specifier.contains(pinned), f"{name}: {req} is outside {deps[req.name]}"
    # every package the wheel ships is copied into the build
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\w+) /src/", path.read_text(), re.M))
    assert {p.rstrip("*") for p in packages} == copied
    # non-root, in the final stage
    final = path.read_text().split("\nFROM ")[-1]
    user = re.findall(r"^USER (\S+)", final, re.M)
    assert user and not user[-1].startswith(("0", "root"))


def test_cpu_image_torch_matches_the_makefile_and_cuda_image_fits_the_mpi_runtime():
    makefile = (ROOT / "Makefile").read_text()
    assert f"torch=={dockerfile_args(INFRA / 'images' / 'Dockerfile')['TORCH_VERSION']}" in makefile
    cuda = (INFRA / "images" / "Dockerfile.cuda").read_text()
    # Kubeflow Trainer's deepspeed-distributed runtime: mpiuser (uid 1000), sshd on 2222 with
    # /home/mpiuser/.sshd_config, mpirun on the launcher
    assert "useradd --uid 1000" in cuda and "mpiuser" in cuda and "'Port 2222'" in cuda
    assert "> /home/mpiuser/.sshd_config" in cuda and "openmpi-bin" in cuda
    assert "DS_BUILD_OPS=1" in cuda  # DeepSpeed's ops built into the image, not JIT-compiled on the cluster


def test_image_names_agree_between_makefile_and_config():
    images = ClusterConfig().images
    out = subprocess.run(["make", "-n", "images", "images-cuda"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"-t {images.registry}/{images.cpu}:dev" in out.stdout
    assert f"-t {images.registry}/{images.cuda}:dev" in out.stdout


# ---------------------------------------------------------------------- Makefile and the walk-through


def make_dry_run(*targets: str) -> str:
    out = subprocess.run(["make", "-n", "-W", "pyproject.toml", *targets], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_makefile_targets_use_the_pinned_pieces():
    pins = versions()
    script = make_dry_run("cluster-up", "platform-install", "pipeline-submit")
    assert f"kind create cluster --config infra/kind/cluster.yaml --image {pins['KIND_NODE_IMAGE']}" in script
    for directory in ("infra/kfp/cluster-scoped", "infra/kfp/env", "infra/trainer/manager", "infra/trainer/runtimes"):
        assert f"-k {directory}" in script and (ROOT / directory / "kustomization.yaml").is_file()
    assert "helm upgrade --install kat-platform helm/kat-platform -n kubeflow -f infra/platform/values-kind.yaml" \
        in script
    # the secrets it creates are the ones the chart and the pipeline refer to
    values = yaml.safe_load((ROOT / "helm" / "kat-platform" / "values.yaml").read_text())
    assert "create secret generic kat-s3 " in re.sub(r"\\\n\s*", "", script)
    assert values["objectStore"]["existingSecret"] == ClusterConfig().s3_secret == "kat-s3"
    assert values["mlflow"]["backendStore"]["bundled"]["existingSecret"] in script
    # the submitted run's overrides are a valid config for the profile it names
    submit = next(line for line in script.splitlines() if "kat pipeline submit" in line)
    words = submit.split()
    profile = words[words.index("--profile") + 1]
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    config = load_config(profile, overrides)
    assert config.cluster.gpus == 0 and config.cluster.images.ref("cuda") == config.cluster.images.ref("cpu")
    assert "--cluster" in words and "--backend" in words


def test_walkthrough_agrees_with_the_chart():
    """The values file the walk-through installs renders and validates; the names it tells a reader are
    the chart's and the config's."""
    hp = pytest.importorskip("helm_python")
    import kubernetes_validate

    readme = (INFRA / "README.md").read_text()
    main_readme = (ROOT / "README.md").read_text()
    assert "infra/README.md" in main_readme  # linked from the project's README
    values = yaml.safe_load((INFRA / "platform" / "values-kind.yaml").read_text())
    with hp.Chart.load(ROOT / "helm" / "kat-platform") as chart:
        out = chart.render(values, name="kat-platform", namespace="kubeflow", is_install=True)
        defaults = chart.values
    docs = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for kind, name in [("Service", "kat-platform-mlflow"), ("Service", "kat-platform-dashboard"),
                       ("StatefulSet", "kat-platform-s3"), ("PersistentVolumeClaim", "kat-checkpoints"),
                       ("ServiceAccount", "kat-pipeline-runner"), ("ConfigMap", "kat-platform")]:
        assert (kind, name) in names
        assert name in readme, f"the walk-through does not name {name}"
    config = ClusterConfig()
    postgres = defaults["mlflow"]["backendStore"]["bundled"]["existingSecret"]
    for secret in (config.s3_secret, config.mlflow_secret, postgres):
        assert secret in readme
    assert f"port-forward svc/kat-platform-mlflow 5000:{defaults['mlflow']['port']}" in readme
    pins = versions()
    for pin in (pins["KFP_VERSION"], pins["TRAINER_VERSION"], pins["GPU_OPERATOR_VERSION"]):
        assert pin in readme
