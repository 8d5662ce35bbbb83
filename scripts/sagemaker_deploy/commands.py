"""The subcommands push, deploy, autoscale, delete and invoke (batch-transform: batch.py)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime

from botocore.exceptions import BotoCoreError, WaiterError

from clip_runner.web.schemas import SEED_CLASSES
from sagemaker_deploy.async_inference import (
    autoscale_async,
    check_async_scaling,
    remove_wake_alarm,
    scale_to_zero_command,
)
from sagemaker_deploy.aws import (
    Aws,
    describe_endpoint,
    remove_autoscaling,
    resolve_role,
    undo,
    wait_in_service,
    wait_timeout,
)
from sagemaker_deploy.builders import (
    VARIANT,
    blue_green_config,
    docker_commands,
    ecr_login,
    endpoint_config_request,
    invoke_body,
    model_request,
    owned_by,
    parse_class,
    resource_name,
    scalable_target_request,
    scaling_policy_request,
    scaling_resource_id,
    with_model_data,
)
from sagemaker_deploy.errors import AwsCallError, DeployError, StillChangingError
from sagemaker_deploy.settings import (
    check_deploy_options,
    checked_update,
    current_settings,
    endpoint_config,
    resolve_settings,
    with_carried,
)

BUSY_STATES = {"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"}
# GPU families older than Turing (ml.p2: K80; ml.p3, ml.p3dn: V100), for which a CUDA 13 build
# of torch holds no code: the runner serves on the CPUs there (its log says why).
OLD_GPU_INSTANCE_RE = re.compile(r"ml\.p[23]")
OLD_GPU_WARNING = (
    "warning: {instance_type}'s GPUs (K80 on ml.p2, V100 on ml.p3) are older than any the "
    "image's CUDA 13.0 torch runs on: the endpoint will serve on the CPUs. Pick ml.g4dn (T4) or "
    "newer, or an image whose torch is built for them (README, 'Deploy to SageMaker')"
)


# Arm (Graviton, Grace) instances: the image is built for x86-64, and fails there with "exec
# format error" once the start-up timeout runs out. Inferentia and Trainium: their accelerators
# are not used, the endpoint serves on their CPUs.
ARM_INSTANCE_RE = re.compile(r"ml\.([a-z]+\d+g[a-z]*|p6e-gb\d+)\.")
ARM_WARNING = (
    "warning: {instance_type} is an Arm instance; the image is built for x86-64 (README, "
    "'Deploy to SageMaker') and will not start there unless you built it for arm64"
)
NEURON_INSTANCE_RE = re.compile(r"ml\.(inf|trn)\d")
NEURON_WARNING = (
    "warning: {instance_type}'s Inferentia or Trainium chips are not used: the endpoint serves "
    "on its CPUs (a CPU instance costs less)"
)
INSTANCE_WARNINGS = (
    (OLD_GPU_INSTANCE_RE, OLD_GPU_WARNING),
    (ARM_INSTANCE_RE, ARM_WARNING),
    (NEURON_INSTANCE_RE, NEURON_WARNING),
)
# An ECR image's region, which SageMaker requires to be the endpoint's.
ECR_IMAGE_RE = re.compile(r"\d{12}\.dkr\.ecr(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/")


def check_image_region(image_uri: str, region: str) -> None:
    """An ECR image in another region than the endpoint's: SageMaker refuses the model (its
    ContainerDefinition takes an image of the model's own region), after this run had made
    nothing yet; said here, with the fix."""
    found = ECR_IMAGE_RE.match(image_uri)
    if found and found.group(1) != region:
        raise DeployError(
            f"--image-uri is in ECR's {found.group(1)}, the endpoint would be in {region}: "
            f"SageMaker takes an image of its own region; push it to {region} (`push --region "
            f"{region}`) or deploy with --region {found.group(1)}"
        )


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
    check_image_region(settings.image_uri, aws.session.region_name)
    for pattern, warning in INSTANCE_WARNINGS:
        if pattern.match(settings.instance_type):
            print(warning.format(instance_type=settings.instance_type), file=sys.stderr)
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
    deployment = None
    if existing is not None:
        deployment = blue_green_config(
            args.bake_seconds, args.canary_percent, args.rollback_alarm, settings.startup_timeout
        )
    made: list[tuple[str, str]] = []
    try:
        aws.act("sagemaker", "create_model", **model)
        made.append(("model", name))
        aws.act("sagemaker", "create_endpoint_config", **config_request)
        made.append(("endpoint config", name))
        if existing is None:
            aws.act("sagemaker", "create_endpoint", EndpointName=endpoint, EndpointConfigName=name)
        else:
            aws.act(
                "sagemaker",
                "update_endpoint",
                EndpointName=endpoint,
                EndpointConfigName=name,
                RetainAllVariantProperties=retain,
                DeploymentConfig=deployment,
            )
    except (AwsCallError, BotoCoreError) as error:  # a quota, an instance type: nothing runs
        undo(aws, made, error, "this deploy")
        raise
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
        if found is not None:  # the endpoint's config may be gone already (deleted by hand)
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
