"""The Kubernetes example manifests are valid against the Kubernetes schemas (strict: no unknown fields)."""

import pathlib

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = pathlib.Path(__file__).resolve().parents[2] / "examples" / "kubernetes"
VERSION = "1.30.0"


def _documents():
    for path in sorted(K8S.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                yield pytest.param(doc, id=f"{path.name}#{i}-{doc['kind']}")


@pytest.mark.parametrize("doc", list(_documents()))
def test_manifest_is_valid(doc):
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_manifests_cover_etcd_statefulset_job_and_headless_services():
    kinds = [(d.values[0]["kind"], d.values[0]["metadata"]["name"]) for d in _documents()]
    assert ("StatefulSet", "etcd") in kinds
    assert ("Job", "resilient-train") in kinds
    services = [d.values[0] for d in _documents() if d.values[0]["kind"] == "Service"]
    assert services and all(s["spec"]["clusterIP"] == "None" for s in services)
    job = next(d.values[0] for d in _documents() if d.values[0]["kind"] == "Job")
    assert job["spec"]["completionMode"] == "Indexed"
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == ["resilient-run"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" for m in pod["containers"][0]["volumeMounts"])


def test_bad_manifest_is_rejected():
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"clusterIp": "None"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)
