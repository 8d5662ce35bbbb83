"""`bentoctl build`'s push target: an ECR repository (SageMaker pulls images from ECR only).

boto3's default credential chain and region settings apply; AWS_ENDPOINT_URL points it
elsewhere (the tests use moto's server).
"""

from __future__ import annotations

import base64
from typing import Any

import boto3
from bentoctl.exceptions import BentoctlException


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


def delete_repository(repository_name: str, operator_spec: dict[str, Any]) -> None:
    """`bentoctl destroy`: the repository and its images."""
    try:
        _ecr(operator_spec).delete_repository(repositoryName=repository_name, force=True)
    except Exception as exc:
        raise BentoctlException(f"ECR repository {repository_name}: {exc}") from None
