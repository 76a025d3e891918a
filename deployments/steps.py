"""Pull steps for ``prefect.yaml``: run by the worker before each flow run starts.

A deployment's code has to be found wherever the run lands: on a worker
machine that runs from a git checkout (installed with ``pip install -e .``)
or in the ECS image, where the project is installed at build time. Both
have the project *installed*, so :func:`project_directory` asks Python where
the installed ``flows`` package lives instead of hard-coding a path that
exists on only one of them; the entrypoint that is loaded is then always
the code that is imported.

The Earthdata login is a secret: :func:`earthdata_login` reads it from a
Prefect Secret block when the run starts, so it never sits in a deployment,
its parameters or a job variable (Prefect stores all three in the clear).
"""

from __future__ import annotations

import os
from pathlib import Path

EARTHDATA_BLOCK = "magg-earthdata"


def project_directory() -> dict[str, str]:
    """The directory that holds the installed ``flows`` package.

    Prefect makes a step's ``directory`` output the run's working directory,
    so entrypoints such as ``flows/process_cycle.py:process_cycle`` resolve
    against the installed code: the checkout for an editable install,
    ``site-packages`` for the image's regular install.
    """

    return {"directory": str(Path(flows.__file__).resolve().parent.parent)}


def earthdata_login(block: str = EARTHDATA_BLOCK) -> dict[str, str]:
    """Put the Earthdata login from a Secret block into this run's environment.

    The block holds either a token (a string) or ``{"username": …,
    "password": …}``; they become ``EARTHDATA_TOKEN`` or
    ``EARTHDATA_USERNAME``/``EARTHDATA_PASSWORD``, which the flow's
    Earthdata login reads. Variables already set on the worker win, and a
    missing block is not an error: runs that need no Earthdata login
    (``credentials="environment"`` or ``"none"``) must not depend on it, and
    a run that does need one fails at login naming every place it looked.

    Returns
    -------
    dict
        ``{"earthdata": "block" | "worker environment" | "none"}``: where the
        login comes from, never the login itself (step outputs are logged).
    """
    from prefect.blocks.system import Secret

    if os.environ.get("EARTHDATA_TOKEN") or os.environ.get("EARTHDATA_USERNAME"):
        return {"earthdata": "worker environment"}
    try:
        value = Secret.load(block).get()
    except ValueError:  # Prefect's answer for a block that does not exist
        return {"earthdata": "none"}
    if isinstance(value, str):
        os.environ["EARTHDATA_TOKEN"] = value
    elif isinstance(value, dict) and {"username", "password"} <= value.keys():
        os.environ["EARTHDATA_USERNAME"] = str(value["username"])
        os.environ["EARTHDATA_PASSWORD"] = str(value["password"])
    else:
        raise ValueError(
            f"Secret block {block!r} must hold a token string or {{'username': …, 'password': …}}"
        )
    return {"earthdata": "block"}
