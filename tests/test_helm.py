"""The platform chart (helm/kat-platform): linted and rendered by Helm's own engine (helm-python-sdk, no helm
binary) for several value sets, every manifest validated against a current Kubernetes version's schemas
(kubernetes-validate, offline), what each value set must change, and values.schema.json rejecting bad
values with a message that names the key."""

from pathlib import Path

import pytest
import yaml

from kat_core.config import ClusterConfig

CHART = Path(__file__).resolve().parents[1] / "helm" / "kat-platform"
K8S_VERSION = "1.37.0"
RELEASE, NAMESPACE = "kat-platform", "kat"

VALUE_SETS = {
    "defaults": {},
    "external-s3": {"objectStore": {"mode": "external", "endpoint": "https://s3.example.com:9000",
                                    "existingSecret": "team-s3", "bucket": "ml-artifacts"}},
    "bundled-store": {"objectStore": {"mode": "bundled"}},
    "ingress": {"dashboard": {"ingress": {"enabled": True, "className": "nginx", "host": "kat.example.org",
                                          "tlsSecret": "kat-tls", "annotations": {"a.example/b": "c"}}}},
    "dashboard-off": {"dashboard": {"enabled": False, "ingress": {"enabled": True}}},
    "external-db": {"mlflow": {"backendStore": {"mode": "external",
                                                "external": {"existingSecret": "mlflow-dsn", "key": "DSN"}}}},
    "no-mlflow": {"mlflow": {"enabled": False, "externalTrackingUri": "https://mlflow.example.org"}},
    "model-server": {"modelServer": {"enabled": True, "alias": "candidate", "pollSeconds": 10}},
}
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD", "KAT_API_TOKEN",
                  "MLFLOW_TRACKING_PASSWORD"}


def helm():
    return pytest.importorskip("helm_python")


@pytest.fixture(scope="module")
def chart():
    hp = helm()
    with hp.Chart.load(CHART) as c:
        yield c


def render(chart, values):
    """{(kind, name): manifest} of one release, and NOTES.txt."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    manifests = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in manifests, f"{key} rendered twice"
                manifests[key] = doc
    return manifests, out[f"{CHART.name}/templates/NOTES.txt"]


def pod_specs(manifests):
    for (kind, name), m in manifests.items():
        if kind in ("Deployment", "StatefulSet", "Job"):
            yield name, m["spec"]["template"]["spec"]


def containers(manifests):
    for name, spec in pod_specs(manifests):
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield name, c


@pytest.mark.parametrize("label", sorted(VALUE_SETS))
def test_lints_renders_and_validates(chart, label):
    import kubernetes_validate

    hp = helm()
    report = hp.lint(CHART, VALUE_SETS[label], strict=True, namespace=NAMESPACE, kube_version=f"v{K8S_VERSION}")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report
    manifests, notes = render(chart, VALUE_SETS[label])
    for manifest in manifests.values():
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)  # raises with the failing path
    kinds = {kind for kind, _ in manifests}
    assert {"ConfigMap", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Job"} <= kinds
    # the validator is strict: a field Kubernetes does not know is an error
    broken = next(m for (kind, _), m in manifests.items() if kind == "PersistentVolumeClaim")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**broken, "spec": {**broken["spec"], "acessModes": ["ReadWriteOnce"]}},
                                     K8S_VERSION, strict=True)
    # secrets are referenced, never embedded
    assert not [k for k in manifests if k[0] == "Secret"]
    for name, c in containers(manifests):
        for env in c.get("env", []):
            if env["name"] in CREDENTIAL_ENV:
                assert "valueFrom" in env and "value" not in env, (name, env["name"])
        assert c["resources"]["requests"], (name, c["name"])  # every container asks for what it needs
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    for (kind, name), m in manifests.items():
        if kind in ("Deployment", "StatefulSet"):
            for c in m["spec"]["template"]["spec"]["containers"]:
                assert "readinessProbe" in c and "livenessProbe" in c, (name, c["name"])
    assert "kat pipeline submit" in notes


def test_defaults_match_what_the_pipeline_expects(chart):
    """The names the cluster pipeline refers to (kat_core ClusterConfig) are the ones the chart creates, and
    the config map holds every key the pipeline's tasks read."""
    from pipelines.autothink import CONFIG_MAP_KEYS

    manifests, _ = render(chart, {})
    expected = ClusterConfig()
    cm = manifests[("ConfigMap", expected.config_map)]["data"]
    assert set(CONFIG_MAP_KEYS) <= set(cm)
    assert cm["MLFLOW_TRACKING_URI"] == "http://kat-platform-mlflow.kat.svc.cluster.local:5000"
    assert cm["KAT_S3_ENDPOINT"] == "https://s3.us-east-1.amazonaws.com"  # external, no endpoint: AWS S3
    assert ("ServiceAccount", expected.service_account) in manifests
    pvc = manifests[("PersistentVolumeClaim", expected.checkpoints_pvc)]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every TrainJob node mounts it
    mlflow = manifests[("Deployment", "kat-platform-mlflow")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == expected.s3_secret
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://mlflow:$(POSTGRES_PASSWORD)@")
    assert "--artifacts-destination=s3://kat/mlflow" in mlflow["args"]
    assert ("StatefulSet", "kat-platform-postgres") in manifests
    assert not [k for k in manifests if k == ("StatefulSet", "kat-platform-s3")]


def test_rbac_is_least_privilege(chart):
    manifests, _ = render(chart, {})
    role = manifests[("Role", "kat-platform-pipeline-runner")]
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    trainjobs = rules[(("trainer.kubeflow.org",), ("trainjobs",))]
    assert {"create", "get", "watch"} <= set(trainjobs["verbs"])
    secrets = rules[(("",), ("secrets",))]
    assert secrets["verbs"] == ["get"]
    assert set(secrets["resourceNames"]) == {"kat-s3", "kat-mlflow", "mlpipeline-minio-artifact"}  # its own only
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    assert not [r for r in role["rules"] if "secrets" in r["resources"] and {"list", "watch"} & set(r["verbs"])]
    binding = manifests[("RoleBinding", "kat-platform-pipeline-runner")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kat-pipeline-runner", "namespace": NAMESPACE}]
    cluster_role = manifests[("ClusterRole", "kat-platform-kat-trainer-runtimes")]
    assert cluster_role["rules"] == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"],
                                      "verbs": ["get", "list"]}]


def test_object_store_modes(chart):
    manifests, notes = render(chart, VALUE_SETS["external-s3"])
    assert manifests[("ConfigMap", "kat-platform")]["data"]["KAT_S3_ENDPOINT"] == "https://s3.example.com:9000"
    assert manifests[("ConfigMap", "kat-platform")]["data"]["KAT_S3_BUCKET"] == "ml-artifacts"
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for _, c in containers(manifests)
                   for e in c.get("env", []) if e["name"].startswith("AWS_") and "valueFrom" in e}
    assert secret_refs == {"team-s3"}
    assert ("StatefulSet", "kat-platform-s3") not in manifests and "external https://s3.example.com:9000" in notes

    manifests, notes = render(chart, VALUE_SETS["bundled-store"])
    store = manifests[("StatefulSet", "kat-platform-s3")]["spec"]["template"]["spec"]
    assert store["containers"][0]["image"] == "chrislusf/seaweedfs:4.07"
    assert "-s3.config=/etc/seaweedfs/s3.json" in store["containers"][0]["args"]
    init_env = {e["name"]: e for e in store["initContainers"][0]["env"]}
    assert init_env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "kat-s3",
                                                                              "key": "AWS_SECRET_ACCESS_KEY"}
    assert {"name": "s3-config", "emptyDir": {"medium": "Memory"}} in store["volumes"]  # keys stay in memory
    endpoint = "http://kat-platform-s3.kat.svc.cluster.local:8333"
    assert manifests[("ConfigMap", "kat-platform")]["data"]["MLFLOW_S3_ENDPOINT_URL"] == endpoint
    assert manifests[("Service", "kat-platform-s3")]["spec"]["ports"][0]["port"] == 8333
    assert f"bundled SeaweedFS at {endpoint}" in notes


def test_ingress_and_dashboard_switches(chart):
    manifests, notes = render(chart, VALUE_SETS["ingress"])
    ingress = manifests[("Ingress", "kat-platform-dashboard")]["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"hosts": ["kat.example.org"], "secretName": "kat-tls"}]
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "kat-platform-dashboard", "port": {"name": "http"}}
    assert "https://kat.example.org/" in notes
    dashboard = manifests[("Deployment", "kat-platform-dashboard")]["spec"]["template"]["spec"]
    assert dashboard["containers"][0]["args"] == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    assert dashboard["serviceAccountName"] == "kat-pipeline-runner"

    manifests, notes = render(chart, VALUE_SETS["dashboard-off"])
    assert not [k for k in manifests if "dashboard" in k[1]]  # no deployment, service nor ingress
    assert "Dashboard" not in notes
    manifests, _ = render(chart, VALUE_SETS["external-db"])
    env = {e["name"]: e for e in manifests[("Deployment", "kat-platform-mlflow")]["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-dsn", "key": "DSN"}
    assert ("StatefulSet", "kat-platform-postgres") not in manifests
    manifests, _ = render(chart, VALUE_SETS["no-mlflow"])
    assert manifests[("ConfigMap", "kat-platform")]["data"]["MLFLOW_TRACKING_URI"] == "https://mlflow.example.org"


def test_the_optional_model_server_serves_the_registry_alias(chart):
    manifests, _ = render(chart, {})
    assert not [k for k in manifests if k[1] == "kat-platform-model"]  # off by default
    manifests, notes = render(chart, VALUE_SETS["model-server"])
    assert 'model "kat@candidate"' in notes
    spec = manifests[("Deployment", "kat-platform-model")]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["command"] == ["kat"]
    assert c["args"] == ["serve-model", "kat@candidate", "--host", "0.0.0.0", "--port", "8000", "--poll-s", "10"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {"configMapRef": {"name": "kat-platform"}} in c["envFrom"]  # MLFLOW_TRACKING_URI, the S3 endpoint
    assert {e["name"] for e in c["env"]} >= {"KAT_HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    service = manifests[("Service", "kat-platform-model")]["spec"]
    assert service["ports"][0]["targetPort"] == "http" and service["ports"][0]["port"] == 80


@pytest.mark.parametrize("values, where, what", [
    ({"mlflow": {"port": "5000"}}, "/mlflow/port", "got string, want integer"),
    ({"dashboard": {"ingress": {"enabled": "yes"}}}, "/dashboard/ingress/enabled", "want boolean"),
    ({"objectStore": {"existingSecret": ""}}, "/objectStore/existingSecret", "minLength"),
    ({"objectStore": {"existingSecret": None}}, "/objectStore", "missing property 'existingSecret'"),
    ({"objectStore": {"mode": "minio"}}, "/objectStore/mode", "must be one of"),
    ({"mlflow": {"backendStore": {"mode": "external", "external": {"existingSecret": ""}}}},
     "/mlflow/backendStore/external/existingSecret", "minLength"),
    ({"mlflow": {"backendStore": {"bundled": {"existingSecret": ""}}}},
     "/mlflow/backendStore/bundled/existingSecret", "minLength"),
    ({"checkpoints": {"accessModes": ["ReadWriteSometimes"]}}, "/checkpoints/accessModes/0", "must be one of"),
    ({"mlflow": {"resources": {"requests": {"cpu": "lots"}}}}, "/mlflow/resources/requests/cpu", "does not match"),
    ({"dashboard": {"typo": 1}}, "/dashboard", "additional properties 'typo' not allowed"),
    ({"modelServer": {"alias": "@champion"}}, "/modelServer/alias", "does not match"),
])
def test_schema_rejects_bad_values_readably(chart, values, where, what):
    hp = helm()
    with pytest.raises(hp.HelmValuesError) as e:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    message = str(e.value)
    assert f"at '{where}'" in message and what in message, message
    # and `helm lint` (what `make lint-chart` and CI run) reports the same
    report = hp.lint(CHART, values)
    assert any(where in err for err in report["errors"]), report

