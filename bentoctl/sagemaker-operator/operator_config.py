"""bentoctl reads this file when the operator is installed and on every command: its name, the
module that does the work, and the schema of a deployment config's `spec` (cerberus rules).

    bentoctl operator install bentoctl/sagemaker-operator     # from the repository root

Every key mirrors an option of scripts/deploy_sagemaker.py, so both paths make the same
endpoint (README, "bentoctl").
"""

from clip_sagemaker.bentoml_compat import read_bentoml_14_bentos

OPERATOR_NAME = "clip-sagemaker"
OPERATOR_MODULE = "clip_sagemaker"
OPERATOR_DEFAULT_TEMPLATE = "terraform"
OPERATOR_AVAILABLE_TEMPLATES = ["terraform"]

OPERATOR_SCHEMA = {
    "region": {
        "type": "string",
        "required": True,
        "default": "us-east-1",
        "help_message": "AWS region of the endpoint and the ECR repository",
    },
    "execution_role_arn": {
        "type": "string",
        "required": True,
        "regex": r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+",
        "help_message": "ARN of the role SageMaker assumes (pulls the image, writes logs)",
    },
    "instance_type": {
        "type": "string",
        "default": "ml.m5.xlarge",
        "regex": r"ml\.[a-z][a-z0-9-]*\.(\d*xlarge|large|medium|small|micro)",
        "help_message": "e.g. ml.m5.xlarge, ml.c5.2xlarge (CPU); ml.g4dn.xlarge, ml.g5.xlarge",
    },
    "initial_instance_count": {"type": "integer", "default": 1, "min": 1},
    "inference_ami_version": {
        "type": "string",
        "default": "auto",
        "regex": r"auto|default|[a-z0-9][a-z0-9-]+",
        "help_message": "the hosts' AMI (their NVIDIA driver): auto picks the driver-580 one the "
        "image's CUDA 13.0 torch needs on GPU instance types; default: SageMaker's; or a name",
    },
    "startup_timeout": {
        "type": "integer",
        "default": 600,
        "min": 60,
        "max": 3600,
        "help_message": "seconds SageMaker waits for /ping after starting the container",
    },
    "network_isolation": {"type": "boolean", "default": False},
    "model_data_url": {
        "type": "string",
        "nullable": True,
        "default": None,
        "regex": r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+\.tar\.gz",
        "help_message": "s3://.../model.tar.gz: a CLIP checkpoint served instead of the image's",
    },
    "bake_seconds": {"type": "integer", "default": 300, "min": 0, "max": 3600},
    "autoscaling_min_instances": {
        "type": "integer",
        "default": 0,
        "min": 0,
        "help_message": "0: no autoscaling",
    },
    "autoscaling_max_instances": {"type": "integer", "default": 4, "min": 1},
    "autoscaling_target": {
        "type": "number",
        "default": 100.0,
        "min": 0.001,
        "help_message": "invocations per instance per minute to hold",
    },
    "autoscaling_scale_in_cooldown": {"type": "integer", "default": 300, "min": 0},
    "autoscaling_scale_out_cooldown": {"type": "integer", "default": 60, "min": 0},
    "image_tag": {
        "type": "string",
        "nullable": True,
        "default": None,
        "help_message": "the image in ECR; `bentoctl build` sets it after the push",
    },
}

# bentoctl 0.4.0 reads bentos the way BentoML 1.0 wrote them; this file is the first part of the
# operator bentoctl imports (before it reads a bento), so the BentoML 1.4 reader goes in here.
read_bentoml_14_bentos()
