"""Serving: BentoML service, Open Inference Protocol over HTTP and gRPC, runtimes, batching, metrics.

Serving reads artifacts from the model store; it never imports training code.
"""

import kiln  # noqa: F401  (points BentoML at Kiln's model store before bentoml is imported)
