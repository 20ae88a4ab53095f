"""``kiln serve``'s way into BentoML's ``serve`` command, with each server's metrics kept apart.

BentoML's workers keep their Prometheus samples in prometheus_client's multiprocess directory, and every
``bentoml serve`` empties that directory when it starts. By default it is one directory per BentoML home,
so a second Kiln server on the same model store (another port, a test's own server, a canary next to
the main one) wiped the first one's counters. Here each server gets its own directory under it,
``$BENTOML_HOME/prometheus_multiproc_dir/http-<port>`` (the Kubernetes manifests mount an emptyDir at
that parent), and then BentoML's own CLI runs unchanged: ``python -m serving.launch serve ... --port N``.
"""

from __future__ import annotations

import os
import sys

import kiln  # noqa: F401  (points BentoML at Kiln's model store before bentoml is imported)


def metrics_dir(argv: list[str]) -> str:
    """The multiprocess directory of the server ``argv`` starts (keyed by its HTTP ``--port``)."""
    port = "3000"  # bentoml serve's default
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            port = argv[i + 1]
        elif arg.startswith("--port="):
            port = arg.partition("=")[2]
    return os.path.join(os.environ["BENTOML_HOME"], "prometheus_multiproc_dir", f"http-{port}")


def main() -> None:
    from bentoml._internal.configuration.containers import BentoMLContainer

    BentoMLContainer.prometheus_multiproc_dir.set(metrics_dir(sys.argv[1:]))
    from bentoml_cli.cli import cli

    cli()


if __name__ == "__main__":
    main()
