"""Jars from Maven Central, fetched once with Maven into a cache directory and used offline after that."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from kinshasa.infra.process import InfraError


def fetch_jars(pom: str, libs: Path, properties: Mapping[str, str], *, what: str, no_maven: str) -> Path:
    """`libs`, filled with the runtime dependencies of the package's `pom` (under kinshasa/infra) once.

    The directory is staged and renamed when complete, so an interrupted fetch is redone, never used.
    """
    libs = libs.resolve()  # Maven resolves a relative directory against the pom's, not ours
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError(no_maven)
    if shutil.which("java") is None:
        raise InfraError(f"Java 17+ is needed to run {what} and 'java' is not on PATH "
                         "(Debian: apt-get install openjdk-17-jre-headless).")
    staging = libs.with_name(libs.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    defines = [f"-D{name}={value}" for name, value in properties.items()]
    with resources.as_file(resources.files("kinshasa.infra").joinpath(pom)) as pom_path:
        result = subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom_path), *defines, "dependency:copy-dependencies",
             f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
            capture_output=True, text=True, check=False,
        )
    if result.returncode != 0:
        raise InfraError(f"Maven could not fetch the jars of {what}:\n"
                         f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    marker.write_text(" ".join(f"{k}={v}" for k, v in properties.items()))
    return libs
