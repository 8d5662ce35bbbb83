"""The clip-sagemaker bentoctl operator: the four functions bentoctl calls on an operator."""

from clip_sagemaker.deployable import create_deployable
from clip_sagemaker.generate import generate
from clip_sagemaker.registry import create_repository, delete_repository

__all__ = ["create_deployable", "create_repository", "delete_repository", "generate"]
