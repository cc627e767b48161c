"""jaxgpt.cli.hostmem: when the entry points re-execute with glibc's huge pages, and that they do."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt.cli.hostmem import TUNABLE, huge_pages_env

MADVISE = "always [madvise] never\n"


def test_sets_the_tunable_once_and_keeps_others():
    env = huge_pages_env({"PATH": "/bin"}, MADVISE, "glibc")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"{TUNABLE}=1"}
    assert huge_pages_env(env, MADVISE, "glibc") is None  # the re-executed process stops there
    other = huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE, "glibc")
    assert other["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"


@pytest.mark.parametrize("environ, mode, libc", [
    ({"JAXGPT_HUGE_PAGES": "0"}, MADVISE, "glibc"),     # turned off
    ({}, "[always] madvise never\n", "glibc"),          # the kernel gives them anyway
    ({}, "always madvise [never]\n", "glibc"),          # none to have
    ({}, MADVISE, ""),                                  # musl, macOS: no such tunable
    ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, MADVISE, "glibc"),  # the user's own choice wins
])
def test_leaves_the_environment_alone(environ, mode, libc):
    assert huge_pages_env(environ, mode, libc) is None


def test_a_script_re_executes_with_its_arguments(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import os, sys\nfrom jaxgpt.cli.hostmem import reexec_with_huge_pages\n"
                      "reexec_with_huge_pages()\nprint(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXGPT_HUGE_PAGES")}
    out = subprocess.run([sys.executable, str(script), "a", "--b"], env=env, capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=1)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    expected = f"{TUNABLE}=1" if thp.exists() and "[madvise]" in thp.read_text() else "None"
    assert out == [expected, "['a', '--b']\n"]
