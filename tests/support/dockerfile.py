"""Dockerfile parsing for the tests: each stage's ENV, COPY sources, ENTRYPOINT, CMD,
HEALTHCHECK, USER and EXPOSE, enough to run an image's commands without a Docker engine."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    env: dict[str, str] = field(default_factory=dict)
    copies: list[str] = field(default_factory=list)  # COPY sources from the build context
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    user: str = ""
    expose: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def _exec_form(args: str, what: str) -> list[str]:
    value = json.loads(args)  # only the exec (JSON) form: no shell in between
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"{what} must be a JSON array"
    )
    return value


def parse_stages(path: Path) -> list[Stage]:
    """Each FROM stage of a Dockerfile, with what the tests need."""
    stages: list[Stage] = []
    for word, args in instructions(path.read_text()):
        if word == "FROM":
            stages.append(Stage())
            continue
        if not stages:
            continue
        stage = stages[-1]
        if word == "ENV":
            known = stage.env
            for key, val in re.findall(r'(\w+)=("[^"]*"|\S*)', args):
                stage.env[key] = re.sub(
                    r"\$\{?(\w+)\}?",
                    lambda m, k=known: k.get(m.group(1), os.environ.get(m.group(1), "")),
                    val.strip('"'),
                )
        elif word == "COPY" and not args.startswith("--from"):
            stage.copies += args.split()[:-1]
        elif word == "ENTRYPOINT":
            stage.entrypoint = _exec_form(args, "ENTRYPOINT")
        elif word == "CMD":
            stage.cmd = _exec_form(args, "CMD")
        elif word == "HEALTHCHECK":
            rest = re.sub(r"--[\w-]+=\S+\s*", "", args)
            assert rest.startswith("CMD "), "HEALTHCHECK must run a command"
            stage.healthcheck = _exec_form(rest[4:], "HEALTHCHECK CMD")
        elif word == "USER":
            stage.user = args
        elif word == "EXPOSE":
            stage.expose += args.split()
    return stages
