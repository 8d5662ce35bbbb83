"""Deploy the containerized CLIP bento to Amazon SageMaker; scale, update, invoke and delete it.

    python scripts/deploy_sagemaker.py push --image clip-bentoml:TAG --repository clip-bentoml
    python scripts/deploy_sagemaker.py deploy --endpoint clip --image-uri URI --role ROLE --wait
    python scripts/deploy_sagemaker.py autoscale --endpoint clip --min 1 --max 4 --target 100
    python scripts/deploy_sagemaker.py invoke --endpoint clip --image photo.jpg --image https://...
    python scripts/deploy_sagemaker.py delete --endpoint clip
    python scripts/deploy_sagemaker.py deploy --endpoint clip-async --async \
        --output s3://BUCKET/answers/ --image-uri URI --role ROLE --wait
    python scripts/deploy_sagemaker.py batch-transform --model MODEL \
        --input s3://BUCKET/requests/ --output s3://BUCKET/answers/ --wait

The image built by `bentoml containerize` already speaks SageMaker's contract (`serve`, port
8080, /ping, /invocations), so deploying is only AWS API calls. `deploy` on an existing endpoint
creates a new timestamped model and endpoint config and switches with a blue/green update, so
the old fleet serves until the new one passes /ping. An update starts from the endpoint's current
settings (instance type, live instance count, start-up timeout, AMI, environment, model data,
network isolation, async output, and settings it copies as they are, e.g. VPC, KMS key, data
capture): only what is given on the command line changes, and an endpoint with settings it
cannot carry over (several variants, serverless, several containers, ...) is refused. Names of
the models and configs this script creates are `<endpoint>-YYYYmmdd-HHMMSS-mmm`; `delete` removes
exactly those (and the endpoint's current ones).

Every subcommand takes --region, --endpoint-url (or AWS_ENDPOINT_URL, e.g. a moto server) and
--dry-run. A dry run makes no call that changes anything (and no invoke / docker): it prints the
plan, one `[dry-run] service.operation {params}` line per call, each checked against botocore's
model of the AWS API, with container Environment values shown as *** (they may be secrets). It
still makes read-only lookups (iam GetRole, DescribeEndpoint, ...) so that the plan is the one a
real run would follow.

Exit status: 0 done, 1 an AWS call failed, 2 a usage error or a failed docker step of `push` (one
`error:` line; nothing changed by this run, except that `push` may have created the ECR
repository before docker failed, which the line then says), 3 --wait gave up while the endpoint
was still Creating/Updating (not failed).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, WaiterError
from botocore.validate import validate_parameters

from clip_runner.web.schemas import SEED_CLASSES

DEFAULT_INSTANCE_TYPE = "ml.m5.xlarge"
DEFAULT_INSTANCE_COUNT = 1
DEFAULT_STARTUP_TIMEOUT = 600
# What --wait allows beyond SageMaker's own time limits: instances to be found and provisioned,
# the image pulled, the old fleet drained.
PROVISIONING_MARGIN_S = 1800
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
BUSY_STATES = {"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"}
# States in which `--wait` running out of time says nothing about success or failure.
STILL_CHANGING = {"Creating", "Updating", "SystemUpdating"}
# GPU instance families: ml.g4dn, ml.g5, ml.g6, ml.g6e, ml.p4d, ml.p5, ...
GPU_INSTANCE_RE = re.compile(r"ml\.[gp]\d")
# The image's torch (PyPI's 2.13.0) is a CUDA 13.0 build: it needs an NVIDIA driver of the 580
# series or newer, and on an older one it sees no GPU, so the service runs on the CPUs. Of the
# AMI versions SageMaker hosting offers (botocore's ProductionVariant.InferenceAmiVersion),
# this is the one with driver 580 / CUDA 13.0; the others carry 535 or 550.
GPU_AMI_VERSION = "al2023-ami-sagemaker-inference-gpu-4-1"
# GPU families older than Turing (ml.p2: K80; ml.p3, ml.p3dn: V100), for which a CUDA 13 build
# of torch holds no code: the runner serves on the CPUs there (its log says why).
OLD_GPU_INSTANCE_RE = re.compile(r"ml\.p[23]")
OLD_GPU_WARNING = (
    "warning: {instance_type}'s GPUs (K80 on ml.p2, V100 on ml.p3) are older than any the "
    "image's CUDA 13.0 torch runs on: the endpoint will serve on the CPUs. Pick ml.g4dn (T4) or "
    "newer, or an image whose torch is built for them (README, 'Deploy to SageMaker')"
)
# Batch transform hosts (TransformResources.TransformAmiVersion) carry drivers 470 or 535 only.
BATCH_GPU_WARNING = (
    "warning: {instance_type} is a GPU instance, but SageMaker's batch transform hosts carry "
    "NVIDIA drivers up to 535 (CUDA 12.2), and the image's PyPI torch is a CUDA 13.0 build "
    "that needs 580: the job will run on the CPUs unless the image's torch is built for CUDA 12 "
    "(README, 'Deploy to SageMaker')"
)


class DeployError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


class AwsCallError(Exception):
    """An AWS API call failed; printed as one line naming the call, exit status 1."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class StillChangingError(Exception):
    """--wait ran out of time while the endpoint was still Creating/Updating: neither success nor
    failure yet, so it gets its own exit status (3) and a line saying how to check again."""


def masked(params: Any) -> Any:
    """A copy of request `params` for printing: every `Environment` map keeps its keys, its values
    become MASK (a container's environment may hold secrets; a dry-run plan lands in logs)."""
    if isinstance(params, dict):
        return {
            key: {name: MASK for name in value}
            if key == "Environment" and isinstance(value, dict)
            else masked(value)
            for key, value in params.items()
        }
    if isinstance(params, list):
        return [masked(item) for item in params]
    return params


# ---- pure request builders (unit-tested; no AWS) ----


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


# ---- boto3 at the edge ----


def one_line(message: str, limit: int = 400) -> str:
    """AWS messages are one line, but proxies and emulators may answer an HTML page."""
    text = " ".join(re.sub(r"<[^>]*>", " ", message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Aws:
    """boto3 clients plus the dry-run switch: `lookup` always runs, `act` only when not dry."""

    def __init__(self, region: str | None, endpoint_url: str | None, dry_run: bool) -> None:
        self.session = boto3.session.Session(region_name=region or os.environ.get("AWS_REGION"))
        if not self.session.region_name:
            raise DeployError("no AWS region: pass --region or set AWS_DEFAULT_REGION")
        self.endpoint_url = endpoint_url or None  # None: boto3 honours AWS_ENDPOINT_URL itself
        self.dry_run = dry_run
        self._clients: dict[str, Any] = {}

    def enum(self, service: str, shape: str) -> list[str]:
        """The values botocore's model of `service` allows for the string shape `shape`."""
        return list(self.client(service).meta.service_model.shape_for(shape).enum)

    def client(self, service: str) -> Any:
        if service not in self._clients:
            config = Config(retries={"mode": "standard"}, read_timeout=70)
            self._clients[service] = self.session.client(
                service, endpoint_url=self.endpoint_url, config=config
            )
        return self._clients[service]

    def _call(self, service: str, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            return getattr(self.client(service), operation)(**params)
        except ClientError as error:
            info = error.response.get("Error", {})
            code = str(info.get("Code", ""))
            message = one_line(info.get("Message") or str(error))
            raise AwsCallError(
                f"{service} {error.operation_name} failed: {code}: {message}", code
            ) from None

    def pages(self, service: str, operation: str, **params: Any) -> list[dict[str, Any]]:
        """Every page of a read-only list/describe call."""
        paginator = self.client(service).get_paginator(operation)
        try:
            return list(paginator.paginate(**params))
        except ClientError as error:
            raise AwsCallError(
                f"{service} {error.operation_name} failed: {one_line(str(error))}"
            ) from None

    def lookup(
        self, service: str, operation: str, missing: Sequence[str] = (), **params: Any
    ) -> dict[str, Any] | None:
        """A read-only call; None when AWS answers with one of the `missing` error codes."""
        try:
            return self._call(service, operation, params)
        except AwsCallError as error:
            if error.code in missing:
                return None
            raise

    def act(self, service: str, operation: str, shown: Any = None, **params: Any) -> Any:
        """A call with effects: made, or printed (after checking it against the API model)."""
        if self.dry_run:
            client = self.client(service)
            api_name = client.meta.method_to_api_mapping[operation]
            shape = client.meta.service_model.operation_model(api_name).input_shape
            validate_parameters(params, shape)
            plan = shown if shown is not None else masked(params)
            print(f"[dry-run] {service}.{operation} {json.dumps(plan, default=str)}")
            return None
        names = {k: v for k, v in params.items() if k.endswith("Name") and isinstance(v, str)}
        print(f"-> {service}.{operation} {json.dumps(names)}", file=sys.stderr)  # stdout: answers
        return self._call(service, operation, params)


def describe_endpoint(aws: Aws, endpoint: str) -> dict[str, Any] | None:
    try:
        return aws.lookup("sagemaker", "describe_endpoint", EndpointName=endpoint)
    except AwsCallError as error:
        if error.code == "ValidationException" and "Could not find endpoint" in str(error):
            return None
        raise


def resolve_role(aws: Aws, role: str) -> str:
    """The role's ARN, after checking it exists: a missing role otherwise fails much later."""
    name = role_name(role)
    try:
        found = aws.lookup("iam", "get_role", missing=("NoSuchEntity",), RoleName=name)
    except AwsCallError as error:
        if not error.code.startswith("AccessDenied"):
            raise
        if ROLE_ARN_RE.fullmatch(role):
            print(f"warning: cannot read IAM role {name} ({error}); using {role} as given")
            return role
        # Without iam:GetRole a name cannot become the ARN CreateModel needs; an ARN can be used
        # unread, as above.
        raise DeployError(
            f"cannot read IAM role {name} (iam:GetRole is denied to you): pass the role's ARN "
            f"instead, --role arn:aws:iam::ACCOUNT_ID:role/{name}"
        ) from None
    if found is None:
        raise DeployError(
            f"IAM role {role!r} not found; create one with AmazonSageMakerFullAccess (or the "
            "narrower policy in README.md, 'Deploy to SageMaker'), trusted by "
            "sagemaker.amazonaws.com, and pass its name or ARN with --role"
        )
    if "sagemaker.amazonaws.com" not in json.dumps(found["Role"].get("AssumeRolePolicyDocument")):
        print(
            f"warning: role {name} does not trust sagemaker.amazonaws.com; SageMaker cannot use it"
        )
    return found["Role"]["Arn"]


def scaling_targets(aws: Aws, endpoint: str) -> list[dict[str, Any]]:
    """The endpoint's variants registered with Application Auto Scaling."""
    prefix = f"endpoint/{endpoint}/variant/"
    pages = aws.pages(
        "application-autoscaling", "describe_scalable_targets", ServiceNamespace="sagemaker"
    )
    return [
        target
        for page in pages
        for target in page["ScalableTargets"]
        if target["ResourceId"].startswith(prefix)
    ]


def remove_autoscaling(aws: Aws, endpoint: str) -> None:
    for target in scaling_targets(aws, endpoint):
        rid = target["ResourceId"]
        policies = aws.lookup(
            "application-autoscaling",
            "describe_scaling_policies",
            ServiceNamespace="sagemaker",
            ResourceId=rid,
            ScalableDimension=SCALABLE_DIMENSION,
        )
        for policy in (policies or {}).get("ScalingPolicies", []):
            if policy["ResourceId"] == rid:
                aws.act(
                    "application-autoscaling",
                    "delete_scaling_policy",
                    PolicyName=policy["PolicyName"],
                    ServiceNamespace="sagemaker",
                    ResourceId=rid,
                    ScalableDimension=SCALABLE_DIMENSION,
                )
        aws.act(
            "application-autoscaling",
            "deregister_scalable_target",
            ServiceNamespace="sagemaker",
            ResourceId=rid,
            ScalableDimension=SCALABLE_DIMENSION,
        )


def wait_timeout(startup_timeout: int, deployment: dict[str, Any] | None) -> int:
    """How long --wait waits. A new endpoint: start-up plus provisioning. An update: SageMaker's
    own limit for the blue/green deployment (MaximumExecutionTimeoutInSeconds, which covers the
    canary wait and the bake time) plus provisioning; giving up earlier would call an update
    that is still going well a failure."""
    if deployment is None:
        return startup_timeout + PROVISIONING_MARGIN_S
    limit = deployment["BlueGreenUpdatePolicy"]["MaximumExecutionTimeoutInSeconds"]
    return limit + PROVISIONING_MARGIN_S


def wait_in_service(aws: Aws, endpoint: str, config: str, timeout_s: int) -> None:
    """Wait for InService, then check it runs `config`: a rolled-back update is InService too."""
    print(f"waiting for {endpoint} to be InService (up to {timeout_s} s)...")
    waiter = aws.client("sagemaker").get_waiter("endpoint_in_service")
    logs = f"logs: CloudWatch /aws/sagemaker/Endpoints/{endpoint}"
    try:
        waiter.wait(
            EndpointName=endpoint,
            WaiterConfig={"Delay": 15, "MaxAttempts": max(1, timeout_s // 15)},
        )
    except WaiterError as error:
        state = describe_endpoint(aws, endpoint) or {}
        status = state.get("EndpointStatus", "gone")
        if status in STILL_CHANGING:  # out of time, not failed: SageMaker is still at it
            raise StillChangingError(
                f"endpoint {endpoint} is still {status} after {timeout_s} s (not failed): check "
                f"again with `aws sagemaker describe-endpoint --endpoint-name {endpoint}`; {logs}"
            ) from None
        raise AwsCallError(
            f"endpoint {endpoint} is {status}: {state.get('FailureReason') or error}; {logs}"
        ) from None
    state = describe_endpoint(aws, endpoint) or {}
    running = state.get("EndpointConfigName")
    if running != config:
        reason = state.get("FailureReason") or "SageMaker gave no reason; see the endpoint's events"
        reason = reason.rstrip(". ")
        raise AwsCallError(
            f"endpoint {endpoint} is InService on {running}, not {config}: the update was rolled "
            f"back: {reason}; {logs}"
        )
    print(f"{endpoint} is InService on {config}")


# ---- deploy: what an endpoint runs, and what an update keeps ----

API_KEY_VARIABLE = "CLIP_API_KEY"
# An update rebuilds the endpoint's model and config from its current ones, so that nothing the
# running endpoint has is lost without a word. Per part (botocore's DescribeModel and
# DescribeEndpointConfig shapes), the fields `deploy` sets itself or that are the resource's own
# record (names, ARNs, times), and those it copies into the new model/config as they are. Any
# other field that is set (several or serverless variants, several containers, shadow variants,
# inference components, a model package, ...) cannot be rebuilt by this script: the update is
# refused, naming it, rather than made without it.
SET_FIELDS = {
    "model": {
        "ModelName",
        "ModelArn",
        "CreationTime",
        "DeploymentRecommendation",
        "ResponseMetadata",
        "PrimaryContainer",
        "ExecutionRoleArn",
        "EnableNetworkIsolation",
    },
    "container": {"Image", "Mode", "Environment", "ModelDataUrl", "ModelDataSource"},
    "config": {
        "EndpointConfigName",
        "EndpointConfigArn",
        "CreationTime",
        "ResponseMetadata",
        "ProductionVariants",
        "AsyncInferenceConfig",
    },
    "variant": {
        "VariantName",
        "ModelName",
        "InitialInstanceCount",
        "InstanceType",
        "InitialVariantWeight",
        "ContainerStartupHealthCheckTimeoutInSeconds",
        "InferenceAmiVersion",
    },
}
COPIED_FIELDS = {
    "model": ("VpcConfig",),
    "container": (
        "ContainerHostname",
        "ImageConfig",
        "AdditionalModelDataSources",
        "ContainerMetricsConfig",
    ),
    "config": (
        "KmsKeyId",
        "DataCaptureConfig",
        "ExplainerConfig",
        "MetricsConfig",
        "TracingConfig",
        "CrossRegionTrafficConfig",
    ),
    "variant": (
        "VolumeSizeInGB",
        "ModelDataDownloadTimeoutInSeconds",
        "VariantInstanceProvisionTimeoutInSeconds",
        "CoreDumpConfig",
        "EnableSSMAccess",
        "RoutingConfig",
    ),
}
# Where each part's copied fields go: the model request, its PrimaryContainer, the endpoint
# config request, its one production variant.
PARTS = ("model", "container", "config", "variant")


def no_carried() -> dict[str, dict[str, Any]]:
    """Nothing copied: a new endpoint's (or a deleted model's) share of `carried`."""
    return {part: {} for part in PARTS}


class EndpointSettings(NamedTuple):
    """What `deploy` controls in an endpoint's model and endpoint config.

    An update starts from the running endpoint's settings, so that an option left off the
    command line keeps its value instead of falling back to a default (a GPU fleet updated with
    only a new --image-uri must not become one CPU instance). `carried` holds the current
    model's and config's other fields (COPIED_FIELDS), copied as they are; `model_known` is
    False when the endpoint's model was deleted, so its values are unknown, not "kept".
    """

    image_uri: str
    role_arn: str
    instance_type: str
    instance_count: int
    startup_timeout: int
    ami_version: str | None
    env: dict[str, str]
    model_data: str | None
    model_data_source: dict[str, Any] | None  # an uncompressed model (ModelDataSource)
    network_isolation: bool
    async_config: dict[str, Any] | None
    carried: dict[str, dict[str, Any]]
    model_known: bool = True


def env_changes(items: Sequence[str]) -> dict[str, str | None]:
    """`--env KEY=VALUE` sets KEY; `--env KEY=` (nothing after `=`) removes KEY (None). An
    update merges the changes into the endpoint's current environment, so an empty value is how
    a variable is dropped."""
    changes: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeployError(f"--env {item!r}: use KEY=VALUE (or KEY= to remove KEY)")
        changes[key] = value or None
    return changes


def check_no_api_key(env: dict[str, Any], carried: bool = False) -> None:
    """SageMaker's InvokeEndpoint and InvokeEndpointAsync cannot send an Authorization header:
    with CLIP_API_KEY set every invocation would be a 401 while /ping stays 200 (the endpoint
    looks healthy). IAM guards SageMaker endpoints; the key is for self-hosted servers."""
    if env.get(API_KEY_VARIABLE) is None:
        return
    fix = f"remove it with --env {API_KEY_VARIABLE}=" if carried else "leave it out"
    raise DeployError(
        f"{API_KEY_VARIABLE} cannot be used on SageMaker: InvokeEndpoint cannot send an "
        "Authorization header, so every invocation would get 401 while /ping stays 200 (IAM "
        f"guards the endpoint; the key is for self-hosted servers): {fix}"
    )


def check_async_scaling(min_count: int, max_count: int, backlog_target: float) -> None:
    """Async autoscaling's bounds: checked before anything is created, not after the wait."""
    if not 0 <= min_count <= max_count or max_count < 1:
        raise DeployError("need 0 <= --min <= --max and --max >= 1 (--max-instances for deploy)")
    if backlog_target <= 0:
        raise DeployError("--backlog-target (queued requests per instance) must be positive")


def check_deploy_options(args: argparse.Namespace) -> None:
    """Everything about deploy's options that needs no AWS call, so that a mistake changes
    nothing: the given values only (what an update carries over was valid when it was set).
    --inference-ami-version is checked against botocore's list when it is resolved, still
    before anything is made."""
    check_endpoint_name(args.endpoint)
    if args.instance_type is not None:
        check_instance_type(args.instance_type)
    if args.instance_count is not None and args.instance_count < 1:
        raise DeployError("--instance-count must be at least 1")
    if args.startup_timeout is not None and not 60 <= args.startup_timeout <= 3600:
        raise DeployError("--startup-timeout must be 60..3600 seconds (SageMaker's range)")
    if not 0 <= args.bake_seconds <= 3600:
        raise DeployError("--bake-seconds must be 0..3600")
    if args.canary_percent is not None and not 1 <= args.canary_percent <= 50:
        raise DeployError("--canary-percent must be 1..50")
    if "/" not in args.image_uri:
        raise DeployError(
            f"--image-uri {args.image_uri!r}: give the registry URI `push` printed, "
            "e.g. ACCOUNT.dkr.ecr.REGION.amazonaws.com/clip-bentoml:TAG"
        )
    check_no_api_key(env_changes(args.env))
    if args.model_data:
        check_model_data(args.model_data)
    if args.output is not None:
        check_s3_uri(args.output, "--output")
    if args.failure_output is not None:
        check_s3_uri(args.failure_output, "--failure-output")
    check_async_scaling(0, args.max_instances, args.backlog_target)


def is_set(value: Any) -> bool:
    """Whether a described field holds a setting: moto (and AWS, for some fields) answers
    absent ones as {}, [] or false."""
    return value is not None and value is not False and value != {} and value != [] and value != ""


def uncarried_fields(part: str, found: dict[str, Any], prefix: str = "") -> list[str]:
    """The fields of `found` (one part, see SET_FIELDS) that are set but that an update neither
    sets nor copies."""
    known = SET_FIELDS[part] | set(COPIED_FIELDS[part])
    return [f"{prefix}{key}" for key, value in found.items() if key not in known and is_set(value)]


def copied_fields(part: str, found: dict[str, Any]) -> dict[str, Any]:
    """The fields of `found` that an update copies into the new model/config as they are."""
    return {key: found[key] for key in COPIED_FIELDS[part] if is_set(found.get(key))}


def endpoint_config(aws: Aws, existing: dict[str, Any]) -> dict[str, Any]:
    """The endpoint config the endpoint runs (DescribeEndpointConfig; errors raise)."""
    return (
        aws.lookup(
            "sagemaker",
            "describe_endpoint_config",
            EndpointConfigName=existing["EndpointConfigName"],
        )
        or {}
    )


def live_instance_count(existing: dict[str, Any], variant: dict[str, Any]) -> int:
    """The fleet's size now (DescribeEndpoint): scaled by autoscaling or by hand
    (UpdateEndpointWeightsAndCapacities), it is not the config's InitialInstanceCount any more."""
    live = (existing.get("ProductionVariants") or [{}])[0]
    for key in ("DesiredInstanceCount", "CurrentInstanceCount"):
        if live.get(key) is not None:
            return int(live[key])
    return int(variant.get("InitialInstanceCount", DEFAULT_INSTANCE_COUNT))


def current_settings(
    aws: Aws, existing: dict[str, Any], model_defaults: bool = False
) -> EndpointSettings:
    """The running endpoint's settings: its endpoint config's variant, that model, and the
    live instance count. Refused (DeployError) when they hold what an update cannot carry over,
    or when the model was deleted and `model_defaults` (--model-defaults) does not accept the
    defaults for what it held."""
    endpoint = existing["EndpointName"]
    config = endpoint_config(aws, existing)
    variants = config.get("ProductionVariants", [])
    variant = variants[0] if variants else {}
    uncarried = uncarried_fields("config", config)
    if len(variants) != 1:
        uncarried.insert(0, f"{len(variants)} production variants")
    uncarried += uncarried_fields("variant", variant, "ProductionVariants[0].")
    model = None
    if variant.get("ModelName"):
        model = aws.lookup(
            "sagemaker",
            "describe_model",
            missing=("ValidationException",),
            ModelName=variant["ModelName"],
        )
    else:
        uncarried.append("a variant without ModelName (inference components)")
    container: dict[str, Any] = {}
    model_data_source = None
    if model is not None:
        uncarried += uncarried_fields("model", model)
        container = model.get("PrimaryContainer") or {}
        if container.get("Mode", "SingleModel") != "SingleModel":
            uncarried.append(f"PrimaryContainer.Mode {container['Mode']}")
        uncarried += uncarried_fields("container", container, "PrimaryContainer.")
        model_data_source = container.get("ModelDataSource") or None
        url = container.get("ModelDataUrl")
        if model_data_source is not None and url is not None:
            if model_data_source.get("S3DataSource", {}).get("S3Uri") == url:
                model_data_source = None  # DescribeModel's own account of the ModelDataUrl
            else:
                uncarried.append("PrimaryContainer.ModelDataSource beside a ModelDataUrl")
    if uncarried:
        raise DeployError(
            f"endpoint {endpoint} has settings an update by this script cannot carry over, and "
            f"would drop: {', '.join(uncarried)}; update it with the tool that made it, or deploy "
            "under another --endpoint name"
        )
    if model is None and variant.get("ModelName") and not model_defaults:
        raise DeployError(
            f"model {variant['ModelName']}, which endpoint {endpoint} runs, no longer exists: its "
            "environment, model data, network isolation and VPC settings are unknown; give "
            "those you want (--env, --model-data, --network-isolation) and pass "
            "--model-defaults to take the defaults for the rest"
        )
    carried = no_carried()
    carried["config"] = copied_fields("config", config)
    carried["variant"] = copied_fields("variant", variant)
    if model is not None:
        carried["model"] = copied_fields("model", model)
        carried["container"] = copied_fields("container", container)
    return EndpointSettings(
        image_uri=container.get("Image", "?"),
        role_arn=(model or {}).get("ExecutionRoleArn", "?"),
        instance_type=variant.get("InstanceType", DEFAULT_INSTANCE_TYPE),
        instance_count=live_instance_count(existing, variant),
        startup_timeout=variant.get(
            "ContainerStartupHealthCheckTimeoutInSeconds", DEFAULT_STARTUP_TIMEOUT
        ),
        ami_version=variant.get("InferenceAmiVersion"),
        env=dict(container.get("Environment") or {}),
        model_data=container.get("ModelDataUrl"),
        model_data_source=model_data_source,
        network_isolation=bool((model or {}).get("EnableNetworkIsolation", False)),
        async_config=config.get("AsyncInferenceConfig") or None,
        carried=carried,
        model_known=model is not None,
    )


def resolve_async_config(
    args: argparse.Namespace, current: EndpointSettings | None
) -> dict[str, Any] | None:
    """The endpoint's AsyncInferenceConfig: a new one from --output & co., the current one with
    the given options changed, or None (real-time). An update cannot switch between real-time
    and async: SageMaker endpoints of the two kinds differ in invocation API and scaling."""
    was_async = current is not None and current.async_config is not None
    is_async = was_async if args.async_ is None else args.async_
    if current is not None and is_async != was_async:
        kind, other = ("asynchronous", "real-time") if was_async else ("real-time", "asynchronous")
        raise DeployError(
            f"endpoint {args.endpoint} is {kind}; an update cannot make it {other}: deploy "
            f"the {other} one under another --endpoint name (and delete this one)"
        )
    given = {
        "--output": args.output,
        "--failure-output": args.failure_output,
        "--max-concurrent-invocations": args.max_concurrent_invocations,
    }
    if not is_async:
        if any(value is not None for value in given.values()):
            options = ", ".join(name for name, value in given.items() if value is not None)
            raise DeployError(f"{options}: only for asynchronous endpoints (--async)")
        return None
    if current is None or current.async_config is None:
        return async_inference_config(
            check_s3_uri(args.output or "", "--output"),
            args.failure_output,
            args.max_concurrent_invocations,
        )
    config = json.loads(json.dumps(current.async_config))  # a deep copy to change
    if args.output is not None:
        config.setdefault("OutputConfig", {})["S3OutputPath"] = args.output
    if args.failure_output is not None:
        config.setdefault("OutputConfig", {})["S3FailurePath"] = args.failure_output
    if args.max_concurrent_invocations is not None:
        client = config.setdefault("ClientConfig", {})
        client["MaxConcurrentInvocationsPerInstance"] = args.max_concurrent_invocations
    return config


def resolve_ami(
    args: argparse.Namespace,
    current: EndpointSettings | None,
    instance_type: str,
    known_amis: Sequence[str],
) -> str | None:
    """The variant's InferenceAmiVersion: the given one; else the current one while the instance
    type stays, unless that leaves a GPU fleet on an AMI whose driver the image's CUDA 13.0 torch
    cannot use (any but GPU_AMI_VERSION: the new fleet would serve on the CPUs); else `auto`'s
    choice. `--inference-ami-version default` (or a version by name) keeps another AMI."""
    if args.inference_ami_version is not None:
        return inference_ami_version(instance_type, args.inference_ami_version, known_amis)
    if current is not None and current.instance_type == instance_type:
        if not is_gpu_instance(instance_type) or current.ami_version == GPU_AMI_VERSION:
            return current.ami_version
    return inference_ami_version(instance_type, "auto", known_amis)


def resolve_settings(
    args: argparse.Namespace,
    current: EndpointSettings | None,
    role_arn: str,
    known_amis: Sequence[str],
) -> EndpointSettings:
    """Each setting: the given option, else the current endpoint's (on update), else the
    default; the AMI version as resolve_ami says."""

    def pick(given: Any, kept: Any, default: Any) -> Any:
        if given is not None:
            return given
        return kept if current is not None else default

    instance_type = pick(
        args.instance_type, current and current.instance_type, DEFAULT_INSTANCE_TYPE
    )
    async_config = resolve_async_config(args, current)
    if current is not None:
        env = dict(current.env)
    else:
        env = async_environment() if async_config is not None else {}
    for key, value in env_changes(args.env).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    check_no_api_key(env, carried=True)
    if args.model_data is None:
        model_data = current.model_data if current is not None else None
        model_data_source = current.model_data_source if current is not None else None
    else:  # --model-data '': the image's own model again
        model_data, model_data_source = args.model_data or None, None
    return EndpointSettings(
        image_uri=args.image_uri,
        role_arn=role_arn,
        instance_type=instance_type,
        instance_count=pick(
            args.instance_count, current and current.instance_count, DEFAULT_INSTANCE_COUNT
        ),
        startup_timeout=pick(
            args.startup_timeout, current and current.startup_timeout, DEFAULT_STARTUP_TIMEOUT
        ),
        ami_version=resolve_ami(args, current, instance_type, known_amis),
        env=env,
        model_data=model_data,
        model_data_source=model_data_source,
        network_isolation=pick(
            args.network_isolation, current and current.network_isolation, False
        ),
        async_config=async_config,
        carried=current.carried if current is not None else no_carried(),
    )


def settings_report(current: EndpointSettings, new: EndpointSettings) -> list[str]:
    """One line per setting of an update, `(kept)` or `old -> new`, so that what an update
    changes is visible before it runs; environment values are masked, keys shown. What the
    deleted model held is `unknown`, never `(kept)`."""

    def show(value: Any) -> str:
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, dict):
            return json.dumps(value, sort_keys=True)
        return str(value)

    unknown = object()  # the deleted model's value

    def model_value(value: Any) -> Any:
        return value if current.model_known else unknown

    rows = [
        ("image", model_value(current.image_uri), new.image_uri),
        ("role", model_value(current.role_arn), new.role_arn),
        ("instance type", current.instance_type, new.instance_type),
        ("instance count", current.instance_count, new.instance_count),
        ("startup timeout (s)", current.startup_timeout, new.startup_timeout),
        ("inference AMI version", current.ami_version, new.ami_version),
        (
            "model data",
            model_value(current.model_data or current.model_data_source),
            new.model_data or new.model_data_source,
        ),
        ("network isolation", model_value(current.network_isolation), new.network_isolation),
        ("async config", current.async_config, new.async_config),
    ]
    lines = []
    for label, old, value in rows:
        if old is unknown:
            lines.append(f"  {label}: unknown (model deleted) -> {show(value)}")
        elif old == value:
            lines.append(f"  {label}: {show(old)} (kept)")
        else:
            lines.append(f"  {label}: {show(old)} -> {show(value)}")
    if (
        current.instance_type == new.instance_type
        and is_gpu_instance(new.instance_type)
        and current.ami_version != new.ami_version == GPU_AMI_VERSION
    ):
        lines.append(
            f"    (on {current.ami_version or 'the default AMI'} the image's CUDA 13.0 torch "
            "finds no driver it can use and serves on the CPUs; --inference-ami-version default "
            "or NAME keeps another)"
        )
    for part in PARTS:
        for key, value in new.carried[part].items():
            lines.append(f"  {key}: {show(value)} (kept)")
    for key in sorted(set(current.env) | set(new.env)):
        if not current.model_known:
            change = "set"
        elif key not in new.env:
            change = "removed"
        elif key not in current.env:
            change = "added"
        else:
            change = "kept" if current.env[key] == new.env[key] else "changed"
        lines.append(f"  env {key}={MASK} ({change})")
    return lines


def with_carried(
    model: dict[str, Any], config: dict[str, Any], carried: dict[str, dict[str, Any]]
) -> None:
    """Copy the current model's and config's COPIED_FIELDS into the new requests."""
    model.update(carried["model"])
    model["PrimaryContainer"].update(carried["container"])
    config.update(carried["config"])
    config["ProductionVariants"][0].update(carried["variant"])


# ---- subcommands ----


def scale_to_zero_command(endpoint: str, max_instances: int, backlog_target: float) -> str:
    """The `autoscale` command that gives a new async endpoint its scale-to-zero setup."""
    return (
        f"autoscale --endpoint {endpoint} --min 0 --max {max_instances} "
        f"--backlog-target {backlog_target:g}"
    )


def checked_update(
    aws: Aws,
    args: argparse.Namespace,
    existing: dict[str, Any],
    current: EndpointSettings,
    settings: EndpointSettings,
) -> bool:
    """Report what an update changes, refuse what SageMaker would refuse, and say whether the
    update keeps the variant's live properties (RetainAllVariantProperties: an autoscaled
    fleet keeps the count autoscaling chose)."""
    endpoint = args.endpoint
    print(
        f"update of {endpoint}: options not given keep the values of its current config "
        f"{existing['EndpointConfigName']} and its live instance count:",
        file=sys.stderr,
    )
    print("\n".join(settings_report(current, settings)), file=sys.stderr)
    retain = bool(scaling_targets(aws, endpoint))  # the count autoscaling chose is kept
    if retain:
        if current.instance_type != settings.instance_type:
            raise DeployError(
                f"endpoint {endpoint} autoscales, and SageMaker refuses to change the instance "
                f"type of an autoscaled variant: run `autoscale --endpoint {endpoint} "
                "--disable`, deploy, then `autoscale` again"
            )
        if args.instance_count is not None:
            raise DeployError(
                f"--instance-count: endpoint {endpoint} autoscales, and the update keeps the "
                f"count autoscaling set ({current.instance_count}): change its range with "
                f"`autoscale --endpoint {endpoint} --min N --max M` instead"
            )
    if args.canary_percent is not None and settings.instance_count < 2:
        raise DeployError(
            f"--canary-percent: endpoint {endpoint} would have {settings.instance_count} "
            "instance; a canary is at least one instance and at most half the variant's "
            "instances (CanarySize), so it needs 2 or more: leave --canary-percent out (all "
            "at once, the old fleet serving until the new one passes /ping) or raise "
            "--instance-count"
        )
    return retain


def cmd_deploy(aws: Aws, args: argparse.Namespace) -> None:
    """Create the endpoint, or update it blue/green (new model + config; old fleet serves on).

    An update starts from the endpoint's current settings: an option not given keeps its value.
    """
    check_deploy_options(args)
    known_amis = aws.enum("sagemaker", "ProductionVariantInferenceAmiVersion")
    endpoint = args.endpoint
    role_arn = resolve_role(aws, args.role)
    existing = describe_endpoint(aws, endpoint)
    variant, current = VARIANT, None
    if existing is not None:
        status = existing["EndpointStatus"]
        if status in BUSY_STATES or status == "Failed":
            raise DeployError(
                f"endpoint {endpoint} is {status} "
                + ("(delete it, then deploy again)" if status == "Failed" else "(wait, then retry)")
            )
        variant = existing["ProductionVariants"][0]["VariantName"]  # blue/green needs the same
        current = current_settings(aws, existing, args.model_defaults)
    settings = resolve_settings(args, current, role_arn, known_amis)
    if OLD_GPU_INSTANCE_RE.match(settings.instance_type):
        print(OLD_GPU_WARNING.format(instance_type=settings.instance_type), file=sys.stderr)
    retain = False
    if current is not None:
        retain = checked_update(aws, args, existing, current, settings)
    name = resource_name(endpoint, datetime.now(UTC))
    model = model_request(
        name, settings.image_uri, role_arn, settings.env, settings.network_isolation
    )
    if settings.model_data:
        model = with_model_data(model, settings.model_data)
    if settings.model_data_source:
        model["PrimaryContainer"]["ModelDataSource"] = settings.model_data_source
    config_request = endpoint_config_request(
        name,
        name,
        settings.instance_type,
        max(1, settings.instance_count),  # 0: an async fleet scaled to zero (retained as it is)
        settings.startup_timeout,
        variant,
        settings.ami_version,
    )
    if settings.async_config is not None:
        config_request["AsyncInferenceConfig"] = settings.async_config
    with_carried(model, config_request, settings.carried)
    aws.act("sagemaker", "create_model", **model)
    aws.act("sagemaker", "create_endpoint_config", **config_request)
    deployment = None
    if existing is None:
        aws.act("sagemaker", "create_endpoint", EndpointName=endpoint, EndpointConfigName=name)
    else:
        deployment = blue_green_config(
            args.bake_seconds, args.canary_percent, args.rollback_alarm, settings.startup_timeout
        )
        aws.act(
            "sagemaker",
            "update_endpoint",
            EndpointName=endpoint,
            EndpointConfigName=name,
            RetainAllVariantProperties=retain,
            DeploymentConfig=deployment,
        )
    scale_to_zero = settings.async_config is not None and not retain
    command = scale_to_zero_command(endpoint, args.max_instances, args.backlog_target)
    if args.wait and not aws.dry_run:
        timeout = wait_timeout(settings.startup_timeout, deployment)
        try:
            wait_in_service(aws, endpoint, name, timeout)
        except StillChangingError as error:
            if not scale_to_zero:
                raise
            raise StillChangingError(
                f"{error}; once it is InService, scale it to zero when idle: {command}"
            ) from None
    if scale_to_zero:
        if args.wait:  # scaling needs an endpoint InService; a dry run plans what --wait does
            autoscale_async(aws, endpoint, variant, 0, args.max_instances, args.backlog_target)
        else:
            print(f"once {endpoint} is InService, scale it to zero when idle: {command}")


def cmd_autoscale(aws: Aws, args: argparse.Namespace) -> None:
    """One endpoint is one fleet: target tracking adds and removes instances with the traffic."""
    existing = describe_endpoint(aws, args.endpoint)
    if existing is None:
        raise DeployError(f"endpoint {args.endpoint} not found; deploy it first")
    if args.disable:
        remove_autoscaling(aws, args.endpoint)
        remove_wake_alarm(aws, args.endpoint)
        return
    if endpoint_config(aws, existing).get("AsyncInferenceConfig"):
        check_async_scaling(args.min, args.max, args.backlog_target)
        variant = existing["ProductionVariants"][0]["VariantName"]
        cooldowns = (args.scale_in_cooldown, args.scale_out_cooldown)
        autoscale_async(
            aws, args.endpoint, variant, args.min, args.max, args.backlog_target, cooldowns
        )
        return
    if not 1 <= args.min <= args.max:
        raise DeployError("need 1 <= --min <= --max")
    if args.target <= 0:
        raise DeployError("--target (invocations per instance per minute) must be positive")
    variant = existing["ProductionVariants"][0]["VariantName"]
    rid = scaling_resource_id(args.endpoint, variant)
    aws.act(
        "application-autoscaling",
        "register_scalable_target",
        **scalable_target_request(rid, args.min, args.max),
    )
    aws.act(
        "application-autoscaling",
        "put_scaling_policy",
        **scaling_policy_request(
            rid, args.endpoint, args.target, args.scale_in_cooldown, args.scale_out_cooldown
        ),
    )


def cmd_delete(aws: Aws, args: argparse.Namespace) -> None:
    """Remove everything deploy/autoscale made for `endpoint` (endpoints bill by the hour)."""
    endpoint = args.endpoint
    remove_autoscaling(aws, endpoint)
    remove_wake_alarm(aws, endpoint)
    existing = describe_endpoint(aws, endpoint)
    configs = set()
    if existing is not None:
        aws.act("sagemaker", "delete_endpoint", EndpointName=endpoint)
        configs.add(existing["EndpointConfigName"])
        if not aws.dry_run:  # AWS: don't delete a config while its endpoint still uses it
            waiter = aws.client("sagemaker").get_waiter("endpoint_deleted")
            try:
                waiter.wait(EndpointName=endpoint, WaiterConfig={"Delay": 15, "MaxAttempts": 60})
            except WaiterError as error:
                raise AwsCallError(f"endpoint {endpoint} was not deleted: {error}") from None
    for page in aws.pages("sagemaker", "list_endpoint_configs", NameContains=endpoint):
        configs |= {
            c["EndpointConfigName"]
            for c in page["EndpointConfigs"]
            if owned_by(endpoint, c["EndpointConfigName"])
        }
    models = set()
    for config in sorted(configs):
        found = aws.lookup(
            "sagemaker",
            "describe_endpoint_config",
            missing=("ValidationException",),
            EndpointConfigName=config,
        )
        for variant in (found or {}).get("ProductionVariants", []):
            model = variant.get("ModelName")
            # A config's model may be gone already (deleted by hand): DeleteModel would fail.
            if model and aws.lookup(
                "sagemaker", "describe_model", missing=("ValidationException",), ModelName=model
            ):
                models.add(model)
        aws.act("sagemaker", "delete_endpoint_config", EndpointConfigName=config)
    for page in aws.pages("sagemaker", "list_models", NameContains=endpoint):
        models |= {m["ModelName"] for m in page["Models"] if owned_by(endpoint, m["ModelName"])}
    for model in sorted(models):
        aws.act("sagemaker", "delete_model", ModelName=model)
    if existing is None and not configs and not models:
        print(f"nothing to delete for endpoint {endpoint}")


def cmd_invoke(aws: Aws, args: argparse.Namespace) -> None:
    """Send the seed's request through sagemaker-runtime and print the service's JSON answer."""
    classes = [parse_class(c) for c in args.class_] or SEED_CLASSES
    body = invoke_body(args.image, classes, args.top_k)
    params = {
        "EndpointName": args.endpoint,
        "ContentType": "application/json",
        "Accept": "application/json",
        "Body": body,
    }
    shown = {
        **params,
        "Body": f"<{len(body)} bytes: {len(args.image)} images, {len(classes)} classes>",
    }
    answer = aws.act("sagemaker-runtime", "invoke_endpoint", shown=shown, **params)
    if answer is None:
        return
    text = answer["Body"].read().decode("utf-8", "replace")
    try:
        print(json.dumps(json.loads(text), indent=2))
    except ValueError:
        print(text)


def cmd_push(aws: Aws, args: argparse.Namespace) -> None:
    """SageMaker pulls images from ECR: make sure the repository exists, then docker push."""
    local = args.image if ":" in args.image.rsplit("/", 1)[-1] else f"{args.image}:latest"
    tag = args.tag or local.rpartition(":")[2]
    docker = shutil.which(args.docker)
    if docker is None and not aws.dry_run:
        raise DeployError(f"{args.docker!r} not found on PATH; install Docker or pass --docker")
    found = aws.lookup(
        "ecr",
        "describe_repositories",
        missing=("RepositoryNotFoundException",),
        repositoryNames=[args.repository],
    )
    created = None
    if found is not None:
        uri = found["repositories"][0]["repositoryUri"]
    else:
        created = aws.act(
            "ecr",
            "create_repository",
            repositoryName=args.repository,
            imageScanningConfiguration={"scanOnPush": True},
        )
        if created is not None:
            uri = created["repository"]["repositoryUri"]
        else:  # dry run: the URI the new repository will have
            account = aws.lookup("sts", "get_caller_identity")["Account"]
            uri = f"{account}.dkr.ecr.{aws.session.region_name}.amazonaws.com/{args.repository}"
    remote = f"{uri}:{tag}"
    if aws.dry_run:
        print("[dry-run] ecr.get_authorization_token {}")
        for command in docker_commands(args.docker, "AWS", uri.split("/")[0], local, remote):
            print(f"[dry-run] {' '.join(command)}")
        return
    token = aws.lookup("ecr", "get_authorization_token")["authorizationData"][0]
    user, password, registry = ecr_login(token)
    for command in docker_commands(docker, user, registry, local, remote):
        print("$ " + " ".join(command))
        stdin = password if command[1] == "login" else None  # never on the command line
        if subprocess.run(command, input=stdin, text=True).returncode != 0:
            made = (
                f"; ECR repository {args.repository}, created by this run, is kept for the next "
                "push"
                if created is not None
                else ""
            )
            raise DeployError(f"`docker {command[1]}` failed (see Docker's message above){made}")
    print(f"pushed {remote}")


# ---- Batch Transform and asynchronous inference (issue 14) ----

JOB_NAME_RE = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
S3_URI_RE = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?")
JSONLINES = "application/jsonlines"
# CreateTransformJob: MaxConcurrentTransforms x MaxPayloadInMB must not exceed 100 (MB);
# MaxPayloadInMB is 6 when not given (botocore's documentation of the field).
MAX_TRANSFORM_MB = 100
DEFAULT_MAX_PAYLOAD_MB = 6
MIB = 1024 * 1024
# Seconds SageMaker gives the container beyond its own request deadline (see config.py).
DEADLINE_MARGIN_S = 5
BACKLOG_METRIC = "ApproximateBacklogSizePerInstance"
NO_CAPACITY_METRIC = "HasBacklogWithoutCapacity"


def check_s3_uri(value: str, option: str) -> str:
    if not S3_URI_RE.fullmatch(value):
        raise DeployError(f"{option} {value!r} is not an s3://bucket/prefix URI")
    return value


def check_job_name(value: str) -> str:
    if not JOB_NAME_RE.fullmatch(value):
        raise DeployError(
            f"job name {value!r}: use 1-63 letters, digits and hyphens, starting and ending with a "
            "letter or digit"
        )
    return value


def batch_environment(invocation_timeout_s: int, max_payload_mb: int | None) -> dict[str, str]:
    """The container's settings for a transform job: its deadline and body limit must cover
    what the job sends (a mini-batch of up to MaxPayloadInMB, answered within the timeout)."""
    env = {
        "CLIP_ENDPOINT_KIND": "batch",
        "CLIP_REQUEST_TIMEOUT_S": str(invocation_timeout_s - DEADLINE_MARGIN_S),
    }
    if max_payload_mb is not None:
        env["CLIP_MAX_BODY_BYTES"] = str(max_payload_mb * MIB)
    return env


def transform_job_request(
    name: str,
    model_name: str,
    input_uri: str,
    output_uri: str,
    instance_type: str,
    instance_count: int,
    invocation_timeout_s: int,
    retries: int,
    max_concurrent: int | None,
    max_payload_mb: int | None,
) -> dict[str, Any]:
    """One JSON Lines request per input line, mini-batched (MultiRecord), one answer line each.

    MaxConcurrentTransforms and MaxPayloadInMB are left out unless given: SageMaker then asks the
    container's GET /execution-parameters, which knows its workers and body limit.
    """
    request: dict[str, Any] = {
        "TransformJobName": name,
        "ModelName": model_name,
        "BatchStrategy": "MultiRecord",
        "ModelClientConfig": {
            "InvocationsTimeoutInSeconds": invocation_timeout_s,
            "InvocationsMaxRetries": retries,
        },
        "Environment": batch_environment(invocation_timeout_s, max_payload_mb),
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
            "ContentType": JSONLINES,
            "CompressionType": "None",
            "SplitType": "Line",
        },
        "TransformOutput": {
            "S3OutputPath": output_uri,
            "Accept": JSONLINES,
            "AssembleWith": "Line",
        },
        "TransformResources": {"InstanceType": instance_type, "InstanceCount": instance_count},
    }
    if max_concurrent is not None:
        request["MaxConcurrentTransforms"] = max_concurrent
    if max_payload_mb is not None:
        request["MaxPayloadInMB"] = max_payload_mb
    return request


def async_inference_config(
    output_uri: str, failure_uri: str | None, max_concurrent: int | None
) -> dict[str, Any]:
    """Results (and failures) go to S3; the endpoint queues requests, so it can scale to zero."""
    output: dict[str, Any] = {"S3OutputPath": output_uri}
    if failure_uri:
        output["S3FailurePath"] = failure_uri
    config: dict[str, Any] = {"OutputConfig": output}
    if max_concurrent is not None:
        config["ClientConfig"] = {"MaxConcurrentInvocationsPerInstance": max_concurrent}
    return config


def async_environment() -> dict[str, str]:
    """Async invocations may run 15 minutes and carry up to 1 GB: config.py's `async` kind."""
    return {"CLIP_ENDPOINT_KIND": "async"}


def backlog_policy_request(
    resource_id: str, endpoint: str, target: float, scale_in_cooldown: int, scale_out_cooldown: int
) -> dict[str, Any]:
    """Async endpoints scale on their queue: keep ~`target` queued requests per instance."""
    return {
        "PolicyName": f"{endpoint}-backlog-per-instance",
        "ServiceNamespace": "sagemaker",
        "ResourceId": resource_id,
        "ScalableDimension": SCALABLE_DIMENSION,
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": target,
            "CustomizedMetricSpecification": {
                "MetricName": BACKLOG_METRIC,
                "Namespace": "AWS/SageMaker",
                "Dimensions": [{"Name": "EndpointName", "Value": endpoint}],
                "Statistic": "Average",
            },
            "ScaleInCooldown": scale_in_cooldown,
            "ScaleOutCooldown": scale_out_cooldown,
        },
    }


def wake_policy_request(resource_id: str, endpoint: str) -> dict[str, Any]:
    """At zero instances there is no per-instance backlog to track: one step adds an instance
    when requests wait with no capacity (the alarm below triggers it)."""
    return {
        "PolicyName": f"{endpoint}-wake-from-zero",
        "ServiceNamespace": "sagemaker",
        "ResourceId": resource_id,
        "ScalableDimension": SCALABLE_DIMENSION,
        "PolicyType": "StepScaling",
        "StepScalingPolicyConfiguration": {
            "AdjustmentType": "ChangeInCapacity",
            "MetricAggregationType": "Average",
            "Cooldown": 300,
            "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}],
        },
    }


def wake_alarm_name(endpoint: str) -> str:
    return f"{endpoint}-has-backlog-without-capacity"


def wake_alarm_request(endpoint: str, policy_arn: str) -> dict[str, Any]:
    return {
        "AlarmName": wake_alarm_name(endpoint),
        "AlarmDescription": f"requests queue on {endpoint} while it has no instance",
        "Namespace": "AWS/SageMaker",
        "MetricName": NO_CAPACITY_METRIC,
        "Dimensions": [{"Name": "EndpointName", "Value": endpoint}],
        "Statistic": "Average",
        "Period": 60,
        "EvaluationPeriods": 2,
        "DatapointsToAlarm": 2,
        "Threshold": 1.0,
        "ComparisonOperator": "GreaterThanOrEqualToThreshold",
        "TreatMissingData": "missing",
        "AlarmActions": [policy_arn],
    }


def autoscale_async(
    aws: Aws,
    endpoint: str,
    variant: str,
    min_count: int,
    max_count: int,
    backlog_target: float,
    cooldowns: tuple[int, int] = (300, 60),
) -> None:
    """Scale to zero: min may be 0; the backlog per instance drives scaling, an alarm wakes it.
    The callers check the bounds first (check_async_scaling), before anything is made."""
    rid = scaling_resource_id(endpoint, variant)
    aws.act(
        "application-autoscaling",
        "register_scalable_target",
        **scalable_target_request(rid, min_count, max_count),
    )
    aws.act(
        "application-autoscaling",
        "put_scaling_policy",
        **backlog_policy_request(rid, endpoint, backlog_target, *cooldowns),
    )
    wake = aws.act(
        "application-autoscaling", "put_scaling_policy", **wake_policy_request(rid, endpoint)
    )
    arn = wake["PolicyARN"] if wake else f"<PolicyARN of {endpoint}-wake-from-zero>"
    aws.act("cloudwatch", "put_metric_alarm", **wake_alarm_request(endpoint, arn))


def remove_wake_alarm(aws: Aws, endpoint: str) -> None:
    found = aws.lookup("cloudwatch", "describe_alarms", AlarmNames=[wake_alarm_name(endpoint)])
    if found and found.get("MetricAlarms"):
        aws.act("cloudwatch", "delete_alarms", AlarmNames=[wake_alarm_name(endpoint)])


def s3_has_objects(aws: Aws, uri: str) -> bool:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    found = aws.lookup("s3", "list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return bool((found or {}).get("KeyCount"))


def cmd_batch_transform(aws: Aws, args: argparse.Namespace) -> None:
    """Classify every line of the JSON Lines files under --input into --output (a transform job).

    The model is an existing SageMaker model (--model, e.g. one `deploy` made) or a new one
    made from --image-uri and --role, named after the job.
    """
    now = datetime.now(UTC)
    job = check_job_name(args.job or f"clip-batch-{now:%Y%m%d-%H%M%S}")
    input_uri = check_s3_uri(args.input, "--input")
    output_uri = check_s3_uri(args.output, "--output")
    instance_type = check_instance_type(args.instance_type)
    if args.instance_count < 1:
        raise DeployError("--instance-count must be at least 1")
    if not 60 <= args.invocation_timeout <= 3600:
        raise DeployError("--invocation-timeout must be 60..3600 seconds (SageMaker's range)")
    if args.max_payload_mb is not None and not 1 <= args.max_payload_mb <= 100:
        raise DeployError("--max-payload-mb must be 1..100 (SageMaker's range)")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise DeployError("--max-concurrent must be at least 1")
    if args.max_concurrent is not None:
        # Without --max-payload-mb, MaxPayloadInMB is SageMaker's default (botocore's docs).
        payload = args.max_payload_mb or DEFAULT_MAX_PAYLOAD_MB
        payload_option = (
            f"--max-payload-mb {payload}"
            if args.max_payload_mb
            else f"MaxPayloadInMB {payload} (SageMaker's default without --max-payload-mb)"
        )
        if args.max_concurrent * payload > MAX_TRANSFORM_MB:
            raise DeployError(
                f"--max-concurrent {args.max_concurrent} x {payload_option} is "
                f"{args.max_concurrent * payload} MB; SageMaker allows at most "
                f"{MAX_TRANSFORM_MB} (MaxConcurrentTransforms x MaxPayloadInMB)"
            )
    if not 0 <= args.retries <= 3:
        raise DeployError("--retries must be 0..3")
    if bool(args.model) == bool(args.image_uri):
        raise DeployError("give either --model NAME or --image-uri URI with --role")
    if args.image_uri and not args.role:
        raise DeployError("--image-uri needs --role (the model's execution role)")
    if not s3_has_objects(aws, input_uri):
        raise DeployError(f"no objects under {input_uri}: upload the .jsonl files first")
    earlier = aws.lookup(  # botocore's model names ResourceNotFound; AWS has answered both
        "sagemaker",
        "describe_transform_job",
        missing=("ResourceNotFound", "ValidationException"),
        TransformJobName=job,
    )
    if earlier is not None:  # SageMaker keeps job names for good: a second CreateTransformJob fails
        raise DeployError(
            f"transform job {job} already exists ({earlier.get('TransformJobStatus')}): "
            "job names cannot be reused; pass another --job"
        )
    if is_gpu_instance(instance_type):
        print(BATCH_GPU_WARNING.format(instance_type=instance_type), file=sys.stderr)
    model, made_model = args.model, False
    if args.image_uri:
        role_arn = resolve_role(aws, args.role)
        model = job
        request = model_request(model, args.image_uri, role_arn, {}, args.network_isolation)
        if job_model_exists(aws, request):
            print(f"using model {model}, left by an earlier run of job {job} (same image and role)")
        else:
            aws.act("sagemaker", "create_model", **request)
            made_model = not aws.dry_run
    request = transform_job_request(
        job,
        model,
        input_uri,
        output_uri,
        instance_type,
        args.instance_count,
        args.invocation_timeout,
        args.retries,
        args.max_concurrent,
        args.max_payload_mb,
    )
    try:
        aws.act("sagemaker", "create_transform_job", **request)
    except (AwsCallError, BotoCoreError) as error:
        if made_model:  # made for this job only: don't leave it behind (or block a re-run)
            delete_job_model(aws, model, error)
        raise
    print(f"transform job {job}: {input_uri} -> {output_uri.rstrip('/')}/<file>.out")
    if args.wait and not aws.dry_run:
        wait_transform_job(aws, job)


def error_text(error: Exception) -> str:
    """An error as main() prints it: botocore's own errors with their type's name."""
    return f"{type(error).__name__}: {error}" if isinstance(error, BotoCoreError) else str(error)


def delete_job_model(aws: Aws, model: str, cause: Exception) -> None:
    """Delete the model made for a job whose CreateTransformJob failed (`cause`). If that fails
    too, one error reports both, so the job's failure is not hidden by the clean-up's."""
    try:
        aws.act("sagemaker", "delete_model", ModelName=model)
    except (AwsCallError, BotoCoreError) as cleanup:
        raise AwsCallError(
            f"{error_text(cause)}; and model {model}, made for the job, was not deleted "
            f"({error_text(cleanup)}): delete it with `aws sagemaker delete-model --model-name "
            f"{model}` before a re-run of the job"
        ) from None


def job_model_exists(aws: Aws, request: dict[str, Any]) -> bool:
    """Whether the model a job is to make (named after the job) exists already, as this job's.

    SageMaker refuses a second CreateModel of a name, so a re-run after a failed job reuses its
    model when it is the same (image, model data, role, network isolation); a different model of
    that name is someone else's and is left alone.
    """
    name = request["ModelName"]
    found = aws.lookup(
        "sagemaker", "describe_model", missing=("ValidationException",), ModelName=name
    )
    if found is None:
        return False
    container = found.get("PrimaryContainer", {})
    wanted = request["PrimaryContainer"]
    differences = [
        f"{label} {have!r}, not {want!r}"
        for label, have, want in (
            ("image", container.get("Image"), wanted["Image"]),
            ("model data", container.get("ModelDataUrl"), wanted.get("ModelDataUrl")),
            ("role", found.get("ExecutionRoleArn"), request["ExecutionRoleArn"]),
            (
                "network isolation",
                bool(found.get("EnableNetworkIsolation")),
                request["EnableNetworkIsolation"],
            ),
        )
        if have != want
    ]
    if differences:
        raise DeployError(
            f"a SageMaker model named {name} already exists with {'; '.join(differences)}: pass "
            f"another --job, or --model {name} to run the job on that model"
        )
    return True


def wait_transform_job(aws: Aws, job: str) -> None:
    waiter = aws.client("sagemaker").get_waiter("transform_job_completed_or_stopped")
    try:
        waiter.wait(TransformJobName=job, WaiterConfig={"Delay": 30, "MaxAttempts": 2880})
    except WaiterError:
        pass  # Failed: reported below with its reason
    state = aws.lookup("sagemaker", "describe_transform_job", TransformJobName=job) or {}
    status = state.get("TransformJobStatus", "gone")
    if status != "Completed":
        raise AwsCallError(
            f"transform job {job} is {status}: {state.get('FailureReason', '')}; "
            f"logs: CloudWatch /aws/sagemaker/TransformJobs/{job}"
        )
    print(f"transform job {job} completed")


def add_batch_transform_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    batch = sub.add_parser(
        "batch-transform", parents=[common], help="classify JSON Lines files in S3 (transform job)"
    )
    batch.add_argument("--job", help="transform job name (default clip-batch-<timestamp>)")
    batch.add_argument("--input", required=True, help="s3:// prefix of the .jsonl files")
    batch.add_argument("--output", required=True, help="s3:// prefix for the .out files")
    batch.add_argument("--model", help="existing SageMaker model (e.g. one `deploy` created)")
    batch.add_argument("--image-uri", help="or: make a model of this image (needs --role)")
    batch.add_argument("--role", help="execution role for the model made from --image-uri")
    batch.add_argument("--network-isolation", action="store_true")
    batch.add_argument(
        "--instance-type",
        default=DEFAULT_INSTANCE_TYPE,
        help=f"default {DEFAULT_INSTANCE_TYPE}; e.g. {INSTANCE_TYPE_EXAMPLES}",
    )
    batch.add_argument("--instance-count", type=int, default=1)
    batch.add_argument(
        "--max-concurrent",
        type=int,
        help="MaxConcurrentTransforms (default: the container's /execution-parameters)",
    )
    batch.add_argument(
        "--max-payload-mb",
        type=int,
        help="MaxPayloadInMB, 1..100, and x --max-concurrent at most 100 (default: the "
        "container's /execution-parameters)",
    )
    batch.add_argument(
        "--invocation-timeout",
        type=int,
        default=3600,
        help="seconds per mini-batch, 60..3600 (the container's deadline follows)",
    )
    batch.add_argument("--retries", type=int, default=1, help="retries of a failed mini-batch")
    batch.add_argument("--wait", action="store_true", help="wait until the job ends")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--region", default=argparse.SUPPRESS, help="AWS region")
    common.add_argument(
        "--endpoint-url",
        default=argparse.SUPPRESS,
        help="AWS API endpoint override (default: $AWS_ENDPOINT_URL)",
    )
    common.add_argument(
        "--dry-run",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the plan, change nothing",
    )
    # Shared, SUPPRESS-defaulted options: accepted before or after the subcommand.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    push = sub.add_parser("push", parents=[common], help="push the image to ECR")
    push.add_argument("--image", required=True, help="local image, e.g. clip-bentoml:TAG")
    push.add_argument("--repository", default="clip-bentoml", help="ECR repository name")
    push.add_argument("--tag", help="tag in ECR (default: the local tag)")
    push.add_argument("--docker", default="docker", help="docker executable")

    deploy = sub.add_parser(
        "deploy",
        parents=[common],
        help="create or update the endpoint",
        description="Create the endpoint, or update it blue/green. On update every option not "
        "given keeps the endpoint's current value (the defaults below apply to new endpoints).",
    )
    deploy.add_argument("--endpoint", default="clip")
    deploy.add_argument("--image-uri", required=True, help="ECR image URI (printed by push)")
    deploy.add_argument("--role", required=True, help="SageMaker execution role name or ARN")
    deploy.add_argument(
        "--instance-type",
        help=f"default {DEFAULT_INSTANCE_TYPE}; e.g. {INSTANCE_TYPE_EXAMPLES}",
    )
    deploy.add_argument(
        "--instance-count",
        type=int,
        help=f"default {DEFAULT_INSTANCE_COUNT} (on update: the live count; refused on an "
        "autoscaled endpoint, whose range `autoscale` sets)",
    )
    deploy.add_argument(
        "--inference-ami-version",
        help=f"the hosts' AMI, which sets their NVIDIA driver. auto (default): {GPU_AMI_VERSION} "
        "(driver 580, which the image's CUDA 13.0 torch needs) on GPU instance types, "
        "SageMaker's default on others; default: SageMaker's default; or a version by name "
        "(on update: the current one while the instance type stays, unless that leaves a GPU "
        "instance type without the driver-580 AMI; else auto)",
    )
    deploy.add_argument(
        "--startup-timeout",
        type=int,
        help="ContainerStartupHealthCheckTimeoutInSeconds (60..3600; default "
        f"{DEFAULT_STARTUP_TIMEOUT})",
    )
    deploy.add_argument(
        "--env",
        action="append",
        default=[],
        help="KEY=VALUE for the container; on update merged into the current environment, "
        "and KEY= (empty) removes KEY",
    )
    deploy.add_argument(
        "--model-data",
        help="s3://BUCKET/KEY/model.tar.gz: a CLIP checkpoint (save_pretrained) to serve "
        "instead of the image's model; SageMaker extracts it into /opt/ml/model "
        "(on update, '' goes back to the image's model)",
    )
    deploy.add_argument(
        "--network-isolation",
        action=argparse.BooleanOptionalAction,
        help="no outbound network: images must be sent as base64 (default off)",
    )
    deploy.add_argument(
        "--bake-seconds",
        type=int,
        default=300,
        help="update: how long the old fleet stays after the switch",
    )
    deploy.add_argument(
        "--canary-percent",
        type=int,
        help="update: canary share of capacity, 1..50 (needs 2 or more instances)",
    )
    deploy.add_argument(
        "--rollback-alarm",
        action="append",
        default=[],
        help="update: CloudWatch alarm that rolls the update back",
    )
    deploy.add_argument(
        "--model-defaults",
        action="store_true",
        help="update of an endpoint whose model was deleted: take the defaults for what that "
        "model held (environment, model data, network isolation, VPC) where not given, instead "
        "of refusing",
    )
    deploy.add_argument("--wait", action="store_true", help="wait until InService")
    deploy.add_argument(
        "--async",
        dest="async_",
        action=argparse.BooleanOptionalAction,
        help="asynchronous endpoint: answers go to --output in S3; scales to zero (an update "
        "keeps the endpoint's kind)",
    )
    deploy.add_argument("--output", help="async: s3:// prefix for the answers")
    deploy.add_argument("--failure-output", help="async: s3:// prefix for failed requests")
    deploy.add_argument(
        "--max-concurrent-invocations", type=int, help="async: requests per instance at once"
    )
    deploy.add_argument(
        "--max-instances", type=int, default=2, help="async: autoscaling maximum (minimum 0)"
    )
    deploy.add_argument(
        "--backlog-target", type=float, default=5.0, help="async: queued requests per instance"
    )

    scale = sub.add_parser("autoscale", parents=[common], help="target-tracking autoscaling")
    scale.add_argument("--endpoint", default="clip")
    scale.add_argument("--min", type=int, default=1)
    scale.add_argument("--max", type=int, default=4)
    scale.add_argument(
        "--target", type=float, default=100.0, help="invocations per instance per minute to hold"
    )
    scale.add_argument("--scale-in-cooldown", type=int, default=300)
    scale.add_argument("--scale-out-cooldown", type=int, default=60)
    scale.add_argument("--disable", action="store_true", help="remove the policy and target")
    scale.add_argument(
        "--backlog-target",
        type=float,
        default=5.0,
        help="async endpoints (--min may be 0): queued requests per instance to hold",
    )

    delete = sub.add_parser("delete", parents=[common], help="delete endpoint, configs, models")
    delete.add_argument("--endpoint", default="clip")

    invoke = sub.add_parser("invoke", parents=[common], help="send the seed's request")
    invoke.add_argument("--endpoint", default="clip")
    invoke.add_argument("--image", action="append", required=True, help="file, URL or data: URI")
    invoke.add_argument(
        "--class",
        dest="class_",
        action="append",
        default=[],
        help="NAME=FLAG (default: the seed's six classes)",
    )
    invoke.add_argument("--top-k", type=int)
    add_batch_transform_parser(sub, common)
    return parser


COMMANDS = {
    "push": cmd_push,
    "deploy": cmd_deploy,
    "autoscale": cmd_autoscale,
    "delete": cmd_delete,
    "invoke": cmd_invoke,
    "batch-transform": cmd_batch_transform,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    endpoint_url = getattr(args, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
    try:
        aws = Aws(getattr(args, "region", None), endpoint_url, getattr(args, "dry_run", False))
        COMMANDS[args.command](aws, args)
    except DeployError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except AwsCallError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except StillChangingError as error:  # not an error (yet): a different line and status
        print(f"warning: {error}", file=sys.stderr)
        return 3
    except BotoCoreError as error:  # no credentials, endpoint unreachable, bad parameters
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
