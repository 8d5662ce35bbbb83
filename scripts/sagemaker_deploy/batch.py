"""Batch Transform (issue 14): `batch-transform` classifies JSON Lines files in S3 with a
transform job: its checks and request, the model made for it, the wait, and its options."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, WaiterError

from sagemaker_deploy.aws import Aws, resolve_role, undo
from sagemaker_deploy.builders import (
    DEFAULT_INSTANCE_TYPE,
    INSTANCE_TYPE_EXAMPLES,
    check_instance_type,
    check_s3_uri,
    is_gpu_instance,
    model_request,
)
from sagemaker_deploy.errors import AwsCallError, DeployError

JOB_NAME_RE = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
JSONLINES = "application/jsonlines"
# CreateTransformJob: MaxConcurrentTransforms x MaxPayloadInMB must not exceed 100 (MB);
# MaxPayloadInMB is 6 when not given (botocore's documentation of the field).
MAX_TRANSFORM_MB = 100
DEFAULT_MAX_PAYLOAD_MB = 6
MIB = 1024 * 1024
# Seconds SageMaker gives the container beyond its own request deadline (see config.py).
DEADLINE_MARGIN_S = 5
# Batch transform hosts (TransformResources.TransformAmiVersion) carry drivers 470 or 535 only.
BATCH_GPU_WARNING = (
    "warning: {instance_type} is a GPU instance, but SageMaker's batch transform hosts carry "
    "NVIDIA drivers up to 535 (CUDA 12.2), and the image's PyPI torch is a CUDA 13.0 build "
    "that needs 580: the job will run on the CPUs unless the image's torch is built for CUDA 12 "
    "(README, 'Deploy to SageMaker')"
)


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


def delete_job_model(aws: Aws, model: str, cause: Exception) -> None:
    """Delete the model made for a job whose CreateTransformJob failed (`cause`), or say both
    failures (`aws.undo`), and how to delete it before a re-run of the job."""
    undo(aws, [("model", model)], cause, "the job")


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
