"""Print a pip constraints file that pins every distribution installed in this Python to its
installed version.

The vLLM images (Dockerfile.neuron-vllm, Dockerfile.cuda) install ragserve with it, so pip
fails instead of upgrading or downgrading anything the base image ships (vLLM and its plugin,
torch, the Neuron packages, transformers, vLLM's own dependencies): those were built and tested
together. Where a distribution is installed twice, the one Python imports (first on sys.path)
wins. A version that is not PEP 440 is pinned with ``===`` (arbitrary equality).

    python3 docker/image_constraints.py > /etc/ragserve-image-constraints.txt
"""

import re
import sys
from importlib.metadata import distributions

try:
    from packaging.version import InvalidVersion, Version
except ImportError:  # pip vendors it; every image that runs this has pip
    from pip._vendor.packaging.version import InvalidVersion, Version


def pin(name: str, version: str) -> str:
    try:
        Version(version)
    except InvalidVersion:
        return f"{name}==={version}"
    return f"{name}=={version}"


def main() -> int:
    pins: dict[str, str] = {}
    for dist in distributions():  # in sys.path order
        # A half-removed or broken distribution in a base image lacks fields. `.get` gives None
        # for them; indexing (what `dist.version` does) warns on Python 3.12 and 3.13 and is
        # deprecated in favour of KeyError ("Implicit None on return values is deprecated and
        # will raise KeyErrors", importlib.metadata), so it could fail the build on 3.14+.
        name, version = dist.metadata.get("Name"), dist.metadata.get("Version")
        if not name or not version:
            continue
        pins.setdefault(re.sub(r"[-_.]+", "-", name).lower(), pin(name, version))
    sys.stdout.write("".join(f"{line}\n" for line in sorted(pins.values(), key=str.lower)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
