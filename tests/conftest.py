# Where the unit tests run the tiny model and the kernels: the CPU (CI; the Triton kernels
# interpreted), or a GPU with LANDMARK_TEST_DEVICE=cuda (benchmarks/gpu_check.sh). Importing
# kernel_helpers sets TRITON_INTERPRET=1 on the CPU: it must precede any import of triton.
import pytest
from kernel_helpers import DEVICE as TEST_DEVICE
from tiny import make_tiny_model


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
