"""Loading: read the file, parse the YAML (reporting repeated keys), validate, and raise one
ConfigError naming every problem."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml
from pydantic import ValidationError

from agent.config.models import Settings
from agent.config.problems import ConfigError, key_path, problem_sentence
from agent.config.units import show


def load_config(path: Path) -> Settings:
    """Given the path of a YAML file, return its validated Settings; a relative `data_dir` is
    taken from the file's directory. Raise ConfigError naming every problem at once."""
    source = str(path)
    text = _read_text(path, source)
    data, problems = _load_yaml(text, source)
    return _validate(data, source, problems, base_dir=path.absolute().parent)


def parse_config(data: object, source: str = "<config>") -> Settings:
    """Given already-loaded YAML data, return its validated Settings. Raise ConfigError naming
    every problem at once (`source` names where the data came from in the message)."""
    return _validate(data, source, [], base_dir=None)


def _read_text(path: Path, source: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(["the file does not exist"], source) from None
    except IsADirectoryError:
        raise ConfigError(["this is a directory, not a file"], source) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], source) from None
    try:
        return raw.decode("utf-8-sig")  # tolerate the byte-order mark some editors write
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        raise ConfigError([problem], source) from None


def _load_yaml(text: str, source: str) -> tuple[object, list[str]]:
    """Return the data in `text` and the keys it gives twice (YAML keeps the last silently)."""
    try:
        data: object = yaml.safe_load(text)
        return data, list(_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), ()))
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_problem(exc)], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {str(exc).splitlines()[0]}"], source) from None
    except RecursionError:
        raise ConfigError(["not valid YAML: nested too deeply"], source) from None


def _syntax_problem(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"At line {mark.line + 1}, column {mark.column + 1}" if mark else "In the file"
    problem = exc.problem or exc.context or "not valid YAML"
    if exc.context and exc.context_mark and exc.problem:
        context = exc.context_mark
        problem += f" ({exc.context} at line {context.line + 1}, column {context.column + 1})"
    if "\\t" in problem or "\t" in problem:
        problem += "; YAML indents with spaces, never tabs"
    return f"{where}: YAML syntax error: {problem}"


def _duplicate_keys(
    node: yaml.Node | None, loc: tuple[int | str, ...], seen: set[int] | None = None
) -> Iterator[str]:
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:  # an alias can point back at its own anchor
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*loc, index), seen)
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key in first_line and key not in ("?", "<<"):  # `<<` merges: it may repeat
                first = first_line[key]
                lines = f"line {line}" if first == line else f"lines {first} and {line}"
                yield f"At {key_path((*loc, key))}: given twice ({lines}); keep one"
            first_line.setdefault(key, line)
            yield from _duplicate_keys(value_node, (*loc, key), seen)


def _validate(data: object, source: str, problems: list[str], base_dir: Path | None) -> Settings:
    if data is None:
        raise ConfigError(
            ["the configuration is empty; it needs at least 'site' and 'cloud'"], source
        )
    if not isinstance(data, dict):
        message = f"the top level must be a mapping of keys such as 'site:', not {show(data)}"
        raise ConfigError([message], source)
    try:
        settings = Settings.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = problems + [problem_sentence(error) for error in exc.errors(include_url=False)]
        raise ConfigError(problems, source) from None
    if problems:  # the YAML had repeated keys, though what it kept was valid
        raise ConfigError(problems, source)
    return settings
