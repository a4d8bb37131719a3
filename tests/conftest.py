import os

# Where the unit tests run the tiny model and the kernels: the CPU (CI), or a GPU with
# LANDMARK_TEST_DEVICE=cuda (benchmarks/gpu_check.sh).
TEST_DEVICE = os.environ.get("LANDMARK_TEST_DEVICE", "cpu")
# Triton reads this once, at import: on the CPU the kernel tests run the Triton kernels
# through its interpreter (CI has no GPU). Must precede any import of triton.
if not TEST_DEVICE.startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tiny import make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def landmark_home(tmp_path, monkeypatch):
    """Every test gets its own LANDMARK_HOME, so nothing touches the user's cache."""
    home = tmp_path / "landmark-home"
    monkeypatch.setenv("LANDMARK_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def default_home(tmp_path_factory):
    """A LANDMARK_HOME shared by the end-to-end tests, so the default model is converted once."""
    return tmp_path_factory.mktemp("landmark-home")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from landmark_cli.model.loading import load_model

    return load_model(str(tiny_dir), device=TEST_DEVICE)
