"""Asynchronous inference (issue 14): the endpoint's AsyncInferenceConfig and environment, and
its scale-to-zero autoscaling (backlog target tracking; a step and an alarm wake it from zero)."""

from __future__ import annotations

from typing import Any

from sagemaker_deploy.aws import Aws
from sagemaker_deploy.builders import (
    SCALABLE_DIMENSION,
    scalable_target_request,
    scaling_resource_id,
)
from sagemaker_deploy.errors import DeployError

BACKLOG_METRIC = "ApproximateBacklogSizePerInstance"
NO_CAPACITY_METRIC = "HasBacklogWithoutCapacity"


def check_async_scaling(min_count: int, max_count: int, backlog_target: float) -> None:
    """Async autoscaling's bounds: checked before anything is created, not after the wait."""
    if not 0 <= min_count <= max_count or max_count < 1:
        raise DeployError("need 0 <= --min <= --max and --max >= 1 (--max-instances for deploy)")
    if backlog_target <= 0:
        raise DeployError("--backlog-target (queued requests per instance) must be positive")


def scale_to_zero_command(endpoint: str, max_instances: int, backlog_target: float) -> str:
    """The `autoscale` command that gives a new async endpoint its scale-to-zero setup."""
    return (
        f"autoscale --endpoint {endpoint} --min 0 --max {max_instances} "
        f"--backlog-target {backlog_target:g}"
    )


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
