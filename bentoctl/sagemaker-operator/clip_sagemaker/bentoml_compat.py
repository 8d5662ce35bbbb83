"""What bentoctl 0.4.0 (its last release, 2023) needs from BentoML and BentoML 1.4 no longer has.

bentoctl's `build` reads the bento's metadata with `Bento.from_fs(fs.open_fs(path))`; BentoML 1.4
dropped PyFilesystem and reads bentos with `Bento.from_path(path)`. The `fs` package itself is
in requirements-bentoctl.txt (bentoctl imports it; BentoML 1.4 no longer brings it).
"""

from __future__ import annotations

from typing import Any


def restore_bento_from_fs() -> None:
    """Give BentoML 1.4's `Bento` the `from_fs` bentoctl calls, as a thin `from_path`."""
    from bentoml import Bento

    if hasattr(Bento, "from_fs"):
        return

    def from_fs(cls: type[Bento], bento_fs: Any) -> Bento:
        return cls.from_path(bento_fs.getsyspath("/"))

    Bento.from_fs = classmethod(from_fs)  # type: ignore[attr-defined]
