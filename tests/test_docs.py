"""The README's command synopses against the commands' parsers: every option a command accepts is in
its synopsis, and the synopsis names no option the command lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _parsers():
    from analysis.downstream import build_parser as downstream
    from analysis.sensitivity import build_parser as sensitivity
    from hpsearch.run import build_parser as search
    from musicssl.corpus.__main__ import _parser as corpus
    from musicssl.train import build_parser as train

    return {"hpsearch.run": search, "analysis.sensitivity": sensitivity, "analysis.downstream": downstream,
            "musicssl.train": train, "musicssl.corpus": corpus}


def synopses(text: str) -> dict[str, str]:
    """Per module, the README code block that starts with ``python -m MODULE`` (with its continuation lines)."""
    found: dict[str, str] = {}
    blocks, block = [], None
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):  # a fence opens (with or without a language) or closes a block
            if block is not None:
                blocks.append("".join(block))
            block = [] if block is None else None
        elif block is not None:
            block.append(line)
    for block in blocks:
        match = re.match(r"python -m ([\w.]+)", block)
        if match:
            assert match.group(1) not in found, f"two synopses of {match.group(1)} in the README"
            found[match.group(1)] = block
    return found


def test_synopses_are_found_by_the_parser_of_this_test():
    text = ("intro\n```bash\npip install x\n```\n```\npython -m a.b X [--one 1]\n        [--two]\n```\nprose --three\n"
            "```\npython -m c.d\n```\n")
    assert synopses(text) == {"a.b": "python -m a.b X [--one 1]\n        [--two]\n", "c.d": "python -m c.d\n"}


@pytest.mark.parametrize("module", sorted(_parsers()))
def test_every_option_of_a_command_is_in_its_readme_synopsis_and_no_other(module):
    block = synopses(README.read_text())[module]
    parser = _parsers()[module]()
    accepted = {option for action in parser._actions for option in action.option_strings
                if option.startswith("--") and option != "--help"}
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", block))
    assert accepted - shown == set(), f"options of python -m {module} missing from its README synopsis"
    assert shown - accepted == set(), f"options in the README synopsis of python -m {module} that it does not accept"


@pytest.mark.parametrize("module", sorted(_parsers()))
def test_every_option_of_a_command_is_explained_in_its_help(module):
    """``--help`` lists every option with a line of its own that says what it does (an option added without
    ``help=`` is listed bare)."""
    import argparse

    parser = _parsers()[module]()
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = max(action.option_strings, key=len)
        assert action.help not in (None, "", argparse.SUPPRESS), f"python -m {module} {name} has no help text"
        assert len(action.help.split()) >= 2, f"python -m {module} {name}: help {action.help!r} says too little"
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{name} not in python -m {module} --help"
