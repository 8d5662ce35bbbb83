"""`bentoctl build`'s push target: an ECR repository (SageMaker pulls images from ECR only).

boto3's default credential chain and region settings apply; AWS_ENDPOINT_URL points it
elsewhere (the tests use moto's server).
"""

from __future__ import annotations

import base64
from typing import Any

import boto3
from bentoctl.exceptions import BentoctlException
from botocore.exceptions import ClientError


def _ecr(spec: dict[str, Any]) -> Any:
    return boto3.client("ecr", region_name=spec["region"])


def create_repository(repository_name: str, operator_spec: dict[str, Any]) -> tuple[str, str, str]:
    """The repository's URI (created when missing) and a docker login for it."""
    ecr = _ecr(operator_spec)
    try:
        try:
            found = ecr.describe_repositories(repositoryNames=[repository_name])
            uri = found["repositories"][0]["repositoryUri"]
        except ecr.exceptions.RepositoryNotFoundException:
            created = ecr.create_repository(
                repositoryName=repository_name,
                imageScanningConfiguration={"scanOnPush": True},
            )
            uri = created["repository"]["repositoryUri"]
        token = ecr.get_authorization_token()["authorizationData"][0]
    except Exception as exc:  # botocore's errors: no credentials, access denied, unreachable
        raise BentoctlException(f"ECR repository {repository_name}: {exc}") from None
    user, _, password = base64.b64decode(token["authorizationToken"]).decode().partition(":")
    return uri, user, password


def endpoint_status(endpoint_name: str, operator_spec: dict[str, Any]) -> str | None:
    """The SageMaker endpoint's status, or None when there is no endpoint of that name."""
    sagemaker = boto3.client("sagemaker", region_name=operator_spec["region"])
    try:
        return sagemaker.describe_endpoint(EndpointName=endpoint_name)["EndpointStatus"]
    except ClientError as exc:
        message = str(exc.response.get("Error", {}).get("Message", ""))
        if exc.response.get("Error", {}).get("Code") == "ValidationException" and (
            "Could not find endpoint" in message
        ):
            return None
        raise


def delete_repository(repository_name: str, operator_spec: dict[str, Any]) -> None:
    """`bentoctl destroy`: the repository and its images, unless the endpoint still exists.

    bentoctl 0.4.0 calls this after `terraform destroy` whatever became of it: after a failed
    destroy, or a "no" at Terraform's prompt, the endpoint still runs the repository's image,
    and deleting the image would leave it unable to start new instances (scaling out, replacing
    a failed host). bentoctl names the repository and the endpoint after the deployment, so the
    endpoint of the same name is checked first; if that cannot be checked, nothing is deleted.
    """
    try:
        status = endpoint_status(repository_name, operator_spec)
    except Exception as exc:  # no credentials, sagemaker:DescribeEndpoint denied, unreachable
        raise BentoctlException(
            f"ECR repository {repository_name} left in place: cannot tell whether SageMaker "
            f"endpoint {repository_name} still runs its image ({exc})"
        ) from None
    if status is not None:
        raise BentoctlException(
            f"ECR repository {repository_name} left in place: SageMaker endpoint "
            f"{repository_name} still exists ({status}) and runs its image. Delete the endpoint "
            "first (terraform destroy -var-file=bentoctl.tfvars), then run bentoctl destroy again"
        )
    try:
        _ecr(operator_spec).delete_repository(repositoryName=repository_name, force=True)
    except Exception as exc:
        raise BentoctlException(f"ECR repository {repository_name}: {exc}") from None
