"""How a run fails: each error is one printed line and an exit status (deploy_sagemaker.main)."""

from __future__ import annotations


class DeployError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


class AwsCallError(Exception):
    """An AWS API call failed; printed as one line naming the call, exit status 1."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class StillChangingError(Exception):
    """--wait ran out of time while the endpoint was still Creating/Updating: neither success nor
    failure yet, so it gets its own exit status (3) and a line saying how to check again."""
