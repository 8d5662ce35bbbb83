"""Pure request builders and checks (unit-tested; no AWS): names, the model, endpoint config,
blue/green and autoscaling requests, --model-data, the invoke body and the ECR login."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sagemaker_deploy.errors import DeployError

DEFAULT_INSTANCE_TYPE = "ml.m5.xlarge"
DEFAULT_INSTANCE_COUNT = 1
DEFAULT_STARTUP_TIMEOUT = 600
# How printed plans show container Environment values (keys stay): they may be secrets.
MASK = "***"
INSTANCE_TYPE_EXAMPLES = "ml.m5.xlarge, ml.c5.2xlarge (CPU); ml.g4dn.xlarge, ml.g5.xlarge (GPU)"
INSTANCE_TYPE_RE = re.compile(r"ml\.[a-z][a-z0-9-]*\.(\d*xlarge|large|medium|small|micro)")
# SageMaker names: alphanumerics and hyphens, at most 63; the timestamp suffix takes 20.
ENDPOINT_NAME_RE = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,42}")
ROLE_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/(?:[\w+=,.@-]+/)*([\w+=,.@-]{1,64})")
PAYLOAD_LIMIT = 6 * 1024 * 1024  # SageMaker real-time request bodies (and CLIP_MAX_BODY_BYTES)
VARIANT = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
# GPU instance families: ml.g4dn, ml.g5, ml.g6, ml.g6e, ml.p4d, ml.p5, ...
GPU_INSTANCE_RE = re.compile(r"ml\.[gp]\d")
# The image's torch (PyPI's 2.13.0) is a CUDA 13.0 build: it needs an NVIDIA driver of the 580
# series or newer, and on an older one it sees no GPU, so the service runs on the CPUs. Of the
# AMI versions SageMaker hosting offers (botocore's ProductionVariant.InferenceAmiVersion),
# this is the one with driver 580 / CUDA 13.0; the others carry 535 or 550.
GPU_AMI_VERSION = "al2023-ami-sagemaker-inference-gpu-4-1"


def check_instance_type(value: str) -> str:
    """SageMaker hosting wants `ml.<family>.<size>`; catch `m5.xlarge` before AWS does."""
    if not INSTANCE_TYPE_RE.fullmatch(value):
        raise DeployError(
            f"instance type {value!r} is not a SageMaker instance type (ml.<family>.<size>), "
            f"e.g. {INSTANCE_TYPE_EXAMPLES}"
        )
    return value


def is_gpu_instance(instance_type: str) -> bool:
    return GPU_INSTANCE_RE.match(instance_type) is not None


def inference_ami_version(instance_type: str, choice: str, known: Sequence[str]) -> str | None:
    """The endpoint's InferenceAmiVersion: `auto` names GPU_AMI_VERSION on GPU instance types
    and nothing on others; `default` names nothing (SageMaker's default AMI); anything else
    must be one of the `known` versions (botocore's list)."""
    if choice == "auto":
        return GPU_AMI_VERSION if is_gpu_instance(instance_type) else None
    if choice == "default":
        return None
    if choice not in known:
        raise DeployError(
            f"--inference-ami-version {choice!r}: use auto, default or one of {', '.join(known)}"
        )
    return choice


def check_endpoint_name(value: str) -> str:
    if not ENDPOINT_NAME_RE.fullmatch(value):
        raise DeployError(
            f"endpoint name {value!r}: use 1-43 letters, digits and hyphens, starting and ending "
            "with a letter or digit (a 20-character timestamp is appended to model/config names)"
        )
    return value


def role_name(role: str) -> str:
    """The IAM role name in a role ARN (paths allowed), or `role` itself when it is a name."""
    match = ROLE_ARN_RE.fullmatch(role)
    if match:
        return match.group(1)
    if role.startswith("arn:") or not re.fullmatch(r"[\w+=,.@-]{1,64}", role):
        raise DeployError(f"--role {role!r} is neither an IAM role name nor a role ARN")
    return role


def resource_name(endpoint: str, now: datetime) -> str:
    """A new model/config name per deploy: endpoint configs are immutable, so updates need one."""
    return f"{endpoint}-{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}"


def owned_by(endpoint: str, name: str) -> bool:
    """Whether `name` was made by `resource_name(endpoint, ...)` (not by `clip-staging`'s)."""
    return re.fullmatch(rf"{re.escape(endpoint)}-\d{{8}}-\d{{6}}-\d{{3}}", name) is not None


def model_request(
    name: str, image_uri: str, role_arn: str, env: dict[str, str], network_isolation: bool
) -> dict[str, Any]:
    """The model is the image, whose CLIP weights are baked in (`with_model_data` adds a
    ModelDataUrl that replaces them)."""
    container: dict[str, Any] = {"Image": image_uri, "Mode": "SingleModel"}
    if env:
        container["Environment"] = env
    return {
        "ModelName": name,
        "ExecutionRoleArn": role_arn,
        "PrimaryContainer": container,
        "EnableNetworkIsolation": network_isolation,
    }


def endpoint_config_request(
    name: str,
    model_name: str,
    instance_type: str,
    instance_count: int,
    startup_timeout: int,
    variant: str = VARIANT,
    ami_version: str | None = None,
) -> dict[str, Any]:
    """One variant; the start-up timeout covers image pull + model load + warm-up before /ping.
    `ami_version` picks the host's NVIDIA driver (see GPU_AMI_VERSION)."""
    production_variant: dict[str, Any] = {
        "VariantName": variant,
        "ModelName": model_name,
        "InstanceType": instance_type,
        "InitialInstanceCount": instance_count,
        "InitialVariantWeight": 1.0,
        "ContainerStartupHealthCheckTimeoutInSeconds": startup_timeout,
    }
    if ami_version is not None:
        production_variant["InferenceAmiVersion"] = ami_version
    return {"EndpointConfigName": name, "ProductionVariants": [production_variant]}


def blue_green_config(
    bake_seconds: int, canary_percent: int | None, rollback_alarms: Sequence[str], startup: int
) -> dict[str, Any]:
    """Blue/green: the new fleet starts beside the old one, which keeps serving until it is done.

    With `canary_percent`, that share of capacity gets traffic first for `bake_seconds`; the
    named CloudWatch alarms roll the update back if they fire while it runs.
    """
    routing: dict[str, Any] = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    if canary_percent is not None:
        routing = {
            "Type": "CANARY",
            "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": canary_percent},
            "WaitIntervalInSeconds": bake_seconds,
        }
    policy = {
        "TrafficRoutingConfiguration": routing,
        "TerminationWaitInSeconds": bake_seconds,
        "MaximumExecutionTimeoutInSeconds": min(28800, max(1800, startup + 2 * bake_seconds + 600)),
    }
    config: dict[str, Any] = {"BlueGreenUpdatePolicy": policy}
    if rollback_alarms:
        config["AutoRollbackConfiguration"] = {
            "Alarms": [{"AlarmName": a} for a in rollback_alarms]
        }
    return config


def scaling_resource_id(endpoint: str, variant: str) -> str:
    return f"endpoint/{endpoint}/variant/{variant}"


def scalable_target_request(resource_id: str, min_count: int, max_count: int) -> dict[str, Any]:
    return {
        "ServiceNamespace": "sagemaker",
        "ResourceId": resource_id,
        "ScalableDimension": SCALABLE_DIMENSION,
        "MinCapacity": min_count,
        "MaxCapacity": max_count,
    }


def scaling_policy_name(endpoint: str) -> str:
    return f"{endpoint}-invocations-per-instance"


def scaling_policy_request(
    resource_id: str, endpoint: str, target: float, scale_in_cooldown: int, scale_out_cooldown: int
) -> dict[str, Any]:
    """Target tracking on invocations per instance per minute: add machines as traffic grows."""
    return {
        "PolicyName": scaling_policy_name(endpoint),
        "ServiceNamespace": "sagemaker",
        "ResourceId": resource_id,
        "ScalableDimension": SCALABLE_DIMENSION,
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": target,
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
            },
            "ScaleInCooldown": scale_in_cooldown,
            "ScaleOutCooldown": scale_out_cooldown,
        },
    }


# ---- --model-data: a CLIP checkpoint SageMaker extracts into /opt/ml/model ----

MODEL_DATA_RE = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+\.tar\.gz")


def check_model_data(url: str) -> str:
    """SageMaker downloads `ModelDataUrl` from S3 and extracts it into /opt/ml/model."""
    if not MODEL_DATA_RE.fullmatch(url):
        raise DeployError(
            f"--model-data {url!r}: give the S3 URL of a model.tar.gz holding a CLIP checkpoint "
            "in transformers' format, e.g. s3://my-bucket/clip/model.tar.gz (README, 'A model "
            "from /opt/ml/model')"
        )
    return url


def with_model_data(request: dict[str, Any], url: str) -> dict[str, Any]:
    """The model request with `ModelDataUrl`: the service then serves that checkpoint instead of
    the one baked into the image (clip_runner/model/model_source.py)."""
    return {**request, "PrimaryContainer": {**request["PrimaryContainer"], "ModelDataUrl": url}}


def image_source(arg: str) -> str:
    """URLs and data: URIs go as they are; anything else is a local file, sent as base64."""
    if arg.startswith(("http://", "https://", "data:", "s3://")):
        return arg
    path = Path(arg)
    if not path.is_file():
        raise DeployError(f"--image {arg!r} is neither an http(s)/s3/data: URL nor a readable file")
    return base64.b64encode(path.read_bytes()).decode("ascii")


def parse_class(arg: str) -> list[Any]:
    """`person=1`, `bag=0` or `cat` (flag 1): the `[name, flag]` pairs of the request."""
    name, sep, flag = arg.rpartition("=")
    if not sep:
        return [arg, 1]
    if flag not in ("0", "1") or not name:
        raise DeployError(f"--class {arg!r}: expected NAME=0 or NAME=1")
    return [name, int(flag)]


def invoke_body(
    images: Sequence[str], classes: Sequence[Sequence[Any]], top_k: int | None = None
) -> bytes:
    """The seed's request: {"images": [...], "classes": [[name, flag], ...]}."""
    request: dict[str, Any] = {"images": [image_source(i) for i in images], "classes": classes}
    if top_k is not None:
        request["top_k"] = top_k
    body = json.dumps(request).encode()
    if len(body) > PAYLOAD_LIMIT:
        raise DeployError(
            f"the request is {len(body) / 2**20:.1f} MiB; SageMaker accepts at most 6 MB: send "
            "image URLs, or resize images client-side (the model sees 224 px anyway)"
        )
    return body


def ecr_login(auth: dict[str, Any]) -> tuple[str, str, str]:
    """(user, password, registry host) from one get_authorization_token entry."""
    user, _, password = base64.b64decode(auth["authorizationToken"]).decode().partition(":")
    return user, password, auth["proxyEndpoint"].removeprefix("https://")


def docker_commands(
    docker: str, user: str, registry: str, local: str, remote: str
) -> list[list[str]]:
    """Login (password on stdin), tag, push."""
    return [
        [docker, "login", "--username", user, "--password-stdin", registry],
        [docker, "tag", local, remote],
        [docker, "push", remote],
    ]


S3_URI_RE = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?")


def check_s3_uri(value: str, option: str) -> str:
    if not S3_URI_RE.fullmatch(value):
        raise DeployError(f"{option} {value!r} is not an s3://bucket/prefix URI")
    return value
