"""Shared fixtures, and the ``--device`` option.

``pytest --device cuda -m device`` runs, on a CUDA device, the tests that build their tensors and modules on
the ``device`` fixture (those, and only those, carry the ``device`` marker: it is added to every test that
asks for the fixture). ``--device cuda`` without CUDA is a usage error, not a silent CPU run.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs on every core (pytest-xdist, addopts): one math thread per worker, and per process it
    # starts (DDP ranks, app runs), so that the workers do not oversubscribe the cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

DEVICES = ("cpu", "cuda")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="device of the tests marked 'device' (those using the device fixture); default cpu",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "device: builds its tensors/modules on the --device option's device (the device fixture)"
    )
    if config.getoption("--device", default="cpu") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--device cuda: CUDA is not available (torch {torch.__version__}, "
            f"torch.version.cuda={torch.version.cuda}); run without --device or on a CUDA machine"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The ``--device`` option's device (``cpu`` by default)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(params=["scan", "segments"])
def gramian_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force the Gramian path's strategy for diagonal transitions, so that a test exercises both the
    full scan and the segment path (``ess_train.ess.gramian.use_segments`` picks one by cost otherwise)."""
    import ess_train.ess.gramian as gramian

    force = request.param == "segments"
    monkeypatch.setattr(gramian, "use_segments", lambda n_pos, L: force)
    return request.param


def _fla_imports() -> bool:
    try:  # fla needs triton even to import
        import fla.layers  # noqa: F401
    except ImportError:
        return False
    return True


# fla's adapter tests need fla, which lives apart (.fla-env: installed in the main environment it would make
# transformers route Qwen3-Next to fla's GPU kernels): where it does not import, test_adapters_fla_env.py
# runs that file in a subprocess with .fla-env on the path.
collect_ignore = [] if _fla_imports() else ["adapters/test_adapters_fla.py"]
