"""A small parser of Apptainer definition files: the header, the %sections, %files pairs, %labels and the
%arguments build arguments with their {{ NAME }} substitution, following Apptainer's own parser
(pkg/build/types/parser/deffile.go): a section starts at a line whose first word begins with '%', repeated
sections are appended, header keys are case-insensitive. spython's parser is not used: it accepts only
`Bootstrap: docker`, lower-cases `From:` and folds %test into the install steps.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

SECTIONS = ("arguments", "help", "setup", "files", "labels", "environment", "pre", "post", "runscript", "test",
            "startscript")
HEADER_KEYS = ("bootstrap", "from", "stage", "osversion", "mirrorurl", "include", "fingerprints", "confurl",
               "updateurl", "product", "user", "regcode", "productpgp", "registry", "namespace", "library")
_ARG = re.compile(r"{{\s*(\w+)\s*}}")


class DefinitionError(ValueError):
    """A definition that Apptainer would refuse, or a bad build argument: one line."""


@dataclass
class Definition:
    path: str
    header: dict[str, str]
    sections: dict[str, str]                  # name -> body (the lines after the %name line, as written)
    section_args: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, str]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    arguments: dict[str, str] = field(default_factory=dict)

    def body(self, name: str) -> str:
        return self.sections.get(name, "")


def _split(text: str) -> tuple[list[str], list[tuple[str, str, list[str], int]]]:
    header: list[str] = []
    sections: list[tuple[str, str, list[str], int]] = []  # (name, args, lines, line number)
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if words and words[0].startswith("%"):
            rest = line.strip()[len(words[0]):].strip()
            sections.append((words[0][1:].lower(), rest, [], number))
        elif sections:
            sections[-1][2].append(line)
        else:
            header.append(line)
    return header, sections


def _header(lines: list[str], path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.split("#")[0].partition(":")
        key = key.strip().lower()
        if not sep:
            raise DefinitionError(f"{path} line {number}: header line {line!r} has no 'Key: value'")
        if key not in HEADER_KEYS:
            raise DefinitionError(f"{path} line {number}: unknown header keyword {key!r} "
                                  f"(allowed: {', '.join(HEADER_KEYS)})")
        out[key] = value.strip()
    return out


def _pairs(body: str) -> list[list[str]]:
    # Split at blanks outside quotes, as Apptainer's fileSplitter does.
    return [shlex.split(line) for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]


def parse(text: str, path: str = "<definition>") -> Definition:
    header_lines, raw = _split(text)
    header = _header(header_lines, path)
    if "bootstrap" not in header:
        raise DefinitionError(f"{path}: no 'Bootstrap:' header (Apptainer needs it first)")
    d = Definition(path=path, header=header, sections={})
    for name, args, lines, number in raw:
        if name not in SECTIONS:
            raise DefinitionError(f"{path} line {number}: unknown section '%{name}' (allowed: "
                                  f"{', '.join('%' + s for s in SECTIONS)})")
        body = "\n".join(lines) + "\n"
        d.sections[name] = d.sections.get(name, "") + body
        if args:
            d.section_args[name] = args
    for words in _pairs(d.body("files")):
        d.files.append((words[0], words[1] if len(words) > 1 else words[0]))
    for line in d.body("labels").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            d.labels[key] = value.strip()
    for line in d.body("arguments").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"\w+", key.strip()):
            raise DefinitionError(f"{path}: %arguments line {line!r} is not NAME=value")
        d.arguments[key.strip()] = value.strip()
    return d


def render(text: str, build_args: dict[str, str] | None = None, path: str = "<definition>") -> str:
    """The definition with every {{ NAME }} replaced: --build-arg values over %arguments defaults. Like
    Apptainer, an argument that is not used, or a {{ NAME }} without a value, is an error."""
    defaults = parse_arguments(text, path)
    given = dict(build_args or {})
    used = set(_ARG.findall(text))
    unused = sorted(set(given) - used)
    if unused:
        raise DefinitionError(f"{path}: build argument(s) {', '.join(unused)} not used by the definition "
                              f"(allowed: {', '.join(sorted(used)) or 'none'})")
    values = {**defaults, **given}
    missing = sorted(used - set(values))
    if missing:
        raise DefinitionError(f"{path}: no value for {', '.join('{{ ' + m + ' }}' for m in missing)} "
                              "(set it in %arguments or with --build-arg)")
    return _ARG.sub(lambda m: values[m.group(1)], text)


def parse_arguments(text: str, path: str = "<definition>") -> dict[str, str]:
    # %arguments is read before substitution; the header may itself hold {{ }} (e.g. From: debian:{{ V }}).
    _, raw = _split(text)
    body = "".join("\n".join(lines) + "\n" for name, _, lines, _ in raw if name == "arguments")
    fake = "Bootstrap: scratch\n%arguments\n" + body
    return parse(fake, path).arguments


def load(path: Path | str, build_args: dict[str, str] | None = None) -> Definition:
    path = Path(path)
    return parse(render(path.read_text(), build_args, str(path)), str(path))
