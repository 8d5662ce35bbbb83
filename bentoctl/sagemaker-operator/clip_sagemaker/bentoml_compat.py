"""What bentoctl 0.4.0 (its last release, 2023) expects of a bento, and BentoML 1.4 changed.

bentoctl's `build` reads a bento's metadata (`get_bento_metadata`) with `Bento.from_fs`, which
BentoML 1.4 removed along with PyFilesystem, and from `env/python/version.txt`, which BentoML 1.4
bentos no longer have (the Python version is in bento.yaml's `image`). The operator gives bentoctl
a reader of BentoML 1.4 bentos instead. The `fs` package bentoctl also imports is in
requirements-bentoctl.txt (BentoML 1.4 no longer brings it).
"""

from __future__ import annotations

import sys
from typing import Any


def bento_metadata(bento_path: str) -> dict[str, Any]:
    """bentoctl's `get_bento_metadata`, for BentoML 1.4 bentos: tag, versions of BentoML and
    Python."""
    from bentoml import Bento

    bento = Bento.from_path(bento_path)
    image = getattr(bento.info, "image", None)
    python = getattr(image, "python_version", None) or "{}.{}".format(*sys.version_info)
    return {
        "tag": bento.tag,
        "bentoml_version": ".".join(bento.info.bentoml_version.split(".")[:3]),
        "python_version": python,
    }


def read_bentoml_14_bentos() -> None:
    """Point bentoctl at `bento_metadata` (it calls its module-level `get_bento_metadata`)."""
    import bentoctl.deployment_config

    bentoctl.deployment_config.get_bento_metadata = bento_metadata
