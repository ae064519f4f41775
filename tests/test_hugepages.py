"""The `vsal` command's restart with glibc's huge-page tunable: when it happens, and that it happens once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from vsal.runtime import hugepages
from vsal.runtime.hugepages import OFF_SWITCH, RESTARTED, TUNABLE, hugepage_environment, thp_mode

import vsal

GLIBC = (2, 36)


@pytest.mark.parametrize(
    ("text", "mode"),
    [("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"), ("garbled\n", None)],
)
def test_thp_mode_reads_the_bracketed_word(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert thp_mode(path) == mode
    assert thp_mode(tmp_path / "absent") is None


def test_restart_sets_the_tunable_beside_the_users_own():
    env = hugepage_environment({"PATH": "/bin"}, "madvise", GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"{TUNABLE}=1", RESTARTED: "1"}
    env = hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"


@pytest.mark.parametrize(
    ("environ", "mode", "glibc"),
    [
        ({}, "always", GLIBC),  # every large allocation gets huge pages already
        ({}, "never", GLIBC),
        ({}, None, GLIBC),  # not Linux, or no THP
        ({}, "madvise", (2, 34)),  # glibc without the tunable
        ({}, "madvise", None),  # musl and others
        ({"VSAL_HUGEPAGES": "0"}, "madvise", GLIBC),
        ({"GLIBC_TUNABLES": f"{TUNABLE}=1"}, "madvise", GLIBC),  # the restarted process: no loop
        ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, "madvise", GLIBC),  # the user's own choice stands
        ({RESTARTED: "1"}, "madvise", GLIBC),  # restarted once, even if something dropped the tunable
    ],
)
def test_no_restart_where_it_would_change_nothing(environ, mode, glibc):
    assert hugepage_environment(environ, mode, glibc) is None


def _restarted(env_extra: dict[str, str], tmp_path) -> list[str]:
    """Run a script that restarts itself with the tunable: what each of its lives printed."""
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        "from vsal.runtime.hugepages import restart_with_hugepages\n"
        "print(os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], flush=True)\n"
        "restart_with_hugepages()\n"
    )
    ours = ("GLIBC_TUNABLES", OFF_SWITCH, RESTARTED)
    env = {k: v for k, v in os.environ.items() if k not in ours} | env_extra
    out = subprocess.run(
        [sys.executable, str(script), "a b", "--flag"], capture_output=True, text=True, env=env, check=True
    )
    return out.stdout.splitlines()


def test_a_command_restarts_once_with_its_arguments(tmp_path):
    if hugepage_environment({}, thp_mode(), hugepages.glibc_version()) is None:
        pytest.skip(f"no restart on this machine: THP {thp_mode()}, glibc {hugepages.glibc_version()}")
    first, second = _restarted({}, tmp_path)
    assert first.split()[0] == second.split()[0]  # the same process, replaced by exec
    assert first.endswith("['a b', '--flag']") and second.endswith("['a b', '--flag']")
    assert f"{TUNABLE}=1" in second and f"{TUNABLE}=1" not in first
    assert _restarted({"VSAL_HUGEPAGES": "0"}, tmp_path)[1:] == []


def test_state_names_what_the_process_has(monkeypatch):
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "glibc_version", lambda: GLIBC)
    assert hugepages.state({"GLIBC_TUNABLES": f"{TUNABLE}=1"}) == f"huge pages: on (THP madvise, {TUNABLE}=1)"
    assert hugepages.state({"GLIBC_TUNABLES": f"a=1:{TUNABLE}=2"}).startswith("huge pages: on")
    assert hugepages.state({"GLIBC_TUNABLES": f"{TUNABLE}=0"}) == "huge pages: off (THP madvise)"
    assert hugepages.state({}) == "huge pages: off (THP madvise)"
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 34))  # the tunable means nothing there
    assert hugepages.state({"GLIBC_TUNABLES": f"{TUNABLE}=1"}) == "huge pages: off (THP madvise)"
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "always")
    assert hugepages.state({}) == "huge pages: on (THP always)"


def test_the_vsal_command_restarts_before_it_imports_the_command_line():
    """The console script's entry: the restart comes first (the command line's imports are paid
    once), then the command runs."""
    code = (
        "import sys; import vsal.runtime.hugepages as h\n"
        "h.restart_with_hugepages = lambda: print('cli loaded:', 'vsal.runtime.cli' in sys.modules)\n"
        "from vsal.runtime.entry import main\n"
        "sys.argv = ['vsal', '--version']\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["cli loaded: False", f"vsal, version {vsal.__version__}"]
