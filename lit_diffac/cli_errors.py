"""Readable recipe errors for ``lit-diffac``: jsonargparse's nested messages → one line naming the key.

This module is the whole error layer between jsonargparse and the user, fenced off from the CLI: it reads
jsonargparse's message wording and one private import (``jsonargparse._common``), which is why pyproject pins
jsonargparse to the tested minor (each message form has a test in tests/test_errors.py / tests/test_cli.py).

:func:`format_parser_error` turns a parser error into e.g. ``unknown key 'model.init_args.lrr' in recipe.yaml
(did you mean 'model.init_args.lr'?)``; :func:`missing_file_cause` finds the "file not found" message behind a
component that failed to build; :func:`user_error_message` finds the one-line message of an error a user can
fix (a :class:`~lit_diffac.errors.LitDiffacError`, or a ``ValueError`` that a lit_diffac constructor raised
while the recipe's objects were built); :class:`RecipeArgumentParser` prints that one line instead of the
usage.  When a recipe's ``class_path`` fails to import because of its module's own code (a package it imports
is not installed, an exception at import time), jsonargparse reports only the bare exception text:
:func:`import_problem` imports the recipe's modules again to name the file, line and cause.

Lightning is imported by this module (``RecipeArgumentParser``): :mod:`lit_diffac.cli` imports it lazily.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn

import yaml
from lightning.pytorch.cli import LightningArgumentParser

from lit_diffac.errors import find_user_error

PROG = "lit-diffac"

_NOISE = re.compile(r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value "
                    r"|Subclass types expect one of:|a class path \(str\)$"
                    r"|a dict with(?:out)? (?:class_path|parameters))")
#: The union alternative that failed only because the value has another shape (e.g. one class for a list).
_NOT_A_SUBCLASS = re.compile(r"^Not a valid subclass of ")
_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":$')
_CLASS = re.compile(r"^Problem with given class_path '(?P<cls>[^']+)':$")
_UNKNOWN_OPTION = re.compile(r"^Option '(?P<key>[^']+)' is not accepted$")
_UNKNOWN_SUB = re.compile(r"^(?:Subcommand '[^']+'|Group '[^']+') does not accept option '(?P<key>[^']+)'$")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (?P<args>.+)$")
_EXPECTED = re.compile(r"^Expected an? (?P<type>.+?)(?:\. Got value: (?P<value>.*))?$")
_REQUIRED = re.compile(r"^the following arguments are required: (?P<keys>.+)$")
_NO_ATTRIBUTE = re.compile(r"^module '(?P<module>[^']+)' has no attribute '(?P<attr>[^']+)'$")
_NO_MODULE = re.compile(r"^No module named '(?P<module>[^']+)'")


def _clean_type(text: str) -> str:
    """``<class 'float'>`` -> ``float``; ``typing.Literal['a', 'b']`` -> ``Literal['a', 'b']``."""
    text = re.sub(r"<class '(?:builtins\.)?([^']+)'>", r"\1", text)
    return text.replace("typing.", "")


def closest(word: str, candidates: list[str]) -> str | None:
    matches = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _strip_init_args(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in ("init_args", "dict_kwargs"))


def _class_parameters(class_path: str) -> list[str]:
    """Names of the ``__init__`` arguments of ``class_path`` (as jsonargparse resolves them)."""
    try:
        module_name, _, attr = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception:  # noqa: BLE001 - only for suggestions
        return []
    try:
        from jsonargparse import ArgumentParser

        probe = ArgumentParser(exit_on_error=False)
        probe.add_class_arguments(cls, fail_untyped=False)
        names = {a.dest.split(".")[0] for a in probe._actions if a.dest not in ("help", "config")}
        if names:
            return sorted(names)
    except Exception:  # noqa: BLE001 - fall back to the plain signature
        pass
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _suggest_key(key: str, valid_keys: list[str]) -> str | None:
    """Closest valid dotted key to an unknown ``key``, repairing its first unknown component."""
    parts = key.split(".")
    for depth in range(len(parts)):
        prefix = parts[:depth]
        children = [k.split(".")[depth] for k in valid_keys
                    if k.split(".")[:depth] == prefix and len(k.split(".")) > depth]
        if parts[depth] in children:
            continue
        match = closest(parts[depth], children)
        if match is None:
            return None
        repaired = ".".join(prefix + [match] + parts[depth + 1:])
        # Only suggest keys that exist as a whole (or a parent of the rest, e.g. a subclass key).
        if any(repaired == k or repaired.startswith(k + ".") for k in valid_keys):
            return repaired
        return ".".join(prefix + [match])
    return None


class _Leaf:
    """The innermost meaningful line of a jsonargparse error, with its location."""

    def __init__(self, kind: str, key: str, classes: list[str], match: re.Match, value: str | None,
                 types: list[str] | None = None) -> None:
        self.kind, self.key, self.classes, self.match, self.value = kind, key, classes, match, value
        self.types = types or []  # for a union: every non-None alternative's expected type


def _walk_message(message: str) -> _Leaf | None:
    """Find the first real error in jsonargparse's nested union message, with the dotted key leading to it.

    The message nests ``Parser key "k":`` and ``Problem with given class_path 'C':`` blocks (by
    indentation), lists union alternatives as ``- ...`` (we skip the ``NoneType`` ones) and ends blocks with
    ``Given value: ...``.  The key is built as ``k.init_args.k2.init_args.leaf``.  A ``Not a valid subclass
    of ...`` alternative (e.g. ``Reward`` when a list of rewards was given) yields to any other error (the
    list alternative's ``no attribute 'DigitAlignmnt'``).
    """
    leaves = list(_leaves(message))
    for leaf in leaves:
        if not (leaf.kind == "other" and _NOT_A_SUBCLASS.match(leaf.match.group(0))):
            return leaf
    return leaves[0] if leaves else None


def _leaves(message: str):
    """Every innermost error line of jsonargparse's nested message, in order (see :func:`_walk_message`)."""
    lines = message.splitlines()
    stack: list[tuple[int, str, str]] = []  # (indent, "key" | "class", text)
    for i, raw in enumerate(lines):
        stripped = raw.lstrip()
        indent = len(raw) - len(stripped)
        if stripped.startswith("- "):
            stripped, indent = stripped[2:], indent + 2
        if not stripped or _NOISE.match(stripped) or stripped.startswith("Given value: "):
            continue
        if stripped.startswith("Expected a <class 'NoneType'>"):
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if m := _KEY.match(stripped):
            stack.append((indent, "key", m["key"]))
            continue
        if m := _CLASS.match(stripped):
            stack.append((indent, "class", m["cls"]))
            continue
        parts: list[str] = []
        classes: list[str] = []
        for _, kind, text in stack:
            if kind == "key":
                parts.append(text)
            else:
                classes.append(text)
                parts.append("init_args")
        # The value of a union block is reported after its alternatives, at a smaller indentation.
        value = None
        for later in lines[i + 1:]:
            s = later.lstrip()
            if s.startswith("Given value: ") and len(later) - len(s) < indent:
                value = s[len("Given value: "):]
                break
        for kind, pattern in (("unknown", _UNKNOWN_OPTION), ("unknown", _UNKNOWN_SUB), ("type", _EXPECTED),
                              ("required", _REQUIRED), ("attribute", _NO_ATTRIBUTE), ("module", _NO_MODULE),
                              ("unrecognized", _UNRECOGNIZED)):
            if m := pattern.match(stripped):
                if kind in ("attribute", "module") and parts and parts[-1] == "init_args":
                    parts.pop()  # the class itself failed to import: the key is the one holding it
                types = [m["type"]] if kind == "type" else []
                if kind == "type" and raw.lstrip().startswith("- "):  # a union: gather its alternatives
                    for later in lines[i + 1:]:
                        s = later.lstrip()
                        if len(later) - len(s) != len(raw) - len(raw.lstrip()) or not s.startswith("- "):
                            break
                        alt = _EXPECTED.match(s[2:])
                        if alt and "NoneType" not in alt["type"]:
                            types.append(alt["type"])
                yield _Leaf(kind, ".".join(parts), classes, m, value, types)
                break
        else:
            whole = re.match(r".*", stripped)
            assert whole is not None
            yield _Leaf("other", ".".join(parts), classes, whole, value)


def config_paths(argv: list[str]) -> list[str]:
    """The ``--config``/``-c`` files of a command line, in order."""
    configs = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            configs.append(argv[i + 1])
        elif arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
    return configs


def _where(key: str, argv: list[str], value: str | None = None) -> str:
    """`` in recipe.yaml`` / `` in override --k=v`` / ``""``: where ``key`` was given, if we can tell.

    ``value`` is the offending value when known: an override of ``key`` with another value is not the
    culprit (the bad value then comes from the recipe).
    """
    plain = _strip_init_args(key)
    configs = config_paths(argv)
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg.startswith("--config"):
            continue
        name, has_value, given_value = arg[2:].partition("=")
        shown = arg
        if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            given_value, shown = argv[i + 1], f"{arg} {argv[i + 1]}"
        given = _strip_init_args(name)
        if given == plain or plain.startswith(given + ".") or given.startswith(plain + "."):
            if value is not None and given == plain and given_value != value:
                continue
            return f" in override {shown}"
    for path in configs:
        try:
            node: Any = yaml.safe_load(Path(path).read_text())
        except Exception:  # noqa: BLE001 - only for the location hint
            continue
        found = True
        for part in plain.split("."):
            while isinstance(node, dict) and part not in node and "init_args" in node:
                node = node["init_args"]
            if not isinstance(node, dict) or part not in node:
                found = False
                break
            node = node[part]
        if found:
            return f" in {path}"
    return f" in {', '.join(configs)}" if len(configs) == 1 else ""


def missing_file_cause(err: BaseException) -> str | None:
    """The message of a FileNotFoundError behind ``err`` (its cause chain, or its text), if there is one."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, FileNotFoundError):
            return str(err)
        text = str(err)
        match = re.search(r"^\s*-?\s*(.*(?:weights not found|does not exist|No such file|is missing at).*)$", text,
                          flags=re.MULTILINE)
        if match:
            return match.group(1).strip()
        err = err.__cause__ or err.__context__
    return None


def one_line(message: str) -> str:
    """``message`` on one line (its lines stripped and joined with spaces)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _yaml_problem(err: Exception) -> str:
    """E.g. ``YAML syntax error at line 11, column 3: did not find expected ',' or ']' (while parsing a flow
    sequence at line 10, column 15)``."""
    mark = getattr(err, "problem_mark", None)
    if getattr(err, "problem", None) is None or mark is None:
        return f"YAML syntax error: {one_line(str(err))}"
    text = f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context:
        where = f" at line {context_mark.line + 1}, column {context_mark.column + 1}" if context_mark else ""
        text += f" ({context}{where})"
    return text


def _config_syntax_error(message: str, argv: list[str]) -> str:
    """jsonargparse's multi-line ``Problems parsing config: <YAML error>`` as one line naming the file."""
    for path in config_paths(argv):
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            return f"cannot read {path}: {_yaml_problem(err)}"
        except (OSError, UnicodeDecodeError):
            continue
    return one_line(message)


def user_error_message(err: BaseException) -> str | None:
    """The one-line message of an error a user can fix, if ``err`` is (or wraps) one; else ``None``.

    That is a :class:`~lit_diffac.errors.LitDiffacError` in ``err``'s cause chain, or, when ``err`` arose
    while the recipe's objects were built (``instantiate_classes``), a ``ValueError`` that a lit_diffac
    constructor raised itself (its own argument checks, e.g. ``gamma and lam must lie in [0, 1]``); a
    ``ValueError`` from inside torch or another library, or raised later (training), is left alone.
    """
    user_error = find_user_error(err)
    if user_error is not None:
        return one_line(str(user_error))
    if not any(frame.name == "instantiate_classes" for frame in traceback.extract_tb(err.__traceback__)):
        return None
    innermost, seen = err, set()
    while id(innermost) not in seen and (innermost.__cause__ or innermost.__context__) is not None:
        seen.add(id(innermost))
        innermost = innermost.__cause__ or innermost.__context__
    tb = innermost.__traceback__
    if type(innermost) is not ValueError or tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(__file__).resolve().parent
    if package not in Path(tb.tb_frame.f_code.co_filename).resolve().parents:
        return None
    message = one_line(str(innermost))
    owner = tb.tb_frame.f_locals.get("self") if tb.tb_frame.f_code.co_name == "__init__" else None
    name = type(owner).__name__ if owner is not None else None
    if name and name not in message:
        message = f"invalid {name}: {message}"
    return message


def _class_paths(argv: list[str], message: str) -> list[tuple[str | None, str]]:
    """``(key, class_path)`` of every ``class_path`` in the recipe files (keys like ``model.init_args.rewards``),
    then those named in overrides or in jsonargparse's message (key unknown: ``None``)."""
    found: list[tuple[str | None, str]] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("class_path"), str):
                found.append((key, node["class_path"]))
            for name, value in node.items():
                if name != "class_path":
                    walk(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            for item in node:
                walk(item, key)

    for path in config_paths(argv):
        try:
            walk(yaml.safe_load(Path(path).read_text()), "")
        except Exception:  # noqa: BLE001 - only for the import diagnosis
            continue
    text = "\n".join([*argv, message])
    for match in re.finditer(r"""class_path['"]?\s*[:=]\s*['"]?([A-Za-z_][\w.]*)""", text):
        found.append((None, match.group(1)))
    return found


def import_problem(class_path: str) -> str | None:
    """Why the module of ``class_path`` fails to import, when the failure is *inside* it: an exception its
    code raised, or a package it imports that is not installed, e.g. ``my_rewards.py, line 2: No module named
    'skimage' (my_rewards imports a package that is not installed)``.  ``None`` when it imports (or is itself
    not found, or already imported).  Imports the module: only call it on an error path."""
    module_name = class_path.rpartition(".")[0]
    if not module_name or module_name in sys.modules:
        return None
    try:
        importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            return None  # the module itself is missing: the caller says "no module named ..."
        problem = (f"No module named '{err.name}' ({module_name} imports a package that is not installed)"
                   if err.name else one_line(str(err)))
        tb = err.__traceback__
    except Exception as err:  # noqa: BLE001 - whatever the user's module raised at import time
        problem = f"{type(err).__name__}: {one_line(str(err))}"
        tb = err.__traceback__
    else:
        return None
    # The module's own line that failed: its first top-level ("<module>") frame.
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith("<frozen")]
    frame = next((f for f in frames if f.name == "<module>"), frames[-1] if frames else None)
    if frame is None:
        return problem
    path = Path(frame.filename).resolve()
    shown = path.relative_to(Path.cwd().resolve()) if Path.cwd().resolve() in path.parents else path
    return f"{shown}, line {frame.lineno}: {problem}"


def _import_failure(leaf_key: str, argv: list[str], message: str) -> str | None:
    """The one-line error for a recipe ``class_path`` whose module raised while it was imported, if any."""
    for key, class_path in _class_paths(argv, message):
        problem = import_problem(class_path)
        if problem is not None:
            key = key or leaf_key
            return f"cannot import class_path '{class_path}' for '{key}'{_where(key, argv)}: {problem}"
    return None


def format_parser_error(message: str, valid_keys: list[str] | None = None,
                        argv: list[str] | None = None) -> str:
    """Turn a jsonargparse error message into one readable line naming the offending key.

    Args:
        message: the message jsonargparse passed to ``ArgumentParser.error``.
        valid_keys: dotted keys the (sub)command accepts (``trainer.max_steps``, ``model``, ...), for
            "did you mean" suggestions outside class ``init_args``.
        argv: the command line, to tell recipe keys from overrides.

    Returns:
        e.g. ``unknown key 'model.init_args.lrr' in recipe.yaml (did you mean 'model.init_args.lr'?)`` or
        ``invalid value for 'trainer.max_steps' in override --trainer.max_steps=abc: expected int, got
        'abc'``; the original message when it has no recognisable structure.
    """
    valid_keys = valid_keys or []
    argv = argv or []
    if message.startswith("Problems parsing config"):
        return _config_syntax_error(message, argv)
    leaf = _walk_message(message)
    if leaf is None:
        return message
    if leaf.kind in ("module", "attribute", "other"):
        # jsonargparse reports an exception raised while a class_path's module was imported as that
        # exception's bare text ("boom", "No module named 'skimage'"): import the recipe's modules to say so.
        failure = _import_failure(leaf.key, argv, message)
        if failure is not None:
            return failure
    m = leaf.match
    if leaf.kind == "unrecognized":
        keys = [a[2:].split("=", 1)[0] for a in m["args"].split() if a.startswith("--")]
        if not keys:
            return message
        key = keys[0]
        hint = _suggest_key(key, valid_keys)
        tail = f" (did you mean '{hint}'?)" if hint else ""
        return f"unknown key '{key}' in override {m['args']}{tail}"
    if leaf.kind == "unknown":
        key = f"{leaf.key}.{m['key']}" if leaf.key else m["key"]
        if leaf.classes:
            hint = closest(m["key"].split(".")[0], _class_parameters(leaf.classes[-1]))
            suggestion = f"{leaf.key}.{hint}" if hint else None
        else:
            suggestion = _suggest_key(key, valid_keys)
        tail = f" (did you mean '{suggestion}'?)" if suggestion else ""
        return f"unknown key '{key}'{_where(key, argv)}{tail}"
    if leaf.kind == "type":
        value = m["value"] if m["value"] is not None else leaf.value
        got = f", got {value!r}" if value is not None else ""
        expected = " or ".join(dict.fromkeys(_clean_type(t) for t in leaf.types))
        return f"invalid value for '{leaf.key}'{_where(leaf.key, argv, value)}: expected {expected}{got}"
    if leaf.kind == "required":
        keys = [k.strip().removeprefix(f"{argv[0]}.") if argv else k.strip() for k in m["keys"].split(",")]
        full = [f"{leaf.key}.{k}" if leaf.key else k for k in keys]
        listed = ", ".join(f"'{k}'" for k in full)
        extra = ""
        if full == ["model"]:
            extra = " (a recipe needs `model: {class_path: ..., init_args: {...}}`)"
        return f"missing required key {listed}{_where(full[0], argv)}{extra}"
    if leaf.kind == "attribute":
        class_path = leaf.classes[-1] if leaf.classes else f"{m['module']}.{m['attr']}"
        hint = None
        try:
            hint = closest(m["attr"], [n for n in dir(importlib.import_module(m["module"]))
                                        if not n.startswith("_")])
        except Exception:  # noqa: BLE001 - only for suggestions
            pass
        tail = f" (did you mean '{m['module']}.{hint}'?)" if hint else ""
        return (f"no class {m['attr']} in {m['module']}{tail}: cannot import class_path '{class_path}' for "
                f"'{leaf.key}'{_where(leaf.key, argv)}")
    if leaf.kind == "module":
        class_path = leaf.classes[-1] if leaf.classes else m["module"]
        hint = ""
        if "." not in m["module"]:  # a top-level module: most often the user's own file, not found
            hint = (f" (run {PROG} from the folder that holds {m['module']}.py, or add that folder to "
                    "PYTHONPATH)")
        return (f"cannot import class_path '{class_path}' for '{leaf.key}'{_where(leaf.key, argv)}: "
                f"no module named '{m['module']}'{hint}")
    if leaf.key:
        return f"invalid value for '{leaf.key}'{_where(leaf.key, argv)}: {m.group(0)}"
    return message


class RecipeArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are one readable line (see :func:`format_parser_error`)
    instead of the full usage and jsonargparse's nested union report; exit status stays 2."""

    #: Set by :class:`LitDiffacCLI`: ``message -> readable message``.
    error_formatter: Callable[[str], str] | None = None
    #: Set by :class:`LitDiffacCLI`: the command to suggest for the list of accepted keys.
    help_command: str | None = None

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        formatter = self.error_formatter
        if formatter is None or not self.exit_on_error:
            super().error(message, ex)
        try:
            from jsonargparse._common import debug_mode_active  # noqa: PLC0415 - private, optional

            if debug_mode_active():
                super().error(message, ex)
        except ImportError:
            pass
        try:
            readable = one_line(formatter(message))
        except Exception:  # noqa: BLE001 - never hide the original error behind a formatting bug
            readable = one_line(message)
        self._logger.error(message)
        if self.help_command:
            sys.stderr.write(f"tip: list the accepted keys with: {self.help_command} --help\n")
        sys.stderr.write(f"error: {readable}\n")
        self.exit(2)
