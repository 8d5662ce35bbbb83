"""deploy: what an endpoint runs, and what an update keeps.

deploy's options checked before any call; the running endpoint's settings read back
(current_settings); the new ones resolved from the options and those (resolve_settings); and,
before an update, the report of what changes and the checks SageMaker would otherwise fail.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from sagemaker_deploy.async_inference import (
    async_environment,
    async_inference_config,
    check_async_scaling,
)
from sagemaker_deploy.aws import Aws, scaling_targets
from sagemaker_deploy.builders import (
    DEFAULT_INSTANCE_COUNT,
    DEFAULT_INSTANCE_TYPE,
    DEFAULT_STARTUP_TIMEOUT,
    GPU_AMI_VERSION,
    MASK,
    check_endpoint_name,
    check_instance_type,
    check_model_data,
    check_s3_uri,
    inference_ami_version,
    is_gpu_instance,
)
from sagemaker_deploy.errors import DeployError

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
