"""`clientsync completion SHELL`: the script shtab writes, sourced in a real bash and asked to complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env
from worker.providers import REGISTRY

CLIENTSYNC = Path(sys.executable).with_name("clientsync")  # the installed entry point

# Sets COMP_WORDS/COMP_CWORD as bash does on <Tab> (the last word is the one being completed),
# calls the function the script registered for `clientsync`, and prints COMPREPLY, one per line.
_ASK = """
source "$1"; shift
fn=$(complete -p clientsync | sed -E 's/.*-F ([^ ]+).*/\\1/')
COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}
COMPREPLY=()
"$fn" clientsync "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\\n' "${COMPREPLY[@]}"
"""


def script(shell: str) -> str:
    out = subprocess.run([str(CLIENTSYNC), "completion", shell], capture_output=True, text=True,
                         env=clean_env(), timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "clientsync.bash"
    path.write_text(script("bash"))
    return path


def complete(bash_script: Path, *words: str) -> list[str]:
    """What bash offers after `clientsync` + words (the last word is the one being typed)."""
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", _ASK, "ask", str(bash_script), "clientsync", *words],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


def test_bash_completes_subcommands(bash_script: Path) -> None:
    assert complete(bash_script, "wor") == ["worker"]
    assert complete(bash_script, "comp") == ["completion"]
    everything = complete(bash_script, "")
    assert {"worker", "serve", "jobs", "link", "check", "provider", "completion"} <= set(everything)
    assert "qonto" not in everything  # provider names are not subcommands
    assert complete(bash_script, "completion", "") == ["bash", "zsh", "tcsh"]


def test_bash_completes_provider_names_from_the_registry(bash_script: Path) -> None:
    providers = list(REGISTRY)
    assert complete(bash_script, "jobs", "--provider", "q") == ["qonto"]
    assert complete(bash_script, "check", "--provider", "lsp") == ["lsp_expert"]
    assert complete(bash_script, "replay", "--all-dead", "--provider", "inv") == ["invoice_ninja"]
    assert complete(bash_script, "link", "--provider", "") == providers
    assert complete(bash_script, "link", "--provider", "x") == []
    # the positional of `clientsync provider ACTION PROVIDER`
    assert complete(bash_script, "provider", "") == ["pause", "resume", "probe"]
    assert complete(bash_script, "provider", "pause", "") == providers
    # the job filters also name dead letters (provider `intake`); the others do not
    assert set(complete(bash_script, "jobs", "--provider", "")) == {*providers, "intake", "-"}
    assert "intake" not in complete(bash_script, "check", "--provider", "")
    # an option's name is completed as an option, not as a provider
    assert complete(bash_script, "link", "--prov") == ["--provider"]


def test_zsh_and_tcsh_scripts_name_the_subcommands_and_the_providers() -> None:
    zsh, tcsh = script("zsh"), script("tcsh")
    assert zsh.startswith("#compdef clientsync")
    assert "complete clientsync" in tcsh
    for text in (zsh, tcsh):
        assert "completion" in text and all(name in text for name in REGISTRY)


def test_an_unknown_shell_is_refused() -> None:
    out = subprocess.run([str(CLIENTSYNC), "completion", "cmd.exe"], capture_output=True, text=True,
                         env=clean_env(), timeout=60, cwd=REPO)
    assert out.returncode == 2 and "invalid choice" in out.stderr and "bash" in out.stderr
