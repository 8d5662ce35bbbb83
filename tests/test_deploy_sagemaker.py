"""scripts/deploy_sagemaker.py against moto's server on 127.0.0.1.

moto answers with the real AWS API shapes (boto3 validates requests and parses answers with the
same service models as against AWS) and stores what it is sent, but it cannot run the image.
What moto 5.2.5 does not model, and how these tests deal with it:
- sagemaker UpdateEndpoint is not implemented: a second deploy is checked up to the new model and
  endpoint config, the update call's parameters are checked against botocore's model of the API,
  and the error the script prints is checked;
- sagemaker-runtime InvokeEndpoint answers a canned body (or one queued through moto's API):
  the test queues the service's answer and checks the request moto received;
- instance types are checked against moto's own (older) list, which lacks e.g. ml.g5.
Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.validate import validate_parameters
from moto.server import ThreadedMotoServer

from tests.helpers import REPO_ROOT, SEED_CLASSES, encode, photo_like

# The script and its package, scripts/sagemaker_deploy/, imported as when the script runs:
# from scripts/, which Python then puts on sys.path.
SCRIPTS = str(REPO_ROOT / "scripts")
if SCRIPTS not in sys.path:
    sys.path.append(SCRIPTS)
import deploy_sagemaker as deploy  # noqa: E402
from sagemaker_deploy import aws as aws_module  # noqa: E402
from sagemaker_deploy import commands  # noqa: E402
from sagemaker_deploy.async_inference import (  # noqa: E402
    async_inference_config,
    backlog_policy_request,
    wake_alarm_request,
    wake_policy_request,
)
from sagemaker_deploy.aws import PROVISIONING_MARGIN_S, Aws, resolve_role, wait_in_service  # noqa: E402
from sagemaker_deploy.batch import transform_job_request  # noqa: E402
from sagemaker_deploy.builders import (  # noqa: E402
    DEFAULT_INSTANCE_TYPE,
    DEFAULT_STARTUP_TIMEOUT,
    GPU_AMI_VERSION,
    MASK,
    blue_green_config,
    check_endpoint_name,
    check_instance_type,
    endpoint_config_request,
    image_source,
    inference_ami_version,
    model_request,
    owned_by,
    parse_class,
    role_name,
    scalable_target_request,
    scaling_policy_request,
    scaling_resource_id,
)

# test_bentoctl_operator's, which imports the script's code from here:
from sagemaker_deploy.builders import scaling_policy_name as scaling_policy_name  # noqa: E402
from sagemaker_deploy.errors import AwsCallError, DeployError, StillChangingError  # noqa: E402
from sagemaker_deploy.settings import (  # noqa: E402
    COPIED_FIELDS,
    PARTS,
    SET_FIELDS,
    EndpointSettings,
    no_carried,
    resolve_settings,
)

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
IMAGE_URI = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/clip-bentoml:v1"
ROLE = "clip-sagemaker-execution"
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
UNSET = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@pytest.fixture(scope="module")
def moto_url() -> Any:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, moto_url: str) -> str:
    """Fake credentials and every AWS client pointed at moto, for the script and the checks."""
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**FAKE_ENV, "AWS_ENDPOINT_URL": moto_url}.items():
        monkeypatch.setenv(name, value)
    return moto_url


def aws(service: str) -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=os.environ["AWS_ENDPOINT_URL"])


@pytest.fixture(scope="module")
def role_arn(moto_url: str) -> str:
    iam = boto3.client(
        "iam",
        region_name=REGION,
        endpoint_url=moto_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "sagemaker.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    return iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = deploy.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def plan(out: str) -> list[tuple[str, Any]]:
    """The `[dry-run] service.operation {json}` lines of a dry run."""
    calls = []
    for line in out.splitlines():
        if line.startswith("[dry-run] "):
            call, _, params = line.removeprefix("[dry-run] ").partition(" ")
            calls.append((call, json.loads(params) if params.startswith("{") else params))
    return calls


def error_line(err: str) -> str:
    """The one `error:` line (stderr also carries `-> service.operation` progress lines)."""
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    return line


def state() -> dict[str, Any]:
    """Everything the script can create, as moto stores it."""
    sagemaker, scaling = aws("sagemaker"), aws("application-autoscaling")
    return {
        "models": sorted(m["ModelName"] for m in sagemaker.list_models()["Models"]),
        "configs": sorted(
            c["EndpointConfigName"] for c in sagemaker.list_endpoint_configs()["EndpointConfigs"]
        ),
        "endpoints": sorted(
            (e["EndpointName"], e["EndpointStatus"])
            for e in sagemaker.list_endpoints()["Endpoints"]
        ),
        "repositories": sorted(
            r["repositoryName"] for r in aws("ecr").describe_repositories()["repositories"]
        ),
        "targets": sorted(
            t["ResourceId"]
            for t in scaling.describe_scalable_targets(ServiceNamespace="sagemaker")[
                "ScalableTargets"
            ]
        ),
        "policies": sorted(
            p["PolicyName"]
            for p in scaling.describe_scaling_policies(ServiceNamespace="sagemaker")[
                "ScalingPolicies"
            ]
        ),
    }


def deploy_args(endpoint: str, *extra: str) -> list[str]:
    return ["deploy", "--endpoint", endpoint, "--image-uri", IMAGE_URI, "--role", ROLE, *extra]


def current_config(endpoint: str) -> dict[str, Any]:
    sagemaker = aws("sagemaker")
    name = sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    return sagemaker.describe_endpoint_config(EndpointConfigName=name)


# ---- pure parts ----


def test_requests_match_the_aws_api_model():
    """Each request the script builds is valid for botocore's model of the real API."""
    sagemaker = boto3.session.Session().client("sagemaker", region_name=REGION)
    scaling = boto3.session.Session().client("application-autoscaling", region_name=REGION)

    def check(client: Any, operation: str, params: dict[str, Any]) -> None:
        validate_parameters(
            params, client.meta.service_model.operation_model(operation).input_shape
        )

    model = model_request("clip-x", IMAGE_URI, "arn:aws:iam::1:role/r", {"A": "1"}, True)
    check(sagemaker, "CreateModel", model)
    assert model["PrimaryContainer"] == {
        "Image": IMAGE_URI,
        "Mode": "SingleModel",
        "Environment": {"A": "1"},
    }
    config = endpoint_config_request("c", "m", "ml.g5.xlarge", 3, 900, ami_version=GPU_AMI_VERSION)
    check(sagemaker, "CreateEndpointConfig", config)
    variant = config["ProductionVariants"][0]
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 900
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.g5.xlarge", 3)
    assert variant["InferenceAmiVersion"] == GPU_AMI_VERSION
    assert "InferenceAmiVersion" not in endpoint_config_request("c", "m", "t", 1, 600)

    canary = blue_green_config(600, 10, ["clip-5xx"], 900)
    check(
        sagemaker,
        "UpdateEndpoint",
        {"EndpointName": "e", "EndpointConfigName": "c", "DeploymentConfig": canary},
    )
    policy = canary["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"]["CanarySize"] == {
        "Type": "CAPACITY_PERCENT",
        "Value": 10,
    }
    assert policy["TerminationWaitInSeconds"] == 600
    assert 600 <= policy["MaximumExecutionTimeoutInSeconds"] <= 28800
    assert canary["AutoRollbackConfiguration"] == {"Alarms": [{"AlarmName": "clip-5xx"}]}
    at_once = blue_green_config(0, None, [], 3600)
    assert at_once["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["Type"] == "ALL_AT_ONCE"
    assert "AutoRollbackConfiguration" not in at_once

    rid = scaling_resource_id("clip", "AllTraffic")
    assert rid == "endpoint/clip/variant/AllTraffic"
    check(scaling, "RegisterScalableTarget", scalable_target_request(rid, 1, 4))
    check(scaling, "PutScalingPolicy", scaling_policy_request(rid, "clip", 70.0, 300, 60))


def test_input_checks():
    for good in ("ml.m5.xlarge", "ml.g5.xlarge", "ml.p4d.24xlarge", "ml.t2.medium", "ml.c5.large"):
        assert check_instance_type(good) == good
    for bad in ("m5.xlarge", "ml.m5", "ml.m5.huge", "", "ml..xlarge", "ML.M5.XLARGE"):
        with pytest.raises(DeployError, match="ml.g4dn.xlarge"):
            check_instance_type(bad)
    assert role_name("arn:aws:iam::123456789012:role/service/clip-exec") == "clip-exec"
    assert role_name("clip-exec") == "clip-exec"
    for bad in ("arn:aws:iam::123:user/bob", "a role"):
        with pytest.raises(DeployError):
            role_name(bad)
    for bad in ("-clip", "clip_1", "x" * 44):
        with pytest.raises(DeployError):
            check_endpoint_name(bad)
    assert owned_by("clip", "clip-20260101-120000-007")
    assert not owned_by("clip", "clip-staging-20260101-120000-007")
    assert parse_class("person with a bag=1") == ["person with a bag", 1]
    assert parse_class("bag=0") == ["bag", 0]
    with pytest.raises(DeployError):
        parse_class("bag=yes")


def test_gpu_endpoints_get_the_ami_whose_driver_the_images_torch_needs():
    """PyPI's torch 2.13.0 is a CUDA 13.0 build (driver 580 or newer): on SageMaker's default
    GPU hosts it would see no GPU. The AMI version is botocore's, so AWS knows it."""
    known = Aws(REGION, None, True).enum("sagemaker", "ProductionVariantInferenceAmiVersion")
    assert GPU_AMI_VERSION in known
    for gpu in (
        "ml.g4dn.xlarge",
        "ml.g5.xlarge",
        "ml.g6.xlarge",
        "ml.g6e.2xlarge",
        "ml.p4d.24xlarge",
    ):
        assert inference_ami_version(gpu, "auto", known) == GPU_AMI_VERSION
        assert inference_ami_version(gpu, "default", known) is None
    for cpu in ("ml.m5.xlarge", "ml.c5.2xlarge", "ml.t2.medium", "ml.inf2.xlarge"):
        assert inference_ami_version(cpu, "auto", known) is None
    chosen = "al2-ami-sagemaker-inference-gpu-3-1"
    assert inference_ami_version("ml.g5.xlarge", chosen, known) == chosen
    with pytest.raises(DeployError, match="auto, default or one of al2-ami"):
        inference_ami_version("ml.g5.xlarge", "al2-ami-gpu-9", known)


def test_endpoint_url_and_global_options(monkeypatch):
    """--endpoint-url wins over AWS_ENDPOINT_URL; global options work before or after the verb."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    client = Aws(None, "http://127.0.0.1:8", False).client("sagemaker")
    assert client.meta.endpoint_url == "http://127.0.0.1:8"
    assert Aws(None, None, False).client("iam").meta.endpoint_url == "http://127.0.0.1:9"
    parser = deploy.build_parser()
    for argv in (
        ["--dry-run", "--region", "eu-west-1", "delete"],
        ["delete", "--dry-run", "--region", "eu-west-1"],
    ):
        args = parser.parse_args(argv)
        assert args.dry_run is True and args.region == "eu-west-1"
    assert getattr(parser.parse_args(["delete"]), "dry_run", False) is False


# ---- against moto ----


def test_deploy_creates_model_config_and_endpoint(capsys, role_arn):
    code, out, err = run(
        capsys,
        *deploy_args("clip-a", "--instance-type", "ml.g4dn.xlarge", "--instance-count", "2"),
        *("--startup-timeout", "900", "--env", "CLIP_API_WORKERS=2", "--wait"),
    )
    assert code == 0, err
    assert "clip-a is InService on" in out
    sagemaker = aws("sagemaker")
    endpoint = sagemaker.describe_endpoint(EndpointName="clip-a")
    assert endpoint["EndpointStatus"] == "InService"
    config = current_config("clip-a")
    assert owned_by("clip-a", config["EndpointConfigName"])
    variant = config["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.g4dn.xlarge"
    assert variant["InitialInstanceCount"] == 2
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 900
    assert variant["VariantName"] == "AllTraffic"
    assert variant["InferenceAmiVersion"] == GPU_AMI_VERSION  # a GPU instance type
    model = sagemaker.describe_model(ModelName=variant["ModelName"])
    assert model["PrimaryContainer"]["Image"] == IMAGE_URI
    assert model["PrimaryContainer"]["Environment"] == {"CLIP_API_WORKERS": "2"}
    assert model["ExecutionRoleArn"] == role_arn


@pytest.mark.parametrize(
    ("instance_type", "warned"),
    [("ml.p3.2xlarge", True), ("ml.p3dn.24xlarge", True), ("ml.p2.xlarge", True)]
    + [("ml.g4dn.xlarge", False), ("ml.p4d.24xlarge", False), ("ml.m5.xlarge", False)],
)
def test_deploy_warns_that_gpus_older_than_turing_leave_it_on_the_cpus(
    capsys, role_arn, instance_type, warned
):
    code, out, err = run(
        capsys, "--dry-run", *deploy_args("clip-old-gpu", "--instance-type", instance_type)
    )
    assert code == 0, err
    assert (f"{instance_type}'s GPUs (K80 on ml.p2, V100 on ml.p3)" in err) is warned
    assert ("serve on the CPUs" in err) is warned
    assert any(call == "sagemaker.create_endpoint" for call, _ in plan(out))  # it goes on


def test_deploy_with_model_data_gives_the_model_a_checkpoint_for_opt_ml_model(capsys, role_arn):
    url = "s3://clip-models/fine-tuned/model.tar.gz"
    code, _, err = run(capsys, *deploy_args("clip-md", "--model-data", url))
    assert code == 0, err
    variant = current_config("clip-md")["ProductionVariants"][0]
    assert "InferenceAmiVersion" not in variant  # a CPU instance type: SageMaker's default AMI
    container = aws("sagemaker").describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]
    assert container["ModelDataUrl"] == url and container["Image"] == IMAGE_URI
    without = model_request("m", IMAGE_URI, role_arn, {}, False)["PrimaryContainer"]
    assert "ModelDataUrl" not in without  # the baked-in model unless asked
    for bad in ("https://clip-models.s3.amazonaws.com/model.tar.gz", "s3://clip-models/model.zip"):
        before = state()
        code, _, err = run(capsys, *deploy_args("clip-md2", "--model-data", bad))
        assert code == 2 and f"--model-data {bad!r}" in error_line(err)
        assert state() == before


def accept_updates(patch: pytest.MonkeyPatch) -> None:
    """UpdateEndpoint accepted, as AWS would (moto 5.2.5 has none): the model and config the
    update made stay, for a test to read."""
    real_call = Aws._call

    def call(self: Any, service: str, operation: str, params: dict[str, Any]) -> Any:
        if operation == "update_endpoint":
            return {"EndpointArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/x"}
        return real_call(self, service, operation, params)

    patch.setattr(Aws, "_call", call)


def test_redeploy_makes_a_new_config_and_asks_for_a_blue_green_update(
    capsys, role_arn, monkeypatch
):
    assert run(capsys, *deploy_args("clip-b", "--instance-count", "2"))[0] == 0
    first = current_config("clip-b")["EndpointConfigName"]

    code, out, _ = run(capsys, "--dry-run", *deploy_args("clip-b", "--canary-percent", "20"))
    assert code == 0
    calls = dict(plan(out))
    assert "sagemaker.create_endpoint" not in calls
    update = calls["sagemaker.update_endpoint"]
    assert update["EndpointName"] == "clip-b"
    assert (
        update["EndpointConfigName"]
        == calls["sagemaker.create_endpoint_config"]["EndpointConfigName"]
    )
    routing = update["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    assert routing["Type"] == "CANARY" and routing["CanarySize"]["Value"] == 20

    # moto 5.2.5 has no UpdateEndpoint: the script reports it as one line naming the call, and
    # deletes the model and config it made for the update.
    before = state()
    code, out, err = run(capsys, *deploy_args("clip-b", "--instance-type", "ml.c5.xlarge"))
    assert code == 1
    assert error_line(err).startswith("error: sagemaker UpdateEndpoint failed: 500"), err
    assert "Traceback" not in err
    assert current_config("clip-b")["EndpointConfigName"] == first and state() == before

    accept_updates(monkeypatch)
    assert run(capsys, *deploy_args("clip-b", "--instance-type", "ml.c5.xlarge"))[0] == 0
    configs = [c for c in state()["configs"] if owned_by("clip-b", c)]
    assert len(configs) == 2 and first in configs
    new = aws("sagemaker").describe_endpoint_config(EndpointConfigName=max(configs))
    assert new["ProductionVariants"][0]["InstanceType"] == "ml.c5.xlarge"
    assert new["ProductionVariants"][0]["VariantName"] == "AllTraffic"


def test_autoscaling_target_and_policy(capsys, role_arn):
    assert run(capsys, *deploy_args("clip-c"))[0] == 0
    code, _, err = run(
        capsys, "autoscale", "--endpoint", "clip-c", "--min", "2", "--max", "6", "--target", "250"
    )
    assert code == 0, err
    scaling = aws("application-autoscaling")
    rid = "endpoint/clip-c/variant/AllTraffic"
    (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])[
        "ScalableTargets"
    ]
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 6)
    (policy,) = scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid)[
        "ScalingPolicies"
    ]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 250.0
    assert (
        tracking["PredefinedMetricSpecification"]["PredefinedMetricType"]
        == "SageMakerVariantInvocationsPerInstance"
    )
    assert (tracking["ScaleInCooldown"], tracking["ScaleOutCooldown"]) == (300, 60)

    # SageMaker refuses to change the instance type of an autoscaled variant: say so up front.
    before = state()
    code, _, err = run(capsys, *deploy_args("clip-c", "--instance-type", "ml.c5.xlarge"))
    assert code == 2 and "autoscale --endpoint clip-c --disable" in err
    assert state() == before

    assert run(capsys, "autoscale", "--endpoint", "clip-c", "--disable")[0] == 0
    assert rid not in state()["targets"]
    assert not scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid)[
        "ScalingPolicies"
    ]


def test_autoscale_needs_an_endpoint(capsys):
    code, _, err = run(capsys, "autoscale", "--endpoint", "clip-missing")
    assert code == 2 and "endpoint clip-missing not found" in err


def test_delete_removes_endpoint_configs_models_and_scaling(capsys, role_arn):
    assert run(capsys, *deploy_args("clip-d"))[0] == 0
    assert run(capsys, *deploy_args("clip-d-staging"))[0] == 0
    made = state()
    # moto has no UpdateEndpoint: a failed update, which deletes the model and config it made
    assert run(capsys, *deploy_args("clip-d", "--instance-type", "ml.c5.xlarge"))[0] == 1
    assert state() == made
    # What an older run left (one interrupted, say): a model of the endpoint's no config uses.
    left = "clip-d-20260101-000000-000"
    aws("sagemaker").create_model(
        ModelName=left, PrimaryContainer={"Image": IMAGE_URI}, ExecutionRoleArn=role_arn
    )
    assert run(capsys, "autoscale", "--endpoint", "clip-d")[0] == 0
    ours = state()
    assert len([m for m in ours["models"] if owned_by("clip-d", m)]) == 2

    code, _, err = run(capsys, "delete", "--endpoint", "clip-d")
    assert code == 0, err
    after = state()
    assert not [n for n in after["models"] + after["configs"] if owned_by("clip-d", n)]
    assert "clip-d" not in [name for name, _ in after["endpoints"]]
    assert "endpoint/clip-d/variant/AllTraffic" not in after["targets"]
    assert "clip-d-invocations-per-instance" not in after["policies"]
    # A neighbour whose name starts the same is untouched.
    assert ("clip-d-staging", "InService") in after["endpoints"]
    assert [m for m in after["models"] if owned_by("clip-d-staging", m)]

    code, out, _ = run(capsys, "delete", "--endpoint", "clip-d")
    assert code == 0 and "nothing to delete" in out


def test_dry_run_prints_the_plan_and_changes_nothing(capsys, role_arn, tmp_path):
    assert run(capsys, *deploy_args("clip-e"))[0] == 0
    assert run(capsys, "autoscale", "--endpoint", "clip-e")[0] == 0
    before = state()

    code, out, _ = run(capsys, "--dry-run", *deploy_args("clip-new", "--instance-count", "3"))
    assert code == 0
    calls = plan(out)
    assert [c for c, _ in calls] == [
        "sagemaker.create_model",
        "sagemaker.create_endpoint_config",
        "sagemaker.create_endpoint",
    ]
    params = dict(calls)
    assert params["sagemaker.create_model"]["ExecutionRoleArn"] == role_arn
    variant = params["sagemaker.create_endpoint_config"]["ProductionVariants"][0]
    assert variant["InitialInstanceCount"] == 3 and variant["InstanceType"] == "ml.m5.xlarge"

    code, out, _ = run(capsys, "delete", "--dry-run", "--endpoint", "clip-e")
    assert code == 0
    deleted = [c for c, _ in plan(out)]
    assert deleted[:3] == [
        "application-autoscaling.delete_scaling_policy",
        "application-autoscaling.deregister_scalable_target",
        "sagemaker.delete_endpoint",
    ]
    assert {"sagemaker.delete_endpoint_config", "sagemaker.delete_model"} <= set(deleted)

    code, out, _ = run(capsys, "autoscale", "--dry-run", "--endpoint", "clip-e", "--max", "9")
    assert code == 0
    assert dict(plan(out))["application-autoscaling.register_scalable_target"]["MaxCapacity"] == 9

    code, out, _ = run(capsys, "push", "--dry-run", "--image", "clip-bentoml:t1")
    assert code == 0
    assert "ecr.create_repository" in dict(plan(out))
    uri = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/clip-bentoml:t1"
    assert f"[dry-run] docker push {uri}" in out

    image = tmp_path / "cat.png"
    image.write_bytes(encode(photo_like(64, 48, seed=1)))
    invoked = moto_invocations()
    code, out, _ = run(capsys, "invoke", "--dry-run", "--endpoint", "clip-e", "--image", str(image))
    assert code == 0 and "sagemaker-runtime.invoke_endpoint" in dict(plan(out))
    assert moto_invocations() == invoked

    assert state() == before


def test_missing_role_and_bad_instance_type_fail_clearly(capsys, role_arn):
    before = state()
    code, _, err = run(capsys, *deploy_args("clip-f")[:-2], "--role", "no-such-role")
    assert code == 2
    assert "IAM role 'no-such-role' not found" in err and "AmazonSageMakerFullAccess" in err
    code, _, err = run(capsys, *deploy_args("clip-f", "--instance-type", "m5.xlarge"))
    assert code == 2 and "ml.<family>.<size>" in err and "ml.g4dn.xlarge" in err
    code, _, err = run(capsys, *deploy_args("clip-f", "--instance-count", "0"))
    assert code == 2 and "--instance-count" in err
    code, _, err = run(capsys, *deploy_args("clip-f", "--image-uri", "clip-bentoml:v1"))
    assert code == 2 and "--image-uri 'clip-bentoml:v1'" in err
    assert state() == before

    # Well-formed but unknown to SageMaker (here: to moto's list): AWS's message, one line.
    code, _, err = run(capsys, *deploy_args("clip-f", "--instance-type", "ml.zz9.xlarge"))
    assert code == 1
    line = error_line(err)
    assert line.startswith("error: sagemaker CreateEndpointConfig failed: ValidationException:")
    assert "Value 'ml.zz9.xlarge' at 'instanceType' failed" in line
    assert state() == before  # the model it had made is deleted (it had been left, unnamed)


def test_a_failed_deploy_that_cannot_delete_what_it_made_names_it(capsys, role_arn, monkeypatch):
    quota_then_denied(monkeypatch, "create_endpoint", "delete_endpoint_config")
    code, _, err = run(capsys, *deploy_args("clip-q"))
    line = error_line(err)
    assert code == 1 and "CreateEndpoint failed: ResourceLimitExceeded" in line
    assert "made for this deploy, was not deleted" in line
    assert "aws sagemaker delete-endpoint-config --endpoint-config-name clip-q-" in line
    after = state()
    assert not [m for m in after["models"] if owned_by("clip-q", m)]  # that one was deleted
    (config,) = [c for c in after["configs"] if owned_by("clip-q", c)]
    aws("sagemaker").delete_endpoint_config(EndpointConfigName=config)


def test_a_role_of_another_account_is_refused_not_swapped_for_ours(capsys, role_arn):
    """Only the name was looked up: a role ARN of account 999999999999 became this account's
    role of the same name, and the deploy went on with it."""
    before = state()
    other = role_arn.replace(ACCOUNT, "999999999999")
    code, _, err = run(capsys, *deploy_args("clip-r")[:-2], "--role", other)
    assert code == 2 and f"--role {other} is not a role of the account you deploy into" in err
    assert role_arn in err and state() == before
    assert run(capsys, "--dry-run", *deploy_args("clip-r")[:-2], "--role", role_arn)[0] == 0
    # Of this account, written another way (its path left out): IAM's own ARN is used, as
    # before.
    aws("iam").create_role(
        RoleName="clip-pathed", Path="/service-role/", AssumeRolePolicyDocument="{}"
    )
    unpathed = f"arn:aws:iam::{ACCOUNT}:role/clip-pathed"
    code, out, err = run(capsys, "--dry-run", *deploy_args("clip-r")[:-2], "--role", unpathed)
    assert code == 0, err
    model = dict(plan(out))["sagemaker.create_model"]
    assert model["ExecutionRoleArn"] == f"arn:aws:iam::{ACCOUNT}:role/service-role/clip-pathed"


@pytest.mark.parametrize(
    ("instance_type", "says"),
    [
        ("ml.c7g.xlarge", "is an Arm instance"),
        ("ml.m6gd.large", "is an Arm instance"),
        ("ml.p6e-gb200.36xlarge", "is an Arm instance"),
        ("ml.inf2.xlarge", "Inferentia or Trainium chips are not used"),
        ("ml.trn1.2xlarge", "Inferentia or Trainium chips are not used"),
        ("ml.g5.xlarge", None),
        ("ml.g4dn.xlarge", None),
        ("ml.c5.xlarge", None),
    ],
)
def test_instances_this_image_cannot_use_are_warned_of(capsys, role_arn, instance_type, says):
    code, _, err = run(
        capsys, "--dry-run", *deploy_args("clip-arch", "--instance-type", instance_type)
    )
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert says in err if says else not warnings, err


def test_an_image_of_another_region_is_refused_before_anything_is_made(capsys, role_arn):
    before = state()
    other = IMAGE_URI.replace(f".{REGION}.", ".eu-west-1.")
    code, _, err = run(capsys, *deploy_args("clip-reg", "--image-uri", other))
    assert code == 2 and "--image-uri is in ECR's eu-west-1, the endpoint would be in" in err
    assert state() == before


def test_an_empty_aws_region_does_not_hide_aws_default_region(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert Aws(None, None, True).session.region_name == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert Aws(None, None, True).session.region_name == "us-west-2"  # as the AWS CLI
    assert Aws("ap-south-1", None, True).session.region_name == "ap-south-1"


def test_an_interrupted_deploy_says_what_it_leaves_without_a_traceback(capsys, monkeypatch):
    def interrupted(aws: Any, args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(deploy.COMMANDS, "deploy", interrupted)
    code, _, err = run(capsys, *deploy_args("clip-int"))
    assert code == 130 and "Traceback" not in err
    assert err.startswith("interrupted: what this run had made stays")
    assert "deploy_sagemaker.py delete --endpoint clip-int" in err


def test_delete_finishes_when_the_endpoints_config_was_deleted_by_hand(capsys, role_arn):
    assert run(capsys, *deploy_args("clip-gone"))[0] == 0
    config = current_config("clip-gone")["EndpointConfigName"]
    aws("sagemaker").delete_endpoint_config(EndpointConfigName=config)
    code, _, err = run(capsys, "delete", "--endpoint", "clip-gone")
    assert code == 0, err
    after = state()
    assert not [n for n in after["models"] + after["configs"] if owned_by("clip-gone", n)]


def test_cli_in_a_subprocess(role_arn, aws_env):
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "scripts/deploy_sagemaker.py", *args],
            cwd=REPO_ROOT,
            env={**os.environ},  # AWS_ENDPOINT_URL and fake credentials from aws_env
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = cli(*deploy_args("clip-g", "--instance-type", "ml.c5.2xlarge"))
    assert result.returncode == 0, result.stderr
    assert current_config("clip-g")["ProductionVariants"][0]["InstanceType"] == "ml.c5.2xlarge"
    result = cli(*deploy_args("clip-g2", "--role", "arn:aws:iam::123456789012:role/nope"))
    assert result.returncode == 2
    assert "IAM role 'arn:aws:iam::123456789012:role/nope' not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_push_creates_the_repository_and_logs_in_with_stdin(capsys, tmp_path, monkeypatch):
    log = tmp_path / "docker.log"
    docker = tmp_path / "docker"
    docker.write_text(
        "#!/bin/sh\n"
        f'echo "ARGS $*" >> {log}\n'
        f'if [ "$1" = login ]; then echo "STDIN $(cat)" >> {log}; fi\n'
        'if [ "$1" = push ] && [ -n "$FAIL_PUSH" ]; then exit 1; fi\n'
    )
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)

    push = [
        "push",
        "--image",
        "clip-bentoml:abc",
        "--repository",
        "clip-push",
        "--docker",
        str(docker),
    ]
    code, out, err = run(capsys, *push)
    assert code == 0, err
    (repo,) = aws("ecr").describe_repositories(repositoryNames=["clip-push"])["repositories"]
    assert repo["imageScanningConfiguration"]["scanOnPush"] is True
    registry = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
    remote = f"{repo['repositoryUri']}:abc"
    assert remote == f"{registry}/clip-push:abc" and f"pushed {remote}" in out
    assert log.read_text().splitlines() == [
        f"ARGS login --username AWS --password-stdin {registry}",
        f"STDIN {ACCOUNT}-auth-token",  # moto's ECR password, on stdin, never in argv
        f"ARGS tag clip-bentoml:abc {remote}",
        f"ARGS push {remote}",
    ]

    # The repository exists now: reused, not created again; a failing push is one clear line.
    monkeypatch.setenv("FAIL_PUSH", "1")
    code, out, err = run(capsys, *push)
    assert code == 2 and "`docker push` failed" in err
    assert "ecr.create_repository" not in out and "created by this run" not in err
    # Exit 2 otherwise means nothing was changed: a repository made before docker failed is said.
    push[4] = "clip-push-2"  # the --repository value
    code, _, err = run(capsys, *push)
    assert code == 2 and "clip-push-2" in state()["repositories"]
    line = error_line(err)
    assert "`docker push` failed" in line
    assert "ECR repository clip-push-2, created by this run, is kept" in line


def moto_invocations() -> list[dict[str, Any]]:
    """Every InvokeEndpoint request moto's (in-process) backend has received, oldest first.

    moto keys them by a base64 JSON of the request's Accept, X-Amzn-SageMaker-* headers and
    body; in server mode 5.2.5 files them all under endpoint name None (it does not read the
    name from the URL path), so they are collected across names.
    """
    from moto.sagemakerruntime.models import sagemakerruntime_backends

    results = sagemakerruntime_backends[ACCOUNT][REGION].results
    return [json.loads(base64.b64decode(key)) for by_key in results.values() for key in by_key]


def queue_moto_result(moto_url: str, body: str) -> None:
    """moto's documented API for what its InvokeEndpoint answers next (on 127.0.0.1)."""
    request = urllib.request.Request(
        f"{moto_url}/moto-api/static/sagemaker/endpoint-results",
        data=json.dumps(
            {"results": [{"Body": body, "ContentType": "application/json"}], "region": REGION}
        ).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status in (200, 201)


def test_invoke_sends_the_seed_request_and_prints_the_answer(capsys, tmp_path, moto_url):
    answer = [{"classification": 1, "confidence": 0.84, "prompts": [[5], ["woman"], [0.84]]}]
    queue_moto_result(moto_url, json.dumps(answer))
    image = tmp_path / "photo.png"
    image.write_bytes(encode(photo_like(80, 60, seed=2)))
    url = "https://images.example/cat.jpg"  # passed through, never fetched here
    before = moto_invocations()

    code, out, err = run(
        capsys, "invoke", "--endpoint", "clip-h", "--image", str(image), "--image", url
    )
    assert code == 0, err
    assert json.loads(out) == answer

    # What reached moto: the seed's request shape, the file as base64, the URL as is.
    (received,) = [r for r in moto_invocations() if r not in before]
    request = json.loads(received["Body"])
    assert request == {
        "images": [base64.b64encode(image.read_bytes()).decode(), url],
        "classes": SEED_CLASSES,
    }
    assert received["Accept"] == "application/json"


def test_invoke_refuses_bodies_over_the_payload_limit(capsys, tmp_path):
    before = moto_invocations()
    big = tmp_path / "big.jpg"
    big.write_bytes(os.urandom(5 * 1024 * 1024))  # 6.7 MiB once base64-encoded
    code, _, err = run(capsys, "invoke", "--endpoint", "clip-i", "--image", str(big))
    assert code == 2 and "6 MB" in err and "URLs" in err
    assert moto_invocations() == before


# ---- Batch Transform and asynchronous inference ----

BUCKET = "clip-batch"


def check_api(service: str, operation: str, params: dict[str, Any]) -> None:
    client = boto3.session.Session().client(service, region_name=REGION)
    validate_parameters(params, client.meta.service_model.operation_model(operation).input_shape)


def test_transform_and_async_requests_match_the_aws_api_model():
    job = transform_job_request(
        "j", "m", "s3://b/in/", "s3://b/out/", "ml.g5.xlarge", 2, 600, 1, None, 20
    )
    check_api("sagemaker", "CreateTransformJob", job)
    assert job["Environment"] == {
        "CLIP_ENDPOINT_KIND": "batch",
        "CLIP_REQUEST_TIMEOUT_S": "595",  # inside the job's 600 s per mini-batch
        "CLIP_MAX_BODY_BYTES": str(20 * 1024 * 1024),  # a 20 MB mini-batch fits
    }
    assert job["MaxPayloadInMB"] == 20 and "MaxConcurrentTransforms" not in job
    config = endpoint_config_request("c", "m", "ml.m5.xlarge", 1, 600)
    config["AsyncInferenceConfig"] = async_inference_config("s3://b/out/", "s3://b/f/", 4)
    check_api("sagemaker", "CreateEndpointConfig", config)
    rid = scaling_resource_id("e", "AllTraffic")
    check_api("application-autoscaling", "PutScalingPolicy", wake_policy_request(rid, "e"))
    backlog = backlog_policy_request(rid, "e", 5.0, 300, 60)
    check_api("application-autoscaling", "PutScalingPolicy", backlog)
    check_api("cloudwatch", "PutMetricAlarm", wake_alarm_request("e", "arn:aws:x"))
    assert image_source("s3://clip-images/a.jpg") == "s3://clip-images/a.jpg"  # as is


def upload_requests(key: str, lines: list[dict[str, Any]]) -> None:
    s3 = aws("s3")
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    body = "\n".join(json.dumps(line) for line in lines).encode()
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)


def batch_args(job: str, *extra: str) -> list[str]:
    return [
        "batch-transform",
        "--job",
        job,
        "--input",
        f"s3://{BUCKET}/requests/",
        "--output",
        f"s3://{BUCKET}/answers/",
        *extra,
    ]


def test_batch_transform_creates_the_model_and_a_line_by_line_job(capsys, role_arn):
    upload_requests("requests/part-0.jsonl", [{"images": ["s3://x/y.jpg"], "classes": [["a", 1]]}])
    code, out, err = run(
        capsys,
        *batch_args("clip-batch-1", "--image-uri", IMAGE_URI, "--role", ROLE),
        "--instance-type",
        "ml.c5.2xlarge",
        "--instance-count",
        "2",
        "--wait",
    )
    assert code == 0, err
    assert "transform job clip-batch-1 completed" in out  # moto completes jobs at once
    assert "warning" not in err  # a CPU instance type
    sagemaker = aws("sagemaker")
    model = sagemaker.describe_model(ModelName="clip-batch-1")
    assert model["PrimaryContainer"]["Image"] == IMAGE_URI and model["ExecutionRoleArn"] == role_arn
    job = sagemaker.describe_transform_job(TransformJobName="clip-batch-1")
    assert job["ModelName"] == "clip-batch-1" and job["BatchStrategy"] == "MultiRecord"
    assert job["TransformInput"]["ContentType"] == "application/jsonlines"
    assert job["TransformInput"]["SplitType"] == "Line"
    assert job["TransformInput"]["DataSource"]["S3DataSource"] == {
        "S3DataType": "S3Prefix",
        "S3Uri": f"s3://{BUCKET}/requests/",
    }
    assert job["TransformOutput"] == {
        "S3OutputPath": f"s3://{BUCKET}/answers/",
        "Accept": "application/jsonlines",
        "AssembleWith": "Line",
    }
    assert job["TransformResources"] == {"InstanceType": "ml.c5.2xlarge", "InstanceCount": 2}
    assert job["ModelClientConfig"] == {
        "InvocationsTimeoutInSeconds": 3600,
        "InvocationsMaxRetries": 1,
    }
    assert job["Environment"]["CLIP_ENDPOINT_KIND"] == "batch"
    # Unset, so SageMaker asks the container's GET /execution-parameters.
    assert "MaxPayloadInMB" not in job and "MaxConcurrentTransforms" not in job


def test_batch_transform_on_an_existing_model_and_its_checks(capsys, role_arn):
    upload_requests("requests/part-1.jsonl", [{"inputs": "s3://x/y.jpg"}])
    code, out, err = run(
        capsys, "--dry-run", *batch_args("clip-batch-2", "--model", "clip-20260101-000000-000")
    )
    assert code == 0, err
    ((call, params),) = plan(out)  # no new model: only the job
    assert call == "sagemaker.create_transform_job"
    assert params["ModelName"] == "clip-20260101-000000-000"
    jobs = aws("sagemaker").list_transform_jobs()["TransformJobSummaries"]
    assert "clip-batch-2" not in [j["TransformJobName"] for j in jobs]
    gpu = batch_args("clip-batch-2", "--model", "m", "--instance-type", "ml.g5.xlarge")
    code, _, err = run(capsys, "--dry-run", *gpu)
    assert code == 0 and "ml.g5.xlarge is a GPU instance" in err, err
    assert "NVIDIA drivers up to 535" in err and "CUDA 13.0" in err

    for extra, words in [
        (("--model", "m", "--image-uri", IMAGE_URI), "either --model"),
        (("--image-uri", IMAGE_URI), "needs --role"),
        (("--model", "m", "--max-payload-mb", "101"), "1..100"),
        (("--model", "m", "--invocation-timeout", "7200"), "60..3600"),
        (("--model", "m", "--instance-type", "c5.xlarge"), "ml.<family>.<size>"),
    ]:
        code, _, err = run(capsys, *batch_args("clip-batch-3", *extra))
        assert code == 2 and words in err, err
    empty = batch_args("clip-batch-3", "--model", "m")
    empty[4] = f"s3://{BUCKET}/nothing-here/"  # the --input value
    code, _, err = run(capsys, *empty)
    assert code == 2 and f"no objects under s3://{BUCKET}/nothing-here/" in err


def test_async_deploy_writes_to_s3_and_scales_to_zero(capsys, role_arn):
    output = f"s3://{BUCKET}/async-answers/"
    code, _, err = run(
        capsys,
        *deploy_args("clip-async", "--async", "--output", output, "--max-instances", "3"),
        "--max-concurrent-invocations",
        "4",
        "--wait",
    )
    assert code == 0, err
    config = current_config("clip-async")
    assert config["AsyncInferenceConfig"] == {
        "OutputConfig": {"S3OutputPath": output},
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 4},
    }
    model = aws("sagemaker").describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    # The container's deadline and body limit follow the endpoint kind (config.py).
    assert model["PrimaryContainer"]["Environment"] == {"CLIP_ENDPOINT_KIND": "async"}
    scaling, rid = aws("application-autoscaling"), "endpoint/clip-async/variant/AllTraffic"
    (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])[
        "ScalableTargets"
    ]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 3)
    policies = {
        p["PolicyName"]: p
        for p in scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid)[
            "ScalingPolicies"
        ]
    }
    backlog = policies["clip-async-backlog-per-instance"][
        "TargetTrackingScalingPolicyConfiguration"
    ]
    assert (
        backlog["CustomizedMetricSpecification"]["MetricName"]
        == "ApproximateBacklogSizePerInstance"
    )
    assert backlog["TargetValue"] == 5.0
    wake = policies["clip-async-wake-from-zero"]
    (alarm,) = aws("cloudwatch").describe_alarms(
        AlarmNames=["clip-async-has-backlog-without-capacity"]
    )["MetricAlarms"]
    assert alarm["MetricName"] == "HasBacklogWithoutCapacity"
    assert alarm["AlarmActions"] == [wake["PolicyARN"]]

    # A real-time endpoint cannot go to zero; an async one can be re-scaled with --min 0.
    assert run(capsys, "autoscale", "--endpoint", "clip-async", "--min", "0", "--max", "5")[0] == 0
    (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])[
        "ScalableTargets"
    ]
    assert target["MaxCapacity"] == 5

    assert run(capsys, "delete", "--endpoint", "clip-async")[0] == 0
    assert rid not in state()["targets"]
    assert not aws("cloudwatch").describe_alarms(
        AlarmNames=["clip-async-has-backlog-without-capacity"]
    )["MetricAlarms"]


def test_async_deploy_needs_an_s3_output_and_realtime_keeps_min_one(capsys, role_arn):
    before = state()
    code, _, err = run(capsys, *deploy_args("clip-async2", "--async"))
    assert code == 2 and "--output '' is not an s3://bucket/prefix URI" in err
    code, _, err = run(capsys, *deploy_args("clip-async2", "--async", "--output", "/tmp/x"))
    assert code == 2 and "--output '/tmp/x'" in err
    assert state() == before
    code, out, _ = run(
        capsys, *deploy_args("clip-async2", "--async", "--output", f"s3://{BUCKET}/o/")
    )
    assert code == 0 and "autoscale --endpoint clip-async2 --min 0" in out  # not InService yet
    assert run(capsys, *deploy_args("clip-rt"))[0] == 0
    code, _, err = run(capsys, "autoscale", "--endpoint", "clip-rt", "--min", "0")
    assert code == 2 and "need 1 <= --min <= --max" in err
    for endpoint in ("clip-async2", "clip-rt"):
        assert run(capsys, "delete", "--endpoint", endpoint)[0] == 0


# ---- updates keep what is not given; waiting, roll-backs, secrets, refusals ----


def newest(endpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The newest endpoint config `deploy` made for `endpoint`, and its model, as moto has them."""
    sagemaker = aws("sagemaker")
    name = max(c for c in state()["configs"] if owned_by(endpoint, c))
    config = sagemaker.describe_endpoint_config(EndpointConfigName=name)
    return config, sagemaker.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])


def test_an_update_keeps_every_setting_it_is_not_given(capsys, role_arn, monkeypatch):
    """The README's update command (a new --image-uri only) on a GPU endpoint with an
    environment and model data must not turn it into one CPU instance with neither."""
    url = "s3://clip-models/tuned/model.tar.gz"
    created = deploy_args("clip-u", "--instance-type", "ml.g4dn.xlarge", "--instance-count", "3")
    created += ["--startup-timeout", "1200", "--model-data", url]
    created += ["--env", "CLIP_API_WORKERS=4", "--env", "CLIP_TOP_K=3"]
    assert run(capsys, *created)[0] == 0
    v2 = IMAGE_URI.replace(":v1", ":v2")

    code, out, err = run(capsys, "--dry-run", *deploy_args("clip-u", "--image-uri", v2, "--wait"))
    assert code == 0, err
    calls = dict(plan(out))
    container = calls["sagemaker.create_model"]["PrimaryContainer"]
    assert container["Image"] == v2 and container["ModelDataUrl"] == url
    assert container["Environment"] == {"CLIP_API_WORKERS": "***", "CLIP_TOP_K": "***"}
    (variant,) = calls["sagemaker.create_endpoint_config"]["ProductionVariants"]
    assert variant["InstanceType"] == "ml.g4dn.xlarge" and variant["InitialInstanceCount"] == 3
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 1200
    assert variant["InferenceAmiVersion"] == GPU_AMI_VERSION
    # The plan says what is carried over and what changes.
    assert "  instance type: ml.g4dn.xlarge (kept)" in err.splitlines()
    assert f"  image: {IMAGE_URI} -> {v2}" in err.splitlines()
    assert "  env CLIP_TOP_K=*** (kept)" in err.splitlines()

    # A real run (moto makes model and config; the update accepted): given options change,
    # --env merges (KEY= removes KEY), a new CPU instance type takes no GPU AMI.
    changed = deploy_args("clip-u", "--image-uri", v2, "--instance-type", "ml.c5.2xlarge")
    changed += ["--env", "CLIP_API_WORKERS=2", "--env", "CLIP_TOP_K=", "--env", "CLIP_X=1"]
    with monkeypatch.context() as patch:
        accept_updates(patch)
        code, _, err = run(capsys, *changed)
    assert code == 0, err
    config, model = newest("clip-u")
    (variant,) = config["ProductionVariants"]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.c5.2xlarge", 3)
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 1200
    assert "InferenceAmiVersion" not in variant
    assert model["PrimaryContainer"]["Environment"] == {"CLIP_API_WORKERS": "2", "CLIP_X": "1"}
    assert model["PrimaryContainer"]["ModelDataUrl"] == url
    assert "  env CLIP_TOP_K=*** (removed)" in err.splitlines()
    assert "  instance type: ml.g4dn.xlarge -> ml.c5.2xlarge" in err.splitlines()

    # --model-data '' goes back to the image's own model.
    code, out, _ = run(capsys, "--dry-run", *deploy_args("clip-u", "--model-data", ""))
    assert code == 0
    assert "ModelDataUrl" not in dict(plan(out))["sagemaker.create_model"]["PrimaryContainer"]
    assert run(capsys, "delete", "--endpoint", "clip-u")[0] == 0


def test_resolve_settings_given_else_current_else_default():
    """What moto cannot store (EnableNetworkIsolation) or has no other way to reach: the rule."""
    known = Aws(REGION, None, True).enum("sagemaker", "ProductionVariantInferenceAmiVersion")
    parser = deploy.build_parser()
    current = EndpointSettings(
        image_uri=IMAGE_URI,
        role_arn="arn:aws:iam::1:role/r",
        instance_type="ml.g5.xlarge",
        instance_count=4,
        startup_timeout=900,
        ami_version=GPU_AMI_VERSION,
        env={"CLIP_ENDPOINT_KIND": "async"},
        model_data=None,
        model_data_source=None,
        network_isolation=True,
        async_config={"OutputConfig": {"S3OutputPath": "s3://b/old/"}},
        carried=no_carried(),
    )

    def resolve(*extra: str, now: Any = current) -> Any:
        args = parser.parse_args(deploy_args("e", *extra))
        return resolve_settings(args, now, "arn:aws:iam::1:role/r", known)

    kept = resolve()
    assert kept._replace(image_uri=IMAGE_URI) == current
    assert resolve("--no-network-isolation").network_isolation is False
    assert resolve("--output", "s3://b/new/").async_config == {
        "OutputConfig": {"S3OutputPath": "s3://b/new/"}
    }
    assert current.async_config == {"OutputConfig": {"S3OutputPath": "s3://b/old/"}}  # a copy
    fresh = resolve(now=None)
    assert (fresh.instance_type, fresh.instance_count) == (DEFAULT_INSTANCE_TYPE, 1)
    assert (fresh.network_isolation, fresh.async_config, fresh.env) == (False, None, {})
    assert fresh.startup_timeout == DEFAULT_STARTUP_TIMEOUT


def test_an_update_cannot_switch_between_real_time_and_async(capsys, role_arn):
    output = f"s3://{BUCKET}/switch/"
    assert run(capsys, *deploy_args("clip-rt2"))[0] == 0
    assert run(capsys, *deploy_args("clip-as2", "--async", "--output", output))[0] == 0
    before = state()
    code, _, err = run(capsys, *deploy_args("clip-rt2", "--async", "--output", output))
    assert code == 2 and "clip-rt2 is real-time; an update cannot make it asynchronous" in err
    code, _, err = run(capsys, *deploy_args("clip-as2", "--no-async"))
    assert code == 2 and "clip-as2 is asynchronous; an update cannot make it real-time" in err
    code, _, err = run(capsys, *deploy_args("clip-rt2", "--output", output))
    assert code == 2 and "--output: only for asynchronous endpoints" in err
    assert state() == before
    # Not named: the endpoint stays async, with its output (and its container's kind).
    code, out, _ = run(capsys, "--dry-run", *deploy_args("clip-as2"))
    assert code == 0
    calls = dict(plan(out))
    assert calls["sagemaker.create_endpoint_config"]["AsyncInferenceConfig"] == {
        "OutputConfig": {"S3OutputPath": output}
    }
    assert calls["sagemaker.create_model"]["PrimaryContainer"]["Environment"] == {
        "CLIP_ENDPOINT_KIND": "***"
    }
    for endpoint in ("clip-rt2", "clip-as2"):
        assert run(capsys, "delete", "--endpoint", endpoint)[0] == 0


def test_a_canary_needs_two_instances(capsys, role_arn):
    """CanarySize must be at most 50% of the variant's instances (botocore's API docs)."""
    assert run(capsys, *deploy_args("clip-can"))[0] == 0
    before = state()
    code, _, err = run(capsys, *deploy_args("clip-can", "--canary-percent", "10"))
    assert code == 2 and "needs 2 or more" in error_line(err)
    assert state() == before
    code, out, _ = run(
        capsys,
        "--dry-run",
        *deploy_args("clip-can", "--canary-percent", "10", "--instance-count", "2"),
    )
    assert code == 0 and "sagemaker.update_endpoint" in dict(plan(out))
    assert run(capsys, "delete", "--endpoint", "clip-can")[0] == 0


def test_wait_on_an_update_lasts_as_long_as_sagemakers_own_limit(capsys, role_arn, monkeypatch):
    """A canary with an hour's bake is within SageMaker's MaximumExecutionTimeoutInSeconds for
    hours: --wait must not give up after start-up + 30 min, and running out of time while the
    endpoint is still Updating is not a failure (exit 3, a line saying how to check again)."""
    assert run(capsys, *deploy_args("clip-w", "--instance-count", "2"))[0] == 0
    sent: dict[str, Any] = {}
    waited: list[int] = []
    real_call = Aws._call

    def call(self: Any, service: str, operation: str, params: dict[str, Any]) -> Any:
        if operation == "update_endpoint":  # moto 5.2.5 has none: accept it, keep what was sent
            sent.update(params)
            return {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/clip-w"}
        return real_call(self, service, operation, params)

    def wait(aws: Any, endpoint: str, config: str, timeout_s: int) -> None:
        waited.append(timeout_s)
        raise StillChangingError(f"endpoint {endpoint} is still Updating (stand-in)")

    with monkeypatch.context() as patch:
        patch.setattr(Aws, "_call", call)
        patch.setattr(commands, "wait_in_service", wait)
        update = deploy_args("clip-w", "--canary-percent", "10", "--bake-seconds", "3600")
        code, _, err = run(capsys, *update, "--wait")
    assert code == 3 and "warning: endpoint clip-w is still Updating" in err
    limit = sent["DeploymentConfig"]["BlueGreenUpdatePolicy"]["MaximumExecutionTimeoutInSeconds"]
    assert limit >= 600 + 2 * 3600  # start-up, canary wait, bake
    assert waited == [limit + PROVISIONING_MARGIN_S]
    assert run(capsys, "delete", "--endpoint", "clip-w")[0] == 0


def endpoint_description(status: str, config: str, reason: str | None = None) -> dict[str, Any]:
    from datetime import datetime

    now = datetime.now()
    found = {
        "EndpointName": "clip",
        "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/clip",
        "EndpointConfigName": config,
        "EndpointStatus": status,
        "CreationTime": now,
        "LastModifiedTime": now,
    }
    if reason:
        found["FailureReason"] = reason
    return found


def test_wait_running_out_of_time_while_updating_is_not_a_failure():
    """botocore's Stubber: moto's endpoints are InService at once."""
    from botocore.stub import Stubber

    client = Aws(REGION, None, False)
    with Stubber(client.client("sagemaker")) as stub:
        stub.add_response("describe_endpoint", endpoint_description("Updating", "clip-old"))
        stub.add_response("describe_endpoint", endpoint_description("Updating", "clip-old"))
        with pytest.raises(StillChangingError) as caught:
            wait_in_service(client, "clip", "clip-new", 15)  # one look, no sleep
    message = str(caught.value)
    assert "clip is still Updating after 15 s (not failed)" in message
    assert "aws sagemaker describe-endpoint --endpoint-name clip" in message


def test_a_rolled_back_update_says_why():
    from botocore.stub import Stubber

    reason = "The primary container for production variant AllTraffic did not pass the ping check."
    client = Aws(REGION, None, False)
    rolled_back = endpoint_description("InService", "clip-old", reason)
    with Stubber(client.client("sagemaker")) as stub:
        stub.add_response("describe_endpoint", rolled_back)  # the waiter: InService
        stub.add_response("describe_endpoint", rolled_back)
        with pytest.raises(AwsCallError) as caught:
            wait_in_service(client, "clip", "clip-new", 600)
    message = str(caught.value)
    assert "InService on clip-old, not clip-new: the update was rolled back" in message
    assert reason.rstrip(".") in message


def waits_with(monkeypatch: pytest.MonkeyPatch, sleep: Any) -> None:
    """The deploy code's waits made by `sleep`: in its own module only, since `time.sleep`
    patched for everyone failed (or set spinning) the threads of other tests' encoders."""
    monkeypatch.setattr(aws_module, "time", SimpleNamespace(monotonic=time.monotonic, sleep=sleep))


@pytest.mark.parametrize("status", ["UpdateRollbackFailed", "OutOfService", "Failed"])
def test_wait_stops_at_any_state_an_endpoint_does_not_leave_by_itself(status, monkeypatch):
    """botocore's waiter failed only on Failed: an UpdateRollbackFailed endpoint was polled for
    the whole timeout (an hour for an update) before the reason was said."""
    from botocore.stub import Stubber

    waits_with(monkeypatch, lambda _: pytest.fail("waited on a settled endpoint"))
    client = Aws(REGION, None, False)
    reason = "Rollback failed: the old fleet could not be restored."
    with Stubber(client.client("sagemaker")) as stub:
        stub.add_response("describe_endpoint", endpoint_description(status, "clip-new", reason))
        with pytest.raises(AwsCallError) as caught:
            wait_in_service(client, "clip", "clip-new", 3600)
    assert f"endpoint clip is {status}: {reason}" in str(caught.value)


def test_wait_goes_on_through_a_rollback_to_say_why_it_rolled_back(monkeypatch):
    """RollingBack ends by itself: the wait had stopped there, without the reason SageMaker gives
    once the old fleet is back."""
    from botocore.stub import Stubber

    waits_with(monkeypatch, lambda _: None)
    client = Aws(REGION, None, False)
    reason = "The primary container for production variant AllTraffic did not pass the ping check."
    with Stubber(client.client("sagemaker")) as stub:
        for status, config, why in [
            ("Updating", "clip-old", None),
            ("RollingBack", "clip-old", None),
            ("InService", "clip-old", reason),
        ]:
            stub.add_response("describe_endpoint", endpoint_description(status, config, why))
        with pytest.raises(AwsCallError) as caught:
            wait_in_service(client, "clip", "clip-new", 3600)
    assert "InService on clip-old, not clip-new: the update was rolled back" in str(caught.value)


def test_plans_mask_the_environment_and_the_api_key_is_refused(capsys, role_arn):
    code, out, err = run(
        capsys, "--dry-run", *deploy_args("clip-s", "--env", "HF_TOKEN=hf_s3cr3t_value")
    )
    assert code == 0, err
    assert "hf_s3cr3t_value" not in out + err
    environment = dict(plan(out))["sagemaker.create_model"]["PrimaryContainer"]["Environment"]
    assert environment == {"HF_TOKEN": MASK}

    before = state()
    code, _, err = run(capsys, *deploy_args("clip-s", "--env", "CLIP_API_KEY=k3y"))
    line = error_line(err)
    assert code == 2 and "CLIP_API_KEY cannot be used on SageMaker" in line
    assert "401 while /ping stays 200" in line and "Traceback" not in err
    assert state() == before

    # One made elsewhere with the key: an update refuses to carry it over; KEY= removes it.
    sagemaker = aws("sagemaker")
    sagemaker.create_model(
        ModelName="clip-k-20260101-000000-000",
        ExecutionRoleArn=role_arn,
        PrimaryContainer={"Image": IMAGE_URI, "Environment": {"CLIP_API_KEY": "k3y", "A": "1"}},
    )
    sagemaker.create_endpoint_config(
        EndpointConfigName="clip-k-20260101-000000-000",
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": "clip-k-20260101-000000-000",
                "InstanceType": "ml.m5.xlarge",
                "InitialInstanceCount": 1,
            }
        ],
    )
    sagemaker.create_endpoint(
        EndpointName="clip-k", EndpointConfigName="clip-k-20260101-000000-000"
    )
    code, _, err = run(capsys, "--dry-run", *deploy_args("clip-k"))
    assert code == 2 and "remove it with --env CLIP_API_KEY=" in error_line(err)
    code, out, _ = run(capsys, "--dry-run", *deploy_args("clip-k", "--env", "CLIP_API_KEY="))
    assert code == 0
    assert dict(plan(out))["sagemaker.create_model"]["PrimaryContainer"]["Environment"] == {
        "A": "***"
    }
    assert run(capsys, "delete", "--endpoint", "clip-k")[0] == 0


def test_bad_async_scaling_options_are_refused_before_anything_is_made(capsys, role_arn):
    before = state()
    output = f"s3://{BUCKET}/o/"
    for extra, words in [
        (("--max-instances", "0"), "--max >= 1"),
        (("--backlog-target", "0"), "--backlog-target"),
    ]:
        code, _, err = run(
            capsys, *deploy_args("clip-as3", "--async", "--output", output, *extra, "--wait")
        )
        assert code == 2 and words in error_line(err)
        assert "-> sagemaker." not in err  # no call with effects was made
    assert state() == before


def test_an_async_dry_run_plans_what_the_real_run_does(capsys, role_arn):
    """Without --wait the real run only prints the `autoscale --min 0` command; so does the plan."""
    output = f"s3://{BUCKET}/o/"
    code, out, _ = run(capsys, "--dry-run", *deploy_args("clip-as4", "--async", "--output", output))
    assert code == 0
    assert [c for c, _ in plan(out)] == [
        "sagemaker.create_model",
        "sagemaker.create_endpoint_config",
        "sagemaker.create_endpoint",
    ]
    assert "autoscale --endpoint clip-as4 --min 0 --max 2" in out
    code, out, _ = run(
        capsys, "--dry-run", *deploy_args("clip-as4", "--async", "--output", output, "--wait")
    )
    assert code == 0
    assert [c for c, _ in plan(out)][3:] == [
        "application-autoscaling.register_scalable_target",
        "application-autoscaling.put_scaling_policy",
        "application-autoscaling.put_scaling_policy",
        "cloudwatch.put_metric_alarm",
    ]


def test_a_role_name_without_iam_get_role_asks_for_the_arn():
    from botocore.stub import Stubber

    client = Aws(REGION, None, False)
    with Stubber(client.client("iam")) as stub:
        stub.add_client_error(
            "get_role",
            service_error_code="AccessDenied",
            service_message="not authorized to perform: iam:GetRole",
            http_status_code=403,
        )
        with pytest.raises(DeployError) as caught:
            resolve_role(client, "SageMakerClipRole")
    assert "pass the role's ARN instead" in str(caught.value)
    assert "arn:aws:iam::ACCOUNT_ID:role/SageMakerClipRole" in str(caught.value)


def failing_calls(patch: pytest.MonkeyPatch, failures: dict[str, Exception]) -> None:
    """The script's AWS calls raising `failures[operation]` for those operations (answers moto
    never gives: a quota, ResourceNotFound, a lost connection), the others sent to moto. The
    dict is read at each call, so a test may fill it as it goes."""
    real_call = Aws._call

    def call(self: Any, service: str, operation: str, params: dict[str, Any]) -> Any:
        if operation in failures:
            raise failures[operation]
        return real_call(self, service, operation, params)

    patch.setattr(Aws, "_call", call)


def quota_then_denied(patch: pytest.MonkeyPatch, create: str, delete: str) -> dict[str, Exception]:
    """`create` refused for a quota, then the clean-up's `delete` denied: the failures (more may
    be added)."""
    failures: dict[str, Exception] = {}
    failing_calls(patch, failures)
    for operation, code, why in [
        (create, "ResourceLimitExceeded", "over quota"),
        (delete, "AccessDeniedException", "no"),
    ]:
        name = "".join(word.title() for word in operation.split("_"))
        failures[operation] = AwsCallError(f"sagemaker {name} failed: {code}: {why}", code)
    return failures


def test_batch_transform_reruns_and_its_model(capsys, role_arn, monkeypatch):
    upload_requests("requests/part-2.jsonl", [{"images": ["s3://x/y.jpg"]}])
    sagemaker = aws("sagemaker")
    made = ["--image-uri", IMAGE_URI, "--role", ROLE]

    # CreateTransformJob fails (as AWS answers over quota; moto accepts every job, so the answer
    # is stood in for): the model made for the job is deleted again.
    over_quota = AwsCallError(
        "sagemaker CreateTransformJob failed: ResourceLimitExceeded: over quota",
        "ResourceLimitExceeded",
    )
    with monkeypatch.context() as patch:
        failing_calls(patch, {"create_transform_job": over_quota})
        code, _, err = run(capsys, *batch_args("clip-batch-f", *made))
    assert code == 1 and "CreateTransformJob failed" in error_line(err)
    assert "-> sagemaker.create_model" in err  # it was made, then deleted
    assert "clip-batch-f" not in state()["models"]
    # ... so the same --job runs once the mistake is fixed.
    code, _, err = run(capsys, *batch_args("clip-batch-f", *made))
    assert code == 0, err
    # A job name is taken for good (AWS refuses a second CreateTransformJob; moto would not).
    code, _, err = run(capsys, *batch_args("clip-batch-f", *made))
    assert code == 2 and "transform job clip-batch-f already exists" in error_line(err)

    # A model of the job's name that is someone else's is left alone (AWS refuses a second
    # CreateModel; moto would overwrite it).
    other = IMAGE_URI.replace(":v1", ":other")
    sagemaker.create_model(
        ModelName="clip-batch-o", ExecutionRoleArn=role_arn, PrimaryContainer={"Image": other}
    )
    code, _, err = run(capsys, *batch_args("clip-batch-o", *made))
    line = error_line(err)
    assert code == 2 and "a SageMaker model named clip-batch-o already exists" in line
    assert f"image {other!r}, not {IMAGE_URI!r}" in line and "--model clip-batch-o" in line
    assert sagemaker.describe_model(ModelName="clip-batch-o")["PrimaryContainer"]["Image"] == other
    # One this job would make (left by an older run) is used, not made again.
    sagemaker.create_model(
        ModelName="clip-batch-l", ExecutionRoleArn=role_arn, PrimaryContainer={"Image": IMAGE_URI}
    )
    code, out, _ = run(capsys, "--dry-run", *batch_args("clip-batch-l", *made))
    assert code == 0 and "using model clip-batch-l" in out
    assert [c for c, _ in plan(out)] == ["sagemaker.create_transform_job"]


def test_batch_transform_checks_concurrency_times_payload(capsys):
    """CreateTransformJob: MaxConcurrentTransforms x MaxPayloadInMB must not exceed 100 MB."""
    upload_requests("requests/part-3.jsonl", [{"images": ["s3://x/y.jpg"]}])
    model = ("--model", "clip-20260101-000000-000")
    code, _, err = run(
        capsys,
        *batch_args("clip-batch-p", *model, "--max-concurrent", "4", "--max-payload-mb", "30"),
    )
    assert code == 2 and "is 120 MB; SageMaker allows at most 100" in error_line(err)
    jobs = aws("sagemaker").list_transform_jobs()["TransformJobSummaries"]
    assert "clip-batch-p" not in [j["TransformJobName"] for j in jobs]
    code, out, _ = run(
        capsys,
        "--dry-run",
        *batch_args("clip-batch-p", *model, "--max-concurrent", "4", "--max-payload-mb", "25"),
    )
    assert code == 0
    ((_, job),) = plan(out)
    assert (job["MaxConcurrentTransforms"], job["MaxPayloadInMB"]) == (4, 25)


# ---- what an update carries over: fields it copies or refuses, the live fleet, the AMI ----


def make_endpoint(
    name: str,
    role_arn: str,
    container: dict[str, Any] | None = None,
    variants: list[dict[str, Any]] | None = None,
    **model_and_config: Any,
) -> None:
    """An endpoint made the way another tool (or the console) might, straight through moto:
    `model_and_config` fields go to CreateModel (VpcConfig, Containers) or CreateEndpointConfig
    (the rest)."""
    sagemaker = aws("sagemaker")
    model_fields = {k: v for k, v in model_and_config.items() if k in ("VpcConfig", "Containers")}
    config_fields = {k: v for k, v in model_and_config.items() if k not in model_fields}
    if "Containers" not in model_fields:
        model_fields["PrimaryContainer"] = {"Image": IMAGE_URI, **(container or {})}
    sagemaker.create_model(ModelName=f"{name}-m", ExecutionRoleArn=role_arn, **model_fields)
    variants = variants or [{"InstanceType": "ml.c5.xlarge", "InitialInstanceCount": 1}]
    sagemaker.create_endpoint_config(
        EndpointConfigName=f"{name}-c",
        ProductionVariants=[
            {"VariantName": f"V{i}", "ModelName": f"{name}-m", **variant}
            for i, variant in enumerate(variants)
        ],
        **config_fields,
    )
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-c")


def test_the_fields_an_update_sets_or_copies_are_the_aws_apis():
    """Each field an update copies is one CreateModel / CreateEndpointConfig accepts, and each
    field it knows is one DescribeModel / DescribeEndpointConfig answers (no typo hides one)."""
    model = boto3.session.Session().client("sagemaker", region_name=REGION).meta.service_model

    def members(shape: str) -> set[str]:
        return set(model.shape_for(shape).members)

    described = {
        "model": members("DescribeModelOutput") | {"ResponseMetadata"},
        "container": members("ContainerDefinition"),
        "config": members("DescribeEndpointConfigOutput") | {"ResponseMetadata"},
        "variant": members("ProductionVariant"),
    }
    accepted = {
        "model": members("CreateModelInput"),
        "container": members("ContainerDefinition"),
        "config": members("CreateEndpointConfigInput"),
        "variant": members("ProductionVariant"),
    }
    for part in PARTS:
        assert SET_FIELDS[part] <= described[part], part
        assert set(COPIED_FIELDS[part]) <= described[part] & accepted[part], part
    # What is neither set nor copied is refused: several/serverless variants, several containers.
    assert {"Containers", "InferenceExecutionConfig"} <= described["model"] - set(
        COPIED_FIELDS["model"]
    ) - SET_FIELDS["model"]
    assert "ServerlessConfig" not in COPIED_FIELDS["variant"]


def test_an_update_copies_vpc_kms_data_capture_and_an_uncompressed_model(capsys, role_arn):
    source = {
        "S3DataSource": {
            "S3Uri": "s3://b/model/",
            "S3DataType": "S3Prefix",
            "CompressionType": "None",
        }
    }
    vpc = {"SecurityGroupIds": ["sg-1"], "Subnets": ["subnet-1"]}
    capture = {
        "EnableCapture": True,
        "InitialSamplingPercentage": 50,
        "DestinationS3Uri": "s3://b/capture",
        "CaptureOptions": [{"CaptureMode": "Input"}],
    }
    kms = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/abc"
    make_endpoint(
        "clip-x",
        role_arn,
        container={"ModelDataSource": source, "Environment": {"A": "1"}},
        variants=[
            {
                "InstanceType": "ml.c5.xlarge",
                "InitialInstanceCount": 3,
                "VolumeSizeInGB": 100,
                "ModelDataDownloadTimeoutInSeconds": 1800,
            }
        ],
        VpcConfig=vpc,
        DataCaptureConfig=capture,
        KmsKeyId=kms,
    )
    v2 = IMAGE_URI.replace(":v1", ":v2")
    code, out, err = run(capsys, "--dry-run", *deploy_args("clip-x", "--image-uri", v2))
    assert code == 0, err
    calls = dict(plan(out))
    model = calls["sagemaker.create_model"]
    assert model["VpcConfig"] == vpc
    assert model["PrimaryContainer"]["ModelDataSource"] == source
    assert "ModelDataUrl" not in model["PrimaryContainer"]
    assert model["PrimaryContainer"]["Environment"] == {"A": "***"}
    config = calls["sagemaker.create_endpoint_config"]
    assert (config["KmsKeyId"], config["DataCaptureConfig"]) == (kms, capture)
    (variant,) = config["ProductionVariants"]
    assert (variant["VolumeSizeInGB"], variant["ModelDataDownloadTimeoutInSeconds"]) == (100, 1800)
    assert variant["InitialInstanceCount"] == 3
    report = err.splitlines()
    assert f"  model data: {json.dumps(source, sort_keys=True)} (kept)" in report
    assert f"  VpcConfig: {json.dumps(vpc, sort_keys=True)} (kept)" in report
    assert f"  KmsKeyId: {kms} (kept)" in report
    assert "  VolumeSizeInGB: 100 (kept)" in report
    # --model-data replaces the uncompressed model with an archive.
    url = "s3://clip-models/tuned/model.tar.gz"
    code, out, err = run(capsys, "--dry-run", *deploy_args("clip-x", "--model-data", url))
    assert code == 0, err
    container = dict(plan(out))["sagemaker.create_model"]["PrimaryContainer"]
    assert container["ModelDataUrl"] == url and "ModelDataSource" not in container
    assert f"  model data: {json.dumps(source, sort_keys=True)} -> {url}" in err.splitlines()


@pytest.mark.parametrize(
    ("name", "made", "named"),
    [
        (
            "clip-two",
            {
                "variants": [
                    {"InstanceType": "ml.c5.xlarge", "InitialInstanceCount": 1},
                    {"InstanceType": "ml.c5.xlarge", "InitialInstanceCount": 1},
                ]
            },
            "2 production variants",
        ),
        (
            "clip-sls",
            {"variants": [{"ServerlessConfig": {"MemorySizeInMB": 4096, "MaxConcurrency": 5}}]},
            "ProductionVariants[0].ServerlessConfig",
        ),
        ("clip-mc", {"Containers": [{"Image": IMAGE_URI}]}, "Containers"),
    ],
)
def test_an_update_refuses_what_it_cannot_carry_over(capsys, role_arn, name, made, named):
    """Several or serverless variants and several containers cannot be rebuilt as one
    instance-based variant of one container: refused, named, nothing made."""
    make_endpoint(name, role_arn, **made)
    before = state()
    code, _, err = run(capsys, *deploy_args(name, "--image-uri", IMAGE_URI.replace(":v1", ":v2")))
    line = error_line(err)
    assert code == 2 and f"endpoint {name} has settings an update by this script" in line
    assert named in line and "Traceback" not in err
    assert state() == before


def test_a_gpu_fleet_on_another_ami_gets_the_one_the_images_torch_needs(capsys, role_arn):
    """A GPU endpoint without InferenceAmiVersion (another tool's, or made before this script
    named one) keeps its instance type on update, but not SageMaker's default AMI: its driver
    is older than the image's CUDA 13.0 torch needs, and the new fleet would serve on the CPUs."""
    make_endpoint(
        "clip-gpu",
        role_arn,
        variants=[{"InstanceType": "ml.g4dn.xlarge", "InitialInstanceCount": 1}],
    )
    code, out, err = run(capsys, "--dry-run", *deploy_args("clip-gpu"))
    assert code == 0, err
    (variant,) = dict(plan(out))["sagemaker.create_endpoint_config"]["ProductionVariants"]
    assert variant["InferenceAmiVersion"] == GPU_AMI_VERSION
    assert f"  inference AMI version: none -> {GPU_AMI_VERSION}" in err.splitlines()
    assert "serves on the CPUs; --inference-ami-version default or NAME keeps another" in err
    # Asked for, the default AMI stays.
    code, out, err = run(
        capsys, "--dry-run", *deploy_args("clip-gpu", "--inference-ami-version", "default")
    )
    assert code == 0, err
    (variant,) = dict(plan(out))["sagemaker.create_endpoint_config"]["ProductionVariants"]
    assert "InferenceAmiVersion" not in variant
    assert "  inference AMI version: none (kept)" in err.splitlines()


def test_an_update_keeps_the_live_instance_count(capsys, role_arn):
    """A fleet scaled by hand (UpdateEndpointWeightsAndCapacities) from 2 to 6 stays 6."""
    assert run(capsys, *deploy_args("clip-live", "--instance-count", "2"))[0] == 0
    aws("sagemaker").update_endpoint_weights_and_capacities(
        EndpointName="clip-live",
        DesiredWeightsAndCapacities=[{"VariantName": "AllTraffic", "DesiredInstanceCount": 6}],
    )
    code, out, err = run(capsys, "--dry-run", *deploy_args("clip-live"))
    assert code == 0, err
    (variant,) = dict(plan(out))["sagemaker.create_endpoint_config"]["ProductionVariants"]
    assert variant["InitialInstanceCount"] == 6
    assert "  instance count: 6 (kept)" in err.splitlines()
    assert dict(plan(out))["sagemaker.update_endpoint"]["RetainAllVariantProperties"] is False
    assert run(capsys, "delete", "--endpoint", "clip-live")[0] == 0


def test_an_autoscaled_update_retains_the_fleet_and_refuses_instance_count(capsys, role_arn):
    assert run(capsys, *deploy_args("clip-as"))[0] == 0
    assert run(capsys, "autoscale", "--endpoint", "clip-as", "--min", "1", "--max", "4")[0] == 0
    # One instance now: no canary (CanarySize is at most half the instances).
    code, _, err = run(capsys, "--dry-run", *deploy_args("clip-as", "--canary-percent", "10"))
    assert code == 2 and "would have 1 instance" in error_line(err)
    # Autoscaling took it to 2 (its config still says 1): a canary fits, the count is kept.
    aws("sagemaker").update_endpoint_weights_and_capacities(
        EndpointName="clip-as",
        DesiredWeightsAndCapacities=[{"VariantName": "AllTraffic", "DesiredInstanceCount": 2}],
    )
    code, out, err = run(capsys, "--dry-run", *deploy_args("clip-as", "--canary-percent", "10"))
    assert code == 0, err
    update = dict(plan(out))["sagemaker.update_endpoint"]
    assert update["RetainAllVariantProperties"] is True
    assert "  instance count: 2 (kept)" in err.splitlines()
    before = state()
    code, _, err = run(capsys, *deploy_args("clip-as", "--instance-count", "4"))
    line = error_line(err)
    assert code == 2 and "--instance-count: endpoint clip-as autoscales" in line
    assert "autoscale --endpoint clip-as --min N --max M" in line
    assert state() == before
    assert run(capsys, "delete", "--endpoint", "clip-as")[0] == 0


def test_an_update_of_an_endpoint_whose_model_was_deleted(capsys, role_arn):
    """Its environment and model data are unknown: refused unless --model-defaults, and then
    reported as unknown, never as kept."""
    url = "s3://clip-models/tuned/model.tar.gz"
    created = deploy_args("clip-gone", "--env", "CLIP_API_WORKERS=4", "--model-data", url)
    assert run(capsys, *created)[0] == 0
    sagemaker = aws("sagemaker")
    model = current_config("clip-gone")["ProductionVariants"][0]["ModelName"]
    sagemaker.delete_model(ModelName=model)
    before = state()
    code, _, err = run(capsys, *deploy_args("clip-gone"))
    line = error_line(err)
    assert code == 2 and f"model {model}, which endpoint clip-gone runs, no longer exists" in line
    assert "--model-defaults" in line
    assert state() == before
    code, out, err = run(
        capsys, "--dry-run", *deploy_args("clip-gone", "--model-defaults", "--env", "B=1")
    )
    assert code == 0, err
    report = err.splitlines()
    assert "  model data: unknown (model deleted) -> none" in report
    assert f"  image: unknown (model deleted) -> {IMAGE_URI}" in report
    assert "  env B=*** (set)" in report
    assert not [
        row
        for row in report
        if "(kept)" in row
        and row.split(":")[0].strip() in ("image", "role", "model data", "network isolation")
    ]
    assert "  instance type: ml.m5.xlarge (kept)" in report  # the config is still known
    assert run(capsys, "delete", "--endpoint", "clip-gone")[0] == 0


def test_an_async_deploy_whose_wait_runs_out_says_how_to_scale_it(capsys, role_arn, monkeypatch):
    """Exit 3 leaves a new async endpoint without its scale-to-zero setup: the warning gives the
    command for it."""

    def wait(aws: Any, endpoint: str, config: str, timeout_s: int) -> None:
        raise StillChangingError(f"endpoint {endpoint} is still Creating (stand-in)")

    monkeypatch.setattr(commands, "wait_in_service", wait)
    output = f"s3://{BUCKET}/o3/"
    code, _, err = run(
        capsys,
        *deploy_args("clip-as5", "--async", "--output", output, "--max-instances", "3"),
        *("--backlog-target", "8", "--wait"),
    )
    assert code == 3
    (line,) = [line for line in err.splitlines() if line.startswith("warning: endpoint")]
    assert "still Creating" in line
    assert "autoscale --endpoint clip-as5 --min 0 --max 3 --backlog-target 8" in line
    assert "endpoint/clip-as5/variant/AllTraffic" not in state()["targets"]
    assert run(capsys, "delete", "--endpoint", "clip-as5")[0] == 0


def test_async_autoscale_checks_its_bounds_before_anything(capsys, role_arn):
    assert (
        run(capsys, *deploy_args("clip-as6", "--async", "--output", f"s3://{BUCKET}/o6/"))[0] == 0
    )
    before = state()
    code, _, err = run(capsys, "autoscale", "--endpoint", "clip-as6", "--min", "3", "--max", "2")
    assert code == 2 and "need 0 <= --min <= --max" in error_line(err)
    assert state() == before
    assert run(capsys, "delete", "--endpoint", "clip-as6")[0] == 0


def test_batch_transform_takes_resource_not_found_as_no_such_job(capsys, monkeypatch):
    """botocore's model lists ResourceNotFound as DescribeTransformJob's error for a job that
    does not exist (moto answers ValidationException): both mean the name is free."""
    upload_requests("requests/part-4.jsonl", [{"images": ["s3://x/y.jpg"]}])
    no_such_job = AwsCallError(
        "sagemaker DescribeTransformJob failed: ResourceNotFound: no such job", "ResourceNotFound"
    )
    failing_calls(monkeypatch, {"describe_transform_job": no_such_job})
    code, out, err = run(
        capsys, "--dry-run", *batch_args("clip-batch-r", "--model", "clip-20260101-000000-000")
    )
    assert code == 0, err
    assert [c for c, _ in plan(out)] == ["sagemaker.create_transform_job"]


def test_batch_transform_concurrency_alone_is_checked_against_the_default_payload(capsys):
    """Without --max-payload-mb, MaxPayloadInMB is SageMaker's default, 6 MB."""
    upload_requests("requests/part-5.jsonl", [{"images": ["s3://x/y.jpg"]}])
    model = ("--model", "clip-20260101-000000-000")
    code, _, err = run(capsys, *batch_args("clip-batch-c", *model, "--max-concurrent", "17"))
    line = error_line(err)
    assert code == 2 and "--max-concurrent 17 x MaxPayloadInMB 6 (SageMaker's default" in line
    assert "is 102 MB; SageMaker allows at most 100" in line
    code, out, err = run(
        capsys, "--dry-run", *batch_args("clip-batch-c", *model, "--max-concurrent", "16")
    )
    assert code == 0, err
    ((_, job),) = plan(out)
    assert job["MaxConcurrentTransforms"] == 16 and "MaxPayloadInMB" not in job


def test_batch_transform_cleanup_keeps_the_jobs_error(capsys, role_arn, monkeypatch):
    """A failed DeleteModel does not hide the CreateTransformJob error (both are reported), and
    a lost connection (botocore's EndpointConnectionError) also deletes the model made."""
    from botocore.exceptions import EndpointConnectionError

    upload_requests("requests/part-6.jsonl", [{"images": ["s3://x/y.jpg"]}])
    made = ["--image-uri", IMAGE_URI, "--role", ROLE]
    failures = quota_then_denied(monkeypatch, "create_transform_job", "delete_model")
    code, _, err = run(capsys, *batch_args("clip-batch-d", *made))
    line = error_line(err)
    assert code == 1 and "CreateTransformJob failed: ResourceLimitExceeded" in line
    assert "model clip-batch-d, made for the job, was not deleted" in line
    assert "DeleteModel failed: AccessDeniedException" in line
    assert "aws sagemaker delete-model --model-name clip-batch-d" in line
    aws("sagemaker").delete_model(ModelName="clip-batch-d")

    del failures["delete_model"]
    failures["create_transform_job"] = EndpointConnectionError(endpoint_url="https://sagemaker")
    code, _, err = run(capsys, *batch_args("clip-batch-e", *made))
    assert code == 1 and "EndpointConnectionError" in error_line(err)
    assert "-> sagemaker.create_model" in err and "-> sagemaker.delete_model" in err
    assert "clip-batch-e" not in state()["models"]
