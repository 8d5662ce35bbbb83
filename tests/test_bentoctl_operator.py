"""bentoctl/sagemaker-operator through the real bentoctl 0.4.0 CLI (in .venv-bentoctl).

`bentoctl operator install` registers it, `bentoctl generate` writes Terraform that parses as
HCL (python-hcl2) and holds the resources and values scripts/deploy_sagemaker.py creates, a bad
spec is refused, and the operator's ECR repository calls run against moto's server on
127.0.0.1, including `bentoctl destroy` (with a stand-in `terraform`) leaving the repository of
an endpoint that still exists. `bentoctl build` (a real image from a real bento) runs in
scripts/container_test.sh, which has the Docker engine and the bento (tests/test_container.py).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
import hcl2
import pytest
import yaml
from hcl2 import SerializationOptions
from moto.server import ThreadedMotoServer

from tests.helpers import REPO_ROOT
from tests.test_deploy_sagemaker import (  # the script's code, imported there from scripts/
    GPU_AMI_VERSION,
    Aws,
    blue_green_config,
    endpoint_config_request,
    inference_ami_version,
    scaling_policy_name,
    scaling_policy_request,
    scaling_resource_id,
)

BENTOCTL_VENV = REPO_ROOT / ".venv-bentoctl"
OPERATOR = REPO_ROOT / "bentoctl" / "sagemaker-operator"
PARSE = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)

pytestmark = pytest.mark.skipif(
    not (BENTOCTL_VENV / "bin" / "bentoctl").exists(),
    reason="bentoctl's own venv is missing: `make bentoctl` (`make test` makes it)",
)


def venv_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a process of bentoctl's own venv: without the PYTHONPATH (or PYTHONHOME) this
    test runs under, which would put another Python's packages before the venv's own (the GPU
    rehearsal's Python 3.12 site: bentoctl failed importing pydantic_core)."""
    return {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def bentoctl(
    home: Path, *args: str, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None
) -> str:
    """Run the bentoctl CLI; it exits 0 even on its own errors, so callers read the output."""
    result = subprocess.run(
        [str(BENTOCTL_VENV / "bin" / "bentoctl"), *args],
        cwd=cwd,
        env={
            **venv_env(env or os.environ),
            "BENTOCTL_HOME": str(home),
            "BENTOML_DO_NOT_TRACK": "true",
            "COLUMNS": "300",  # rich wraps its output at the terminal's width otherwise
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bentoctl home with the operator installed from the repository."""
    home = tmp_path_factory.mktemp("bentoctl-home")
    assert "Installed clip-sagemaker!" in bentoctl(home, "operator", "install", str(OPERATOR))
    assert str(OPERATOR.name) in bentoctl(home, "operator", "list")
    return home


def load_hcl(path: Path) -> dict[str, Any]:
    with path.open() as file:
        return hcl2.load(file, serialization_options=PARSE)


def resources(main: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`resource "TYPE" "NAME" {...}` blocks by TYPE (each of ours is named `clip`)."""
    found = {}
    for block in main["resource"]:
        ((kind, named),) = block.items()
        found[kind.strip('"')] = {name.strip('"'): body for name, body in named.items()}["clip"]
    return found


def block(body: dict[str, Any], *path: str) -> dict[str, Any]:
    """A nested block (python-hcl2 gives each as a one-item list)."""
    for name in path:
        (body,) = body[name]
    return body


def generate(home: Path, config: Path, out: Path) -> tuple[dict, dict]:
    out.mkdir()
    output = bentoctl(home, "generate", "-f", str(config), "--save-path", str(out))
    assert "main.tf" in output and "bentoctl.tfvars" in output, output
    return load_hcl(out / "main.tf"), load_hcl(out / "bentoctl.tfvars")


def test_generate_writes_the_terraform_of_deploy_sagemaker_py(home, tmp_path):
    main, values = generate(home, REPO_ROOT / "deployment_config.yaml", tmp_path / "out")
    found = resources(main)
    assert set(found) == {
        "aws_sagemaker_model",
        "aws_sagemaker_endpoint_configuration",
        "aws_sagemaker_endpoint",
        "aws_appautoscaling_target",
        "aws_appautoscaling_policy",
    }
    # Every value comes from a declared variable, and every variable without a default is set.
    declared = {name.strip('"'): body for block in main["variable"] for name, body in block.items()}
    assert set(values) <= set(declared)
    assert {name for name, body in declared.items() if "default" not in body} <= set(values)

    config = yaml.safe_load((REPO_ROOT / "deployment_config.yaml").read_text())
    spec = config["spec"]
    for key in ("region", "execution_role_arn", "instance_type", "initial_instance_count"):
        assert values[key] == spec[key], key
    assert values["deployment_name"] == config["name"]
    assert values["env"] == config["env"]
    assert values["autoscaling_target"] == spec["autoscaling_target"]
    assert values["image_tag"] == ""  # until `bentoctl build` pushes one

    # The same shapes as deploy_sagemaker.py's requests.
    (locals_,) = main["locals"]
    model = found["aws_sagemaker_model"]
    container = block(model, "primary_container")
    assert container["mode"] == "SingleModel"
    assert container["image"] == "${var.image_tag}"
    assert container["model_data_url"] == "${var.model_data_url}"
    assert model["enable_network_isolation"] == "${var.network_isolation}"
    request = endpoint_config_request("n", "m", "ml.m5.xlarge", 1, 600)
    expected_variant = request["ProductionVariants"][0]
    variant = block(found["aws_sagemaker_endpoint_configuration"], "production_variants")
    assert locals_["variant"] == expected_variant["VariantName"]
    assert variant["initial_variant_weight"] == expected_variant["InitialVariantWeight"]
    assert variant["container_startup_health_check_timeout_in_seconds"] == "${var.startup_timeout}"
    assert variant["inference_ami_version"] == "${var.inference_ami_version}"
    assert values["inference_ami_version"] is None  # a CPU instance type, as deploy's request
    assert "InferenceAmiVersion" not in expected_variant
    policy = block(found["aws_sagemaker_endpoint"], "deployment_config", "blue_green_update_policy")
    expected = blue_green_config(300, None, [], 600)["BlueGreenUpdatePolicy"]
    assert block(policy, "traffic_routing_configuration")["type"] == "ALL_AT_ONCE"
    limit = policy["maximum_execution_timeout_in_seconds"].strip("${}")
    evaluated = eval(  # the HCL expression, with deploy's inputs: the same number
        limit.replace("var.startup_timeout", "600").replace("var.bake_seconds", "300")
    )
    assert evaluated == expected["MaximumExecutionTimeoutInSeconds"]
    target = found["aws_appautoscaling_target"]
    scaling = scaling_policy_request(scaling_resource_id("E", "V"), "E", 100, 300, 60)
    assert target["scalable_dimension"] == scaling["ScalableDimension"]
    assert target["service_namespace"] == scaling["ServiceNamespace"]
    assert target["resource_id"] == "endpoint/${aws_sagemaker_endpoint.clip.name}/variant/" + (
        "${local.variant}"
    )
    tracking = block(
        found["aws_appautoscaling_policy"], "target_tracking_scaling_policy_configuration"
    )
    expected_tracking = scaling["TargetTrackingScalingPolicyConfiguration"]
    assert (
        block(tracking, "predefined_metric_specification")["predefined_metric_type"]
        == expected_tracking["PredefinedMetricSpecification"]["PredefinedMetricType"]
    )
    assert found["aws_appautoscaling_policy"]["policy_type"] == scaling["PolicyType"]
    policy_name = "${var.deployment_name}" + scaling_policy_name("")
    assert found["aws_appautoscaling_policy"]["name"] == policy_name


def test_generate_carries_model_data_image_and_no_autoscaling(home, tmp_path):
    config = yaml.safe_load((REPO_ROOT / "deployment_config.yaml").read_text())
    config["name"] = "clip-tuned"
    config["spec"].update(
        model_data_url="s3://my-bucket/clip/model.tar.gz",
        image_tag="123456789012.dkr.ecr.us-east-1.amazonaws.com/clip:v2",
        autoscaling_min_instances=0,
        network_isolation=True,
        instance_type="ml.g5.xlarge",
    )
    # A blank API key is no key (as the server reads it): not refused.
    config["env"] = {"CLIP_TEMPLATE_NOTE": "${not interpolated}", "CLIP_API_KEY": " "}
    path = tmp_path / "deployment_config.yaml"
    path.write_text(yaml.safe_dump(config))
    _, values = generate(home, path, tmp_path / "out")
    assert values["env"]["CLIP_API_KEY"] == " "
    assert values["model_data_url"] == "s3://my-bucket/clip/model.tar.gz"
    assert values["image_tag"] == config["spec"]["image_tag"]
    assert values["autoscaling_min_instances"] == 0  # main.tf: count = 0, no scaling resources
    assert values["network_isolation"] is True
    known = Aws("us-east-1", None, True).enum("sagemaker", "ProductionVariantInferenceAmiVersion")
    expected_ami = inference_ami_version("ml.g5.xlarge", "auto", known)
    assert values["inference_ami_version"] == expected_ami == GPU_AMI_VERSION
    text = (tmp_path / "out" / "bentoctl.tfvars").read_text()
    assert '"$${not interpolated}"' in text  # a literal for Terraform, not an expression


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"instance_type": "m5.xlarge"}, "instance_type"),
        ({"execution_role_arn": "SageMakerClipRole"}, "execution_role_arn"),
        ({"model_data_url": "https://example.com/model.tar.gz"}, "model_data_url"),
        ({"inference_ami_version": "AL2 GPU 4"}, "inference_ami_version"),
        ({"autoscaling_min_instances": 5, "autoscaling_max_instances": 2}, "must not exceed"),
        # Written into bentoctl.tfvars in clear, and every invocation a 401.
        ({"env": {"CLIP_API_KEY": "s3cr3t"}}, "CLIP_API_KEY would make every invocation a 401"),
        # ECR refuses both, at `bentoctl build`, after the image is built.
        ({"name": "Clip-Prod"}, "lower-case"),
        ({"name": "c"}, "lower-case"),
    ],
)
def test_a_bad_spec_is_refused_and_nothing_is_written(home, tmp_path, change, says):
    config = yaml.safe_load((REPO_ROOT / "deployment_config.yaml").read_text())
    change = dict(change)
    for key in ("name", "env"):  # the config's own keys, beside its spec
        if key in change:
            config[key] = change.pop(key)
    config["spec"].update(change)
    path = tmp_path / "deployment_config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    out.mkdir()
    output = bentoctl(home, "generate", "-f", str(path), "--save-path", str(out))
    assert "Error [InvalidDeploymentConfig]" in output and says in output, output
    assert list(out.iterdir()) == []


@pytest.fixture
def moto_env() -> Any:
    """The environment of a process whose AWS calls go to a moto server on 127.0.0.1."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    server.stop()


def moto_client(env: dict[str, str], service: str) -> Any:
    return boto3.client(
        service,
        region_name="us-east-1",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def test_the_ecr_repository_calls_against_moto(home, tmp_path, moto_env):
    env = moto_env
    script = (
        "import sys; from clip_sagemaker import create_repository, delete_repository\n"
        "spec = {'region': 'us-east-1'}\n"
        "uri, user, password = create_repository('clip-bentoctl', spec)\n"
        "print(uri, user, bool(password))\n"
        "assert create_repository('clip-bentoctl', spec)[0] == uri  # found the second time\n"
        "if sys.argv[1:] == ['delete']: delete_repository('clip-bentoctl', spec)\n"
    )
    python = str(BENTOCTL_VENV / "bin" / "python")
    run = {
        "cwd": OPERATOR,
        "env": venv_env(env),
        "capture_output": True,
        "text": True,
        "timeout": 60,
    }
    created = subprocess.run([python, "-c", script], **run)
    assert created.returncode == 0, created.stderr
    uri, user, has_password = created.stdout.split()
    assert uri.endswith(".amazonaws.com/clip-bentoctl") and user == "AWS"
    assert has_password == "True"
    ecr = moto_client(env, "ecr")
    # moto's state is per process, shared with test_deploy_sagemaker's server: by name.
    (repository,) = ecr.describe_repositories(repositoryNames=["clip-bentoctl"])["repositories"]
    assert repository["repositoryUri"] == uri
    assert repository["imageScanningConfiguration"] == {"scanOnPush": True}
    deleted = subprocess.run([python, "-c", script, "delete"], **run)
    assert deleted.returncode == 0, deleted.stderr
    names = [r["repositoryName"] for r in ecr.describe_repositories()["repositories"]]
    assert "clip-bentoctl" not in names


FAKE_TERRAFORM = """#!/bin/sh
# Stands in for terraform: records its arguments; `output` says whether anything is applied;
# `apply -destroy` answers as a "no" at Terraform's prompt does (nothing destroyed, exit 1).
echo "$*" >> "$FAKE_TERRAFORM_LOG"
case "$1" in
  output) if [ -n "$FAKE_TERRAFORM_APPLIED" ]; then echo '{"endpoint_name": {"value": "x"}}';
          else echo '{}'; fi ;;
  apply) echo "Destroy cancelled."; exit 1 ;;
esac
"""


def test_destroy_leaves_the_repository_of_an_endpoint_that_still_exists(home, tmp_path, moto_env):
    """bentoctl 0.4.0's `destroy` deletes the repository even when `terraform destroy` failed or
    was declined; the operator refuses while the endpoint of the deployment's name exists."""
    name = "clip-destroy"
    config = yaml.safe_load((REPO_ROOT / "deployment_config.yaml").read_text())
    config["name"] = name
    work = tmp_path / "work"
    (work / ".terraform").mkdir(parents=True)  # bentoctl's signs of an initialised Terraform
    (work / "bentoctl.tfvars").write_text("")
    (work / "deployment_config.yaml").write_text(yaml.safe_dump(config))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    terraform = bin_dir / "terraform"
    terraform.write_text(FAKE_TERRAFORM)
    terraform.chmod(0o755)
    log = tmp_path / "terraform.log"
    env = {
        **moto_env,
        "PATH": f"{bin_dir}{os.pathsep}{moto_env['PATH']}",
        "FAKE_TERRAFORM_LOG": str(log),
        "FAKE_TERRAFORM_APPLIED": "1",
    }

    ecr, sagemaker = moto_client(env, "ecr"), moto_client(env, "sagemaker")
    uri = ecr.create_repository(repositoryName=name)["repository"]["repositoryUri"]
    sagemaker.create_model(
        ModelName=f"{name}-0",
        ExecutionRoleArn=config["spec"]["execution_role_arn"],
        PrimaryContainer={"Image": f"{uri}:v1"},
    )
    sagemaker.create_endpoint_config(
        EndpointConfigName=f"{name}-0",
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": f"{name}-0",
                "InstanceType": "ml.m5.xlarge",
                "InitialInstanceCount": 1,
            }
        ],
    )
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-0")

    def repositories() -> list[str]:
        return [r["repositoryName"] for r in ecr.describe_repositories()["repositories"]]

    output = bentoctl(home, "destroy", "-f", "deployment_config.yaml", cwd=work, env=env)
    assert "apply -destroy -var-file bentoctl.tfvars" in log.read_text()  # it was declined
    assert f"ECR repository {name} left in place" in output, output
    assert f"endpoint {name} still exists (InService)" in output
    assert "Deleted the repository" not in output
    assert name in repositories()

    # Once the endpoint is gone (and nothing is applied), destroy deletes the repository.
    sagemaker.delete_endpoint(EndpointName=name)
    output = bentoctl(
        home,
        "destroy",
        "-f",
        "deployment_config.yaml",
        cwd=work,
        env={**env, "FAKE_TERRAFORM_APPLIED": ""},
    )
    assert f"Deleted the repository {name}" in output, output
    assert name not in repositories()
