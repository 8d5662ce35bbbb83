"""`bentoctl generate`: main.tf (model, endpoint config, endpoint, autoscaling) and its values.

main.tf is a fixed file; everything that varies goes into bentoctl.tfvars, written from the
validated deployment config, so `terraform plan -var-file=bentoctl.tfvars` shows every value.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from bentoctl.exceptions import InvalidDeploymentConfig

TEMPLATE = Path(__file__).parent / "templates" / "main.tf"
VALUES_FILE = "bentoctl.tfvars"
# The endpoint name, and models/configs named `<name>-<12 hex>` (SageMaker allows 63 characters);
# bentoctl names the ECR repository after it too, which takes lower case and 2 characters or more.
NAME_RE = re.compile(r"[a-z0-9](-*[a-z0-9]){1,49}")
# A key no SageMaker invocation can send (README, "An optional API key"): every call a 401.
API_KEY_VARIABLE = "CLIP_API_KEY"
# As scripts/deploy_sagemaker.py picks it (the tests hold the two to the same answers): on GPU
# instance types the AMI whose NVIDIA driver (580) the image's CUDA 13.0 torch needs.
GPU_INSTANCE_RE = re.compile(r"ml\.[gp]\d")
GPU_AMI_VERSION = "al2023-ami-sagemaker-inference-gpu-4-1"


def inference_ami_version(instance_type: str, choice: str) -> str | None:
    """`auto`: GPU_AMI_VERSION on GPU instance types, none (SageMaker's default) on others;
    `default`: none; else the name as given (AWS checks it at apply)."""
    if choice == "auto":
        return GPU_AMI_VERSION if GPU_INSTANCE_RE.match(instance_type) else None
    return None if choice == "default" else choice


def hcl_value(value: Any) -> str:
    """A Python value as an HCL literal (strings escape `${` and `%{`: no interpolation)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value).replace("${", "$${").replace("%{", "%%{")
    if isinstance(value, dict):
        if not value:
            return "{}"
        keys = {k: hcl_value(str(k)) for k in value}
        width = max(len(key) for key in keys.values())
        items = "".join(f"  {keys[k]:<{width}} = {hcl_value(v)}\n" for k, v in value.items())
        return "{\n" + items + "}"
    raise TypeError(f"no HCL literal for {type(value).__name__}")


def terraform_values(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """main.tf's variables from the deployment name and its validated spec."""
    if not NAME_RE.fullmatch(name):
        raise InvalidDeploymentConfig(
            f"name {name!r}: use 2-50 lower-case letters, digits and hyphens, starting and ending "
            "with a letter or digit (it names the endpoint and the ECR repository, which takes "
            "no upper case; models and configs add 13 characters)"
        )
    if str((spec.get("env") or {}).get(API_KEY_VARIABLE) or "").strip():  # blank: no key
        raise InvalidDeploymentConfig(
            f"env: {API_KEY_VARIABLE} would make every invocation a 401 while /ping stays 200: "
            "SageMaker's InvokeEndpoint sends no Authorization header (SageMaker endpoints rely "
            "on IAM)"
        )
    if spec["autoscaling_min_instances"] > spec["autoscaling_max_instances"]:
        raise InvalidDeploymentConfig(
            "autoscaling_min_instances must not exceed autoscaling_max_instances"
        )
    return {
        "deployment_name": name,
        "region": spec["region"],
        "image_tag": spec.get("image_tag") or "",
        "execution_role_arn": spec["execution_role_arn"],
        "instance_type": spec["instance_type"],
        "initial_instance_count": spec["initial_instance_count"],
        "inference_ami_version": inference_ami_version(
            spec["instance_type"], spec["inference_ami_version"]
        ),
        "startup_timeout": spec["startup_timeout"],
        "network_isolation": spec["network_isolation"],
        "model_data_url": spec.get("model_data_url"),
        "env": spec.get("env") or {},
        "bake_seconds": spec["bake_seconds"],
        "autoscaling_min_instances": spec["autoscaling_min_instances"],
        "autoscaling_max_instances": spec["autoscaling_max_instances"],
        "autoscaling_target": float(spec["autoscaling_target"]),
        "autoscaling_scale_in_cooldown": spec["autoscaling_scale_in_cooldown"],
        "autoscaling_scale_out_cooldown": spec["autoscaling_scale_out_cooldown"],
    }


def tfvars_text(values: dict[str, Any]) -> str:
    lines = ["# Written by `bentoctl generate` / `bentoctl build` (operator clip-sagemaker)."]
    if not values["image_tag"]:
        lines.append("# image_tag is empty until `bentoctl build` pushes the image (or set it).")
    # Laid out as `terraform fmt` writes it: the one-line values aligned, then the maps.
    scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
    width = max(len(key) for key in scalars)
    lines += [f"{key:<{width}} = {hcl_value(value)}" for key, value in scalars.items()]
    lines += [f"{k} = {hcl_value(v)}" for k, v in values.items() if isinstance(v, dict)]
    return "\n".join(lines) + "\n"


def generate(
    name: str,
    spec: dict[str, Any],
    template_type: str,
    destination_dir: str,
    values_only: bool = True,
) -> list[str]:
    """Write main.tf (unless `values_only`) and bentoctl.tfvars; return their paths."""
    if template_type != "terraform":
        raise InvalidDeploymentConfig(f"template {template_type!r}: only terraform is supported")
    destination = Path(destination_dir)
    values = destination / VALUES_FILE
    values.write_text(tfvars_text(terraform_values(name, spec)), encoding="utf-8")
    if values_only:
        return [str(values)]
    main = destination / TEMPLATE.name
    shutil.copyfile(TEMPLATE, main)
    return [str(main), str(values)]
