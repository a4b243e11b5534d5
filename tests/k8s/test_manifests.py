"""Every rendered PyTorchJob of every recipe: CRD schema, operator admission, our lint; one broken
manifest per rule is rejected; the render equals plain ``kubectl kustomize``; clear render errors.

The CRD is read from ../shared/k8s-crds beside the checkout (never copied into the repository).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "k8s"))
import render  # noqa: E402
import validate  # noqa: E402

RECIPES = ["asr_ddp", "tts_ddp", "salm_fsdp2", "salm_tp_fsdp2"]
SHAPES = [dict(nodes=4, gpus_per_node=8), dict(nodes=1, gpus_per_node=2), dict(nodes=4, gpus_per_node=8, elastic=True,
                                                                                min_nodes=2)]


@pytest.fixture(scope="module")
def crd_schema():
    try:
        return validate.load_crd_schema()
    except FileNotFoundError as exc:
        pytest.skip(f"operator CRD absent: {exc}")


def job_of(text: str) -> dict:
    (job,) = validate.pytorchjobs(text)
    return job


@pytest.fixture(scope="module")
def rendered() -> dict:
    return {(r, i): job_of(render.render(r, image="registry.example.com/speech-recipes:0.1.0", **shape))
            for r in RECIPES for i, shape in enumerate(SHAPES)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_rendered_manifest_is_valid(recipe, rendered, crd_schema):
    for i, shape in enumerate(SHAPES):
        job = rendered[(recipe, i)]
        assert validate.validate_job(job, crd_schema) == [], (recipe, shape)
        spec = job["spec"]
        assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
        assert spec["nprocPerNode"] == str(shape["gpus_per_node"])
        assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
        workers = spec["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0)
        assert 1 + workers == shape["nodes"]
        c = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        assert c["image"] == "registry.example.com/speech-recipes:0.1.0"
        assert {"name": "RECIPE", "value": recipe} in c["env"]
        assert c["command"] == ["python", "-m", "common.tools.launch"] and c["args"][:2] == ["$(RECIPE)", "--cluster"]
        if shape.get("elastic"):
            assert spec["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 2, "maxReplicas": 4,
                                             "maxRestarts": 3}
        else:
            assert "elasticPolicy" not in spec


@pytest.mark.parametrize("recipe", RECIPES)
def test_overlays_as_committed_are_valid_and_render_equals_kustomize(recipe, crd_schema, kubectl):
    plain = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / recipe)], capture_output=True,
                           text=True, check=True).stdout
    assert validate.validate_stream(plain) == []
    # make k8s-render with the overlay's own shape (4 x 8, its image) is exactly kubectl kustomize.
    assert render.render(recipe) == plain


def test_make_k8s_render_prints_the_job():
    out = subprocess.run(["make", "-s", "k8s-render", "RECIPE=salm_tp_fsdp2", "NODES=2", "GPUS_PER_NODE=4",
                          "IMAGE=registry.example.com/sr:1.2.3", "JOB=exp-7"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    job = job_of(out.stdout)
    assert job["metadata"]["name"] == "exp-7" and job["spec"]["nprocPerNode"] == "4"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1


@pytest.mark.parametrize("recipe", RECIPES)
def test_gpu_manifests_train_a_real_size_preset_and_take_model_and_data(recipe):
    from common.run import compose

    for role in ("Master", "Worker"):
        c = _c(job_of(render.render(recipe)), role)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert ["model=$(MODEL)", "data=$(DATA)"] == [a for a in c["args"] if a.startswith(("model=", "data="))]
        assert env["DATA"] == "librispeech"
        cfg = compose(recipe, [f"model={env['MODEL']}", f"data={env['DATA']}"])  # what the pods compose
        assert cfg.model.about.parameters > 5e7, f"{recipe}: the GPU manifest trains {env['MODEL']}, a tiny model"
        assert cfg.data.train and cfg.data.max_duration_s_per_gpu
    out = subprocess.run(["make", "-s", "k8s-render", f"RECIPE={recipe}", "NODES=2", "MODEL=" + (
        "salm_tiny" if recipe.startswith("salm") else "ctc_tiny" if recipe == "asr_ddp" else "fastspeech_tiny"),
        "DATA=generated"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    env = {e["name"]: e.get("value") for e in _c(job_of(out.stdout), "Worker")["env"]}
    assert env["MODEL"].endswith("_tiny") and env["DATA"] == "generated"


@pytest.mark.parametrize("nodes", [1, 4])
def test_object_store_data_takes_credentials_only_from_a_secret(nodes, crd_schema):
    """OBJECT_STORE=1: every pod trains on the given s3:// data with the access key, secret key and
    (optional) endpoint from the speech-recipes-object-store Secret; no literal credential anywhere."""
    text = render.render("asr_ddp", nodes=nodes, gpus_per_node=8, image="registry.example.com/speech-recipes:0.1.0",
                         object_store=True, train_data="s3://corpus/shar/train", val_data="s3://corpus/dev_cuts.jsonl.gz")
    job = job_of(text)
    assert validate.validate_job(job, crd_schema) == []
    for role in ("Master", "Worker")[:1 if nodes == 1 else 2]:
        c = _c(job, role)
        env = {e["name"]: e for e in c["env"]}
        assert "data.train=$(DATA_TRAIN)" in c["args"] and "data.val=$(DATA_VAL)" in c["args"]
        assert env["DATA_TRAIN"]["value"] == "s3://corpus/shar/train"
        assert env["DATA_VAL"]["value"] == "s3://corpus/dev_cuts.jsonl.gz"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            assert "value" not in env[key]
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "speech-recipes-object-store", key
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"].get("optional") is True
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"].get("optional") is not True
    assert "AWS_" not in render.render("asr_ddp", nodes=2, gpus_per_node=8)  # only when asked for


@pytest.mark.parametrize("args,message", [
    (["--recipe", "nope"], "unknown RECIPE 'nope'"),
    (["--recipe", "asr_ddp", "--train-data", "s3://c/x"], "TRAIN_DATA / VAL_DATA go with OBJECT_STORE=1"),
    (["--recipe", "asr_ddp", "--object-store", "--train-data", "https://h/c.jsonl.gz?X-Amz-Signature=k"],
     "no query strings"),
    (["--recipe", "asr_ddp", "--image", "reg.io/sr:latest"], "'latest' is not a pinned version"),
    (["--recipe", "asr_ddp", "--image", "reg.io/sr"], "has no tag"),
    (["--recipe", "asr_ddp", "--nodes", "0"], "NODES must be >= 1, got 0"),
    (["--recipe", "asr_ddp", "--job", "My_Run"], "JOB 'My_Run' is not a DNS-1035 label"),
    (["--recipe", "asr_ddp", "--nodes", "1", "--elastic"], "ELASTIC=1 needs NODES >= 2"),
    (["--recipe", "asr_ddp", "--elastic", "--min-nodes", "5"], "MIN_NODES=5"),
    (["--recipe", "asr_ddp", "--model", "canary_qwen_2p5b"], "MODEL 'canary_qwen_2p5b' is not a model preset of "
                                                            "RECIPE=asr_ddp (its presets: ctc_tiny, fastconformer"),
    (["--recipe", "tts_ddp", "--data", "libri"], "DATA 'libri' is not a data preset (known: english, generated, librispeech"),
])
def test_render_errors_name_the_bad_value(args, message, capsys):
    assert render.main(args) == 2
    assert message in capsys.readouterr().err


# ---- one deliberately broken manifest per rule ------------------------------------------------

def _pod(job, role="Master"):
    return job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]


def _c(job, role="Master"):
    return _pod(job, role)["containers"][0]


def _env(job, name, role="Master"):
    return next(e for e in _c(job, role)["env"] if e["name"] == name)


BREAKERS = {
    "schema": lambda j: j["spec"].update(nprocsPerNode="8"),  # a typo the API server would prune silently
    "schema-nested": lambda j: _c(j).update(volumeMount=[]),  # typo of volumeMounts
    "schema-type": lambda j: _c(j)["resources"].update(limits=["nvidia.com/gpu"]),
    "schema-unknown-in-pod": lambda j: _pod(j).update(restartpolicy="Never"),
    "admission-name": lambda j: j["metadata"].update(name="Salm_TP"),
    "admission-roles": lambda j: j["spec"]["pytorchReplicaSpecs"].update(
        Chief=copy.deepcopy(j["spec"]["pytorchReplicaSpecs"]["Worker"])),
    "admission-container": lambda j: _c(j).update(name="trainer"),
    "admission-container-image": lambda j: _c(j, "Worker").pop("image"),
    "admission-replicas": lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2),
    "admission-replicas-worker": lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=0),
    "admission-elastic": lambda j: (j["spec"].update(elasticPolicy={"rdzvBackend": "c10d"}),
                                    j["spec"]["pytorchReplicaSpecs"].pop("Worker")),
    "admission-elastic-nproc": lambda j: j["spec"].update(elasticPolicy={"nProcPerNode": 8}),
    "restart-policy": lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(restartPolicy="Never"),
    "standalone": lambda j: j["spec"].update(elasticPolicy={"rdzvBackend": "c10d", "standalone": True}),
    "standalone-arg": lambda j: _c(j)["args"].insert(0, "--standalone"),
    "nproc-gpus": lambda j: _c(j, "Worker")["resources"]["limits"].update({"nvidia.com/gpu": 4}),
    "operator-env": lambda j: _c(j)["env"].append({"name": "PET_NNODES", "value": "4"}),
    "operator-env-master": lambda j: _c(j, "Worker")["env"].append({"name": "MASTER_ADDR", "value": "10.0.0.1"}),
    "volume-mount": lambda j: _c(j)["volumeMounts"].append({"name": "models", "mountPath": "/models"}),
    "image-tag": lambda j: _c(j).update(image="registry.example.com/speech-recipes:latest"),
    "image-tag-untagged": lambda j: _c(j, "Worker").update(image="registry.example.com/speech-recipes"),
    "secret-env": lambda j: _env(j, "WANDB_API_KEY").update(value="abc123", valueFrom=None) or
    _env(j, "WANDB_API_KEY").pop("valueFrom"),
    "secret-env-required": lambda j: _env(j, "HF_TOKEN", "Worker")["valueFrom"]["secretKeyRef"].pop("optional"),
    "shm": lambda j: _pod(j)["volumes"].__setitem__(1, {"name": "dshm", "emptyDir": {}}),
    "outputs-pvc": lambda j: _pod(j, "Worker")["volumes"].__setitem__(0, {"name": "workspace", "emptyDir": {}}),
    "run-name": lambda j: _env(j, "RUN_NAME").update(valueFrom={"fieldRef": {"fieldPath": "metadata.name"}}),
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_each_rule_rejects_its_broken_manifest(case, rendered, crd_schema):
    job = copy.deepcopy(rendered[("salm_tp_fsdp2", 0)])
    assert validate.validate_job(job, crd_schema) == []
    BREAKERS[case](job)
    problems = validate.validate_job(job, crd_schema)
    rule = case.split("-")[0] if case.startswith(("schema", "standalone")) else case
    rule = {"admission-container-image": "admission-container", "admission-replicas-worker": "admission-replicas",
            "admission-elastic-nproc": "admission-elastic", "operator-env-master": "operator-env",
            "image-tag-untagged": "image-tag", "secret-env-required": "secret-env"}.get(rule, rule)
    assert any(p.startswith(f"[{rule}]") for p in problems), problems


def test_schema_closes_only_listed_objects(crd_schema):
    # Free-form maps (labels, resource limits) stay open; listed objects are closed.
    assert crd_schema["additionalProperties"] is False
    meta = crd_schema["properties"]["metadata"]
    assert "additionalProperties" not in meta  # metadata is `type: object` without properties in the CRD


def test_validate_cli_reports_rules(tmp_path):
    text = render.render("asr_ddp").replace("restartPolicy: OnFailure", "restartPolicy: Always", 1)
    f = tmp_path / "job.yaml"
    f.write_text(text)
    out = subprocess.run([sys.executable, str(ROOT / "k8s" / "validate.py"), str(f)], capture_output=True, text=True)
    assert out.returncode == 1 and "[restart-policy] Master: restartPolicy is 'Always'" in out.stdout


def test_committed_yaml_parses():
    for path in (ROOT / "k8s").rglob("*.yaml"):
        assert list(yaml.safe_load_all(path.read_text())), path


# ---- Kubeflow Trainer v2: one TrainJob per recipe ---------------------------------------------

@pytest.fixture(scope="module")
def trainjob_schema():
    try:
        return validate.load_crd_schema(version="v1alpha1", crd_file=validate.TRAINJOB_CRD_FILE)
    except FileNotFoundError as exc:
        pytest.skip(f"Trainer v2 CRD absent: {exc}")


@pytest.mark.parametrize("recipe", RECIPES)
def test_trainjob_is_valid_and_runs_what_the_pytorchjob_runs(recipe, trainjob_schema):
    tj = yaml.safe_load((ROOT / "k8s" / "trainjob" / f"{recipe}.yaml").read_text())
    assert validate.validate_trainjob(tj, trainjob_schema) == []
    job = job_of(render.render(recipe))
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    t = tj["spec"]["trainer"]
    assert (t["image"], t["command"], t["args"]) == (c["image"], c["command"], c["args"])
    assert [e for e in t["env"] if e["name"] != "RUN_NAME"] == [e for e in c["env"] if e["name"] != "RUN_NAME"]
    assert tj["metadata"]["name"] == job["metadata"]["name"]


def test_pods_surface_hangs_with_the_launch_plans_nccl_settings(rendered):
    """The manifests spell out common.cluster.RANK_ENV's NCCL settings (the launcher would set them too):
    the same values, so a hang ends the same way under Kubernetes, Slurm and make run."""
    from common.cluster import RANK_ENV

    nccl = {k: v for k, v in RANK_ENV.items() if k.startswith("TORCH_NCCL_ASYNC") or k in (
        "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_BUFFER_SIZE")}
    assert len(nccl) == 3
    for (recipe, _), job in rendered.items():
        for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
            env = {e["name"]: e.get("value") for e in replica["template"]["spec"]["containers"][0]["env"]}
            assert {k: env.get(k) for k in nccl} == nccl, (recipe, role)


@pytest.mark.parametrize("breaker,rule", [
    (lambda t: t["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "2"}), "operator-env"),
    (lambda t: t["spec"]["trainer"].update(numProcPerNode=4), "nproc-gpus"),
    (lambda t: t["spec"]["trainer"].update(image="ghcr.io/example/speech-recipes:latest"), "image-tag"),
    (lambda t: t["spec"]["trainer"].update(numNode=2), "schema"),
])
def test_trainjob_rules_reject_broken_manifests(breaker, rule, trainjob_schema):
    tj = yaml.safe_load((ROOT / "k8s" / "trainjob" / "salm_tp_fsdp2.yaml").read_text())
    breaker(tj)
    assert any(p.startswith(f"[{rule}]") for p in validate.validate_trainjob(tj, trainjob_schema))
