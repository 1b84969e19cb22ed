"""The image's HEALTHCHECK: exit 0 when ``GET /health`` answers 200 on the server's port.

The port is SAGEMAKER_BIND_TO_PORT, else RAGSERVE_PORT; with neither, 8000 and then 8080 (the
entrypoint's SageMaker mode, `serve`, defaults to 8080). /health says the process answers, not
that the model is loaded: that is /ready, which stays 503 while graphs compile.
"""

import os
import sys
import urllib.request

configured = os.environ.get("SAGEMAKER_BIND_TO_PORT") or os.environ.get("RAGSERVE_PORT")
for port in [configured] if configured else ["8000", "8080"]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        continue
sys.exit(1)
