"""The images skaffold builds: every COPY/ADD source exists in the build context skaffold uses, and the
final stage runs as a non-root user (the charts also enforce runAsNonRoot)."""

from __future__ import annotations

import glob
import json
import shlex
from pathlib import Path

import pytest
import yaml

from .conftest import CHARTS, REPO_ROOT

SKAFFOLD = yaml.safe_load((REPO_ROOT / "skaffold.yaml").read_text())
ARTIFACTS = SKAFFOLD["build"]["artifacts"]


def dockerfile_of(artifact: dict) -> tuple[Path, Path]:
    context = REPO_ROOT / artifact.get("context", ".")
    return context, context / (artifact.get("docker") or {}).get("dockerfile", "Dockerfile")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    result, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            op, _, args = current.strip().partition(" ")
            result.append((op.upper(), args.strip()))
            current = ""
    return result


def copy_sources(args: str) -> list[str] | None:
    """Sources of a COPY/ADD from the build context (None when it copies from a stage or image)."""
    flags = []
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        flags.append(flag)
        args = args.lstrip()
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    if any(f.startswith("--from=") for f in flags):
        return None
    return words[:-1]


PRESENT = [a for a in ARTIFACTS if dockerfile_of(a)[1].is_file()]


def test_operator_image_is_built_by_skaffold() -> None:
    assert any(a["image"] == "emporium-operator" for a in PRESENT)


def test_every_dockerfile_is_a_skaffold_artifact() -> None:
    built = {dockerfile_of(a)[1].resolve() for a in ARTIFACTS}
    found = [REPO_ROOT / p for p in glob.glob("services/*/Dockerfile", root_dir=REPO_ROOT)]
    found += [REPO_ROOT / "operator" / "Dockerfile"]
    for dockerfile in found:
        if dockerfile.exists():
            assert dockerfile.resolve() in built, f"{dockerfile} is not built by skaffold.yaml"


@pytest.mark.parametrize("artifact", PRESENT, ids=[a["image"] for a in PRESENT])
def test_copy_sources_exist_in_the_build_context(artifact: dict) -> None:
    context, dockerfile = dockerfile_of(artifact)
    copies = [args for op, args in instructions(dockerfile) if op in ("COPY", "ADD")]
    assert copies, f"{dockerfile} copies nothing"
    for args in copies:
        for source in copy_sources(args) or []:
            assert not source.startswith(("http://", "https://")), f"{dockerfile}: ADD from a URL"
            matches = glob.glob(source.lstrip("/"), root_dir=context)
            assert matches, f"{dockerfile}: COPY source {source!r} is not in the build context {context}"


@pytest.mark.parametrize("artifact", PRESENT, ids=[a["image"] for a in PRESENT])
def test_final_stage_runs_as_non_root(artifact: dict) -> None:
    _, dockerfile = dockerfile_of(artifact)
    steps = instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    assert sum(op == "FROM" for op, _ in steps) >= 2, f"{dockerfile} is not a multi-stage build"
    users = [args for op, args in steps[last_from:] if op == "USER"]
    assert users, f"{dockerfile}: the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile}: final USER is {user}"
    if artifact["image"] == "emporium-operator":
        values = yaml.safe_load((CHARTS / "emporium-operator" / "values.yaml").read_text())
        assert user == str(values["podSecurityContext"]["runAsUser"])
