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
import os
import sys
from collections.abc import Sequence

from botocore.exceptions import BotoCoreError

# The code is in scripts/sagemaker_deploy/, one job a module: Python puts this file's folder,
# scripts/, first on sys.path.
from sagemaker_deploy.aws import Aws
from sagemaker_deploy.batch import add_batch_transform_parser, cmd_batch_transform
from sagemaker_deploy.builders import (
    DEFAULT_INSTANCE_COUNT,
    DEFAULT_INSTANCE_TYPE,
    DEFAULT_STARTUP_TIMEOUT,
    GPU_AMI_VERSION,
    INSTANCE_TYPE_EXAMPLES,
)
from sagemaker_deploy.commands import cmd_autoscale, cmd_delete, cmd_deploy, cmd_invoke, cmd_push
from sagemaker_deploy.errors import AwsCallError, DeployError, StillChangingError


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
    except KeyboardInterrupt:  # AWS goes on with what it was asked (had been a traceback)
        print(f"interrupted: {interrupted_note(args)}", file=sys.stderr)
        return 130
    return 0


def interrupted_note(args: argparse.Namespace) -> str:
    """What an interrupted command leaves: whatever it had made, and an endpoint it had asked
    for goes on being created (and billed) without the rest of the command (scale to zero)."""
    endpoint = getattr(args, "endpoint", None)
    if args.command in ("deploy", "autoscale") and endpoint:
        return (
            f"what this run had made stays, and endpoint {endpoint} may still be changing (and "
            f"billing): see it with `aws sagemaker describe-endpoint --endpoint-name {endpoint}`, "
            "run the command again once it is InService, or remove everything with "
            f"`python scripts/deploy_sagemaker.py delete --endpoint {endpoint}`"
        )
    if args.command == "batch-transform":
        return (
            "a transform job it had started goes on: see `aws sagemaker list-transform-jobs`, "
            "and stop it with `aws sagemaker stop-transform-job`"
        )
    return "nothing is rolled back; run the command again"


if __name__ == "__main__":
    sys.exit(main())
