"""Test settings: never touch a hub, keep torch small and deterministic."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# the image-check cache of the test run stays out of the user's home folder
os.environ.setdefault("COALIGN_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"coalign-tests-{os.getpid()}"))

import pytest  # noqa: E402
import torch  # noqa: E402

# tiny models run several times faster on one thread than on two contending ones
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
