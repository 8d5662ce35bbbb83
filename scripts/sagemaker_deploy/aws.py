"""boto3 at the edge: the `Aws` wrapper (the dry-run switch, one-line errors) and the lookups,
clean-ups and waits the subcommands share."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.validate import validate_parameters

from sagemaker_deploy.builders import MASK, ROLE_ARN_RE, SCALABLE_DIMENSION, role_name
from sagemaker_deploy.errors import AwsCallError, DeployError, StillChangingError

# What --wait allows beyond SageMaker's own time limits: instances to be found and provisioned,
# the image pulled, the old fleet drained.
PROVISIONING_MARGIN_S = 1800
# States in which `--wait` running out of time says nothing about success or failure.
STILL_CHANGING = {"Creating", "Updating", "SystemUpdating", "RollingBack"}


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


def one_line(message: str, limit: int = 400) -> str:
    """AWS messages are one line, but proxies and emulators may answer an HTML page."""
    text = " ".join(re.sub(r"<[^>]*>", " ", message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Aws:
    """boto3 clients plus the dry-run switch: `lookup` always runs, `act` only when not dry."""

    def __init__(self, region: str | None, endpoint_url: str | None, dry_run: bool) -> None:
        # As the AWS CLI: --region, then AWS_REGION, then AWS_DEFAULT_REGION (boto3's own); an
        # empty AWS_REGION is no region (it had hidden AWS_DEFAULT_REGION).
        chosen = region or os.environ.get("AWS_REGION") or None
        self.session = boto3.session.Session(region_name=chosen)
        if not self.session.region_name:
            raise DeployError(
                "no AWS region: pass --region or set AWS_REGION or AWS_DEFAULT_REGION"
            )
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


def arn_account(arn: str) -> str:
    """`arn:aws:iam::123456789012:role/x` -> `123456789012` (with its partition, which an
    account's ARNs share)."""
    parts = arn.split(":")
    return f"{parts[1]}:{parts[4]}" if len(parts) > 4 else ""


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
            f"IAM role {role!r} not found in the account you deploy into; create one with "
            "AmazonSageMakerFullAccess (or the narrower policy in README.md, 'Deploy to "
            "SageMaker'), trusted by sagemaker.amazonaws.com, and pass its name or ARN with --role"
        )
    arn = found["Role"]["Arn"]
    # The name alone was looked up, in the account deployed into: an ARN of another account had
    # become this account's role of that name. (Of this account, IAM's own ARN is used: the
    # path `service-role/` left out, or the name in another case, name the same role.)
    if ROLE_ARN_RE.fullmatch(role) and arn_account(role) != arn_account(arn):
        raise DeployError(
            f"--role {role} is not a role of the account you deploy into: its role {name} is "
            f"{arn}. SageMaker runs an endpoint with a role of its own account; pass that one "
            "(or deploy with the other account's credentials)"
        )
    if "sagemaker.amazonaws.com" not in json.dumps(found["Role"].get("AssumeRolePolicyDocument")):
        print(
            f"warning: role {name} does not trust sagemaker.amazonaws.com; SageMaker cannot use it"
        )
    return arn


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


def error_text(error: Exception) -> str:
    """An error as main() prints it: botocore's own errors with their type's name."""
    return f"{type(error).__name__}: {error}" if isinstance(error, BotoCoreError) else str(error)


# What deletes each kind of resource a command makes: (operation, its name field, the AWS CLI).
DELETES = {
    "model": ("delete_model", "ModelName", "delete-model --model-name"),
    "endpoint config": (
        "delete_endpoint_config",
        "EndpointConfigName",
        "delete-endpoint-config --endpoint-config-name",
    ),
}


def undo(aws: Aws, made: list[tuple[str, str]], cause: Exception, purpose: str) -> None:
    """Delete what a command made, newest first, after a later call of it failed (`cause`): the
    failed deploy of a new endpoint had left its model and config, named nowhere. If a delete
    fails too, one error reports both, so the command's failure is not hidden by the clean-up's.
    `made`: (kind, name) pairs of `DELETES`' kinds."""
    left = []
    for kind, name in reversed(made):
        operation, field, cli = DELETES[kind]
        try:
            aws.act("sagemaker", operation, **{field: name})
        except (AwsCallError, BotoCoreError) as cleanup:
            left.append(
                f"{kind} {name}, made for {purpose}, was not deleted ({error_text(cleanup)}): "
                f"delete it with `aws sagemaker {cli} {name}`"
            )
    if left:
        raise AwsCallError(f"{error_text(cause)}; and {'; and '.join(left)}") from None


# Seconds between two looks at an endpoint that is still changing.
POLL_S = 15


def wait_in_service(aws: Aws, endpoint: str, config: str, timeout_s: int) -> None:
    """Wait for InService, then check it runs `config`: a rolled-back update is InService too.
    Any state but a changing one ends the wait: botocore's waiter failed only on `Failed`, and
    polled an `UpdateRollbackFailed` or `OutOfService` endpoint for the whole timeout (an hour
    for an update) before saying why."""
    print(f"waiting for {endpoint} to be InService (up to {timeout_s} s)...")
    logs = f"logs: CloudWatch /aws/sagemaker/Endpoints/{endpoint}"
    deadline = time.monotonic() + timeout_s
    while True:
        state = describe_endpoint(aws, endpoint) or {}
        status = state.get("EndpointStatus", "gone")
        if status not in STILL_CHANGING or time.monotonic() + POLL_S > deadline:
            break
        time.sleep(POLL_S)
    if status in STILL_CHANGING:  # out of time, not failed: SageMaker is still at it
        raise StillChangingError(
            f"endpoint {endpoint} is still {status} after {timeout_s} s (not failed): check "
            f"again with `aws sagemaker describe-endpoint --endpoint-name {endpoint}`; {logs}"
        )
    if status != "InService":
        reason = state.get("FailureReason") or "SageMaker gave no reason; see the endpoint's events"
        raise AwsCallError(f"endpoint {endpoint} is {status}: {reason}; {logs}")
    running = state.get("EndpointConfigName")
    if running != config:
        reason = state.get("FailureReason") or "SageMaker gave no reason; see the endpoint's events"
        reason = reason.rstrip(". ")
        raise AwsCallError(
            f"endpoint {endpoint} is InService on {running}, not {config}: the update was rolled "
            f"back: {reason}; {logs}"
        )
    print(f"{endpoint} is InService on {config}")
